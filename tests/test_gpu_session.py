"""tools/gpu-session.sh's build stage with llama.cpp's binaries carried (tools/llamacpp-cuda-cross.sh makes them): it
unpacks them, has each run through a wrapper that points the loader at the machine's CUDA libraries, and reports
binaries that do not run here so the stage builds instead. Fake binaries (shell scripts) and a fake toolkit stand in
for the GPU machine's."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("llama-bench", "llama-batched-bench", "llama-server")


def carried(path: Path, body: str) -> Path:
    """A tarball laid out as the cross build's: the three programs under bin/."""
    with tarfile.open(path, "w:xz") as tar:
        for name in NAMES:
            data = f"#!/bin/sh\n{body}\n".encode()
            info = tarfile.TarInfo(f"bin/{name}")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def session(tmp_path: Path, function: str, prebuilt: Path) -> subprocess.CompletedProcess:
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True, exist_ok=True)
    (toolkit / "lib64").mkdir(exist_ok=True)
    (toolkit / "lib64" / "libcublas.so.13").touch()
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    env = dict(os.environ, GPU_STATE=str(tmp_path / "state"), LLAMACPP_PREBUILT=str(prebuilt),
               PATH=f"{toolkit / 'bin'}:{os.environ['PATH']}", LD_LIBRARY_PATH="/before")  # fmt: skip
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu-session.sh"), "--run", function], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_carried_binaries_run_through_wrappers_that_find_the_toolkits_libraries(tmp_path):
    prebuilt = carried(tmp_path / "carried.tar.xz", 'echo "$(basename "$0") lib=$LD_LIBRARY_PATH args=$*"')
    done = session(tmp_path, "do_build", prebuilt)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "unpacked" in done.stdout
    bin_dir = tmp_path / "state" / "llamacpp" / "build" / "bin"
    for name in NAMES:
        out = subprocess.run([str(bin_dir / name), "-m", "x y"], capture_output=True, text=True,
                             env=dict(os.environ, LD_LIBRARY_PATH="/before"), check=True).stdout  # fmt: skip
        assert out.strip() == f"{name} lib={tmp_path / 'cuda' / 'lib64'}:/before args=-m x y"
    # A second build stage finds them and leaves them be.
    again = session(tmp_path, "do_build", prebuilt)
    assert again.returncode == 0 and "have " in again.stdout


def test_carried_binaries_that_do_not_run_here_are_reported_for_a_build(tmp_path):
    prebuilt = carried(tmp_path / "carried.tar.xz", "echo 'cannot open shared object file' >&2; exit 127")
    done = session(tmp_path, "use_prebuilt", prebuilt)
    assert done.returncode == 1
    assert "does not run here: building" in done.stdout
