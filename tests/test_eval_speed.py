"""Speed records: rates from counts, prompts excluded, the device named."""

import jax
import pytest

from jdlm.errors import JdlmError
from jdlm.eval.speed import SpeedRecord


def test_rates_exclude_prompt_tokens_and_name_the_device():
    # 4 rows, 128 new tokens each, 32 steps over the batch, 2 s; prompts of 100 tokens.
    record = SpeedRecord.measure(generated_tokens=4 * 128, forward_passes=4 * 32, wall_s=2.0,
                                 prompt_tokens=4 * 100)
    assert record.tokens_per_second == 256.0
    assert record.tokens_per_forward_pass == 4.0
    assert record.forward_passes_per_token == 0.25
    assert record.device == jax.devices()[0].device_kind
    assert record.platform == jax.devices()[0].platform and record.num_devices >= 1
    d = record.to_dict()
    assert d["tokens_per_second"] == 256.0 and d["prompt_tokens"] == 400


def test_invalid_records():
    with pytest.raises(JdlmError, match="wall_s"):
        SpeedRecord(10, 10, 0.0)
    with pytest.raises(JdlmError, match=">= 0"):
        SpeedRecord(-1, 10, 1.0)
    assert SpeedRecord(0, 0, 1.0).tokens_per_forward_pass is None
