"""`jdlm demo`: the ADJUST paper's pipeline on the embedded defaults, on any CPU.

Two parts, both: train (or load) a base model, sample exact trajectories (one token per
forward pass, lowest entropy first), train ADJUST on them, then sample with K tokens per
forward pass, marginally (in parallel) and with ADJUST.

* `run_synthetic`: a sparse random bigram language with exactly known probabilities, scored
  by the exact sequence error rate (impossible transitions) and true-distribution NLL.
* `run_pydocs`: the committed tiny-pydocs model (`checkpoints/tiny-pydocs`), scored by MAUVE
  against exact samples (offline MiniLM featurizer) and, when the autoregressive judge
  `checkpoints/tiny-pydocs-ar` exists, by its per-token NLL.

Each part writes a table (markdown), results (JSON) and a plot (PNG) under its directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

SMOOTHING = 1e-3  # q_eps = (1 - eps) q + eps / |V|: an impossible transition costs ~9 nats


@dataclasses.dataclass(frozen=True)
class Setup:
    vocab: int = 8
    support: int = 2
    length: int = 16
    rows: int = 40_000
    hidden: int = 64
    layers: int = 2
    mdlm_steps: int = 1500
    trajectories: int = 2048
    adjust_steps: int = 600
    max_unroll: int = 7
    samples: int = 2000
    ks: tuple[int, ...] = (1, 2, 3, 4, 8)
    seed: int = 0

    @property
    def data(self) -> str:
        return (f"synthetic:vocab={self.vocab},order=2,support={self.support},seed={self.seed},"
                f"rows={self.rows}")


QUICK = Setup(samples=1000, ks=(1, 4))  # what tests/test_adjust_synthetic.py runs


def _metrics(lang, samples: np.ndarray) -> dict:
    """SER and true NLL per generated token; a special token anywhere is a sequence error."""
    from jdlm.eval.synthetic import synthetic_metrics

    from jdlm.eval.synthetic import smoothed_token_log_probs

    special = (samples >= lang.vocab_size).any(axis=1)
    clean = np.where(samples >= lang.vocab_size, 0, samples)
    legal = lang.is_legal(clean) & ~special
    # NLL of the generated tokens given the first (the prompt). Over legal samples only it is
    # biased (legality selects likely sequences), so the smoothed q_eps over all samples is the
    # comparable number; a special token counts as an impossible transition.
    logq = lang.token_log_probs(clean)[:, 1:].sum(axis=1)
    smoothed = smoothed_token_log_probs(lang, clean, SMOOTHING)[:, 1:]
    smoothed = np.where(special[:, None] & (samples[:, 1:] >= lang.vocab_size),
                        np.log(SMOOTHING / lang.vocab_size), smoothed).sum(axis=1)
    per_token = samples.shape[1] - 1
    return {"ser": float(1 - legal.mean()),
            "nll": float(-smoothed.mean() / per_token),
            "nll_legal": float(-logq[legal].mean() / per_token) if legal.any() else math.inf}


def run_synthetic(setup: Setup, out: Path, *, progress: bool = True) -> list[dict]:
    import jdlm
    from jdlm.adjust import AdjustConfig, joint_sampler, load_adjust, train_adjust
    from jdlm.config import TrainConfig
    from jdlm.data import synthetic_language
    from jdlm.sampling import SamplerConfig, generate
    from jdlm.sharding import make_mesh
    from jdlm.train import run as train_run
    from jdlm.trajectories import exact_sampler, sample_trajectories

    out.mkdir(parents=True, exist_ok=True)
    lang = synthetic_language(setup.data)
    mesh = make_mesh(None)
    timings = {}

    start = time.perf_counter()
    base_dir = out / "mdlm"
    if not (base_dir / "jdlm.json").exists():
        tc = TrainConfig(seq_len=setup.length, batch_size=128, steps=setup.mdlm_steps,
                         learning_rate=3e-3, warmup_steps=50, weight_decay=0.0,
                         log_every=50, eval_every=setup.mdlm_steps, eval_batches=4,
                         save_every=setup.mdlm_steps, seed=setup.seed)
        train_run(tc, data=setup.data, run_dir=out / "mdlm.run", out_dir=base_dir,
                  model_shape=dict(hidden_size=setup.hidden, intermediate_size=2 * setup.hidden,
                                   num_layers=setup.layers, num_heads=4, num_kv_heads=4,
                                   max_position_embeddings=setup.length),
                  progress=progress)
    base = jdlm.load(base_dir)
    timings["mdlm_s"] = time.perf_counter() - start

    # Prompts: a first token from the language; the model fills the other length-1.
    firsts = lang.sample(max(setup.trajectories, setup.samples), 1, seed=setup.seed + 7)[:, 0]
    gen_length = setup.length - 1

    start = time.perf_counter()
    sample_trajectories(base, [[int(t)] for t in firsts[: setup.trajectories]], out / "trajectories",
                        num=setup.trajectories, sampler=exact_sampler(gen_length, ban_eos=True),
                        seed=setup.seed, batch_size=256, progress=progress)
    timings["trajectories_s"] = time.perf_counter() - start

    start = time.perf_counter()
    adjust_dir = out / "adjust"
    if not (adjust_dir / "adjust.json").exists():
        tc = TrainConfig(batch_size=32, steps=setup.adjust_steps, learning_rate=1e-3,
                         warmup_steps=25, schedule="constant", weight_decay=0.0, log_every=25,
                         eval_every=setup.adjust_steps, save_every=setup.adjust_steps,
                         seed=setup.seed)
        train_adjust(base, out / "trajectories", adjust_dir, out / "adjust.run",
                     adjust=AdjustConfig(max_unroll=setup.max_unroll), tc=tc, mesh=mesh,
                     progress=progress)
    trained = load_adjust(adjust_dir, base)
    joint, joint_params = joint_sampler(trained, base)
    timings["adjust_s"] = time.perf_counter() - start

    prompts = [[int(t)] for t in firsts[: setup.samples]]
    seeds = [setup.seed * 7919 + i for i in range(setup.samples)]
    rows = []
    for k in setup.ks:
        config = SamplerConfig(gen_length=gen_length, steps=math.ceil(gen_length / k),
                               order="entropy", schedule="dream", temperature=1.0,
                               logits_eos_inf=True)
        for method in ("marginal", "adjust"):
            if method == "adjust" and k == 1:
                continue  # one token per pass: ADJUST never runs, both are exact sampling
            extra = {"joint_sampler": joint, "joint_params": joint_params} if method == "adjust" else {}
            samples = generate(base, prompts, config, seed=seeds, **extra)
            rows.append({"k": k, "method": "exact" if k == 1 else method, "steps": config.steps,
                         **_metrics(lang, np.asarray(samples))})
    exact_nll = lang.entropy(setup.length) - lang.entropy(1)
    rows.append({"k": 0, "method": "true distribution", "steps": None, "ser": 0.0,
                 "nll": exact_nll / gen_length, "nll_legal": exact_nll / gen_length})
    _write_synthetic(out, setup, rows, timings)
    return rows


def _write_synthetic(out: Path, setup: Setup, rows: list[dict], timings: dict) -> None:
    lines = ["| tokens per pass | method | passes | SER | true NLL / token (q_eps) | NLL of legal samples |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        k = "-" if r["k"] == 0 else r["k"]
        lines.append(f"| {k} | {r['method']} | {r['steps'] or '-'} | {r['ser']:.3f} | "
                     f"{r['nll']:.3f} | {r['nll_legal']:.3f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"setup": dataclasses.asdict(setup), "rows": rows, "timings_s": timings}, indent=2))
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, color in (("marginal", "tab:red"), ("adjust", "tab:blue")):
        pts = sorted((r["k"], r["ser"], r["nll"]) for r in rows
                     if r["method"] in (method, "exact"))
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=method)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", color=color, label=method)
    truth = next(r for r in rows if r["k"] == 0)
    axes[1].axhline(truth["nll"], color="gray", ls="--", label="true entropy")
    axes[0].set(xlabel="tokens per forward pass (K)", ylabel="sequence error rate",
                title="impossible transitions")
    axes[1].set(xlabel="tokens per forward pass (K)", ylabel="NLL per token under q_eps",
                title="true-distribution NLL")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "adjust_synthetic.png", dpi=120)
    plt.close(fig)


REPO_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@dataclasses.dataclass(frozen=True)
class PydocsSetup:
    gen_length: int = 48
    trajectories: int = 1536
    adjust_steps: int = 1500
    samples: int = 300
    k: int = 4
    seed: int = 0


def run_pydocs(setup: PydocsSetup, out: Path, *, model_dir: Path | None = None,
               judge_dir: Path | None = None, progress: bool = True) -> list[dict]:
    """MAUVE against exact samples (and judge NLL) of marginal vs ADJUST sampling at K."""
    import jdlm
    from jdlm.adjust import AdjustConfig, joint_sampler, load_adjust, train_adjust
    from jdlm.config import TrainConfig
    from jdlm.errors import JdlmError
    from jdlm.eval.mauve import compute_mauve, get_featurizer
    from jdlm.sampling import SamplerConfig, generate
    from jdlm.sharding import make_mesh
    from jdlm.trajectories import exact_sampler, sample_trajectories

    model_dir = Path(model_dir or REPO_CHECKPOINTS / "tiny-pydocs")
    judge_dir = Path(judge_dir or REPO_CHECKPOINTS / "tiny-pydocs-ar")
    if not (model_dir / "jdlm.json").is_file():
        raise JdlmError(f"no model at {model_dir}; train it with `jdlm train --preset tiny-pydocs` "
                        "or pass --model")
    out.mkdir(parents=True, exist_ok=True)
    base = jdlm.load(model_dir)
    bos = base.config.bos_token_id
    timings = {}

    start = time.perf_counter()
    sample_trajectories(base, [[bos]], out / "trajectories", num=setup.trajectories,
                        sampler=exact_sampler(setup.gen_length), seed=setup.seed,
                        batch_size=128, source="unconditional (BOS)", progress=progress)
    timings["trajectories_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if not (out / "adjust" / "adjust.json").exists():
        tc = TrainConfig(batch_size=32, steps=setup.adjust_steps, learning_rate=1e-3,
                         warmup_steps=25, schedule="constant", weight_decay=0.0, b2=0.999,
                         log_every=25, eval_every=setup.adjust_steps,
                         save_every=setup.adjust_steps, seed=setup.seed)
        train_adjust(base, out / "trajectories", out / "adjust", out / "adjust.run",
                     adjust=AdjustConfig(max_unroll=setup.k - 1), tc=tc, mesh=make_mesh(None),
                     progress=progress)
    joint, joint_params = joint_sampler(load_adjust(out / "adjust", base), base)
    timings["adjust_s"] = time.perf_counter() - start

    def sample(k: int, seed_offset: int, **extra) -> list[str]:
        config = SamplerConfig(gen_length=setup.gen_length,
                               steps=math.ceil(setup.gen_length / k), order="entropy",
                               schedule="dream", temperature=1.0, logits_eos_inf=True)
        seeds = [seed_offset + i for i in range(setup.samples)]
        tokens = generate(base, [[bos]] * setup.samples, config, seed=seeds, **extra)
        return [base.tokenizer.decode([int(t) for t in row[1:]], skip_special_tokens=True)
                for row in tokens]

    start = time.perf_counter()
    base_seed = (setup.seed + 1) * 1_000_000
    reference = sample(1, base_seed)
    sets = {("exact, other seeds", 1): sample(1, base_seed + setup.samples),
            ("marginal", setup.k): sample(setup.k, base_seed + 2 * setup.samples),
            ("adjust", setup.k): sample(setup.k, base_seed + 2 * setup.samples,
                                        joint_sampler=joint, joint_params=joint_params)}
    timings["sampling_s"] = time.perf_counter() - start

    # MAUVE on two featurizations: the offline MiniLM sentence encoder, and (when the judge
    # exists) the autoregressive judge's own last-token features, which know the domain.
    featurizers = ["all-MiniLM-L6-v2"]
    judge = None
    if (judge_dir / "jdlm.json").is_file():
        from jdlm.eval.judge import jdlm_judge, judge_nll

        judge = jdlm_judge(jdlm.load(judge_dir))
        featurizers.append(f"jdlm:{judge_dir}")
    else:
        print(f"(no autoregressive judge at {judge_dir}: `jdlm train --preset tiny-pydocs "
              "--objective ar` adds judge NLL and judge-feature MAUVE)")
    features = {}
    for name in featurizers:
        featurize = get_featurizer(name)
        features[name] = {key: featurize(texts) for key, texts in [("exact", reference), *sets.items()]}
    rows = []
    for (method, k), texts in sets.items():
        row = {"k": k, "method": method, "passes": math.ceil(setup.gen_length / k),
               "samples": len(texts)}
        for name in featurizers:
            score = compute_mauve(features[name]["exact"], features[name][method, k],
                                  featurizer=_identity, seed=setup.seed)
            row["mauve_minilm" if name == featurizers[0] else "mauve_judge"] = score.mauve
            row["num_clusters"] = score.num_clusters
        if judge is not None:
            row["judge_nll"] = judge_nll(texts, judge).nll
        rows.append(row)
    _write_pydocs(out, setup, rows, timings, reference[:3], sets)
    return rows


def _identity(features):
    """Features computed once per set, shared by every MAUVE comparison."""
    return np.asarray(features)


def _write_pydocs(out: Path, setup: PydocsSetup, rows, timings, reference, sets) -> None:
    columns = [("mauve_minilm", "MAUVE vs exact (MiniLM)"), ("mauve_judge", "MAUVE vs exact "
               "(judge features)"), ("judge_nll", "judge NLL / token")]
    columns = [(key, title) for key, title in columns if key in rows[0]]
    lines = ["| tokens per pass | method | passes | " + " | ".join(t for _, t in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['k']} | {r['method']} | {r['passes']} | "
                     + " | ".join(f"{r[key]:.3f}" for key, _ in columns) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    examples = {f"{m} (K={k})": texts[:3] for (m, k), texts in sets.items()}
    (out / "results.json").write_text(json.dumps(
        {"setup": dataclasses.asdict(setup), "rows": rows, "timings_s": timings,
         "examples": {"exact": reference, **examples}}, indent=2))
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['method']}\nK={r['k']}" for r in rows]
    keys = [key for key, _ in columns if key.startswith("mauve")]
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax.bar(np.arange(len(rows)) + j * width, [r[key] for r in rows], width,
               label=dict(columns)[key].removeprefix("MAUVE vs exact "))
    ax.set_xticks(np.arange(len(rows)) + width * (len(keys) - 1) / 2, labels)
    ax.set(ylabel="MAUVE vs exact samples", ylim=(0, 1.05),
           title=f"tiny-pydocs, {setup.samples} samples of {setup.gen_length} tokens")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "adjust_pydocs.png", dpi=120)
    plt.close(fig)


def main(out: Path, *, quick: bool = False, progress: bool = True) -> None:
    """Both parts; `quick` is the small synthetic configuration (about a minute)."""
    print("== synthetic bigram language: exact SER and true NLL ==")
    run_synthetic(QUICK if quick else Setup(), out / "synthetic", progress=progress)
    print("\n== tiny-pydocs: MAUVE against exact samples ==")
    run_pydocs(PydocsSetup(), out / "pydocs", progress=progress)
    print(f"\nresults, tables and plots under {out}/")
