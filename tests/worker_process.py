"""A real worker process for end-to-end tests: `python -m server.cli` on a free port, its stderr log lines
collected as they come, an httpx client, and an SSE reader that knows nothing of the worker's own client code."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
# The device the worker runs on: cpu in CI; WORKER_TEST_DEVICE=gpu runs the same tests on the GPU machine.
DEVICE = os.environ.get("WORKER_TEST_DEVICE", "cpu")
READY_TIMEOUT_S = 600.0  # a loaded CI machine compiles the warm-up slowly
PAYLOAD_KEYS = {
    "started": {"job_id", "model", "started_at", "seed"},
    "token": {"t", "i"},
    "end": {"tokens_out", "decode_time_ms", "stop_reason"},
    "error": {"code", "message", "retriable"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, timeout: float = 120.0, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m server.cli ARGS` to completion (for argument and start-up failures)."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class WorkerProcess:
    def __init__(self, model: str | Path | None, *extra: str, api_key: str | None = None):
        """`model` None: no --model, so the worker serves its embedded default (Gemma 3 270M)."""
        self.port = free_port()
        self.worker_id = str(uuid.uuid4())
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--worker-id", self.worker_id, "--gpu-device", "0", "--port", str(self.port), "--device", DEVICE]
        args += ["--model", str(model)] if model is not None else []
        args += extra
        if api_key:
            args += ["--api-key", api_key]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.client = httpx.Client(base_url=self.url, headers=self.auth(), timeout=httpx.Timeout(300.0, connect=10.0))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def events(self) -> list[dict[str, Any]]:
        """The log lines so far, parsed (every line must be one JSON object; a CLI refusal is plain text, so the
        failure quotes the line rather than json's "Expecting value")."""
        events = []
        for line in list(self.lines):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"a log line is not JSON: {line!r}") from None
        return events

    def wait_for_log(self, timeout: float = READY_TIMEOUT_S, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if all(ev.get(k) == v for k, v in match.items()):
                    return ev
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.05)
        raise AssertionError(f"no log event {match} within {timeout} s:\n" + "\n".join(self.lines[-20:]))

    def wait_ready(self) -> WorkerProcess:
        self.wait_for_log(event="ready")
        return self

    def execute(self, timeout: float = 300.0, **body: Any) -> tuple[int, list[tuple[str, dict]]]:
        """POST /execute and read the whole stream: (status, [(event, data), ...])."""
        with self.client.stream("POST", "/execute", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, [("http_error", r.json())]
            return 200, list(read_sse(r.iter_lines()))

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.client.close()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)


def read_sse(lines) -> Any:
    """(event, data) pairs of an SSE stream, per the WHATWG framing: `event:`/`data:` fields, a blank line ends an
    event, lines starting with ':' are comments."""
    name, data = None, []
    for line in lines:
        if not line:
            if data:
                yield name or "message", json.loads("\n".join(data))
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


def assert_log_sequence(w: WorkerProcess, job_id: str, reason: str) -> None:
    """§9: every line is one JSON object with worker_id, model_ref, gpu_device and event; the life of the worker
    reads startup -> model_load_start -> progress 0,25,50,75,100 -> complete -> ready -> execute_start ->
    execute_end -> shutdown."""
    events = [e for e in w.events() if e["event"] != "log"]  # other Python log records (e.g. JAX warnings)
    for e in events:
        assert {"worker_id", "model_ref", "gpu_device", "event"} <= set(e)
        assert e["worker_id"] == w.worker_id and e["gpu_device"] == 0
        if e["event"].startswith("execute_"):
            assert e["job_id"]
    seq = [e["event"] if e["event"] != "model_load_progress" else f"progress {e['percent']}" for e in events]
    want = ["startup", "model_load_start", *(f"progress {p}" for p in (0, 25, 50, 75, 100)), "model_load_complete"]
    want += ["ready"]
    assert seq[: len(want)] == want
    job_events = [e["event"] for e in events if e.get("job_id") == job_id]
    assert job_events == ["execute_start", "execute_end"]
    assert seq[-1] == "shutdown" and events[-1]["reason"] == reason
    assert seq.count("ready") == 1 and seq.count("shutdown") == 1
    # where the start's compiles went: at least the decode step, the first prefill and its first sample, by name
    warm_up = next(e for e in events if e["event"] == "ready")["warm_up"]
    assert warm_up["programs"] >= 3 and 0 < warm_up["compile_ms"] <= warm_up["warm_up_ms"], warm_up
    assert any(name.startswith("decode ") for name in warm_up["slowest"]), warm_up


def metric_values(client: httpx.Client) -> dict[tuple, float]:
    """GET /metrics parsed: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def requests_by_outcome(values: dict) -> dict[str, float]:
    return {dict(k[1])["outcome"]: v for k, v in values.items() if k[0] == "worker_requests_total"}


def counter(values: dict, name: str) -> float:
    return sum(v for k, v in values.items() if k[0] == name)
