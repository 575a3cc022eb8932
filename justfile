# Recipes for the worker. `just --list` shows them.
python := if path_exists(".venv/bin/python") == "true" { ".venv/bin/python" } else { "python3" }
port := env_var_or_default("WORKER_PORT", "8600")
test_workers := env_var_or_default("TEST_WORKERS", "2")

# Start the worker on the embedded Gemma 3 270M (GPU if there is one, else CPU) on http://127.0.0.1:{{port}}
# (exec: the worker replaces the recipe's shell, so the SIGTERM or SIGINT that just forwards reaches it)
serve *ARGS:
    exec {{python}} -m server.cli --device auto --port {{port}} --gpu-device 0 --worker-id "$({{python}} -c 'import uuid; print(uuid.uuid4())')" {{ARGS}}

# Run the CPU test suite (what CI runs); the 25 slowest tests are listed at the end (the suite's time budget). Its
# files are spread over TEST_WORKERS processes (pytest-xdist, default 2: CI's 2 cores; most of a test's time is one
# thread compiling, so two processes fill them: 497 -> 297 s on that machine, 2026-12-06); TEST_WORKERS=0 runs it in
# this process.
test *ARGS:
    {{python}} -m pytest -q -n {{test_workers}} --dist loadfile --durations=25 {{ARGS}}

# The long fuzz runs: FUZZ_FILES mutated model files and FUZZ_REQUESTS requests (10,000 each by default); nice'd
fuzz *ARGS:
    nice -n 10 {{python}} -m pytest -q -s -m fuzz -o addopts="" -p no:cacheprovider tests/test_fuzz.py {{ARGS}}

# Run the GPU-marked tests (on the GPU machine; installs carried wheels from .whl/ first if present)
# The gpu-marked tests (on the GPU machine). test_fuzz.py holds none and imports schemathesis, which that machine
# lacks; -rA lists every outcome, so a run cut short by a timeout still says which tests passed.
[positional-arguments]
test-gpu *ARGS:
    bash tools/gpu-env.sh {{python}} -m pytest -v -rA -m gpu -o addopts="" --ignore=tests/test_fuzz.py "$@"

# Benchmarks: worker vs llama.cpp on the same file and device (see bench/README.md); `just bench load ...` is the
# load mode (N concurrent streams through the real server against llama-server and llama-batched-bench)
bench *ARGS:
    {{python}} -m bench {{ARGS}}

# Lint and format check
lint:
    {{python}} -m ruff check .
    {{python}} -m ruff format --check .
