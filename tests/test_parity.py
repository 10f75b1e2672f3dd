"""Parity with transformers: tiny random Qwen2 (Dream layout) and Llama (LLaDA layout) models,
converted by `jdlm convert`, must give the same position-aligned logits (fp32, <= 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jdlm
from jdlm.checkpoint import from_state_dict
from jdlm.cli import main as cli
from jdlm.errors import JdlmError
from hf_reference import make_dream, make_llada, reference_logits

TOL = 1e-4

DREAM_CASES = {
    "gqa1-theta1e6": dict(hidden=32, heads=4, kv_heads=4, theta=1e6),
    "gqa2-theta1e4": dict(hidden=48, heads=4, kv_heads=2, theta=1e4),
    "gqa7": dict(hidden=56, heads=7, kv_heads=1, theta=1e6),
    "odd-hidden35": dict(hidden=35, heads=5, kv_heads=5, head_dim=8, theta=1e4),
    "sharded3-bf16": dict(hidden=48, heads=6, kv_heads=2, theta=1e6, shards=3, dtype=torch.bfloat16),
}
LLADA_CASES = {
    "mha-theta5e5": dict(hidden=32, heads=4, theta=5e5),
    "theta1e4-3layers": dict(hidden=48, heads=3, layers=3, theta=1e4),
    "sharded4-bf16": dict(hidden=40, heads=5, shards=4, dtype=torch.bfloat16),
}


def _inputs(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(3, 11))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    return tokens, mask


def _check(model, ref, family, tokens, mask):
    for attention_mask in (None, mask):
        want = reference_logits(ref, family, tokens, attention_mask)
        got = np.asarray(model.logits(tokens, attention_mask))
        assert got.shape == want.shape and got.dtype == np.float32
        if attention_mask is not None and family == "dream":
            # Dream's pad rows attend to nothing; their outputs are unused by design.
            rows = np.concatenate([np.ones_like(mask[:, :1]), mask[:, :-1]], 1).astype(bool)
            got, want = got[rows], want[rows]
        np.testing.assert_array_less(np.abs(got - want).max(), TOL)


CASES = [("dream", make_dream, name, kw) for name, kw in DREAM_CASES.items()] + [
    ("llada", make_llada, name, kw) for name, kw in LLADA_CASES.items()]


@pytest.mark.parametrize("family,make,name,kwargs", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_parity_through_jdlm_convert(tmp_path, family, make, name, kwargs):
    ref = make(tmp_path / "hf", **kwargs)
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "jdlm")]) == 0
    model = jdlm.load(tmp_path / "jdlm", dtype="float32")
    assert model.config.family == family
    assert model.config.logit_shift == (1 if family == "dream" else 0)
    _check(model, ref, family, *_inputs(64, seed=0 if family == "dream" else 1))


def test_hf_directory_loads_directly(tmp_path):
    """`jdlm.load` also streams an HF directory without a conversion step."""
    ref = make_llada(tmp_path / "hf", hidden=32, heads=4, shards=2)
    model = jdlm.load(tmp_path / "hf")
    _check(model, ref, "llada", *_inputs(64))


def test_hidden_states_are_position_aligned(tmp_path):
    """Dream's final hidden states come back shifted like its logits: row i belongs to token i."""
    ref = make_dream(tmp_path / "hf", hidden=32, heads=4, kv_heads=2)
    model = jdlm.load(tmp_path / "hf")
    tokens, _ = _inputs(64)
    logits, hidden = model.logits_and_hidden(tokens)
    with torch.no_grad():
        raw = ref.model(input_ids=torch.as_tensor(tokens),
                        attention_mask=torch.zeros(3, 1, 11, 11)).last_hidden_state.numpy()
    shifted = np.concatenate([raw[:, :1], raw[:, :-1]], axis=1)
    np.testing.assert_allclose(np.asarray(hidden), shifted, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits), reference_logits(ref, "dream", tokens, None),
                               atol=TOL)


def test_causal_flag_matches_reference_causal_model(tmp_path):
    """`causal=True` equals the stock causal Llama (the autoregressive-judge path)."""
    ref = make_llada(tmp_path / "hf", hidden=32, heads=4)
    model = jdlm.load(tmp_path / "hf")
    tokens, _ = _inputs(64)
    with torch.no_grad():
        want = ref(input_ids=torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.logits(tokens, causal=True)), want, atol=TOL)


def test_in_memory_state_dict_matches_reference(tmp_path):
    """`from_state_dict` takes a live model's tensors (here torch's, as numpy) without files."""
    ref = make_dream(tmp_path / "hf", hidden=48, heads=4, kv_heads=2)
    cfg = jdlm.ModelConfig.from_hf(tmp_path / "hf")
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    model = from_state_dict(cfg, tensors)
    _check(model, ref, "dream", *_inputs(64))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(JdlmError, match="1 tensor.* missing .*model.layers.1.mlp.up_proj.weight"):
        from_state_dict(cfg, tensors)
