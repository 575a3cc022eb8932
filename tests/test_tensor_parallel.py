"""Runs tensor_parallel_cases.py in a process of its own with 4 CPU devices (XLA_FLAGS has to be set before JAX
starts, and the rest of the suite keeps its one device); `--tensor-parallel` on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import oracles_dir

from server.cli import main
from tests.worker_process import cli, free_port

HERE = Path(__file__).resolve().parent


def base(**override: str) -> list[str]:
    opts = {"--worker-id": "00000000-0000-4000-8000-000000000019", "--gpu-device": "0", "--port": str(free_port()),
            "--device": "cpu", **override}  # fmt: skip
    return [x for kv in opts.items() for x in kv]


def test_tensor_parallel_cases_on_four_cpu_devices():
    oracles_dir()  # a clear skip without the oracle data, rather than a child run that skips everything
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        str(HERE / "tensor_parallel_cases.py"),
    ]
    run = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]


def test_cli_refuses_fewer_than_one_device(capsys):
    assert main(base(**{"--tensor-parallel": "0"})) == 1
    assert capsys.readouterr().err.strip().startswith("worker-orcd: error: --tensor-parallel 0: must be at least 1")


def test_cli_refuses_both_layouts_and_no_cpu_devices(capsys):
    assert main(base(**{"--tensor-parallel": "2", "--cpu-devices": "2"})) == 1
    assert "--cpu-devices and --tensor-parallel are two layouts" in capsys.readouterr().err
    assert main(base(**{"--cpu-devices": "0"})) == 1
    assert capsys.readouterr().err.strip() == "worker-orcd: error: --cpu-devices 0: must be at least 1"
    assert main(base(**{"--cpu-devices": "2", "--device": "gpu"})) == 1
    assert "--cpu-devices spreads the model over the CPU's cores: not with --device gpu" in capsys.readouterr().err


def test_cli_makes_the_host_devices_and_refuses_heads_that_do_not_divide():
    """`--device cpu --tensor-parallel 3` gets its 3 host devices from the CLI (no XLA_FLAGS from the user), then the
    llama oracle's 4 query heads, which do not split over 3, fail the start-up by rule."""
    env = {"XLA_FLAGS": ""}
    model = str(oracles_dir() / "models" / "llama" / "model-q4_k_m.gguf")
    out = cli(*base(**{"--model": model, "--tensor-parallel": "3"}), env=env)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("worker-orcd: error: MODEL_LOAD_FAILED: tensor parallelism: 4 query heads"), last
