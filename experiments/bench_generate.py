"""Generation benchmark: jdlm's compiled sampler against the published Dream loop in PyTorch.

Both run the same algorithm on the same weights and device: Dream's `diffusion_generate`
(reference/MODELS.md §1.8, alg="entropy", float32 linspace count schedule, Categorical draws)
on a tiny random Dream checkpoint. The reference is transformers' Qwen2 run bidirectionally
(a 4-D additive zero mask, eager attention) driven by a step-by-step Python loop, as Dream's
remote code does; jdlm is one XLA program (`jdlm.generate`, faithful=True).

    python experiments/bench_generate.py [--batch 8] [--gen-length 64] [--steps 64]
    python experiments/bench_generate.py --model dream-7b     # on a GPU: Dream-7B's shapes

With `--model dream-7b` both sides get the same random bf16 weights with Dream-v0-Base-7B's
shapes, built on the GPU by transformers and handed to jdlm through DLPack (no files), and the
reference runs with SDPA attention as Dream's own modeling code does; jdlm uses cuDNN attention.

Reports generated tokens per second, forward passes per generated token and milliseconds per
pass (median of --repeats timed runs after one warm-up), the jdlm/PyTorch ratio, and writes
results/bench_generate.{json,md}. Goal (issue 4): jdlm >= 3x the PyTorch loop on CPU.

A second table sets the cost of one ADJUST micro-step (jdlm.adjust, reference/ADJUST.md §4) against
one base forward pass over the same canvas: wall time on the tiny model, and FLOPs from XLA's cost
analysis next to a count by hand, on the tiny model and on Dream-7B's shapes (batch 1, a BOS prompt
and 127 generated tokens, the paper's unconditional setting; compiled from abstract shapes only).
The output head is counted on the active block only, as generate() applies it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# JAX takes 75% of a GPU by default; the PyTorch reference shares the card.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import make_dream  # noqa: E402

import jdlm  # noqa: E402
from jdlm import SamplerConfig  # noqa: E402
from jdlm.adjust import AdjustConfig, AdjustLayer, TrainedAdjust, joint_sampler  # noqa: E402
from jdlm.checkpoint import from_state_dict  # noqa: E402
from jdlm.config import ModelConfig  # noqa: E402
from jdlm.model import Model, abstract_transformer  # noqa: E402

DREAM_7B = Path(jdlm.__file__).parent / "configs" / "dream-v0-base-7b.json"
DREAM_7B_CANVAS = 128  # ADJUST's cost at 7B: batch 1, BOS + 127 generated tokens (the paper's)
DEVICE = "cuda" if jax.default_backend() == "gpu" else "cpu"


@torch.no_grad()
def dream_sample_torch(model, input_ids, mask_id, gen_length, steps, temperature, eps=1e-3):
    """Dream's `_sample` loop (alg="entropy", alg_temp=None, no padding), eager PyTorch."""
    x = torch.nn.functional.pad(input_ids, (0, gen_length), value=mask_id)
    b, n = x.shape
    bidirectional = torch.zeros(b, 1, n, n, device=x.device, dtype=model.dtype)  # attend everywhere
    timesteps = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        mask_index = x == mask_id
        logits = model(input_ids=x, attention_mask=bidirectional).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream's right shift
        logits[..., mask_id] = -torch.inf  # as jdlm: never draw the mask token
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        probs = torch.softmax(mask_logits / temperature, dim=-1)
        x0 = torch.distributions.Categorical(probs=probs).sample()
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_confidence[mask_index] = confidence
        if k > 0:
            _, transfer_index = torch.topk(full_confidence, k)
            x_ = torch.zeros_like(x) + mask_id
            x_[mask_index] = x0.clone()
            row_indices = torch.arange(b).unsqueeze(1).expand_as(transfer_index)
            x[row_indices, transfer_index] = x_[row_indices, transfer_index]
    if x.is_cuda:
        torch.cuda.synchronize()
    return x


def tiny_pair(args, tmp: Path):
    """A random tiny Dream checkpoint: (transformers model, jdlm model), same weights."""
    torch_model = make_dream(tmp / "dream", hidden=args.hidden, heads=4, kv_heads=2,
                             layers=args.layers, vocab=args.vocab, intermediate=3 * args.hidden)
    return torch_model.to(DEVICE), jdlm.load(tmp / "dream")


def dream_7b_pair():
    """Random bf16 weights with Dream-v0-Base-7B's shapes, built where the benchmark runs."""
    cfg = ModelConfig.from_hf(DREAM_7B)
    qwen2 = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, use_sliding_window=False, attn_implementation="sdpa")
    qwen2.rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            torch_model = transformers.Qwen2ForCausalLM(qwen2).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    tensors = {k: jax.dlpack.from_dlpack(v.detach()) for k, v in torch_model.state_dict().items()}
    return torch_model, from_state_dict(cfg, tensors)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns, repeats):
    """Median wall time of each function, runs alternated so that a busy moment hits both
    (for calls of the same framework)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            out.append(seconds(fn))
    return [statistics.median(t) for t in times]


def block_medians(fns, repeats):
    """Median wall time of each function over its own block of runs, after a warm-up run.

    jdlm and PyTorch are not alternated: on 2 cores each run after the other framework's
    slowed down by about a third (its worker threads and caches), which measures the switch,
    not either implementation."""
    medians = []
    for fn in fns:
        fn()
        medians.append(statistics.median(seconds(fn) for _ in range(repeats)))
    return medians


@contextlib.contextmanager
def unrolled_scans():
    """XLA's cost analysis counts a while loop's body once; unrolled, the scan over the base
    layers is counted once per layer."""
    scan = jax.lax.scan
    jax.lax.scan = functools.partial(scan, unroll=True)
    try:
        yield
    finally:
        jax.lax.scan = scan


def xla_flops(fn, *args) -> float:
    """FLOPs of `fn(*args)` by XLA's cost analysis; args may be `jax.ShapeDtypeStruct`s."""
    with unrolled_scans():
        # A fresh function, so that no trace cached outside the context (scan rolled) is reused.
        cost = jax.jit(lambda *a: fn(*a)).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]  # one dict per device in a list


def analytic_flops(cfg: ModelConfig, batch: int, length: int, block: int) -> dict:
    """By hand: 2 x weights x tokens for every matmul, plus attention (QK^T and AV, 4 x heads x
    head_dim x length^2 per row); norms, softmax and rotary are left out. what -> (base, micro)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    weights = d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * hd + 3 * d * cfg.intermediate_size
    layer = 2 * batch * length * weights + 4 * batch * cfg.num_heads * hd * length**2
    base, micro = cfg.num_layers * layer, layer + 2 * batch * length * 2 * d * d  # + Linear(2H->H)
    head = 2 * batch * block * d * cfg.vocab_size
    return {"body": (base, micro), "body + head on block": (base + head, micro + head)}


def cost_programs(model: Model, layer: AdjustLayer, block: int):
    """The base pass and one ADJUST micro-step over a canvas, alone ("body") and followed by the
    output head on the active block (generate() projects only the block).

    Returns (what -> (base(state, canvas, mask), micro(params, canvas, hidden, mask)), params).
    """
    trained = TrainedAdjust(AdjustConfig(), nnx.to_pure_dict(nnx.state(layer, nnx.Param)), {})
    step, params = joint_sampler(trained, model)

    def base(state, canvas, mask):
        # The logits over the whole canvas are unused, so XLA drops them, as in generate().
        return nnx.merge(model.graphdef, state)(canvas, mask, return_hidden=True)[1]

    def micro(p, canvas, hidden, mask):
        return step(p, canvas, hidden, mask, 0)

    def head(state, hidden):
        return nnx.merge(model.graphdef, state).head(hidden[:, -block:])

    return {"body": (base, micro),
            "body + head on block": (lambda s, c, m: head(s, base(s, c, m)),
                                     lambda p, c, h, m: head(p[1], micro(p, c, h, m)))}, params


def flop_rows(name: str, model: Model, layer: AdjustLayer, canvas, hidden, block: int) -> list:
    """XLA and hand-counted FLOPs of base pass and micro-step; arrays or abstract shapes."""
    programs, params = cost_programs(model, layer, block)
    mask = jax.ShapeDtypeStruct(canvas.shape, jnp.int32)
    rows = []
    for what, (base, micro) in programs.items():
        rows.append({"model": name, "what": f"GFLOP by XLA, {what}",
                     "base": xla_flops(base, model.state, canvas, mask) / 1e9,
                     "micro": xla_flops(micro, params, canvas, hidden, mask) / 1e9})
    for what, (base, micro) in analytic_flops(model.config, *canvas.shape, block).items():
        rows.append({"model": name, "what": f"GFLOP by hand, {what}", "base": base / 1e9,
                     "micro": micro / 1e9})
    return rows


def adjust_cost(model: Model, name: str, canvas: np.ndarray, block: int, repeats: int) -> list:
    """Rows (model, what, base, micro, ratio): time and FLOPs of `model`, plus XLA's FLOPs on
    Dream-7B's shapes when `model` is not Dream-7B itself (compiled from abstract shapes; the
    counts do not depend on the device). A fresh random layer: the cost does not depend on its
    weights."""
    canvas = jnp.asarray(canvas, jnp.int32)
    mask = jnp.ones_like(canvas)
    layer = AdjustLayer(model.config, AdjustConfig(), rngs=nnx.Rngs(0), dtype=model.dtype)
    programs, params = cost_programs(model, layer, block)
    hidden = jax.jit(programs["body"][0])(model.state, canvas, mask)
    rows = []
    for what, (base, micro) in programs.items():
        base, micro = jax.jit(base), jax.jit(micro)
        calls = [lambda: jax.block_until_ready(base(model.state, canvas, mask)),
                 lambda: jax.block_until_ready(micro(params, canvas, hidden, mask))]
        for call in calls:
            call()  # compile
        base_s, micro_s = interleaved_medians(calls, repeats)
        rows.append({"model": name, "what": f"ms on {jax.devices()[0].platform}, {what}",
                     "base": 1e3 * base_s, "micro": 1e3 * micro_s})
    if name == "Dream-7B":  # XLA's count of 28 unrolled 7B layers costs minutes of compiling
        for what, (base, micro) in analytic_flops(model.config, *canvas.shape, block).items():
            rows.append({"model": name, "what": f"GFLOP by hand, {what}", "base": base / 1e9,
                         "micro": micro / 1e9})
    else:
        rows += flop_rows(name, model, layer, canvas, hidden, block)
        cfg = ModelConfig.from_hf(DREAM_7B)
        # float32, not the checkpoint's bf16: the matmul FLOPs are the same, but XLA:CPU
        # converts bf16 weights to f32 and counts every converted element, the whole layer
        # stack per layer (+12% on the base pass), which a bf16 accelerator does not do.
        big = Model.from_module(abstract_transformer(cfg))
        big_layer = nnx.eval_shape(lambda: AdjustLayer(cfg, AdjustConfig(), rngs=nnx.Rngs(0)))
        length = DREAM_7B_CANVAS
        rows += flop_rows("Dream-7B", big, big_layer, jax.ShapeDtypeStruct((1, length), jnp.int32),
                          jax.ShapeDtypeStruct((1, length, cfg.hidden_size), jnp.float32),
                          length - 1)
    for r in rows:
        r["ratio"] = r["micro"] / r["base"]
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "dream-7b"], default="tiny",
                    help="tiny: a random tiny Dream checkpoint (the CPU benchmark); dream-7b: "
                         "random bf16 weights with Dream-v0-Base-7B's shapes (needs a GPU)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (tiny), 1 (dream-7b)")
    ap.add_argument("--prompt-length", type=int, default=None, help="default 16 (tiny), 64 (7B)")
    ap.add_argument("--gen-length", type=int, default=None, help="default 64 (tiny), 256 (7B)")
    ap.add_argument("--steps", type=int, default=None, help="default: --gen-length")
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--hidden", type=int, default=64, help="tiny model only")
    ap.add_argument("--layers", type=int, default=2, help="tiny model only")
    ap.add_argument("--vocab", type=int, default=512, help="tiny model only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); on a CPU shared with "
                         "other jobs, 1 avoids torch's thread contention")
    ap.add_argument("--out-dir", default="results")
    args = ap.parse_args(argv)
    big = args.model == "dream-7b"
    if big and DEVICE != "cuda":
        ap.error("--model dream-7b needs a CUDA GPU (15 GB of bf16 weights, twice)")
    args.batch = args.batch or (1 if big else 8)
    args.prompt_length = args.prompt_length or (64 if big else 16)
    args.gen_length = args.gen_length or (256 if big else 64)
    args.steps = args.steps or args.gen_length
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    if big:
        torch_model, model = dream_7b_pair()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            torch_model, model = tiny_pair(args, Path(tmp))
    vocab = model.config.vocab_size
    mask_id = model.config.mask_token_id
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, min(vocab - 3, mask_id), size=(args.batch, args.prompt_length))
    config = SamplerConfig(gen_length=args.gen_length, steps=args.steps, order="entropy",
                           schedule="dream", temperature=args.temperature, faithful=True)
    generated = args.batch * args.gen_length

    seeds = iter(range(10**6))
    input_ids = torch.as_tensor(prompts, dtype=torch.long, device=DEVICE)
    torch.manual_seed(0)

    def run_jdlm():
        return jdlm.generate(model, prompts.tolist(), config, seed=next(seeds))

    def run_torch():
        return dream_sample_torch(torch_model, input_ids, mask_id, args.gen_length, args.steps,
                                  args.temperature)
    compile_s, warmup_torch_s = seconds(run_jdlm), seconds(run_torch)
    jdlm_s, torch_s = block_medians([run_jdlm, run_torch], args.repeats)
    alternated = interleaved_medians([run_jdlm, run_torch], args.repeats)

    rows = {
        "jdlm (one XLA program)": {"seconds": jdlm_s, "first_call_s": compile_s},
        "PyTorch loop (transformers Qwen2, Dream _sample)": {"seconds": torch_s,
                                                             "first_call_s": warmup_torch_s},
    }
    for r in rows.values():
        r["tokens_per_s"] = generated / r["seconds"]
        r["forward_passes_per_token"] = args.steps / args.gen_length
        r["ms_per_step"] = 1e3 * r["seconds"] / args.steps
    ratio = torch_s / jdlm_s
    if DEVICE == "cuda":
        device = (f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, "
                  f"torch {torch.__version__}")
    else:
        device = (f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
                  f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                  f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)")
    model_name = ("Dream-7B shapes, random bf16 weights" if big else
                  f"tiny Dream (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab})")
    setup = (f"{model_name}, batch {args.batch}, prompt {args.prompt_length}, "
             f"gen {args.gen_length}, steps {args.steps}, alg entropy, T {args.temperature}")
    lines = [f"device: {device}", f"setup: {setup}", "",
             "| implementation | tokens/s | forward passes/token | ms/step | first call s |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['forward_passes_per_token']:.2f} "
                     f"| {r['ms_per_step']:.2f} | {r['first_call_s']:.2f} |")
    lines += ["", f"jdlm / PyTorch speed ratio: {ratio:.2f}x"
              f"{' (goal >= 3x)' if not big else ''}; "
              f"{alternated[1] / alternated[0]:.2f}x with the two alternated run by run"]

    if big:  # the paper's unconditional setting for the micro-step's cost
        del torch_model
        torch.cuda.empty_cache()
        block = DREAM_7B_CANVAS - 1
        canvas = np.concatenate([[[model.config.bos_token_id]], np.full((1, block), mask_id)], 1)
    else:
        block = args.gen_length
        canvas = np.concatenate([prompts, np.full((args.batch, block), mask_id)], axis=1)
    # Each call takes milliseconds: more samples than for a whole generation.
    cost = adjust_cost(model, "Dream-7B" if big else "tiny", canvas, block, 20 * args.repeats)
    lines += ["", "One ADJUST micro-step against one base forward pass over the same canvas "
              f"({'batch 1, 128 tokens' if big else 'tiny: as above; Dream-7B: batch 1, 128 tokens'}"
              f"; time on {device})", "",
              "| model | what | base pass | ADJUST micro-step | ratio |",
              "|---|---|---:|---:|---:|"]
    for r in cost:
        lines.append(f"| {r['model']} | {r['what']} | {r['base']:.4g} | {r['micro']:.4g} "
                     f"| {r['ratio']:.3f} |")
    print("\n".join(lines))
    result = {"device": device, "setup": setup, "rows": rows, "ratio": ratio, "adjust_cost": cost}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_generate" + ("_dream7b" if big else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return result

if __name__ == "__main__":
    main()
