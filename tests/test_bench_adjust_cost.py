"""The ADJUST cost section of experiments/bench_generate.py, checked against a count by hand."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jdlm.adjust import AdjustConfig, AdjustLayer
from jdlm.config import ModelConfig
from jdlm.model import Model, Transformer

LAYERS = 4
CFG = ModelConfig(family="dream", vocab_size=128, hidden_size=32, intermediate_size=96,
                  num_layers=LAYERS, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4,
                  norm_eps=1e-6, qkv_bias=True, tie_embeddings=False, logit_shift=1,
                  mask_token_id=127)


def load_bench():
    path = Path(__file__).resolve().parents[1] / "experiments" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_micro_step_flops_are_one_layer_and_a_projection_of_the_base_pass():
    bench = load_bench()
    model = Model.from_module(Transformer(CFG, rngs=nnx.Rngs(0)))
    layer = AdjustLayer(CFG, AdjustConfig(), rngs=nnx.Rngs(1))
    canvas = jax.ShapeDtypeStruct((2, 24), jnp.int32)
    hidden = jax.ShapeDtypeStruct((2, 24, CFG.hidden_size), jnp.float32)
    rows = {r["what"]: r for r in bench.flop_rows("tiny", model, layer, canvas, hidden, 16)}
    body = rows["GFLOP by XLA, body"]
    # One layer plus Linear(2H->H) against L layers; a rolled layer scan would count as one.
    assert 1 / (LAYERS + 1) < body["micro"] / body["base"] < 3 / LAYERS
    for what in ("body", "body + head on block"):
        xla, by_hand = rows[f"GFLOP by XLA, {what}"], rows[f"GFLOP by hand, {what}"]
        for side in ("base", "micro"):
            # XLA also counts norms, softmax and rotary, which the hand count leaves out.
            assert by_hand[side] <= xla[side] == pytest.approx(by_hand[side], rel=0.3)
