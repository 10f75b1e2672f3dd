"""Every standard unmasking sampler, compiled as one XLA program per (batch, prompt bucket).

    from jdlm import SamplerConfig, generate
    tokens = generate(model, prompts, SamplerConfig(gen_length=64, steps=64, order="entropy",
                      schedule="dream", temperature=1.0), seed=0)

`SamplerConfig` is the static part of the compiled program; prompts, seeds and weights are
traced, so calls with new prompts of lengths in the same bucket reuse one executable. The loop is
a `lax.while_loop` over forward passes: no host sync inside, an early exit when no mask is left,
rows without masks are left unchanged. Every random draw is keyed by (request, step) with
`fold_in`, so a row's output does not depend on its batch-mates.

Published quirks (reference/MODELS.md §1.8, §2.6) are reproduced with `faithful=True`:
  * Dream computes one count for the whole batch from the batch-average mask count; with
    steps == gen_length its float32 grid makes the first step reveal nothing and the last two.
    The default counts per row and reveals at least one token per step (so steps == gen_length
    is one token per forward pass, as intended). When rows have different mask counts (infill),
    Dream's code re-masks revealed tokens of a row with fewer masks than the shared count;
    jdlm clamps the count to the row's masks instead, and, as in Dream, a row with more masks
    than the shared final count keeps some.
  * Dream's `origin` (order="random", schedule="dream") reveals each masked position with
    probability 1 - s/t instead of a fixed count; the default draws exactly the count.
  * LLaDA's `confidence_eos_eot_inf` as written only zeroes EOT's confidence; the default zeroes
    both EOS and EOT, as the name says.
  * LLaDA scores positions with the untempered softmax of the logits while drawing tokens at the
    temperature (faithful with schedule="llada"); the default scores with the distribution the
    tokens are drawn from, as Dream does.
Neither mode ever draws the mask token itself (a real model gives it ~0 probability; a random
one would otherwise leave a "revealed" position masked).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from jdlm import unmasking as um
from jdlm.config import ModelConfig
from jdlm.errors import JdlmError
from jdlm.sharding import named_sharding

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How to fill `gen_length` masked positions after each prompt (hashable: a jit static).

    gen_length: tokens generated after each prompt.
    steps: forward passes for the count schedules (`dream`, `llada`); default gen_length. The
        adaptive schedules (`threshold`, `entropy_bound`) stop when the canvas is full (at most
        gen_length passes) and ignore it.
    block_length: semi-autoregressive blocks, filled left to right with steps/num_blocks passes
        each; default gen_length (pure diffusion).
    order: position rule: random | confidence | margin | entropy.
    order_temperature: Dream's `alg_temp`; > 0 samples positions from softmax(score / it)
        without replacement instead of taking the top ones.
    schedule: tokens per pass: dream | llada | threshold | entropy_bound.
    threshold: `threshold` schedule's confidence bar, in (0, 1].
    entropy_budget: `entropy_bound` schedule's budget (nats) per pass.
    eps: Dream's final time of linspace(1, eps, steps+1).
    temperature, top_p, top_k: token sampling (0 = greedy), Dream's filters and order.
    gumbel_dtype: float32 or float64 (LLaDA's choice; needs JAX_ENABLE_X64=1).
    cfg_scale: LLaDA's classifier-free guidance w: un + (w+1)(cond - un), prompt masked in `un`.
    logits_eos_inf: never draw EOS.
    confidence_eos_eot_inf: a position whose drawn token is EOS/EOT scores zero confidence.
    faithful: reproduce the published quirks listed in the module docstring.
    """

    gen_length: int
    steps: int | None = None
    block_length: int | None = None
    order: str = "confidence"
    order_temperature: float = 0.0
    schedule: str = "dream"
    threshold: float = 0.9
    entropy_budget: float = 0.1
    eps: float = 1e-3
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    gumbel_dtype: str = "float32"
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    faithful: bool = False

    def __post_init__(self):
        fix = functools.partial(object.__setattr__, self)
        if not isinstance(self.gen_length, int) or self.gen_length < 1:
            raise JdlmError(f"gen_length={self.gen_length!r} must be a positive integer")
        fix("steps", self.gen_length if self.steps is None else self.steps)
        fix("block_length", self.gen_length if self.block_length is None else self.block_length)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise JdlmError(f"steps={self.steps!r} must be a positive integer")
        if self.block_length < 1 or self.gen_length % self.block_length:
            raise JdlmError(f"block_length={self.block_length} must divide gen_length="
                            f"{self.gen_length} (use block_length={self.gen_length} for no blocks)")
        if self.steps % self.num_blocks:
            raise JdlmError(f"steps={self.steps} must be a multiple of the number of blocks "
                            f"gen_length/block_length={self.num_blocks}; try steps="
                            f"{max(1, self.steps // self.num_blocks) * self.num_blocks}")
        if self.order not in um.ORDERS:
            raise JdlmError(f"unknown order {self.order!r}; expected one of {um.ORDERS}")
        if self.schedule not in um.SCHEDULES:
            raise JdlmError(f"unknown schedule {self.schedule!r}; expected one of {um.SCHEDULES}")
        if not 0.0 < self.threshold <= 1.0:
            raise JdlmError(f"threshold={self.threshold} must be in (0, 1]")
        if self.entropy_budget < 0:
            raise JdlmError(f"entropy_budget={self.entropy_budget} must be >= 0")
        if not 0.0 < self.eps < 1.0:
            raise JdlmError(f"eps={self.eps} must be in (0, 1)")
        for name in ("temperature", "order_temperature", "cfg_scale"):
            if getattr(self, name) < 0:
                raise JdlmError(f"{name}={getattr(self, name)} must be >= 0")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise JdlmError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise JdlmError(f"top_k={self.top_k!r} must be a positive integer")
        if self.gumbel_dtype not in ("float32", "float64"):
            raise JdlmError(f"gumbel_dtype={self.gumbel_dtype!r} must be float32 or float64")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def adaptive(self) -> bool:
        """Schedules whose count depends on the model's certainty, not on the step."""
        return self.schedule in ("threshold", "entropy_bound")

    @property
    def max_passes(self) -> int:
        return self.gen_length if self.adaptive else self.steps

    def replace(self, **changes) -> SamplerConfig:
        return dataclasses.replace(self, **changes)


# -- host-side preparation --------------------------------------------------------------------


def prompt_bucket(length: int, gen_length: int, context: int) -> int:
    """Padded prompt length: the next power of two (at least 16), capped by the context."""
    bucket = max(MIN_PROMPT_BUCKET, 1 << max(0, length - 1).bit_length())
    return max(length, min(bucket, context - gen_length))


def _pad_id(cfg: ModelConfig) -> int:
    for value in (cfg.pad_token_id, cfg.eos_token_id):
        if value is not None:
            return int(value)
    raise JdlmError("the model config has neither pad_token_id nor eos_token_id; set one")


def _check_runtime(config: SamplerConfig, cfg: ModelConfig, longest: int) -> None:
    context = cfg.max_position_embeddings
    if longest + config.gen_length > context:
        raise JdlmError(f"prompt ({longest} tokens) + gen_length ({config.gen_length}) exceeds the "
                        f"model's context of {context} positions; shorten one of them")
    wants_x64 = config.gumbel_dtype == "float64" and config.temperature > 0
    if wants_x64 and not jax.config.jax_enable_x64:
        raise JdlmError("gumbel_dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
                        "jax.config.update('jax_enable_x64', True)) before importing jdlm, or "
                        "use gumbel_dtype='float32'")
    if config.top_k is not None and config.top_k > cfg.vocab_size:
        raise JdlmError(f"top_k={config.top_k} is larger than the vocabulary ({cfg.vocab_size})")
    ids = {"eos_token_id": config.logits_eos_inf or config.confidence_eos_eot_inf,
           "eot_token_id": config.confidence_eos_eot_inf}
    for name, needed in ids.items():
        if needed and getattr(cfg, name) is None:
            raise JdlmError(f"this sampler needs the model's {name}, which its config does not set")


def _row_seeds(seed, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(seed, salt) per row: an int seed gives row i (seed, i); a list gives (seed_i, 0)."""
    if isinstance(seed, (int, np.integer)):
        return np.full(batch, seed, np.uint32), np.arange(batch, dtype=np.uint32)
    seeds = np.asarray(list(seed), dtype=np.int64)
    if seeds.shape != (batch,):
        raise JdlmError(f"got {seeds.size} seeds for {batch} prompts; pass one int or one per row")
    return seeds.astype(np.uint32), np.zeros(batch, np.uint32)


def _canvas(prompts, config: SamplerConfig, cfg: ModelConfig, infill):
    """Left-padded prompt block (B, P), its mask, and the initial generated span (B, G)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise JdlmError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    _check_runtime(config, cfg, longest)
    width = prompt_bucket(longest, config.gen_length, cfg.max_position_embeddings)
    batch = len(prompts)
    prompt = np.full((batch, width), _pad_id(cfg), np.int32)
    mask = np.zeros((batch, width), np.int32)
    for row, ids in enumerate(prompts):
        ids = np.asarray(ids, np.int64)
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise JdlmError(f"prompt {row} has token ids outside [0, {cfg.vocab_size})")
        prompt[row, width - len(ids):] = ids
        mask[row, width - len(ids):] = 1
    gen = np.full((batch, config.gen_length), cfg.mask_token_id, np.int32)
    if infill is not None:
        if len(infill) != batch:
            raise JdlmError(f"infill has {len(infill)} entries for {batch} prompts")
        for row, fixed in enumerate(infill):
            for offset, token in (fixed or {}).items():
                if not 0 <= offset < config.gen_length:
                    raise JdlmError(f"infill offset {offset} of row {row} is outside the "
                                    f"generated span [0, {config.gen_length})")
                gen[row, offset] = token
    return prompt, mask, gen, longest


# -- the compiled program ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """What the program is specialised on besides the shapes."""

    config: SamplerConfig
    model: ModelConfig
    graphdef: Any
    attn_impl: str | None
    joint_sampler: Callable | None
    even_rows: bool  # no infill: all rows start every block with the same number of masks


def _ban(logits, ids):
    """-inf at the given token ids (an elementwise select: it fuses, a scatter would not)."""
    if not ids:
        return logits
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.where(jnp.isin(vocab, jnp.asarray(ids, jnp.int32)), -jnp.inf, logits)


def _take_block(x: Array, start: Int[Array, " b"], size: int) -> Array:
    """Per row, x[row, start[row]:start[row] + size] (x is (B, G, ...))."""
    return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size, axis=0))(x, start)


def _put_block(x: Array, block: Array, start: Int[Array, " b"]) -> Array:
    return jax.vmap(lambda row, new, s: jax.lax.dynamic_update_slice_in_dim(row, new, s, axis=0))(
        x, block, start)


def _position_noise(token_keys, positions: Int[Array, "b n"], vocab: int, dtype):
    """Gumbel noise (B, n, V) for the given block positions, keyed by (row key, position)."""
    return jax.vmap(lambda key, row: jax.vmap(
        lambda p: jax.random.gumbel(jax.random.fold_in(key, p), (vocab,), dtype))(row))(
            token_keys, positions)


@functools.partial(jax.jit, static_argnames=("static",))
def _program(state, joint_params, prompt, prompt_mask, gen, seeds, salts, *, static: _Static):
    """(gen (B, G) tokens, revealed_at (B, G) step or -1, passes run).

    Only the active block (B, K = block_length) goes through the output head and the sampling
    math: with semi-autoregressive blocks that is a fraction of the canvas, and the prompt is
    never projected onto the vocabulary.
    """
    config, cfg = static.config, static.model
    width, size = prompt.shape[1], config.block_length
    mask_id = cfg.mask_token_id
    model = nnx.merge(static.graphdef, state)
    attention = jnp.concatenate([prompt_mask, jnp.ones_like(gen)], axis=1)
    given = gen != mask_id  # infilled tokens, masked with the prompt in CFG's unconditional pass
    row_keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, salts)
    fractions = jnp.asarray(um.dream_reveal_fractions(config.steps_per_block, config.eps))
    banned = [mask_id] + ([cfg.eos_token_id] if config.logits_eos_inf else [])
    zero_confidence = ([] if not config.confidence_eos_eot_inf else
                       [cfg.eot_token_id] if config.faithful else
                       sorted({cfg.eos_token_id, cfg.eot_token_id}))
    noise_dtype = jnp.float64 if config.gumbel_dtype == "float64" else jnp.float32

    def block_logits(hidden, start):
        """Output head on the active block only: (B, L, D) -> (B, K, V)."""
        return model.head(_take_block(hidden[:, width:], start, size))

    def forward(gen, start):
        """Logits of the active block (B, K, V), CFG applied, mask (and EOS) banned, and the
        hidden states (B, L, D)."""
        canvas = jnp.concatenate([prompt, gen], axis=1)
        if config.cfg_scale > 0:
            uncond = jnp.concatenate([jnp.full_like(prompt, mask_id),
                                      jnp.where(given, mask_id, gen)], axis=1)
            _, hidden = model(jnp.concatenate([canvas, uncond]),
                              jnp.concatenate([attention, attention]),
                              attn_impl=static.attn_impl, return_hidden=True)
            cond, un = jnp.split(hidden, 2)
            logits, un_logits = block_logits(cond, start), block_logits(un, start)
            # Ban tokens after guidance: -inf - -inf would be nan.
            guided = un_logits + (config.cfg_scale + 1) * (logits - un_logits)
            return _ban(guided, banned), cond
        _, hidden = model(canvas, attention, attn_impl=static.attn_impl, return_hidden=True)
        return _ban(block_logits(hidden, start), banned), hidden

    bound = None if static.joint_sampler is not None else um.reveal_bound(config, static.even_rows)

    def draw_all(sample_logits, token_keys):
        """A token at every block position: (tokens (B, K), noise (B, K, V) or None)."""
        if config.temperature == 0:
            return um.draw_tokens(sample_logits, None), None
        if static.joint_sampler is not None:
            # Keyed by position like `draw_ranked`: one token per pass with a joint sampler
            # then draws exactly what the sampler without it draws.
            positions = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), sample_logits.shape[:2])
            gumbel = _position_noise(token_keys, positions, cfg.vocab_size, noise_dtype)
        else:
            gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (size, cfg.vocab_size),
                                                          noise_dtype))(token_keys)
        return um.draw_tokens(sample_logits, gumbel), gumbel

    def draw_ranked(sample_logits, rank, token_keys):
        """Tokens only at the `bound` best-ranked positions (others 0): (B, K)."""
        slots = jnp.argsort(rank, axis=1)[:, :bound]
        logits = jnp.take_along_axis(sample_logits, slots[..., None], axis=1)
        gumbel = (None if config.temperature == 0 else
                  _position_noise(token_keys, slots, cfg.vocab_size, noise_dtype))
        drawn = um.draw_tokens(logits, gumbel)
        return jnp.put_along_axis(jnp.zeros(rank.shape, jnp.int32), slots, drawn, axis=1,
                                  inplace=False)

    def order_noise(scores, position_keys):
        if config.order_temperature > 0 and config.order != "random":
            # Gumbel-top-k = sampling k positions from softmax(score/T) without replacement.
            scores = scores / config.order_temperature + jax.vmap(
                lambda k: jax.random.gumbel(jax.random.fold_in(k, 1), (size,)))(position_keys)
        return scores

    def step(carry):
        i, gen, revealed_at = carry
        start = um.block_start(config, i, gen == mask_id)
        logits, hidden = forward(gen, start)
        block = _take_block(gen, start, size)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
        token_keys = jax.vmap(jax.random.fold_in, (0, None))(step_keys, 0)
        position_keys = jax.vmap(jax.random.fold_in, (0, None))(step_keys, 1)

        sample_logits = um.sampling_logits(logits, config.temperature, config.top_p, config.top_k)
        uniform = jax.vmap(lambda k: jax.random.uniform(k, (size,)))(position_keys)
        # LLaDA scores positions with the untempered softmax; Dream with the sampling one.
        llada_scores = config.faithful and config.schedule == "llada"
        score_logits = _ban(logits if llada_scores else sample_logits, zero_confidence)
        if bound is not None:  # scores do not need the tokens: draw only the revealed ones
            scores = um.position_scores(config.order, score_logits, None, uniform)
            chosen, rank = um.choose_positions(config, i, block == mask_id,
                                               order_noise(scores, position_keys), None,
                                               uniform, sample_logits, fractions)
            tokens = draw_ranked(sample_logits, rank, token_keys)
        else:
            tokens, gumbel = draw_all(sample_logits, token_keys)
            scores = um.position_scores(config.order, score_logits, tokens, uniform)
            confidence = (um.position_scores("confidence", score_logits, tokens, uniform)
                          if config.schedule == "threshold" else None)
            chosen, rank = um.choose_positions(config, i, block == mask_id,
                                               order_noise(scores, position_keys), confidence,
                                               uniform, sample_logits, fractions)
            if static.joint_sampler is not None:

                def score(logits):
                    """(sample logits, drawn tokens, position scores) of the active block."""
                    sample_logits = um.sampling_logits(logits, config.temperature, config.top_p,
                                                       config.top_k)
                    tokens = um.draw_tokens(sample_logits, gumbel)
                    score_logits = _ban(sample_logits, zero_confidence)
                    scores = um.position_scores(config.order, score_logits, tokens, uniform)
                    return tokens, order_noise(scores, position_keys)

                tokens, chosen = _joint_tokens(
                    static, joint_params, prompt, attention, gen, hidden, logits,
                    jnp.sum(chosen, axis=1), start, banned, score, model.head)
        gen = _put_block(gen, jnp.where(chosen, tokens, block), start)
        revealed_at = _put_block(
            revealed_at, jnp.where(chosen, i, _take_block(revealed_at, start, size)), start)
        return i + 1, gen, revealed_at

    def not_done(carry):
        i, gen, _ = carry
        return (i < config.max_passes) & jnp.any(gen == mask_id)

    init = (jnp.int32(0), gen, jnp.full(gen.shape, -1, jnp.int32))
    passes, gen, revealed_at = jax.lax.while_loop(not_done, step, init)
    return gen, revealed_at, passes


def _joint_tokens(static: _Static, params, prompt, attention, gen, hidden, logits, count, start,
                  banned, score, head):
    """Reveal a pass's tokens one at a time with a joint sampler (ADJUST's micro-steps).

    The schedule fixed how many tokens each row reveals this pass (`count`, (B,)); which ones is
    decided one token at a time. Each micro-step scores the block's still-masked positions with
    the current distributions (the pass's position rule), draws the token of the best one and
    writes it; then, unless every row has revealed its count, the joint sampler refines every
    position's hidden state given the new token, and the active block is projected again with
    the base model's output head (token bans re-applied). With one token per pass it never
    runs, so the result is exactly the sampler without it.

    logits: the active block's (B, K, V); hidden: the whole canvas's (B, L, D). Returns the
    block's tokens and the positions revealed, both (B, K).
    """
    config, mask_id = static.config, static.model.mask_token_id
    width, size = prompt.shape[1], config.block_length
    most = jnp.max(count)

    def micro_step(carry):
        m, gen, hidden, logits, revealed = carry
        block = _take_block(gen, start, size)
        tokens, scores = score(logits)
        masked = block == mask_id
        best = masked & (um.ranks(scores, masked) == 0) & (m < count)[:, None]
        gen = _put_block(gen, jnp.where(best, tokens, block), start)

        def refine(hidden):
            canvas = jnp.concatenate([prompt, gen], axis=1)
            hidden = static.joint_sampler(params, canvas, hidden, attention, m)
            return hidden, _ban(head(_take_block(hidden[:, width:], start, size)), banned)

        # No refinement after the pass's last token: its result would be thrown away.
        hidden, logits = jax.lax.cond(m + 1 < most, refine, lambda h: (h, logits), hidden)
        return m + 1, gen, hidden, logits, revealed | best

    init = (jnp.int32(0), gen, hidden, logits, jnp.zeros(logits.shape[:2], bool))
    _, gen, _, _, revealed = jax.lax.while_loop(lambda c: c[0] < most, micro_step, init)
    return _take_block(gen, start, size), revealed


# -- the public entry point ----------------------------------------------------------------------


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    config: SamplerConfig,
    *,
    seed: int | Sequence[int] = 0,
    infill: Sequence[Mapping[int, int] | None] | None = None,
    return_history: bool = False,
    joint_sampler: Callable | None = None,
    joint_params: Any = None,
):
    """Fill `config.gen_length` masked positions after each prompt.

    prompts: token-id lists, ragged allowed (left-padded to a shared length bucket).
    seed: an int (row i uses the key of (seed, i)) or one seed per row (row i uses (seed_i, 0),
        so its output is the same in any batch).
    infill: per row, {offset in the generated span: token id} fixed before sampling starts.
    joint_sampler: optional pure `(params, canvas (B, L), hidden (B, L, D), attention_mask
        (B, L), micro_step) -> hidden (B, L, D)`: refined final hidden states after a token was
        written, in the base model's output space (its head gives the logits), e.g.
        `jdlm.adjust.joint_sampler`. A pass then reveals its tokens one at a time, each from the
        refined distributions (see `_joint_tokens`). It must be hashable (the program is
        specialised on it); `joint_params` is its traced input.

    Returns an int32 array (B, P_max + gen_length): each row's prompt, left-padded with the pad
    id, then its generated tokens. With `return_history`, also (B, P_max + gen_length) int32:
    the pass at which each position was revealed, -1 for prompt, padding and infilled tokens.
    """
    cfg = model.config
    if joint_sampler is not None and config.cfg_scale > 0:
        raise JdlmError("a joint sampler refines the conditional distribution only; use "
                        "cfg_scale=0 with it")
    prompts = [list(p) for p in prompts]
    prompt, prompt_mask, gen, longest = _canvas(prompts, config, cfg, infill)
    seeds, salts = _row_seeds(seed, len(prompts))
    static = _Static(config, cfg, model.graphdef, model.attn_impl, joint_sampler,
                     even_rows=not any(infill or ()))
    rows = (prompt, prompt_mask, gen, seeds, salts)
    if model.mesh is None:
        out, revealed_at, _ = _program(model.state, joint_params, *rows, static=static)
    else:  # rows split over the batch axes of the model's mesh, activations constrained by it
        with jax.set_mesh(model.mesh):
            rows = [jax.device_put(x, named_sharding(("batch",) + (None,) * (x.ndim - 1),
                                                     x.shape, model.mesh)) for x in rows]
            out, revealed_at, _ = _program(model.state, joint_params, *rows, static=static)
    tokens = np.concatenate([prompt[:, prompt.shape[1] - longest:], np.asarray(out)], axis=1)
    if not return_history:
        return tokens
    history = np.concatenate([np.full((len(prompts), longest), -1, np.int32),
                              np.asarray(revealed_at)], axis=1)
    return tokens, history


def canvas_at(tokens: Int[Array, "b n"], history: Int[Array, "b n"], step: int, mask_id: int):
    """The canvas after `step` passes (0 = before the first), from `generate`'s history."""
    tokens, history = np.asarray(tokens), np.asarray(history)
    return np.where((history >= step), mask_id, tokens)
