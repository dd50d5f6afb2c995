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

from .canonicalize.aliasing import mutates
from .canonicalize.passes import example_value
from .kernels import compile_ahead
from .kernels.runtime import interpreting
from .ops.fallback import fallbacks_recorded
from .match.sites import Site
from .tune.timing import Timing, measure, measure_timing, rotated_input_sets

Node = fx.Node
log = logging.getLogger("truthfuse")

# Under Triton's interpreter (TRITON_INTERPRET=1: the tests, on CPU) a fused option's time is
# Python's, 10-100x a kept site's and nothing a GPU would show: fewer calls choose the same plan.
# Each interpreted attention forward and backward takes about a second on the CI's 2-core machine,
# and 13 calls per measurement were most of the engine tests' time.
INTERPRETED_WARMUP = 1
INTERPRETED_REPEATS = 3

TIMING_REVISION = 4
"""Part of every tuning-cache key: raise it when the way sites are timed changes, so that plans
chosen from the old timings are tuned again. 2: the backward of a training site runs on every
rotated input set (revision 1 ran it on the first set only, so small sites timed mostly their
forward). 3: a fused option that the host nearly paces is timed again compiled
(`COMPILED_RECHECK_SHARE`). 4: short-produced inputs (masks) are computed for real
(`PRODUCER_LIMIT`)."""

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


PRODUCER_LIMIT = 64
"""A site input that at most this many graph nodes compute from the graph's inputs (an attention
mask built from positions, padding or a registered triangle; a position bias) is computed for real,
from the first call's inputs, when the site is timed: a mask that drops whole blocks makes the
fused kernels skip them, and a random stand-in would hide that. Other inputs (activations, with
the network before them as producer) get random stand-ins (`_real_like`)."""


def keep_subgraph(gm: fx.GraphModule, site: Site) -> Tuple[fx.GraphModule, List[Any], List[Node]]:
    """The site's matched nodes as a GraphModule of their own, its inputs' example values, and the
    graph nodes those inputs come from.

    Every value a matched node reads from outside the match becomes a placeholder; the output is
    a 1-tuple of the anchor's value, as Dynamo's graphs return tuples (aot_autograd, the
    "aot_eager" inner compiler, takes no other output: every kept option failed to compile there).
    """
    graph = fx.Graph()
    env: Dict[Node, Node] = {}
    inputs: List[Any] = []
    sources: List[Node] = []
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
        sources.append(n)
        return ph

    for node in covered:
        for dep in node.all_input_nodes:
            if dep not in site.nodes:
                lookup(dep)
        env[node] = graph.node_copy(node, lookup)
    graph.output((env[site.anchor],))
    return fx.GraphModule(gm, graph), inputs, sources


def _producer(node: Node, limit: int) -> Optional[List[Node]]:
    """The nodes that compute `node` from the graph's inputs and attributes, each after its own
    inputs, or None where they are more than `limit`, or one of them is not a pure function call."""
    order: List[Node] = []
    seen = set()
    stack = [(node, False)]
    while stack:
        n, inputs_done = stack.pop()
        if inputs_done:
            order.append(n)  # a post-order walk: every input of n is in order already
            continue
        if n in seen:
            continue
        seen.add(n)
        if n.op not in ("placeholder", "get_attr"):
            if n.op not in ("call_function", "call_method") or mutates(n) or len(seen) > limit:
                return None
        stack.append((n, True))
        stack.extend((d, False) for d in n.all_input_nodes if d not in seen)
    return order


def _first_call_value(gm: fx.GraphModule, node: Node, graph_inputs: Dict[Node, Any]) -> Optional[torch.Tensor]:
    """`node`'s value for the graph's first call (`graph_inputs`: its placeholders' real values),
    computed by its producer where that is short (`PRODUCER_LIMIT`); None where it is not, where
    an input is fake, or where the result does not match the node's example value."""
    nodes = _producer(node, PRODUCER_LIMIT)
    want = example_value(node)
    if nodes is None or not isinstance(want, torch.Tensor):
        return None
    graph = fx.Graph()
    env: Dict[Node, Node] = {}
    args = []
    for n in nodes:
        if n.op == "placeholder":
            if n not in graph_inputs:
                return None
            value = graph_inputs[n]
            if isinstance(value, torch.Tensor) and torch._subclasses.fake_tensor.is_fake(value):
                return None
            env[n] = graph.placeholder(n.name)
            args.append(value.node.hint if isinstance(value, torch.SymInt) else value)
        else:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[node])
    try:
        with torch.no_grad(), _preserved_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fx.GraphModule(gm, graph)(*args)
    except Exception as exc:  # noqa: BLE001 -- the site is then timed on a random stand-in
        log.debug("tuning: %s not computed for timing (%s: %s)", node.name, type(exc).__name__, str(exc)[:120])
        return None
    shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in want.shape]
    if (not isinstance(out, torch.Tensor) or list(out.shape) != shape or out.dtype != want.dtype
            or out.device != want.device):
        return None
    # detached, not copied: it may be a graph input itself (a model's weight, kept for the whole
    # tuning), and timing only reads its inputs; a gradient lands on this alias, not on the input
    return out.detach().requires_grad_(want.requires_grad and want.is_floating_point())


class FusedOptionFellBack(RuntimeError):
    """A fused option's op fell back to its PyTorch reference while being timed."""


class SiteTimer:
    """Times sites' options and adds them up into a plan's cost, for the tuner's `evaluate`."""

    def __init__(self, gm: fx.GraphModule, sites: List[Site], built: Dict[tuple, tuple],
                 compile_fn: Callable[[fx.GraphModule, list], Callable], train: bool, graphs: bool = False,
                 example_inputs: Optional[List[Any]] = None):
        """graphs: the compiled graphs will replay as CUDA graphs, so every option is timed as
        replays of a CUDA graph of its own (`_measure_replays`); compile_fn must then compile
        without CUDA graphs of its own. example_inputs: the graph's first-call inputs (its
        placeholders' values), from which short-produced site inputs are computed for real
        (`PRODUCER_LIMIT`)."""
        self.gm, self.sites, self.built = gm, sites, built
        self._graph_inputs: Dict[Node, Any] = {}
        if example_inputs is not None:
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            if len(placeholders) == len(example_inputs):
                self._graph_inputs = dict(zip(placeholders, example_inputs))
        self._first_call: Dict[Node, Optional[torch.Tensor]] = {}
        self.compile_fn, self.train, self.graphs = compile_fn, train, graphs
        self.memo: Dict[tuple, float] = {}
        # CUDA timings without CUDA graphs, with their host issue time (`host_bound_note`)
        self.timings: Dict[tuple, Timing] = {}
        self.rounds: Dict[tuple, int] = {}
        self.measurements = 0
        # (site group, choice) -> the error of a fused option whose op fell back when timed
        self.fell_back: Dict[tuple, FusedOptionFellBack] = {}
        self.graph_replays = 0  # measurements made as CUDA-graph replays (graphs, on a CUDA device)
        self._generators: Dict[torch.device, torch.Generator] = {}
        # (site group, choice) -> the inner compiler's callable: a confirmation round reuses it
        self._compiled: Dict[tuple, Callable] = {}
        self._compiling: Optional[compile_ahead.Compiling] = None  # `start_kernel_compiles`

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
        if (group, choice) in self.fell_back:  # every plan with this option fails the same way
            raise self.fell_back[(group, choice)]
        if key not in self.memo:
            started = time.perf_counter()
            try:
                with _fresh_compile_context():
                    timing = self._measure(site, choice)
            except FusedOptionFellBack as error:
                self.fell_back[(group, choice)] = error
                raise
            self.memo[key] = timing if isinstance(timing, float) else timing.ms
            if isinstance(timing, Timing):
                self.timings[key] = timing
            self.measurements += 1
            log.info("tuning: %s %s: %.3f ms (measured in %.1f s)", site.rule.name, choice,
                     self.memo[key], time.perf_counter() - started)
        return self.memo[key]

    # -- the kernels' compiles, ahead of the measurements ------------------------------------

    def start_kernel_compiles(self, sites: List[Site]) -> Optional[compile_ahead.Compiling]:
        """Start compiling, on worker processes, the Triton kernels that the sites' fused options
        (each site group's first launch config) launch, and return the handle to wait on; None
        where there is nothing to do (CPU, the interpreter, a Triton this does not read, or every
        kernel compiled already). Each option runs once with its launches recorded instead
        (`compile_ahead.recording`): a fused attention option launches three to eight kernels,
        which its first measurement would otherwise compile one after another."""
        if interpreting() or not compile_ahead.available():
            return None
        self.wait_for_kernel_compiles()
        started = time.perf_counter()
        if not any(isinstance(v, torch.Tensor) and v.device.type == "cuda"
                   for site in sites for v in site.match.values.values()):
            return None
        # The workers import torch and set up Triton's compiler while the options run; until they
        # are ready, `Compiling.wait` compiles in this process.
        compile_ahead.start_pool()
        seen = set()
        with _fresh_compile_context(), _preserved_rng(), warnings.catch_warnings(), \
                compile_ahead.recording() as recorded:
            warnings.simplefilter("ignore")
            for site in sites:
                group = site_group(site)
                if group in seen or (site.id, site.configs[0]) not in self.built:
                    continue
                seen.add(group)
                traced, args = self._fused_option(site, site.configs[0])
                if not any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args):
                    continue
                train = self._trains(args)
                try:
                    with contextlib.nullcontext() if train else torch.no_grad():
                        _timed_call(traced.forward, train)(*args)
                except Exception as exc:  # noqa: BLE001 -- its kernels then compile when it is timed
                    log.info("tuning: %s: its kernels are not compiled ahead (%s: %s)", site.rule.name,
                             type(exc).__name__, str(exc)[:120])
        if not recorded.kernels:
            return None
        self._compiling = compile_ahead.start_compiles(recorded)
        log.info("tuning: %d fused option(s) run in %.1f s to list their Triton kernels; compiling %d of them on %d "
                 "worker process(es)", len(seen), time.perf_counter() - started, len(recorded.kernels),
                 self._compiling.workers)
        return self._compiling

    def wait_for_kernel_compiles(self) -> None:
        """Wait for the compiles `start_kernel_compiles` started: a fused option's measurement must
        not compile the same kernels again in this process, and no timing may share the CPU with
        the workers. (The inner compiler's compile of a kept option runs while they go on.)"""
        if self._compiling is not None:
            done, self._compiling = self._compiling.wait(), None
            log.info("tuning: %d kernel(s) compiled ahead in %.1f s (%d here, the rest on %d worker(s); %.1f s of "
                     "compiling)", done["kernels"], done["seconds"], done["here"], done["workers"],
                     done["compile_seconds"])

    # -- one measurement ---------------------------------------------------------------------

    def _fused_option(self, site: Site, config: Optional[str]) -> Tuple[fx.GraphModule, list]:
        """The traced replacement of `site` with `config`, and real values for its inputs."""
        traced, _ = self.built[(site.id, config)]
        example = [site.match.values[n] for n in traced.tensor_names]
        sources = [site.match.bindings[n] for n in traced.tensor_names]
        return traced, [self._input_value(node, v) for node, v in zip(sources, example)]

    def _trains(self, args: list) -> bool:
        return self.train and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)

    def fell_back_note(self, site: Site) -> str:
        """For a site the plan keeps: a note when some of its fused options could not run their
        kernels when timed (`FusedOptionFellBack`), with the first one's reason. "" otherwise."""
        group = site_group(site)
        errors = [str(error) for (g, _), error in self.fell_back.items() if g == group]
        if not errors:
            return ""
        return f"{len(errors)} fused option(s) could not run their kernels when timed ({errors[0]})"

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
        or ms. A site inside `with torch.autocast(...)` in the model's code is compiled and timed
        under that autocast, as it runs in the graph (without it, the kept subgraph's fp32 and
        half-precision operands met in one op and failed). Raises FusedOptionFellBack where a fused
        option's op computed with its PyTorch reference instead of its kernels (a launch config
        that does not fit the GPU at these shapes): that timing is not the option's."""
        with contextlib.ExitStack() as regions, fallbacks_recorded() as fallbacks:
            for args in autocast_around(site.anchor):
                regions.enter_context(torch.autocast(*args))
            timing = self._measure_here(site, choice)
        if fallbacks and choice != "keep":
            raise FusedOptionFellBack(f"{site.rule.name} {choice}: {fallbacks[0]}")
        return timing

    def _measure_here(self, site: Site, choice: str):
        if choice == "keep":
            sub, example, sources = keep_subgraph(self.gm, site)
            args = [self._input_value(node, v) for node, v in zip(sources, example)]
        else:
            self.wait_for_kernel_compiles()
            sub, args = self._fused_option(site, None if choice == "fuse" else choice.split(":", 1)[1])
        with _preserved_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The fused option is one op call plus glue: Inductor would add a compile per launch
            # config and nothing to the kernel, so it runs as traced (compiled only where the host
            # nearly paces it, `_compiled_if_host_paced`).
            train = self._trains(args)
            if choice == "keep":
                fn = self._compile(site, choice, lambda: sub, args)
                self.wait_for_kernel_compiles()  # the compile above ran beside the workers; the timing does not
            else:
                fn = sub.forward
            run = _timed_call(fn, train)
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            sets = rotated_input_sets(args, device)
            grad_ctx = contextlib.nullcontext() if train else torch.no_grad()
            with grad_ctx:
                if self.graphs and device.type == "cuda":
                    try:
                        ms = _measure_replays(run, sets, device)
                        self.graph_replays += 1
                        return ms
                    except Exception as exc:  # noqa: BLE001 -- then time it as it would run without graphs
                        log.info("tuning: %s %s: no CUDA graph (%s: %s); timed without one", site.rule.name, choice,
                                 type(exc).__name__, str(exc)[:120])
                if device.type == "cuda":
                    timing = measure_timing(run, sets, device=device, warmup=3, repeats=10)
                    if choice != "keep":
                        timing = self._compiled_if_host_paced(site, choice, sub, args, sets, timing, train, device)
                    return timing
                if interpreting():
                    return measure(run, sets, device=device, warmup=INTERPRETED_WARMUP, repeats=INTERPRETED_REPEATS)
                return measure(run, sets, device=device, warmup=3, repeats=10)

    def _input_value(self, node: Any, value: Any) -> Any:
        """A real value for one site input: its first-call value where a short producer computes
        it (`PRODUCER_LIMIT`), else a random stand-in of the example value's shape."""
        if isinstance(node, Node) and isinstance(value, torch.Tensor):
            if node not in self._first_call:
                self._first_call[node] = (_first_call_value(self.gm, node, self._graph_inputs)
                                          if self._graph_inputs else None)
            real = self._first_call[node]
            if real is not None:
                return real
        return _real_like(value, self._generators)

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


def autocast_around(node: Node) -> List[tuple]:
    """The arguments (device type, dtype, enabled, cache) of each `torch.autocast` region of the
    graph that `node` runs inside: entered before it and not left, outermost first."""
    regions: List[Tuple[Node, tuple]] = []
    for n in node.graph.nodes:
        if n is node:
            break
        if n.op == "call_function" and n.target is torch.amp.autocast_mode._enter_autocast:
            regions.append((n, tuple(n.args)))
        elif n.op == "call_function" and n.target is torch.amp.autocast_mode._exit_autocast:
            regions = [(enter, args) for enter, args in regions if enter is not n.args[0]]
    return [args for _, args in regions]


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
    """Sites that time alike: same rule, same tensor shapes/dtypes/grad, same constants, and the same
    graph-built inputs (a mask a short producer makes, which is timed as built: a sliding-window
    layer and a global one must not share timings). They share measurements here and, in the
    tuner, what the search learns about launch configs."""
    shapes = ";".join(f"{k}={tuple(v.shape)}:{v.dtype}:{v.requires_grad}"
                      for k, v in sorted(site.match.values.items()) if isinstance(v, torch.Tensor))
    consts = ";".join(f"{k}={v!r}" for k, v in sorted(site.match.values.items())
                      if not isinstance(v, torch.Tensor))
    return f"{site.rule.name}|{shapes}|{consts}|{_graph_built_inputs(site)}"


def _graph_built_inputs(site: Site) -> str:
    """The site's tensor inputs that the graph builds in a few steps from integer, bool or size
    inputs alone (masks from positions and padding: `PRODUCER_LIMIT`), as binding=node names; not
    activations, whose values do not change a site's speed. Found once per site (the tuner asks
    for a site's group at every plan)."""
    found = getattr(site, "_graph_built", None)
    if found is None:
        bindings = getattr(site.match, "bindings", {})
        found = ";".join(f"{k}={node.name}" for k, node in sorted(bindings.items())
                         if isinstance(node, Node) and node.op not in ("placeholder", "get_attr")
                         and isinstance(site.match.values.get(k), torch.Tensor) and _built_from_indices(node))
        site._graph_built = found
    return found


def _built_from_indices(node: Node) -> bool:
    """Whether a short producer makes `node` with no floating-point graph input among its sources."""
    nodes = _producer(node, PRODUCER_LIMIT)
    if nodes is None:
        return False
    for n in nodes:
        value = example_value(n) if n.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return False
    return True


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
