"""End-to-end HTTP tests of the worker on a tiny random qwen2 model (the oracle's Q4_K_M file, its context patched
from 512 to 4096: `long_context_model`): the real `python -m server.cli` process on a free port, spoken to over HTTP
with httpx, for what needs a real process and socket: the ready callback, mid-stream cancel and client disconnect,
the queue under load, the Python client, SIGTERM. The rest of the HTTP contract is tested in process
(test_http_contract.py).

One server serves the whole module (with an API key, a queue of 1, --max-tokens-in 256, --max-tokens-out 2048
and a ready callback); the last test sends it SIGTERM mid-job and then checks its whole log. Text-quality tests
(haiku, UTF-8) use the real Gemma 3 in test_server_gemma.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from gguf_factory import layout, patch

from tests.conftest import oracles_dir
from tests.worker_process import (
    REPO,
    WorkerProcess,
    assert_log_sequence,
    counter,
    metric_values,
    read_sse,
    requests_by_outcome,
)

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
DEADLINE_S = 2.0
LONG_CONTEXT = 4096
# A job to cancel mid-stream. With the file's 512 slots it filled its context ~0.5 s after its first token, so a
# cancel from a loaded machine could come after its end. With 4,096 slots, sampled runs met EOS within 382-925 tokens
# (seeds 1, 2, 3, 11 at temperature 1); the greedy one runs 1,176 tokens, ~4 s here.
LONG = {"prompt": "Count: one two three", "max_tokens": 2000, "temperature": 0.0}


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """The tiny qwen2 with its context_length patched to LONG_CONTEXT (random weights: positions past the trained
    length are as good as any)."""
    path = tmp_path_factory.mktemp("long-context") / "model-q4_k_m.gguf"
    path.write_bytes((oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf").read_bytes())
    patch(path, layout(path).keys["qwen2.context_length"].value[0], LONG_CONTEXT)
    return path


class _Callback(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Callback.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def callback():
    httpd = HTTPServer(("127.0.0.1", 0), _Callback)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/ready"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(callback, long_context_model):
    w = WorkerProcess(
        long_context_model,
        "--max-batch", "1",  # M0's one job at a time, which the queue tests below describe
        "--max-queue", "1",
        "--max-tokens-in", "256",
        "--max-tokens-out", "2048",
        "--shutdown-deadline", str(DEADLINE_S),
        "--callback-url", callback,
        api_key=API_KEY,
    )  # fmt: skip
    try:
        yield w.wait_ready()
    finally:
        w.stop()


def job(name: str, **kw) -> dict:
    return {"job_id": f"{name}-{time.monotonic_ns()}", "prompt": "hello", "max_tokens": 8, **kw}


def growth(before: dict, after: dict, name: str) -> float:
    return counter(after, name) - counter(before, name)


def open_stream(w: WorkerProcess, body: dict):
    """An open /execute response and its event iterator (the caller closes the response)."""
    r = w.client.send(w.client.build_request("POST", "/execute", json=body), stream=True)
    assert r.status_code == 200, r.read()
    return r, read_sse(r.iter_lines())


# -- start-up, health, auth ------------------------------------------------------------------------------------


def test_ready_callback_message(server, callback):
    deadline = time.monotonic() + 30
    while not _Callback.received and time.monotonic() < deadline:
        time.sleep(0.05)
    msg = _Callback.received[0]
    assert msg["worker_id"] == server.worker_id
    assert msg["model"] == "model-q4_k_m.gguf"
    assert msg["port"] == server.port
    assert isinstance(msg["vram_bytes"], int) and msg["vram_bytes"] > 0


# -- streams ---------------------------------------------------------------------------------------------------


def test_cancel_mid_stream_then_next_request_is_fine(server):
    body = job("cancel", **LONG)
    r, events = open_stream(server, body)
    try:
        assert next(events)[0] == "started"
        assert next(events)[0] == "token"
        c = server.client.post("/cancel", json={"job_id": body["job_id"]})
        assert c.status_code == 202 and c.json() == {"job_id": body["job_id"], "cancelled": True}
        rest = list(events)
    finally:
        r.close()
    assert rest[-1][0] == "error"
    assert rest[-1][1]["code"] == "CANCELLED" and rest[-1][1]["retriable"] is False
    assert {n for n, _ in rest[:-1]} <= {"token"}
    again = server.client.post("/cancel", json={"job_id": body["job_id"]})  # idempotent
    assert again.status_code == 202 and again.json()["cancelled"] is False
    status, ev = server.execute(**job("after-cancel"))
    assert status == 200 and ev[-1][0] == "end"


def test_client_disconnect_cancels_the_job(server):
    before = metric_values(server.client)
    body = job("disconnect", **LONG)
    r, events = open_stream(server, body)
    assert next(events)[0] == "started"
    assert next(events)[0] == "token"
    r.close()  # the client goes away mid-stream
    end = server.wait_for_log(timeout=30, event="execute_end", job_id=body["job_id"])
    assert end["code"] == "CANCELLED"
    after = metric_values(server.client)
    assert requests_by_outcome(after)["cancelled"] == requests_by_outcome(before)["cancelled"] + 1
    assert growth(before, after, "worker_client_disconnects_total") == 1
    status, ev = server.execute(**job("after-disconnect"))
    assert status == 200 and ev[-1][0] == "end"


def test_second_job_waits_third_gets_queue_full(server):
    """--max-queue 1: one job runs, one waits, the next is refused with 503 QUEUE_FULL (and nothing interleaves)."""
    first, second = job("running", **LONG), job("waiting", **LONG)
    r1, ev1 = open_stream(server, first)
    try:
        assert next(ev1)[0] == "started" and next(ev1)[0] == "token"
        results: dict = {}
        t = threading.Thread(target=lambda: results.update(second=server.execute(**second)))
        t.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").json()["queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        third = server.client.post("/execute", json=job("refused"))
        assert third.status_code == 503
        assert third.json()["code"] == "QUEUE_FULL" and third.headers["retry-after"] == "1"
        dup = server.client.post("/execute", json={**second, "prompt": "again"})
        assert dup.status_code == 400 and dup.json()["field"] == "job_id"
        cancelled = [server.client.post("/cancel", json={"job_id": b["job_id"]}).json()["cancelled"]
                     for b in (second, first)]  # fmt: skip
        rest = list(ev1)
    finally:
        r1.close()
    t.join(60)
    assert cancelled == [True, True]
    assert rest[-1][1]["code"] == "CANCELLED"
    status, ev2 = results["second"]
    # cancelled while it waited: it ends at once, never started
    assert status == 200 and [n for n, _ in ev2] == ["error"] and ev2[0][1]["code"] == "CANCELLED"


# -- metrics and the client ------------------------------------------------------------------------------------


def test_python_client_prints_the_stream(server):
    body = job("client", temperature=0.0, max_tokens=10, seed=5)
    _, ev = server.execute(**body)
    text = "".join(d["t"] for n, d in ev if n == "token")
    args = ["--url", server.url, "--api-key", API_KEY, "--temperature", "0", "--max-tokens", "10", "--seed", "5"]
    out = subprocess.run(
        [sys.executable, "-m", "worker.client", body["prompt"], *args], cwd=REPO, capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode("utf-8") == text + "\n"
    assert "seed 5" in out.stderr.decode()


# -- shutdown (last: it ends the module's server) --------------------------------------------------------------


def test_sigterm_during_a_job_exits_0_within_the_deadline(server):
    body = job("sigterm", **LONG)
    r, events = open_stream(server, body)
    try:
        assert next(events)[0] == "started" and next(events)[0] == "token"
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        refused = server.client.post("/execute", json=job("late"))
        assert refused.status_code == 503 and refused.json()["code"] == "SHUTTING_DOWN"
        rest = list(events)
    finally:
        r.close()
    assert rest[-1][0] == "end" or rest[-1][1]["code"] == "CANCELLED"
    assert server.proc.wait(DEADLINE_S + 10) == 0
    assert time.monotonic() - t0 < DEADLINE_S + 5  # the deadline, plus process teardown on a busy machine
    server._reader.join(5)
    assert_log_sequence(server, body["job_id"], "SIGTERM")
