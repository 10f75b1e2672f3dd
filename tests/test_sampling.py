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
    cfg = ModelConfig(
        family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_layers=1, num_heads=2, num_kv_heads=2, head_dim=hidden // 2, rope_theta=1e4,
        norm_eps=1e-5, qkv_bias=family == "dream", tie_embeddings=False,
        logit_shift=int(family == "dream"), mask_token_id=vocab - 1, pad_token_id=vocab - 2,
        eos_token_id=vocab - 2, eot_token_id=vocab - 3, max_position_embeddings=64, **overrides)
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
def state_probs(enum_model):
    """Token distribution p_j(v) at every masked position of every partial canvas.

    The canvas is laid out exactly as `generate` lays it out (left padding to the bucket), the
    mask token is never drawn (as in jdlm), temperature 1.
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
    return {state: softmax(logits[row]) for row, state in enumerate(states)}


def exact_distribution(state_probs, order: str, order_temperature: float = 0.0):
    """P(final canvas) when each pass reveals one position chosen by the rule, by recursion."""

    def position_law(state):
        """{(position, token): probability} for one pass from `state`."""
        probs = state_probs[state]
        masked = [j for j, t in enumerate(state) if t is None]
        law = {}
        if order == "confidence":  # the score depends on the drawn tokens: enumerate them all
            for drawn in itertools.product(range(MASK), repeat=len(masked)):
                weight = math.prod(probs[j][v] for j, v in zip(masked, drawn))
                conf = np.array([probs[j][v] for j, v in zip(masked, drawn)])
                choice = pick(conf)
                for c, j, v in zip(choice, masked, drawn):
                    law[j, v] = law.get((j, v), 0.0) + weight * c
            return law
        if order == "random":
            score = None
        elif order == "margin":
            score = np.array([np.diff(np.sort(probs[j])[-2:])[0] for j in masked])
        else:
            score = np.array([np.sum(probs[j] * np.log(probs[j] + 1e-10)) for j in masked])
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


ENUM_CASES = [("random", 0.0), ("confidence", 0.0), ("margin", 0.0), ("entropy", 0.0),
              ("confidence", 0.05), ("entropy", 0.5)]


@pytest.mark.parametrize("order,order_temperature", ENUM_CASES)
def test_one_token_per_pass_samples_the_exact_distribution(enum_model, state_probs, order,
                                                           order_temperature):
    # The llada schedule with steps == gen_length reveals exactly one token per pass.
    config = SamplerConfig(gen_length=ENUM_GEN, steps=ENUM_GEN, schedule="llada", order=order,
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


def test_one_pass_gives_the_product_of_marginals(enum_model, state_probs):
    config = SamplerConfig(gen_length=ENUM_GEN, steps=1, schedule="llada", temperature=1.0)
    exact = product_of_marginals(state_probs)
    tv = total_variation(empirical(enum_model, config), exact)
    assert tv < tv_bound(exact, ENUM_SAMPLES)
