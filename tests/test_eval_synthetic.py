"""SER and true-distribution NLL on a hand-written bigram language, by hand."""

import math

import numpy as np
import pytest

from jdlm.errors import JdlmError
from jdlm.eval.synthetic import synthetic_metrics
from jdlm.synthetic import NGramLanguage

INITIAL = np.array([0.5, 0.25, 0.25])
TRANSITION = np.array([[0.0, 0.5, 0.5],
                       [1.0, 0.0, 0.0],
                       [0.25, 0.0, 0.75]])
LANG = NGramLanguage(vocab_size=3, order=2, initial=INITIAL, transition=TRANSITION)
SAMPLES = np.array([[0, 1, 0],   # 0.5 * 0.5 * 1
                    [2, 2, 0],   # 0.25 * 0.75 * 0.25
                    [1, 1, 0]])  # 1 -> 1 is impossible


def test_hand_computed_values():
    eps = 0.3
    m = synthetic_metrics(LANG, SAMPLES, eps=eps)
    assert m.ser == pytest.approx(1 / 3)
    assert (m.num_samples, m.num_legal, m.length) == (3, 2, 3)
    nll_a = -(math.log(0.5) + math.log(0.5) + math.log(1.0)) / 3
    nll_b = -(math.log(0.25) + math.log(0.75) + math.log(0.25)) / 3
    assert m.nll_legal == pytest.approx((nll_a + nll_b) / 2)

    def s(q):  # (1 - eps) q + eps / |V|; here |V| = number of initial states = 3
        return math.log(0.7 * q + 0.1)

    smoothed = [-(s(0.5) + s(0.5) + s(1.0)) / 3,
                -(s(0.25) + s(0.75) + s(0.25)) / 3,
                -(s(0.25) + s(0.0) + s(1.0)) / 3]
    assert m.nll_smoothed == pytest.approx(sum(smoothed) / 3)
    assert m.eps == eps


def test_exact_samples_have_zero_ser_and_nll_near_entropy():
    lang = NGramLanguage.random(vocab_size=8, order=3, support=2, seed=1)
    samples = lang.sample(4000, 32, seed=2)
    m = synthetic_metrics(lang, samples, eps=1e-6)
    assert m.ser == 0.0 and m.num_legal == 4000
    assert m.nll_legal == pytest.approx(m.entropy_per_token, rel=0.02)
    assert m.nll_smoothed == pytest.approx(m.nll_legal, rel=1e-4)  # tiny eps barely matters


def test_all_illegal_and_errors():
    bad = np.array([[1, 1, 1]])
    m = synthetic_metrics(LANG, bad)
    assert m.ser == 1.0 and m.nll_legal is None and np.isfinite(m.nll_smoothed)
    with pytest.raises(JdlmError, match="eps"):
        synthetic_metrics(LANG, bad, eps=0.0)
    with pytest.raises(JdlmError):
        synthetic_metrics(LANG, np.zeros((0, 3), dtype=int))
