"""study.py's decision machinery (the preregistered rules), without running the study."""
import pytest

from experiments import study


def test_interval_and_decision_rule():
    m, sd, lo, hi = study.interval([0.02, 0.03, 0.025, 0.035, 0.03], study.T_QUANTILE)
    assert m == pytest.approx(0.028) and lo > 0 and hi < 0.05
    assert hi - m == pytest.approx(3.4954 * sd / 5 ** 0.5, rel=1e-3)  # t(0.9875, 4 df)
    assert study.decide(lo, hi) == "helps"
    assert study.decide(0.001, 0.008) == "helps, by less than the margin"
    assert study.decide(-0.03, -0.001) == "hurts"
    assert study.decide(-0.004, 0.006) == "equivalent"
    assert study.decide(-0.02, 0.004) == "inconclusive"


def stats(em, p16, sb):
    return {"exact_match": em, "pass_at_16": p16, "strictly_better": sb}


def test_calibration_takes_the_first_candidate_meeting_every_criterion():
    cands = [(8, 11), (9, 12), (10, 13)]
    got = {"len8-11": stats(0.12, 0.6, 0.2), "len9-12": stats(0.05, 0.4, 0.25), "len10-13": stats(0.03, 0.3, 0.1)}
    assert study.choose(got, cands) == ((9, 12), False)
    # none meets all three: the fewest failures, then exact match closest to 5% (a deviation)
    got = {"len8-11": stats(0.12, 0.6, 0.35), "len9-12": stats(0.015, 0.2, 0.2), "len10-13": stats(0.009, 0.3, 0.1)}
    assert study.choose(got, cands) == ((10, 13), True)
