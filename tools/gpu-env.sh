#!/usr/bin/env bash
# Run a command on the GPU machine with the project importable: the wheels carried in .whl/ (made here by
# ../shared/tools/device-wheels.sh) and, when staged, the Gemma 3 wheels in .gemma/wheels/ (tools/gemma-stage.sh)
# are installed offline into one site folder, then the command runs with PYTHONPATH=<site>:<repo> and <site>/bin
# on PATH.
#   usage: tools/gpu-env.sh COMMAND [ARGS...]        (the justfile's test-gpu recipe calls it)
# The site folder (env WORKER_SITE, default /tmp/worker-site) is reused while the set of wheels is unchanged;
# WORKER_WHEELS (default ".whl .gemma/wheels", relative to the repo) names the folders of wheels.
# Without any wheels the command runs as is, with the repo on PYTHONPATH. WORKER_TREE=DIR puts another copy of the
# code on PYTHONPATH instead of the repo (tools/ab-tree.sh makes one of an earlier commit: an A/B of code against its
# base in one call; with PYTHONSAFEPATH=1, so that `python -m` does not put the current folder first).
set -euo pipefail
[ $# -gt 0 ] || { sed -n '2,8p' "$0"; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(cd "${WORKER_TREE:-$root}" && pwd)  # the code imported: the repo, or WORKER_TREE
site=${WORKER_SITE:-/tmp/worker-site}
shopt -s nullglob
wheels=()
for d in ${WORKER_WHEELS:-.whl .gemma/wheels}; do wheels+=("$root/$d"/*.whl); done
if [ ${#wheels[@]} -gt 0 ]; then
    stamp=$(ls -l "${wheels[@]}" | awk '{print $5, $NF}' | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$site/.stamp" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$site"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "${wheels[@]}"
        echo "$stamp" > "$site/.stamp"
    fi
    export PYTHONPATH="$site:$tree${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"  # bin: e.g. rust-just's `just`
else
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$@"
