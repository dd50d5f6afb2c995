"""Timing a kept site inside the backend: its compiled backward must not need Dynamo's compile
lock, which the compiling thread holds while the tuner runs."""
import threading

import torch
from torch._dynamo.convert_frame import compile_lock
from torch._inductor.compile_fx import compile_fx

from fusion_backend.site_timing import _eager_backward_compile


class _SinTwice(torch.nn.Module):
    def forward(self, x):
        return torch.sin(x) * 2


def test_kept_site_backward_runs_on_another_thread_while_the_compile_lock_is_held():
    # On CUDA autograd runs the backward on its device thread. A backward compiled lazily there
    # waits for compile_lock, held by the thread that is compiling the enclosing graph and waiting
    # for that backward: the GPU hang this guards against, reproduced here with a plain thread.
    gm = torch.fx.symbolic_trace(_SinTwice())
    x = torch.randn(8, requires_grad=True)
    finished = []
    with compile_lock:
        with _eager_backward_compile():
            fn = compile_fx(gm, [x])
        out = fn(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        worker = threading.Thread(target=lambda: (out.sum().backward(), finished.append(True)), daemon=True)
        worker.start()
        worker.join(timeout=120)
    assert finished, "the kept site's backward waited for the compile lock"
    torch.testing.assert_close(x.grad, 2 * torch.cos(x.detach()))


def _site(rule="feedforward_gelu"):
    from types import SimpleNamespace
    return SimpleNamespace(rule=SimpleNamespace(name=rule), match=SimpleNamespace(values={"x": torch.zeros(2, 3)}))


def test_host_bound_note_only_where_the_fastest_fused_option_lost_while_host_bound():
    from fusion_backend.site_timing import SiteTimer, site_group
    from fusion_backend.tune.timing import Timing

    timer = SiteTimer(None, [], {}, None, train=False)
    site = _site()
    group = site_group(site)
    assert timer.host_bound_note(site) == ""  # nothing timed on a GPU
    timer.timings[(group, "keep", 0)] = Timing(1.0, 0.1)
    timer.timings[(group, "fuse:a", 0)] = Timing(2.0, 1.9)
    timer.timings[(group, "fuse:b", 0)] = Timing(2.5, 0.2)
    timer.timings[(group, "fuse:c", 1)] = Timing(0.5, 0.5)  # a confirmation round does not count
    note = timer.host_bound_note(site)
    assert "2.000 ms against 1.000 ms kept, 1.900 ms of that issuing launches" in note
    assert 'mode="reduce-overhead"' in note
    assert timer.host_bound_note(_site("other_rule")) == ""
    timer.timings[(group, "fuse:b", 0)] = Timing(1.5, 0.2)  # the fastest fused option is GPU-bound
    assert timer.host_bound_note(site) == ""
    timer.timings = {(group, "keep", 0): Timing(3.0, 0.1), (group, "fuse:a", 0): Timing(2.0, 1.9)}
    assert timer.host_bound_note(site) == ""  # fused won: nothing to explain


def test_a_host_paced_fused_option_is_timed_again_compiled():
    """A fused option is timed as traced; where issuing it takes COMPILED_RECHECK_SHARE of its
    time or more, it is compiled by the inner compiler (on a copy of the traced graph, which is
    the replacement) and timed again, since a compiled graph calls it through wrappers the traced
    timing does not pay. A compile that fails keeps the traced timing."""
    from fusion_backend import site_timing
    from fusion_backend.tune.timing import Timing

    compiled = []

    def compile_fn(gm, args):
        compiled.append(gm)
        return gm.forward

    timer = site_timing.SiteTimer(None, [], {}, compile_fn, train=False)
    sub = torch.fx.symbolic_trace(_SinTwice())
    graph_before = str(sub.graph)
    x = torch.randn(8)
    traced = Timing(1.0, 0.3)
    assert timer._compiled_if_host_paced(_site(), "fuse", sub, [x], [(x,)], traced, False, x.device) is traced
    assert compiled == []

    paced = Timing(1.0, site_timing.COMPILED_RECHECK_SHARE)
    again = timer._compiled_if_host_paced(_site(), "fuse", sub, [x], [(x,)], paced, False, x.device)
    assert again is not paced and isinstance(again, Timing) and again.ms > 0
    assert len(compiled) == 1 and compiled[0] is not sub and compiled[0].graph is not sub.graph
    assert str(sub.graph) == graph_before
    # the guard's confirmation round times the same compiled code again: no second compile
    timer._compiled_if_host_paced(_site(), "fuse", sub, [x], [(x,)], paced, False, x.device)
    assert len(compiled) == 1

    def failing(gm, args):
        raise RuntimeError("no compile")

    timer = site_timing.SiteTimer(None, [], {}, failing, train=False)
    assert timer._compiled_if_host_paced(_site(), "fuse", sub, [x], [(x,)], paced, False, x.device) is paced


def test_a_fused_option_slower_traced_than_kept_is_not_compiled_for_the_recheck():
    """Compiling adds wrappers and never removes work, so an option that already loses to the
    kept site as traced keeps its traced timing (a cold compile saved), and still loses."""
    from fusion_backend import site_timing
    from fusion_backend.tune.timing import Timing

    compiled = []
    timer = site_timing.SiteTimer(None, [], {}, lambda gm, args: compiled.append(gm) or gm.forward, train=False)
    sub = torch.fx.symbolic_trace(_SinTwice())
    x = torch.randn(8)
    paced = Timing(1.0, 0.9)
    timer.memo[(site_timing.site_group(_site()), "keep", 0)] = 0.8
    assert timer._compiled_if_host_paced(_site(), "fuse", sub, [x], [(x,)], paced, False, x.device) is paced
    assert compiled == []
    timer.memo[(site_timing.site_group(_site()), "keep", 0)] = 1.2  # could win: compiled and timed again
    again = timer._compiled_if_host_paced(_site(), "fuse", sub, [x], [(x,)], paced, False, x.device)
    assert again is not paced and len(compiled) == 1


def test_timing_inputs_are_drawn_from_the_timers_own_generators():
    """Stand-ins for a site's fake inputs: the value's shape, dtype and grad flag, drawn on its
    device from a generator of the timer's own (the user's random stream does not move), and the
    same values for the same seed."""
    from fusion_backend.site_timing import _real_like

    before = torch.random.get_rng_state()
    gens = {}
    x = _real_like(torch.empty(3, 5, dtype=torch.float16).requires_grad_(), gens)
    mask = _real_like(torch.empty(4, 4, dtype=torch.bool), gens)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert x.shape == (3, 5) and x.dtype == torch.float16 and x.requires_grad and x.std() > 0
    assert mask.dtype == torch.bool and mask.any() and not mask.all()
    again = _real_like(torch.empty(3, 5, dtype=torch.float16), {})
    assert torch.equal(again, x.detach()) and not again.requires_grad


def test_a_mask_built_in_the_graph_is_timed_as_the_first_call_builds_it():
    """The tuner times a site's inputs that a short producer makes from the graph's inputs (here
    an attention mask from positions and a padding input; a graph input itself) as the first call
    makes them, so that a mask's skippable blocks count; an input with a long producer (an
    activation) gets a random stand-in. Nothing the graph's inputs hold is written."""
    import math

    import fusion_backend

    def attend(q, k, v, pad):
        n = q.shape[-2]
        i = torch.arange(n)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8) & pad[:, None, None, :]
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        for _ in range(70):  # q's producer: longer than PRODUCER_LIMIT
            q = torch.sin(q)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        return torch.softmax(s, -1) @ v

    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    pad = torch.ones(1, 24, dtype=torch.bool)
    pad[0, :3] = False
    pad_before = pad.clone()
    seen = []
    be = fusion_backend.backend(strategy="moderate", cache=False)

    def observe(space, timer, opts):
        value_of = timer._input_value

        def spy(node, value):
            out = value_of(node, value)
            seen.append((value, out))
            return out
        timer._input_value = spy
    be.tuning_observer = observe
    torch._dynamo.reset()
    out = torch.compile(attend, backend=be, fullgraph=True)(q, k, v, pad)
    torch.testing.assert_close(out, attend(q, k, v, pad))
    assert torch.equal(pad, pad_before)
    i = torch.arange(24)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 8) & pad[:, None, None, :]
    want = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    masks = [got for value, got in seen if tuple(value.shape) == (1, 1, 24, 24)]
    assert masks and all(torch.equal(got, want) for got in masks)
    inputs = [got for value, got in seen if tuple(value.shape) == (1, 2, 24, 16)]
    assert any(torch.equal(got, k) for got in inputs) and any(torch.equal(got, v) for got in inputs)
    long_q = q
    for _ in range(70):
        long_q = torch.sin(long_q)
    assert not any(torch.allclose(got, long_q, rtol=1e-3) for got in inputs)  # the random stand-in
    assert len(inputs) >= 3


def test_sites_with_different_graph_built_masks_do_not_share_timings():
    """Two attention layers alike in rule and shapes but with different masks built in the graph (a
    sliding window and a causal triangle) time apart; layers sharing one mask share a timing."""
    import math

    import fusion_backend
    from fusion_backend.site_timing import site_group

    def mask_of(keep):
        return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)

    def layers(x):
        n = x.shape[-2]
        i = torch.arange(n)
        causal = mask_of(i[None, :] <= i[:, None])
        window = mask_of((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 6))
        for mask in (causal, window, causal):
            s = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]) + mask
            x = torch.softmax(s, -1) @ x
        return x

    sites = []
    be = fusion_backend.backend(strategy="moderate", cache=False)
    be.tuning_observer = lambda space, timer, opts: sites.extend(timer.sites)
    torch._dynamo.reset()
    x = torch.randn(1, 2, 20, 16)
    torch.testing.assert_close(torch.compile(layers, backend=be, fullgraph=True)(x), layers(x))
    # the rule that matches every layer (the causal ones also match a causal variant)
    generic = sorted((s for s in sites if s.rule.name == "attention.dot"),
                     key=lambda s: int(s.anchor.name.split("_")[-1]))
    groups = [site_group(s) for s in generic]
    assert len(groups) == 3
    assert groups[0] == groups[2] != groups[1]


def test_a_kept_options_compile_runs_beside_the_kernel_compiles_and_its_timing_after_them():
    """The Triton kernels compiled ahead on worker processes (`start_kernel_compiles`) go on while
    the inner compiler compiles a kept option; every timing, and a fused option's run, which would
    compile those kernels itself, waits for them."""
    import math

    import fusion_backend

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v

    timers = []
    be = fusion_backend.backend(strategy="moderate", cache=False)
    be.tuning_observer = lambda space, timer, opts: timers.append(timer)
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    torch.compile(attend, backend=be, fullgraph=True)(q, k, v)
    (timer,) = timers
    events = []

    class Compiling:  # stands in for compile_ahead.Compiling
        def wait(self):
            events.append("wait")
            return {"kernels": 1, "workers": 1, "here": 0, "failed": [], "seconds": 0.0, "compile_seconds": 0.0}

    inner = timer.compile_fn
    timer.compile_fn = lambda gm, args: events.append("compile") or inner(gm, args)
    site = timer.sites[0]
    for choice, expected in (("keep", ["compile", "wait"]), ("fuse", ["wait"])):
        events.clear()
        timer._compiled.clear()
        timer._compiling = Compiling()
        timer._measure(site, choice)
        assert events == expected, choice
        assert timer._compiling is None


def test_a_site_inside_an_autocast_region_is_timed_under_it(caplog):
    """A site inside `with torch.autocast(...)` in the model's code runs under that autocast, and
    the tuner compiles and times it so. Timed without it, the kept subgraph's fp32 and fp16
    operands met in one op, the all-keep baseline could not be timed, and the default strategy
    never fused such a site. (With the "aot_eager" inner compiler, which takes tuple outputs only,
    no kept option compiled at all before.)"""
    import logging

    import torch.nn as nn

    import fusion_backend
    from fusion_backend.site_timing import autocast_around

    class Block(nn.Module):
        def __init__(self, E=16, H=2):
            super().__init__()
            self.qkv, self.o, self.H = nn.Linear(E, 3 * E), nn.Linear(E, E), H
            self.t = nn.Parameter(torch.tensor(0.35))

        def forward(self, x, pad):
            B, N, E = x.shape
            with torch.autocast("cpu", dtype=torch.float16):
                q, k, v = self.qkv(x).view(B, N, 3, self.H, E // self.H).permute(2, 0, 3, 1, 4)
                # the fp32 mask makes the scores fp32; autocast casts them back for the product with v
                out = torch.softmax(q @ k.transpose(-1, -2) * self.t + pad, -1) @ v
                return self.o(out.transpose(1, 2).reshape(B, N, E))

    sites = []
    be = fusion_backend.backend(strategy="moderate", inner="aot_eager", cache=False)
    be.tuning_observer = lambda space, timer, opts: sites.extend(timer.sites)
    torch._dynamo.reset()
    model, x = Block(), torch.randn(2, 6, 16)
    pad = torch.zeros(2, 1, 1, 6)
    pad[0, ..., :2] = torch.finfo(torch.float32).min
    with caplog.at_level(logging.WARNING, logger="truthfuse"):
        out = torch.compile(model, backend=be)(x, pad)
    torch.testing.assert_close(out, model(x, pad))
    assert "failed" not in caplog.text, caplog.text
    assert sites and all(autocast_around(s.anchor) == [("cpu", torch.float16, True, None)] for s in sites)
    (record,) = be.records
    assert record.baseline_ms is not None and record.measurements > 0, record.tuning_reason
    torch._dynamo.reset()
