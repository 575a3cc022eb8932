"""`just serve` (the README's first command) hands SIGTERM to the worker: the recipe execs the server, so the
signal `just` forwards reaches it and it shuts down gracefully (its `shutdown` log event), instead of leaving an
orphaned server behind a killed shell (what the recipe did before)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.worker_process import READY_TIMEOUT_S, REPO, free_port

pytestmark = pytest.mark.slow


def test_sigterm_to_just_serve_shuts_the_worker_down():
    just = Path(sys.executable).parent / "just"  # rust-just, from the dev extras
    assert just.exists(), f"{just} missing: pip install -e '.[dev]' installs it"
    port = free_port()
    env = {**os.environ, "WORKER_PORT": str(port)}
    proc = subprocess.Popen([str(just), "serve", "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert any(e.get("event") == "shutdown" and e.get("reason") == "SIGTERM" for e in events), err[-2000:]
        with pytest.raises(httpx.HTTPError):  # nobody listens any more
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
