"""Conversion round trips, metadata validation, and every bad input the converter must refuse."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import jdlm
from jdlm.checkpoint import METADATA_FILE, read_metadata
from jdlm.cli import main as cli
from jdlm.errors import JdlmError
from hf_reference import make_dream, make_llada, reference_logits

BUNDLED = Path(jdlm.__file__).parent / "configs"


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("family,dtype,shards", [("dream", torch.float32, 1),
                                                 ("dream", torch.bfloat16, 3),
                                                 ("llada", torch.float16, 2)])
def test_round_trip_is_bit_exact(tmp_path, family, dtype, shards):
    make = make_dream if family == "dream" else make_llada
    make(tmp_path / "hf", dtype=dtype, shards=shards, layers=3)
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "jdlm")]) == 0
    # A small shard limit forces a multi-file export with an index.
    assert cli(["export", str(tmp_path / "jdlm"), str(tmp_path / "back"),
                "--max-shard-gb", str(20_000 / 2**30)]) == 0
    original, exported = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert set(original) == set(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        assert torch.equal(exported[key], value), key
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text())


def test_export_of_a_loaded_model_loads_in_transformers(tmp_path):
    """A model exported from memory is a real HF checkpoint: Qwen2 reads it unchanged."""
    import transformers

    make_dream(tmp_path / "hf", hidden=32, heads=4, kv_heads=2)
    model = jdlm.load(tmp_path / "hf")
    jdlm.export_hf(model, tmp_path / "back")
    qwen = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "back",
                                                         attn_implementation="eager")
    tokens = np.arange(10)[None] % 64
    np.testing.assert_allclose(reference_logits(qwen, "dream", tokens, None),
                               np.asarray(model.logits(tokens)), atol=1e-4)


def test_convert_casts_and_records_metadata(tmp_path):
    make_llada(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    meta = read_metadata(tmp_path / "out")
    assert meta["family"] == "llada" and meta["dtype"] == "bfloat16"
    assert meta["logit_shift"] == 0 and meta["mask_token_id"] == 63
    assert meta["layout"]["num_layers"] == 2
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    model = jdlm.load(tmp_path / "out")
    assert str(model.dtype) == "bfloat16"


def test_info_prints_published_parameter_counts(capsys):
    assert cli(["info", str(BUNDLED / "dream-v0-base-7b.json")]) == 0
    assert "7,615,616,512" in capsys.readouterr().out
    assert cli(["info", "llada-8b-base", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 8_015_581_184 and info["family"] == "llada"
    assert info["shapes"]["layers/q"] == {"shape": [32, 32, 128, 4096],
                                         "axes": ["layers", "heads", "head_dim", "embed"]}


# -- bad input: a clear message, nothing written ------------------------------------------------


def _assert_refused(tmp_path, capsys, src: Path, *fragments: str):
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    assert cli(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before, "a partial or temporary output was left behind"


@pytest.fixture
def sharded(tmp_path):
    make_dream(tmp_path / "hf", shards=3)
    return tmp_path / "hf"


def test_missing_shard(tmp_path, capsys, sharded):
    victim = sharded / "model-00002-of-00003.safetensors"
    victim.unlink()
    _assert_refused(tmp_path, capsys, sharded, "model-00002-of-00003.safetensors", "does not exist")


def test_missing_key(tmp_path, capsys, sharded):
    f = sharded / "model-00003-of-00003.safetensors"
    state = load_file(str(f))
    key = sorted(state)[0]
    del state[key]
    save_file(state, str(f))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"][key]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_refused(tmp_path, capsys, sharded, "missing", key)


def test_unexpected_key(tmp_path, capsys):
    make_llada(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(f))
    state["model.transformer.blocks.0.extra.weight"] = torch.zeros(3)
    save_file(state, str(f))
    _assert_refused(tmp_path, capsys, tmp_path / "hf", "unexpected",
                    "model.transformer.blocks.0.extra.weight")


def test_shape_mismatch(tmp_path, capsys):
    make_llada(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(f))
    state["model.transformer.blocks.1.up_proj.weight"] = torch.zeros(47, 32)
    save_file(state, str(f))
    _assert_refused(tmp_path, capsys, tmp_path / "hf", "model.transformer.blocks.1.up_proj.weight",
                    "[47, 32]", "[48, 32]")


def test_dtype_mismatch(tmp_path, capsys):
    make_llada(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(f))
    state["model.transformer.ln_f.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(state, str(f))
    _assert_refused(tmp_path, capsys, tmp_path / "hf", "model.transformer.ln_f.weight", "I32")


def test_truncated_file(tmp_path, capsys, sharded):
    f = sharded / "model-00001-of-00003.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _assert_refused(tmp_path, capsys, sharded, "model-00001-of-00003.safetensors", "truncated")


def test_unknown_model_type(tmp_path, capsys):
    make_llada(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    _assert_refused(tmp_path, capsys, tmp_path / "hf", "'mamba'", "Dream", "llada")


def test_output_directory_exists(tmp_path, capsys):
    make_llada(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """An error while writing (here: the fourth tensor) removes the temporary directory."""
    import jdlm.checkpoint as ckpt

    make_llada(tmp_path / "hf")
    calls = {"n": 0}
    real = ckpt.HFSource.read

    def failing(self, tensor, dtype):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return real(self, tensor, dtype)

    monkeypatch.setattr(ckpt.HFSource, "read", failing)
    with pytest.raises(OSError):
        ckpt.convert(tmp_path / "hf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_tampered_metadata_is_refused(tmp_path):
    make_dream(tmp_path / "hf")
    jdlm.convert(tmp_path / "hf", tmp_path / "out")
    meta_file = tmp_path / "out" / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    meta["logit_shift"] = 0
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(JdlmError, match="logit_shift=0 but its config says 1"):
        jdlm.load(tmp_path / "out")
    meta["logit_shift"] = 1
    meta["params"]["layers/q"] = [2, 4, 9, 32]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(JdlmError, match="layers/q"):
        jdlm.load(tmp_path / "out")
    meta["params"]["layers/q"] = [2, 4, 8, 32]
    meta_file.write_text(json.dumps(meta))
    shutil.rmtree(tmp_path / "out" / "params" / "layers" / "001")
    with pytest.raises(JdlmError, match="params/layers/001"):
        jdlm.load(tmp_path / "out")


def test_sharded_load_matches_reference_on_8_devices(tmp_path):
    """Streaming onto a (data 1, fsdp 4, tensor 2) mesh: weights land sharded, logits unchanged."""
    ref = make_dream(tmp_path / "hf", hidden=64, heads=4, kv_heads=2, intermediate=96)
    jdlm.convert(tmp_path / "hf", tmp_path / "out")
    tokens = np.random.default_rng(0).integers(0, 64, size=(4, 12))
    np.save(tmp_path / "tokens.npy", tokens)
    np.save(tmp_path / "want.npy", reference_logits(ref, "dream", tokens, None))
    script = f"""
import numpy as np, jdlm
model = jdlm.load({str(tmp_path / 'out')!r}, mesh="data=1,fsdp=4,tensor=2")
q = model.state["layers"]["q"][...]
assert tuple(q.sharding.spec) == (None, "tensor", None, "fsdp"), q.sharding.spec
assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 2, 16, 16)
got = np.asarray(model.logits(np.load({str(tmp_path / 'tokens.npy')!r})))
want = np.load({str(tmp_path / 'want.npy')!r})
print("maxdiff", np.abs(got - want).max())
assert np.abs(got - want).max() <= 1e-4
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "maxdiff" in result.stdout


def test_relative_paths(tmp_path, monkeypatch):
    """Orbax needs absolute paths; the user-facing calls accept relative ones."""
    monkeypatch.chdir(tmp_path)
    make_llada(Path("hf"))
    assert cli(["convert", "hf", "conv"]) == 0
    assert jdlm.load("conv").config.family == "llada"
    assert cli(["export", "conv", "back"]) == 0
    assert (tmp_path / "back" / "model.safetensors").is_file()
