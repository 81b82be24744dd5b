"""experiments/chat_model.py's decision machinery (the preregistered rules of
docs/instructions-plan.md), without running the comparison."""

import math

from experiments import chat_model as cm


def test_interval_is_the_t_interval_with_two_degrees_of_freedom():
    m, lo, hi = cm.interval([0.10, 0.05, 0.15])
    assert math.isclose(m, 0.10) and math.isclose(hi - m, 4.303 * 0.05 / math.sqrt(3))


def test_decide():
    assert cm.decide(0.01, 0.2) == "helps"
    assert cm.decide(-0.2, -0.01) == "hurts"
    assert cm.decide(-0.04, 0.03) == "equivalent"
    assert cm.decide(-0.2, 0.1) == "inconclusive"


def test_sign_test_is_mcnemars_exact_test():
    assert cm.sign_test(0, 0) == 1.0
    assert math.isclose(cm.sign_test(5, 0), 2 / 32)  # all five discordant pairs one way
    assert math.isclose(cm.sign_test(3, 3), 1.0)
    assert math.isclose(cm.sign_test(1, 9), 2 * 11 / 1024)
