"""The synthetic n-gram language against brute-force enumeration."""

import itertools

import numpy as np
import pytest

from jdlm.errors import JdlmError
from jdlm.synthetic import NGramLanguage


@pytest.mark.parametrize("order", [2, 3])
def test_probabilities_and_entropy_match_enumeration(order):
    lang = NGramLanguage.random(vocab_size=4, order=order, support=2, seed=3)
    length = 5
    seqs = np.array(list(itertools.product(range(4), repeat=length)))
    logp = lang.log_prob(seqs)
    p = np.exp(logp)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    legal = np.isfinite(logp)
    assert legal.sum() == 4 ** (order - 1) * 2 ** (length - order + 1)
    assert np.array_equal(lang.is_legal(seqs), legal)
    entropy = -(p[legal] * logp[legal]).sum()
    assert lang.entropy(length) == pytest.approx(entropy, rel=1e-12)
    # Samples are legal and their empirical frequencies follow p.
    samples = lang.sample(40_000, length, seed=1)
    assert lang.is_legal(samples).all()
    codes = samples @ (4 ** np.arange(length)[::-1])
    freq = np.bincount(codes, minlength=4 ** length) / len(samples)
    assert 0.5 * np.abs(freq - p).sum() < 0.03


def test_bad_input():
    with pytest.raises(JdlmError, match="order=1"):
        NGramLanguage.random(order=1)
    lang = NGramLanguage.random(vocab_size=4)
    with pytest.raises(JdlmError, match=r"\[0, 4\)"):
        lang.log_prob(np.array([[0, 7]]))
