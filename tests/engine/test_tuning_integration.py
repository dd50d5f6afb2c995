"""The tuner inside the backend: a second process compiling the same model reads the decision
from the cache and times nothing; save_state/load_state carry decisions between machines."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    import fusion_backend
    from tests.engine.models import CausalSelfAttention
    torch.manual_seed(0)
    model = CausalSelfAttention()
    report = fusion_backend.explain(model, torch.randn(2, 16, 32),
                                    options={{"inner": "eager", "simulations": 4}})
    print(json.dumps({{"hit": report.tuning.cache_hit, "n": report.tuning.measurements,
                      "decisions": [s.decision for s in report.sites]}}))
""")


def _run(tmp_path: Path, cache_dir: Path) -> dict:
    root = str(Path(__file__).resolve().parents[2])
    env = {**__import__("os").environ, "TRUTHFUSE_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(root=root)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def first_process(tmp_path_factory):
    """A first process's compile into an empty cache: its result and the cache it wrote. Both tests
    below start from it (a process tuning the model again would write the same cache); each reads
    the cache and none writes to it (a hit writes nothing: checked by its files' bytes)."""
    tmp = tmp_path_factory.mktemp("first_process")
    cache = tmp / "cache"
    return _run(tmp, cache), cache


def _files(cache: Path) -> dict:
    return {f.name: f.read_bytes() for f in cache.glob("*.json")}


def test_second_process_reads_the_cache_and_times_nothing(tmp_path, first_process):
    first, cache = first_process
    assert first["hit"] is False and first["n"] >= 2
    written = _files(cache)
    second = _run(tmp_path, cache)
    assert second["hit"] is True and second["n"] == 0
    assert second["decisions"] == first["decisions"]
    assert written, "the decision was not written as JSON"
    for text in written.values():
        json.loads(text)
    assert _files(cache) == written


def test_exported_state_ships_to_a_fresh_cache(tmp_path, first_process):
    import fusion_backend

    first, first_cache = first_process
    second_cache = tmp_path / "b"
    state = tmp_path / "state.json"
    fusion_backend.save_state(state, fusion_backend.tune.TuningCache(first_cache))
    fusion_backend.load_state(state, fusion_backend.tune.TuningCache(second_cache))
    shipped = _run(tmp_path, second_cache)
    assert shipped["hit"] is True and shipped["n"] == 0
    assert shipped["decisions"] == first["decisions"]


def _attention(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v


def _compile_and_run(options, requires_grad=False, autocast=None):
    import contextlib

    import torch

    import fusion_backend

    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=requires_grad) for _ in range(3))
    backend = fusion_backend.backend(**options)
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        torch.compile(_attention, backend=backend)(q, k, v)
    return backend.records[0]


def test_a_decision_on_a_failed_baseline_is_not_cached(tmp_path, monkeypatch):
    """Once the all-keep plan failed to time, the decision is not written: a later run with the
    failure gone must tune again, not reuse a plan never compared with a working baseline."""
    import fusion_backend.tune as tune
    from fusion_backend.tune import TuningCache

    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    real_choose_plan = tune.choose_plan

    def baseline_fails(space, evaluate, *args, **kwargs):
        def failing(plan):
            if not plan.fused_sites():
                raise RuntimeError("inner compiler failed")
            return evaluate(plan)
        return real_choose_plan(space, failing, *args, **kwargs)

    monkeypatch.setattr(tune, "choose_plan", baseline_fails)
    options = {"inner": "eager", "simulations": 4}
    first = _compile_and_run(options)
    assert first.sites[0].decision == "kept" and "baseline could not be timed" in first.tuning_reason
    assert len(TuningCache(tmp_path)) == 0
    monkeypatch.setattr(tune, "choose_plan", real_choose_plan)
    second = _compile_and_run(options)
    assert second.cache_hit is False and len(TuningCache(tmp_path)) == 1


def test_inductor_options_are_part_of_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    options = {"inner": "eager", "simulations": 4}
    assert _compile_and_run(options).cache_hit is False
    assert _compile_and_run(options).cache_hit is True
    patched = _compile_and_run({**options, "inductor_options": {"max_autotune": False}})
    assert patched.cache_hit is False


def test_training_and_inference_graphs_have_their_own_cache_entries(tmp_path, monkeypatch):
    """A training graph is timed forward and backward; a decision timed forward only must not
    be reused for it (nor the other way round)."""
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    options = {"inner": "eager", "simulations": 4}
    assert _compile_and_run(options, requires_grad=False).cache_hit is False
    assert _compile_and_run(options, requires_grad=True).cache_hit is False
    assert _compile_and_run(options, requires_grad=True).cache_hit is True


def test_a_graph_compiled_under_autocast_has_its_own_cache_entry(tmp_path, monkeypatch):
    """Autocast entered around the compiled call changes what the kept sites compute in (so their
    timings) but not the graph's code or its inputs' dtypes: its decision is cached apart."""
    import torch

    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    options = {"inner": "eager", "simulations": 4}
    assert _compile_and_run(options).cache_hit is False
    assert _compile_and_run(options, autocast=torch.float16).cache_hit is False
    assert _compile_and_run(options, autocast=torch.float16).cache_hit is True
    assert _compile_and_run(options, autocast=torch.bfloat16).cache_hit is False


def test_a_malformed_cached_record_warns_once_and_retunes(tmp_path, monkeypatch):
    """A valid envelope around a bad record (here a count of 1e999, which reads as inf) is a miss
    with one TuningCacheWarning naming the file, and the retune overwrites it."""
    import warnings

    import pytest

    from fusion_backend.tune import TuningCacheWarning

    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    options = {"inner": "eager", "simulations": 4}
    _compile_and_run(options)
    (path,) = tmp_path.glob("*.json")
    path.write_text(path.read_text().replace('"measurements": ', '"measurements": 1e999, "was": '))
    with pytest.warns(TuningCacheWarning) as caught:
        retuned = _compile_and_run(options)
    cache_warnings = [w for w in caught if issubclass(w.category, TuningCacheWarning)]
    assert len(cache_warnings) == 1
    assert str(path) in str(cache_warnings[0].message) and "measurements" in str(cache_warnings[0].message)
    assert retuned.cache_hit is False
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningCacheWarning)
        assert _compile_and_run(options).cache_hit is True


def _scaled_attention(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v


def test_a_graph_compiled_after_another_reads_its_cached_decision(tmp_path, monkeypatch):
    """Site ids come from the graph's code, not from how many graphs the backend compiled before:
    the same graph keeps its cache entry whatever was compiled first."""
    import torch

    import fusion_backend

    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    options = {"inner": "eager", "simulations": 4}
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    torch._dynamo.reset()
    shared = fusion_backend.backend(**options)
    torch.compile(_attention, backend=shared)(q, k, v)
    torch.compile(_scaled_attention, backend=shared)(q, k, v)  # its second graph
    torch._dynamo.reset()
    alone = fusion_backend.backend(**options)
    torch.compile(_scaled_attention, backend=alone)(q, k, v)  # its first
    assert alone.records[0].cache_hit is True
    assert [s.site_id for s in alone.records[0].sites] == [s.site_id for s in shared.records[1].sites]


def test_a_dynamic_graph_reads_its_decision_at_other_sizes(tmp_path, monkeypatch):
    """A graph with symbolic sizes is one decision for every size it accepts: the cache key holds
    its symbols, not the sizes of the call that compiled it."""
    import torch

    import fusion_backend

    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))
    options = {"inner": "eager", "simulations": 4}
    records = []
    for n in (8, 6):
        torch._dynamo.reset()
        backend = fusion_backend.backend(**options)
        torch.compile(_attention, backend=backend, dynamic=True)(*(torch.randn(1, 2, n, 16) for _ in range(3)))
        records.append(backend.records[0])
    assert records[0].cache_hit is False and records[1].cache_hit is True


def _attention_with_dropout(q, k, v):
    import torch.nn.functional as F

    return F.dropout((q @ k.transpose(-2, -1) * 0.25).softmax(-1), 0.3, training=True) @ v


def _record_of_a_fresh_compile(fn, strategy):
    """The backend's record of compiling and running fn(q, k, v) once, Dynamo reset first (so that
    the tuning cache, not Dynamo's, decides)."""
    import torch

    import fusion_backend

    torch._dynamo.reset()
    backend = fusion_backend.backend(strategy=strategy, inner="eager", simulations=4)
    torch.compile(fn, backend=backend)(*(torch.randn(1, 2, 6, 8) for _ in range(3)))
    return backend.records[0]


def test_a_cached_plan_the_strategy_cannot_choose_warns_and_retunes(tmp_path, monkeypatch):
    """A cache file edited by hand to fuse a site with dropout under "conservative" (which never
    fuses an inexact rewrite) was used as it was: the site fused and drew its own dropout masks, and
    explain() read 'cached: only one valid plan'. Such a plan is now a miss with one
    TuningCacheWarning, and the site stays kept with conservative's reason (a fourteenth fuzz round)."""
    import pytest

    from fusion_backend.tune import TuningCacheWarning

    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))

    def compile_and_run():
        return _record_of_a_fresh_compile(_attention_with_dropout, strategy="conservative")

    first = compile_and_run()
    assert [s.decision for s in first.sites] == ["kept"] and "not exact" in first.sites[0].reason
    (path,) = tmp_path.glob("*.json")
    envelope = json.loads(path.read_text())
    envelope["record"]["plan"] = {site: "fuse" for site in envelope["record"]["plan"]}
    path.write_text(json.dumps(envelope))
    with pytest.warns(TuningCacheWarning, match="strategy can choose"):
        edited = compile_and_run()
    assert edited.cache_hit is False
    assert [s.decision for s in edited.sites] == ["kept"] and "not exact" in edited.sites[0].reason, \
        [(s.decision, s.reason) for s in edited.sites]


def test_a_cached_plan_other_than_its_records_own_warns_and_retunes(tmp_path, monkeypatch):
    """A cache file edited by hand under "moderate" to fuse where the guard had kept every site was
    used as it was: explain() showed the site fused with the reason 'cached: all-keep was the
    fastest plan measured'. A plan its record's timings did not choose (so that its reason speaks
    of another plan), either way round, is now a miss with one TuningCacheWarning; a record whose
    plan, timings and reason agree is used (a fifteenth fuzz round)."""
    import pytest

    from fusion_backend.tune import TuningCacheWarning

    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path))

    def compile_and_run():
        return _record_of_a_fresh_compile(_scaled_attention, strategy="moderate")

    compile_and_run()
    (path,) = tmp_path.glob("*.json")
    envelope = json.loads(path.read_text())
    keep = {site: "keep" for site in envelope["record"]["plan"]}
    fuse = {site: "fuse" for site in keep}
    kept_reason, fused_reason = "all-keep was the fastest plan measured", "fused plan 1 ms vs all-keep 2 ms"
    edits = [  # (plan, best_plan, cost_ms, baseline_ms, reason), and whether the file is used
        ((fuse, keep, 2.0, 2.0, kept_reason), False),  # fused where the guard kept all
        ((fuse, fuse, 3.0, 3.0, "best plan (2 ms) is not faster than all-keep (3 ms)"), False),
        ((keep, fuse, 1.0, 2.0, fused_reason), False),  # kept where the guard fused
        ((fuse, fuse, 1.0, 2.0, fused_reason), True),
        ((keep, fuse, 2.0, 2.0, "best plan's win did not reproduce"), True),
    ]
    for (plan, best, cost, baseline, reason), used in edits:
        envelope["record"].update(plan=plan, best_plan=best, cost_ms=cost, baseline_ms=baseline, reason=reason)
        path.write_text(json.dumps(envelope))
        if used:
            record = compile_and_run()
            assert record.cache_hit is True
            assert [s.decision for s in record.sites] == ["fused" if plan is fuse else "kept"]
            assert [s.reason for s in record.sites] == [f"cached: {reason}"]
            continue
        with pytest.warns(TuningCacheWarning, match="not the one its record's timings chose"):
            record = compile_and_run()
        assert record.cache_hit is False and record.measurements > 0
        assert not record.tuning_reason.startswith("cached")
