"""Verdict rules, each tested with data that satisfies it and data that does not (pretrain_nb.results)."""

import json

import numpy as np
import pytest

from pretrain_nb.core import PretrainNbError
from pretrain_nb.results import (
    INCONCLUSIVE,
    NOT_ASSESSED,
    NOT_REPRODUCED,
    REPRODUCED,
    RESULTS_KEYS,
    Paper,
    all_of,
    beats,
    judge,
    mean_above,
    mean_below,
    r2_above,
    r_squared,
    spread_below,
    start_run,
)

GOOD = {"new": [0.81, 0.83, 0.82], "old": [0.78, 0.80, 0.79]}


def test_beats_both_ways():
    assert beats("new", "old")(GOOD).verdict == REPRODUCED
    assert beats("old", "new")(GOOD).verdict == NOT_REPRODUCED
    # right direction on average, but one seed loses: inconclusive
    assert beats("new", "old")({"new": [0.81, 0.77, 0.84], "old": [0.78, 0.80, 0.79]}).verdict == INCONCLUSIVE
    # wins every seed but the gap is tiny compared with its spread: still needs mean > 2 SE
    assert (
        beats("new", "old")({"new": [0.80, 0.7901, 0.9], "old": [0.79, 0.79, 0.79]}).verdict == INCONCLUSIVE
    )


def test_beats_lower_is_better():
    loss = {"new": [2.0, 2.1, 2.05], "old": [2.3, 2.4, 2.35]}
    assert beats("new", "old", higher_is_better=False)(loss).verdict == REPRODUCED
    assert beats("new", "old", higher_is_better=True)(loss).verdict == NOT_REPRODUCED


def test_beats_needs_enough_seeds():
    v = beats("new", "old")({"new": [0.9, 0.91], "old": [0.5, 0.5]})
    assert v.verdict == INCONCLUSIVE and "needs 3" in v.detail


def test_beats_errors():
    with pytest.raises(PretrainNbError, match="needs arm\\(s\\) baseline; the measured arms are: new, old"):
        beats("new", "baseline")(GOOD)
    with pytest.raises(PretrainNbError, match="one value per seed"):
        beats("new", "old")({"new": [1, 2, 3], "old": [1, 2]})
    assert beats("new", "old")({"new": [np.nan, 1, 1], "old": [0, 0, 0]}).verdict == INCONCLUSIVE


def test_bounds_both_ways():
    assert mean_below("x", 0.05)({"x": [0.02, 0.03, 0.025]}).verdict == REPRODUCED
    assert mean_below("x", 0.05)({"x": [0.09, 0.11, 0.10]}).verdict == NOT_REPRODUCED
    assert mean_below("x", 0.05)({"x": [0.01, 0.09, 0.05]}).verdict == INCONCLUSIVE
    assert mean_above("x", 0.5)({"x": [0.7, 0.72, 0.71]}).verdict == REPRODUCED
    assert mean_above("x", 0.5)({"x": [0.3, 0.32, 0.31]}).verdict == NOT_REPRODUCED


def test_r2_both_ways():
    x = np.arange(1, 9.0)
    assert r_squared([1, 2, 3], [1, 2, 3]) == 1.0
    assert r2_above("y", "fit", 0.9)({"y": 2 * x**-0.5, "fit": 2 * x**-0.5 + 1e-3}).verdict == REPRODUCED
    assert (
        r2_above("y", "fit", 0.9)({"y": [1, 3, 0.5, 2, 1.5, 0.2, 2.5, 1], "fit": 2 * x**-0.5}).verdict
        == NOT_REPRODUCED
    )
    assert (
        r2_above("y", "fit", 0.9)({"y": [1, 2, 3], "fit": [1, 2, 3]}).verdict == INCONCLUSIVE
    )  # too few points


def test_all_of():
    ok, bad = beats("new", "old"), beats("old", "new")
    assert all_of(ok, mean_above("new", 0.5))(GOOD).verdict == REPRODUCED
    assert all_of(ok, bad)(GOOD).verdict == NOT_REPRODUCED
    assert all_of(ok, mean_above("new", 0.82))(GOOD).verdict == INCONCLUSIVE


def test_spread_below_both_ways_and_its_power():
    steady = [0.70, 0.71, 0.70, 0.71, 0.70, 0.71, 0.70, 0.71, 0.705]
    shaky = [0.60, 0.72, 0.65, 0.75, 0.58, 0.70, 0.62, 0.74, 0.66]
    v = spread_below("pre-trained", "scratch")({"pre-trained": steady, "scratch": shaky})
    assert v.verdict == REPRODUCED and "p = " in v.detail
    assert (
        spread_below("pre-trained", "scratch")({"pre-trained": shaky, "scratch": steady}).verdict
        == NOT_REPRODUCED
    )
    # half the spread with 3 runs each: the right direction, but an F-test with 2 and 2 degrees of freedom
    # cannot tell
    assert spread_below("a", "b")({"a": [0.70, 0.71, 0.72], "b": [0.68, 0.70, 0.72]}).verdict == INCONCLUSIVE
    from scipy.stats import f as f_dist

    a, b = np.array(steady), np.array(shaky)
    expected = f_dist.cdf(a.var(ddof=1) / b.var(ddof=1), 8, 8)
    assert f"p = {expected:.3g}" in v.detail


def test_judge_and_not_assessed():
    paper = Paper("A paper", 2024, "2401.00001")
    c = judge(paper, "It is better.", "acc", GOOD, beats("new", "old"))
    assert c.verdict == REPRODUCED and "new: 0.82 ± 0.01 (n=3)" in c.summary()
    c = judge(paper, "It is better.", "acc", GOOD, beats("new", "old"), assess=False)
    assert c.verdict == NOT_ASSESSED and "reproduced" in c.detail
    with pytest.raises(PretrainNbError, match="quoted"):
        judge(paper, "  ", "acc", GOOD, beats("new", "old"))


def test_run_writes_results_json(runs_dir):
    run = start_run("x_results_test", "standard", seed=5)
    assert run.seeds == [5, 6, 7]
    run.claim(Paper("A paper", 2024), "It is better.", "acc", GOOD, beats("new", "old"))
    run.log(steps=10, curve=np.arange(3))
    path = run.finish()
    rec = json.loads(path.read_text())
    assert set(RESULTS_KEYS) <= set(rec)
    assert rec["claims"][0]["verdict"] == REPRODUCED and rec["metrics"] == {"steps": 10, "curve": [0, 1, 2]}
    assert rec["profile"] == "standard" and rec["wall_time_s"] >= 0 and rec["peak_memory_mb"]["cpu_rss"] > 0
    assert list(run.table().verdict) == [REPRODUCED]
