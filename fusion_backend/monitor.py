"""Monitoring fused sites: calls, device time and peak memory of each one.

    compiled = torch.compile(model, backend="truthfuse", options={"monitor": True})
    compiled(x)
    fusion_backend.metrics()        # {site id: {"calls", "time_ms", "mean_ms", "peak_memory_bytes", ...}}
    fusion_backend.reset_metrics()

With monitoring on, the backend calls `instrument(gm, sites)` on the rewritten graph. Each fused
site's region (the nodes tagged `node.meta["truthfuse_site"]`) is bracketed by two custom ops,
`truthfuse_monitor::begin` before its first node and `truthfuse_monitor::end` after its last.
With monitoring off, `instrument` is never called and nothing is inserted: there is no overhead.

Why custom ops that mutate a token: the region must stay between the markers under every inner
compiler. Under eager the graph runs in order. Under Inductor, an op with no outputs would be dead
code and an ordinary op could be reordered or fused away; an opaque custom op that mutates a
token (a one-element buffer of the graph module, which AOT autograd lifts to an input) is a side
effect that is kept, and the two markers mutating the same token stay ordered with respect to
each other. `begin` reads the region's inputs, so it runs after they exist; `end` reads its
outputs, so it runs after the region has computed them. Only program order keeps the region's
first kernel after `begin`; Inductor keeps it (tests/test_monitor.py reads the generated code to
check). The markers are tagged cudagraph_unsafe, so CUDA graphs do not swallow them, and return
nothing, so autograd and the backward pass do not see them.

What is measured is the forward call of each site:
  - device time: CUDA events on the current stream around the region (read lazily, when metrics()
    is called, so monitoring adds no synchronization); wall clock on CPU;
  - peak memory: on CUDA, the allocator's peak during the region above what was allocated when it
    began. This resets CUDA's peak counter at every site, so `torch.cuda.max_memory_allocated`
    is not meaningful for the whole program while monitoring is on. None on CPU, which has no
    allocator peak counter.
The backward kernels run inside autograd, outside the markers, and are not included.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor

log = logging.getLogger("truthfuse")

_TOKEN_ATTR = "_truthfuse_monitor_token"


@dataclass
class _SiteStats:
    """Accumulated numbers for one monitored site (one entry of metrics())."""

    site: str
    rule: str
    kind: str
    variant: Optional[str]
    location: str
    calls: int = 0
    time_ms: float = 0.0
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    device: str = "cpu"
    # CUDA event pairs recorded but not yet read (reading waits for them).
    pending: List[Tuple[Any, Any]] = field(default_factory=list)

    def add_time(self, ms: float) -> None:
        self.time_ms += ms
        self.min_ms = ms if self.min_ms is None else min(self.min_ms, ms)
        self.max_ms = ms if self.max_ms is None else max(self.max_ms, ms)

    def resolve(self) -> None:
        """Turn recorded CUDA event pairs into times (waits for the last one)."""
        pending, self.pending = self.pending, []
        for start, end in pending:
            end.synchronize()
            self.add_time(start.elapsed_time(end))

    def as_dict(self) -> Dict[str, Any]:
        timed = self.calls - len(self.pending)
        return {
            "rule": self.rule, "kind": self.kind, "variant": self.variant, "location": self.location,
            "calls": self.calls, "time_ms": self.time_ms,
            "mean_ms": self.time_ms / timed if timed else None,
            "min_ms": self.min_ms, "max_ms": self.max_ms,
            "peak_memory_bytes": self.peak_memory_bytes,
            "device": self.device, "timer": "cuda-events" if self.device.startswith("cuda") else "wall-clock",
        }


_lock = threading.Lock()
# Calls that began and have not ended, per thread: site index -> a stack of starts (a wall-clock
# time, or (start event, base bytes)). One start per site, shared by all threads, lost the calls
# whose begin another thread's begin overwrote before their end.
_open_calls = threading.local()
_stats: List[_SiteStats] = []          # indexed by the integer the markers carry
_by_key: Dict[Tuple[str, str, str], int] = {}
# CUDA event pairs are kept until metrics() reads them; past this many per site the oldest are
# read early so a long monitored run does not hold unbounded events.
_MAX_PENDING = 1024


# ------------------------------------------------------------------------------------------------
# The marker ops
# ------------------------------------------------------------------------------------------------

# Host-side work (timers, events, allocator counters) that a CUDA graph replay would skip: the tag
# makes Inductor keep these calls out of CUDA graphs (mode="reduce-overhead").
_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


@torch.library.custom_op("truthfuse_monitor::begin", mutates_args=("token",), tags=_TAGS)
def _begin(token: Tensor, site: int, inputs: List[Tensor]) -> None:
    """Start timing site number `site` (an index into this module's table)."""
    if token.is_cuda:
        device = token.device
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        _starts(site).append((start, base))
    else:
        _starts(site).append(time.perf_counter())


def _starts(site: int) -> List[Any]:
    """This thread's open calls of `site`, innermost last."""
    if not hasattr(_open_calls, "starts"):
        _open_calls.starts = {}
    return _open_calls.starts.setdefault(site, [])


@_begin.register_fake
def _(token, site, inputs):
    return None


@torch.library.custom_op("truthfuse_monitor::end", mutates_args=("token",), tags=_TAGS)
def _end(token: Tensor, site: int, outputs: List[Tensor]) -> None:
    """Stop timing site number `site` and add the call to its totals."""
    stats = _stats[site]
    starts = _starts(site)
    if not starts:  # an end without its begin: nothing sensible to record
        return
    opened = starts.pop()
    with _lock:
        stats.calls += 1
        if token.is_cuda:
            start, base = opened
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            peak = torch.cuda.max_memory_allocated(token.device) - base
            stats.peak_memory_bytes = peak if stats.peak_memory_bytes is None else max(stats.peak_memory_bytes, peak)
            stats.pending.append((start, end))
            if len(stats.pending) > _MAX_PENDING:
                stats.resolve()
        else:
            stats.add_time((time.perf_counter() - opened) * 1e3)


@_end.register_fake
def _(token, site, outputs):
    return None


# ------------------------------------------------------------------------------------------------
# Instrumenting a graph
# ------------------------------------------------------------------------------------------------

def _register(site_id: str, site: Any) -> int:
    """The table index for a site. The same site compiled again (a recompile, or after
    torch._dynamo.reset()) keeps adding to its entry; a different site that happens to get the
    same id from another backend instance gets a suffixed name."""
    rule = site.rule.name
    location = site.location
    key = (site_id, rule, location)
    with _lock:
        if key in _by_key:
            return _by_key[key]
        name = site_id
        taken = {s.site for s in _stats}
        n = 2
        while name in taken:
            name = f"{site_id}#{n}"
            n += 1
        _stats.append(_SiteStats(site=name, rule=rule, kind=site.kind, variant=site.variant, location=location))
        _by_key[key] = len(_stats) - 1
        return len(_stats) - 1


def _tensor_value(node: fx.Node) -> Optional[Tensor]:
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, Tensor) else None


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and _tensor_value(node) is not None


def instrument(gm: fx.GraphModule, sites: Dict[str, Any]) -> List[str]:
    """Bracket every fused site of `gm` (site id -> Site) with the begin/end markers, in place.

    Returns the ids instrumented. A site whose nodes cannot be found (nothing tagged with its id)
    is skipped with a debug log line; instrumenting never fails compilation.
    """
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    regions: Dict[str, List[fx.Node]] = {}
    for node in graph.nodes:
        sid = node.meta.get("truthfuse_site")
        if sid in sites:
            regions.setdefault(sid, []).append(node)
    done = []
    token_node: Optional[fx.Node] = None
    for sid, nodes in regions.items():
        members = set(nodes)
        inputs: List[fx.Node] = []
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg not in members and arg not in inputs and _is_tensor(arg):
                    inputs.append(arg)
        outputs = [n for n in nodes if _is_tensor(n) and any(u not in members for u in n.users)]
        if not outputs:
            log.debug("monitor: site %s has no tensor output; not instrumented", sid)
            continue
        device = _tensor_value(outputs[0]).device
        first_node = min(nodes, key=order.__getitem__)
        last_node = max(nodes, key=order.__getitem__)
        if any(order.get(a, -1) >= order[first_node] for a in inputs):
            # replace.py splices a region after everything it reads; if that ever changes, skip
            # the site rather than emit a graph that reads a value before it exists.
            log.debug("monitor: an input of site %s is defined inside its span; not instrumented", sid)
            continue
        if token_node is None:
            first = next(iter(graph.nodes))
            while first.op == "placeholder":
                first = first.next
            # A buffer, not a plain attribute: AOT autograd lifts buffers to graph inputs, whose
            # mutation it supports; a mutated constant it rejects.
            gm.register_buffer(_TOKEN_ATTR, torch.zeros(1, device=device), persistent=False)
            with graph.inserting_before(first):
                token_node = graph.get_attr(_TOKEN_ATTR)
        elif getattr(gm, _TOKEN_ATTR).device != device:
            log.debug("monitor: site %s is on %s, another on %s; not instrumented", sid, device,
                      getattr(gm, _TOKEN_ATTR).device)
            continue
        index = _register(sid, sites[sid])
        with _lock:
            _stats[index].device = str(device)
        with graph.inserting_before(first_node):
            graph.call_function(torch.ops.truthfuse_monitor.begin.default, (token_node, index, inputs))
        with graph.inserting_after(last_node):
            graph.call_function(torch.ops.truthfuse_monitor.end.default, (token_node, index, outputs))
        done.append(sid)
    if done:
        graph.lint()
        gm.recompile()
        log.debug("monitor: instrumented %d site(s): %s", len(done), ", ".join(done))
    return done


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def metrics() -> Dict[str, Dict[str, Any]]:
    """What monitoring recorded, by site: {"rule", "kind", "variant", "location", "calls",
    "time_ms" (total), "mean_ms", "min_ms", "max_ms", "peak_memory_bytes" (CUDA; None on CPU),
    "device", "timer"}. Waits for recorded CUDA work to finish. Sites compiled but never run are
    listed with calls=0."""
    with _lock:
        for s in _stats:
            s.resolve()
        return {s.site: s.as_dict() for s in _stats}


def reset_metrics() -> None:
    """Zero every site's numbers. Compiled graphs stay instrumented and keep recording."""
    with _lock:
        for s in _stats:
            s.calls, s.time_ms, s.min_ms, s.max_ms, s.peak_memory_bytes = 0, 0.0, None, None, None
            s.pending = []
