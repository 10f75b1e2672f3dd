"""Tiny random Dream / LLaDA checkpoints in the real HF layouts, and their reference logits.

The independent reference is transformers: `Qwen2ForCausalLM` has Dream's exact module tree
and key names; `LlamaForCausalLM` matches LLaDA after renaming keys. Both run bidirectionally
through a 4-D additive float mask with eager attention (reference/MODELS.md §3.3).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

LLADA_RENAMES = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}


def llada_key(llama_key: str) -> str:
    if llama_key in LLADA_RENAMES:
        return LLADA_RENAMES[llama_key]
    prefix = "model.layers."
    layer, rest = llama_key[len(prefix):].split(".", 1)
    return f"model.transformer.blocks.{layer}.{LLADA_RENAMES[rest]}"


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and biases too, so that a mis-mapped tensor cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def _write_shards(state: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    keys = list(state)
    if shards <= 1:
        save_file({k: state[k].contiguous() for k in keys}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    groups = np.array_split(np.arange(len(keys)), shards)
    weight_map = {}
    for i, idx in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {keys[j]: state[keys[j]].contiguous() for j in idx}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


def make_dream(out: Path, *, hidden=32, heads=4, kv_heads=2, head_dim=None, layers=2, vocab=64,
               intermediate=48, theta=1e6, eps=1e-6, dtype=torch.float32, shards=1, seed=0):
    """A random Qwen2 model saved as a Dream checkpoint. Returns the fp32 torch reference."""
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads, rope_theta=theta, rms_norm_eps=eps,
        max_position_embeddings=512, tie_word_embeddings=False, use_sliding_window=False,
        attn_implementation="eager",
    )
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    _randomize(model, seed)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(state, out, shards)
    config = {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rope_theta": theta, "rms_norm_eps": eps, "tie_word_embeddings": False,
        "mask_token_id": vocab - 1, "pad_token_id": vocab - 2, "bos_token_id": vocab - 3,
        "eos_token_id": vocab - 2, "max_position_embeddings": 512,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if head_dim:
        config["head_dim"] = head_dim
    (out / "config.json").write_text(json.dumps(config))
    # Reference weights are exactly what is on disk (bf16-rounded if saved as bf16).
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def make_llada(out: Path, *, hidden=32, heads=4, layers=2, vocab=64, intermediate=48,
               theta=5e5, eps=1e-5, dtype=torch.float32, shards=1, seed=0):
    """A random Llama model saved under LLaDA's key names. Returns the fp32 torch reference."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=hidden // heads, rope_theta=theta, rms_norm_eps=eps, max_position_embeddings=512,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(model, seed)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    _write_shards({llada_key(k): v for k, v in state.items()}, out, shards)
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
        "block_type": "llama", "d_model": hidden, "n_heads": heads, "n_kv_heads": heads,
        "n_layers": layers, "mlp_hidden_size": intermediate, "mlp_ratio": 4,
        "vocab_size": vocab, "embedding_size": vocab, "rope": True, "rope_theta": theta,
        "rms_norm_eps": eps, "include_bias": False, "include_qkv_bias": False,
        "weight_tying": False, "mask_token_id": vocab - 1, "eos_token_id": vocab - 2,
        "pad_token_id": vocab - 2, "max_sequence_length": 512,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def reference_logits(model, family: str, tokens: np.ndarray, attention_mask: np.ndarray | None):
    """Position-aligned fp32 logits of the torch model run bidirectionally (numpy)."""
    tok = torch.as_tensor(tokens, dtype=torch.long)
    b, n = tok.shape
    real = torch.ones(b, n, dtype=torch.bool) if attention_mask is None else torch.as_tensor(
        attention_mask).bool()
    if family == "dream":
        pos = torch.where(real, real.long().cumsum(1) - 1, torch.ones_like(tok))
        allowed = real[:, None, :, None] & real[:, None, None, :]
    else:
        pos = torch.arange(n).expand(b, n)
        allowed = real[:, None, None, :].expand(b, 1, n, n)
    if attention_mask is None:
        allowed = torch.ones(b, 1, n, n, dtype=torch.bool)
    additive = torch.zeros(b, 1, n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(input_ids=tok, attention_mask=additive, position_ids=pos).logits.float()
    if family == "dream":
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits.numpy()
