"""The decision space the tuner searches: for every matched site, keep it or fuse it one way.

Rules and kernels declare the space (sites, their options, and which sites overlap); nothing here
knows about attention or feed-forward blocks beyond the `kind` label carried for reports.

Validity has one rule: of two conflicting sites, at most one is fused; the other is "keep".
Every search in this package builds plans site by site in the space's order and asks
`DecisionSpace.allowed_options` what the next site may take. That rule is written so that any
partial plan it allows can always be completed to a valid plan, so searches never dead-end.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

KEEP = "keep"
STRATEGIES = ("conservative", "moderate", "aggressive")
DEFAULT_STRATEGY = "moderate"


@dataclass(frozen=True)
class Option:
    """One way to handle a site.

    name: unique within the site; "keep" means the inner compiler handles the site unchanged.
    variant: the kernel variant a fused option uses (None for "keep").
    config: the launch config of that variant, as an opaque string the kernel understands.
    exact: whether the rewrite is numerically exact (same math, same rounding order up to what
        the reference itself guarantees); only exact options survive the "conservative" strategy.
    """

    name: str
    variant: str | None = None
    config: str | None = None
    exact: bool = False

    @property
    def fused(self) -> bool:
        """True for every option except "keep"."""
        return self.name != KEEP

    @classmethod
    def keep(cls) -> Option:
        """The option that leaves the site to the inner compiler (exact by definition)."""
        return cls(KEEP, None, None, True)


@dataclass(frozen=True)
class SiteChoices:
    """One matched site and the options the tuner may choose for it.

    priority: the larger match gets the higher priority (e.g. a whole feed-forward block over its
        Linear+GELU). The "aggressive" strategy fuses the higher one of a conflicting pair, and
        the search decides higher-priority sites first.
    group: optional; sites with the same group (say, one rule at the same shapes, as in the
        layers of a transformer) are expected to favour the same variants and launch configs, so
        the search lets what it measures at one inform its first guesses at the others.
    """

    site_id: str
    kind: str
    options: list[Option]
    priority: int = 0
    group: str | None = None

    def option(self, name: str) -> Option:
        """The option called `name`; KeyError if the site has none."""
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(f"site {self.site_id!r} has no option {name!r}")

    @property
    def option_names(self) -> list[str]:
        """Option names in declaration order."""
        return [option.name for option in self.options]

    @property
    def has_keep(self) -> bool:
        """Whether "keep" is among the options."""
        return any(not option.fused for option in self.options)

    @property
    def fused_options(self) -> list[Option]:
        """Every option except "keep"."""
        return [option for option in self.options if option.fused]


class Plan(Mapping):
    """An immutable, hashable mapping site_id -> option name: one complete decision.

    Equal plans hash equally whatever the insertion order, so plans serve as memo keys.
    """

    __slots__ = ("_choices", "_hash")

    def __init__(self, choices: Mapping[str, str] | Iterable[tuple[str, str]] = ()):
        items = dict(choices)
        for site_id, option_name in items.items():
            if not isinstance(site_id, str) or not isinstance(option_name, str):
                raise TypeError(f"a plan maps str to str, got {site_id!r}: {option_name!r}")
        self._choices = dict(sorted(items.items()))
        self._hash = hash(tuple(self._choices.items()))

    def __getitem__(self, site_id: str) -> str:
        return self._choices[site_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._choices)

    def __len__(self) -> int:
        return len(self._choices)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Plan):
            return self._hash == other._hash and self._choices == other._choices
        return super().__eq__(other)

    def __repr__(self) -> str:
        return f"Plan({self._choices!r})"

    def fused_sites(self) -> list[str]:
        """Site ids whose option is not "keep"."""
        return [site_id for site_id, name in self._choices.items() if name != KEEP]

    def to_dict(self) -> dict[str, str]:
        """A plain dict copy, ready for json.dumps."""
        return dict(self._choices)

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys), stable across runs."""
        return json.dumps(self._choices, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | Mapping[str, str]) -> Plan:
        """Rebuild a plan from `to_json()` text or from an already-parsed dict."""
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, Mapping):
            raise TypeError(f"a plan's JSON must be an object, got {type(data).__name__}")
        return cls(data)


@dataclass
class DecisionSpace:
    """All sites of one compiled graph and the pairs of sites whose fusions overlap.

    conflicts: pairs of site ids; at most one site of each pair may be fused, the other must keep.
    The order of `sites` is the order in which searches decide them.
    """

    sites: list[SiteChoices]
    conflicts: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.sites = list(self.sites)
        ids = [site.site_id for site in self.sites]
        if len(set(ids)) != len(ids):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"duplicate site ids: {duplicates}")
        for site in self.sites:
            if not site.options:
                raise ValueError(f"site {site.site_id!r} has no options")
            names = site.option_names
            if len(set(names)) != len(names):
                raise ValueError(f"site {site.site_id!r} repeats an option name: {names}")
            for option in site.options:
                if not option.fused and option.variant is not None:
                    raise ValueError(f"site {site.site_id!r}: 'keep' cannot name a variant")
        known = set(ids)
        pairs = set()
        for a, b in self.conflicts:
            if a not in known or b not in known:
                raise ValueError(f"conflict ({a!r}, {b!r}) names an unknown site")
            if a == b:
                raise ValueError(f"site {a!r} cannot conflict with itself")
            pairs.add((a, b) if a < b else (b, a))
        self.conflicts = sorted(pairs)
        self._index = {site_id: i for i, site_id in enumerate(ids)}
        # Neighbours by index: the constraint checks below run in every rollout step.
        self._partners: list[list[int]] = [[] for _ in self.sites]
        for a, b in self.conflicts:
            ia, ib = self._index[a], self._index[b]
            self._partners[ia].append(ib)
            self._partners[ib].append(ia)

    # -- lookups ---------------------------------------------------------------------------

    def site(self, site_id: str) -> SiteChoices:
        """The site called `site_id`; KeyError if unknown."""
        return self.sites[self._index[site_id]]

    @property
    def site_ids(self) -> list[str]:
        """Site ids in decision order."""
        return [site.site_id for site in self.sites]

    def partners(self, site_index: int) -> list[int]:
        """Indices of the sites that conflict with site number `site_index`."""
        return self._partners[site_index]

    # -- the one validity rule ---------------------------------------------------------------

    def allowed_options(self, site_index: int, partial: Mapping[str, str]) -> list[str]:
        """Option names site number `site_index` may take, given the decided sites in `partial`.

        A fused option is allowed only if no decided conflicting site is fused and every
        undecided conflicting site can still keep. That second condition is what guarantees the
        partial plan stays completable: a site without "keep" is never blocked by an earlier one.
        """
        site = self.sites[site_index]
        blocked = False
        for j in self._partners[site_index]:
            other = self.sites[j]
            decided = partial.get(other.site_id)
            if decided is None:
                if not other.has_keep:
                    blocked = True
                    break
            elif decided != KEEP:
                blocked = True
                break
        if blocked:
            return [option.name for option in site.options if not option.fused]
        return site.option_names

    def is_valid(self, plan: Mapping[str, str]) -> bool:
        """Whether `plan` decides exactly this space's sites, with known options, and no conflicting
        pair is fused twice."""
        if set(plan) != set(self._index):
            return False
        for site in self.sites:
            if plan[site.site_id] not in site.option_names:
                return False
        return all(plan[a] == KEEP or plan[b] == KEEP for a, b in self.conflicts)

    # -- whole-space views -------------------------------------------------------------------

    def has_all_keep(self) -> bool:
        """Whether every site may keep, i.e. the inner compiler's own plan is in the space."""
        return all(site.has_keep for site in self.sites)

    def all_keep(self) -> Plan:
        """The plan that fuses nothing: the baseline every other plan is measured against."""
        missing = [site.site_id for site in self.sites if not site.has_keep]
        if missing:
            raise ValueError(f"sites without a 'keep' option: {missing}")
        return Plan({site.site_id: KEEP for site in self.sites})

    def size(self) -> int:
        """The number of valid plans.

        Counted per connected group of conflicting sites, then multiplied, so a graph with many
        independent sites costs nothing to count.
        """
        total = 1
        for component in self._components():
            total *= self._count_component(component)
        return total

    def enumerate(self) -> Iterator[Plan]:
        """Every valid plan, each once, in a deterministic order (the first is all-keep when the
        space has it, because each site lists "keep" before its fused options when it has one)."""
        order = list(range(len(self.sites)))

        def options_in_order(i: int, partial: dict[str, str]) -> list[str]:
            names = self.allowed_options(i, partial)
            return sorted(names, key=lambda name: name != KEEP)

        def walk(depth: int, partial: dict[str, str]) -> Iterator[Plan]:
            if depth == len(order):
                yield Plan(partial)
                return
            site_id = self.sites[order[depth]].site_id
            for name in options_in_order(order[depth], partial):
                partial[site_id] = name
                yield from walk(depth + 1, partial)
                del partial[site_id]

        yield from walk(0, {})

    def random_plan(self, rng: random.Random) -> Plan:
        """A valid plan built site by site, each site taking a uniformly random allowed option."""
        partial: dict[str, str] = {}
        for i, site in enumerate(self.sites):
            names = self.allowed_options(i, partial)
            if not names:
                raise ValueError("the decision space has no valid plan")
            partial[site.site_id] = rng.choice(names)
        return Plan(partial)

    def signature(self) -> str:
        """A short stable hash of the sites, options and conflicts.

        Meant for the cache key: a cached plan is only reusable if the space it was chosen from is
        the same (new kernel variants or configs change the signature and force a retune).
        """
        payload = {
            "sites": [
                [s.site_id, s.kind, s.priority, [[o.name, o.variant, o.config, o.exact] for o in s.options]]
                for s in self.sites
            ],
            "conflicts": [list(pair) for pair in self.conflicts],
        }
        text = json.dumps(payload, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- helpers -----------------------------------------------------------------------------

    def _components(self) -> list[list[int]]:
        seen: set[int] = set()
        components = []
        for start in range(len(self.sites)):
            if start in seen:
                continue
            stack, component = [start], []
            seen.add(start)
            while stack:
                i = stack.pop()
                component.append(i)
                for j in self._partners[i]:
                    if j not in seen:
                        seen.add(j)
                        stack.append(j)
            components.append(sorted(component))
        return components

    def _count_component(self, component: list[int]) -> int:
        # Only fused-vs-keep matters for the constraint, so count per site as
        # (#keep options, #fused options) and backtrack over the binary choice.
        # The count of completions from position k depends only on which decided sites that still
        # have undecided partners (the frontier) are fused, so memoize on that: chains and other
        # thin conflict graphs count in linear time instead of 2^n.
        fused_count = {i: len(self.sites[i].fused_options) for i in component}
        keep_count = {i: int(self.sites[i].has_keep) for i in component}
        position = {i: k for k, i in enumerate(component)}
        last_partner = {i: max((position[j] for j in self._partners[i]), default=-1) for i in component}
        memo: dict[tuple[int, frozenset], int] = {}

        def count(k: int, fused: frozenset) -> int:
            if k == len(component):
                return 1
            fused = frozenset(i for i in fused if last_partner[i] >= k)
            state = (k, fused)
            if state in memo:
                return memo[state]
            i = component[k]
            total = keep_count[i] * count(k + 1, fused) if keep_count[i] else 0
            if fused_count[i] and not any(j in fused for j in self._partners[i]):
                total += fused_count[i] * count(k + 1, fused | {i})
            memo[state] = total
            return total

        return count(0, frozenset())


def restrict(space: DecisionSpace, strategy: str = DEFAULT_STRATEGY) -> DecisionSpace:
    """The part of `space` a strategy lets the tuner search.

    conservative: each site keeps "keep" plus its exact fused options only. Whether anything is
        fused is then decided by measurement (and the guard in `choose_plan`).
    moderate: every option; the tuner decides per site between keep and each fused option.
    aggressive: every site that has a fused option is fused. Sites are visited by descending
        priority (ties: declaration order); a site is fused unless a conflicting site was already
        chosen to be fused, in which case it can only keep. Fused sites lose "keep", so the tuner
        only chooses variants and launch configs.

    Under conservative and moderate "keep" is always allowed (added if a site lacked it), so the
    all-keep baseline is always in the restricted space.
    """
    strategy = _check_strategy(strategy)
    if strategy == "aggressive":
        return _restrict_aggressive(space)
    sites = []
    for site in space.sites:
        options = site.options
        if strategy == "conservative":
            options = [option for option in options if not option.fused or option.exact]
        if not any(not option.fused for option in options):
            options = [Option.keep(), *options]
        sites.append(replace(site, options=list(options)))
    return DecisionSpace(sites, list(space.conflicts))


def _restrict_aggressive(space: DecisionSpace) -> DecisionSpace:
    order = sorted(range(len(space.sites)), key=lambda i: (-space.sites[i].priority, i))
    fused: set[int] = set()
    for i in order:
        site = space.sites[i]
        if site.fused_options and not any(j in fused for j in space.partners(i)):
            fused.add(i)
    sites = []
    for i, site in enumerate(space.sites):
        options = site.fused_options if i in fused else [Option.keep()]
        sites.append(replace(site, options=list(options)))
    return DecisionSpace(sites, list(space.conflicts))


def _check_strategy(strategy: str) -> str:
    if not isinstance(strategy, str) or strategy.strip().lower() not in STRATEGIES:
        raise ValueError(
            f"unknown tuning strategy {strategy!r}: expected one of "
            '"conservative", "moderate", "aggressive"'
        )
    return strategy.strip().lower()
