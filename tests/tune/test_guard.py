"""choose_plan: the strategies end to end, and the guard against fusing for no real win."""
import json

import pytest
from .synthetic_spaces import CountingCost

from fusion_backend.tune.mcts import TuningDecision, choose_plan
from fusion_backend.tune.space import KEEP, DecisionSpace, Option, Plan, SiteChoices


def _space():
    """One attention site (exact v0, inexact v1) and an FFN block conflicting with its piece."""
    attention = SiteChoices("attn", "attention",
                            [Option.keep(), Option("v0", "flash", "c0", True), Option("v1", "flash", "c1", False)])
    block = SiteChoices("ffn", "feedforward", [Option.keep(), Option("whole", "ffn", "c", True)], priority=2)
    piece = SiteChoices("gelu", "feedforward", [Option.keep(), Option("lg", "lg", "c", True)], priority=1)
    return DecisionSpace([attention, block, piece], [("ffn", "gelu")])


def _costs(attn, ffn_whole=2.0, gelu=1.0, keep=1.0):
    """evaluate with per-option costs for the attention site; by default fusing the FFN block (which
    replaces two pieces costing `keep` each) or its GELU piece neither wins nor loses."""
    table = {"attn": {KEEP: keep, **attn}, "ffn": {KEEP: 0.0, "whole": ffn_whole - 2 * keep},
             "gelu": {KEEP: keep, "lg": gelu}}

    def cost_of(plan):
        return table["attn"][plan["attn"]] + keep + table["ffn"][plan["ffn"]] + table["gelu"][plan["gelu"]]

    return CountingCost(cost_of)


def test_moderate_uses_a_clear_win():
    evaluate = _costs({"v0": 0.5, "v1": 0.4}, ffn_whole=2.5, gelu=1.2)
    decision = choose_plan(_space(), evaluate, "moderate", simulations=20)
    assert decision.plan == Plan({"attn": "v1", "ffn": KEEP, "gelu": KEEP})
    assert decision.fused and decision.speedup > 1.1
    assert decision.baseline_ms == pytest.approx(3.0)
    assert evaluate.plans[0] == _space().all_keep()
    assert "confirmed" in decision.reason


def test_guard_keeps_all_keep_when_the_best_is_within_noise():
    # The best fused plan is 2% faster: below the 3% margin, so nothing is fused.
    evaluate = _costs({"v0": 0.94, "v1": 0.95})
    decision = choose_plan(_space(), evaluate, "moderate", simulations=20)
    assert decision.plan == _space().all_keep()
    assert not decision.fused
    assert decision.best_plan["attn"] == "v0"  # the search's best is still reported
    assert "noise margin" in decision.reason
    # With a 1% margin the same 2% win is taken.
    loose = choose_plan(_space(), _costs({"v0": 0.94, "v1": 0.95}), "moderate", simulations=20,
                        noise_margin=0.01)
    assert loose.plan["attn"] == "v0"


def test_guard_keeps_all_keep_when_every_fusion_is_slower():
    decision = choose_plan(_space(), _costs({"v0": 1.5, "v1": 2.0}, ffn_whole=3.0, gelu=1.2), "moderate")
    assert decision.plan == _space().all_keep()
    assert decision.cost_ms == decision.baseline_ms


def test_guard_rejects_a_win_that_does_not_reproduce():
    calls = {"n": 0}
    fast_once = Plan({"attn": "v0", "ffn": KEEP, "gelu": KEEP})

    def noisy(plan):
        # v0 looks 20% faster the first time it is timed, and is as slow as keep afterwards.
        if plan == fast_once:
            calls["n"] += 1
            return 2.6 if calls["n"] == 1 else 3.0
        return 3.0 if plan == _space().all_keep() else 3.5

    decision = choose_plan(_space(), noisy, "moderate", simulations=20)
    assert decision.plan == _space().all_keep()
    assert "did not reproduce" in decision.reason
    assert calls["n"] == 2


def test_conservative_never_uses_inexact_options():
    evaluate = _costs({"v0": 0.7, "v1": 0.1})  # the inexact v1 would be far faster
    decision = choose_plan(_space(), evaluate, "conservative", simulations=20)
    assert decision.plan["attn"] == "v0"
    assert all(plan["attn"] != "v1" for plan in evaluate.plans)


def test_conservative_keeps_without_a_measured_win():
    decision = choose_plan(_space(), _costs({"v0": 1.0, "v1": 0.1}), "conservative", simulations=20)
    assert decision.plan == _space().all_keep()


def test_aggressive_fuses_everything_and_only_picks_variants():
    # Fusing is slower here, and aggressive fuses anyway: no guard.
    evaluate = _costs({"v0": 1.3, "v1": 1.2}, ffn_whole=2.5)
    decision = choose_plan(_space(), evaluate, "aggressive", simulations=20)
    assert decision.plan == Plan({"attn": "v1", "ffn": "whole", "gelu": KEEP})
    assert decision.baseline_ms is None
    assert all(plan["attn"] != KEEP and plan["ffn"] == "whole" for plan in evaluate.plans)
    assert "no guard" in decision.reason


def test_a_single_plan_is_not_measured():
    site = SiteChoices("attn", "attention", [Option.keep(), Option("v0", "flash", "c0", False)])
    evaluate = CountingCost(lambda plan: 1.0)
    decision = choose_plan(DecisionSpace([site]), evaluate, "conservative")
    assert evaluate.calls == 0 and decision.measurements == 0
    assert decision.plan == Plan({"attn": KEEP})


def test_measurements_count_every_evaluate_call():
    evaluate = _costs({"v0": 0.5, "v1": 0.4})
    decision = choose_plan(_space(), evaluate, simulations=6)
    assert decision.measurements == evaluate.calls <= 6 + 2  # search + confirmation


def test_decision_record_round_trips_through_json():
    decision = choose_plan(_space(), _costs({"v0": 0.5, "v1": 0.4}), simulations=10)
    record = json.loads(json.dumps(decision.to_record(), allow_nan=False))
    again = TuningDecision.from_record(record)
    assert again.plan == decision.plan and again.best_plan == decision.best_plan
    assert again.cost_ms == decision.cost_ms and again.measurements == decision.measurements
    assert [m.plan for m in again.history] == [m.plan for m in decision.history]


def test_decision_notes_round_trip_and_old_records_have_none():
    decision = choose_plan(_space(), _costs({"v0": 0.5, "v1": 0.4}), simulations=10)
    decision.notes = {"s0": "fused it was host-bound"}
    record = json.loads(json.dumps(decision.to_record(), allow_nan=False))
    assert TuningDecision.from_record(record).notes == {"s0": "fused it was host-bound"}
    del record["notes"]  # a cache entry written before notes existed
    assert TuningDecision.from_record(record).notes == {}


@pytest.mark.parametrize("field, value, named", [
    ("measurements", float("inf"), "measurements"),   # JSON's 1e999
    ("measurements", "3", "measurements"),
    ("notes", [], "notes"),
    ("notes", {"s0": 1}, "notes"),
    ("cost_ms", "x", "cost_ms"),
    ("cost_ms", float("nan"), "cost_ms"),
    ("baseline_ms", True, "baseline_ms"),
    ("plan", ["a"], "plan"),
    ("plan", [["attn", "v0"]], "plan"),
    ("plan", {"attn": 0}, "plan"),
    ("plan", None, "plan"),            # deleted below
    ("history", [[{}, 1.0]], "history"),
    ("history", [[{}, "x", 0.0]], "history[0] time"),
    ("failures", {"a": "b"}, "failures"),
    ("reason", None, "reason"),
])
def test_a_malformed_record_is_a_value_error_naming_the_field(field, value, named):
    record = choose_plan(_space(), _costs({"v0": 0.5, "v1": 0.4}), simulations=10).to_record()
    if field == "plan" and value is None:
        del record["plan"]
    else:
        record[field] = value
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        TuningDecision.from_record(record)


def test_failing_candidates_are_reported_and_never_chosen():
    inner = _costs({"v0": 0.5, "v1": 0.4}, ffn_whole=2.5, gelu=1.2)

    def evaluate(plan):
        if plan["attn"] == "v1":
            raise RuntimeError("kernel does not compile at these shapes")
        return inner(plan)

    decision = choose_plan(_space(), evaluate, simulations=20)
    assert decision.plan["attn"] == "v0"
    assert decision.failures and "does not compile" in decision.failures[0][1]
    again = TuningDecision.from_record(json.loads(json.dumps(decision.to_record())))
    assert again.failures == decision.failures


def test_a_failed_baseline_keeps_every_site_and_is_not_reusable():
    # Against an all-keep plan that cannot be timed (inf), any fused plan would "win".
    inner = _costs({"v0": 0.5, "v1": 0.4})

    def evaluate(plan):
        if plan == _space().all_keep():
            raise RuntimeError("inner compiler failed")
        return inner(plan)

    decision = choose_plan(_space(), evaluate, "moderate", simulations=20)
    assert decision.plan == _space().all_keep() and not decision.fused
    assert "baseline could not be timed" in decision.reason and "inner compiler failed" in decision.reason
    assert not decision.reusable


def test_a_baseline_that_fails_on_re_measurement_keeps_every_site():
    calls = {"keep": 0}
    inner = _costs({"v0": 0.5, "v1": 0.4})

    def evaluate(plan):
        if plan == _space().all_keep():
            calls["keep"] += 1
            if calls["keep"] > 1:
                raise RuntimeError("out of memory")
        return inner(plan)

    decision = choose_plan(_space(), evaluate, "moderate", simulations=20)
    assert decision.plan == _space().all_keep() and calls["keep"] == 2
    assert "failed on re-measurement" in decision.reason and "confirmed" not in decision.reason
    assert not decision.reusable


def test_only_decisions_on_working_timings_are_reusable():
    assert choose_plan(_space(), _costs({"v0": 0.5, "v1": 0.4}), simulations=10).reusable
    everything_fails = choose_plan(_space(), lambda plan: 1 / 0, "aggressive", simulations=5)
    assert not everything_fails.reusable


def test_bad_arguments():
    with pytest.raises(ValueError, match="conservative"):
        choose_plan(_space(), _costs({"v0": 1, "v1": 1}), "greedy")
    with pytest.raises(ValueError, match="noise_margin"):
        choose_plan(_space(), _costs({"v0": 1, "v1": 1}), noise_margin=1.5)
