"""Judge NLL against transformers' own loss, for transformers judges and jdlm models."""

import numpy as np
import pytest
import torch
from hf_reference import make_dream, make_llada
from tiny_causal_lm import SENTENCES, save_tiny

import jdlm
from jdlm.errors import JdlmError
from jdlm.eval.judge import jdlm_judge, judge_nll, judge_nll_of_tokens, transformers_judge

TEXTS = [SENTENCES[0], "a dog ran", SENTENCES[2] + " " + SENTENCES[3], "rain"]


def hf_loss(model, ids: list[int]) -> float:
    """transformers' own causal LM loss: the mean NLL of tokens 1.. given their past."""
    t = torch.tensor([ids])
    with torch.no_grad():
        return float(model(input_ids=t, labels=t).loss)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_transformers_judge_equals_transformers_loss(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / kind, kind=kind)
    judge = transformers_judge(str(path))
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = [judge.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    assert ids[-1] == [judge.tokenizer.convert_tokens_to_ids("rain")]  # one token: nothing scored

    single = judge_nll([TEXTS[0]], judge)
    assert single.nll == pytest.approx(hf_loss(reference, ids[0]), rel=1e-5)
    assert single.num_tokens == len(ids[0]) - 1

    # Padded batches: pooled over tokens, so longer texts weigh more; padding never counts.
    result = judge_nll(TEXTS, judge, batch_size=3)
    counts = [len(i) - 1 for i in ids[:3]]
    pooled = sum(hf_loss(reference, i) * c for i, c in zip(ids[:3], counts)) / sum(counts)
    assert result.nll == pytest.approx(pooled, rel=1e-5)
    assert result.num_tokens == sum(counts) and result.num_texts == 4
    assert result.per_text[1] == pytest.approx(hf_loss(reference, ids[1]), rel=1e-5)
    assert result.per_text[3] is None


def test_eos_targets_are_excluded(tmp_path):
    path = save_tiny(tmp_path / "llama")
    judge = transformers_judge(str(path))
    ids = judge.tokenizer.encode(SENTENCES[1], add_special_tokens=False)
    with_eos = judge_nll_of_tokens([ids + [judge.eos_token_id]], judge)
    without = judge_nll_of_tokens([ids], judge)
    assert with_eos.num_tokens == without.num_tokens
    assert with_eos.nll == pytest.approx(without.nll, rel=1e-6)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_jdlm_causal_judge_equals_reference_loss(tmp_path, family):
    make = make_llada if family == "llada" else make_dream
    reference = make(tmp_path / "hf", hidden=32, heads=4)
    model = jdlm.load(tmp_path / "hf")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 60, size=n).tolist() for n in (9, 17, 5)]
    result = judge_nll_of_tokens(seqs, jdlm_judge(model), batch_size=2)
    counts = [len(s) - 1 for s in seqs]
    pooled = sum(hf_loss(reference, s) * c for s, c in zip(seqs, counts)) / sum(counts)
    assert result.nll == pytest.approx(pooled, rel=1e-4)
    assert result.num_tokens == sum(counts)


def test_errors(tmp_path):
    path = save_tiny(tmp_path / "llama")
    judge = transformers_judge(str(path))
    with pytest.raises(JdlmError, match="no texts"):
        judge_nll([], judge)
    with pytest.raises(JdlmError, match="second token"):
        judge_nll(["rain"], judge)
    with pytest.raises(JdlmError, match="causal LM directory"):
        transformers_judge(str(tmp_path / "missing"))
