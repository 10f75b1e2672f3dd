"""Conversion benchmark: a synthetic checkpoint with the full Dream-7B shapes (random bf16).

Writes the HF checkpoint (about 15 GB, 4 shards, reused across runs), measures the raw read speed
of those files, then runs `jdlm convert` in a child process and reports its peak resident
memory (the child's VmHWM, polled until it exits) and throughput. Page caches are dropped before each timed read
when the process may do so (root), so both numbers are cold reads of the same bytes.

    python experiments/bench_convert.py [--workdir /tmp/jdlm-bench-convert] [--layers 28]

Targets (issue 2): peak RSS <= 2 GB + the largest tensor; throughput >= 0.7x the raw read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jdlm.checkpoint import hf_shapes, tensor_plan
from jdlm.config import ModelConfig

DREAM_7B = Path(__file__).resolve().parents[1] / "jdlm" / "configs" / "dream-v0-base-7b.json"
CHUNK = 64 * 2**20


def random_bf16(count: int, rng: np.random.Generator) -> np.ndarray:
    """Finite bf16 bit patterns with magnitudes around 1e-2 (no NaN/inf), cheaply."""
    bits = rng.integers(0, 2**16, size=count, dtype=np.uint16)
    exponent = (bits & 0x3) + 118  # 2^-9 .. 2^-6
    return ((bits & 0x8000) | (exponent.astype(np.uint16) << 7) | (bits & 0x7F)).astype(np.uint16)


def write_checkpoint(out: Path, cfg: ModelConfig, shards: int = 4) -> int:
    """Write the HF directory tensor by tensor; returns the bytes of weights on disk."""
    marker = out / "complete.json"
    if marker.is_file() and json.loads(marker.read_text())["num_layers"] == cfg.num_layers:
        return json.loads(marker.read_text())["bytes"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shapes = hf_shapes(cfg)
    keys = [t.hf_key for t in tensor_plan(cfg)]
    sizes = {k: int(np.prod(shapes[k])) * 2 for k in keys}
    total = sum(sizes.values())
    groups, current, acc = [[]], 0, 0
    for k in keys:
        if acc > total / shards * (current + 1) and current < shards - 1:
            groups.append([])
            current += 1
        groups[-1].append(k)
        acc += sizes[k]
    rng = np.random.default_rng(0)
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for k in group:
            header[k] = {"dtype": "BF16", "shape": list(shapes[k]),
                         "data_offsets": [offset, offset + sizes[k]]}
            offset += sizes[k]
        blob = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
        blob += b" " * (-len(blob) % 8)
        with open(out / name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for k in group:
                f.write(random_bf16(sizes[k] // 2, rng).view(np.uint8))
                weight_map[k] = name
        print(f"  wrote {name} ({offset / 1e9:.2f} GB)", flush=True)
    raw = json.loads(DREAM_7B.read_text())
    raw["num_hidden_layers"] = cfg.num_layers
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    marker.write_text(json.dumps({"bytes": total, "num_layers": cfg.num_layers}))
    return total


def high_water_rss(pid: int) -> int:
    """VmHWM of a live process in bytes (per address space, so not inherited from the parent as
    getrusage's maxrss is across fork/exec)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_read_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    buf = bytearray(CHUNK)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jdlm-bench-convert"))
    parser.add_argument("--layers", type=int, default=28, help="28 = the real Dream-7B depth")
    parser.add_argument("--keep", action="store_true", help="keep the converted output")
    args = parser.parse_args()

    cfg = ModelConfig.from_hf(DREAM_7B).replace(num_layers=args.layers)
    hf_dir, out_dir = args.workdir / "hf", args.workdir / "converted"
    print(f"writing a Dream-7B-shaped bf16 checkpoint ({args.layers} layers) to {hf_dir}")
    total = write_checkpoint(hf_dir, cfg)
    largest = max(int(np.prod(s)) * 2 for s in hf_shapes(cfg).values())
    files = sorted(hf_dir.glob("*.safetensors"))

    cold = drop_caches()
    read_s = raw_read_seconds(files)
    # A converter must write every byte once: a plain file copy is the floor of its time.
    copy_dir = args.workdir / "copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir()
    drop_caches()
    start = time.perf_counter()
    for f in files:
        shutil.copyfile(f, copy_dir / f.name)
    copy_s = time.perf_counter() - start
    shutil.rmtree(copy_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    drop_caches()
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "jdlm.cli", "convert", str(hf_dir), str(out_dir)],
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    peak = 0
    while child.poll() is None:
        peak = max(peak, high_water_rss(child.pid))
        time.sleep(0.05)
    convert_s = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"jdlm convert failed with exit code {child.returncode}")
    start = time.perf_counter()  # the interpreter and imports, included in the time above
    subprocess.run([sys.executable, "-m", "jdlm.cli", "convert", "--help"], check=True,
                   stdout=subprocess.DEVNULL)
    startup_s = time.perf_counter() - start
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)

    gb = 1e9
    rows = [
        ("weights on disk", f"{total / gb:.2f} GB ({len(files)} shards, bf16)"),
        ("largest tensor", f"{largest / gb:.2f} GB"),
        ("raw read", f"{total / gb / read_s:.2f} GB/s ({read_s:.1f} s{', cold cache' if cold else ''})"),
        ("raw copy", f"{total / gb / copy_s:.2f} GB/s ({copy_s:.1f} s, read + write, cp)"),
        ("jdlm convert", f"{total / gb / convert_s:.2f} GB/s ({convert_s:.1f} s, of which "
                         f"{startup_s:.1f} s start-up and imports)"),
        ("convert / raw read", f"{read_s / convert_s:.2f}x   (target >= 0.70x)"),
        ("convert / raw copy", f"{copy_s / convert_s:.2f}x"),
        ("raw copy / raw read", f"{read_s / copy_s:.2f}x   (the ceiling of any converter that "
                                "writes its output on this disk)"),
        ("peak RSS (convert)", f"{peak / gb:.2f} GB   (target <= {(2 * 2**30 + largest) / gb:.2f} GB"
                               " = 2 GiB + largest tensor)"),
    ]
    print(f"\nbench_convert: Dream-7B shapes, {args.layers} layers, {os.cpu_count()} CPU cores")
    for name, value in rows:
        print(f"  {name:<20} {value}")


if __name__ == "__main__":
    main()
