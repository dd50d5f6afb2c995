"""explain(): compile once, run once, and report which sites were found, fused or kept, and why."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .backend import OVERLAPS_FUSED_SITE, GraphRecord, SiteDecision, TruthfuseBackend
from .options import parse_options


@dataclass
class TuningSummary:
    """How the tuner decided, over all graphs of one compile."""

    cache_hit: bool
    measurements: int
    seconds: float
    plans: List[Dict[str, str]] = field(default_factory=list)
    plan_ms: List[Optional[float]] = field(default_factory=list)
    baseline_ms: List[Optional[float]] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list)
    cuda_graphs: bool = False  # the sites were timed as CUDA-graph replays (mode="reduce-overhead")


@dataclass
class Report:
    """The result of explain(). `sites` lists every site found; `tuning` summarizes the tuner."""

    sites: List[SiteDecision]
    tuning: TuningSummary
    graphs: int
    compile_seconds: float
    disabled: Tuple[str, ...] = ()  # the rule names and kinds options["disable"] turned off
    notes: List[str] = field(default_factory=list)  # why a block was not found at all (GraphRecord.notes)

    @classmethod
    def from_records(cls, records: List[GraphRecord]) -> "Report":
        sites = [s for r in records for s in r.sites]
        tuned = [r for r in records if r.plan or r.cache_hit]
        tuning = TuningSummary(
            cache_hit=bool(tuned) and all(r.cache_hit for r in tuned),
            measurements=sum(r.measurements for r in records),
            seconds=sum(r.tuning_seconds for r in records),
            plans=[r.plan for r in tuned],
            plan_ms=[r.plan_ms for r in tuned],
            baseline_ms=[r.baseline_ms for r in tuned],
            reasons=[r.tuning_reason for r in tuned],
            cuda_graphs=any(r.timed_as_graphs for r in records),
        )
        return cls(sites=sites, tuning=tuning, graphs=len(records),
                   compile_seconds=sum(r.compile_seconds for r in records),
                   notes=list(dict.fromkeys(n for r in records for n in r.notes)))

    @property
    def fused(self) -> List[SiteDecision]:
        return [s for s in self.sites if s.decision == "fused"]

    @property
    def kept(self) -> List[SiteDecision]:
        return [s for s in self.sites if s.decision == "kept"]

    @property
    def alternatives(self) -> List[SiteDecision]:
        """Kept sites that another rule's fused site covers: the same place matched twice (a
        general rule where a specific one fused), not a place left unfused."""
        return [s for s in self.kept if (s.reason or "").startswith(OVERLAPS_FUSED_SITE)]

    def __str__(self) -> str:
        alternatives = self.alternatives
        head = (f"truthfuse: {self.graphs} graph(s), {len(self.sites)} site(s), {len(self.fused)} fused, "
                f"{len(self.kept) - len(alternatives)} kept"
                + (f", {len(alternatives)} covered by a fused site" if alternatives else "")
                + f"; compile {self.compile_seconds:.2f} s")
        rows = [("#", "kind", "variant", "decision", "rule", "location", "reason")]
        for i, s in enumerate(self.sites):
            decision = "covered" if any(s is a for a in alternatives) else s.decision
            rows.append((str(i), s.kind, s.variant or "-", decision, s.rule,
                         _short_path(s.location), s.reason or "-"))
        widths = [max(len(r[c]) for r in rows) for c in range(6)]
        lines = [head, ""]
        for r in rows:
            lines.append("  ".join(r[c].ljust(widths[c]) for c in range(6)) + "  " + r[6])
        t = self.tuning
        lines.append("")
        lines.append(f"tuning: cache_hit={t.cache_hit} measurements={t.measurements} "
                     f"time={t.seconds:.2f} s" + ("; sites timed as CUDA-graph replays" if t.cuda_graphs else ""))
        for plan, ms, base, why in zip(t.plans, t.plan_ms, t.baseline_ms, t.reasons):
            timing = ""
            if ms is not None and base is not None:
                timing = f" ({ms:.3f} ms vs keep-all {base:.3f} ms)"
            chosen = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in plan.items()) or "-"
            lines.append(f"  plan: {chosen}{timing}; {why}")
        if self.disabled:
            lines.append(f"disabled by options: {', '.join(self.disabled)}")
        lines.extend(f"note: {n}" for n in self.notes)
        if not self.graphs:
            lines.append("Dynamo handed truthfuse no graph: this call ran as plain PyTorch (Dynamo skipped the code, "
                         "or graph breaks left no operation to compile; TORCH_LOGS=graph_breaks shows why)")
        elif not self.sites:
            lines.append("no attention or feed-forward site was found; the graph compiled as under the inner compiler")
        return "\n".join(lines)

    __repr__ = __str__


def _short_path(location: str) -> str:
    if ":" not in location:
        return location
    path, _, line = location.rpartition(":")
    parts = path.split("/")
    return ("/".join(parts[-2:]) if len(parts) > 2 else path) + (f":{line}" if line else "")


def explain(model_or_fn: Any, *example_args: Any, options: Optional[Dict[str, Any]] = None,
            **example_kwargs: Any) -> Report:
    """Compile `model_or_fn` with truthfuse, run it once on the example inputs, and return a
    Report of every site found: its kind, variant, decision ("fused"/"kept"), reason and source
    location, plus the tuner's summary (`report.tuning.cache_hit`, `.measurements`)."""
    parsed = parse_options(options)
    _check_no_misplaced_options(model_or_fn, example_kwargs)
    backend = TruthfuseBackend(parsed)
    compiled = torch.compile(model_or_fn, backend=backend, **_ISOLATED)
    try:
        with _fail_on_recompile_limit(), _uncompiled_in_place(model_or_fn):
            compiled(*example_args, **example_kwargs)
    except _RECOMPILE_LIMIT_HIT as exc:
        raise RuntimeError(
            "truthfuse explain: Dynamo reached a recompile limit for this code (torch._dynamo.config."
            "recompile_limit / accumulated_recompile_limit), so it would run uncompiled and there would be "
            "nothing to report. Each explain() compiles anew; call torch._dynamo.reset() before explaining "
            "again, or raise the limit") from exc
    report = Report.from_records(backend.records)
    _mention_disabled_rules(report, parsed.disable)
    return report


def _check_no_misplaced_options(model: Any, example_kwargs: Dict[str, Any]) -> None:
    """explain(model, x, strategy="aggressive") passes strategy to the model, as it must (explain's
    keyword arguments are the model's): a model without such a parameter failed deep in Dynamo's
    trace with "forward() got an unexpected keyword argument 'strategy'", and one with **kwargs
    (Hugging Face models) took it silently and was explained under the default options. An option
    name that the model does not name as a parameter is that mistake: say where it goes."""
    from dataclasses import fields

    from .options import Options

    misplaced = [name for name in example_kwargs if name in {f.name for f in fields(Options)}]
    if not misplaced:
        return
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its forward is (*args, **kwargs)
    try:
        signature = inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model)
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return
    named = {name for name, p in signature.parameters.items()
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    misplaced = [name for name in misplaced if name not in named]
    if misplaced:
        given = ", ".join(f"{name!r}: {example_kwargs[name]!r}" for name in misplaced)
        what = "is a truthfuse option, not a parameter" if len(misplaced) == 1 else "are truthfuse options, not parameters"
        raise TypeError(f"truthfuse explain: {', '.join(misplaced)} {what} of the model; pass "
                        f"options={{{given}}} (explain's other keyword arguments go to the model; to give the "
                        f"model such an argument through its **kwargs, bind it with functools.partial)")


# Every explain() compiles with a backend of its own, so each call is a recompile of the same code
# for Dynamo. Its own region (torch >= 2.13) keeps those entries from counting against the user's
# compiled code, and the user's from counting against the next explain; the 9th explain of a
# function reported 0 graphs. torch._dynamo.reset() would do it too, but wipes everything the user
# compiled.
_ISOLATED = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}
_RECOMPILE_LIMIT_HIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())


@contextlib.contextmanager
def _uncompiled_in_place(model: Any):
    """A module compiled in place (`module.compile(...)`) runs its own compiled code when called,
    so explain's compile saw no graph and reported '0 graph(s), no site'. For the explaining call
    the module runs as written; its own compiled code is left as it is."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "_compiled_call_impl", None) is None:
        yield
        return
    own = model._compiled_call_impl
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = own


def _fail_on_recompile_limit():
    """Make Dynamo raise on a recompile limit (without isolation, or past the limit all regions
    share) instead of running the code uncompiled, which would read as "no site found"."""
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def _mention_disabled_rules(report: Report, disabled: Tuple[str, ...]) -> None:
    """Say on each kept site of a kind that lost rules to options["disable"] that they were
    disabled. Such a site is often listed under a sibling rule (the causal variant of a disabled
    dot rule, say) with that rule's near-miss reason, which alone reads as if the sibling were
    what stood in the way."""
    report.disabled = tuple(disabled)
    if not disabled:
        return
    from .match import all_rules

    kinds = {r.name: r.kind for r in all_rules()}
    by_kind: Dict[str, List[str]] = {}
    for name in disabled:
        by_kind.setdefault(kinds.get(name, name), []).append(name)
    for site in report.kept:
        names = by_kind.get(site.kind)
        if names:
            site.reason = f"{site.reason or 'kept'}; disabled by options: {', '.join(names)}"
