"""On a CUDA GPU: cuDNN flash attention is the default and computes what transformers computes.

These need a GPU and run with `pytest -m gpu` (the README's GPU command); the default suite
deselects them. The reference is transformers in float32 on the CPU; jdlm runs in bfloat16 on
the GPU with the same bf16-rounded weights, so the bound is relative (bf16 activations land
between 1e-3 and 1e-2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jdlm
from jdlm.cli import main as cli
from jdlm.model import attention_impl
from hf_reference import make_dream, make_llada, reference_logits

pytestmark = pytest.mark.gpu



@pytest.fixture(autouse=True)
def _needs_gpu():
    # Selected explicitly with `-m gpu`: without a GPU that is a failure, not a skip.
    if jax.default_backend() != "gpu":
        pytest.fail("tests/test_gpu.py needs a CUDA GPU (run `pytest -m gpu` on one)", pytrace=False)


SHAPES = dict(hidden=512, heads=8, layers=2, vocab=1024, intermediate=1024)


def _relative(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _inputs(vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab - 3, size=(4, 96))
    mask = np.ones_like(tokens)
    mask[1, :17] = 0  # left padding
    mask[3, :40] = 0
    return tokens, mask


def _rows(family, mask):
    # Dream's pad rows attend to nothing and are unused by design (see test_parity.py).
    if family != "dream":
        return np.ones_like(mask, dtype=bool)
    return np.concatenate([np.ones_like(mask[:, :1]), mask[:, :-1]], 1).astype(bool)


def test_cudnn_is_the_default_on_gpu_for_half_precision():
    assert attention_impl(None, jnp.bfloat16, 128) == "cudnn"
    assert attention_impl(None, jnp.float32, 128) == "xla"  # cuDNN's fused kernel needs bf16/fp16
    assert attention_impl("xla", jnp.bfloat16, 128) == "xla"


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_bf16_cudnn_logits_match_transformers(tmp_path, family):
    # bf16 on disk; the reference computes in float32 with exactly those (rounded) weights.
    if family == "dream":
        ref = make_dream(tmp_path / "hf", kv_heads=2, dtype=torch.bfloat16, **SHAPES)
    else:
        ref = make_llada(tmp_path / "hf", dtype=torch.bfloat16, **SHAPES)
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "jdlm")]) == 0
    model = jdlm.load(tmp_path / "jdlm")
    assert model.dtype == jnp.bfloat16
    hlo = jax.jit(model.logits).lower(jnp.zeros((4, 96), jnp.int32),
                                      jnp.ones((4, 96), jnp.int32)).compile().as_text()
    assert "cudnn" in hlo and "fmha" in hlo.lower()  # the fused cuDNN attention call
    xla = jdlm.load(tmp_path / "jdlm", attn_impl="xla")
    tokens, mask = _inputs(SHAPES["vocab"], seed=3)
    for attention_mask in (None, mask):
        rows = _rows(family, mask) if attention_mask is not None else slice(None)
        want = reference_logits(ref, family, tokens, attention_mask)[rows]
        got = np.asarray(model.logits(tokens, attention_mask))[rows]
        got_xla = np.asarray(xla.logits(tokens, attention_mask))[rows]
        assert np.isfinite(got).all()
        err, err_xla = _relative(got, want), _relative(got_xla, want)
        print(f"{family} mask={attention_mask is not None}: cudnn {err:.2e}, xla bf16 {err_xla:.2e}")
        # bf16 activations through 2 layers of these random weights: about 4e-2 with XLA on a CPU.
        assert err < 0.1
        assert err < 1.5 * err_xla + 1e-3  # no worse than XLA's bf16 attention on the same weights


def test_cudnn_gradients_match_float32(tmp_path):
    """Training differentiates through the fused kernel: its gradients are as close to float32
    XLA's as XLA's own bf16 gradients are."""
    make_dream(tmp_path / "hf", kv_heads=2, **SHAPES)
    tokens, mask = _inputs(SHAPES["vocab"], seed=4)
    targets = jnp.asarray(np.roll(tokens, -1, axis=1))
    rows = jnp.asarray(_rows("dream", mask))

    def grads(dtype, attn_impl):
        model = jdlm.load(tmp_path / "hf", dtype=dtype)

        def loss(state):
            module = nnx.merge(model.graphdef, state)
            logits = module(jnp.asarray(tokens), jnp.asarray(mask), attn_impl=attn_impl)
            ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
            return jnp.sum(ce * rows) / rows.sum()

        return {path: np.asarray(v[...], np.float32)
                for path, v in nnx.to_flat_state(jax.grad(loss)(model.state))}

    want = grads("float32", "xla")
    cudnn, xla = grads("bfloat16", "cudnn"), grads("bfloat16", "xla")
    for path, w in want.items():
        err, err_xla = _relative(cudnn[path], w), _relative(xla[path], w)
        assert np.isfinite(cudnn[path]).all() and err < 1.5 * err_xla + 1e-3, (path, err, err_xla)
