#!/usr/bin/env bash
# The peer engine's source for the benchmarks: llama.cpp as vendored by the llama-cpp-python sdist on PyPI,
# cut down to what a CPU + CUDA build of llama-bench, llama-batched-bench and llama-server needs, packed as one
# tar.xz small enough to travel to the GPU machine (which cannot download anything).
# Nothing of it is committed: it lives in .llamacpp/ (git-ignored).
#   usage: tools/llamacpp-src.sh [OUT_DIR]        (default OUT_DIR: .llamacpp)
# Writes OUT_DIR/llama.cpp-src.tar.xz and OUT_DIR/SOURCE (versions, commit, checksums). Build it with
# tools/llamacpp-build.sh.
set -euo pipefail

# llama-cpp-python 0.3.36 vendors llama.cpp at ggml-org/llama.cpp@0c1e57098 (its CHANGELOG): the commit that
# REQUIREMENTS.md's peer numbers were measured with.
LCP_VERSION=0.3.36
LLAMA_COMMIT=0c1e57098

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/.llamacpp}")
mkdir -p "$out/dl"
sdist="$out/dl/llama_cpp_python-$LCP_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    python3 -m pip download -q --no-deps --no-binary :all: -d "$out/dl" "llama-cpp-python==$LCP_VERSION"
fi
grep -q "llama.cpp@$LLAMA_COMMIT" <(tar -xzOf "$sdist" "llama_cpp_python-$LCP_VERSION/CHANGELOG.md") ||
    { echo "error: $sdist's CHANGELOG does not name llama.cpp@$LLAMA_COMMIT" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
top="llama_cpp_python-$LCP_VERSION/vendor/llama.cpp"
# The subset: the build system, the llama library, common/, the vendored libraries, the three tools, what
# llama-server links (tools/mtmd, the multimodal library; tools/ui, whose cmake embeds the web UI: with no
# prebuilt assets and no download it embeds none), and ggml with only its CPU and CUDA backends. Left out: models/
# (vocab files, 75 MB), docs, tests, examples, the web UI's own sources (8 MB of Svelte), mtmd's sample media,
# the other tools and the other backends.
keep=(CMakeLists.txt LICENSE licenses cmake include src common vendor scripts/ui-assets.cmake
      tools/llama-bench tools/batched-bench tools/server tools/mtmd
      tools/ui/CMakeLists.txt tools/ui/sources.cmake tools/ui/ui.h.in tools/ui/ui.cpp.in
      ggml/CMakeLists.txt ggml/cmake ggml/include ggml/src/ggml-cpu ggml/src/ggml-cuda)
tar -xzf "$sdist" -C "$work" --exclude="$top/tools/server/tests" --exclude="$top/tools/server/bench" \
    --exclude="$top/tools/mtmd/tests" --exclude="$top/tools/mtmd/test-*" "${keep[@]/#/$top/}"
# ggml/src: its own files (not the other backends' folders).
tar -tzf "$sdist" "$top/ggml/src/" | grep -E "^$top/ggml/src/[^/]+$" > "$work/ggml-src-files"
tar -xzf "$sdist" -C "$work" -T "$work/ggml-src-files"
src="$work/$top"
# tools/CMakeLists.txt adds every tool; the subset adds only its own (ui and mtmd for llama-server).
printf '%s\n' "# Cut down by worker-orcd's tools/llamacpp-src.sh: the benchmark tools and llama-server only." \
    "find_package(Threads REQUIRED)" "llama_add_compile_flags()" "add_subdirectory(llama-bench)" \
    "add_subdirectory(batched-bench)" "add_subdirectory(ui)" "add_subdirectory(mtmd)" "add_subdirectory(server)" \
    > "$src/tools/CMakeLists.txt"
# The sdist's .git is a submodule link to a folder it does not ship; cmake would read git metadata through it.
rm -f "$src/.git"
sha=$(sha256sum "$sdist" | cut -d' ' -f1)
cat > "$src/SOURCE" <<EOF
llama-cpp-python $LCP_VERSION (PyPI sdist, sha256 $sha)
llama.cpp commit $LLAMA_COMMIT (ggml-org/llama.cpp, vendored by that sdist)
subset: ${keep[*]} ggml/src/*.{c,cpp,h}
EOF
mv "$src" "$work/llama.cpp"
tar -C "$work" -cJf "$out/llama.cpp-src.tar.xz" llama.cpp
cp "$work/llama.cpp/SOURCE" "$out/SOURCE"
echo "llama_cpp_commit=$LLAMA_COMMIT" >> "$out/SOURCE"
echo "tarball_sha256=$(sha256sum "$out/llama.cpp-src.tar.xz" | cut -d' ' -f1)" >> "$out/SOURCE"
echo "$out/llama.cpp-src.tar.xz: $(du -h "$out/llama.cpp-src.tar.xz" | cut -f1)" \
    "($(tar -tJf "$out/llama.cpp-src.tar.xz" | grep -vc '/$') files)"
