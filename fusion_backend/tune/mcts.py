"""Searching the decision space with on-device measurements, and the guard that picks the plan.

`evaluate(plan) -> float` is the expensive part: it compiles the plan and times it on the device
(median milliseconds). Every search here therefore memoizes it (a full plan is measured at most
once), counts distinct measurements against the budget, and measures the all-keep plan first when
the space has one, so every result carries the baseline it must beat.

`mcts_search` is Monte Carlo tree search in which each tree level decides one site, in a fixed
order: descending `priority`, then the space's order (see `_in_tree_order`). Beyond plain UCT it
uses what matters at budgets of a few dozen measurements:
- RAVE / all-moves-as-first statistics: every measurement also updates a running value for each
  (site, option) it contains, and for the option's variant and launch-config features (tile sizes,
  warps, stages read from the config string). Fusion decisions are close to additive (a site's
  kernel is mostly faster or slower on its own) and tile parameters mostly separable, so these
  values are informative long before the tree is deep. They are blended into the UCT score and
  guide expansion and rollouts: untried variants and parameter values first, then mostly the
  best-valued option, sometimes a random one. Sites of one `group` pool their feature values.
- Progressive widening: a node gets about sqrt(visits) children, so a site with a hundred launch
  configs does not spend the whole budget on the tree's first level.
- Rewards are log(reference / cost) (scale-free: 10% faster is +0.1 whatever the model), and node
  values are min-max normalized over the rewards seen so far before UCT's exploration term is
  added, so one exploration constant works for microsecond and second-long graphs alike. A node's
  value mixes its mean and its best reward, because the goal is the best plan, not the best
  average.
"""
from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .progress import TuningProgress
from .space import DEFAULT_STRATEGY, KEEP, DecisionSpace, Plan, restrict

Evaluate = Callable[[Plan], float]

_log = logging.getLogger("truthfuse")

# Rewards are log-ratios clipped to +-1 (2.7x slower or faster than the reference); a plan whose
# evaluation failed (inf or nan cost) gets the floor, so it is avoided without distorting the rest.
_REWARD_LIMIT = 1.0
# UCT exploration weight on min-max normalized values in [0, 1].
_EXPLORATION = 0.4
# RAVE equivalence parameter: how many visits a node needs before its own value outweighs the
# (site, option) statistics; beta = sqrt(k / (3 n + k)) as in Gelly & Silver (2011).
_RAVE_EQUIVALENCE = 20.0
# Weight of a node's best reward against its mean reward.
_MAX_BACKUP_WEIGHT = 0.5
# Rollout attempts at finding a plan not yet measured, with rising randomness.
_ROLLOUT_ATTEMPTS = 8
# Progressive widening: a node may have about _WIDEN_COEF * visits ** _WIDEN_EXPONENT children.
_WIDEN_COEF = 1.0
_WIDEN_EXPONENT = 0.5


@dataclass(frozen=True)
class Measurement:
    """One distinct plan measured during a search, in the order measured."""

    plan: Plan
    cost_ms: float
    seconds: float  # since the search started


@dataclass
class SearchResult:
    """What a search found.

    best_plan / best_cost: the fastest plan measured (cost in ms, as `evaluate` returned it).
    baseline_cost: the all-keep plan's cost; None when the space has no all-keep plan.
    measurements: distinct calls to `evaluate`.
    seconds: wall time of the whole search, measurements included.
    history: every measurement in order.
    failures: (plan, error) for each plan whose evaluation raised; those count as measured with
        an infinite cost.
    """

    best_plan: Plan
    best_cost: float
    baseline_cost: float | None
    measurements: int
    seconds: float
    history: list[Measurement] = field(default_factory=list)
    failures: list[tuple[Plan, str]] = field(default_factory=list)


class _BudgetExhausted(Exception):
    """Internal: the search may not start another measurement."""


class _Measurer:
    """Memoized, budgeted, timed access to `evaluate`."""

    def __init__(self, evaluate: Evaluate, max_measurements: int | None,
                 time_budget_s: float | None, progress: TuningProgress):
        self.evaluate = evaluate
        self.max_measurements = max_measurements
        self.time_budget_s = time_budget_s
        self.progress = progress
        self.costs: dict[Plan, float] = {}
        self.history: list[Measurement] = []
        self.failures: list[tuple[Plan, str]] = []
        self.start = time.perf_counter()
        self.best_plan: Plan | None = None
        self.best_cost = math.inf

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def can_measure(self) -> bool:
        if self.max_measurements is not None and len(self.costs) >= self.max_measurements:
            return False
        # The first measurement (the all-keep baseline) is made whatever the time cap: a cap of a
        # few microseconds, which options accept as positive, had passed before it and the search
        # raised "measured nothing", failing the compile.
        return self.time_budget_s is None or not self.costs or self.elapsed() < self.time_budget_s

    def measured(self, plan: Plan) -> bool:
        return plan in self.costs

    def cost(self, plan: Plan) -> float:
        """The plan's cost, measuring it if new; _BudgetExhausted if new and over budget."""
        if plan in self.costs:
            return self.costs[plan]
        if not self.can_measure():
            raise _BudgetExhausted
        cost = _evaluate_safely(self.evaluate, plan, self.failures)
        self.costs[plan] = cost
        self.history.append(Measurement(plan, cost, self.elapsed()))
        if cost < self.best_cost or self.best_plan is None:
            self.best_plan, self.best_cost = plan, cost
        self.progress.update(self.best_cost if math.isfinite(self.best_cost) else None)
        return cost

    def result(self, baseline: Plan | None) -> SearchResult:
        if self.best_plan is None:
            raise ValueError("the search measured nothing: the budget allows no measurement")
        baseline_cost = self.costs.get(baseline) if baseline is not None else None
        return SearchResult(self.best_plan, self.best_cost, baseline_cost, len(self.costs),
                            self.elapsed(), list(self.history), list(self.failures))


def _evaluate_safely(evaluate: Evaluate, plan: Plan, failures: list[tuple[Plan, str]]) -> float:
    """evaluate(plan), with an exception turned into an infinite cost.

    A candidate that fails to compile or run (a kernel's resource limit at these shapes, an
    inner-compiler error on the rewritten graph) must cost the user a slower plan, not the
    compile. The error is logged and kept on the result for explain().
    """
    try:
        value = evaluate(plan)
    except Exception as error:  # noqa: BLE001 -- any failure of a candidate is the same to us
        message = f"{type(error).__name__}: {error}"
        failures.append((plan, message))
        _log.warning("truthfuse: tuning candidate %s failed (%s); treating it as infinitely slow",
                     plan.to_json(), message)
        return math.inf
    return _checked_cost(value, plan)


def _checked_cost(value: float, plan: Plan) -> float:
    cost = float(value)
    if math.isnan(cost):
        return math.inf
    if cost < 0:
        raise ValueError(f"evaluate returned a negative time ({cost}) for {plan!r}")
    return cost


def _check_budget(simulations: int | None, time_budget_s: float | None) -> None:
    if simulations is not None and (not isinstance(simulations, int) or simulations < 1):
        raise ValueError(f"simulations must be a positive int, got {simulations!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time_budget_s must be positive, got {time_budget_s!r}")


def _baseline_of(space: DecisionSpace) -> Plan | None:
    return space.all_keep() if space.has_all_keep() else None


def _first_plans(space: DecisionSpace) -> list[Plan]:
    """Plans every search measures first: the baseline, when the space has one."""
    baseline = _baseline_of(space)
    return [baseline] if baseline is not None else []


def _check_space(space: DecisionSpace) -> None:
    if space.size() == 0:
        raise ValueError("the decision space has no valid plan (two conflicting sites must both fuse)")


# -- Monte Carlo tree search -----------------------------------------------------------------


class _Node:
    """A partial plan: sites [0, depth) decided along the path from the root."""

    __slots__ = ("depth", "choice", "parent", "children", "untried", "visits", "reward_sum",
                 "best_reward", "exhausted")

    def __init__(self, depth: int, choice: str | None, parent: _Node | None, untried: list[str]):
        self.depth = depth
        self.choice = choice
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.untried = untried
        self.visits = 0
        self.reward_sum = 0.0
        self.best_reward = -math.inf
        # True once every plan below this node has been measured: nothing left to learn there.
        self.exhausted = False


class _MinMax:
    """Running bounds of the rewards seen, to map values into [0, 1] for UCT."""

    def __init__(self):
        self.low = math.inf
        self.high = -math.inf

    def add(self, reward: float) -> None:
        self.low = min(self.low, reward)
        self.high = max(self.high, reward)

    def normalize(self, value: float) -> float:
        if self.high <= self.low:
            return 0.5
        return min(1.0, max(0.0, (value - self.low) / (self.high - self.low)))


_CONFIG_PART = re.compile(r"([A-Za-z_]+)=?(\d+)")


def _config_features(config: str | None) -> list[str]:
    """Launch-config parameters read from an option's config string, e.g. "m128n64w4s3-bm64n64"
    or "BLOCK_M=128,num_warps=4" give one feature per (segment, name, value).

    The config stays opaque to everything else; the features only let measurements of one config
    inform the guess for others that share a tile size or warp count. Strings without that shape
    give a single feature (the string itself), which is just the option again.
    """
    if not config:
        return []
    features = []
    for index, segment in enumerate(re.split(r"[-:,;/ ]+", config)):
        pairs = _CONFIG_PART.findall(segment)
        if pairs and "".join(f"{n}{v}" for n, v in pairs) == segment.replace("=", ""):
            features += [f"{index}.{name}={value}" for name, value in pairs]
        elif segment:
            features.append(f"{index}={segment}")
    return features


class _MonteCarloTreeSearch:
    """The tree, the statistics, and one select-expand-rollout-measure-backup step (`iterate`)."""

    def __init__(self, space: DecisionSpace, measurer: _Measurer, rng: random.Random):
        self.space = space
        self.measurer = measurer
        self.rng = rng
        self.n_sites = len(space.sites)
        self.site_ids = space.site_ids
        self.reference: float | None = None
        self.bounds = _MinMax()
        # RAVE statistics per (site index, token): [count, reward sum]. An option's tokens are its
        # name, its variant and its config's features (see _option_tokens).
        self.amaf: dict[tuple[int | str, str], list[float]] = {}
        self.tokens = [{o.name: self._option_tokens(o) for o in site.options} for site in space.sites]
        # Sites of one group (same rule and shapes) also pool their variant and config statistics,
        # keyed by the group name instead of a site index.
        self.group = [None if site.group is None else f"group={site.group}" for site in space.sites]
        self.root = _Node(0, None, None, self._allowed(0, {}))

    # rewards

    def reward(self, cost: float) -> float:
        if not math.isfinite(cost):
            return -_REWARD_LIMIT
        if self.reference is None:
            self.reference = cost if cost > 0 else 1e-9
        ratio = math.log(self.reference / max(cost, 1e-12))
        return max(-_REWARD_LIMIT, min(_REWARD_LIMIT, ratio))

    @staticmethod
    def _option_tokens(option) -> list[str]:
        tokens = [f"option={option.name}"]
        if option.fused:
            tokens.append(f"variant={option.variant}")
            tokens += [f"config.{feature}" for feature in _config_features(option.config)]
        return tokens

    def learn(self, plan: Plan, reward: float) -> None:
        """Fold a new measurement into the global statistics (once per distinct plan)."""
        self.bounds.add(reward)
        for i, site_id in enumerate(self.site_ids):
            for token in self.tokens[i][plan[site_id]]:
                stats = self.amaf.setdefault((i, token), [0.0, 0.0])
                stats[0] += 1
                stats[1] += reward
                if self.group[i] is not None and not token.startswith("option="):
                    stats = self.amaf.setdefault((self.group[i], token), [0.0, 0.0])
                    stats[0] += 1
                    stats[1] += reward

    def token_mean(self, site_index: int, token: str) -> float | None:
        stats = self.amaf.get((site_index, token))
        if not stats:
            return None
        return stats[1] / stats[0]

    def amaf_value(self, site_index: int, option: str) -> float | None:
        """Mean reward of the measured plans that chose `option` at this site."""
        return self.token_mean(site_index, f"option={option}")

    def option_value(self, site_index: int, option: str) -> float | None:
        """The best guess of an option's value: its own statistics once it was measured, else the
        mean over its variant and config features (at this site, else over the site's group).
        None while any of those is unseen, so that untried tile sizes, warp counts and variants
        are tried before the guesses are trusted."""
        own = self.amaf_value(site_index, option)
        if own is not None:
            return own
        parts = [self.token_mean(site_index, t) for t in self.tokens[site_index][option][1:]]
        if parts and all(p is not None for p in parts):
            return sum(parts) / len(parts)
        if self.group[site_index] is not None:
            # Nothing yet at this site: borrow what sites of the same group have taught.
            parts = [self.token_mean(self.group[site_index], t) for t in self.tokens[site_index][option][1:]]
            if parts and all(p is not None for p in parts):
                return sum(parts) / len(parts)
        return None

    # tree policy

    def _allowed(self, site_index: int, partial: dict[str, str]) -> list[str]:
        if site_index >= self.n_sites:
            return []
        return self.space.allowed_options(site_index, partial)

    def node_score(self, parent: _Node, child: _Node) -> float:
        mean = child.reward_sum / child.visits
        own = (1 - _MAX_BACKUP_WEIGHT) * mean + _MAX_BACKUP_WEIGHT * child.best_reward
        value = self.bounds.normalize(own)
        amaf = self.amaf_value(parent.depth, child.choice)
        if amaf is not None:
            beta = math.sqrt(_RAVE_EQUIVALENCE / (3 * child.visits + _RAVE_EQUIVALENCE))
            value = (1 - beta) * value + beta * self.bounds.normalize(amaf)
        exploration = _EXPLORATION * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)
        return value + exploration

    def may_widen(self, node: _Node) -> bool:
        """Progressive widening: whether `node` may get another child now.

        A node with many options (a site with dozens of launch configs) would otherwise spend the
        whole budget expanding its children one measurement each, and the tree would never get
        past its first level. Allowing about sqrt(visits) children keeps it growing in depth
        along the best branches; a node whose children are all exhausted may always widen.
        """
        if not node.untried:
            return False
        live = [c for c in node.children.values() if not c.exhausted]
        limit = max(1, math.ceil(_WIDEN_COEF * node.visits ** _WIDEN_EXPONENT))
        return not live or len(node.children) < limit

    def select_child(self, node: _Node) -> _Node | None:
        best, best_score = None, -math.inf
        for child in node.children.values():
            if child.exhausted:
                continue
            score = self.node_score(node, child)
            if score > best_score:
                best, best_score = child, score
        return best

    def pick_untried(self, node: _Node) -> str:
        """The untried option with the best (site, option) value; unseen options come first."""
        return self.greedy_choice(node.depth, node.untried)

    def greedy_choice(self, site_index: int, names: list[str]) -> str:
        values = [self.option_value(site_index, name) for name in names]
        unseen = [name for name, v in zip(names, values) if v is None]
        if unseen:
            return self.rng.choice(unseen)
        top = max(values)
        return self.rng.choice([name for name, v in zip(names, values) if v == top])

    # rollout

    def rollout(self, partial: dict[str, str], depth: int) -> Plan:
        """Complete `partial` from site `depth` on, preferring a plan not measured yet."""
        plan = None
        for attempt in range(_ROLLOUT_ATTEMPTS):
            # First attempts follow the statistics; later ones are increasingly random, to find an
            # unmeasured plan once the greedy completions have all been measured.
            randomness = min(1.0, 0.2 + attempt / (_ROLLOUT_ATTEMPTS - 1))
            completed = dict(partial)
            for i in range(depth, self.n_sites):
                names = self.space.allowed_options(i, completed)
                if self.rng.random() < randomness:
                    name = self.rng.choice(names)
                else:
                    name = self.greedy_choice(i, names)
                completed[self.site_ids[i]] = name
            plan = Plan(completed)
            if not self.measurer.measured(plan):
                break
        return plan

    # one iteration

    def iterate(self) -> None:
        node, partial = self.root, {}
        while node.depth < self.n_sites and not self.may_widen(node):
            child = self.select_child(node)
            if child is None:  # every child exhausted; the exhaustion flag is set on backup
                break
            node = child
            partial[self.site_ids[node.depth - 1]] = node.choice
        if node.depth < self.n_sites and node.untried and self.may_widen(node):
            choice = self.pick_untried(node)
            node.untried.remove(choice)
            partial[self.site_ids[node.depth]] = choice
            child = _Node(node.depth + 1, choice, node, self._allowed(node.depth + 1, partial))
            node.children[choice] = child
            node = child
        plan = self.rollout(partial, node.depth)
        new = not self.measurer.measured(plan)
        cost = self.measurer.cost(plan)  # may raise _BudgetExhausted
        reward = self.reward(cost)
        if new:
            self.learn(plan, reward)
        if node.depth == self.n_sites:
            node.exhausted = True
        self.backup(node, reward)

    def backup(self, node: _Node, reward: float) -> None:
        while node is not None:
            node.visits += 1
            node.reward_sum += reward
            node.best_reward = max(node.best_reward, reward)
            if (not node.exhausted and not node.untried and node.depth < self.n_sites
                    and all(child.exhausted for child in node.children.values())):
                node.exhausted = True
            node = node.parent

    def seed_with(self, plan: Plan) -> None:
        """Measure a plan outside the tree (the baseline), so its statistics guide the search."""
        cost = self.measurer.cost(plan)
        self.learn(plan, self.reward(cost))


def _in_tree_order(space: DecisionSpace) -> DecisionSpace:
    """The same space with sites in the order the tree decides them: descending priority, then
    declaration order. Larger matches come first, so a whole block's fuse-or-keep is decided
    before its pieces'; decided the other way round, fusing the pieces (often good on their own)
    would block the block in most rollouts and the search would rarely see it fused."""
    ordered = sorted(space.sites, key=lambda site: -site.priority)  # stable: ties keep their order
    return DecisionSpace(ordered, list(space.conflicts))


SiteCost = Callable[[str, str], float]


def greedy_plan(space: DecisionSpace, site_cost: SiteCost) -> Plan | None:
    """The plan an additive cost model says is best, or None if it builds no valid plan.

    site_cost(site_id, option_name) -> milliseconds that site takes with that option (the
    backend's per-site timings). Each site takes its cheapest option; of conflicting sites, the
    one whose cheapest option saves more against its "keep" fuses first, and the others keep. When
    the plan's cost is the sum of its sites' (as the backend prices it) this is the optimum up to
    conflicts: a search seeded with it need not rediscover per site what each site's timings say.
    """
    best: dict[str, str] = {}
    saving: dict[str, float] = {}
    for site in space.sites:
        costs = {name: site_cost(site.site_id, name) for name in site.option_names}
        name = min(costs, key=lambda n: (costs[n], n != KEEP))  # ties keep
        best[site.site_id] = name
        saving[site.site_id] = costs.get(KEEP, math.inf) - costs[name]
    partners: dict[str, set] = {s.site_id: set() for s in space.sites}
    for a, b in space.conflicts:
        partners[a].add(b)
        partners[b].add(a)
    plan: dict[str, str] = {}
    for sid in sorted(best, key=lambda sid: -saving[sid]):
        fused_partner = any(plan.get(other, KEEP) != KEEP for other in partners[sid])
        plan[sid] = KEEP if fused_partner and space.site(sid).has_keep else best[sid]
    plan = Plan(plan)
    return plan if space.is_valid(plan) else None


def mcts_search(space: DecisionSpace, evaluate: Evaluate, *, simulations: int = 30,
                time_budget_s: float | None = None, seed: int = 0,
                progress: bool | None = None, seeds: tuple = ()) -> SearchResult:
    """Monte Carlo tree search for the fastest plan in `space`.

    evaluate(plan) -> median milliseconds on the device; called at most once per distinct plan
        and at most `simulations` times in all. Return math.inf for a plan that cannot run.
    simulations: the measurement budget (distinct plans measured, the all-keep baseline included).
    time_budget_s: stop starting new measurements once this many seconds have passed (a
        measurement already running is not interrupted).
    seed: all random choices come from random.Random(seed), so a search is reproducible given
        the same costs (a time budget can still cut it at a different point).
    progress: None draws a bar only on a terminal with logging on; True/False force it.
    seeds: plans to measure right after the baseline (e.g. `greedy_plan`), counted in the
        budget; their statistics guide the search like every other measurement.

    The search ends early when every valid plan has been measured.
    """
    _check_budget(simulations, time_budget_s)
    _check_space(space)
    with TuningProgress(min(simulations, space.size()), "truthfuse MCTS", progress) as bar:
        measurer = _Measurer(evaluate, simulations, time_budget_s, bar)
        search = _MonteCarloTreeSearch(_in_tree_order(space), measurer, random.Random(seed))
        # Each iteration adds a tree node or measures a plan, and the tree is finite, so the loop
        # ends; the cap only guards against pathological spaces where rollouts keep repeating.
        max_iterations = 20 * simulations + 10 * max(1, len(space.sites)) + 100
        try:
            for plan in _first_plans(space) + [p for p in seeds if p is not None and space.is_valid(p)]:
                if not measurer.measured(plan):
                    search.seed_with(plan)
            iterations = 0
            while not search.root.exhausted and measurer.can_measure():
                iterations += 1
                if iterations > max_iterations:
                    break
                search.iterate()
        except _BudgetExhausted:
            pass
        return measurer.result(_baseline_of(space))


# -- baselines for comparison -----------------------------------------------------------------


def exhaustive_search(space: DecisionSpace, evaluate: Evaluate, *,
                      progress: bool | None = None) -> SearchResult:
    """Measure every valid plan (the all-keep plan first). Only for small spaces and benchmarks."""
    _check_space(space)
    size = space.size()
    with TuningProgress(size, "truthfuse exhaustive", progress) as bar:
        measurer = _Measurer(evaluate, None, None, bar)
        for plan in _first_plans(space):
            measurer.cost(plan)
        for plan in space.enumerate():
            measurer.cost(plan)
        return measurer.result(_baseline_of(space))


def random_search(space: DecisionSpace, evaluate: Evaluate, budget: int = 30, seed: int = 0, *,
                  time_budget_s: float | None = None, progress: bool | None = None) -> SearchResult:
    """Measure `budget` distinct random plans (the all-keep plan first, counted in the budget).

    Plans come from `DecisionSpace.random_plan`; repeats are skipped, not counted. When the budget
    covers the whole space this is the exhaustive search.
    """
    _check_budget(budget, time_budget_s)
    _check_space(space)
    size = space.size()
    rng = random.Random(seed)
    with TuningProgress(min(budget, size), "truthfuse random", progress) as bar:
        measurer = _Measurer(evaluate, budget, time_budget_s, bar)
        try:
            for plan in _first_plans(space):
                measurer.cost(plan)
            if budget >= size:
                for plan in space.enumerate():
                    measurer.cost(plan)
            else:
                misses = 0
                # Repeats are free but a nearly covered space could make them endless: give up
                # after many consecutive repeats.
                while measurer.can_measure() and misses < 1000:
                    plan = space.random_plan(rng)
                    if measurer.measured(plan):
                        misses += 1
                        continue
                    misses = 0
                    measurer.cost(plan)
        except _BudgetExhausted:
            pass
        return measurer.result(_baseline_of(space))


# -- the guard -----------------------------------------------------------------------------------


DEFAULT_NOISE_MARGIN = 0.03


@dataclass
class TuningDecision:
    """The plan the backend will compile, and why.

    plan: the chosen plan (all-keep unless a fused plan won beyond the noise margin).
    cost_ms / baseline_ms: the chosen plan's and the all-keep plan's measured times (mean of their
        measurements, confirmation included); None where not measured.
    best_plan / best_ms: the search's best plan, even when the guard rejected it.
    strategy, measurements (every evaluate call, confirmation included), seconds, reason: for
        explain() and logs.
    history: the search's measurements in order; failures: (plan, error) for candidates whose
        evaluation raised.
    notes: site id -> a note on that site's decision for explain() (the backend's host-bound
        note), kept with the decision in the cache.
    """

    plan: Plan
    cost_ms: float | None
    baseline_ms: float | None
    best_plan: Plan
    best_ms: float | None
    strategy: str
    measurements: int
    seconds: float
    reason: str
    history: list[Measurement] = field(default_factory=list)
    failures: list[tuple[Plan, str]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def fused(self) -> bool:
        """Whether the chosen plan fuses anything."""
        return bool(self.plan.fused_sites())

    @property
    def speedup(self) -> float | None:
        """baseline_ms / cost_ms, when both are known."""
        if self.cost_ms and self.baseline_ms is not None:
            return self.baseline_ms / self.cost_ms
        return None

    @property
    def reusable(self) -> bool:
        """Whether the decision may be cached and reused: neither the chosen plan's nor the
        baseline's measurement failed. A failure can be passing (a busy device, a bad option
        fixed before the next run), and a decision taken around it must be taken again."""
        return all(cost is None or math.isfinite(cost) for cost in (self.cost_ms, self.baseline_ms))

    def disagreement(self, guarded: bool) -> str | None:
        """Why this decision's plan is not the one its own record chose (a cache file whose plan
        was edited by hand), or None. `choose_plan` returns the search's best plan, or the all-keep
        plan at the baseline's time; under a guarded strategy (one with an all-keep plan) a fused
        plan only when it was faster. Its reason speaks of that plan: a file edited to fuse where
        the guard kept every site showed fused sites with 'cached: all-keep was the fastest plan
        measured'."""
        if not self.plan.fused_sites():
            agrees = self.cost_ms == self.baseline_ms
        else:
            agrees = self.plan == self.best_plan and (not guarded or (
                self.cost_ms is not None and self.baseline_ms is not None and self.cost_ms < self.baseline_ms))
        if agrees:
            return None
        return (f"its plan is not the one its record's timings chose (edited by hand?), which its reason "
                f"{self.reason!r} is about")

    def to_record(self) -> dict:
        """A JSON-ready dict for the tuning cache (non-finite times become None)."""
        return {
            "plan": self.plan.to_dict(),
            "cost_ms": _finite_or_none(self.cost_ms),
            "baseline_ms": _finite_or_none(self.baseline_ms),
            "best_plan": self.best_plan.to_dict(),
            "best_ms": _finite_or_none(self.best_ms),
            "strategy": self.strategy,
            "measurements": self.measurements,
            "seconds": self.seconds,
            "reason": self.reason,
            "history": [[m.plan.to_dict(), _finite_or_none(m.cost_ms), m.seconds]
                        for m in self.history],
            "failures": [[plan.to_dict(), message] for plan, message in self.failures],
            "notes": dict(self.notes),
        }

    @classmethod
    def from_record(cls, record: dict) -> TuningDecision:
        """Rebuild a decision from `to_record()`.

        Every field's type is checked here, the one place a record from disk turns into a
        decision: a malformed record (a missing field, a string for a time, an overflowing
        count) raises ValueError naming the field, never something that surfaces later.
        "history", "failures" and "notes" may be absent (records older than they are).
        """
        if not isinstance(record, dict):
            raise ValueError(f"the record is a {type(record).__name__}, not an object")
        history = [Measurement(_plan_in(entry[0], f"history[{i}] plan"),
                               math.inf if entry[1] is None else _time_in(entry[1], f"history[{i}] time"),
                               _time_in(entry[2], f"history[{i}] seconds"))
                   for i, entry in enumerate(_list_in(record, "history", length=3))]
        failures = [(_plan_in(entry[0], f"failures[{i}] plan"), _typed(entry[1], str, f"failures[{i}] message"))
                    for i, entry in enumerate(_list_in(record, "failures", length=2))]
        notes = _typed(record.get("notes", {}), dict, "notes")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in notes.items()):
            raise ValueError("notes must map site ids to strings")
        return cls(
            plan=_plan_in(_field(record, "plan"), "plan"),
            cost_ms=_optional_time_in(_field(record, "cost_ms"), "cost_ms"),
            baseline_ms=_optional_time_in(_field(record, "baseline_ms"), "baseline_ms"),
            best_plan=_plan_in(_field(record, "best_plan"), "best_plan"),
            best_ms=_optional_time_in(_field(record, "best_ms"), "best_ms"),
            strategy=_typed(_field(record, "strategy"), str, "strategy"),
            measurements=_count_in(_field(record, "measurements"), "measurements"),
            seconds=_time_in(_field(record, "seconds"), "seconds"),
            reason=_typed(_field(record, "reason"), str, "reason"),
            history=history,
            failures=failures,
            notes=dict(notes),
        )


# -- reading a record back: each helper raises ValueError naming the field -------------------------


def _field(record: dict, name: str):
    if name not in record:
        raise ValueError(f"no {name!r} field")
    return record[name]


def _typed(value, kind: type, where: str):
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{where} is {value!r}, not a {kind.__name__}")
    return value


def _plan_in(value, where: str) -> Plan:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{where} is {value!r}, not an object of site ids to option names")
    return Plan(value)


def _time_in(value, where: str) -> float:
    """A finite, non-negative number (JSON's 1e999 reads as inf and is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{where} is {value!r}, not a finite non-negative number")
    return float(value)


def _optional_time_in(value, where: str) -> float | None:
    return None if value is None else _time_in(value, where)


def _count_in(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} is {value!r}, not a count")
    return value


def _list_in(record: dict, name: str, length: int) -> list:
    """record[name] (absent: empty), a list of lists of `length` items each."""
    value = record.get(name, [])
    if not isinstance(value, list) or not all(isinstance(e, list) and len(e) == length for e in value):
        raise ValueError(f"{name} is not a list of {length}-item lists")
    return value


def _greedy_within(space: DecisionSpace, site_cost: SiteCost, time_budget_s: float | None,
                   started: float) -> Plan | None:
    """`greedy_plan` within the tuning time budget (None once it is spent); a site option whose
    timing fails costs inf."""
    def cost(site_id: str, option: str) -> float:
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            raise _BudgetExhausted
        try:
            return float(site_cost(site_id, option))
        except Exception as exc:  # noqa: BLE001 -- the search measures (and reports) it again
            _log.debug("site timing of %s %s failed: %s", site_id, option, exc)
            return math.inf

    try:
        return greedy_plan(space, cost)
    except _BudgetExhausted:
        return None


def _failure_of(plan: Plan, failures: list[tuple[Plan, str]]) -> str:
    """The last error recorded for `plan`, or why its time is not one."""
    for failed, message in reversed(failures):
        if failed == plan:
            return message
    return "no finite time measured"


_KEPT_WITHOUT_BASELINE = "every site kept, since a fused plan is used only when it beats a working baseline"


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def choose_plan(space: DecisionSpace, evaluate: Evaluate, strategy: str = DEFAULT_STRATEGY, *,
                simulations: int = 30, time_budget_s: float | None = None, seed: int = 0,
                noise_margin: float = DEFAULT_NOISE_MARGIN, confirm: bool = True,
                progress: bool | None = None, site_cost: SiteCost | None = None) -> TuningDecision:
    """Search the strategy's part of `space` and decide which plan to compile.

    site_cost: optional per-site timings (see `greedy_plan`); the search then measures the plan
    they say is best right after the baseline.

    The search (MCTS) always measures the all-keep plan first when the strategy allows it. The
    best fused plan is used only if it beats all-keep by more than `noise_margin` (relative: 0.03
    means at least 3% faster); with `confirm`, both plans are then measured once more and the win
    must hold again (the best of many noisy measurements is biased low). Otherwise the all-keep
    plan is returned: truthfuse must never make a model slower than the inner compiler.

    The two confirmation timings run even if `time_budget_s` is spent: safety over the cap.
    Under "aggressive" there is no all-keep plan and no guard: the fastest fused plan is used.
    A space with a single valid plan is returned without measuring anything.
    """
    if not 0 <= noise_margin < 1:
        raise ValueError(f"noise_margin must be in [0, 1), got {noise_margin!r}")
    restricted = restrict(space, strategy)
    strategy = strategy.strip().lower()
    _check_space(restricted)
    started = time.perf_counter()

    if restricted.size() == 1:
        only = next(restricted.enumerate())
        return TuningDecision(only, None, None, only, None, strategy, 0,
                              time.perf_counter() - started, "only one valid plan: nothing to tune")

    seeds = (_greedy_within(restricted, site_cost, time_budget_s, started),) if site_cost is not None else ()
    result = mcts_search(restricted, evaluate, simulations=simulations,
                         time_budget_s=time_budget_s, seed=seed, progress=progress, seeds=seeds)
    baseline = _baseline_of(restricted)
    best, best_cost = result.best_plan, result.best_cost

    def decision(plan, cost, base, measurements, reason, failures=result.failures):
        return TuningDecision(plan, cost, base, best, best_cost, strategy, measurements,
                              time.perf_counter() - started, reason, result.history, list(failures))

    if baseline is None:
        return decision(best, best_cost, None, result.measurements,
                        f"{strategy}: every site fused; fastest variants chosen (no guard)")

    baseline_cost = result.baseline_cost
    if _finite_or_none(baseline_cost) is None:
        # Without a working baseline there is nothing to beat: any fused plan would "win" against
        # inf, and the failure (a bad Inductor patch, an inner-compiler error) usually breaks the
        # fused plans' kept parts too. Keeping is the plan truthfuse can vouch for.
        return decision(baseline, baseline_cost, baseline_cost, result.measurements,
                        f"the all-keep baseline could not be timed ({_failure_of(baseline, result.failures)}); "
                        + _KEPT_WITHOUT_BASELINE)
    if best == baseline:
        return decision(baseline, baseline_cost, baseline_cost, result.measurements,
                        "all-keep was the fastest plan measured")
    threshold = 1 - noise_margin
    if not best_cost < baseline_cost * threshold:
        return decision(baseline, baseline_cost, baseline_cost, result.measurements,
                        f"best plan ({best_cost:.4g} ms) is not faster than all-keep "
                        f"({baseline_cost:.4g} ms) beyond the {noise_margin:.0%} noise margin")
    if not confirm:
        return decision(best, best_cost, baseline_cost, result.measurements,
                        f"fused plan {best_cost:.4g} ms vs all-keep {baseline_cost:.4g} ms")

    # Re-measure outside the memo: the confirmation must be a fresh timing.
    failures = list(result.failures)
    baseline_again = _evaluate_safely(evaluate, baseline, failures)
    best_again = _evaluate_safely(evaluate, best, failures)
    measurements = result.measurements + 2
    best_mean = _mean([best_cost, best_again])
    baseline_mean = _mean([baseline_cost, baseline_again])
    if _finite_or_none(baseline_again) is None:
        return decision(baseline, baseline_mean, baseline_mean, measurements,
                        f"the all-keep baseline failed on re-measurement ({_failure_of(baseline, failures)}); "
                        + _KEPT_WITHOUT_BASELINE,
                        failures)
    if best_again < baseline_again * threshold:
        return decision(best, best_mean, baseline_mean, measurements,
                        f"fused plan {best_mean:.4g} ms vs all-keep {baseline_mean:.4g} ms "
                        f"(win confirmed by a second measurement)", failures)
    return decision(baseline, baseline_mean, baseline_mean, measurements,
                    f"best plan's win did not reproduce: {best_again:.4g} ms vs all-keep "
                    f"{baseline_again:.4g} ms on re-measurement", failures)
