"""Synthetic decision spaces with known costs, standing in for on-device timing in CPU tests.

The costs mimic what fusion timing looks like: mostly additive per site (each kernel is faster or
slower on its own), plus a few pairwise interactions between neighbouring sites (one kernel's
output layout helping or hurting the next), plus optional conflicts between a large site and the
smaller sites it covers.
"""
from __future__ import annotations

import random

from fusion_backend.tune.space import KEEP, DecisionSpace, Option, Plan, SiteChoices


class CountingCost:
    """evaluate(plan) for a synthetic space: looks costs up, counts calls, records plans."""

    def __init__(self, cost_of):
        self.cost_of = cost_of
        self.calls = 0
        self.plans: list[Plan] = []

    def __call__(self, plan: Plan) -> float:
        self.calls += 1
        self.plans.append(plan)
        return self.cost_of(plan)


def structured_space(seed: int, n_sites: int = 8, n_variants: int = 3, n_blocks: int = 1,
                     interactions: int = 4):
    """A space of `n_sites` small sites with keep + `n_variants` fused options each, plus
    `n_blocks` large sites, each conflicting with two neighbouring small sites.

    Returns (space, cost_of): cost_of(plan) is deterministic milliseconds.
    """
    rng = random.Random(seed)
    sites, option_cost, conflicts = [], {}, []
    for i in range(n_sites):
        site_id = f"s{i}"
        base = rng.uniform(0.5, 2.0)
        options = [Option.keep()]
        option_cost[(site_id, KEEP)] = base
        for v in range(n_variants):
            name = f"v{v}"
            options.append(Option(name, variant=f"var{v}", config=f"cfg{v}", exact=(v % 2 == 0)))
            option_cost[(site_id, name)] = base * rng.uniform(0.6, 1.15)
        sites.append(SiteChoices(site_id, "feedforward", options, priority=1))
    for b in range(n_blocks):
        first = rng.randrange(0, n_sites - 1)
        covered = (f"s{first}", f"s{first + 1}")
        site_id = f"block{b}"
        options = [Option.keep(), Option("whole", variant="block", config="cfg", exact=True)]
        # Keeping the block costs nothing extra (its pieces are counted by the small sites);
        # fusing it replaces the two pieces, which then keep, with one cheaper or dearer kernel.
        option_cost[(site_id, KEEP)] = 0.0
        pieces = option_cost[(covered[0], KEEP)] + option_cost[(covered[1], KEEP)]
        option_cost[(site_id, "whole")] = rng.uniform(0.5, 1.0) * pieces - pieces
        sites.append(SiteChoices(site_id, "feedforward", options, priority=2))
        conflicts += [(site_id, covered[0]), (site_id, covered[1])]
    pair_terms = {}
    for _ in range(interactions):
        i = rng.randrange(0, n_sites - 1)
        a = rng.choice([f"v{v}" for v in range(n_variants)])
        c = rng.choice([f"v{v}" for v in range(n_variants)])
        pair_terms[(f"s{i}", a, f"s{i + 1}", c)] = rng.uniform(-0.3, 0.3)

    def cost_of(plan: Plan) -> float:
        total = sum(option_cost[(site_id, name)] for site_id, name in plan.items())
        for (s1, a, s2, c), delta in pair_terms.items():
            if plan[s1] == a and plan[s2] == c:
                total += delta
        return total

    return DecisionSpace(sites, conflicts), cost_of


def optimum(space: DecisionSpace, cost_of) -> tuple[Plan, float]:
    """The best plan by brute force (small spaces only)."""
    best = min(space.enumerate(), key=cost_of)
    return best, cost_of(best)


def config_space(seed: int, n_sites: int = 1, shared: bool = True):
    """Sites whose fused options are launch configs, like the attention kernels' (144 each):
    BLOCK_M x BLOCK_N x num_warps x num_stages x 4 backward tiles, named like
    "m128n64w4s3-b2".

    A config's time is the site's keep time scaled by per-parameter effects (mostly separable, as
    tile sizes tend to be), one BLOCK_M x BLOCK_N interaction, and a small per-config jitter.
    With `shared`, every site draws its effects from the same model (same shapes, as in the
    layers of one transformer) plus a small per-site perturbation.

    Returns (space, cost_of).
    """
    rng = random.Random(seed)
    values = {"m": (64, 128), "n": (32, 64, 128), "w": (4, 8), "s": (2, 3, 4), "b": (0, 1, 2, 3)}

    def draw_effects(r):
        effects = {(p, v): r.uniform(-0.12, 0.12) for p, vs in values.items() for v in vs}
        pair = {(m, n): r.uniform(-0.06, 0.06) for m in values["m"] for n in values["n"]}
        return effects, pair

    common = draw_effects(rng)
    sites, table = [], {}
    for i in range(n_sites):
        site_id = f"attn{i}"
        effects, pair = common if shared else draw_effects(rng)
        if shared:
            effects = {k: v + rng.uniform(-0.02, 0.02) for k, v in effects.items()}
        base = rng.uniform(0.5, 2.0)
        options = [Option.keep()]
        table[(site_id, KEEP)] = base
        for m in values["m"]:
            for n in values["n"]:
                for w in values["w"]:
                    for s in values["s"]:
                        for b in values["b"]:
                            config = f"m{m}n{n}w{w}s{s}-b{b}"
                            scale = 0.9 + sum(effects[(p, v)] for p, v in
                                              (("m", m), ("n", n), ("w", w), ("s", s), ("b", b)))
                            scale += pair[(m, n)] + rng.uniform(-0.02, 0.02)
                            table[(site_id, f"fuse:{config}")] = base * max(scale, 0.2)
                            options.append(Option(f"fuse:{config}", "flash", config, True))
        sites.append(SiteChoices(site_id, "attention", options, group="flash:shape" if shared else None))

    def cost_of(plan: Plan) -> float:
        return sum(table[(site_id, name)] for site_id, name in plan.items())

    return DecisionSpace(sites), cost_of
