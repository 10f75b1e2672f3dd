"""The forward process, the losses and the MC likelihoods against direct numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdlm import diffusion
from jdlm.config import ModelConfig
from jdlm.errors import JdlmError
from jdlm.model import Model, Transformer

MASK = 15


def np_nll(logits, tokens):
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def fixed():
    rng = np.random.default_rng(0)
    b, l, v = 4, 12, 16
    return dict(
        logits=rng.normal(size=(b, l, v)).astype(np.float32) * 3,
        tokens=rng.integers(0, v - 1, (b, l)),
        masked=rng.random((b, l)) < 0.5,
        p=rng.uniform(0.05, 1.0, (b, 1)).astype(np.float32),
        prompt=np.arange(l)[None, :] < np.array([[2], [5], [0], [7]]),
    )


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(family="llada", vocab_size=16, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4,
                      norm_eps=1e-5, qkv_bias=False, tie_embeddings=False, logit_shift=0,
                      mask_token_id=MASK, max_position_embeddings=64)
    module = Transformer(cfg, rngs=nnx.Rngs(3))
    # Larger weights so that the conditionals differ visibly from uniform.
    module.embed[...] = module.embed[...] * 50
    return Model.from_module(module)


def test_pretrain_loss_matches_formula(fixed):
    f = fixed
    nll = np_nll(f["logits"], f["tokens"])
    want = (nll * f["masked"] / f["p"]).sum() / f["tokens"].size
    got = diffusion.pretrain_loss(f["logits"], f["tokens"], f["masked"], f["p"])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Cropped: only the first 7 positions count and the denominator is B * 7.
    valid = np.broadcast_to(np.arange(12) < 7, f["tokens"].shape)
    want_crop = (nll * (f["masked"] & valid) / f["p"]).sum() / (4 * 7)
    got_crop = diffusion.pretrain_loss(f["logits"], f["tokens"], f["masked"] & valid, f["p"], valid)
    np.testing.assert_allclose(float(got_crop), want_crop, rtol=1e-5)


def test_sft_loss_matches_formula(fixed):
    f = fixed
    nll = np_nll(f["logits"], f["tokens"])
    answer = ~f["prompt"]
    per_row = (nll * (f["masked"] & answer) / f["p"]).sum(1) / answer.sum(1)
    got = diffusion.sft_loss(f["logits"], f["tokens"], f["masked"], f["p"], f["prompt"])
    np.testing.assert_allclose(float(got), per_row.mean(), rtol=1e-5)


def test_next_token_nll_alignment(fixed):
    f = fixed
    got = diffusion.next_token_nll(f["logits"], f["tokens"], 0)
    np.testing.assert_allclose(got, np_nll(f["logits"][:, :-1], f["tokens"][:, 1:]), rtol=1e-5)
    got = diffusion.next_token_nll(f["logits"], f["tokens"], 1)
    np.testing.assert_allclose(got, np_nll(f["logits"][:, 1:], f["tokens"][:, 1:]), rtol=1e-5)


def test_mc_bound_matches_formula(fixed):
    f = fixed
    want = (np_nll(f["logits"], f["tokens"]) * f["masked"] / f["p"]).sum(1)
    got = diffusion.masked_nll_bound(f["logits"], f["tokens"], f["masked"], f["p"])
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("stratified", [False, True])
def test_mask_rate_matches_schedule(stratified):
    b, l, eps = 2048, 256, 0.1
    tokens = jnp.zeros((b, l), jnp.int32)
    noisy, masked, p = diffusion.forward_process(jax.random.key(1), tokens, MASK, eps=eps,
                                                 stratified=stratified)
    masked, p = np.asarray(masked), np.asarray(p)[:, 0]
    assert np.all((np.asarray(noisy) == MASK) == masked)
    assert p.min() >= eps and p.max() <= 1.0
    # Per row the rate is Binomial(L, p) / L: within 5 standard deviations everywhere.
    rate = masked.mean(1)
    assert np.all(np.abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / l) + 1e-6)
    # p is uniform on [eps, 1]: mean and spread of the schedule.
    assert abs(p.mean() - (1 + eps) / 2) < 0.02
    assert abs(p.std() - (1 - eps) / np.sqrt(12)) < 0.02
    if stratified:
        gaps = np.diff(np.sort(p))
        np.testing.assert_allclose(gaps, (1 - eps) / b, atol=1e-5)


def test_random_crop_keeps_a_prefix():
    lengths = []
    for seed in range(200):
        valid = np.asarray(diffusion.random_crop(jax.random.key(seed), 3, 10, 0.5))
        keep = valid[0].sum()
        assert (valid == (np.arange(10) < keep)).all()  # the same prefix for the whole batch
        lengths.append(keep)
    lengths = np.array(lengths)
    assert lengths.min() >= 1 and 0.35 < (lengths < 10).mean() < 0.6  # about half cropped
    assert np.asarray(diffusion.random_crop(jax.random.key(0), 2, 10, 0.0)).all()


def test_sft_never_masks_prompt():
    b, l = 64, 32
    tokens = jax.random.randint(jax.random.key(0), (b, l), 0, MASK)
    prompt = np.arange(l)[None, :] < np.random.default_rng(0).integers(0, l, (b, 1))
    seen = []

    def apply(params, noisy, attention, causal):
        seen.append(noisy)
        return jnp.zeros((*noisy.shape, 16))

    cfg = ModelConfig(family="llada", vocab_size=16, hidden_size=8, intermediate_size=8,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, rope_theta=1e4,
                      norm_eps=1e-5, qkv_bias=False, tie_embeddings=False, logit_shift=0,
                      mask_token_id=MASK)
    loss_fn = diffusion.sft_objective(apply, cfg)
    for step in range(20):
        loss_fn(None, None, {"tokens": tokens, "prompt_mask": prompt}, jax.random.key(step))
    noisy = np.stack([np.asarray(n) for n in seen])
    assert np.all(noisy[:, prompt] == np.asarray(tokens)[prompt])
    assert (noisy[:, ~prompt] == MASK).mean() > 0.3  # the answers were noised


def test_llada_masks_exact_counts():
    l, b = 20, 16
    answer = jnp.asarray((np.arange(l) >= 5) & (np.arange(l) < 17))  # T = 12
    for seed in range(5):
        masked, p = diffusion.llada_masks(jax.random.key(seed), answer, b)
        masked, p = np.asarray(masked), np.asarray(p)[:, 0]
        counts = masked.sum(1)
        assert not masked[:, ~np.asarray(answer)].any()
        assert counts.min() >= 1 and counts.max() <= 12
        np.testing.assert_allclose(p, counts / 12)
        # Stratified: the counts cover 1..12 evenly (16 rows, so each count 1 or 2 times).
        assert set(counts) == set(range(1, 13))


def _exact_two_token_bound(model, prompt, a):
    """E_{l~U{1,2}} [(2 / l) sum over masked CE] by enumeration, from the model's logits."""
    seq = np.array(prompt + a)
    n = len(prompt)
    rows = []
    for masked_pos in ([n], [n + 1], [n, n + 1]):
        x = seq.copy()
        x[masked_pos] = MASK
        rows.append((x, masked_pos))
    logits = np.asarray(model.logits(np.stack([r[0] for r in rows])))
    ce = [sum(np_nll(logits[i][None], seq[None])[0, pos] for pos in mp) for i, (_, mp) in enumerate(rows)]
    return 0.5 * (2 * 0.5 * (ce[0] + ce[1])) + 0.5 * ce[2]


def test_llada_likelihood_one_token_is_exact(tiny_model):
    prompt, answer = [3, 1, 4, 1, 5], [9]
    x = np.array([prompt + [MASK]])
    want = -np_nll(np.asarray(tiny_model.logits(x)), np.array([prompt + answer]))[0, -1]
    got = diffusion.log_likelihood(tiny_model, prompt, answer, mc_num=16, batch_size=8)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # CFG: un + (s + 1)(cond - un) with the prompt masked in the unconditional branch.
    s = 0.5
    both = np.asarray(tiny_model.logits(np.concatenate([x, np.full_like(x, MASK)])))
    guided = both[1] + (s + 1) * (both[0] - both[1])
    want_cfg = -np_nll(guided[None], np.array([prompt + answer]))[0, -1]
    got_cfg = diffusion.log_likelihood(tiny_model, prompt, answer, mc_num=16, batch_size=8,
                                       cfg_scale=s)
    np.testing.assert_allclose(got_cfg, want_cfg, rtol=1e-5)


@pytest.mark.parametrize("estimator,mc_num,rtol", [("llada", 256, 0.02), ("dream", 4096, 0.05)])
def test_likelihood_estimators_converge_to_enumeration(tiny_model, estimator, mc_num, rtol):
    prompt, answer = [2, 7, 1], [8, 2]
    want = -_exact_two_token_bound(tiny_model, prompt, answer)
    got = diffusion.log_likelihood(tiny_model, prompt, answer, mc_num=mc_num, batch_size=32,
                                   estimator=estimator, seed=1)
    np.testing.assert_allclose(got, want, rtol=rtol)


def test_rolling_sums_chunks(tiny_model):
    doc = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    got = diffusion.log_likelihood_rolling(tiny_model, doc, max_length=8, mc_num=16, batch_size=8)
    # chunk = 4 tokens, context up to 4 previous tokens.
    want = sum(diffusion.log_likelihood(tiny_model, doc[max(0, s - 4): s], doc[s: s + 4],
                                        mc_num=16, batch_size=8) for s in (0, 4, 8))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_likelihood_bad_input(tiny_model):
    with pytest.raises(JdlmError, match="context"):
        diffusion.log_likelihood(tiny_model, list(range(60)), [1] * 10)
    with pytest.raises(JdlmError, match="estimator"):
        diffusion.log_likelihood(tiny_model, [1], [2], estimator="elbo")
    with pytest.raises(JdlmError, match="multiple"):
        diffusion.log_likelihood(tiny_model, [1], [2], mc_num=10, batch_size=4)


def test_faithful_dream_estimator_never_scores_the_last_position(tiny_model):
    """Dream's eval.py never masks positions 0 and L-1: with a two-token answer only the first is
    scored, so the bound converges to its NLL given the prompt and the visible last token."""
    prompt, answer = [2, 7, 1], [8, 2]
    x = np.array([prompt + [MASK, answer[1]]])
    want = -np_nll(np.asarray(tiny_model.logits(x)), np.array([prompt + answer]))[0, len(prompt)]
    got = diffusion.log_likelihood(tiny_model, prompt, answer, mc_num=4096, batch_size=32,
                                   estimator="dream", seed=1, faithful=True)
    np.testing.assert_allclose(got, want, rtol=0.05)
    with pytest.raises(JdlmError, match="append the EOS"):
        diffusion.log_likelihood(tiny_model, prompt, [8], estimator="dream", faithful=True)
