"""Generation benchmark: jdlm's compiled sampler against the published Dream loop in PyTorch.

Both run the same algorithm on the same weights and device: Dream's `diffusion_generate`
(reference/MODELS.md §1.8, alg="entropy", float32 linspace count schedule, Categorical draws)
on a tiny random Dream checkpoint. The reference is transformers' Qwen2 run bidirectionally
(a 4-D additive zero mask, eager attention) driven by a step-by-step Python loop, as Dream's
remote code does; jdlm is one XLA program (`jdlm.generate`, faithful=True).

    python experiments/bench_generate.py [--batch 8] [--gen-length 64] [--steps 64]

Reports generated tokens per second, forward passes per generated token and milliseconds per
pass (median of --repeats timed runs after one warm-up), the jdlm/PyTorch ratio, and writes
results/bench_generate.{json,md}. Goal (issue 4): jdlm >= 3x the PyTorch loop on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_reference import make_dream  # noqa: E402

import jdlm  # noqa: E402
from jdlm import SamplerConfig  # noqa: E402


@torch.no_grad()
def dream_sample_torch(model, input_ids, mask_id, gen_length, steps, temperature, eps=1e-3):
    """Dream's `_sample` loop (alg="entropy", alg_temp=None, no padding), eager PyTorch."""
    x = torch.nn.functional.pad(input_ids, (0, gen_length), value=mask_id)
    b, n = x.shape
    bidirectional = torch.zeros(b, 1, n, n)  # additive 4-D mask: attend everywhere
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
    return x


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns, repeats):
    """Median wall time of each function, runs alternated so that a busy moment hits both."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            out.append(seconds(fn))
    return [statistics.median(t) for t in times]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); on a CPU shared with "
                         "other jobs, 1 avoids torch's thread contention")
    ap.add_argument("--out-dir", default="results")
    args = ap.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        torch_model = make_dream(Path(tmp) / "dream", hidden=args.hidden, heads=4, kv_heads=2,
                                 layers=args.layers, vocab=args.vocab,
                                 intermediate=3 * args.hidden)
        model = jdlm.load(Path(tmp) / "dream")
    mask_id = model.config.mask_token_id
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, args.vocab - 3, size=(args.batch, args.prompt_length))
    config = SamplerConfig(gen_length=args.gen_length, steps=args.steps, order="entropy",
                           schedule="dream", temperature=args.temperature, faithful=True)
    generated = args.batch * args.gen_length

    seeds = iter(range(10**6))
    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    torch.manual_seed(0)

    def run_jdlm():
        return jdlm.generate(model, prompts.tolist(), config, seed=next(seeds))

    def run_torch():
        return dream_sample_torch(torch_model, input_ids, mask_id, args.gen_length, args.steps,
                                  args.temperature)
    compile_s, warmup_torch_s = seconds(run_jdlm), seconds(run_torch)
    jdlm_s, torch_s = interleaved_medians([run_jdlm, run_torch], args.repeats)

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
    device = (f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
              f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)")
    setup = (f"tiny Dream (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
             f"batch {args.batch}, prompt {args.prompt_length}, gen {args.gen_length}, "
             f"steps {args.steps}, alg entropy, T {args.temperature}")
    lines = [f"device: {device}", f"setup: {setup}", "",
             "| implementation | tokens/s | forward passes/token | ms/step | first call s |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['forward_passes_per_token']:.2f} "
                     f"| {r['ms_per_step']:.2f} | {r['first_call_s']:.2f} |")
    lines += ["", f"jdlm / PyTorch speed ratio: {ratio:.1f}x (goal >= 3x)"]
    print("\n".join(lines))
    result = {"device": device, "setup": setup, "rows": rows, "ratio": ratio}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_generate.json").write_text(json.dumps(result, indent=2))
    (out / "bench_generate.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
