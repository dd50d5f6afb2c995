"""Scoring plans by timing sites, not whole graphs.

Compiling the whole graph once per candidate plan would cost one Inductor compile per
measurement. Instead each site is timed on its own, at the graph's real shapes and dtypes: the
original matched subgraph compiled by the inner compiler ("keep") against the fused replacement
with each launch config. A plan's cost is the sum of its sites' costs. Sites with the same rule,
shapes and dtypes (the 12 identical layers of a GPT-2) share measurements.

Timing runs the site's own compile in a fresh compile context: a backward pass compiled by
aot_autograd cannot record its metrics into the context that is compiling the enclosing graph,
and the site must not pick up that graph's fake mode. So sites of a training graph are timed
forward and backward, as they will run. The kept subgraph's backward is compiled together with its
forward (`_eager_backward_compile`): on CUDA, autograd runs the backward on its device thread, and
a backward compiled lazily there would wait for Dynamo's compile lock, which this thread holds
while it compiles the enclosing graph.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from .canonicalize.passes import example_value
from .match.sites import Site
from .tune.timing import Timing, measure, measure_timing, rotated_input_sets

Node = fx.Node
log = logging.getLogger("truthfuse")

TIMING_REVISION = 3
"""Part of every tuning-cache key: raise it when the way sites are timed changes, so that plans
chosen from the old timings are tuned again. 2: the backward of a training site runs on every
rotated input set (revision 1 ran it on the first set only, so small sites timed mostly their
forward). 3: a fused option that the host nearly paces is timed again compiled
(`COMPILED_RECHECK_SHARE`)."""

COMPILED_RECHECK_SHARE = 0.5
"""A fused option is timed as traced, without the runtime wrappers a compiled graph calls it
through (Dynamo's guards, aot_autograd's wrapper, Inductor's generated code), which the kept
option's compiled subgraph does pay. Where the GPU hides that host time it does not matter; where
issuing the traced option already takes this share of its time (CUDA, without CUDA graphs), the
option is compiled by the inner compiler like the kept one and timed again. Measured on an H100:
an inference feed-forward block at T=8192 timed 0.211 ms traced against 0.249 ms kept, but ran
0.369 ms compiled (host-bound) against Inductor's 0.253."""


def _real_like(value: Any, generators: Dict[torch.device, torch.Generator]) -> Any:
    """A real tensor (or number) standing in for a fake example value, sizes at their hints, drawn
    on its own device (a GPT-2's site inputs drawn on the CPU and copied over took seconds of a cold
    compile) from that device's generator in `generators`, made on first use."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        return type(hint)(hint) if hint is not None else 1
    if not isinstance(value, torch.Tensor):
        return value
    shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in value.shape]
    device = value.device
    # CPU and CUDA have generators of their own; another device gets CPU draws, copied over
    draw_on = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    if draw_on not in generators:
        generators[draw_on] = torch.Generator(draw_on).manual_seed(0)
    generator = generators[draw_on]
    if value.dtype == torch.bool:
        t = (torch.rand(shape, generator=generator, device=draw_on) > 0.2).to(device)
    elif value.is_floating_point():
        t = (torch.randn(shape, generator=generator, device=draw_on, dtype=torch.float32) * 0.5).to(device, value.dtype)
    else:
        t = torch.zeros(shape, dtype=value.dtype, device=device)
    return t.requires_grad_(value.requires_grad and value.is_floating_point())


def keep_subgraph(gm: fx.GraphModule, site: Site) -> Tuple[fx.GraphModule, List[Any]]:
    """The site's matched nodes as a GraphModule of their own, and its inputs' example values.

    Every value a matched node reads from outside the match becomes a placeholder; the anchor's
    value is the output.
    """
    graph = fx.Graph()
    env: Dict[Node, Node] = {}
    inputs: List[Any] = []
    covered = [n for n in gm.graph.nodes if n in site.nodes]

    def lookup(n: Node) -> Node:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            env[n] = graph.get_attr(n.target)
            return env[n]
        ph = graph.placeholder(f"in_{len(inputs)}")
        env[n] = ph
        inputs.append(example_value(n))
        return ph

    for node in covered:
        for dep in node.all_input_nodes:
            if dep not in site.nodes:
                lookup(dep)
        env[node] = graph.node_copy(node, lookup)
    graph.output(env[site.anchor])
    return fx.GraphModule(gm, graph), inputs


class SiteTimer:
    """Times sites' options and adds them up into a plan's cost, for the tuner's `evaluate`."""

    def __init__(self, gm: fx.GraphModule, sites: List[Site], built: Dict[tuple, tuple],
                 compile_fn: Callable[[fx.GraphModule, list], Callable], train: bool, graphs: bool = False):
        """graphs: the compiled graphs will replay as CUDA graphs, so every option is timed as
        replays of a CUDA graph of its own (`_measure_replays`); compile_fn must then compile
        without CUDA graphs of its own."""
        self.gm, self.sites, self.built = gm, sites, built
        self.compile_fn, self.train, self.graphs = compile_fn, train, graphs
        self.memo: Dict[tuple, float] = {}
        # CUDA timings without CUDA graphs, with their host issue time (`host_bound_note`)
        self.timings: Dict[tuple, Timing] = {}
        self.rounds: Dict[tuple, int] = {}
        self.measurements = 0
        self._generators: Dict[torch.device, torch.Generator] = {}
        # (site group, choice) -> the inner compiler's callable: a confirmation round reuses it
        self._compiled: Dict[tuple, Callable] = {}

    def __call__(self, plan) -> float:
        key = tuple(sorted(dict(plan).items()))
        # A plan measured again (the guard's confirmation) gets fresh site measurements.
        round_ = self.rounds.get(key, 0)
        self.rounds[key] = round_ + 1
        choices = dict(key)
        return sum(self.site_cost(site, choices.get(site.id, "keep"), round_) for site in self.sites)

    def site_cost(self, site: Site, choice: str, round_: int = 0) -> float:
        group = site_group(site)
        key = (group, choice, round_)
        if key not in self.memo:
            started = time.perf_counter()
            with _fresh_compile_context():
                timing = self._measure(site, choice)
            self.memo[key] = timing if isinstance(timing, float) else timing.ms
            if isinstance(timing, Timing):
                self.timings[key] = timing
            self.measurements += 1
            log.info("tuning: %s %s: %.3f ms (measured in %.1f s)", site.rule.name, choice,
                     self.memo[key], time.perf_counter() - started)
        return self.memo[key]

    # -- one measurement ---------------------------------------------------------------------

    def host_bound_note(self, site: Site) -> str:
        """For a site the plan keeps: a note when its fastest fused option was slower than keeping
        it and host-bound (CUDA, timed without CUDA graphs): the GPU waited while the host issued
        its launches, which CUDA graphs take away. "" otherwise."""
        group = site_group(site)
        keep = self.timings.get((group, "keep", 0))
        fused = [t for (g, choice, r), t in self.timings.items() if g == group and choice != "keep" and r == 0]
        if keep is None or not fused:
            return ""
        best = min(fused, key=lambda t: t.ms)
        if best.ms <= keep.ms or not best.host_bound:
            return ""
        return (f"fused it took {best.ms:.3f} ms against {keep.ms:.3f} ms kept, {best.issue_ms:.3f} ms of that "
                f"issuing launches while the GPU waited; with mode=\"reduce-overhead\" CUDA graphs take the "
                f"launches off the host and the tuner times the site that way (docs/troubleshooting.md)")

    def _measure(self, site: Site, choice: str):
        """The site's timing with this choice: a Timing (CUDA, without graphs: with its issue time)
        or ms."""
        if choice == "keep":
            sub, example = keep_subgraph(self.gm, site)
        else:
            config = None if choice == "fuse" else choice.split(":", 1)[1]
            traced, _ = self.built[(site.id, config)]
            sub = traced
            example = [site.match.values[n] for n in traced.tensor_names]
        args = [_real_like(v, self._generators) for v in example]
        with _preserved_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The fused option is one op call plus glue: Inductor would add a compile per launch
            # config and nothing to the kernel, so it runs as traced (compiled only where the host
            # nearly paces it, `_compiled_if_host_paced`).
            train = self.train and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            if choice == "keep":
                fn = self._compile(site, choice, lambda: sub, args)
            else:
                fn = sub.forward
            run = _timed_call(fn, train)
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            sets = rotated_input_sets(args, device)
            grad_ctx = contextlib.nullcontext() if train else torch.no_grad()
            with grad_ctx:
                if self.graphs and device.type == "cuda":
                    try:
                        return _measure_replays(run, sets, device)
                    except Exception as exc:  # noqa: BLE001 -- then time it as it would run without graphs
                        log.info("tuning: %s %s: no CUDA graph (%s: %s); timed without one", site.rule.name, choice,
                                 type(exc).__name__, str(exc)[:120])
                if device.type == "cuda":
                    timing = measure_timing(run, sets, device=device, warmup=3, repeats=10)
                    if choice != "keep":
                        timing = self._compiled_if_host_paced(site, choice, sub, args, sets, timing, train, device)
                    return timing
                return measure(run, sets, device=device, warmup=3, repeats=10)

    def _compiled_if_host_paced(self, site: Site, choice: str, sub: fx.GraphModule, args: list, sets: List[tuple],
                                timing: Timing, train: bool, device: torch.device) -> Timing:
        """`timing` of a fused option timed as traced, or, where issuing it takes
        COMPILED_RECHECK_SHARE of its time or more, its timing compiled by the inner compiler (as
        the kept option is). A compile that fails keeps the traced timing. An option that is
        already slower traced than its site kept (timed first) is not compiled: compiled it can
        only take longer, and it loses either way."""
        if timing.issue_ms < COMPILED_RECHECK_SHARE * timing.ms:
            return timing
        kept_ms = self.memo.get((site_group(site), "keep", 0))
        if kept_ms is not None and timing.ms >= kept_ms:
            log.info("tuning: %s %s: %.3f ms traced, slower than kept (%.3f ms): not compiled", site.rule.name,
                     choice, timing.ms, kept_ms)
            return timing
        try:
            # A copy: compilers may rewrite a graph in place, and the traced one is the replacement.
            fn = self._compile(site, choice, lambda: fx.GraphModule(sub, copy.deepcopy(sub.graph)), args)
        except Exception as exc:  # noqa: BLE001 -- the traced timing stands
            log.info("tuning: %s %s: not compiled for timing (%s: %s)", site.rule.name, choice,
                     type(exc).__name__, str(exc)[:120])
            return timing
        compiled = measure_timing(_timed_call(fn, train), sets, device=device, warmup=3, repeats=10)
        log.info("tuning: %s %s: %.3f ms traced (%.3f ms issuing), %.3f ms compiled", site.rule.name, choice,
                 timing.ms, timing.issue_ms, compiled.ms)
        return compiled

    def _compile(self, site: Site, choice: str, make_gm: Callable[[], fx.GraphModule], args: list) -> Callable:
        """The inner compiler's callable for one option of a site group, compiled once from the graph
        `make_gm` gives: the guard's confirmation round times the same code again on fresh inputs."""
        key = (site_group(site), choice)
        if key not in self._compiled:
            with _eager_backward_compile():
                self._compiled[key] = self.compile_fn(make_gm(), args)
        return self._compiled[key]


def _timed_call(fn: Callable, train: bool) -> Callable:
    """What timing one option runs per input set: fn, and in training the backward of its first
    output."""
    def run(*xs):
        out = fn(*xs)
        out = out[0] if isinstance(out, (list, tuple)) else out
        if train and isinstance(out, torch.Tensor) and out.requires_grad:
            out.backward(torch.ones_like(out))
        return out
    return run


def _measure_replays(run: Callable, sets: List[tuple], device: torch.device) -> float:
    """Median ms of `run` replayed as CUDA graphs, one graph per input set: what it costs where the
    compiled graphs replay as CUDA graphs (mode="reduce-overhead") and no launch costs the host
    anything. Gradients start from None at capture, as they do in such a training step."""
    def fresh(args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                a.grad = None

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
        for args in sets:
            fresh(args)
            run(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for args in sets:
        fresh(args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            run(*args)
        graphs.append(graph)
    return measure(lambda g: g.replay(), [(g,) for g in graphs], device=device, warmup=3, repeats=10)


def site_group(site: Site) -> str:
    """Sites that time alike: same rule, same tensor shapes/dtypes/grad, same constants. They
    share measurements here and, in the tuner, what the search learns about launch configs."""
    shapes = ";".join(f"{k}={tuple(v.shape)}:{v.dtype}:{v.requires_grad}"
                      for k, v in sorted(site.match.values.items()) if isinstance(v, torch.Tensor))
    consts = ";".join(f"{k}={v!r}" for k, v in sorted(site.match.values.items())
                      if not isinstance(v, torch.Tensor))
    return f"{site.rule.name}|{shapes}|{consts}"


@contextlib.contextmanager
def _fresh_compile_context():
    """Compile and run a site as if no graph were being compiled: no enclosing tracing context
    (its fake mode and shape env belong to the enclosing graph) and a metrics context of its own."""
    from torch._dynamo import utils as dynamo_utils

    # Private torch internals: where a version lacks them, compile in the enclosing context.
    tls = getattr(dynamo_utils, "_metrics_context_tls", None)
    metrics_cls = getattr(dynamo_utils, "MetricsContext", None)
    swap = tls is not None and metrics_cls is not None
    saved = getattr(tls, "metrics_context", None) if swap else None
    if swap:
        tls.metrics_context = metrics_cls(on_exit=lambda *args, **kwargs: None)
    try:
        with torch._guards.tracing(None):
            yield
    finally:
        if swap:
            if saved is None:
                tls.__dict__.pop("metrics_context", None)
            else:
                tls.metrics_context = saved


def _eager_backward_compile():
    """A context in which aot_autograd compiles the backward with the forward, in this thread,
    instead of at the first backward call (see the module docstring)."""
    config = torch._functorch.config
    if not hasattr(config, "force_non_lazy_backward_lowering"):  # private flag; absent: nothing to do
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


@contextlib.contextmanager
def _preserved_rng():
    """Timing runs dropout; the user's random stream must not move."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
