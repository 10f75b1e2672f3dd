"""jdlm: masked diffusion language models (Dream, LLaDA) in JAX/Flax.

    import jdlm
    model = jdlm.load(path)                         # an HF directory or a converted checkpoint
    logits = model.logits(tokens, attention_mask=None)  # (B, L, V) float32, position-aligned
    tokens = jdlm.generate(model, prompts, jdlm.SamplerConfig(gen_length=64))  # (B, P + 64)
"""

from jdlm.checkpoint import convert, export_hf, load, save
from jdlm.config import ModelConfig
from jdlm.errors import JdlmError
from jdlm.model import Model, Transformer
from jdlm.sampling import SamplerConfig, generate

__all__ = ["JdlmError", "Model", "ModelConfig", "SamplerConfig", "Transformer", "convert", "export_hf",
           "generate", "load", "save"]
