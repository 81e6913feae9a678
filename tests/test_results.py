"""The verdict engine (pretrain_nb.results): each rule with data that satisfies it, data that rules it out
and data that cannot tell; its error rates by simulation (which the old `beats` fails); preconditions,
phrases, fingerprints and results.json."""

import json
import math

import numpy as np
import pytest

from pretrain_nb.core import PretrainNbError
from pretrain_nb.results import (
    INCONCLUSIVE,
    NOT_ASSESSED,
    NOT_LEARNED,
    NOT_REPRODUCED,
    REPRODUCED,
    RESULTS_KEYS,
    Paper,
    Precondition,
    _mean_se,
    all_of,
    any_of,
    beats,
    decide_effect,
    fingerprint,
    fit_predicts,
    held_out_error,
    judge,
    mean_above,
    mean_below,
    r_squared,
    simulate_verdicts,
    spread_below,
    start_run,
)

GOOD = {"new": [0.81, 0.83, 0.82], "old": [0.78, 0.80, 0.79]}
QUOTE = "It is better."


def better(min_effect=0.01, phrase="better", **kw):
    return beats("new", "old", min_effect=min_effect, phrase=phrase, **kw)


# --- the decision and its error rates ---------------------------------------------------------------


def old_beats(d):
    "The engine before issue 16: any mean gap <= 0 was 'not reproduced'."
    mean, se = _mean_se(d)
    if mean <= 0:
        return NOT_REPRODUCED
    return REPRODUCED if (d > 0).all() and mean > 2 * se else INCONCLUSIVE


def new_rule(min_effect):
    return lambda d: decide_effect(d, min_effect, "effect").verdict


def null_rates(decide):
    "Outcomes under no effect at all, 3 seeds, a minimum effect barely above zero."
    return simulate_verdicts(decide, 0.0, 3, draws=3000, seed=1)


def test_null_effect_three_seeds_errs_either_way_at_most_about_5_percent():
    rates = null_rates(new_rule(0.1))
    assert rates[REPRODUCED] <= 0.06 and rates[NOT_REPRODUCED] <= 0.075


def test_the_old_rule_fails_the_null_simulation():
    # the test above, applied to the old engine: half the outcomes are 'not reproduced'
    assert null_rates(old_beats)[NOT_REPRODUCED] > 0.4


def test_an_effect_at_the_declared_minimum_is_rarely_ruled_out():
    for n in (3, 5, 10):
        assert simulate_verdicts(new_rule(1.0), 1.0, n, draws=3000, seed=n)[NOT_REPRODUCED] <= 0.06


def test_an_effect_of_three_standard_errors_is_reproduced_in_most_draws():
    for n in (3, 5):
        rates = simulate_verdicts(new_rule(1.0), 3 / math.sqrt(n), n, draws=3000, seed=n)
        assert rates[REPRODUCED] > 0.55 and rates[NOT_REPRODUCED] < 0.02


def test_an_effect_well_below_the_minimum_is_ruled_out_with_enough_seeds():
    rates = simulate_verdicts(new_rule(1.0), 0.0, 10, draws=3000, seed=2)
    assert rates[NOT_REPRODUCED] > 0.8 and rates[REPRODUCED] < 0.06


def test_decide_effect_reports_effect_interval_n_and_test():
    v = decide_effect([0.03, 0.04, 0.035], 0.01, "gain", test="paired t-test")
    assert v.verdict == REPRODUCED
    assert "gain = +0.035" in v.detail and "n = 3" in v.detail and "paired t-test" in v.detail
    assert "interval [+0.02657, +0.04343]" in v.detail and "minimum effect 0.01" in v.detail


def test_significantly_wrong_direction_and_too_few_seeds():
    assert "wrong direction" in decide_effect([-0.05, -0.04, -0.06], 0.01, "gain").detail
    v = decide_effect([0.5, 0.6], 0.1, "gain")
    assert v.verdict == INCONCLUSIVE and "needs 3 seeds" in v.detail


# --- rules -------------------------------------------------------------------------------------------


def test_beats_three_ways():
    assert better()(GOOD).verdict == REPRODUCED
    assert beats("old", "new", min_effect=0.01)(GOOD).verdict == NOT_REPRODUCED
    # no gap and a steady one: the data rule out a gap of 1 point
    same = {"new": [0.775, 0.80, 0.79], "old": [0.78, 0.80, 0.79]}
    assert better()(same).verdict == NOT_REPRODUCED
    # DCL's gap of -0.0009 (2 SE 0.0033) and the same noise around +0.0004 now get the same verdict:
    # the sign of a gap within its noise decides nothing; the declared minimum effect does
    for gap in (-0.0009, 0.0004):
        arms = {"new": np.array([0.7001, 0.6999, 0.6973]) + 0.0009 + gap, "old": [0.7, 0.7, 0.7]}
        assert better(0.01)(arms).verdict == NOT_REPRODUCED  # a 1-point gain is ruled out either way
        assert better(0.001)(arms).verdict == INCONCLUSIVE  # a 0.1-point gain is not
    assert better()({"new": [0.81, 0.77, 0.84], "old": [0.78, 0.80, 0.79]}).verdict == INCONCLUSIVE


def test_beats_lower_is_better():
    loss = {"new": [2.0, 2.1, 2.05], "old": [2.3, 2.4, 2.35]}
    assert better(0.05, higher_is_better=False)(loss).verdict == REPRODUCED
    assert better(0.05, higher_is_better=True)(loss).verdict == NOT_REPRODUCED


def test_rules_need_a_declared_minimum_effect():
    with pytest.raises(TypeError):
        beats("new", "old")
    for bad in (0, -1, float("nan")):
        with pytest.raises(PretrainNbError, match="needs a minimum effect"):
            beats("new", "old", min_effect=bad)
    with pytest.raises(PretrainNbError, match="min_ratio above 1"):
        spread_below("a", "b", min_ratio=0.5)


def test_rule_errors():
    with pytest.raises(PretrainNbError, match="needs arm\\(s\\) baseline; the measured arms are: new, old"):
        beats("new", "baseline", min_effect=0.01)(GOOD)
    with pytest.raises(PretrainNbError, match="one value per seed"):
        better()({"new": [1, 2, 3], "old": [1, 2]})
    assert better()({"new": [np.nan, 1, 1], "old": [0, 0, 0]}).verdict == INCONCLUSIVE


def test_bounds_three_ways():
    below = mean_below("x", 0.05, min_effect=0.01)
    assert below({"x": [0.02, 0.03, 0.025]}).verdict == REPRODUCED
    assert below({"x": [0.09, 0.11, 0.10]}).verdict == NOT_REPRODUCED
    assert below({"x": [0.01, 0.09, 0.05]}).verdict == INCONCLUSIVE
    above = mean_above("x", 0.5, min_effect=0.05)
    assert above({"x": [0.7, 0.72, 0.71]}).verdict == REPRODUCED
    assert above({"x": [0.3, 0.32, 0.31]}).verdict == NOT_REPRODUCED


def _line(x, y):
    slope, intercept = np.polyfit(x, y, 1)
    return lambda x: slope * x + intercept


def test_fits_are_judged_on_held_out_points():
    x = np.arange(1, 9.0)
    straight = [2 * x + 1 + 0.01 * s for s in range(3)]
    bent = [2 * x + 0.3 * x**2 + 0.01 * s for s in range(3)]
    # a line through a parabola still has a high R^2 on its own points...
    assert r_squared(bent[0], _line(x, bent[0])(x)) > 0.95
    # ...but it mispredicts the held-out points
    rule = fit_predicts("error", 0.5, min_effect=0.1)
    assert rule({"error": held_out_error(_line, x, straight, 2)}).verdict == REPRODUCED
    assert rule({"error": held_out_error(_line, x, bent, 2)}).verdict == NOT_REPRODUCED
    with pytest.raises(PretrainNbError, match="n_held_out"):
        held_out_error(_line, x, straight, 7)


def test_spread_below_three_ways_and_its_power():
    steady = [0.70, 0.71, 0.70, 0.71, 0.70, 0.71, 0.70, 0.71, 0.705]
    shaky = [0.60, 0.72, 0.65, 0.75, 0.58, 0.70, 0.62, 0.74, 0.66]
    rule = spread_below("pre-trained", "scratch", min_ratio=1.5)
    v = rule({"pre-trained": steady, "scratch": shaky})
    assert v.verdict == REPRODUCED and "F-test" in v.detail
    assert rule({"pre-trained": shaky, "scratch": steady}).verdict == NOT_REPRODUCED
    # half the spread with 3 runs each: F with 2 and 2 degrees of freedom cannot tell either way
    assert rule({"pre-trained": [0.70, 0.71, 0.72], "scratch": [0.68, 0.70, 0.72]}).verdict == INCONCLUSIVE
    from scipy.stats import f as f_dist

    a, b = np.array(steady), np.array(shaky)
    lower = math.sqrt(b.var(ddof=1) / a.var(ddof=1) / f_dist.ppf(0.95, 8, 8))
    assert f"[{lower:.3g}," in v.detail


def test_all_of_and_any_of_combine_three_outcomes():
    ok, bad = better(), beats("old", "new", min_effect=0.01, phrase="better")
    unclear = mean_above("new", 0.82, min_effect=0.01, phrase="better")
    assert all_of(ok, mean_above("new", 0.5, min_effect=0.05))(GOOD).verdict == REPRODUCED
    assert all_of(ok, bad)(GOOD).verdict == NOT_REPRODUCED
    assert all_of(ok, unclear)(GOOD).verdict == INCONCLUSIVE
    assert any_of(bad, ok)(GOOD).verdict == REPRODUCED
    assert any_of(bad, unclear)(GOOD).verdict == INCONCLUSIVE
    assert any_of(bad, bad)(GOOD).verdict == NOT_REPRODUCED
    parts = all_of(ok, bad)(GOOD).parts
    assert [p[2].verdict for p in parts] == [REPRODUCED, NOT_REPRODUCED]
    assert "97.5%" in parts[1][2].detail  # the side one part decides alone runs at alpha / 2


def test_all_of_keeps_its_error_rate_under_the_claim():
    # two parts, each with a true effect exactly at its minimum: 'not reproduced' at most about 5%
    rng = np.random.default_rng(3)
    rule = all_of(*(mean_above(a, 0.0, min_effect=1.0, phrase="x") for a in ("a", "b")))
    outcomes = [rule({"a": rng.normal(1, 1, 3), "b": rng.normal(1, 1, 3)}).verdict for _ in range(2000)]
    assert outcomes.count(NOT_REPRODUCED) / 2000 <= 0.06


# --- claims, preconditions, phrases --------------------------------------------------------------------


def test_judge_and_not_assessed():
    paper = Paper("A paper", 2024, "2401.00001")
    c = judge(paper, QUOTE, "acc", GOOD, better())
    assert c.verdict == REPRODUCED and "new: 0.82 ± 0.01 (n=3)" in c.summary()
    assert c.parts[0]["phrase"] == "better" and c.parts[0]["verdict"] == REPRODUCED
    c = judge(paper, QUOTE, "acc", GOOD, better(), assess=False)
    assert c.verdict == NOT_ASSESSED and "reproduced" in c.detail
    with pytest.raises(PretrainNbError, match="quoted"):
        judge(paper, "  ", "acc", GOOD, better())


def test_every_part_names_a_phrase_of_the_quote():
    paper = Paper("A paper", 2024)
    with pytest.raises(PretrainNbError, match="names None"):
        judge(paper, QUOTE, "acc", GOOD, beats("new", "old", min_effect=0.01))
    with pytest.raises(PretrainNbError, match="'faster'"):
        judge(paper, QUOTE, "acc", GOOD, all_of(better(), better(phrase="faster")))
    assert judge(paper, "It is  BETTER.", "acc", GOOD, better()).verdict == REPRODUCED


def test_a_failed_precondition_is_not_a_verdict():
    paper = Paper("A paper", 2024)
    arms = GOOD | {"untrained": [0.80, 0.83, 0.81]}
    setup = Precondition(
        "new beats an untrained model by 2 points", beats("new", "untrained", min_effect=0.02)
    )
    c = judge(paper, QUOTE, "acc", arms, better(), [setup])
    assert c.verdict == NOT_LEARNED and "precondition not met" in c.detail
    assert c.preconditions[0]["verdict"] != REPRODUCED and "fails" in c.precondition_summary()
    held = judge(paper, QUOTE, "acc", GOOD | {"untrained": [0.5, 0.5, 0.52]}, better(), [setup])
    assert held.verdict == REPRODUCED and "holds" in held.precondition_summary()


# --- fingerprints and results.json -----------------------------------------------------------------------


def test_fingerprint_sizes_balance_and_hash():
    import torch

    ids = torch.arange(12).view(3, 4)
    fp = fingerprint(ids, labels=[1, 1, 0])
    assert fp["examples"] == 3 and fp["tokens"] == 12 and fp["majority_share"] == 0.6667
    assert fp["class_balance"] == {"0": 0.3333, "1": 0.6667}
    assert fp["sha256"] != fingerprint(ids, labels=[1, 0, 0])["sha256"]  # labels are part of the content
    assert fingerprint(["a b", "c"], tokens=3) == fingerprint(["a b", "c"], tokens=3)
    assert "tokens" not in fingerprint(torch.rand(4, 2))
    with pytest.raises(PretrainNbError, match="3 examples but 2 labels"):
        fingerprint(ids, labels=[1, 0])
    with pytest.raises(PretrainNbError, match="not dict"):
        fingerprint({"a": 1})


def test_run_writes_results_json(runs_dir):
    run = start_run("x_results_test", "standard", seed=5)
    assert run.seeds == [5, 6, 7] and run.seeds_for(5) == [5, 6, 7, 8, 9] and run.seeds_for(2) == [5, 6, 7]
    run.claim(Paper("A paper", 2024), QUOTE, "acc", GOOD, better())
    run.fingerprint("texts", ["a b", "c d e"], labels=[0, 1], tokens=5)
    run.log(steps=10, curve=np.arange(3))
    path = run.finish()
    rec = json.loads(path.read_text())
    assert set(RESULTS_KEYS) <= set(rec)
    assert rec["claims"][0]["verdict"] == REPRODUCED and rec["metrics"] == {"steps": 10, "curve": [0, 1, 2]}
    assert rec["profile"] == "standard" and rec["wall_time_s"] >= 0 and rec["peak_memory_mb"]["cpu_rss"] > 0
    assert rec["hardware"]["cpu_model"] and rec["hardware"]["cpu_capability"]
    assert rec["data"]["texts"] == fingerprint(["a b", "c d e"], labels=[0, 1], tokens=5)
    assert list(run.table().verdict) == [REPRODUCED]
    assert run.prose("{data[texts][examples]} texts, {metrics[steps]} steps").data == "2 texts, 10 steps"
    with pytest.raises(PretrainNbError, match="has not recorded"):
        run.prose("{data[probe][examples]}")


def test_a_precondition_needs_its_margin_not_only_significance():
    setup = Precondition("new beats untrained by 2 points", beats("new", "untrained", min_effect=0.02))
    barely = GOOD | {"untrained": [0.804, 0.815, 0.805]}  # 1.2 points ahead on average: significant
    assert setup.rule(barely).verdict == REPRODUCED and not Precondition.holds(setup.rule(barely))
    c = judge(Paper("A paper", 2024), QUOTE, "acc", barely, better(), [setup])
    assert c.verdict == NOT_LEARNED and c.preconditions[0]["holds"] is False
