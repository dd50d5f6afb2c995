"""The decision space: validity, counting, enumeration, strategies."""
import itertools
import json
import random

import pytest

from fusion_backend.tune.space import KEEP, DecisionSpace, Option, Plan, SiteChoices, restrict


def _site(site_id, n_fused=2, exact=(True, False), priority=0, keep=True):
    options = [Option.keep()] if keep else []
    for v in range(n_fused):
        options.append(Option(f"v{v}", variant=f"var{v}", config=f"c{v}", exact=exact[v % len(exact)]))
    return SiteChoices(site_id, "attention", options, priority=priority)


def _brute_force_valid(space):
    """Valid plans by filtering the full product: the definition `enumerate` must match."""
    ids = space.site_ids
    for names in itertools.product(*[space.site(i).option_names for i in ids]):
        plan = Plan(dict(zip(ids, names)))
        if space.is_valid(plan):
            yield plan


def _ffn_space():
    """A whole FFN block conflicting with its Linear+GELU piece, plus an independent attention."""
    block = SiteChoices("ffn", "feedforward", [Option.keep(), Option("ffn_a", "ffn", "c1", True)], priority=2)
    piece = SiteChoices("linear_gelu", "feedforward",
                        [Option.keep(), Option("lg_a", "lg", "c1", False), Option("lg_b", "lg", "c2", True)],
                        priority=1)
    attention = _site("attn", n_fused=3)
    return DecisionSpace([block, piece, attention], [("linear_gelu", "ffn")])


def test_size_and_enumerate_match_the_definition():
    space = _ffn_space()
    expected = set(_brute_force_valid(space))
    listed = list(space.enumerate())
    assert len(listed) == len(set(listed))  # no plan twice
    assert set(listed) == expected
    # ffn x linear_gelu: keep/keep, keep/2 fused, fused/keep = 4; attention: 4 options
    assert space.size() == len(expected) == 4 * 4
    assert listed[0] == space.all_keep()


def test_size_with_chains_and_sites_without_keep():
    a, b, c = _site("a"), _site("b", keep=False), _site("c")
    space = DecisionSpace([a, b, c], [("a", "b"), ("b", "c")])
    # b must fuse (no keep), so a and c keep: 2 plans.
    assert space.size() == len(set(_brute_force_valid(space))) == 2
    assert not space.has_all_keep()
    with pytest.raises(ValueError, match="without a 'keep'"):
        space.all_keep()


def test_random_plans_are_valid_and_reproducible():
    a, b, c, d = _site("a"), _site("b", keep=False), _site("c"), _site("d", n_fused=1)
    space = DecisionSpace([a, b, c, d], [("a", "b"), ("b", "c"), ("c", "d")])
    plans = [space.random_plan(random.Random(s)) for s in range(50)]
    assert all(space.is_valid(p) for p in plans)
    assert plans == [space.random_plan(random.Random(s)) for s in range(50)]


def test_is_valid_rejects_unknown_sites_options_and_double_fusion():
    space = _ffn_space()
    good = Plan({"ffn": "ffn_a", "linear_gelu": KEEP, "attn": "v1"})
    assert space.is_valid(good)
    assert not space.is_valid(Plan({"ffn": "ffn_a", "linear_gelu": "lg_a", "attn": "v1"}))
    assert not space.is_valid(Plan({"ffn": "ffn_a", "linear_gelu": KEEP}))
    assert not space.is_valid(Plan({"ffn": "nope", "linear_gelu": KEEP, "attn": "v1"}))


def test_space_validation_errors():
    with pytest.raises(ValueError, match="duplicate site"):
        DecisionSpace([_site("a"), _site("a")])
    with pytest.raises(ValueError, match="unknown site"):
        DecisionSpace([_site("a")], [("a", "zzz")])
    with pytest.raises(ValueError, match="itself"):
        DecisionSpace([_site("a")], [("a", "a")])
    with pytest.raises(ValueError, match="no options"):
        DecisionSpace([SiteChoices("a", "attention", [])])
    with pytest.raises(ValueError, match="repeats"):
        DecisionSpace([SiteChoices("a", "attention", [Option.keep(), Option.keep()])])


def test_plan_is_hashable_and_round_trips_through_json():
    p = Plan({"b": "v1", "a": KEEP})
    q = Plan([("a", KEEP), ("b", "v1")])
    assert p == q and hash(p) == hash(q) and len({p, q}) == 1
    assert Plan.from_json(p.to_json()) == p
    assert Plan.from_json(json.loads(json.dumps(p.to_dict()))) == p
    assert p.fused_sites() == ["b"]
    with pytest.raises(TypeError):
        Plan({"a": 1})


def test_empty_space_has_one_plan():
    space = DecisionSpace([])
    assert space.size() == 1
    assert list(space.enumerate()) == [Plan({})]


def test_signature_changes_with_options():
    assert _ffn_space().signature() == _ffn_space().signature()
    other = DecisionSpace([_site("a", n_fused=1)])
    assert other.signature() != DecisionSpace([_site("a", n_fused=2)]).signature()


# -- strategies -------------------------------------------------------------------------------


def test_conservative_keeps_only_exact_options_and_keep():
    space = restrict(_ffn_space(), "conservative")
    assert space.site("linear_gelu").option_names == [KEEP, "lg_b"]
    assert space.site("attn").option_names == [KEEP, "v0", "v2"]  # v1 is inexact
    assert space.has_all_keep()
    assert all(o.exact for s in space.sites for o in s.options)


def test_moderate_keeps_everything_and_adds_keep_where_missing():
    original = _ffn_space()
    assert restrict(original, "moderate").size() == original.size()
    assert restrict(original).size() == original.size()  # moderate is the default
    no_keep = DecisionSpace([_site("a", keep=False)])
    assert restrict(no_keep, "moderate").site("a").option_names == [KEEP, "v0", "v1"]


def test_aggressive_fuses_every_site_and_prefers_priority_in_conflicts():
    space = restrict(_ffn_space(), "aggressive")
    assert space.site("ffn").option_names == ["ffn_a"]          # priority 2 wins
    assert space.site("linear_gelu").option_names == [KEEP]      # forced to keep
    assert space.site("attn").option_names == ["v0", "v1", "v2"]  # tuner picks the variant
    assert not space.has_all_keep()
    assert space.size() == 3
    assert all(space.is_valid(p) for p in space.enumerate())


def test_aggressive_greedy_chain_keeps_a_maximal_set_fused():
    a, b, c = _site("a", priority=3), _site("b", priority=2), _site("c", priority=1)
    space = restrict(DecisionSpace([a, b, c], [("a", "b"), ("b", "c")]), "aggressive")
    # a wins over b; b kept, so c no longer conflicts with a fused site and is fused too.
    assert space.site("a").option_names == ["v0", "v1"]
    assert space.site("b").option_names == [KEEP]
    assert space.site("c").option_names == ["v0", "v1"]


def test_aggressive_ties_go_to_the_earlier_site():
    a, b = _site("a"), _site("b")
    space = restrict(DecisionSpace([a, b], [("a", "b")]), "aggressive")
    assert space.site("a").option_names == ["v0", "v1"]
    assert space.site("b").option_names == [KEEP]


@pytest.mark.parametrize("bad", ["fast", "", None, 3, "aggresive"])
def test_unknown_strategy_names_the_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        restrict(_ffn_space(), bad)
    for name in ("conservative", "moderate", "aggressive"):
        assert name in str(info.value)


def test_strategy_names_are_case_insensitive():
    assert restrict(_ffn_space(), " Aggressive ").size() == 3


def test_size_matches_brute_force_on_random_conflict_graphs():
    for seed in range(60):
        rng = random.Random(seed)
        n = rng.randint(1, 6)
        sites = [_site(f"s{i}", n_fused=rng.randint(0, 2), keep=rng.random() < 0.85 or i == 0)
                 for i in range(n)]
        sites = [s if s.options else _site(s.site_id, n_fused=0) for s in sites]
        conflicts = [(f"s{a}", f"s{b}") for a in range(n) for b in range(a + 1, n) if rng.random() < 0.4]
        space = DecisionSpace(sites, conflicts)
        brute = list(_brute_force_valid(space))
        assert space.size() == len(brute) == len(list(space.enumerate())), seed


def test_size_of_a_long_chain_is_counted_without_enumerating():
    # 60 sites, each overlapping the next: 3^60-ish plans, counted instantly.
    sites = [_site(f"s{i}") for i in range(60)]
    space = DecisionSpace(sites, [(f"s{i}", f"s{i + 1}") for i in range(59)])
    # Each fused site (2 options) needs kept neighbours: a(n) = a(n-1) + 2 a(n-2).
    a, b = 1, 3  # zero sites, one site
    for _ in range(59):
        a, b = b, b + 2 * a
    assert space.size() == b
