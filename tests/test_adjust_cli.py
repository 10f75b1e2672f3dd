"""`jdlm adjust trajectories | train` and `jdlm generate --adjust`: resume and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import jdlm
from jdlm.adjust import load_adjust
from jdlm.cli import main as cli
from jdlm.config import ModelConfig
from jdlm.errors import JdlmError
from jdlm.model import Model, Transformer
from jdlm.trajectories import load_trajectories

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(family="llada", vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=8, rope_theta=1e4, norm_eps=1e-5,
                  qkv_bias=False, tie_embeddings=False, logit_shift=0, mask_token_id=23,
                  pad_token_id=22, bos_token_id=21, eos_token_id=22, max_position_embeddings=32)


def _base(path: Path, seed: int) -> Path:
    jdlm.save(Model.from_module(Transformer(CFG, rngs=nnx.Rngs(seed))), path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("adjust")
    base, other = _base(root / "base", 0), _base(root / "other", 1)
    assert cli(["adjust", "trajectories", "--model", str(base), "--out", str(root / "traj"),
                "--num", "96", "--gen-length", "8", "--batch-size", "32", "--no-progress"]) == 0
    return root, base, other


def test_trajectories_are_exact_and_resume(work, tmp_path):
    root, base, _ = work
    traj = load_trajectories(root / "traj")
    assert traj.tokens.shape == (96, 9) and (traj.tokens[:, 0] == CFG.bos_token_id).all()
    # One token per forward pass: each row reveals positions 1..8 at passes 0..7.
    np.testing.assert_array_equal(np.sort(traj.reveal_step[:, 1:], axis=1),
                                  np.tile(np.arange(8), (96, 1)))
    assert (traj.tokens != CFG.eos_token_id).all()  # EOS banned, as in the paper
    # Interrupted run: only the first part exists; resuming fills in the rest identically.
    part = tmp_path / "traj"
    part.mkdir()
    for name in ("trajectories.json", "part-00000.npz"):
        (part / name).write_bytes((root / "traj" / name).read_bytes())
    assert cli(["adjust", "trajectories", "--model", str(base), "--out", str(part), "--num", "96",
                "--gen-length", "8", "--batch-size", "32", "--no-progress"]) == 0
    resumed = load_trajectories(part)
    np.testing.assert_array_equal(resumed.tokens, traj.tokens)
    np.testing.assert_array_equal(resumed.reveal_step, traj.reveal_step)


def test_trajectories_of_another_model_are_refused(work, capsys):
    root, base, other = work
    code = cli(["adjust", "train", "--model", str(other), "--trajectories", str(root / "traj"),
                "--out", str(root / "never"), "--steps", "2", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "different base model or tokenizer" in err and "weights_sha256" in err
    assert not (root / "never").exists()
    # Same directory, other sampler settings: refused rather than mixed.
    code = cli(["adjust", "trajectories", "--model", str(base), "--out", str(root / "traj"),
                "--num", "96", "--gen-length", "8", "--batch-size", "32", "--seed", "5",
                "--no-progress"])
    assert code == 2 and "another model, sampler, seed" in capsys.readouterr().err


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


def _train_cmd(root: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "jdlm.cli", "adjust", "train", "--model", str(root / "base"),
            "--trajectories", str(root / "traj"), "--out", str(root / name), "--steps", "120",
            "--batch-size", "16", "--learning-rate", "1e-3", "--warmup-steps", "5",
            "--save-every", "20", "--eval-every", "1000", "--log-every", "1", "--no-progress"]


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_training_killed_and_resumed_continues_from_its_checkpoint(work):
    root, base, other = work
    subprocess.run(_train_cmd(root, "full"), check=True, env=_env(), timeout=600,
                   capture_output=True)
    full = _losses(root / "full.run")
    run_dir = root / "killed.run"
    proc = subprocess.Popen(_train_cmd(root, "killed"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpts = run_dir / "checkpoints"
    while not (ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())
               and (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) > 30):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert 20 <= resumed_from < 120
    subprocess.run(_train_cmd(root, "killed"), check=True, env=_env(), timeout=600,
                   capture_output=True)
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 121))
    after = [s for s in losses if s > resumed_from]
    np.testing.assert_allclose([losses[s] for s in after], [full[s] for s in after], rtol=1e-5)
    # The trained layer loads for its base model and only for it.
    model = jdlm.load(base)
    assert load_adjust(root / "killed", model).config.max_unroll == 3
    with pytest.raises(JdlmError, match="ADJUST checkpoint .* different base model"):
        load_adjust(root / "killed", jdlm.load(other))
    # And it samples through the command line, K = 4 tokens per pass.
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [CFG.bos_token_id]}) + "\n")
    out = root / "out.jsonl"
    assert cli(["generate", "--model", str(base), "--prompts", str(prompts), "--gen-length", "8",
                "--tokens-per-step", "4", "--order", "entropy", "--temperature", "1",
                "--adjust", str(root / "killed"), "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert len(row["tokens"]) == 8 and CFG.mask_token_id not in row["tokens"]


def test_tokens_per_step_above_the_block_is_refused(work, capsys):
    root, base, _ = work
    prompts = root / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [1]}) + "\n")
    code = cli(["generate", "--model", str(base), "--prompts", str(prompts), "--gen-length", "8",
                "--block-length", "4", "--tokens-per-step", "5"])
    assert code == 2 and "--tokens-per-step 5" in capsys.readouterr().err
    code = cli(["adjust", "train", "--model", str(base), "--trajectories", str(root / "traj"),
                "--out", str(root / "never"), "--max-unroll", "8", "--no-progress"])
    assert code == 2 and "max_unroll=8" in capsys.readouterr().err
