#!/usr/bin/env bash
# Build llama.cpp's CUDA binaries (sm_90) on the CPU machine, for the GPU runs to carry: tools/gpu-session.sh's
# build stage unpacks them in seconds instead of spending ~7 minutes of device time on the same build there.
#   usage: tools/llamacpp-cuda-cross.sh [WORK_DIR]   (default .llamacpp/cross; ~25 minutes on 2 cores, seconds when built)
# Writes .llamacpp/llamacpp-cuda-sm90.tar.xz: llama-bench, llama-batched-bench and llama-server, stripped, under bin/
# (~45 MB; carry it with .llamacpp/SOURCE). Source and cmake flags are tools/llamacpp-build.sh's `cuda` kind.
#
# The toolkit is NVIDIA's CUDA 13.0 wheels from PyPI, pinned to the GPU machine's own nvcc (V13.0.88), so the device
# code is what a build there would make. By hand because nothing packages a CUDA 13 toolkit for this VM short of
# NVIDIA's apt repository (root, ~3 GB); the wheels lack only what a toolkit root adds: lib64, the unversioned .so
# links, targets/, and libcuda's link-time stub (the driver is the GPU machine's; the stub is never loaded).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(realpath -m "${1:-$root/.llamacpp/cross}")
out="$root/.llamacpp/llamacpp-cuda-sm90.tar.xz"
pins=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
      nvidia-cublas==13.0.2.14 nvidia-cuda-cccl==13.0.85)

mkdir -p "$work"
[ -x "$work/cuda13/bin/python" ] || python3 -m venv "$work/cuda13"
"$work/cuda13/bin/pip" install -q "${pins[@]}"
cuda=$("$work/cuda13/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')

ln -sfn lib "$cuda/lib64"
for so in "$cuda"/lib/lib*.so.*; do ln -sfn "$(basename "$so")" "${so%.so.*}.so"; done
mkdir -p "$cuda/targets/x86_64-linux" "$cuda/lib/stubs"
ln -sfn ../../include "$cuda/targets/x86_64-linux/include"
ln -sfn ../../lib "$cuda/targets/x86_64-linux/lib"
# The stub: every driver entry point cuda.h declares, under the names its version macros make of them (cuMemAlloc
# is cuMemAlloc_v2), which is what the linker looks up; the soname is the driver's.
if [ ! -f "$cuda/lib/stubs/libcuda.so" ]; then
    gcc -E -P -I"$cuda/include" "$cuda/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' |
        tr -d ' (' | sort -u | sed 's/.*/int &(void) { return 999; }/' > "$work/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$work/libcuda_stub.c"
fi
"$cuda/bin/nvcc" --version | tail -n 2

# The build's output goes on to stderr as it comes; its last line, the binaries' folder, is kept. The git ceiling:
# ggml's cmake would otherwise take this repository's HEAD for its own commit (the work folder is inside it).
bin=$(PATH="$cuda/bin:$PATH" CUDACXX="$cuda/bin/nvcc" CUDAToolkit_ROOT="$cuda" GIT_CEILING_DIRECTORIES="$work" \
      bash "$root/tools/llamacpp-build.sh" cuda "$work" | tee /dev/stderr | tail -n 1)
rm -rf "$work/pack" && mkdir -p "$work/pack/bin"
cp "$bin"/llama-{bench,batched-bench,server} "$work/pack/bin/"
strip "$work/pack/bin"/*
# One dictionary over the three: they hold the same ~60 MB of (already compressed) device code, stored once.
tar -C "$work/pack" -cf - bin | xz -9e --lzma2=dict=256MiB -T1 > "$out.part"
mv "$out.part" "$out"
ls -l "$out"
