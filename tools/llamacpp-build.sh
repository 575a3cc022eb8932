#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-batched-bench and llama-server from the subset that tools/llamacpp-src.sh
# packed (.llamacpp/llama.cpp-src.tar.xz).
#   usage: tools/llamacpp-build.sh cpu|cuda [WORK_DIR] [--configure-only]   (default WORK_DIR: .llamacpp/<kind>)
# Prints the folder of the three binaries last. cuda builds for sm_90 (H100/H200) only, to keep the build short.
# Env: JOBS (default: all cores), LLAMACPP_TARGETS (default: the three).
set -euo pipefail

kind=${1:?usage: tools/llamacpp-build.sh cpu|cuda [WORK_DIR] [--configure-only]}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(realpath -m "${2:-$root/.llamacpp/$kind}")
configure_only=${3:-}
tarball="$root/.llamacpp/llama.cpp-src.tar.xz"
[ -f "$tarball" ] || { echo "error: $tarball missing: run tools/llamacpp-src.sh first" >&2; exit 1; }
commit=$(sed -n 's/^llama_cpp_commit=//p' "$root/.llamacpp/SOURCE")

mkdir -p "$work"
if [ ! -f "$work/llama.cpp/SOURCE" ] || [ "$tarball" -nt "$work/llama.cpp/SOURCE" ]; then
    rm -rf "$work/llama.cpp"
    tar -xJf "$tarball" -C "$work"
fi

common=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMIT="$commit" -DLLAMA_BUILD_NUMBER=0
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF
        # llama-server without its web UI: no npm build and no download of prebuilt assets (the GPU machine is
        # offline); the HTTP API the load bench drives is unaffected.
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF)
case "$kind" in
    # Not GGML_NATIVE: -march=native turns on AMX, whose tile instructions trap (SIGILL) in this project's CPU VM.
    # Each other extension is on exactly when /proc/cpuinfo lists it (the VMs differ: an Intel Xeon with AVX-VNNI,
    # an AMD EPYC with only the AVX-512 form, where a {vex} vpdpbusd traps); all are named, ON or OFF, as a cmake
    # cache keeps old values.
    cpu) flags=(-DGGML_CUDA=OFF -DGGML_NATIVE=OFF)
         have=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
         for pair in SSE42:sse4_2 AVX:avx AVX2:avx2 BMI2:bmi2 FMA:fma F16C:f16c AVX_VNNI:avx_vnni AVX512:avx512f \
                     AVX512_VBMI:avx512vbmi AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16; do
             [[ "$have" == *" ${pair#*:} "* ]] && on=ON || on=OFF
             flags+=("-DGGML_${pair%%:*}=$on")
         done ;;
    # FA kernels only for the f16 K/V cache that llama-bench uses by default (each extra K/V pair is 7 more files);
    # no NCCL (one GPU).
    cuda) flags=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DGGML_CUDA_FA_QUANTS=f16-f16
                 -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_GRAPHS=ON) ;;
    *) echo "error: kind must be cpu or cuda, not $kind" >&2; exit 2 ;;
esac
gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S "$work/llama.cpp" -B "$work/build" "${gen[@]}" "${common[@]}" "${flags[@]}"
[ "$configure_only" = "--configure-only" ] && exit 0
# Only the three binaries (not mtmd's CLIs and the other targets the tools' cmake files declare); LLAMACPP_TARGETS
# names fewer (the GPU machine's CPU peer needs llama-bench alone: tools/gpu-session.sh `cpu-cores`).
# shellcheck disable=SC2086  # a list of targets
cmake --build "$work/build" --target ${LLAMACPP_TARGETS:-llama-bench llama-batched-bench llama-server} -j "${JOBS:-$(nproc)}"
echo "$work/build/bin"
