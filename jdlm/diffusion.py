"""The masked forward process, the training objectives, and Monte Carlo likelihoods.

LLaDA's schedule: t ~ U(0, 1) per sequence, p = (1 - eps) t + eps, every token masked i.i.d.
with probability p. The pretraining loss sum(CE / p) / (B * L) is an upper bound on the NLL per
token (MODELS.md §2.7); SFT never masks the prompt and normalises each row by its answer length.

Objectives are pure functions `(params, frozen, batch, rng) -> (loss, metrics)` built around an
`apply(params, tokens, attention_mask, causal)` that returns position-aligned logits, so the one
trainer in `jdlm.train` runs all of them (and ADJUST's, which lives elsewhere).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jdlm.config import ModelConfig
from jdlm.errors import JdlmError

DEFAULT_EPS = 1e-3
ESTIMATORS = ("llada", "dream")

Apply = Callable[..., Float[Array, "b l v"]]


# ----------------------------------------------------------------------------------------------
# Forward process
# ----------------------------------------------------------------------------------------------


def mask_probability(t: Float[Array, " b"], eps: float = DEFAULT_EPS) -> Float[Array, " b"]:
    """p = (1 - eps) t + eps: the eps floor keeps the 1/p weight finite at t = 0."""
    return (1.0 - eps) * t + eps


def sample_times(rng: Array, batch: int, *, stratified: bool = False) -> Float[Array, " b"]:
    """t ~ U(0, 1) per row; stratified: (u + i / b) mod 1, one uniform offset for the batch."""
    if stratified:
        u = jax.random.uniform(rng, ())
        return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    return jax.random.uniform(rng, (batch,))


def forward_process(
    rng: Array,
    tokens: Int[Array, "b l"],
    mask_token_id: int,
    *,
    eps: float = DEFAULT_EPS,
    stratified: bool = False,
    maskable: Bool[Array, "b l"] | None = None,
) -> tuple[Int[Array, "b l"], Bool[Array, "b l"], Float[Array, "b 1"]]:
    """Mask each token i.i.d. with its row's p. Returns (noisy tokens, masked, p as (b, 1))."""
    r_time, r_mask = jax.random.split(rng)
    batch = tokens.shape[0]
    p = mask_probability(sample_times(r_time, batch, stratified=stratified), eps)[:, None]
    masked = jax.random.uniform(r_mask, tokens.shape) < p
    if maskable is not None:
        masked &= maskable
    return jnp.where(masked, mask_token_id, tokens), masked, p


def random_crop(rng: Array, batch: int, length: int, crop_prob: float) -> Bool[Array, "b l"]:
    """LLaDA's variable length: with probability `crop_prob` the whole batch keeps only a random
    prefix of length U{1..L}. Shapes stay static; dropped positions are hidden as padding."""
    r_coin, r_len = jax.random.split(rng)
    keep = jnp.where(jax.random.uniform(r_coin) < crop_prob,
                     jax.random.randint(r_len, (), 1, length + 1), length)
    return jnp.broadcast_to(jnp.arange(length) < keep, (batch, length))


# ----------------------------------------------------------------------------------------------
# Losses on given logits and masks (what the tests check against numpy)
# ----------------------------------------------------------------------------------------------


def token_nll(logits: Float[Array, "b l v"], tokens: Int[Array, "b l"]) -> Float[Array, "b l"]:
    """-log softmax(logits)[token], in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def pretrain_loss(logits, tokens, masked, p, valid: Bool[Array, "b l"] | None = None) -> Array:
    """sum over masked tokens of CE / p, divided by the number of (valid) positions B * L."""
    weighted = jnp.where(masked, token_nll(logits, tokens) / p, 0.0)
    count = tokens.size if valid is None else jnp.maximum(valid.sum(), 1)
    return weighted.sum() / count


def sft_loss(logits, tokens, masked, p, prompt_mask: Bool[Array, "b l"]) -> Array:
    """Per row: sum over masked answer tokens of CE / p, divided by the answer length (padding
    EOS included, as in LLaDA's SFT); then the mean over rows."""
    weighted = jnp.where(masked & ~prompt_mask, token_nll(logits, tokens) / p, 0.0)
    answer_len = jnp.maximum((~prompt_mask).sum(axis=1), 1)
    return jnp.mean(weighted.sum(axis=1) / answer_len)


def next_token_nll(logits, tokens, logit_shift: int) -> Float[Array, "b l-1"]:
    """Causal NLL of tokens 1..L-1. Row i of a causal run saw tokens <= i; with `logit_shift=1`
    (Dream) the model already moved row i-1's prediction to row i."""
    if logit_shift:
        return token_nll(logits[:, 1:], tokens[:, 1:])
    return token_nll(logits[:, :-1], tokens[:, 1:])


# ----------------------------------------------------------------------------------------------
# Objectives for the trainer: (params, frozen, batch, rng) -> (loss, metrics)
# ----------------------------------------------------------------------------------------------


def mdlm_objective(apply: Apply, cfg: ModelConfig, *, eps: float = DEFAULT_EPS,
                   stratified: bool = True, crop_prob: float = 0.0):
    """LLaDA pretraining loss on batch {"tokens": (B, L)}."""

    def loss_fn(params, frozen, batch, rng):
        tokens = batch["tokens"]
        r_crop, r_mask = jax.random.split(rng)
        valid = random_crop(r_crop, *tokens.shape, crop_prob) if crop_prob > 0 else None
        noisy, masked, p = forward_process(r_mask, tokens, cfg.mask_token_id, eps=eps,
                                           stratified=stratified, maskable=valid)
        logits = apply(params, noisy, valid, False)
        loss = pretrain_loss(logits, tokens, masked, p, valid)
        return loss, {"mask_rate": masked.mean()}

    return loss_fn


def mdlm_eval_objective(apply: Apply, cfg: ModelConfig):
    """Held-out NELBO per token with LLaDA's exact-count masks (l ~ U{1..L} stratified across
    the batch, weight L / l): the same bound as the training loss, with lower variance."""

    def loss_fn(params, frozen, batch, rng):
        tokens = batch["tokens"]
        masked, p = llada_masks(rng, jnp.ones(tokens.shape[1], bool), tokens.shape[0])
        logits = apply(params, jnp.where(masked, cfg.mask_token_id, tokens), None, False)
        return pretrain_loss(logits, tokens, masked, p), {}

    return loss_fn


def sft_objective(apply: Apply, cfg: ModelConfig, *, eps: float = DEFAULT_EPS,
                  stratified: bool = True):
    """LLaDA SFT loss on batch {"tokens": (B, L), "prompt_mask": (B, L)}; prompts stay clean."""

    def loss_fn(params, frozen, batch, rng):
        tokens, prompt = batch["tokens"], batch["prompt_mask"].astype(bool)
        noisy, masked, p = forward_process(rng, tokens, cfg.mask_token_id, eps=eps,
                                           stratified=stratified, maskable=~prompt)
        logits = apply(params, noisy, None, False)
        return sft_loss(logits, tokens, masked, p, prompt), {"mask_rate": masked.mean()}

    return loss_fn


def ar_objective(apply: Apply, cfg: ModelConfig):
    """Autoregressive baseline: the same network with a causal mask, next-token NLL per token."""

    def loss_fn(params, frozen, batch, rng):
        tokens = batch["tokens"]
        logits = apply(params, tokens, None, True)
        return next_token_nll(logits, tokens, cfg.logit_shift).mean(), {}

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Monte Carlo likelihood of an answer given a prompt
# ----------------------------------------------------------------------------------------------


def llada_masks(rng: Array, answer: Bool[Array, " l"], batch: int):
    """LLaDA's exact-count stratified masks: row i masks n_i answer tokens uniformly without
    replacement, n_i = ((round(k + i T / b) - 1) mod T) + 1 with k ~ U{1..T}; p_i = n_i / T."""
    r_k, r_perm = jax.random.split(rng)
    total = answer.sum()
    k = jax.random.randint(r_k, (), 1, total + 1)
    n = jnp.round(k + jnp.arange(batch) * total / batch).astype(jnp.int32)
    n = jnp.mod(n - 1, total) + 1
    scores = jnp.where(answer, jax.random.uniform(r_perm, (batch, answer.shape[0])), jnp.inf)
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    return ranks < n[:, None], (n / total)[:, None]


def dream_masks(rng: Array, answer: Bool[Array, " l"], batch: int, eps: float = DEFAULT_EPS):
    """Dream's Bernoulli variant: stratified t, each answer token masked i.i.d. with p."""
    r_time, r_mask = jax.random.split(rng)
    p = mask_probability(sample_times(r_time, batch, stratified=True), eps)[:, None]
    return (jax.random.uniform(r_mask, (batch, answer.shape[0])) < p) & answer, p


def masked_nll_bound(logits, tokens, masked, p) -> Float[Array, " b"]:
    """Per row: sum over masked tokens of CE / p, an unbiased estimate of the NLL bound."""
    return jnp.where(masked, token_nll(logits, tokens) / p, 0.0).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "mc_num", "batch_size", "estimator",
                                             "use_cfg", "mask_token_id"))
def _mc_nll(graphdef, state, seq, prompt, answer, valid, rng, cfg_scale, *, mc_num, batch_size,
            estimator, use_cfg, mask_token_id):
    module = nnx.merge(graphdef, state)
    tokens = jnp.broadcast_to(seq, (batch_size, seq.shape[0]))
    attention = jnp.broadcast_to(valid, tokens.shape).astype(jnp.int32)

    def one_batch(key):
        if estimator == "llada":
            masked, p = llada_masks(key, answer, batch_size)
        else:
            masked, p = dream_masks(key, answer, batch_size)
        noisy = jnp.where(masked, mask_token_id, tokens)
        if use_cfg:
            # Unconditional branch: the prompt fully masked (LLaDA's CFG).
            uncond = jnp.where(prompt, mask_token_id, noisy)
            both = module(jnp.concatenate([noisy, uncond]), jnp.concatenate([attention, attention]))
            cond, un = jnp.split(both, 2)
            logits = un + (cfg_scale + 1.0) * (cond - un)
        else:
            logits = module(noisy, attention)
        return masked_nll_bound(logits, tokens, masked, p).mean()

    return jax.lax.map(one_batch, jax.random.split(rng, mc_num // batch_size)).mean()


def _bucket(length: int, multiple: int = 32) -> int:
    # Pad to a multiple so that requests of similar lengths share one compiled program.
    return -(-length // multiple) * multiple


def log_likelihood(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], *,
                   mc_num: int = 128, batch_size: int = 16, cfg_scale: float = 0.0,
                   estimator: str = "llada", seed: int = 0, faithful: bool = False) -> float:
    """Monte Carlo lower bound on log p(answer | prompt) (nats) under a masked diffusion model.

    `estimator="llada"` masks exactly l ~ U{1..T} answer tokens with weight T / l (stratified
    across each batch, MODELS.md §2.8); `"dream"` masks i.i.d. with a stratified p and weight
    1 / p (§1.9). The prompt is never masked. All `mc_num` samples run in one compiled program.
    `faithful=True` with the "dream" estimator keeps Dream's eval.py quirk: the sequence's first
    and last positions are never masked, so its last answer token goes unscored (Dream appends
    EOS to the answer, which makes that token the EOS; do the same to match its numbers).
    """
    if estimator not in ESTIMATORS:
        raise JdlmError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if mc_num < batch_size or mc_num % batch_size:
        raise JdlmError(f"mc_num={mc_num} must be a positive multiple of batch_size={batch_size}")
    prompt_ids, answer_ids = list(prompt_ids), list(answer_ids)
    if not answer_ids:
        raise JdlmError("answer_ids is empty; a likelihood needs at least one answer token")
    cfg: ModelConfig = model.config
    total = len(prompt_ids) + len(answer_ids)
    if total > cfg.max_position_embeddings:
        raise JdlmError(f"prompt + answer is {total} tokens, above the model's context of "
                        f"{cfg.max_position_embeddings}; shorten the prompt")
    length = min(_bucket(total), cfg.max_position_embeddings)
    seq = np.zeros(length, np.int32)
    seq[:total] = prompt_ids + answer_ids
    pos = np.arange(length)
    prompt = pos < len(prompt_ids)
    answer = (pos >= len(prompt_ids)) & (pos < total)
    if faithful and estimator == "dream":
        answer &= (pos > 0) & (pos < total - 1)
        if not answer.any():
            raise JdlmError("with faithful=True, Dream's estimator never masks the last position, "
                            "so a one-token answer at the end has nothing to score; append the "
                            "EOS id to answer_ids as Dream does")
    nll = _mc_nll(model.graphdef, model.state, jnp.asarray(seq), jnp.asarray(prompt),
                  jnp.asarray(answer), jnp.asarray(pos < total), jax.random.key(seed),
                  jnp.float32(cfg_scale), mc_num=mc_num, batch_size=batch_size,
                  estimator=estimator, use_cfg=cfg_scale > 0, mask_token_id=cfg.mask_token_id)
    return -float(nll)


def log_likelihood_rolling(model, token_ids: Sequence[int], *, max_length: int | None = None,
                           prefix_ids: Sequence[int] = (), **kwargs) -> float:
    """Log-likelihood bound of a whole document: disjoint chunks of `max_length // 2` tokens,
    each scored by `log_likelihood` given the preceding tokens (up to the context budget)."""
    token_ids = list(token_ids)
    max_length = max_length or model.config.max_position_embeddings
    if max_length < 2 + len(prefix_ids):
        raise JdlmError(f"max_length={max_length} leaves no room for a chunk after the prefix")
    chunk = (max_length - len(prefix_ids)) // 2
    total = 0.0
    for start in range(0, len(token_ids), chunk):
        context = token_ids[max(0, start - (max_length - len(prefix_ids) - chunk)): start]
        total += log_likelihood(model, list(prefix_ids) + context,
                                token_ids[start: start + chunk], **kwargs)
    return total
