"""Time to first token through HTTP: start the real server (`python -m server.cli`) on a free port, time its start
to ready (/health answers 200), then time POST /execute to the first `token` SSE event, as a client sees it."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

PROMPT = "Write a haiku about GPU computing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(exit_code: Callable[[], int | None], url: str, deadline: float, log: Path | None) -> None:
    """Until /health answers 200; `exit_code`: the server process's, None while it runs (Popen.poll, or a
    multiprocessing.Process's exitcode); `log`: its output, quoted in the error (None: it has none of its own)."""
    while time.monotonic() < deadline:
        if (code := exit_code()) is not None:
            raise RuntimeError(f"server exited with {code} before ready: {tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not ready in time: {tail(log)}")


def tail(log: Path | None, n: int = 600) -> str:
    if log is None:
        return ""
    try:
        return log.read_text(errors="replace")[-n:].replace("\n", " | ")
    except OSError:
        return ""


def first_token(client: httpx.Client, url: str, job_id: str, max_tokens: int) -> tuple[float, str]:
    """(seconds from sending the request to the first token event, the stream's terminal event name)."""
    body = {"job_id": job_id, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1}
    start = time.perf_counter()
    ttft, event, last = None, None, None
    with client.stream("POST", f"{url}/execute", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"/execute answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
                if event == "token" and ttft is None:
                    ttft = time.perf_counter() - start
                last = event
    if ttft is None:
        raise RuntimeError(f"no token event in the stream (last event: {last})")
    return ttft, last or ""


def stop(proc: subprocess.Popen, url: str) -> None:
    try:
        httpx.post(f"{url}/shutdown", timeout=5)
        proc.wait(timeout=30)
    except (httpx.HTTPError, subprocess.TimeoutExpired):
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_server(
    model: str | None, device: str, log: Path, extra: tuple[str, ...] | list[str] = (), ready_timeout: float = 600
) -> tuple[subprocess.Popen, str, float]:
    """`python -m server.cli` on a free port (`model` None: the embedded default), its output in `log`; returns
    (process, base URL, seconds to ready). A server that fails to get ready is stopped before the error."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "--device", device, "--port", str(port), "--gpu-device", "0"]
    cmd += ["--worker-id", str(uuid.uuid4()), *(["--model", model] if model else []), *extra]
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc.poll, url, start + ready_timeout, log)
    except BaseException:
        stop(proc, url)
        raise
    return proc, url, time.monotonic() - start


def warm_up_of(log: Path) -> dict | None:
    """The `warm_up` of the server's `ready` log event (where its start's compiles went), or None."""
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "ready":
            return event.get("warm_up")
    return None


def measure(model: str, device: str, log: Path, requests: int = 5, ready_timeout: float = 600,
            extra: tuple[str, ...] | list[str] = ()) -> dict:  # fmt: skip
    """Start the server (`extra`: more of its arguments), time ready and `requests` first tokens; the first request
    is reported on its own (it may include a compile the server did not do at start-up)."""
    proc, url, ready_s = start_server(model, device, log, extra, ready_timeout=ready_timeout)
    try:
        with httpx.Client(timeout=httpx.Timeout(300, connect=10)) as client:
            runs = [first_token(client, url, f"bench-{i}", 16) for i in range(requests)]
    finally:
        stop(proc, url)
    times = [t for t, _ in runs]
    return {
        "server_ready_s": ready_s,
        "server_warm_up": warm_up_of(log),
        "ttft_first_s": times[0],
        "ttft_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "ttft_runs_s": times,
        "terminal_events": sorted({e for _, e in runs}),
        "server_exit_code": proc.returncode,
    }
