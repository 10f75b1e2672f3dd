"""Speed accounting for generation benchmarks, with the rates people argue about made explicit.

Only generated tokens count towards throughput: prompt tokens are recorded beside them and
never enter a rate (peers' tok/s numbers have been inflated by counting prompts). A forward pass
is one full-model forward of one sequence: a step over a batch of B rows is B forward passes, so
tokens per forward pass is the parallelism of the sampler (1 for autoregressive decoding).
"""

from __future__ import annotations

import dataclasses

from jdlm.errors import JdlmError


def device_description() -> tuple[str, str, int]:
    """(device kind, platform, device count) of the default JAX backend."""
    import jax

    devices = jax.devices()
    return devices[0].device_kind, devices[0].platform, len(devices)


@dataclasses.dataclass(frozen=True)
class SpeedRecord:
    generated_tokens: int
    forward_passes: int
    wall_s: float
    prompt_tokens: int = 0  # recorded, never counted in a rate
    device: str = ""
    platform: str = ""
    num_devices: int = 0

    def __post_init__(self):
        if self.generated_tokens < 0 or self.forward_passes < 0 or self.prompt_tokens < 0:
            raise JdlmError(f"token and forward-pass counts must be >= 0: {self}")
        if not self.wall_s > 0:
            raise JdlmError(f"wall_s={self.wall_s} must be positive (time the whole generation)")

    @classmethod
    def measure(cls, generated_tokens: int, forward_passes: int, wall_s: float,
                prompt_tokens: int = 0) -> SpeedRecord:
        """A record naming the device this process runs on."""
        device, platform, count = device_description()
        return cls(generated_tokens, forward_passes, wall_s, prompt_tokens, device, platform,
                   count)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_s

    @property
    def forward_passes_per_token(self) -> float | None:
        return self.forward_passes / self.generated_tokens if self.generated_tokens else None

    @property
    def tokens_per_forward_pass(self) -> float | None:
        return self.generated_tokens / self.forward_passes if self.forward_passes else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_second": self.tokens_per_second,
                "forward_passes_per_token": self.forward_passes_per_token,
                "tokens_per_forward_pass": self.tokens_per_forward_pass}
