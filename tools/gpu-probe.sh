#!/usr/bin/env bash
# Issue 15 probe (GPU machine): correctness of every GPU path against float64 (the kernel matrix, the oracle
# models and the mixed-format gpt-oss, prefill and teacher-forced decode), then a decode-dispatch profile of a
# synthetic qwen2.5-0.5b (bench/dispatch.py). Logs under $OUT. SKIP_MATRIX=1 / SKIP_TESTS=1 leave parts out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
py() { timeout "$1" bash tools/gpu-env.sh python3 "${@:2}"; }
gpu_tests() { py "$1" -m pytest -q -m gpu -o addopts="" -p no:cacheprovider -rf --tb=short "${@:2}"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
[ -n "${SKIP_MATRIX:-}" ] || gpu_tests 330 tests/test_kernel_matrix.py 2>&1 | tail -n 60 > "$OUT/matrix.log"
[ -n "${SKIP_TESTS:-}" ] || gpu_tests 300 tests/test_mixed_formats.py tests/test_gpu.py -k "oracle or mixed" -s \
    2>&1 | grep -v Deprecation | tail -n 80 > "$OUT/correctness.log"
tail -n 30 "$OUT/correctness.log" 2>/dev/null
mkdir -p /var/tmp/m
[ -s /var/tmp/m/qwen.gguf ] || py 120 -m worker.synth --like qwen2.5-0.5b --out /var/tmp/m/qwen.gguf \
    --oracles shared/oracles > "$OUT/synth.log" 2>&1
py 200 -m bench.dispatch --model /var/tmp/m/qwen.gguf --json "$OUT/dispatch-qwen.json" 2>&1 | tail -n 30
