"""One Optax trainer for every objective.

An objective is a pure `loss_fn(params, frozen, batch, rng) -> (loss, metrics)`; `params` are
the trainable parameters (a nested dict of arrays), `frozen` anything the loss reads but does
not train (ADJUST's frozen base model). The train step is one `jax.jit` with explicit shardings
and a donated state; masking randomness is `fold_in(rng, step)` on device, so a resumed run
replays the same noise. An Orbax `CheckpointManager` holds the state and the data iterator's
position; SIGTERM (TPU preemption) saves and stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jdlm import diffusion
from jdlm.checkpoint import param_shardings
from jdlm.config import ModelConfig, TrainConfig
from jdlm.data import BatchIterator
from jdlm.errors import JdlmError
from jdlm.model import Model, Transformer, abstract_transformer
from jdlm.sharding import logical_spec

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


# ----------------------------------------------------------------------------------------------
# Parameters as plain nested dicts, and the model applied to them
# ----------------------------------------------------------------------------------------------


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def params_shardings(cfg: ModelConfig, mesh) -> dict:
    """NamedSharding of every parameter, nested like `nnx.to_pure_dict` of the model."""
    return _nest(param_shardings(cfg, mesh))


def init_params(cfg: ModelConfig, seed: int, shardings) -> dict:
    """Fresh float32 parameters, created directly on their shardings."""
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)),
                                                      nnx.Param)),
                   out_shardings=shardings)
    return init()


def make_apply(cfg: ModelConfig, *, remat: bool = False, compute_dtype=None):
    """`apply(params, tokens, attention_mask, causal) -> logits` for the objectives."""
    graphdef = nnx.graphdef(abstract_transformer(cfg))

    def apply(params, tokens, attention_mask, causal):
        state = nnx.state(abstract_transformer(cfg), nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(tokens, attention_mask, causal=causal, remat=remat,
                                          compute_dtype=compute_dtype)

    return apply


def model_from_params(cfg: ModelConfig, params: dict, **kwargs) -> Model:
    """The user handle (`jdlm.Model`) around trained parameters."""
    module = abstract_transformer(cfg)
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return Model(config=cfg, graphdef=nnx.graphdef(module), state=state, **kwargs)


def objective_loss(tc: TrainConfig, cfg: ModelConfig, *, heldout: bool = False) -> LossFn:
    """The loss of `tc.objective` on the model itself (all parameters trainable); `heldout`
    gives its evaluation form (MDLM: the lower-variance exact-count bound)."""
    apply = make_apply(cfg, remat=tc.remat,
                       compute_dtype=jnp.bfloat16 if tc.compute_dtype == "bfloat16" else None)
    if heldout and tc.objective == "mdlm":
        return diffusion.mdlm_eval_objective(apply, cfg)
    if tc.objective == "ar":
        return diffusion.ar_objective(apply, cfg)
    if tc.objective == "sft":
        return diffusion.sft_objective(apply, cfg, eps=tc.eps, stratified=tc.stratified)
    return diffusion.mdlm_objective(apply, cfg, eps=tc.eps, stratified=tc.stratified,
                                    crop_prob=tc.crop_prob)


# ----------------------------------------------------------------------------------------------
# Optimizer and the train step
# ----------------------------------------------------------------------------------------------


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    warmup = max(min(tc.warmup_steps, tc.steps - 1), 0)
    if tc.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, tc.learning_rate, max(warmup, 1)),
             optax.constant_schedule(tc.learning_rate)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, warmup, max(tc.steps, warmup + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; norms and other vectors are not decayed."""
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2,
                    weight_decay=tc.weight_decay, mask=decay),
    )


def _interleave(x: jax.Array, parts: int) -> jax.Array:
    """(B, ...) -> (parts, B / parts, ...) where part i holds rows i, i + parts, ...: each
    device's contiguous shard of the batch splits evenly across the micro-batches."""
    return x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, grad_accum: int):
    """(state, frozen, batch, rng) -> (state, metrics); state = {step, params, opt_state}."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        if grad_accum == 1:
            (loss, aux), grads = grad_fn(state["params"], frozen, batch, rng)
        else:
            micro = jax.tree.map(lambda x: _interleave(x, grad_accum), batch)

            def accumulate(total, inputs):
                i, mb = inputs
                out = grad_fn(state["params"], frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, total, out), None

            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(jnp.zeros_like,
                                 jax.eval_shape(grad_fn, state["params"], frozen, first, rng))
            ((loss, aux), grads), _ = jax.lax.scan(accumulate, zeros,
                                                   (jnp.arange(grad_accum), micro))
            loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, (loss, aux, grads))
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


def state_shardings(optimizer, params_abstract, p_shardings, mesh) -> dict:
    """Shardings of {step, params, opt_state}: optimizer moments follow their parameter."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_abstract = jax.eval_shape(optimizer.init, params_abstract)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, p_shardings,
                                   transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": p_shardings, "opt_state": opt_sh}


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    params: dict
    step: int
    eval_loss: float | None
    stopped_early: bool  # True when SIGTERM ended the run


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    # Every host contributes its own rows; jax assembles the global array.
    return {k: jax.make_array_from_process_local_data(sharding[k], v) for k, v in local.items()}


def _batch_shardings(example: dict[str, np.ndarray], mesh) -> dict[str, NamedSharding]:
    def spec(v):
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        return logical_spec(("batch",) + (None,) * (v.ndim - 1), global_shape, mesh)

    return {k: NamedSharding(mesh, spec(v)) for k, v in example.items()}


def _trim_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records written after the checkpoint we restart from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def train(
    tc: TrainConfig,
    cfg: ModelConfig,
    data: BatchIterator,
    run_dir: str | Path,
    *,
    mesh,
    heldout: list[dict[str, np.ndarray]] = (),
    loss_fn: LossFn | None = None,
    eval_loss_fn: LossFn | None = None,
    params: dict | None = None,
    frozen: Any = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) in `run_dir`: Orbax checkpoints under `checkpoints/`, metrics in
    `metrics.jsonl`. `params` (default: fresh) are the trainable parameters; `heldout` are
    this host's fixed evaluation batches, scored by `eval_loss_fn` (default: the objective's
    held-out form, or `loss_fn` when one is given)."""
    import orbax.checkpoint as ocp

    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    if loss_fn is None:
        loss_fn, eval_loss_fn = objective_loss(tc, cfg), objective_loss(tc, cfg, heldout=True)
    eval_loss_fn = eval_loss_fn or loss_fn
    optimizer = make_optimizer(tc)
    schedule = learning_rate_schedule(tc)
    replicated = NamedSharding(mesh, PartitionSpec())

    def fresh_state(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optimizer.init(p)}

    with jax.set_mesh(mesh):
        if params is None:
            p_shardings = params_shardings(cfg, mesh)
            abstract_params = jax.eval_shape(lambda: nnx.to_pure_dict(
                nnx.state(Transformer(cfg, rngs=nnx.Rngs(tc.seed)), nnx.Param)))
        else:
            p_shardings = jax.tree.map(lambda x: x.sharding, params)
            abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        shardings = state_shardings(optimizer, abstract_params, p_shardings, mesh)
        b_shardings = _batch_shardings({k: v[: data.batch_size] for k, v in data.arrays.items()},
                                       mesh)
        step_fn = jax.jit(make_train_step(loss_fn, optimizer, tc.grad_accum),
                          in_shardings=(shardings, None, b_shardings, replicated),
                          out_shardings=(shardings, replicated), donate_argnums=0)
        eval_fn = jax.jit(lambda p, f, b, r: eval_loss_fn(p, f, b, r)[0],
                          in_shardings=(p_shardings, None, b_shardings, replicated),
                          out_shardings=replicated)

        manager = ocp.CheckpointManager(
            run_dir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep,
                                                 enable_async_checkpointing=True))
        start = manager.latest_step() or 0
        _check_resume(run_dir, tc, start)
        if start:
            # Restore straight into sharded buffers; no fresh state is built first.
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    jax.eval_shape(fresh_state, abstract_params), shardings)
            restored = manager.restore(start, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
            state = restored.state
            data.set_state(restored.data)
        else:
            if params is None:
                params = init_params(cfg, tc.seed, p_shardings)
            state = jax.jit(fresh_state, out_shardings=shardings)(params)
        # Process 0 alone owns the metrics file (hosts share the run directory).
        metrics_path = run_dir / "metrics.jsonl" if jax.process_index() == 0 else Path(os.devnull)
        _trim_metrics(metrics_path, start)
        base_rng = jax.random.key(tc.seed)
        eval_rng = jax.random.key(tc.seed + 1)

        def evaluate(params) -> float | None:
            if not heldout:
                return None
            losses = [eval_fn(params, frozen, _global_batch(b, b_shardings),
                              jax.random.fold_in(eval_rng, i)) for i, b in enumerate(heldout)]
            return float(np.mean(jax.device_get(losses)))

        eval_loss = None
        tokens_per_step = tc.batch_size * tc.seq_len
        bar = tqdm(total=tc.steps, initial=start, desc=f"train {tc.objective}", unit="step",
                   disable=not progress or jax.process_index() != 0)
        last_time, last_step = time.perf_counter(), start
        step = start
        with _Preemption() as preempt, metrics_path.open("a") as log:
            for step in range(start + 1, tc.steps + 1):
                batch = _global_batch(next(data), b_shardings)
                state, metrics = step_fn(state, frozen, batch, base_rng)
                record = {}
                if step % tc.log_every == 0 or step == tc.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    speed = tokens_per_step * (step - last_step) / (now - last_time)
                    record = {"step": step, **metrics, "lr": float(schedule(step - 1)),
                              "tokens_per_s": speed}
                    last_time, last_step = now, step
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                    eval_loss = evaluate(state["params"])
                    if eval_loss is not None:
                        record = {"step": step, **record, "eval_loss": eval_loss}
                if record:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update()
                # The last step is always kept, so a finished run is complete and extendable.
                # Deciding here (not in Orbax) skips Orbax's extra save at a run's first step.
                if step % tc.save_every == 0 or step == tc.steps or preempt.requested:
                    manager.save(step, args=_save_args(state, data), force=True)
                if preempt.requested:
                    break
            manager.wait_until_finished()
        if eval_loss is None and start >= tc.steps:  # resumed a finished run: report its loss
            eval_loss = evaluate(state["params"])
        bar.close()
        manager.close()
    return TrainResult(params=state["params"], step=step, eval_loss=eval_loss,
                       stopped_early=step < tc.steps)


# Knobs that may change when a run is resumed. They leave the per-step computation alone;
# a new `steps` does stretch or shrink the rest of a cosine schedule.
_RESUMABLE_CHANGES = {"steps", "log_every", "eval_every", "eval_batches", "save_every", "keep"}


def _check_resume(run_dir: Path, tc: TrainConfig, start: int) -> None:
    """Refuse to continue a run under different settings; record them for the next resume."""
    record = run_dir / "train_config.json"
    if start and record.exists():
        before = json.loads(record.read_text())
        changed = sorted(k for k, v in tc.to_dict().items()
                         if k not in _RESUMABLE_CHANGES and before.get(k) != v)
        if changed:
            raise JdlmError(f"{run_dir} holds a run with different {changed} "
                            f"({ {k: before.get(k) for k in changed} }); resume with the same "
                            "settings or choose a new --run-dir")
    if start > tc.steps:
        raise JdlmError(f"{run_dir} already holds step {start}, beyond steps={tc.steps}; "
                        "raise --steps or choose a new --run-dir")
    if jax.process_index() == 0:
        record.write_text(json.dumps(tc.to_dict(), indent=2))


def _save_args(state, data: BatchIterator):
    import orbax.checkpoint as ocp

    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data.get_state()))


def check_context(tc: TrainConfig, cfg: ModelConfig) -> None:
    if tc.seq_len > cfg.max_position_embeddings:
        raise JdlmError(f"seq_len={tc.seq_len} is above the model's context of "
                        f"{cfg.max_position_embeddings}; lower --seq-len")



# ----------------------------------------------------------------------------------------------
# `jdlm train`: presets, data preparation, export
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named recipe: data source, tokenizer size, model shape and training knobs
    (`per_objective` adjusts them for one objective, e.g. a shorter AR run)."""

    data: str
    vocab_size: int  # BPE vocabulary (text sources); ignored for synthetic data
    model: dict[str, int]
    train: dict[str, Any]
    heldout_fraction: float = 0.05
    per_objective: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def train_config(self, **overrides) -> TrainConfig:
        objective = overrides.get("objective", self.train.get("objective", "mdlm"))
        return TrainConfig(**{**self.train, **self.per_objective.get(objective, {}), **overrides})


PRESETS: dict[str, Preset] = {
    # The embedded default model (DESIGN.md §4): minutes on a 2-core CPU.
    "tiny-pydocs": Preset(
        data="pydocs", vocab_size=1024,
        model=dict(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4,
                   num_kv_heads=4, max_position_embeddings=128),
        train=dict(seq_len=128, batch_size=16, steps=2500, learning_rate=3e-3, warmup_steps=100,
                   log_every=20, eval_every=500, eval_batches=8, save_every=500),
        # The AR baseline overfits 110k tokens after ~7 epochs (held-out 3.07 at step 500,
        # 3.76 at 1500) while the diffusion bound still improves at 2500: stop AR early.
        per_objective={"ar": dict(steps=500, eval_every=100, save_every=100)}),
    # The known-entropy bigram chain; the held-out loss bounds the exact entropy rate.
    "tiny-bigram": Preset(
        data="synthetic:vocab=8,order=2,support=4,seed=0,rows=60000", vocab_size=0,
        model=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=4, max_position_embeddings=64),
        train=dict(seq_len=16, batch_size=128, steps=800, learning_rate=3e-3, warmup_steps=50,
                   weight_decay=0.0, log_every=50, eval_every=400, eval_batches=32,
                   save_every=400)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise JdlmError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def tiny_config(vocab_size: int, special: dict[str, int], hidden_size: int, intermediate_size: int,
                num_layers: int, num_heads: int, num_kv_heads: int,
                max_position_embeddings: int) -> ModelConfig:
    """A small LLaDA-family model (no logit shift, keys-only padding) of jdlm's own."""
    return ModelConfig(
        family="llada", vocab_size=-(-vocab_size // 8) * 8, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, rope_theta=1e4,
        norm_eps=1e-5, qkv_bias=False, tie_embeddings=False, logit_shift=0,
        mask_token_id=special["mask"], pad_token_id=special["pad"], bos_token_id=special["bos"],
        eos_token_id=special["eos"], max_position_embeddings=max_position_embeddings)


@dataclasses.dataclass
class PreparedData:
    train: dict[str, np.ndarray]  # this host's rows
    heldout: dict[str, np.ndarray]  # this host's held-out rows
    vocab_size: int
    special: dict[str, int]
    files: list[Path]  # tokenizer files to ship with the exported checkpoint
    info: dict[str, Any]


def prepare_data(spec: str, tc: TrainConfig, run_dir: Path, *, vocab_size: int,
                 heldout_fraction: float, tokenizer_path: str | None = None) -> PreparedData:
    """Rows for `tc.objective` from a source spec; text sources get a BPE tokenizer trained on
    the training split (kept in `run_dir`, so that a resumed run tokenises identically)."""
    from jdlm import data as D

    pi, pc = jax.process_index(), jax.process_count()
    if spec.startswith("synthetic:"):
        opts = D.parse_synthetic(spec)
        lang = D.synthetic_language(spec)
        v = lang.vocab_size
        special = {"mask": v, "pad": v + 1, "bos": v + 2, "eos": v + 3}
        rows = lang.sample(opts["rows"], tc.seq_len, seed=opts["seed"] + 1)
        held = lang.sample(max(tc.eval_batches, 1) * tc.batch_size, tc.seq_len,
                           seed=opts["seed"] + 2)
        info = {"entropy_per_token": lang.entropy_per_token(tc.seq_len),
                "heldout_exact_nll_per_token": float(-lang.log_prob(held).mean() / tc.seq_len)}
        return PreparedData({"tokens": rows[pi::pc]},
                            {"tokens": held[pi::pc]}, v + 4, special, [], info)

    from tokenizers import Tokenizer

    if tc.objective == "sft":
        train_docs, held_docs = D.split_heldout(D.sft_pairs(Path(spec)), heldout_fraction,
                                                key=lambda pair: "\x00".join(pair))
        tokenizer_texts = [p + r for p, r in train_docs]
    else:
        train_docs, held_docs = D.split_heldout(D.load_texts(spec), heldout_fraction)
        tokenizer_texts = train_docs
    tok_file = Path(tokenizer_path) if tokenizer_path else run_dir / "tokenizer.json"
    if not tok_file.exists():
        if tokenizer_path:
            raise JdlmError(f"tokenizer {tokenizer_path} does not exist")
        D.train_tokenizer(tokenizer_texts, vocab_size, run_dir)
    tokenizer = Tokenizer.from_file(str(tok_file))
    special = D.special_ids(tokenizer)
    files = [tok_file] + [f for f in [tok_file.parent / "tokenizer_config.json"] if f.exists()]
    if tc.objective == "sft":
        train_rows, held_rows = (
            D.sft_rows(_encode_pairs(tokenizer, D.host_shard(docs, pi, pc)), tc.seq_len,
                       special["bos"], special["eos"])
            for docs in (train_docs, held_docs))
    else:
        train_rows, held_rows = (
            {"tokens": D.pack(D.tokenize(tokenizer, D.host_shard(docs, pi, pc)), tc.seq_len,
                              special["bos"], special["eos"])}
            for docs in (train_docs, held_docs))
    info = {"train_rows": len(train_rows["tokens"]), "heldout_rows": len(held_rows["tokens"])}
    return PreparedData(train_rows, held_rows, tokenizer.get_vocab_size(), special, files, info)


def _encode_pairs(tokenizer, pairs):
    from jdlm.data import tokenize

    prompts = tokenize(tokenizer, [p for p, _ in pairs])
    responses = tokenize(tokenizer, [r for _, r in pairs])
    return list(zip(prompts, responses))


def _heldout_batches(rows: dict[str, np.ndarray], batch: int, count: int) -> list[dict]:
    n = len(next(iter(rows.values())))
    if n < batch:  # a tiny held-out split still fills one batch
        rows = {k: np.resize(v, (batch,) + v.shape[1:]) for k, v in rows.items()}
        n = batch
    return [{k: v[i * batch:(i + 1) * batch] for k, v in rows.items()}
            for i in range(min(count, n // batch))]


def run(tc: TrainConfig, *, data: str, run_dir: str | Path, out_dir: str | Path | None,
        mesh: str | None = None, vocab_size: int = 2048, heldout_fraction: float = 0.05,
        model_shape: dict[str, int] | None = None, init: str | None = None,
        progress: bool = True) -> dict:
    """Everything `jdlm train` does: data, tokenizer, model, training, export, summary."""
    from jdlm.checkpoint import load, save
    from jdlm.sharding import make_mesh

    started = time.perf_counter()
    mesh = make_mesh(mesh)
    if tc.batch_size % jax.process_count():
        raise JdlmError(f"batch_size={tc.batch_size} must divide over {jax.process_count()} hosts")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params, tokenizer = None, None
    if init:
        base = load(Path(init).absolute(), mesh=mesh, dtype="float32")
        shipped = Path(init) / "tokenizer.json"
        tokenizer = str(shipped) if shipped.exists() else None
        if tokenizer is None and not data.startswith("synthetic:"):
            raise JdlmError(f"{init} ships no tokenizer.json, so text data cannot be tokenised "
                            "the way it was trained; fine-tune it on its own kind of data")
    prepared = prepare_data(data, tc, run_dir, vocab_size=vocab_size,
                            heldout_fraction=heldout_fraction, tokenizer_path=tokenizer)
    if init:
        cfg = base.config
        params = nnx.to_pure_dict(base.state)
        if prepared.vocab_size > cfg.vocab_size:
            raise JdlmError(f"the data's vocabulary ({prepared.vocab_size}) is larger than the "
                            f"model's ({cfg.vocab_size}); use the checkpoint's tokenizer")
    else:
        cfg = tiny_config(prepared.vocab_size, prepared.special, **(model_shape or {}))
    check_context(tc, cfg)
    per_host = tc.batch_size // jax.process_count()
    iterator = BatchIterator(prepared.train, per_host, seed=tc.seed)
    heldout = _heldout_batches(prepared.heldout, per_host, tc.eval_batches)
    result = train(tc, cfg, iterator, run_dir, mesh=mesh, heldout=heldout, params=params,
                   progress=progress)
    summary = {"objective": tc.objective, "data": data, "step": result.step,
               "heldout_loss": result.eval_loss, "stopped_early": result.stopped_early,
               "wall_s": time.perf_counter() - started, "train_config": tc.to_dict(),
               **prepared.info}
    if out_dir is not None and not result.stopped_early:
        out_dir = Path(out_dir).absolute()  # Orbax writes only to absolute paths
        save(model_from_params(cfg, result.params), out_dir, overwrite=True,
             extra_files=prepared.files,
             extra_metadata={"objective": tc.objective, "causal": tc.objective == "ar",
                             "train": {k: v for k, v in summary.items() if k != "train_config"}})
        summary["checkpoint"] = str(out_dir)
    if jax.process_index() == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
