"""Timing one candidate on the device: the number the tuner's search optimizes.

On CUDA: CUDA events around each call, a few warm-up calls first (compilation, autotuning, lazy
allocations), the median over repeats (robust to a stray slow launch), and inputs rotated among
several sets so that the timed call does not find its operands in L2 from the previous call.
A real model step reads weights and activations from HBM; timing from a warm L2 would favour
kernels that only win when everything is cached.

On CPU (tests, and Triton's interpreter): wall clock with time.perf_counter, same median.

`measure_timing` also reports how long the host took to issue a call it did not wait on: when
that is most of the call's time, the device sat waiting for launches (`Timing.host_bound`), which
CUDA graphs (torch.compile's mode="reduce-overhead") take away.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# H100 SXM/PCIe L2; used when the device cannot be queried.
DEFAULT_L2_BYTES = 50 * 1024 * 1024


def _as_device(device: torch.device | str | int) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _as_args(input_set: Any) -> tuple:
    return tuple(input_set) if isinstance(input_set, (tuple, list)) else (input_set,)


@dataclass(frozen=True)
class Timing:
    """One measurement: `ms`, the median time of a call; `issue_ms`, the median time the host took
    to return from a call that it did not wait on (CUDA; the same as ms on CPU). A call whose issue
    time is close to its time is paced by the host issuing its launches, not by the device."""

    ms: float
    issue_ms: float

    @property
    def host_bound(self) -> bool:
        return self.issue_ms >= HOST_BOUND_SHARE * self.ms


HOST_BOUND_SHARE = 0.8
"""A CUDA call counts as host-bound when issuing it takes at least this share of its time."""


def measure(fn: Callable[..., Any], input_sets: Sequence[Any], *,
            device: torch.device | str | int, warmup: int = 3, repeats: int = 10) -> float:
    """Median time of one call `fn(*input_set)`, in milliseconds (`measure_timing(...).ms`)."""
    return measure_timing(fn, input_sets, device=device, warmup=warmup, repeats=repeats).ms


def measure_timing(fn: Callable[..., Any], input_sets: Sequence[Any], *,
                   device: torch.device | str | int, warmup: int = 3, repeats: int = 10) -> Timing:
    """The median time of one call `fn(*input_set)` and of issuing it, in milliseconds.

    input_sets: one or more argument tuples (a non-tuple is passed as the single argument). Calls
        cycle through them, so pass `l2_rotation_count(...)` sets to keep L2 cold.
    device: where fn runs; "cuda"/"cuda:N" times with CUDA events, anything else with the wall
        clock.
    warmup: untimed calls before timing (at least one per input set is made anyway on CUDA, so
        that every set has been touched once before timing starts).
    repeats: timed calls; the medians of them are returned.
    """
    if not input_sets:
        raise ValueError("measure needs at least one input set")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    args = [_as_args(s) for s in input_sets]
    device = _as_device(device)
    if device.type == "cuda":
        return _measure_cuda(fn, args, device, warmup, repeats)
    return _measure_wall_clock(fn, args, warmup, repeats)


def _measure_wall_clock(fn, args: list[tuple], warmup: int, repeats: int) -> Timing:
    for i in range(warmup):
        fn(*args[i % len(args)])
    times = []
    for i in range(repeats):
        call_args = args[i % len(args)]
        start = time.perf_counter()
        fn(*call_args)
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    return Timing(ms, ms)


def _measure_cuda(fn, args: list[tuple], device: torch.device, warmup: int, repeats: int) -> Timing:
    with torch.cuda.device(device):
        # The first pass over every set also faults in lazily allocated memory.
        for i in range(max(warmup, len(args))):
            fn(*args[i % len(args)])
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        # Continue the rotation where warm-up stopped, so the set about to be timed is always the
        # one least recently used.
        offset = max(warmup, len(args))
        issue = []
        for i in range(repeats):
            call_args = args[(offset + i) % len(args)]
            starts[i].record()
            begun = time.perf_counter()
            fn(*call_args)
            issue.append((time.perf_counter() - begun) * 1e3)
            ends[i].record()
        torch.cuda.synchronize()
        return Timing(statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), statistics.median(issue))


def l2_cache_bytes(device: torch.device | str | int) -> int:
    """The device's L2 size in bytes (0 on CPU, where no rotation is done)."""
    device = _as_device(device)
    if device.type != "cuda":
        return 0
    try:
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    except (RuntimeError, AssertionError, AttributeError):
        size = 0
    return size or DEFAULT_L2_BYTES


def l2_rotation_count(bytes_per_set: int, device: torch.device | str | int) -> int:
    """How many distinct input sets to rotate so that together they exceed L2.

    The smallest n with n * bytes_per_set > L2 size (50 MB on H100). On CPU: 1 (wall-clock
    timing there is for tests and relative comparisons only, not for cache effects).
    """
    if bytes_per_set <= 0:
        raise ValueError(f"bytes_per_set must be positive, got {bytes_per_set}")
    l2 = l2_cache_bytes(device)
    if l2 == 0:
        return 1
    return l2 // bytes_per_set + 1


def rotated_input_sets(inputs: Sequence[Any], device: torch.device | str | int) -> list[tuple]:
    """`inputs` plus enough tensor copies of them that rotating among the sets exceeds L2.

    The first set is `inputs` itself; the others clone every tensor (as leaves that require grad
    where the original does; non-tensors are shared). Extra memory stays below about one L2 size
    plus one set: a set larger than L2 gets no copies at all.
    On CPU this is just [tuple(inputs)].
    """
    inputs = tuple(inputs)
    size = tensor_bytes(inputs)
    count = l2_rotation_count(size, device) if size > 0 else 1
    sets = [inputs]
    for _ in range(count - 1):
        # Leaves that require grad as the originals do: a training step's timing must run its
        # backward on every set, not only on the first.
        sets.append(tuple(copy_laid_out(v).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
                          for v in inputs))
    return sets


def copy_laid_out(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides, gaps and overlaps included: a copy of the storage it spans,
    viewed as t. `clone()` makes a gapped slice (k from a packed k/v projection) or an expanded
    tensor contiguous, and the code Inductor compiled for the first set's strides then failed on
    every other set ("expected ... stride"), which timed a site as infinitely slow."""
    t = t.detach()
    if t.numel() == 0:
        return t.clone()
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,), t.storage_offset()).clone().as_strided(t.shape, t.stride())


def tensor_bytes(*values: Any) -> int:
    """Bytes held by the tensors among `values` (nested tuples/lists/dicts are walked).

    Convenience for `l2_rotation_count`: pass one input set.
    """
    total = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, (tuple, list)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return total
