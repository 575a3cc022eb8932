#!/usr/bin/env bash
# A short GPU call (issue 15's checks; see docs/gpu.md and docs/PERFORMANCE.md for what they found):
#   tools/gpu-probe.sh STAGE...      (on the GPU machine; logs and JSON under $OUT)
#   tests          every gpu-marked test but the real Gemma 3 ones (its wheels are staged separately)
#   matrix         only tests/test_kernel_matrix.py (every format x path x row length against float64)
#   dispatch:LIKE  synthesize LIKE (qwen2.5-0.5b, phi3-mini, gpt-oss-20b) once, then python -m bench.dispatch
#   batched:LIKE   python -m bench.batched --seqs 1,64 on LIKE (the continuous batch without HTTP)
# (The rows sweep and the batching tests are tools/gpu-session.sh's rows:M, kernels and invariance stages.)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-out/gpu-probe}
mkdir -p "$OUT" /var/tmp/m
py() { timeout "$1" bash tools/gpu-env.sh python3 "${@:2}"; }
gpu_tests() { py "$1" -m pytest -v -m gpu -o addopts="" -p no:cacheprovider -rf --tb=short --ignore=tests/test_fuzz.py "${@:2}"; }
synth() {
    [ -s "/var/tmp/m/$1.gguf" ] || py 300 -m bench.synth --like "$1" --out "/var/tmp/m/$1.gguf" \
        --oracles shared/oracles > "$OUT/synth-$1.log" 2>&1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/card.txt"
for stage in "$@"; do
    echo "== $(date +%T) $stage"
    case "$stage" in
        tests) gpu_tests 420 tests -k "not gemma" -s 2>&1 | grep -v Deprecation > "$OUT/gpu-tests.log"
               grep -E "relative error|passed|failed|FAILED|Error" "$OUT/gpu-tests.log" | tail -n 40 ;;
        matrix) gpu_tests 330 tests/test_kernel_matrix.py 2>&1 | tail -n 30 > "$OUT/matrix.log"; tail -n 3 "$OUT/matrix.log" ;;
        dispatch:*)
            like=${stage#dispatch:}
            synth "$like"
            py 240 -m bench.dispatch --model "/var/tmp/m/$like.gguf" --json "$OUT/dispatch-$like.json" 2>&1 | tail -n 25 ;;
        batched:*)
            like=${stage#batched:}
            synth "$like"
            py 300 -m bench.batched --model "/var/tmp/m/$like.gguf" --device gpu --seqs 1,64 2>&1 |
                grep -v Warning | tee "$OUT/batched-$like.log" | tail -n 4 ;;
        *) echo "unknown stage $stage" ;;
    esac
done
