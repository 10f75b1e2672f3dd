"""generate() with a joint sampler: micro-steps that reveal a pass's tokens one at a time."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdlm.adjust import AdjustConfig, AdjustLayer, TrainedAdjust, joint_sampler
from jdlm.config import ModelConfig
from jdlm.errors import JdlmError
from jdlm.model import Model, Transformer
from jdlm.sampling import SamplerConfig, generate

CFG = ModelConfig(family="dream", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4, norm_eps=1e-6,
                  qkv_bias=True, tie_embeddings=False, logit_shift=1, mask_token_id=15,
                  pad_token_id=14, eos_token_id=14, max_position_embeddings=64)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def model():
    module = Transformer(CFG, rngs=nnx.Rngs(0))
    # Peaked distributions, so that positions and tokens depend on the inputs.
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax_tree_scale(state, 6.0))
    return Model.from_module(module)


def jax_tree_scale(state, factor):
    import jax

    return jax.tree.map(lambda a: a * factor if a.ndim >= 2 else a, state)


@dataclasses.dataclass(frozen=True)
class Identity:
    """Leaves the hidden states alone: the refined distributions are the base ones."""

    def __call__(self, params, canvas, hidden, attention_mask, micro_step):
        return hidden


@dataclasses.dataclass(frozen=True)
class Constant:
    """Replaces every hidden state by `params` (D,): every refined distribution is head(params)."""

    def __call__(self, params, canvas, hidden, attention_mask, micro_step):
        return jnp.broadcast_to(params, hidden.shape)


def _config(tokens_per_pass: int, **kw) -> SamplerConfig:
    return SamplerConfig(gen_length=12, steps=12 // tokens_per_pass, order="entropy",
                         schedule="dream", temperature=1.0, **kw)


def test_a_joint_sampler_that_changes_nothing_is_the_marginal_sampler(model):
    for k in (1, 3, 4):
        config = _config(k)
        base, base_hist = generate(model, PROMPTS, config, seed=[5, 6], return_history=True)
        joint, joint_hist = generate(model, PROMPTS, config, seed=[5, 6], return_history=True,
                                     joint_sampler=Identity(), joint_params=None)
        np.testing.assert_array_equal(joint, base)
        np.testing.assert_array_equal(joint_hist, base_hist)


def test_one_token_per_pass_never_runs_the_joint_sampler(model):
    """K = 1 is exact sampling whatever the joint sampler would say (same tokens, same keys)."""
    config = _config(1)
    forced = np.asarray(model.state["lm_head"][...][7]) * 50.0
    exact = generate(model, PROMPTS, config, seed=3)
    joint = generate(model, PROMPTS, config, seed=3, joint_sampler=Constant(), joint_params=forced)
    np.testing.assert_array_equal(joint, exact)


def test_refined_distributions_pick_the_later_tokens_of_a_pass(model):
    """A sampler that forces token 7 after each written token: each pass reveals one base
    token, then only 7s (Dream's schedule: 3, 4, 5 tokens in the three passes)."""
    head = np.asarray(model.state["lm_head"][...])
    forced = head[7] * 500.0
    logits = head @ forced
    assert logits.argmax() == 7 and np.sort(logits)[-1] - np.sort(logits)[-2] > 50
    config = _config(4)
    tokens, history = generate(model, PROMPTS, config, seed=1, return_history=True,
                               joint_sampler=Constant(), joint_params=forced)
    gen, hist = tokens[:, -12:], history[:, -12:]
    for row in range(2):
        for step, count in enumerate((3, 4, 5)):
            revealed = np.flatnonzero(hist[row] == step)
            assert len(revealed) == count
            assert (gen[row, revealed] == 7).sum() >= count - 1


def test_adjust_layer_as_joint_sampler(model):
    """A (random) ADJUST layer plugs in; K = 1 with it is exact sampling."""
    layer = AdjustLayer(CFG, AdjustConfig(), rngs=nnx.Rngs(2))
    trained = TrainedAdjust(AdjustConfig(), nnx.to_pure_dict(nnx.state(layer, nnx.Param)), {})
    step, params = joint_sampler(trained, model)
    exact = generate(model, PROMPTS, _config(1), seed=9)
    np.testing.assert_array_equal(
        generate(model, PROMPTS, _config(1), seed=9, joint_sampler=step, joint_params=params), exact)
    out = generate(model, PROMPTS, _config(4), seed=9, joint_sampler=step, joint_params=params)
    assert out.shape == exact.shape and (out[:, -12:] != CFG.mask_token_id).all()
    with pytest.raises(JdlmError, match="cfg_scale=0"):
        generate(model, PROMPTS, _config(4, cfg_scale=1.0), joint_sampler=step, joint_params=params)
