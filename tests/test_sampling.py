"""Samplers: exact distributions by enumeration, the published algorithms transcribed in NumPy,
one compilation per bucket, batch invariance, and early, clear errors.

The model in these tests is a tiny random transformer; it is only the source of logits. What is
under test is the sampler, checked against things that do not use it: an exact enumeration of
every reveal order and token, and step-by-step transcriptions of Dream's `_sample` and LLaDA's
`generate` (reference/MODELS.md §1.8, §2.6).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jdlm import JdlmError, ModelConfig, SamplerConfig, generate
from jdlm import sampling
from jdlm.model import Model, Transformer
from jdlm.unmasking import dream_reveal_fractions, torch_linspace_f32

MASK, EOS, EOT = 5, 4, 3


def tiny_model(family: str, *, vocab=6, scale=1.0, seed=0, hidden=16, **overrides) -> Model:
    """A random tiny model; `scale` multiplies every weight so the distributions are peaked."""
    fields = dict(
        family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_layers=1, num_heads=2, num_kv_heads=2, head_dim=hidden // 2, rope_theta=1e4,
        norm_eps=1e-5, qkv_bias=family == "dream", tie_embeddings=False,
        logit_shift=int(family == "dream"), mask_token_id=vocab - 1, pad_token_id=vocab - 2,
        eos_token_id=vocab - 2, eot_token_id=vocab - 3, max_position_embeddings=64)
    cfg = ModelConfig(**(fields | overrides))
    module = Transformer(cfg, rngs=nnx.Rngs(seed))
    if scale != 1.0:
        graphdef, state = nnx.split(module)
        module = nnx.merge(graphdef, jax.tree.map(lambda a: a * scale, state))
    return Model.from_module(module)


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


# ------------------------------------------------------------------------------------------------
# 1. Exactness by enumeration
# ------------------------------------------------------------------------------------------------

ENUM_PROMPT = [0, 1]
ENUM_GEN = 3
ENUM_SAMPLES = 20_000


@pytest.fixture(scope="module")
def enum_model():
    return tiny_model("llada", scale=5.0, seed=0)


@pytest.fixture(scope="module")
def state_logits(enum_model):
    """Logits at the masked positions of every partial canvas, mask token banned (as in jdlm).

    The canvas is laid out exactly as `generate` lays it out (left padding to the bucket).
    """
    cfg = enum_model.config
    width = sampling.prompt_bucket(len(ENUM_PROMPT), ENUM_GEN, cfg.max_position_embeddings)
    states = list(itertools.product([None, 0, 1, 2, 3, 4], repeat=ENUM_GEN))
    tokens = np.full((len(states), width + ENUM_GEN), cfg.pad_token_id, np.int32)
    tokens[:, width - len(ENUM_PROMPT):width] = ENUM_PROMPT
    for row, state in enumerate(states):
        tokens[row, width:] = [MASK if t is None else t for t in state]
    attention = (np.arange(width + ENUM_GEN) >= width - len(ENUM_PROMPT)).astype(np.int32)
    attention = np.broadcast_to(attention, tokens.shape)
    logits = np.asarray(enum_model.logits(tokens, attention), np.float64)[:, width:]
    logits[..., MASK] = -np.inf
    return {state: logits[row] for row, state in enumerate(states)}


@pytest.fixture(scope="module")
def state_probs(state_logits):
    """Token distribution p_j(v) at temperature 1 for every partial canvas."""
    return {state: softmax(logits) for state, logits in state_logits.items()}


def exact_distribution(state_probs, order: str, order_temperature: float = 0.0,
                       score_probs=None):
    """P(final canvas) when each pass reveals one position chosen by the rule, by recursion.

    Tokens are drawn from `state_probs`; positions are scored with `score_probs` (the same by
    default, as in Dream; LLaDA scores with the untempered softmax).
    """
    score_probs = state_probs if score_probs is None else score_probs

    def position_law(state):
        """{(position, token): probability} for one pass from `state`."""
        probs, scored = state_probs[state], score_probs[state]
        masked = [j for j, t in enumerate(state) if t is None]
        law = {}
        if order == "confidence":  # the score depends on the drawn tokens: enumerate them all
            for drawn in itertools.product(range(MASK), repeat=len(masked)):
                weight = math.prod(probs[j][v] for j, v in zip(masked, drawn))
                conf = np.array([scored[j][v] for j, v in zip(masked, drawn)])
                choice = pick(conf)
                for c, j, v in zip(choice, masked, drawn):
                    law[j, v] = law.get((j, v), 0.0) + weight * c
            return law
        if order == "random":
            score = None
        elif order == "margin":
            score = np.array([np.diff(np.sort(scored[j])[-2:])[0] for j in masked])
        else:
            score = np.array([np.sum(scored[j] * np.log(scored[j] + 1e-10)) for j in masked])
        choice = np.full(len(masked), 1 / len(masked)) if score is None else pick(score)
        for c, j in zip(choice, masked):
            for v in range(MASK):
                law[j, v] = c * probs[j][v]
        return law

    def pick(score):
        if order_temperature > 0:
            return softmax(score / order_temperature)
        out = np.zeros(len(score))
        out[np.argmax(score)] = 1.0
        return out

    def walk(state, weight, out):
        if None not in state:
            out[state] = out.get(state, 0.0) + weight
            return
        for (j, v), p in position_law(state).items():
            if p > 0:
                walk(state[:j] + (v,) + state[j + 1:], weight * p, out)

    out = {}
    walk((None,) * ENUM_GEN, 1.0, out)
    return out


def product_of_marginals(state_probs):
    probs = state_probs[(None,) * ENUM_GEN]
    return {x: math.prod(probs[j][v] for j, v in enumerate(x))
            for x in itertools.product(range(MASK), repeat=ENUM_GEN)}


def empirical(model, config: SamplerConfig):
    """20,000 samples in one batched call, one seed per row."""
    prompts = [ENUM_PROMPT] * ENUM_SAMPLES
    tokens = generate(model, prompts, config, seed=list(range(ENUM_SAMPLES)))
    rows, counts = np.unique(tokens[:, len(ENUM_PROMPT):], axis=0, return_counts=True)
    return {tuple(int(t) for t in r): c / ENUM_SAMPLES for r, c in zip(rows, counts)}


def total_variation(p, q):
    return 0.5 * sum(abs(p.get(x, 0.0) - q.get(x, 0.0)) for x in set(p) | set(q))


def tv_bound(p, n, delta=1e-6):
    """A bound the empirical TV exceeds with probability < delta when the sampler is exact.

    E[TV] <= 0.5 sum_x sqrt(p(x)(1-p(x))/n) (Jensen on each |p_hat - p|), and TV is a function
    of n independent samples that moves by at most 1/n per sample, so McDiarmid gives
    P(TV > E[TV] + t) <= exp(-2 n t^2).
    """
    mean = 0.5 * sum(math.sqrt(v * (1 - v) / n) for v in p.values())
    return mean + math.sqrt(math.log(1 / delta) / (2 * n))


ENUM_CASES = [("random", 0.0, "llada"), ("confidence", 0.0, "llada"), ("margin", 0.0, "llada"),
              ("entropy", 0.0, "llada"), ("confidence", 0.05, "llada"), ("entropy", 0.5, "llada"),
              ("margin", 0.0, "dream")]


@pytest.mark.parametrize("order,order_temperature,schedule", ENUM_CASES)
def test_one_token_per_pass_samples_the_exact_distribution(enum_model, state_probs, order,
                                                           order_temperature, schedule):
    # With steps == gen_length, the llada schedule and the corrected dream one reveal exactly
    # one token per pass (random/margin/entropy then draw a token only where they reveal).
    config = SamplerConfig(gen_length=ENUM_GEN, steps=ENUM_GEN, schedule=schedule, order=order,
                           order_temperature=order_temperature, temperature=1.0)
    exact = exact_distribution(state_probs, order, order_temperature)
    assert abs(sum(exact.values()) - 1) < 1e-9
    bound = tv_bound(exact, ENUM_SAMPLES)
    # The test has power: this rule's exact law is far from the product of marginals (what
    # one-shot decoding gives) and, for a scored rule, from the law of random order.
    assert total_variation(exact, product_of_marginals(state_probs)) > 2 * bound
    if order != "random":
        assert total_variation(exact, exact_distribution(state_probs, "random")) > bound
    tv = total_variation(empirical(enum_model, config), exact)
    assert tv < bound, f"{order}: TV {tv:.4f} >= bound {bound:.4f}"


def test_llada_scores_with_the_untempered_softmax(enum_model, state_logits, state_probs):
    """At temperature 0.5, faithful LLaDA draws from softmax(l / 0.5) but ranks positions by
    softmax(l)[token]; the default ranks by the tempered probability (Dream's rule)."""
    tempered = {state: softmax(logits / 0.5) for state, logits in state_logits.items()}
    llada = exact_distribution(tempered, "confidence", score_probs=state_probs)
    dream = exact_distribution(tempered, "confidence")
    bound = tv_bound(llada, ENUM_SAMPLES)
    assert total_variation(llada, dream) > 2 * bound
    config = SamplerConfig(gen_length=ENUM_GEN, steps=ENUM_GEN, schedule="llada",
                           order="confidence", temperature=0.5, faithful=True)
    assert total_variation(empirical(enum_model, config), llada) < bound


def test_one_pass_gives_the_product_of_marginals(enum_model, state_probs):
    config = SamplerConfig(gen_length=ENUM_GEN, steps=1, schedule="llada", temperature=1.0)
    exact = product_of_marginals(state_probs)
    tv = total_variation(empirical(enum_model, config), exact)
    assert tv < tv_bound(exact, ENUM_SAMPLES)


def dream_filtered_probs(logits, temperature, top_p, top_k):
    """Dream's `sample_tokens` distribution in NumPy: logits / T, top_p_logits, top_k_logits."""
    logits = logits / temperature
    floor = np.finfo(np.float64).min
    order = np.argsort(-logits, axis=-1, kind="stable")
    cum = np.cumsum(softmax(np.take_along_axis(logits, order, -1)), -1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].copy()
    remove[..., 0] = False
    mask = np.zeros_like(remove)
    np.put_along_axis(mask, order, remove, -1)
    logits = np.where(mask, floor, logits)
    kth = -np.sort(-logits, axis=-1)[..., top_k - 1:top_k]
    return softmax(np.where(logits < kth, floor, logits))


def test_temperature_top_p_top_k_draw_from_the_filtered_distribution(enum_model, state_logits):
    """One pass, all positions: the product of Dream's tempered, filtered marginals."""
    temperature, top_p, top_k = 0.7, 0.8, 3
    probs = dream_filtered_probs(state_logits[(None,) * ENUM_GEN], temperature, top_p, top_k)
    assert ((probs > 1e-12).sum(-1) < 4).all() and ((probs > 1e-12).sum(-1) > 1).any()
    exact = {x: math.prod(probs[j][v] for j, v in enumerate(x))
             for x in itertools.product(range(MASK), repeat=ENUM_GEN)}
    tempered = softmax(state_logits[(None,) * ENUM_GEN] / temperature)
    unfiltered = {x: math.prod(tempered[j][v] for j, v in enumerate(x)) for x in exact}
    bound = tv_bound(exact, ENUM_SAMPLES)
    assert total_variation(exact, unfiltered) > 2 * bound  # the filters matter here
    config = SamplerConfig(gen_length=ENUM_GEN, steps=1, schedule="llada",
                           temperature=temperature, top_p=top_p, top_k=top_k)
    assert total_variation(empirical(enum_model, config), exact) < bound


# ------------------------------------------------------------------------------------------------
# 2. Published semantics at temperature 0: NumPy transcriptions of the reference loops
# ------------------------------------------------------------------------------------------------
# Both transcriptions differ from the published code in one documented way: the mask token is
# never drawn (jdlm bans it; a random model would otherwise "reveal" a mask). Logits come from
# `model.logits`, which already applies Dream's right shift (MODELS.md §1.6).

SEM_VOCAB = 16
SEM_PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 2, 3]]


def left_pad(prompts, width, pad):
    tokens = np.full((len(prompts), width), pad, np.int64)
    attention = np.zeros((len(prompts), width), np.int64)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids):] = ids
        attention[row, width - len(ids):] = 1
    return tokens, attention


def dream_reference(logits_fn, input_ids, attention_mask, mask_id, max_new_tokens, steps, alg,
                    eps=1e-3):
    """Dream `_sample` (MODELS.md §1.8), temperature 0, alg_temp 0; returns (x, revealed_at)."""
    B = input_ids.shape[0]
    x = np.concatenate([input_ids, np.full((B, max_new_tokens), mask_id)], axis=1)
    attention_mask = np.concatenate([attention_mask, np.ones((B, max_new_tokens), np.int64)], 1)
    revealed_at = np.full(x.shape, -1)
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = logits_fn(x, attention_mask).copy()
        logits[..., mask_id] = -np.inf
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        probs = softmax(mask_logits.astype(np.float32))
        confidence, x0 = probs.max(-1), probs.argmax(-1)
        if alg == "topk_margin":
            sorted_probs = -np.sort(-probs, axis=-1)
            confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
        elif alg == "entropy":
            confidence = np.sum(probs * np.log(probs + 1e-10), axis=-1)
        num_mask_token = torch.tensor(mask_index.sum()) / mask_index.shape[0]
        number_transfer_tokens = (int(num_mask_token * (1 - s / t)) if i < steps - 1
                                  else int(num_mask_token))
        full_confidence = np.full(x.shape, -np.inf, np.float32)
        full_confidence[mask_index] = confidence
        if number_transfer_tokens > 0:
            x_ = np.full(x.shape, mask_id)
            x_[mask_index] = x0
            for row in range(B):
                idx = np.argsort(-full_confidence[row], kind="stable")[:number_transfer_tokens]
                x[row, idx] = x_[row, idx]
                revealed_at[row, idx] = i
    return x, revealed_at


def get_num_transfer_tokens(mask_index, steps):
    """LLaDA's helper, verbatim in NumPy."""
    mask_num = mask_index.sum(axis=1, keepdims=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = np.zeros((mask_num.shape[0], steps), np.int64) + base
    for i in range(mask_num.shape[0]):
        num_transfer_tokens[i, :remainder[i, 0]] += 1
    return num_transfer_tokens


def llada_reference(logits_fn, prompt, attention_mask, steps, gen_length, block_length,
                    cfg_scale, remasking, mask_id, logits_eos_inf=False,
                    confidence_eos_eot_inf=False, eos=None, eot=None, rng=None):
    """LLaDA `generate` (MODELS.md §2.6) at temperature 0; returns (x, revealed_at, counts)."""
    B, P = prompt.shape
    x = np.full((B, P + gen_length), mask_id)
    x[:, :P] = prompt
    attention_mask = np.concatenate([attention_mask, np.ones((B, gen_length), np.int64)], 1)
    prompt_index = x != mask_id
    revealed_at = np.full(x.shape, -1)
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    counts = []
    for num_block in range(num_blocks):
        lo, hi = P + num_block * block_length, P + (num_block + 1) * block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, lo:hi] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.copy()
                un_x[prompt_index] = mask_id
                both = logits_fn(np.concatenate([x, un_x]),
                                 np.concatenate([attention_mask, attention_mask]))
                logits, un_logits = both[:B], both[B:]
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = logits_fn(x, attention_mask).copy()
            logits[..., mask_id] = -np.inf
            if logits_eos_inf:
                logits[:, :, eos] = -np.inf
            x0 = np.argmax(logits, axis=-1)  # add_gumbel_noise is the identity at T = 0
            if confidence_eos_eot_inf:
                logits[:, :, eot] = -np.inf  # the literal effect (EOS there hits unused logits)
            if remasking == "low_confidence":
                p = softmax(logits.astype(np.float32))
                x0_p = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            else:
                x0_p = rng.random(x0.shape)
            x0_p[:, hi:] = -np.inf
            x0 = np.where(mask_index, x0, x)
            confidence = np.where(mask_index, x0_p, -np.inf)
            counts.append(num_transfer_tokens[:, i])
            for j in range(B):
                select = np.argsort(-confidence[j], kind="stable")[:num_transfer_tokens[j, i]]
                x[j, select] = x0[j, select]
                revealed_at[j, select] = num_block * steps + i
    return x, revealed_at, np.stack(counts, 1)


@pytest.fixture(scope="module")
def sem_models():
    models = {family: tiny_model(family, vocab=SEM_VOCAB, scale=6.0, seed=2)
              for family in ("dream", "llada")}
    # EOS and EOT set to tokens this model does draw, so that the EOS controls matter.
    models["llada_eos"] = tiny_model("llada", vocab=SEM_VOCAB, scale=6.0, seed=2,
                                     eos_token_id=12, eot_token_id=4)
    return models


def padded_prompts(model, gen_length):
    cfg = model.config
    width = sampling.prompt_bucket(max(map(len, SEM_PROMPTS)), gen_length,
                                   cfg.max_position_embeddings)
    return left_pad(SEM_PROMPTS, width, cfg.pad_token_id), width


def logits_fn(model):
    return lambda x, am: np.array(model.logits(x, am), np.float32)


def jdlm_run(model, config):
    """jdlm's generated tokens and reveal history (B, gen_length) for the test prompts."""
    tokens, history = generate(model, SEM_PROMPTS, config, return_history=True)
    longest = max(map(len, SEM_PROMPTS))
    return tokens[:, longest:], history[:, longest:]


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("gen_length,steps", [(8, 8), (8, 4)])
def test_dream_algorithms_match_the_published_loop(sem_models, alg, gen_length, steps):
    model = sem_models["dream"]
    order = {"maskgit_plus": "confidence", "topk_margin": "margin", "entropy": "entropy"}[alg]
    (prompt, attention), width = padded_prompts(model, gen_length)
    ref_x, ref_at = dream_reference(logits_fn(model), prompt, attention, model.config.mask_token_id,
                                    gen_length, steps, alg)
    config = SamplerConfig(gen_length=gen_length, steps=steps, order=order, schedule="dream",
                           faithful=True)
    tokens, history = jdlm_run(model, config)
    np.testing.assert_array_equal(history, ref_at[:, width:])
    np.testing.assert_array_equal(tokens, ref_x[:, width:])
    if steps == gen_length:  # the documented quirk: nothing in the first pass, two in the last
        assert not (history == 0).any() and ((history == steps - 1).sum(1) == 2).all()


LLADA_CASES = [
    dict(steps=8, gen_length=8, block_length=4, cfg_scale=0.0),
    dict(steps=6, gen_length=12, block_length=4, cfg_scale=0.5),
    dict(steps=4, gen_length=8, block_length=8, cfg_scale=1.0),
    dict(steps=8, gen_length=8, block_length=2, cfg_scale=0.0, logits_eos_inf=True),
    dict(steps=8, gen_length=8, block_length=2, cfg_scale=0.0, confidence_eos_eot_inf=True),
]


@pytest.mark.parametrize("case", LLADA_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_llada_low_confidence_matches_the_published_loop(sem_models, case):
    eos_controls = case.get("logits_eos_inf") or case.get("confidence_eos_eot_inf")
    model = sem_models["llada_eos" if eos_controls else "llada"]
    cfg = model.config
    (prompt, attention), width = padded_prompts(model, case["gen_length"])
    ref_x, ref_at, _ = llada_reference(logits_fn(model), prompt, attention,
                                       remasking="low_confidence", mask_id=cfg.mask_token_id,
                                       eos=cfg.eos_token_id, eot=cfg.eot_token_id, **case)
    config = SamplerConfig(order="confidence", schedule="llada", faithful=True, **case)
    tokens, history = jdlm_run(model, config)
    np.testing.assert_array_equal(history, ref_at[:, width:])
    np.testing.assert_array_equal(tokens, ref_x[:, width:])
    if eos_controls:  # the control changes this model's output, so the comparison has power
        plain = config.replace(logits_eos_inf=False, confidence_eos_eot_inf=False)
        plain_tokens, plain_history = jdlm_run(model, plain)
        assert not (np.array_equal(plain_tokens, tokens) and np.array_equal(plain_history, history))


def test_random_rules_reveal_the_published_counts_in_the_active_block(sem_models):
    """Random positions cannot be compared draw for draw; their law is checked by enumeration.
    Here: LLaDA `random` reveals the published count per step, only inside the current block."""
    model = sem_models["llada"]
    case = dict(steps=6, gen_length=12, block_length=4, cfg_scale=0.0)
    (prompt, attention), _ = padded_prompts(model, case["gen_length"])
    _, _, counts = llada_reference(logits_fn(model), prompt, attention, remasking="random",
                                   mask_id=model.config.mask_token_id,
                                   rng=np.random.default_rng(0), **case)
    config = SamplerConfig(order="random", schedule="llada", temperature=1.0, **case)
    _, history = jdlm_run(model, config)
    jdlm_counts = np.stack([(history == i).sum(1) for i in range(case["steps"])], 1)
    np.testing.assert_array_equal(jdlm_counts, counts)
    steps_per_block = case["steps"] // (case["gen_length"] // case["block_length"])
    block = np.arange(case["gen_length"]) // case["block_length"]
    assert (history // steps_per_block == block).all()


def test_faithful_dream_origin_reveals_each_mask_with_probability_one_minus_s_over_t(enum_model):
    """Dream's `origin`: every masked position is revealed with probability 1 - s/t at each step
    (all on the last). 4,000 rows x 8 positions; each rate within 5 standard errors."""
    steps, rows = 4, 4000
    config = SamplerConfig(gen_length=8, steps=steps, order="random", schedule="dream",
                           temperature=1.0, faithful=True)
    _, history = generate(enum_model, [ENUM_PROMPT] * rows, config, return_history=True)
    hist = history[:, -8:]
    t = torch.linspace(1, 1e-3, steps + 1).double().numpy()
    left = hist.size
    for i in range(steps):
        revealed = int((hist == i).sum())
        if i == steps - 1:
            assert revealed == left
            break
        p = 1 - t[i + 1] / t[i]
        assert abs(revealed / left - p) < 5 * math.sqrt(p * (1 - p) / left), (i, revealed, left)
        left -= revealed


def test_faithful_dream_uses_one_batch_average_count(sem_models):
    """Dream's k comes from the batch-average mask count (MODELS.md §1.8); jdlm clamps it to a
    row's own masks instead of re-masking revealed tokens, and the default counts per row."""
    model = sem_models["dream"]
    infill = [{0: 1, 1: 2, 2: 3, 3: 4}, None]  # row 0 has 4 masks, row 1 has 8
    steps = 4
    timesteps = torch.linspace(1, 1e-3, steps + 1)

    def pass_counts(faithful):
        config = SamplerConfig(gen_length=8, steps=steps, order="confidence", schedule="dream",
                               faithful=faithful)
        _, history = generate(model, SEM_PROMPTS, config, infill=infill, return_history=True)
        return np.stack([(history[:, -8:] == i).sum(1) for i in range(steps)], 1)

    left, expect = np.array([4, 8]), []
    for i in range(steps):
        m = torch.tensor(left.sum()) / 2  # float32, shared by both rows
        k = int(m * (1 - timesteps[i + 1] / timesteps[i])) if i < steps - 1 else int(m)
        expect.append(np.minimum(k, left))
        left = left - expect[-1]
    np.testing.assert_array_equal(pass_counts(True), np.stack(expect, 1))
    assert left[1] > 0  # faithfully, the row with more masks is not finished
    assert (pass_counts(False).sum(1) == [4, 8]).all()


def test_dream_grid_is_torch_linspace_bit_for_bit():
    for n in (2, 3, 9, 65, 257, 345):
        np.testing.assert_array_equal(torch_linspace_f32(1.0, 1e-3, n),
                                      torch.linspace(1, 1e-3, n).numpy())


def test_dream_counts_faithful_and_corrected():
    """MODELS.md §1.8: N=512, steps=512 gives [0, 1, ..., 1, 2]; the corrected default 1 each."""

    def counts(n, steps, corrected):
        frac, left, out = dream_reveal_fractions(steps, 1e-3), n, []
        for i in range(steps):
            k = left if i == steps - 1 else int(np.float32(left) * frac[i])
            k = max(k, 1) if corrected and left else k
            out.append(min(k, left))
            left -= out[-1]
        return out

    assert counts(512, 512, False) == [0] + [1] * 510 + [2]
    assert counts(128, 64, False)[0] == 1 and counts(128, 64, False)[-1] == 3
    assert counts(16, 4, False) == [3, 4, 4, 5]
    assert counts(512, 512, True) == [1] * 512


def test_corrected_dream_default_reveals_one_token_per_pass(sem_models):
    model = sem_models["dream"]
    config = SamplerConfig(gen_length=8, steps=8, order="entropy", schedule="dream")
    _, history = generate(model, SEM_PROMPTS, config, return_history=True)
    gen = history[:, -8:]
    assert all(sorted(row) == list(range(8)) for row in gen.tolist())


# ------------------------------------------------------------------------------------------------
# 3. One compilation per (batch size, prompt bucket); no dependence on batch-mates
# ------------------------------------------------------------------------------------------------


class CompileCounter:
    """Counts XLA backend compilations while active (jax.monitoring's compile event)."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_five_calls_in_one_bucket_compile_once(sem_models):
    model = sem_models["dream"]
    config = SamplerConfig(gen_length=8, steps=4, order="entropy", temperature=0.7, top_p=0.9)
    rng = np.random.default_rng(0)
    traces_before = sampling._program._cache_size()
    compiles = []
    for call in range(5):
        lengths = rng.integers(3, 16, size=3)  # all in the 16-token bucket
        prompts = [rng.integers(0, 13, size=n).tolist() for n in lengths]
        with CompileCounter() as counter:
            tokens = generate(model, prompts, config, seed=call)
        compiles.append(counter.count)
        assert tokens.shape == (3, max(lengths) + 8)
    assert compiles[0] >= 1 and compiles[1:] == [0, 0, 0, 0], compiles
    assert sampling._program._cache_size() == traces_before + 1


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_a_row_is_the_same_alone_and_in_a_batch(sem_models, family):
    model = sem_models[family]
    config = SamplerConfig(gen_length=8, steps=4, order="confidence", temperature=1.0)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 13, size=n).tolist() for n in (5, 3, 12, 7, 1, 9, 14, 4)]
    seeds = [11, 22, 33, 44, 55, 66, 77, 88]
    batch = generate(model, prompts, config, seed=seeds)
    for row in (0, 4, 6):
        alone = generate(model, [prompts[row]], config, seed=[seeds[row]])
        np.testing.assert_array_equal(alone[0, -8 - len(prompts[row]):],
                                      batch[row, -8 - len(prompts[row]):])
    # and the seeds matter: a different seed gives a different sample somewhere
    other = generate(model, prompts, config, seed=[s + 1 for s in seeds])
    assert not np.array_equal(other, batch)


# ------------------------------------------------------------------------------------------------
# 4. Bad input stops early, before anything is compiled
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    (dict(gen_length=8, steps=3, block_length=4), "multiple of the number of blocks"),
    (dict(gen_length=8, block_length=3), "must divide gen_length"),
    (dict(gen_length=8, order="lowest"), "unknown order"),
    (dict(gen_length=8, schedule="cosine"), "unknown schedule"),
    (dict(gen_length=8, threshold=0.0), "threshold=0.0 must be in (0, 1]"),
    (dict(gen_length=8, threshold=1.5), "threshold=1.5"),
    (dict(gen_length=8, top_p=0.0), "top_p"),
    (dict(gen_length=0), "gen_length"),
])
def test_bad_sampler_config_is_refused(kwargs, words):
    with pytest.raises(JdlmError, match=re.escape(words)):
        SamplerConfig(**kwargs)


def test_bad_requests_are_refused_before_compiling(sem_models):
    model = sem_models["dream"]  # context of 64 positions
    with CompileCounter() as counter:
        with pytest.raises(JdlmError, match="exceeds the model's context of 64"):
            generate(model, [[1, 2, 3]], SamplerConfig(gen_length=62))
        with pytest.raises(JdlmError, match="2 seeds for 1 prompts"):
            generate(model, [[1, 2, 3]], SamplerConfig(gen_length=4), seed=[1, 2])
        with pytest.raises(JdlmError, match="outside"):
            generate(model, [[1, 99]], SamplerConfig(gen_length=4))
        with pytest.raises(JdlmError, match="JAX_ENABLE_X64"):
            generate(model, [[1, 2]], SamplerConfig(gen_length=4, temperature=1.0,
                                                      gumbel_dtype="float64"))
    assert counter.count == 0


# ------------------------------------------------------------------------------------------------
# 5. Adaptive schedules, infilling, history, the joint-sampler hook
# ------------------------------------------------------------------------------------------------


def replay(model, tokens, history, gen_length):
    """Yield (pass, masked (B, G), probs (B, G, V)) for every pass of a `generate` run: the
    canvas before that pass rebuilt from the history, and the model's distribution on it."""
    batch, longest = len(SEM_PROMPTS), max(map(len, SEM_PROMPTS))
    (prompt, attention), width = padded_prompts(model, gen_length)
    attention = np.concatenate([attention, np.ones((batch, gen_length), np.int64)], 1)
    gen, hist = tokens[:, longest:], history[:, longest:]
    for step in range(hist.max() + 1):
        masked = hist >= step
        canvas = np.concatenate([prompt, np.where(masked, model.config.mask_token_id, gen)], 1)
        logits = logits_fn(model)(canvas, attention)[:, width:]
        logits[..., model.config.mask_token_id] = -np.inf
        yield step, masked, softmax(logits.astype(np.float64))


def test_threshold_reveals_every_confident_position_and_at_least_one(sem_models):
    model = sem_models["llada"]
    config = SamplerConfig(gen_length=8, schedule="threshold", threshold=0.7)
    tokens, history = generate(model, SEM_PROMPTS, config, return_history=True)
    hist = history[:, -8:]
    assert hist.max() < 7  # parallel decoding: fewer passes than tokens
    for step, masked, probs in replay(model, tokens, history, 8):
        conf = probs.max(-1)
        for row in range(2):
            if not masked[row].any():
                continue
            expect = masked[row] & (conf[row] > 0.7)
            if not expect.any():
                expect[np.argmax(np.where(masked[row], conf[row], -1))] = True
            np.testing.assert_array_equal(hist[row] == step, expect)


def test_entropy_bound_reveals_the_longest_prefix_within_budget(sem_models):
    model = sem_models["llada"]
    budget = 0.5
    config = SamplerConfig(gen_length=8, schedule="entropy_bound", entropy_budget=budget,
                           order="entropy", temperature=1.0)
    tokens, history = generate(model, SEM_PROMPTS, config, seed=[3, 4], return_history=True)
    hist = history[:, -8:]
    assert (hist >= 0).all()
    assert any(np.bincount(row).max() > 1 for row in hist)  # some pass revealed several
    for step, masked, probs in replay(model, tokens, history, 8):
        h = -np.sum(np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0), -1)
        for row in range(2):
            if not masked[row].any():
                continue
            positions = np.flatnonzero(masked[row])
            by_entropy = positions[np.argsort(h[row, positions], kind="stable")]
            take = 1
            while (take < len(by_entropy)
                   and h[row, by_entropy[:take + 1]].sum() - h[row, by_entropy[take]] <= budget):
                take += 1
            np.testing.assert_array_equal(np.flatnonzero(hist[row] == step),
                                          np.sort(by_entropy[:take]))


def test_infilled_tokens_stay_and_are_never_revealed(sem_models):
    model = sem_models["llada"]
    config = SamplerConfig(gen_length=8, steps=4, temperature=1.0)
    infill = [{0: 7, 5: 9}, None]
    tokens, history = generate(model, SEM_PROMPTS, config, infill=infill, return_history=True,
                               seed=[1, 2])
    gen, hist = tokens[:, -8:], history[:, -8:]
    assert gen[0, 0] == 7 and gen[0, 5] == 9 and hist[0, 0] == -1 and hist[0, 5] == -1
    assert (hist[0, [1, 2, 3, 4, 6, 7]] >= 0).all() and (hist[1] >= 0).all()
    assert (gen != model.config.mask_token_id).all()
    # rows left-padded with the pad id, prompt right before the generated span
    assert list(tokens[0, :4]) == [model.config.pad_token_id] * 4 and list(tokens[0, 4:9]) == [
        1, 2, 3, 4, 5]


@pytest.mark.slow
def test_float64_gumbel_runs_under_x64(tmp_path):
    """LLaDA's float64 Gumbel noise, in a fresh process with JAX_ENABLE_X64=1 (slow: a fresh
    interpreter and compile)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, 'tests'); import numpy as np\n"
        "from test_sampling import tiny_model, SEM_PROMPTS\n"
        "from jdlm import SamplerConfig, generate\n"
        "m = tiny_model('llada', vocab=16, scale=6.0, seed=2)\n"
        "c = SamplerConfig(gen_length=8, steps=4, block_length=4, schedule='llada',"
        " temperature=1.0, gumbel_dtype='float64', cfg_scale=0.5)\n"
        "t, h = generate(m, SEM_PROMPTS, c, seed=[1, 2], return_history=True)\n"
        "assert t.dtype == np.int32 and (t[:, -8:] < 15).all() and (h[:, -8:] >= 0).all()\n"
        "print('ok', t[:, -8:].tolist())\n")
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[1]), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok")


# ------------------------------------------------------------------------------------------------
# 6. The command line
# ------------------------------------------------------------------------------------------------


def test_cli_generate_jsonl_with_show_steps(tmp_path, capsys):
    import json

    from hf_reference import make_dream
    from jdlm.cli import main

    make_dream(tmp_path / "dream", vocab=32, layers=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2, 3], "id": "a"}\n{"prompt_ids": [4, 5]}\n')
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(tmp_path / "dream"), "--prompts", str(prompts),
            "--gen-length", "6", "--steps", "3", "--order", "entropy", "--temperature", "0.5",
            "--out", str(out), "--show-steps", "--delay", "0"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == ["a", None]
    assert all(len(r["tokens"]) == 6 and 31 not in r["tokens"] for r in rows)
    frames = capsys.readouterr().err
    masks_per_frame = [frame.count("░") for frame in frames.split("pass ")[1:]]
    assert masks_per_frame[0] == 12 and masks_per_frame[-1] == 0 and len(masks_per_frame) == 4
    assert all(a > b for a, b in zip(masks_per_frame, masks_per_frame[1:]))
    # the same rows again, one per batch: the CLI's per-row seeds make the batch size irrelevant
    assert main(argv[:-5] + ["--batch-size", "1", "--out", str(tmp_path / "b1.jsonl")]) == 0
    assert (tmp_path / "b1.jsonl").read_text() == out.read_text()
    assert main(["generate", "--model", str(tmp_path / "dream"), "--prompt", "hi"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    # with a tokenizer: text in, text out (cut at the first EOS)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(32)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "dream" / "tokenizer.json"))
    assert main(["generate", "--model", str(tmp_path / "dream"), "--prompt", "w1 w2 w3",
                 "--gen-length", "6", "--temperature", "1.0", "--logits-eos-inf"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["prompt"] == "w1 w2 w3" and row["prompt_ids"] == [1, 2, 3]
    assert row["text"].split() == [f"w{t}" for t in row["tokens"]]


SHARDED_SCRIPT = """
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
import jax, numpy as np
from hf_reference import make_dream
import jdlm
from jdlm import SamplerConfig, generate
assert len(jax.devices()) == 8
d = Path(tempfile.mkdtemp()) / "dream"
make_dream(d, vocab=32, hidden=32, heads=4, kv_heads=2, layers=2)
one = jdlm.load(d, mesh="fsdp=8")
one = jdlm.Model(config=one.config, graphdef=one.graphdef,
                 state=jax.device_put(one.state, jax.devices()[0]))
prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11], [1, 2], [3, 3, 3], [5], [6, 7, 8, 9]]
for mesh in ("data=2,fsdp=2,tensor=2", "data=8"):
    model = jdlm.load(d, mesh=mesh)
    for config in (SamplerConfig(gen_length=8, steps=8, order="entropy"),
                   SamplerConfig(gen_length=8, steps=4, block_length=4, schedule="llada",
                                 cfg_scale=0.5, temperature=1.0)):
        a = generate(one, prompts, config, seed=list(range(8)), return_history=True)
        b = generate(model, prompts, config, seed=list(range(8)), return_history=True)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), (mesh, config)
print("ok")
"""


@pytest.mark.slow
def test_sharded_generation_equals_one_device():
    """On 8 simulated CPU devices, a model sharded over (data, fsdp, tensor) generates exactly
    what the same weights on one device generate."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                         text=True, cwd=str(Path(__file__).resolve().parents[1]), timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.slow
def test_bench_generate_prints_the_ratio(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--batch", "2", "--gen-length", "8", "--steps", "8", "--repeats", "1",
                         "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert result["ratio"] > 0 and "jdlm / PyTorch speed ratio" in out
    assert "| ADJUST micro-step | ratio |" in out
    costs = {(r["model"], r["what"]): r["ratio"] for r in result["adjust_cost"]}
    assert 0 < costs[("Dream-7B", "GFLOP by XLA, body")] < 0.1
    assert (tmp_path / "bench_generate.md").is_file()
