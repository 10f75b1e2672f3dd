"""Frozen configuration dataclasses.

`ModelConfig.from_hf` is the only place that reads a foreign (Hugging Face) config format.
Dream and LLaDA are two configurations of one model: their differences are data here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jdlm.errors import JdlmError

FAMILIES = ("dream", "llada")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and special tokens of one bidirectional transformer.

    `family` fixes the padding semantics and the checkpoint key layout:
      * dream: positions are cumsum(mask) - 1 under padding and the attention mask is the
        outer AND of the padding mask (Dream's `diffusion_generate`); raw logits predict the
        next token, so `logit_shift` is 1.
      * llada: positions are always 0..L-1 and padding masks keys only; no shift.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    logit_shift: int
    mask_token_id: int
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise JdlmError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise JdlmError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise JdlmError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.logit_shift not in (0, 1):
            raise JdlmError(f"logit_shift={self.logit_shift} must be 0 or 1")

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise JdlmError(f"unknown ModelConfig fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**data)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def cumsum_positions(self) -> bool:
        """Dream restarts positions at the first real token of a left-padded row."""
        return self.family == "dream"

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read a Dream (`model_type` "Dream") or LLaDA (`model_type` "llada") config.json.

        `path` is the file itself or the directory holding it.
        """
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise JdlmError(f"no config.json at {file}; pass a Hugging Face model directory")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise JdlmError(f"{file} is not valid JSON ({err})") from err
        model_type = raw.get("model_type")
        reader = _HF_READERS.get(str(model_type).lower())
        if reader is None:
            raise JdlmError(
                f"{file}: unknown model_type {model_type!r}; jdlm reads 'Dream' and 'llada' "
                "checkpoints (convert other architectures to one of these layouts first)"
            )
        try:
            return reader(raw)
        except KeyError as err:
            raise JdlmError(f"{file}: missing field {err.args[0]!r} for model_type {model_type!r}") from err

    def to_hf(self) -> dict[str, Any]:
        """A config.json in the family's own format (used by HF export)."""
        return _HF_WRITERS[self.family](self)


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers 5 may move rope_theta into `rope_parameters`.
    if "rope_theta" in raw:
        return float(raw["rope_theta"])
    return float(raw["rope_parameters"]["rope_theta"])


def _dream_from_hf(raw: dict[str, Any]) -> ModelConfig:
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    return ModelConfig(
        family="dream",
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or hidden // heads,
        rope_theta=_rope_theta(raw),
        norm_eps=float(raw["rms_norm_eps"]),
        qkv_bias=True,  # Dream's attention always has q/k/v biases (Qwen2 layout)
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        logit_shift=1,
        mask_token_id=raw.get("mask_token_id", 151666),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        eot_token_id=raw.get("eot_token_id"),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
    )


def _llada_from_hf(raw: dict[str, Any]) -> ModelConfig:
    hidden, heads = raw["d_model"], raw["n_heads"]
    bias = bool(raw.get("include_bias", False))
    qkv_bias = raw.get("include_qkv_bias")
    return ModelConfig(
        family="llada",
        # The embedding matrix has `embedding_size` rows (padded vocab), which is what we store.
        vocab_size=raw.get("embedding_size") or raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw.get("mlp_hidden_size") or raw["mlp_ratio"] * hidden,
        num_layers=raw["n_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("n_kv_heads") or heads,
        head_dim=hidden // heads,
        rope_theta=_rope_theta(raw),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        qkv_bias=bias if qkv_bias is None else bool(qkv_bias),
        tie_embeddings=bool(raw.get("weight_tying", False)),
        logit_shift=0,
        mask_token_id=raw.get("mask_token_id", 126336),
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        eot_token_id=raw.get("eot_token_id"),
        max_position_embeddings=raw.get("max_sequence_length", 4096),
    )


def _dream_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "mask_token_id": cfg.mask_token_id,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_cache": False,
    }


def _llada_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "block_type": "llama",
        "layer_norm_type": "rms",
        "rope": True,
        "rope_full_precision": True,
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "mlp_hidden_size": cfg.intermediate_size,
        "n_layers": cfg.num_layers,
        "n_heads": cfg.num_heads,
        "n_kv_heads": cfg.num_kv_heads,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "include_bias": False,
        "include_qkv_bias": cfg.qkv_bias,
        "weight_tying": cfg.tie_embeddings,
        "mask_token_id": cfg.mask_token_id,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "max_sequence_length": cfg.max_position_embeddings,
        "use_cache": False,
    }


_HF_READERS = {"dream": _dream_from_hf, "llada": _llada_from_hf}
_HF_WRITERS = {"dream": _dream_to_hf, "llada": _llada_to_hf}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

TRAIN_OBJECTIVES = ("mdlm", "sft", "ar", "adjust")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run of `jdlm.train` (every objective shares these knobs).

    `batch_size` is the global number of rows per optimizer step, split into `grad_accum`
    micro-batches; the learning rate warms up linearly for `warmup_steps`, then follows
    `schedule` ("cosine" down to `min_lr_ratio` of the peak, or "constant").
    """

    objective: str = "mdlm"
    seq_len: int = 128
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 1000
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    compute_dtype: str = "float32"
    remat: bool = False
    eps: float = 1e-3
    stratified: bool = True
    crop_prob: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 2

    def __post_init__(self):
        if self.objective not in TRAIN_OBJECTIVES:
            raise JdlmError(f"unknown objective {self.objective!r}; choose one of {TRAIN_OBJECTIVES}")
        if self.schedule not in ("cosine", "constant"):
            raise JdlmError(f"unknown schedule {self.schedule!r}; choose cosine or constant")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise JdlmError(f"compute_dtype={self.compute_dtype!r}; choose float32 or bfloat16")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise JdlmError(f"{name}={getattr(self, name)} must be at least 1")
        if self.batch_size % self.grad_accum:
            raise JdlmError(f"batch_size={self.batch_size} is not a multiple of "
                            f"grad_accum={self.grad_accum}")
        if not 0 <= self.crop_prob <= 1 or not 0 < self.eps < 1:
            raise JdlmError(f"crop_prob={self.crop_prob} must be in [0, 1] and eps={self.eps} in (0, 1)")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
