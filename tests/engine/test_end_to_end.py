"""The pipeline end to end on a small attention + MLP model: numerics, explain, graph breaks,
dynamic shapes, and a model with nothing to match."""
import sys

import pytest
import torch

import fusion_backend
from fusion_backend.backend import GraphRecord, TruthfuseBackend

from .models import Block, CausalSelfAttention, NoAttention

AGGRESSIVE_EAGER = {"strategy": "aggressive", "inner": "eager", "cache": False}


def _grads(model, x):
    return [x.grad] + [p.grad for p in model.parameters()]


def _compare_training(model, compiled, x, atol=2e-5, rtol=2e-4):
    x_ref = x.detach().clone().requires_grad_()
    x_new = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    ref = model(x_ref)
    ref.square().sum().backward()
    ref_grads = [x_ref.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    out = compiled(x_new)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    out.square().sum().backward()
    new_grads = [x_new.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol * 10)


def test_block_matches_eager_under_inductor():
    model = Block()
    x = torch.randn(2, 16, 32)
    compiled = torch.compile(model, backend="truthfuse", options={"strategy": "aggressive", "cache": False})
    _compare_training(model, compiled, x)


@pytest.mark.parametrize("dynamic", [False, True])
def test_block_matches_eager_with_eager_inner(dynamic):
    model = Block()
    compiled = torch.compile(model, backend=fusion_backend.backend(**AGGRESSIVE_EAGER), dynamic=dynamic)
    for T in (16, 11):
        _compare_training(model, compiled, torch.randn(2, T, 32))


def test_inference_under_no_grad():
    model = Block().eval()
    x = torch.randn(3, 9, 32)
    compiled = torch.compile(model, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=2e-5, rtol=2e-4)


def test_explain_lists_the_attention_site():
    report = fusion_backend.explain(Block(), torch.randn(2, 16, 32), options=AGGRESSIVE_EAGER)
    attention = [s for s in report.sites if s.kind == "attention"]
    assert len(attention) == 1
    site = attention[0]
    assert site.variant == "dot" and site.decision == "fused"
    assert site.location.rsplit(":", 1)[0].endswith("models.py") and site.location.rsplit(":", 1)[1].isdigit()
    text = str(report)
    assert "attention" in text and "fused" in text and "models.py" in text
    assert report.tuning.cache_hit is False and report.tuning.measurements == 0


def test_explain_says_where_an_option_given_as_a_keyword_argument_goes():
    """explain's keyword arguments go to the model; explain(model, x, strategy="aggressive") failed
    in Dynamo's trace with "forward() got an unexpected keyword argument 'strategy'" (found by a
    sixteenth fuzz round). A model that takes such a name still gets it."""
    with pytest.raises(TypeError, match=r"pass options=\{'strategy': 'aggressive'\}"):
        fusion_backend.explain(Block(), torch.randn(2, 16, 32), strategy="aggressive")

    def scaled(x, cache):
        return x * 2 if cache else x

    x = torch.randn(3, 4)
    report = fusion_backend.explain(scaled, x, cache=True, options=AGGRESSIVE_EAGER)
    assert report.graphs == 1

    # A model that takes **kwargs (Hugging Face's do) took the option silently, and was explained
    # under the default strategy.
    class TakesKwargs(torch.nn.Module):
        def forward(self, x, **kwargs):
            return x * 2

    with pytest.raises(TypeError, match=r"options=\{'inner': 'eager'\}"):
        fusion_backend.explain(TakesKwargs(), x, inner="eager")
    with pytest.raises(TypeError, match="is a truthfuse option"):
        fusion_backend.explain(torch.compile(TakesKwargs(), backend="eager"), x, inner="eager")


def test_explain_locates_a_site_of_torch_nn_modules_alone_by_its_module():
    """No line of the user's code is on the trace of a model made only of torch.nn modules (the
    worked example in docs/authoring-rules.md, an nn.TransformerEncoderLayer); explain() listed
    such sites at '<unknown>'. It names the module that computed the site's result."""
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    report = fusion_backend.explain(mlp, torch.randn(4, 16), options=AGGRESSIVE_EAGER)
    assert [s.location for s in report.sites] == ["module 2 (Linear)"]
    layer = torch.nn.Sequential(torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))
    report = fusion_backend.explain(layer, torch.randn(2, 5, 16), options=AGGRESSIVE_EAGER)
    assert {s.kind: s.location for s in report.sites} == {
        "attention": "module 0.self_attn (MultiheadAttention)", "feedforward": "module 0 (TransformerEncoderLayer)"}
    assert "<unknown>" not in str(report)


def test_explain_says_a_kept_site_lost_its_rule_to_disable():
    """With the dot rule disabled, the site is listed under its causal sibling with that rule's
    near-miss; the report must also say that the rule which would have matched is disabled."""
    def attention(q, k, v):
        return (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    report = fusion_backend.explain(attention, q, k, v, options={**AGGRESSIVE_EAGER, "disable": ["attention.dot"]})
    assert report.sites and all(s.decision == "kept" for s in report.sites)
    assert all("disabled by options: attention.dot" in s.reason for s in report.sites)
    assert "disabled by options: attention.dot" in str(report).splitlines()[-1]


def test_conservative_says_a_dropout_site_is_kept_because_it_is_inexact():
    """Only keeping is left to such a site, but not because there was nothing to tune: the
    reason must say that conservative refuses its rewrite."""
    import torch.nn.functional as F

    def attention_with_dropout(q, k, v):
        return F.dropout((q @ k.transpose(-2, -1) * 0.25).softmax(-1), 0.1, training=True) @ v

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    report = fusion_backend.explain(attention_with_dropout, q, k, v,
                                    options={"strategy": "conservative", "inner": "eager", "cache": False})
    (site,) = report.sites
    assert site.decision == "kept"
    assert site.reason.startswith("conservative: not exact") and "dropout" in site.reason


def _sin_twice(x):
    return torch.sin(x) * 2


def test_explaining_one_function_many_times_leaves_the_users_recompile_budget_alone():
    """Each explain() compiles with a backend of its own: a recompile of the same code. The 9th
    used to find Dynamo's recompile limit reached and report 0 graphs, and a later compile of the
    user's own met the same limit and ran uncompiled."""
    x = torch.randn(4)
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        assert fusion_backend.explain(_sin_twice, x, options=AGGRESSIVE_EAGER).graphs == 1
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch.compile(_sin_twice, backend=counting_backend)(x)
    assert len(compiles) == 1


def test_explain_says_when_dynamo_reached_its_recompile_limit():
    x = torch.randn(4)
    torch.compile(_sin_twice, backend="eager")(x)
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        with pytest.raises(RuntimeError, match="recompile limit"):
            fusion_backend.explain(_sin_twice, x, options=AGGRESSIVE_EAGER)


def test_explain_a_module_compiled_in_place():
    """module.compile(...) makes the module run its own compiled code when called: explain saw no
    graph and reported '0 graph(s), no site'. It explains the module as written, and leaves the
    module's own compiled code in place."""
    model = CausalSelfAttention()
    x = torch.randn(2, 16, 32)
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    model.compile(backend=counting_backend)
    model(x)
    report = fusion_backend.explain(model, x, options=AGGRESSIVE_EAGER)
    assert report.graphs == 1 and [s.decision for s in report.sites if s.kind == "attention"] == ["fused"]
    model(x)
    assert len(compiles) == 1 and model._compiled_call_impl is not None


def test_graph_breaks_compile_each_graph():
    attn1, attn2 = CausalSelfAttention(), CausalSelfAttention()

    def fn(x):
        y = attn1(x)
        torch._dynamo.graph_break()
        return attn2(y)

    x = torch.randn(2, 16, 32)
    report = fusion_backend.explain(fn, x, options=AGGRESSIVE_EAGER)
    assert report.graphs == 2
    assert [s.decision for s in report.sites if s.kind == "attention"] == ["fused", "fused"]
    compiled = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
    torch.testing.assert_close(compiled(x), fn(x), atol=2e-5, rtol=2e-4)


def test_nothing_to_match_hands_over_the_original_graph():
    model = NoAttention()
    gm = torch.fx.symbolic_trace(model)
    backend = TruthfuseBackend(fusion_backend.parse_options(AGGRESSIVE_EAGER))
    record = GraphRecord(index=0)
    assert backend._rewrite(gm, [torch.randn(2, 16)], record) is gm
    assert record.sites == []
    report = fusion_backend.explain(model, torch.randn(2, 16), options=AGGRESSIVE_EAGER)
    assert report.sites == [] and "no attention or feed-forward site" in str(report)


def test_explain_says_when_dynamo_handed_over_no_graph():
    """A call Dynamo compiles no graph for (here: nothing to compute) ran as plain PyTorch; the
    report says that, not that a graph compiled without sites."""
    report = fusion_backend.explain(lambda x: x, torch.randn(3), options=AGGRESSIVE_EAGER)
    assert report.graphs == 0 and "handed truthfuse no graph" in str(report), str(report)
    assert "the graph compiled" not in str(report)



class _Checkpointed(torch.nn.Module):
    """A module run under non-reentrant torch.utils.checkpoint, as HF's gradient checkpointing
    runs each layer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(self.inner, x, use_reentrant=False)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_checkpointed_code_fuses_and_is_still_recomputed(inner, monkeypatch):
    """Code under torch.utils.checkpoint (HF's gradient_checkpointing_enable() puts every layer
    there) reaches truthfuse as the body of Dynamo's checkpoint operator, which the rules did not
    look into: nothing in a model whose every layer is checkpointed fused. Each body now goes
    through the pipeline: its sites are reported and fused, results equal eager's, and the
    checkpoint still recomputes the body in the backward (the fused attention op runs twice a
    training step: forward and recomputation)."""
    attention = sys.modules["fusion_backend.ops.attention"]
    calls = []
    forward = attention._fwd_impl
    monkeypatch.setattr(attention, "_fwd_impl", lambda *args: calls.append(1) or forward(*args))
    model = torch.nn.Sequential(_Checkpointed(Block()), _Checkpointed(Block()))
    x = torch.randn(2, 8, 32)
    options = {**AGGRESSIVE_EAGER, "inner": inner}
    report = fusion_backend.explain(model, x.requires_grad_(), options=options)
    assert sorted((s.kind, s.decision) for s in report.sites) == [("attention", "fused")] * 2 + \
        [("feedforward", "fused")] * 2, str(report)
    assert "checkpoint" not in str(report), str(report)  # no note: nothing was left unlooked
    torch._dynamo.reset()
    calls.clear()
    _compare_training(model, torch.compile(model, backend="truthfuse", options=options), x)
    assert len(calls) == 4, calls  # 2 layers, each forward and recomputed
    torch._dynamo.reset()


def test_explain_lists_checkpointed_sites_in_order_with_their_reason():
    """A graph whose only sites are in checkpoint bodies: explain() listed the bodies' sites last
    checkpoint first (the feed-forward block before the attention that runs before it), and its
    plan line ended in an empty reason ("plan: ...=fuse, ...=fuse; "), the bodies' own left out."""
    attention = _Checkpointed(CausalSelfAttention(d=16, heads=2, max_len=8))
    mlp = _Checkpointed(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)))
    model = torch.nn.Sequential(attention, mlp)
    report = fusion_backend.explain(model, torch.randn(2, 8, 16, requires_grad=True), options=AGGRESSIVE_EAGER)
    assert [(s.kind, s.decision) for s in report.sites] == [("attention", "fused"), ("feedforward", "fused")], \
        str(report)
    assert report.tuning.reasons == ["only one valid plan: nothing to tune"], str(report)
    assert str(report).count("; only one valid plan: nothing to tune") == 1, str(report)


def test_checkpointed_decisions_are_cached(tmp_path, monkeypatch):
    """The checkpoint bodies' plans go through the tuning cache like any graph's; a graph whose
    only sites are checkpointed reports a cache hit when all of theirs came from it."""
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    model = torch.nn.Sequential(_Checkpointed(Block()), _Checkpointed(Block()))
    x = torch.randn(2, 8, 32, requires_grad=True)
    hits = []
    for _ in range(2):
        backend = fusion_backend.backend(strategy="aggressive", inner="eager")
        torch.compile(model, backend=backend)(x)
        torch._dynamo.reset()
        assert [s.decision for r in backend.records for s in r.sites] == ["fused"] * 4
        hits.append([r.cache_hit for r in backend.records])
    assert hits == [[False], [True]], hits
    assert list(tmp_path.glob("*.json")), "nothing was cached"


def test_checkpointed_code_inside_an_autocast_block_is_not_looked_into():
    """A checkpoint called inside an autocast block of the compiled code: the body's own graph does
    not show that block, so a replacement traced there would compute under other modes than eager.
    Such a body is kept whole, and explain() says so; the same layer outside the block fuses."""
    layer = _Checkpointed(CausalSelfAttention())
    outside = CausalSelfAttention()

    def model(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        return outside(y.float())

    report = fusion_backend.explain(model, torch.randn(2, 8, 32, requires_grad=True), options=AGGRESSIVE_EAGER)
    assert [(s.kind, s.decision) for s in report.sites] == [("attention", "fused")], str(report)
    assert "runs inside a no_grad(), inference_mode() or autocast block" in str(report), str(report)
    torch._dynamo.reset()


class _CheckpointedWrites(torch.nn.Module):
    """A checkpointed body that writes its block's result in place and returns it; the writes'
    own results are unused."""

    def __init__(self):
        super().__init__()
        self.block = Block(d=16, heads=2, max_len=8)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        def body(t):
            y = self.block(t)
            y.mul_(2)
            y.masked_fill_(t > 1, 0.5)
            return y

        return checkpoint(body, x, use_reentrant=False)


@pytest.mark.parametrize("disable", [[], ["attention", "feedforward"]])
def test_checkpointed_in_place_writes_are_kept(disable):
    """torch.fx's dead-code elimination, run on the canonical copy of the graph, went on into the
    checkpoint body, a submodule shared with Dynamo's graph, with FX's default notion of impure:
    the body's y.mul_(2) and y.masked_fill_(...) were erased, with nothing fused as well (output
    up to 3.7 off eager). Dead-code elimination now stays in the graph it is run on."""
    model = _CheckpointedWrites()
    backend = fusion_backend.backend(**AGGRESSIVE_EAGER, disable=disable)
    _compare_training(model, torch.compile(model, backend=backend), torch.randn(2, 8, 16))
    fused = {(s.kind, s.decision) for r in backend.records for s in r.sites}
    assert fused == (set() if disable else {("attention", "fused"), ("feedforward", "fused")}), fused


class _FilledAttention(torch.nn.Module):
    """Attention whose causal mask is made in its forward and filled with -1e9: the fused
    replacement holds the fill as a tensor constant."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in self.qkv(x).split(C, -1))
        scores = (q @ k.transpose(-2, -1)) * 0.35
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -1e9)
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, C)


@pytest.mark.parametrize("inner,nested", [("eager", False), ("aot_eager", False), ("eager", True)])
def test_checkpointed_replacement_with_a_tensor_constant_compiles(inner, nested):
    """A replacement's tensor constant is a buffer of the graph module it is spliced into. In a
    checkpoint body, with nothing fused in the graph around it, that graph went on to AOTAutograd
    as Dynamo's own graph module, and AOTAutograd, looking for the body's buffer among Dynamo's
    parameter sources, raised ("wrap_body_0._truthfuse_const_attention_dot_0 not found in
    param_name_to_source"). The graph goes on as a copy, as where its own sites fuse; so does a
    checkpoint body whose own checkpointed body holds one (nested checkpoints)."""
    model = _Checkpointed(_FilledAttention())
    if nested:
        model = _Checkpointed(torch.nn.Sequential(model, torch.nn.Tanh()))
    backend = fusion_backend.backend(**{**AGGRESSIVE_EAGER, "inner": inner})
    _compare_training(model, torch.compile(model, backend=backend), torch.randn(2, 8, 16))
    assert [(s.kind, s.decision) for r in backend.records for s in r.sites] == [("attention", "fused")]


@pytest.mark.parametrize("strategy", ["conservative", "aggressive"])
def test_checkpointed_dropout_gets_the_forwards_masks_in_the_backward(strategy):
    """Dropout under a checkpoint: the backward must use the masks the forward drew. With
    inner="eager", the graph ran as Dynamo made it, and Dynamo's checkpoint operator recomputed
    its body without the forward's random state (pytorch/pytorch#160773): the gradients belonged
    to other masks, whether the site was kept (torch's dropout) or fused (the op's Philox seed).
    Checked as a directional derivative of the dropped function, its masks fixed by one seed."""
    torch.manual_seed(0)
    model = _Checkpointed(CausalSelfAttention(p=0.3)).train()
    backend = fusion_backend.backend(strategy=strategy, inner="eager", cache=False)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 8, 32, requires_grad=True)
    direction = torch.randn_like(x)
    torch.manual_seed(5)
    (grad,) = torch.autograd.grad(compiled(x).square().sum(), x)
    eps = 1e-2
    with torch.no_grad():
        torch.manual_seed(5)
        plus = compiled(x + eps * direction).square().sum()
        torch.manual_seed(5)
        minus = compiled(x - eps * direction).square().sum()
    numeric = (plus - minus) / (2 * eps)
    analytic = (grad * direction).sum()
    assert abs(numeric - analytic) < 1e-3 * max(1.0, abs(analytic)), (numeric, analytic)
    fused = [s.decision for r in backend.records for s in r.sites]
    assert fused and set(fused) == {"fused" if strategy == "aggressive" else "kept"}, fused
    torch._dynamo.reset()


def test_first_call_inside_eager_checkpoint_of_a_compiled_block_trains():
    """A compiled block called for the first time inside eager non-reentrant checkpointing
    (checkpoint(compiled, x), or checkpoint_wrapper around a compiled block) compiles there, under
    the checkpoint's saved-tensor hooks. truthfuse's tracing of replacements recorded tensors
    through those hooks, so the checkpoint saw more saved tensors in the forward than in the
    recomputation and the backward raised CheckpointError; a user's pack hook was handed
    FakeTensors. Compile-time work no longer reaches the caller's hooks."""
    from torch.utils.checkpoint import checkpoint

    model = Block()
    x = torch.randn(2, 8, 32)
    backend = fusion_backend.backend(**AGGRESSIVE_EAGER)
    _compare_training(model, lambda t: checkpoint(torch.compile(model, backend=backend), t, use_reentrant=False), x)
    assert {(s.kind, s.decision) for r in backend.records for s in r.sites} == {("attention", "fused"),
                                                                               ("feedforward", "fused")}
    torch._dynamo.reset()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(type(t)) or t, lambda t: t):
        torch.compile(model, backend="truthfuse", options=AGGRESSIVE_EAGER)(x.requires_grad_())
    assert packed and all(not issubclass(t, torch._subclasses.FakeTensor) for t in packed), packed


def test_explain_says_ddp_optimizer_cut_the_graph_at_bucket_boundaries(tmp_path, monkeypatch):
    """torch.compile of a DistributedDataParallel model: Dynamo's DDPOptimizer cuts the graph at
    DDP's gradient-bucket boundaries and compiles each piece alone, so a feed-forward block whose
    Linears fall in two buckets is in two graphs and no rule finds it. explain() listed "N graph(s)"
    and the attention alone, with nothing to say why; it now says so. One bucket: no note."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        bucket_mb = 0.005
        # torch's DDPOptimizer asserts its first bucket (1 MiB by default) is at most the bucket cap
        monkeypatch.setattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", int(bucket_mb * 2**20))
        model, x = Block(), torch.randn(2, 8, 32, requires_grad=True)
        report = fusion_backend.explain(DDP(model, bucket_cap_mb=bucket_mb), x, options=AGGRESSIVE_EAGER)
        assert report.graphs > 1 and not [s for s in report.sites if s.kind == "feedforward"], str(report)
        assert "note: Dynamo's DDPOptimizer cut this DistributedDataParallel model's graph" in str(report), str(report)
        torch._dynamo.reset()
        monkeypatch.undo()  # DDP's defaults: one 25 MB bucket holds the whole block
        report = fusion_backend.explain(DDP(model), x, options=AGGRESSIVE_EAGER)
        assert report.graphs == 1 and len(report.fused) == 2, str(report)
        assert "DDPOptimizer" not in str(report), str(report)
    finally:
        dist.destroy_process_group()


def test_explain_says_attention_under_no_grad_inside_the_graph_is_not_looked_into():
    """Attention under a no_grad() block inside a graph that records gradients is left as written
    and matches no rule; explain() said only "no attention or feed-forward site was found".
    Called wholly under no_grad() (no switch inside the graph), the same code fuses."""
    def fn(q, k, v):
        with torch.no_grad():
            return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    report = fusion_backend.explain(fn, q, k, v, options=AGGRESSIVE_EAGER)
    assert "note: code under torch.no_grad() or inference_mode() inside this graph" in str(report), str(report)
    torch._dynamo.reset()
    with torch.no_grad():
        report = fusion_backend.explain(fn, q, k, v, options=AGGRESSIVE_EAGER)
    assert [s.decision for s in report.sites] == ["fused"] and "no_grad" not in str(report), str(report)


def test_moderate_strategy_measures_and_never_crashes():
    model = CausalSelfAttention()
    x = torch.randn(2, 16, 32)
    report = fusion_backend.explain(model, x, options={"inner": "eager", "cache": False, "simulations": 4})
    assert report.tuning.measurements >= 2  # the all-keep plan and the fused one
    assert len(report.sites) == 1 and report.sites[0].decision in ("fused", "kept")
    assert report.sites[0].reason


def test_a_site_kept_in_a_plan_that_fuses_others_says_so():
    """The plan's reason ("fused plan X ms vs all-keep Y ms") is about the fused sites; a site the
    plan keeps must not read as if it had won."""
    from types import SimpleNamespace

    backend_module = sys.modules["fusion_backend.backend"]
    kept = SimpleNamespace(id="g0.ffn", nodes={"a"})
    fused = SimpleNamespace(id="g0.attn", nodes={"b"}, rule=SimpleNamespace(name="attention.dot"), location="m.py:1")
    record = SimpleNamespace(tuning_reason="fused plan 20.4 ms vs all-keep 40.4 ms")
    reason = backend_module._keep_reason(kept, [kept, fused], {"g0.attn"}, record)
    assert reason.startswith("the tuner's plan keeps it") and "20.4 ms" in reason
    assert backend_module._keep_reason(kept, [kept], set(), record) == record.tuning_reason


def test_explain_says_a_transformer_layer_took_torchs_inference_fast_path():
    """nn.TransformerEncoderLayer in eval mode under no_grad() runs PyTorch's inference fast path,
    one native op for the whole layer (`torch._transformer_encoder_layer_fwd`) that Dynamo puts in
    the graph as it is: no rule can look into it, and explain() said only "no attention or
    feed-forward site was found". It names the fast path and how to turn it off; with it off, the
    layer's attention and feed-forward block fuse and match eager."""
    layer = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
        enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        report = fusion_backend.explain(layer, x, src_key_padding_mask=padding, options=AGGRESSIVE_EAGER)
    assert not report.sites, str(report)
    assert any("fast path" in n and "module layers.0 (TransformerEncoderLayer)" in n
               and "module layers.1 (TransformerEncoderLayer)" in n
               and "torch.backends.mha.set_fastpath_enabled(False)" in n for n in report.notes), str(report)
    assert len(report.notes) == 1, str(report)
    torch._dynamo.reset()
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            report = fusion_backend.explain(layer, x, src_key_padding_mask=padding, options=AGGRESSIVE_EAGER)
            compiled = torch.compile(layer, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
            out = compiled(x, src_key_padding_mask=padding)
            torch.backends.mha.set_fastpath_enabled(True)
            ref = layer(x, src_key_padding_mask=padding)  # the fast path's own result
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    assert len(report.fused) == 4 and not report.notes, str(report)
    torch.testing.assert_close(out[1], ref[1], atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(out[0, :3], ref[0, :3], atol=2e-5, rtol=2e-4)
