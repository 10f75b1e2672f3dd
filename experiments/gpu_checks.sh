#!/usr/bin/env bash
# The GPU checks and benchmarks, in one go on a CUDA machine with jdlm's dependencies:
#   bash experiments/gpu_checks.sh [OUT_DIR] [tests|generate|convert ...]
# Logs and result tables land in OUT_DIR (default results/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu}
shift || true
parts=${*:-tests generate convert}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
df -h "$PWD" /tmp | tee "$out/environment.txt"
python3 - <<'EOF' | tee -a "$out/environment.txt"
import os, jax, flax, optax, orbax.checkpoint as ocp, torch, transformers
print("devices:", jax.devices(), "| cpus:", os.cpu_count())
print(f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
      f"orbax {ocp.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
status=0
for part in $parts; do
  case $part in
    tests) python3 -m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider -s \
             2>&1 | tee "$out/test_gpu.log" || status=1 ;;
    generate) python3 experiments/bench_generate.py --model dream-7b --repeats 3 --out-dir "$out" \
                2>&1 | tee "$out/bench_generate.log" || status=1 ;;
    # On the disk that holds the repository (often not /tmp, which may live in memory).
    convert) python3 experiments/bench_convert.py --workdir "$PWD/.bench-convert" \
               2>&1 | tee "$out/bench_convert.log" || status=1
             rm -rf "$PWD/.bench-convert" ;;
    *) echo "unknown part $part (tests, generate, convert)"; status=2 ;;
  esac
done
exit $status
