"""examples/truthgpt.py: the factory, explain on every metric, and short CPU training runs.

Sizes are tiny (B <= 2, T=8; the model's width is fixed at 256) and truthfuse's inner compiler is
eager, so the Triton interpreter is the only slow part."""
import copy

import pytest
import torch

import fusion_backend
from examples import truthgpt

EAGER_INNER = {"strategy": "aggressive", "inner": "eager", "cache": False}


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """train() and main() use the tuning cache; keep it out of the user's."""
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path / "cache"))


def test_build_returns_model_and_inputs():
    model, (tokens, targets) = truthgpt.build("l2", batch=3, seq=8, dropout=0.0)
    assert tokens.shape == targets.shape == (3, 8)
    assert tokens.dtype == torch.long and int(tokens.max()) < truthgpt.VOCAB
    assert torch.equal(tokens[:, 1:], targets[:, :-1])  # next-token targets
    # the seed's 2.09M parameters: no positional table, untied head
    assert sum(p.numel() for p in model.parameters()) == 2_093_048
    assert model.blocks[0].attn.log_lam.shape == (truthgpt.HEADS, 1, 1)
    loss = model(tokens, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model(tokens).shape == (3, 8, truthgpt.VOCAB)


def test_build_rejects_unknown_metric_and_dtype():
    with pytest.raises(ValueError, match="dot, l2, l1, cosine"):
        truthgpt.build("l3")
    with pytest.raises(ValueError, match="fp32"):
        truthgpt.build("l2", dtype="int8")


def test_corpus_ships_with_python():
    tokens = truthgpt.tokenize(truthgpt.corpus_text())
    assert tokens.numel() > 5000
    assert int(tokens.max()) == truthgpt.VOCAB - 1
    assert (tokens == 0).float().mean() < 0.2  # most words are in the vocabulary


@pytest.mark.parametrize("metric", truthgpt.METRICS)
def test_explain_fuses_every_attention_site(metric):
    model, inputs = truthgpt.build(metric, batch=2, seq=8, dropout=0.0)
    report = fusion_backend.explain(model, *inputs, options=EAGER_INNER)
    fused = [s for s in report.fused if s.kind == "attention"]
    assert len(fused) == truthgpt.LAYERS, str(report)
    assert all(s.variant == metric for s in fused), str(report)
    # anything kept at an attention location is only the overlapping smaller match (cosine's dot)
    fused_locations = {s.location for s in fused}
    for s in report.kept:
        if s.kind == "attention":
            assert s.location in fused_locations and "overlaps fused site" in s.reason, str(report)
    # and the report counts those as covered, not as places left unfused
    covered = [s for s in report.kept if "overlaps fused site" in s.reason]
    assert report.alternatives == covered
    head = str(report).splitlines()[0]
    assert f"{len(report.kept) - len(covered)} kept" in head, head
    assert (f"{len(covered)} covered by a fused site" in head) == bool(covered), head


def test_truthfuse_loss_curve_matches_eager():
    """fp32, dropout 0: three AdamW steps under truthfuse follow eager's losses."""
    model, _ = truthgpt.build("l2", batch=1, seq=8, dropout=0.0)
    data = truthgpt.batches(truthgpt.tokenize(truthgpt.corpus_text()), 3, 1, 8, seed=1)
    device = torch.device("cpu")
    eager = truthgpt.train("eager", copy.deepcopy(model), data, device, warmup=0)
    fused = truthgpt.train("truthfuse", copy.deepcopy(model), data, device, inner="eager", warmup=0)
    assert fused["fused_sites"] == 2 * truthgpt.LAYERS  # attention and feed-forward in each block
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(eager["losses"]), rtol=1e-4, atol=1e-4)
    assert eager["losses"][-1] < eager["losses"][0]


def test_truthfuse_gradients_match_eager():
    """One backward: every weight's gradient, the per-head lambdas' included. (Weights after AdamW
    steps are not compared: Adam turns last-bit differences in near-zero gradients into lr-sized
    steps.)"""
    model, inputs = truthgpt.build("cosine", batch=1, seq=8, dropout=0.0)
    fused_model = copy.deepcopy(model)
    model(*inputs).backward()
    compiled = torch.compile(fused_model, backend=fusion_backend.backend(**EAGER_INNER))
    compiled(*inputs).backward()
    for (name, a), b in zip(fused_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_main_runs_two_cpu_steps(capsys):
    results = truthgpt.main(["--steps", "2", "--batch", "1", "--seq", "8", "--metric", "cosine",
                             "--variants", "eager,truthfuse", "--inner", "eager", "--warmup", "0",
                             "--dropout", "0.1"])
    assert [r["variant"] for r in results] == ["eager", "truthfuse"]
    assert all(len(r["losses"]) == 2 and r["step_ms"] > 0 for r in results)
    assert results[1]["fused_sites"] >= truthgpt.LAYERS
    out = capsys.readouterr().out
    assert "2.09M parameters" in out
    header = next(line for line in out.splitlines() if line.startswith("variant"))
    for column in ("step ms", "peak MB", "final loss"):
        assert column in header
    assert any(line.startswith("truthfuse") for line in out.splitlines())


def test_one_step_says_its_time_includes_the_compile(capsys):
    """--steps 1 (the default --warmup is 2) reported the compiling first step as the step time,
    with nothing to say so (found by a sixteenth fuzz round)."""
    truthgpt.main(["--steps", "1", "--batch", "1", "--seq", "8", "--variants", "eager", "--dropout", "0"])
    assert "includes compiling and tuning" in capsys.readouterr().out


def test_mode_reaches_both_compilers(monkeypatch):
    """--mode compiles Inductor and truthfuse alike (reduce-overhead: CUDA graphs on a GPU)."""
    seen = []
    real_compile = torch.compile

    def spy(model, *, backend="inductor", mode=None, **kw):
        seen.append(mode if backend == "inductor" else backend.options.mode)
        return real_compile(model, backend="eager" if backend == "inductor" else backend, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    results = truthgpt.main(["--steps", "1", "--batch", "1", "--seq", "8", "--variants", "inductor,truthfuse",
                             "--inner", "eager", "--warmup", "0", "--dropout", "0", "--mode", "reduce-overhead"])
    assert seen == ["reduce-overhead", "reduce-overhead"]
    assert all(len(r["losses"]) == 1 for r in results)


def test_main_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        truthgpt.main(["--variants", "eager,jax"])
    assert exc.value.code == 2
    assert "eager, inductor, truthfuse" in capsys.readouterr().err
