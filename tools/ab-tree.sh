#!/usr/bin/env bash
# The code of an earlier commit beside the checkout, for an A/B of code against its base in one GPU call:
#   tools/ab-tree.sh REV        -> .ab/REV (worker/, server/, bench/ of REV; git-ignored: carry ".ab" to the device)
# then, on the device: AB="WORKER_TREE=.ab/REV,PYTHONSAFEPATH=1 WORKER_TREE=" tools/gpu-session.sh ab:MODEL
# (tools/gpu-env.sh imports the code from WORKER_TREE; PYTHONSAFEPATH keeps `python -m` from putting the checkout
# first). Why: a change with no switch of its own (the same bits, fewer kernels) is measured against the commit
# before it on the same machine, in the same call, not against another session's figures.
set -euo pipefail
[ $# = 1 ] || { sed -n '2,7p' "$0"; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/.ab/$1"
rm -rf "$out" && mkdir -p "$out"
git -C "$root" archive "$1" worker server bench | tar -x -C "$out"
echo "$out: $(du -sh "$out" | cut -f1) of $(git -C "$root" rev-parse --short "$1")"
