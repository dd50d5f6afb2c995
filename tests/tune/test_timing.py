"""Timing on CPU, the L2 rotation helper, and the progress bar's silence rules."""
import io
import logging
import time

import pytest
import torch

from fusion_backend.tune import progress as progress_module
from fusion_backend.tune.progress import TuningProgress, progress_enabled
from fusion_backend.tune.timing import (
    HOST_BOUND_SHARE, Timing, l2_rotation_count, measure, measure_timing, rotated_input_sets, tensor_bytes,
)


def test_measure_on_cpu_returns_a_positive_median_in_ms():
    sets = [(torch.randn(64, 64), torch.randn(64, 64)) for _ in range(3)]
    ms = measure(torch.matmul, sets, device="cpu", warmup=2, repeats=5)
    assert ms > 0


def test_measure_rotates_sets_and_counts_calls():
    seen = []
    measure(lambda x: seen.append(x), [0, 1, 2], device=torch.device("cpu"), warmup=3, repeats=6)
    assert seen == [0, 1, 2] + [0, 1, 2, 0, 1, 2]


def test_measure_is_a_median():
    delays = iter([0.0] + [0.001] * 4 + [0.2])  # one warm-up, then one outlier among five

    ms = measure(lambda: time.sleep(next(delays)), [()], device="cpu", warmup=1, repeats=5)
    assert 0.5 < ms < 100  # the 200 ms outlier does not move the median


def test_measure_argument_errors():
    with pytest.raises(ValueError, match="input set"):
        measure(lambda: None, [], device="cpu")
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, [()], device="cpu", repeats=0)


def test_l2_rotation_count():
    assert l2_rotation_count(1 << 20, "cpu") == 1
    x = torch.empty(1024, 1024, dtype=torch.float16)
    assert tensor_bytes((x, [x], {"k": x}), None) == 3 * 2 * 1024 * 1024
    with pytest.raises(ValueError):
        l2_rotation_count(0, "cpu")


def test_l2_rotation_count_exceeds_l2_on_cuda(monkeypatch):
    # No GPU here: the device query fails and the H100 default (50 MB) is used.
    from fusion_backend.tune import timing

    monkeypatch.setattr(timing, "l2_cache_bytes", lambda device: 50 * 1024 * 1024)
    for size in (1 << 20, 7 * 1000 * 1000, 60 * 1024 * 1024):
        n = timing.l2_rotation_count(size, "cuda")
        assert n * size > 50 * 1024 * 1024 and (n - 1) * size <= 50 * 1024 * 1024


def test_rotated_input_sets(monkeypatch):
    from fusion_backend.tune import timing

    x, w = torch.randn(256, 256), torch.randn(256, 256)  # 512 KiB per set
    assert rotated_input_sets([x, w, 3], "cpu") == [(x, w, 3)]
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda device: 4 * 1024 * 1024)
    sets = timing.rotated_input_sets([x, w, 3], "cuda")
    assert len(sets) == 9 and sets[0][0] is x
    assert all(s[2] == 3 and torch.equal(s[0], x) and s[0] is not x for s in sets[1:])


def test_rotated_sets_keep_each_input_laid_out_as_it_is(monkeypatch):
    """Copies of a gapped slice (k of a packed k/v projection) and an expanded tensor have the
    original's strides: Inductor's code compiled for the first set checks them on every set, and
    contiguous copies failed it (an SDPA site under autocast on an H200, timed as infinitely slow)."""
    from fusion_backend.tune import timing

    packed = torch.randn(4, 64, 2, 2, 32).permute(2, 0, 3, 1, 4)  # (k/v, B, heads, N, D)
    k, mask = packed[0], torch.randn(1, 1, 64).expand(4, 64, 64)
    x = torch.randn(64, 64, requires_grad=True)
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda device: 1024 * 1024)
    sets = timing.rotated_input_sets([k, mask, x], "cuda")
    assert len(sets) > 1
    for ks, ms, xs in sets[1:]:
        for copy, original in ((ks, k), (ms, mask), (xs, x)):
            assert copy.stride() == original.stride() and torch.equal(copy, original)
            assert copy.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
        assert xs.requires_grad and xs.is_leaf


def test_rotated_sets_of_a_training_step_require_grad_like_the_first(monkeypatch):
    """Copies that do not require grad would time a training step's backward on one set in
    nine: the median would be the forward's time."""
    from fusion_backend.tune import timing

    x, w = torch.randn(256, 256, requires_grad=True), torch.randn(256, 256)
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda device: 4 * 1024 * 1024)
    sets = timing.rotated_input_sets([x, w], "cuda")
    assert len(sets) > 1
    for xs, ws in sets[1:]:
        assert xs.requires_grad and xs.is_leaf and xs.grad_fn is None and not ws.requires_grad
    backwards = []

    def step(a, b):
        out = (a @ b).sum()
        if out.requires_grad:
            out.backward()
            backwards.append(True)

    for args in sets:
        step(*args)
    assert len(backwards) == len(sets)


# -- progress ------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def terminal(monkeypatch):
    stream = _Terminal()
    # Patch the lookup, not sys.stderr itself: pytest's capture resets sys.stderr between a
    # fixture's setup and the test.
    monkeypatch.setattr(progress_module, "_stream", lambda: stream)
    logger = logging.getLogger("truthfuse")
    level, disabled = logger.level, logger.disabled
    yield stream
    logger.setLevel(level)
    logger.disabled = disabled
    logging.disable(logging.NOTSET)


def test_progress_draws_on_a_terminal(terminal):
    assert progress_enabled()
    with TuningProgress(3, "tuning") as bar:
        assert bar.active
        bar.update(1.5)
    assert "tuning" in terminal.getvalue()


def test_progress_silent_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_module, "_stream", io.StringIO)
    assert not progress_enabled()
    assert not TuningProgress(3).active


def test_progress_silent_when_logging_is_off(terminal):
    logging.getLogger("truthfuse").setLevel(logging.WARNING)
    assert not progress_enabled()
    logging.getLogger("truthfuse").setLevel(logging.INFO)
    assert progress_enabled()
    logging.disable(logging.INFO)
    assert not progress_enabled()


def test_progress_explicit_switch(terminal):
    assert not progress_enabled(False)
    with TuningProgress(3, progress=False) as bar:
        bar.update(1.0)  # a no-op, not an error
    assert terminal.getvalue() == ""


def test_search_draws_nothing_when_told_not_to(terminal):
    from fusion_backend.tune.mcts import mcts_search
    from fusion_backend.tune.space import DecisionSpace, Option, SiteChoices

    space = DecisionSpace([SiteChoices("a", "attention", [Option.keep(), Option("v0")])])
    mcts_search(space, lambda plan: 1.0, progress=False)
    assert terminal.getvalue() == ""
    mcts_search(space, lambda plan: 1.0)
    assert "MCTS" in terminal.getvalue()


def test_host_bound_is_a_share_of_the_call_time():
    assert Timing(ms=2.0, issue_ms=2.0 * HOST_BOUND_SHARE).host_bound
    assert not Timing(ms=2.0, issue_ms=2.0 * HOST_BOUND_SHARE * 0.99).host_bound
    assert not Timing(ms=1.0, issue_ms=0.05).host_bound  # a GPU-bound call returns at once


def test_wall_clock_timing_issues_as_long_as_it_runs():
    calls = []

    def sleepy(x):
        calls.append(x)
        time.sleep(0.002)

    timing = measure_timing(sleepy, [(1,), (2,)], device="cpu", warmup=1, repeats=5)
    assert len(calls) == 6 and timing.ms >= 2.0 and timing.issue_ms == timing.ms
