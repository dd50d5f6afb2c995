"""What the backend does around its inner compiler."""
import sys

import torch

from fusion_backend.backend import TruthfuseBackend
from fusion_backend.options import Options

backend_module = sys.modules["fusion_backend.backend"]  # (the package's `backend` is the function)


def _compile_with(monkeypatch, inner):
    import torch._inductor.async_compile as async_compile

    warmed = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: warmed.append(True))
    monkeypatch.setattr(backend_module, "_inner_compile", lambda gm, inputs, options: gm.forward)
    fn = torch.compile(lambda x: torch.sin(x) + 1, backend=TruthfuseBackend(Options(inner=inner, cache=False)))
    x = torch.randn(5)
    torch.testing.assert_close(fn(x), torch.sin(x) + 1)
    torch._dynamo.reset()
    return warmed


def test_inductor_compile_pool_is_warmed_before_analysis(monkeypatch):
    # Dynamo's own "inductor" backend starts the kernel-compiling workers before compiling; a
    # backend calling compile_fx directly must too, or kernels compile one by one in-process
    assert _compile_with(monkeypatch, "inductor") == [True]


def test_no_compile_pool_for_other_inner_compilers(monkeypatch):
    assert _compile_with(monkeypatch, "eager") == []


def test_cuda_graph_modes_trace_feedforward_for_replays(monkeypatch):
    """The backend traces replacements inside `replayed_as_cuda_graphs` exactly when Inductor will
    replay the graphs as CUDA graphs."""
    from fusion_backend.ops import feedforward as _  # noqa: F401  (the module below is loaded)
    ff = sys.modules["fusion_backend.ops.feedforward"]
    from fusion_backend.options import parse_options

    seen = []
    monkeypatch.setattr(TruthfuseBackend, "_rewrite",
                        lambda self, gm, inputs, record: seen.append(ff._replayed_as_graphs) or gm)
    monkeypatch.setattr(backend_module, "_inner_compile", lambda gm, inputs, options: gm.forward)
    gm = torch.fx.symbolic_trace(lambda x: torch.sin(x))
    cases = [({"mode": "reduce-overhead"}, True), ({"mode": "max-autotune"}, True), ({}, False),
             ({"mode": "max-autotune-no-cudagraphs"}, False),
             ({"inductor_options": {"triton.cudagraphs": True}}, True),
             ({"mode": "reduce-overhead", "inner": "aot_eager"}, False)]
    for opts, expected in cases:
        TruthfuseBackend(parse_options(dict(opts, cache=False)))(gm, [torch.randn(3)])
        assert seen.pop() is expected, opts
    assert ff._replayed_as_graphs is False


def test_the_tuner_times_for_cuda_graphs_in_such_modes(monkeypatch):
    """Where the graphs will replay as CUDA graphs the site timer is told so (it then times every
    option as replays of a graph of its own), and the kept subgraphs it times are compiled without
    Inductor's CUDA graphs, which would nest in those; the graph itself keeps the mode. The report
    says "timed as CUDA-graph replays" only where replays were measured: on CPU there are none (it
    said so there, and under "aggressive", which measures nothing)."""
    from fusion_backend import site_timing
    from fusion_backend.explain import Report
    from fusion_backend.options import parse_options
    from tests.engine.models import CausalSelfAttention

    told = []

    class Recording(site_timing.SiteTimer):
        def __init__(self, *args, graphs=False, **kwargs):
            told.append(graphs)
            super().__init__(*args, graphs=graphs, **kwargs)

    compiled = []
    real_inner = backend_module._inner_compile

    def inner(gm, inputs, options):
        compiled.append(options.inductor_options.get("triton.cudagraphs"))
        return real_inner(gm, inputs, options)

    monkeypatch.setattr(backend_module, "SiteTimer", Recording)
    monkeypatch.setattr(backend_module, "_inner_compile", inner)
    for replays in (True, False):
        monkeypatch.setattr(backend_module, "_replays_cuda_graphs", lambda options, r=replays: r)
        torch._dynamo.reset()
        compiled.clear()
        backend = TruthfuseBackend(parse_options({"inner": "eager", "simulations": 2, "cache": False}))
        model = torch.compile(CausalSelfAttention(), backend=backend)
        model(torch.randn(2, 16, 32))
        assert told.pop() is replays
        report = Report.from_records(backend.records)
        assert backend.records[-1].measurements > 0 and not report.tuning.cuda_graphs
        assert "timed as CUDA-graph replays" not in str(report)
        backend.records[-1].timed_as_graphs = True  # as a CUDA device's replays set it
        assert "timed as CUDA-graph replays" in str(Report.from_records(backend.records))
        timing, final = compiled[:-1], compiled[-1]
        assert timing and set(timing) == ({False} if replays else {None}) and final is None, compiled
    torch._dynamo.reset()


def test_kept_sites_carry_the_timers_host_bound_note_also_from_the_cache(monkeypatch, tmp_path):
    """A site the tuner keeps gets the timer's note (the fused option was host-bound) in its
    reason, from a fresh search and from the tuning cache alike; under CUDA graphs no note is asked
    for (the timings are replays there)."""
    from fusion_backend import site_timing
    from fusion_backend.explain import Report
    from fusion_backend.options import parse_options
    from tests.engine.models import CausalSelfAttention

    asked = []

    class KeepingTimer(site_timing.SiteTimer):
        def site_cost(self, site, choice, round_=0):
            return 1.0 if choice == "keep" else 2.0

        def host_bound_note(self, site):
            asked.append(site.id)
            return "HOST-BOUND NOTE"

    monkeypatch.setattr(backend_module, "SiteTimer", KeepingTimer)
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    for cached in (False, True):
        torch._dynamo.reset()
        backend = TruthfuseBackend(parse_options({"inner": "eager", "simulations": 4}))
        torch.compile(CausalSelfAttention(), backend=backend)(torch.randn(2, 16, 32))
        report = Report.from_records(backend.records)
        assert report.kept and not report.fused
        assert report.tuning.cache_hit is cached
        assert all(s.reason.endswith("; HOST-BOUND NOTE") for s in report.kept), [s.reason for s in report.kept]
    assert len(asked) == len(report.kept)  # asked once, by the search that filled the cache
    monkeypatch.setattr(backend_module, "_replays_cuda_graphs", lambda options: True)
    torch._dynamo.reset()
    backend = TruthfuseBackend(parse_options({"inner": "eager", "simulations": 4, "cache": False}))
    torch.compile(CausalSelfAttention(), backend=backend)(torch.randn(2, 16, 32))
    report = Report.from_records(backend.records)
    assert report.kept and not any("HOST-BOUND" in s.reason for s in report.kept)
    torch._dynamo.reset()


def test_a_new_timing_revision_retunes_instead_of_reusing_the_cache(monkeypatch, tmp_path):
    """Plans chosen from an older way of timing sites are not reused: the timing revision is part
    of the cache key."""
    from fusion_backend.explain import Report
    from fusion_backend.options import parse_options
    from tests.engine.models import CausalSelfAttention

    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    hits = []
    for revision in (backend_module.TIMING_REVISION, backend_module.TIMING_REVISION, 99):
        monkeypatch.setattr(backend_module, "TIMING_REVISION", revision)
        torch._dynamo.reset()
        backend = TruthfuseBackend(parse_options({"inner": "eager", "simulations": 2}))
        torch.compile(CausalSelfAttention(), backend=backend)(torch.randn(2, 16, 32))
        hits.append(Report.from_records(backend.records).tuning.cache_hit)
    assert hits == [False, True, False]
    torch._dynamo.reset()
