"""MAUVE through `mauve-text` with the offline MiniLM featurizer and a transformers featurizer."""

import numpy as np
import pytest
from eval_texts import digits, english
from tiny_causal_lm import save_tiny

from jdlm.errors import JdlmError
from jdlm.eval.mauve import compute_mauve, minilm_featurizer

N = 100


@pytest.fixture(scope="module")
def featurizer():
    return minilm_featurizer()


def test_same_distribution_near_one_different_near_zero(featurizer):
    corpus = english(2 * N, seed=0)
    p, p2, q = corpus[:N], corpus[N:], digits(N, seed=1)
    same = compute_mauve(p, p2, featurizer, num_clusters=5, seed=3)
    different = compute_mauve(p, q, featurizer, num_clusters=5, seed=3)
    assert same.mauve > 0.95, same
    assert different.mauve < 0.05, different
    assert (same.num_p, same.num_q, same.num_clusters, same.seed) == (N, N, 5, 3)
    assert same.featurizer == "all-MiniLM-L6-v2"
    assert set(same.to_dict()) >= {"mauve", "num_p", "num_q", "num_clusters", "seed",
                                   "featurizer"}


def test_too_few_samples_is_an_error():
    def fake(texts):  # never reached
        return np.zeros((len(texts), 4))

    with pytest.raises(JdlmError, match="at least 100 texts"):
        compute_mauve(["a"] * 99, ["b"] * 500, fake)
    with pytest.raises(JdlmError, match="num_clusters=20"):
        compute_mauve(["a"] * 100, ["b"] * 100, fake, num_clusters=20)


def test_transformers_featurizer_matches_mauves_own(tmp_path):
    from mauve.compute_mauve import get_features_from_input

    from jdlm.eval.mauve import causal_lm_featurizer

    path = str(save_tiny(tmp_path / "tiny-gpt2", kind="gpt2"))  # mauve wants "gpt2" in the name
    texts = ["the cat sat", "a dog ran in the park with a red ball", "we count the tokens"]
    ours = causal_lm_featurizer(path, batch_size=2)(texts)
    theirs = get_features_from_input(None, None, texts, path, 1024, -1, "p", batch_size=2)
    np.testing.assert_allclose(ours, theirs.numpy() if hasattr(theirs, "numpy") else theirs,
                               atol=1e-5)


def test_unknown_featurizer_is_an_error(tmp_path, monkeypatch):
    from jdlm.eval.mauve import causal_lm_featurizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(JdlmError, match="--featurizer"):
        causal_lm_featurizer(str(tmp_path / "no-such-model"))
