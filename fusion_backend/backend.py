"""The torch.compile backend: Dynamo's graph in, a compiled callable out.

    canonicalize -> match (rules) -> build replacements (ops) -> tune (decide) -> replace
    -> inner compiler (Inductor by default)

A graph in which nothing is fused is handed to the inner compiler exactly as Dynamo produced it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.fx as fx

from .canonicalize import UnsafeRewrite, canonical_copy, tanh_gelus_with_runtime_constant
from .canonicalize.passes import MODE_REGION, WITHOUT_GRAD
from .match import all_rules, find_sites
from .match.sites import Site, module_location, source_location
from .match.unmatched import unmatched_attention
from .ops.feedforward import replayed_as_cuda_graphs
from .options import Options, parse_options
from .replace import ReplacementError, apply_plan, build_replacement, option_name
from .site_timing import TIMING_REVISION, SiteTimer, site_group

# torch's fused inference fast paths of nn.TransformerEncoderLayer and nn.MultiheadAttention (eval
# mode, no gradients): one op each in Dynamo's graph, which no rule looks into
_FAST_PATH_OPS = {getattr(torch, name): f"torch.{name}" for name in
                  ("_transformer_encoder_layer_fwd", "_native_multi_head_attention") if hasattr(torch, name)}

log = logging.getLogger("truthfuse")


def _unmatched_location(node: fx.Node) -> str:
    """Where explain() lists attention that no rule matched: its softmax's line, else its module."""
    location = source_location(node)
    return location if location != "<unknown>" else (module_location(node) or location)


class FusionWarning(UserWarning):
    """A site that matched could not be fused; truthfuse kept the original subgraph."""


@dataclass
class SiteDecision:
    """What happened to one site: for explain() and logs."""

    site_id: str
    rule: str
    kind: str
    variant: Optional[str]
    decision: str            # "fused" or "kept"
    reason: str
    location: str
    config: Optional[str] = None
    graph_index: int = 0


@dataclass
class GraphRecord:
    """One compiled graph: its sites and how the tuner decided."""

    index: int
    sites: List[SiteDecision] = field(default_factory=list)
    cache_hit: bool = False
    measurements: int = 0          # timed runs on the device (site measurements)
    plans_evaluated: int = 0       # plans the search scored (each priced from site timings)
    tuning_seconds: float = 0.0
    plan: Dict[str, str] = field(default_factory=dict)
    plan_ms: Optional[float] = None
    baseline_ms: Optional[float] = None
    tuning_reason: str = ""
    compile_seconds: float = 0.0
    timed_as_graphs: bool = False  # sites timed as CUDA-graph replays (a CUDA-graph mode)
    site_notes: Dict[str, str] = field(default_factory=dict)  # site id -> the tuner's note on it
    # site id -> why the strategy leaves the site no fused option: its reason, instead of the tuner's
    excluded: Dict[str, str] = field(default_factory=dict)
    signature: str = ""  # the graph's code, hashed: its site ids and tuning cache key start from it
    notes: List[str] = field(default_factory=list)  # what kept a block from being found at all


class TruthfuseBackend:
    """A configured backend: call it with (GraphModule, example_inputs) as Dynamo does.

    `records` collects one GraphRecord per compiled graph (several with graph breaks)."""

    def __init__(self, options: Optional[Options] = None):
        # a dict (TruthfuseBackend({"strategy": ...}), as torch.compile's options) failed at the
        # first graph with "'dict' object has no attribute 'inner'": parse it as those are
        self.options = options if isinstance(options, Options) else parse_options(options)
        self.records: List[GraphRecord] = []
        # Benchmarks of the tuner set this to see each graph's decision space and plan timer
        # (called as observer(space, timer, options) before the search runs).
        self.tuning_observer: Optional[Callable] = None
        # Triton kernels of an "aggressive" plan compiling on worker processes (`_decide`)
        self._kernel_compiles = None

    # Dynamo compares backends when deciding whether cached code can be reused.
    def __eq__(self, other):
        return isinstance(other, TruthfuseBackend) and other.options == self.options and other is self

    __hash__ = object.__hash__

    def __call__(self, gm: fx.GraphModule, example_inputs: List[Any]) -> Callable:
        started = time.perf_counter()
        if self.options.inner == "inductor":
            _warm_inductor_compile_pool()
        record = GraphRecord(index=len(self.records))
        self.records.append(record)
        # Under CUDA graphs no launch costs the host anything, which changes what is fastest
        # (the feed-forward op's memory scheme, `replayed_as_cuda_graphs`).
        replays = replayed_as_cuda_graphs() if _replays_cuda_graphs(self.options) else contextlib.nullcontext()
        with replays, _callers_saved_tensor_hooks_suspended():
            compiled_gm = self._rewrite(gm, example_inputs, record)
        rewritten = time.perf_counter()
        log.info("graph %d: analysis, replacements and tuning took %.1f s; %s compile starts",
                 record.index, rewritten - started, self.options.inner)
        try:
            compiled = _inner_compile(compiled_gm, example_inputs, self.options)
        finally:
            if self._kernel_compiles is not None:  # started in `_decide`, to overlap with that compile
                pending, self._kernel_compiles = self._kernel_compiles, None
                done = pending.wait()
                log.info("graph %d: %d Triton kernel(s) compiled ahead in %.1f s (%d here, the rest on %d "
                         "worker(s); %.1f s of compiling)", record.index, done["kernels"], done["seconds"],
                         done["here"], done["workers"], done["compile_seconds"])
        record.compile_seconds = time.perf_counter() - started
        log.info("graph %d: %s compile took %.1f s", record.index, self.options.inner,
                 time.perf_counter() - rewritten)
        _log_record(record)
        return compiled

    # -- the pipeline ------------------------------------------------------------------------

    def _rules(self):
        disabled = set(self.options.disable)
        return [r for r in all_rules() if r.name not in disabled and r.kind not in disabled]

    def _find(self, gm: fx.GraphModule, graph_id: str):
        canon = canonical_copy(gm)
        sites = find_sites(canon.graph, self._rules(), graph_id)
        return canon, sites

    def _rewrite(self, gm: fx.GraphModule, example_inputs: List[Any], record: GraphRecord,
                 checkpoint_body: bool = False) -> fx.GraphModule:
        checkpointed: List[GraphRecord] = []  # the records of checkpointed bodies (`_fuse_in_checkpoints`)
        rewritten = self._rewrite_graph(gm, example_inputs, record, checkpointed, checkpoint_body)
        decided = [inner for inner in checkpointed if inner.plan]
        if decided and not record.plan:  # the graph's only decisions are its checkpoints': as they came
            record.cache_hit = all(inner.cache_hit for inner in decided)
            # and their reasons are its own (explain()'s plan line ended in an empty one)
            record.tuning_reason = "; ".join(dict.fromkeys(inner.tuning_reason for inner in decided
                                                           if inner.tuning_reason))
        # the bodies' sites in the order of their checkpoints (they were listed last one first)
        record.sites = [site for inner in checkpointed for site in inner.sites] + record.sites
        for inner in checkpointed:
            record.notes.extend(n for n in inner.notes if n not in record.notes)
            record.measurements += inner.measurements
            record.plans_evaluated += inner.plans_evaluated
            record.tuning_seconds += inner.tuning_seconds
            record.plan.update(inner.plan)
            record.site_notes.update(inner.site_notes)
            record.excluded.update(inner.excluded)
        return rewritten

    def _rewrite_graph(self, gm: fx.GraphModule, example_inputs: List[Any], record: GraphRecord,
                       checkpointed: List[GraphRecord], checkpoint_body: bool) -> fx.GraphModule:
        # Named by the graph's code, not by its place among this backend's graphs: the same graph
        # compiled after others (a train graph first in one run, not in the next) keeps its site
        # ids, which the tuning cache keys on, and different models' sites do not share ids.
        record.signature = _graph_signature(gm)
        graph_id = f"g{record.signature[:8]}"
        try:
            canon, sites = self._find(gm, graph_id)
        except UnsafeRewrite as exc:
            warnings.warn(f"truthfuse: compiling this graph unchanged, nothing fused: {exc}", FusionWarning)
            return gm
        except Exception as exc:  # noqa: BLE001 -- analysis must never break compilation
            warnings.warn(f"truthfuse: graph analysis failed, compiling unchanged: {exc}", FusionWarning)
            return gm
        if self._fuse_in_checkpoints(gm, canon, record, checkpointed) and (
                checkpoint_body or _buffers_unknown_to_dynamo(gm)):
            # a rewritten body may hold buffers of its own (a replacement's tensor constants), which
            # AOTAutograd, reading Dynamo's graph module as Dynamo's, looked for among the model's
            # parameters and buffers: the compile raised ("wrap_body_0._truthfuse_const_attention_dot_0
            # not found in param_name_to_source"). A copy goes on, as where the graph's own sites fuse;
            # a body whose own checkpoints were rewritten is a copy too, so that its caller sees it
            # rewritten, at any depth of nesting
            gm = _copy_of(gm)
        bucket_bytes = _ddp_optimizer_piece()
        if bucket_bytes is not None:
            # explain() of a compiled DistributedDataParallel model listed "N graph(s)" and no
            # feed-forward site, with nothing to say why: a block whose Linears DDP puts in two
            # gradient buckets is cut in two, which TORCH_LOGS=graph_breaks does not show
            cap = f"bucket_cap_mb={bucket_bytes / 2**20:.3g}" if bucket_bytes else "bucket_cap_mb"
            record.notes.append("Dynamo's DDPOptimizer cut this DistributedDataParallel model's graph into pieces at DDP's "
                                f"gradient-bucket boundaries ({cap}) and compiles each piece alone: an attention or "
                                "feed-forward block whose parameters fall in two buckets is cut in two and is not "
                                "found; torch._dynamo.config.optimize_ddp = False compiles one graph")
        fast = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _FAST_PATH_OPS]
        if fast:
            # nn.TransformerEncoderLayer (and nn.MultiheadAttention) in eval mode under no_grad() run
            # torch's inference fast path, one native op for the whole layer, which Dynamo keeps as
            # it is: no rule can look into it, and explain() read only "no attention or
            # feed-forward site was found"
            where = list(dict.fromkeys(module_location(n) or source_location(n) for n in fast))
            more = f" and {len(where) - 3} more" if len(where) > 3 else ""
            ops = ", ".join(dict.fromkeys(_FAST_PATH_OPS[n.target] for n in fast))
            record.notes.append(f"{', '.join(where[:3])}{more} ran torch's inference fast path ({ops}, one native op "
                                "per layer), which no rule looks into; torch.backends.mha.set_fastpath_enabled(False) "
                                "runs such layers as written, where their attention and feed-forward blocks fuse")
        unlooked = [n for n in canon.graph.nodes if n.meta.get(WITHOUT_GRAD) and n.op in ("call_function", "call_method")
                    and (n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")) == "softmax"]
        if unlooked:
            # a softmax under a no_grad() or inference_mode() block inside the graph (the graph itself
            # records gradients) is left as written, so attention there matches no rule: explain()
            # read "no attention or feed-forward site was found" for a block that is there
            if torch.is_grad_enabled():
                record.notes.append(f"code under torch.no_grad() or inference_mode() inside this graph (a softmax at "
                                    f"{source_location(unlooked[0])}) is left as written and not looked into: "
                                    "attention there does not fuse; called wholly under no_grad(), the same code fuses")
            else:
                # called under no_grad(), with a torch.enable_grad() block inside: what runs outside
                # that block is computed without gradients where the graph records them
                record.notes.append(f"this graph is called without gradients (torch.no_grad()) and records them inside "
                                    f"a block (torch.enable_grad()); code outside that block (a softmax at "
                                    f"{source_location(unlooked[0])}) is left as written and not looked into: "
                                    "attention there does not fuse")
        if any(rule.kind == "feedforward" for rule in self._rules()):
            for tanh in tanh_gelus_with_runtime_constant(canon.graph):
                note = (f"the tanh GELU at {source_location(tanh)} reads sqrt(2/pi) at run time "
                        "(torch.compile(dynamic=True) passes Python floats such as math.pi into the graph), so "
                        "no feed-forward rule can match its block; torch._dynamo.config.specialize_float = True "
                        "keeps such floats constant")
                record.notes.append(note)
                warnings.warn(f"truthfuse: {note}", FusionWarning)
        decisions: Dict[str, SiteDecision] = {}
        built: Dict[tuple, tuple] = {}
        candidates: List[Site] = []
        for site in sites:
            d = SiteDecision(site.id, site.rule.name, site.kind, site.variant, "kept",
                             site.near_miss or "", site.location, graph_index=record.index)
            decisions[site.id] = d
            if site.near_miss:
                continue
            ok_configs = []
            failure = None
            if not self.options.search_configs:
                site.configs = site.configs[:1]  # the rule's default: no Triton compile per config
            for config in site.configs:
                try:
                    built[(site.id, config)] = build_replacement(site, config)
                    ok_configs.append(config)
                except ReplacementError as exc:
                    failure = str(exc)
            if ok_configs:
                site.configs = ok_configs
                candidates.append(site)
            else:
                d.reason = failure or "replacement could not be built"
                warnings.warn(f"truthfuse: site {site.id} at {site.location} kept: {d.reason}", FusionWarning)
        if any(rule.kind == "attention" for rule in self._rules()):
            # attention that no rule lined up with at all was missing from explain(), which then read
            # "no attention or feed-forward site was found": listed as kept, with what is in the way
            covered = set().union(*(s.nodes for s in sites if s.kind == "attention")) if sites else set()
            for softmax, why in unmatched_attention(canon.graph, covered):
                site_id = f"{graph_id}.attention.unmatched@{softmax.name}"
                decisions[site_id] = SiteDecision(site_id, "(no rule)", "attention", None, "kept", why,
                                                  _unmatched_location(softmax), graph_index=record.index)
        record.sites = list(decisions.values())
        if not candidates:
            return gm

        plan = self._decide(gm, canon, example_inputs, candidates, record, built)
        fused_ids = set(s for s, choice in plan.items() if choice != "keep")
        for site_id, why in record.excluded.items():
            decisions[site_id].reason = why
        if not fused_ids:
            for site in candidates:
                d = decisions[site.id]
                d.reason = _with_note(d.reason or record.tuning_reason, record.site_notes.get(site.id))
            return gm
        apply_plan(canon, candidates, plan, built)
        if self.options.monitor and checkpoint_body:
            # the monitor's token is a buffer of the graph module, which AOTAutograd looks for
            # among the model's own and does not find in a checkpoint's body: the compile failed
            record.notes.append("fused sites under torch.utils.checkpoint are not monitored: metrics() lists none "
                                "of them")
        elif self.options.monitor:
            from .monitor import instrument
            instrument(canon, {s.id: s for s in candidates if s.id in fused_ids})
        for site in candidates:
            d = decisions[site.id]
            if site.id in fused_ids:
                d.decision = "fused"
                choice = plan[site.id]
                d.config = None if choice == "fuse" else choice.split(":", 1)[1]
                d.reason = record.tuning_reason
            elif not d.reason:
                d.reason = _with_note(_keep_reason(site, candidates, fused_ids, record), record.site_notes.get(site.id))
        return canon

    def _fuse_in_checkpoints(self, gm: fx.GraphModule, canon: fx.GraphModule, record: GraphRecord,
                             checkpointed: List[GraphRecord]) -> bool:
        """Fuse inside the bodies of activation-checkpointed code (`torch.utils.checkpoint`; HF's
        gradient_checkpointing_enable() puts every layer there). Dynamo passes each body as a
        graph of its own, called by a higher-order op; each goes through this pipeline as a graph
        (its sites tuned on stand-ins of its inputs' example values) and its rewritten version
        replaces it in both `gm` and `canon`, so the checkpoint still recomputes the body, fused
        ops included, in the backward. The bodies' records join this graph's (`_rewrite`). Returns
        whether a body was replaced."""
        plain_modes = (torch.is_grad_enabled(), (), ())
        replaced = False
        calls: Dict[str, List[fx.Node]] = {}  # body name -> the calls of it (one, as Dynamo traces)
        for node in canon.graph.nodes:
            body_node = node.args[0] if _is_checkpoint(node) and node.args else None
            if isinstance(body_node, fx.Node) and body_node.op == "get_attr" and isinstance(body_node.target, str):
                calls.setdefault(body_node.target, []).append(node)
        for name, nodes in calls.items():
            body = getattr(canon, name, None)
            if not isinstance(body, fx.GraphModule):
                continue
            node = nodes[0]
            if any(n.meta.get(MODE_REGION, plain_modes) != plain_modes or n.meta.get(WITHOUT_GRAD) for n in nodes):
                # the body's own graph does not show the block it runs in, so a replacement
                # traced there would compute under other modes than eager does
                record.notes.append(f"the checkpointed code at {source_location(node)} runs inside a no_grad(), "
                                    "inference_mode() or autocast block of the compiled code, and is not looked into: "
                                    "nothing inside it fuses")
                continue
            inputs = [n.meta.get("example_value", n.meta.get("val")) for n in body.graph.nodes if n.op == "placeholder"]
            if any(value is None for value in inputs):
                record.notes.append(f"the checkpointed code at {source_location(node)} carries no example values, "
                                    "and is not looked into: nothing inside it fuses")
                continue
            inner = GraphRecord(index=record.index)
            rewritten = self._rewrite(body, inputs, inner, checkpoint_body=True)
            if self._kernel_compiles is not None:  # the body's compile-ahead, before the graph's own
                pending, self._kernel_compiles = self._kernel_compiles, None
                pending.wait()
            checkpointed.append(inner)
            if rewritten is not body:
                setattr(canon, name, rewritten)
                setattr(gm, name, rewritten)
                replaced = True
        return replaced

    def _decide(self, gm, gm_canon, example_inputs, candidates: List[Site], record: GraphRecord,
                built: Dict[tuple, tuple]) -> Dict[str, str]:
        """Choose a plan (site id -> "keep" / "fuse[:config]") with the tuner, through the cache."""
        from .tune import (DecisionSpace, Option, SiteChoices, TuningCache, TuningDecision, cache_key, choose_plan,
                           restrict)

        conflicts = []
        covered = [s.nodes for s in candidates]  # each a new set: made once per site, not once per pair
        for i, a in enumerate(candidates):
            for j, b in enumerate(candidates[i + 1:], i + 1):
                if covered[i] & covered[j]:
                    conflicts.append((a.id, b.id))
        space = DecisionSpace(
            sites=[SiteChoices(
                site_id=s.id, kind=s.kind,
                options=[Option.keep()] + [Option(option_name(c), s.variant, c, s.exact) for c in s.configs],
                priority=s.rule.priority * 1000 + len(s.nodes),
                # identical layers share what the search learns about launch configs
                group=site_group(s))
                for s in candidates],
            conflicts=conflicts)
        opts = self.options
        if opts.strategy == "conservative":
            record.excluded = {s.id: _inexact_reason(s) for s in candidates if not s.exact}
        # A training graph's sites are timed forward and backward, an inference graph's forward
        # only: the two may choose differently, so the key tells them apart.
        train = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
        key = None
        cache = TuningCache() if opts.cache else None
        if cache is not None:
            key = cache_key(record.signature, _shapes(gm, example_inputs), _dtypes(example_inputs),
                            _device_name(example_inputs), opts.strategy,
                            extra={"space": space.signature(), "inner": opts.inner, "mode": opts.mode,
                                   "inductor_options": opts.inductor_options, "train": train,
                                   "autocast": _ambient_autocast(example_inputs), "timing": TIMING_REVISION})
            cached = cache.get(key)
            if cached is not None:
                try:
                    decision = TuningDecision.from_record(cached)
                    # a plan the strategy could not choose (a file edited by hand: an inexact site
                    # fused under "conservative") would break what the strategy promises
                    problem = None if space.is_valid(decision.plan) else "its plan is not one of this graph's plans"
                    restricted = restrict(space, opts.strategy)
                    if problem is None and not restricted.is_valid(decision.plan):
                        problem = f"its plan is not one the {opts.strategy!r} strategy can choose"
                    if problem is None:  # the reason explain() shows must be about this plan
                        problem = decision.disagreement(guarded=restricted.has_all_keep())
                except Exception as exc:  # noqa: BLE001 -- a bad cache file must never fail the compile
                    problem = f"malformed record: {exc}"
                if problem is None:
                    _fill_record(record, decision, cache_hit=True)
                    return dict(decision.plan)
                cache.reject(key, problem)

        graphs = _replays_cuda_graphs(opts)
        # Under CUDA graphs the timer replays both options of a site as graphs of its own, so a
        # kept subgraph is compiled without Inductor's (they would nest).
        timing_opts = dataclasses.replace(opts, inductor_options={**opts.inductor_options, "triton.cudagraphs": False})
        timer = SiteTimer(gm_canon, candidates, built,
                          lambda sub, args: _inner_compile(sub, args, timing_opts if graphs else opts), train,
                          graphs=graphs, example_inputs=example_inputs)
        if self.tuning_observer is not None:
            self.tuning_observer(space, timer, opts)
        by_id = {s.id: s for s in candidates}
        aggressive = opts.strategy == "aggressive"
        if not aggressive:  # every fused option may be timed: compile their kernels in parallel first
            fusable = {c.site_id for c in restrict(space, opts.strategy).sites if any(o.fused for o in c.options)}
            timer.start_kernel_compiles([s for s in candidates if s.id in fusable])
        decision = choose_plan(space, timer, opts.strategy, simulations=opts.budget,
                               time_budget_s=opts.tuning_seconds, seed=opts.seed,
                               site_cost=lambda sid, option: timer.site_cost(by_id[sid], option))
        if aggressive:  # nothing was timed: the fused sites' kernels compile while Inductor compiles
            fused = {sid for sid, choice in dict(decision.plan).items() if choice != "keep"}
            self._kernel_compiles = timer.start_kernel_compiles([s for s in candidates if s.id in fused])
        chosen = dict(decision.plan)
        # host-bound notes only without CUDA graphs: replayed as graphs, nothing waits on the host
        notes = {s.id: "; ".join(n for n in (timer.fell_back_note(s), "" if graphs else timer.host_bound_note(s)) if n)
                 for s in candidates if chosen.get(s.id, "keep") == "keep"}
        decision.notes = {sid: note for sid, note in notes.items() if note}
        _fill_record(record, decision, cache_hit=False)
        # The plans the search scored were priced from site timings; report the timed runs.
        record.plans_evaluated = decision.measurements
        record.measurements = timer.measurements
        # what the report calls CUDA-graph timing: none on CPU, or where nothing was timed
        record.timed_as_graphs = timer.graph_replays > 0
        if cache is not None and key is not None:
            if decision.reusable:
                cache.put(key, decision.to_record())
            else:
                log.info("graph %d: a timing the decision rests on failed; not caching it (%s)",
                         record.index, decision.reason)
        return dict(decision.plan)


def _fill_record(record: GraphRecord, decision, cache_hit: bool) -> None:
    record.cache_hit = cache_hit
    record.measurements = 0 if cache_hit else decision.measurements
    record.tuning_seconds = 0.0 if cache_hit else decision.seconds
    record.plan = dict(decision.plan)
    record.plan_ms = decision.cost_ms
    record.baseline_ms = decision.baseline_ms
    record.tuning_reason = ("cached: " if cache_hit else "") + decision.reason
    record.site_notes = dict(decision.notes)


def _with_note(reason: str, note: Optional[str]) -> str:
    return f"{reason}; {note}" if note else reason


# How a kept site's reason starts when another rule's fused site covers its nodes (explain() shows
# such sites as "covered": the place is fused, by the other rule)
OVERLAPS_FUSED_SITE = "overlaps fused site"


def _inexact_reason(site: Site) -> str:
    """Why "conservative" keeps a site whose rule calls its rewrite inexact. Dropout is the built-in
    rules' one cause; a rule of the user's may have its own, which only the rule knows."""
    match = site.match
    dropout = match.covers(lambda n: "dropout" in str(getattr(n.target, "__name__", n.target))) or any(
        "dropout" in name and match.present(name) for name in match.bindings)
    if dropout:
        return "conservative: not exact, since the fused kernel draws its own dropout random stream, not torch's"
    return f"conservative: rule {site.rule.name} declares this site's rewrite inexact"


def _keep_reason(site: Site, candidates: List[Site], fused_ids: set, record: GraphRecord) -> str:
    for other in candidates:
        if other.id in fused_ids and other.nodes & site.nodes:
            return f"{OVERLAPS_FUSED_SITE} {other.rule.name} ({other.location})"
    if fused_ids and record.tuning_reason:
        # the plan fused other sites: its reason is about them, not about this one
        return f"the tuner's plan keeps it; the plan fuses other sites ({record.tuning_reason})"
    return record.tuning_reason or "the tuner kept it"


def _ddp_optimizer_piece() -> Optional[int]:
    """DDP's bucket size in bytes (0 where unknown) when this graph is one of the pieces into which
    Dynamo's DDPOptimizer cut a DistributedDataParallel model's graph (it compiles each piece with
    this backend, from `SubmodCompiler.compile_submod`), else None."""
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == "compile_submod"
                and frame.f_globals.get("__name__") == "torch._dynamo.backends.distributed"):
            try:
                from torch.nn.parallel import DistributedDataParallel
                ddp = DistributedDataParallel._get_active_ddp_module()
                return int(getattr(ddp, "bucket_bytes_cap", 0) or 0)
            except Exception:  # noqa: BLE001 -- the size is only for the note
                return 0
        frame = frame.f_back
    return None


@contextlib.contextmanager
def _callers_saved_tensor_hooks_suspended():
    """Keep the caller's saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks) away from
    what truthfuse computes while it compiles: tracing replacements on fake tensors and timing
    options on real ones record autograd graphs of their own. Under eager non-reentrant
    activation checkpointing around a compiled block, the checkpoint's pack hook counted those
    tensors in the first (compiling) forward and not in the recomputation, and the backward failed
    with CheckpointError; a user's own hook was handed FakeTensors. AOTAutograd suspends the hooks
    while it traces in the same way."""
    set_tracing = getattr(torch._C._autograd, "_saved_tensors_hooks_set_tracing", None)
    if set_tracing is None:  # private API; older or newer torch without it: nothing to suspend by
        yield
        return
    prior = set_tracing(True)
    try:
        yield
    finally:
        set_tracing(prior)


def _warm_inductor_compile_pool() -> None:
    """Start Inductor's pool of kernel-compiling worker processes now, as Dynamo's own "inductor"
    backend does before compiling: until the pool reports ready, Inductor compiles Triton kernels
    one at a time in this process, and a backend that calls compile_fx directly would otherwise
    start the pool only when its first kernels are due. Analysis and tuning run meanwhile."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # private API; without it Inductor still starts the pool itself, later
        return
    maybe_warm_pool()


def _is_checkpoint(node: fx.Node) -> bool:
    """A call of Dynamo's operator for code under `torch.utils.checkpoint` (its body the first argument)."""
    return node.op == "call_function" and getattr(node.target, "__name__", None) == "tag_activation_checkpoint"


def _buffers_unknown_to_dynamo(gm: fx.GraphModule) -> bool:
    """Whether `gm`, as Dynamo made it, now holds parameters or buffers (those of its submodules
    included) that Dynamo did not record the sources of, which AOTAutograd requires of a graph
    module it reads as Dynamo's (`_try_get_metadata_from_dynamo`)."""
    known = getattr(gm, "_param_name_to_source", None)
    if known is None or "dynamo_compile_id" not in gm.meta:
        return False
    names = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    return any(name not in known for name in names)


def _copy_of(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule of a copy of `gm`'s graph, over the same submodules and attributes."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def _has_checkpoints(gm: fx.GraphModule) -> bool:
    return any(_is_checkpoint(n) for n in gm.graph.nodes)


def _inner_compile(gm: fx.GraphModule, example_inputs: List[Any], options: Options) -> Callable:
    # A graph with checkpointed code goes through AOTAutograd even with inner="eager": run as it
    # is, Dynamo's checkpoint operator recomputes its body in the backward without the forward's
    # random state, so dropout there got other masks than the forward's, and wrong gradients
    # (Dynamo's own backend="eager" does the same; pytorch/pytorch#160773)
    if options.inner == "eager" and not _has_checkpoints(gm):
        return gm.forward
    if options.inner in ("eager", "aot_eager"):
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = _inductor_patches(options)
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def _inductor_patches(options: Options) -> Dict[str, Any]:
    """Inductor config patches for the options' mode and inductor_options."""
    patches: Dict[str, Any] = {}
    if options.mode not in ("default", None):
        patches.update(torch._inductor.list_mode_options(options.mode))
    patches.update(options.inductor_options)
    return patches


def _replays_cuda_graphs(options: Options) -> bool:
    """Whether Inductor will run the compiled graphs as CUDA graphs (mode="reduce-overhead" or
    "max-autotune", or the triton.cudagraphs patch)."""
    if options.inner != "inductor":
        return False
    patches = _inductor_patches(options)
    return bool(patches.get("triton.cudagraphs", torch._inductor.config.triton.cudagraphs))


def _graph_signature(gm: fx.GraphModule) -> str:
    """The graph's structure without node names' incidental numbering: its code, hashed."""
    return hashlib.sha256(gm.code.encode()).hexdigest()


def _shapes(gm: fx.GraphModule, inputs):
    """The inputs' shapes as the graph takes them: a size the graph holds symbolic (dynamic=True)
    is its symbol, not this call's value, so one decision serves every size the graph accepts."""
    values = [n.meta.get("example_value", n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    if len(values) != len(inputs):
        values = list(inputs)
    return [[d if isinstance(d, int) else str(d) for d in v.shape] if isinstance(v, torch.Tensor) else repr(t)
            for v, t in zip(values, inputs)]


def _dtypes(inputs):
    return [str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]


def _device_name(inputs) -> str:
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return torch.cuda.get_device_name(t.device)
    import platform
    return f"cpu-{platform.machine()}"


def _ambient_autocast(inputs) -> Optional[str]:
    """The autocast dtype a graph is compiled under when autocast is entered around the compiled
    call, else None. It changes what the kept sites compute in, and so their timings, but neither
    the graph's code nor its inputs' dtypes: the tuning cache must tell the two apart."""
    device = "cuda" if any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) else "cpu"
    return str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None


def _log_record(record: GraphRecord) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    fused = [s for s in record.sites if s.decision == "fused"]
    log.info("graph %d: %d site(s), %d fused, tuning: %s%s", record.index, len(record.sites), len(fused),
             "cache hit" if record.cache_hit else f"{record.measurements} measurement(s)",
             f" ({record.tuning_reason})" if record.tuning_reason else "")
    for s in record.sites:
        log.debug("  %s %s [%s/%s] at %s: %s", s.decision, s.rule, s.kind, s.variant, s.location, s.reason)


def truthfuse(gm: fx.GraphModule, example_inputs: List[Any], *, mode: Optional[str] = None,
              options: Optional[Dict[str, Any]] = None) -> Callable:
    """The `torch_dynamo_backends` entry point: `torch.compile(m, backend="truthfuse", mode=...)`
    and `torch.compile(m, backend="truthfuse", options={...})` land here (torch.compile refuses
    both at once, so a mode with options is options["mode"])."""
    return TruthfuseBackend(parse_options(options, mode))(gm, example_inputs)


def backend(*graph_and_inputs: Any, **options: Any) -> TruthfuseBackend:
    """A configured backend callable: `torch.compile(m, backend=fusion_backend.backend(strategy="aggressive"))`."""
    if graph_and_inputs:
        # torch.compile(m, backend=fusion_backend.backend), the factory not called, reached here
        # as Dynamo's (gm, example_inputs) and failed with "backend() takes 0 positional arguments"
        raise TypeError("fusion_backend.backend is a factory of backends and takes options only, by keyword: "
                        "torch.compile(m, backend=fusion_backend.backend(strategy=\"aggressive\")), or "
                        "backend=\"truthfuse\" for the defaults")
    return TruthfuseBackend(parse_options(options))
