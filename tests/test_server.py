"""End-to-end HTTP tests of the worker on a tiny random qwen2 model (the oracle's Q4_K_M file, context 512): the
real `python -m server.cli` process on a free port, spoken to over HTTP with httpx.

One server serves the whole module (with an API key, a queue of 1, --max-tokens-in 256, --max-tokens-out 1000
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
from prometheus_client.parser import text_string_to_metric_families

import worker
from tests.conftest import oracles_dir
from tests.worker_process import DEVICE, PAYLOAD_KEYS, REPO, WorkerProcess, assert_log_sequence, read_sse

pytestmark = pytest.mark.slow

API_KEY = "test-key-123"
DEADLINE_S = 2.0
LONG = {"prompt": "Count: one two three", "max_tokens": 1000, "temperature": 1.0, "seed": 11}


def model_path():
    return oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf"


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
def server(callback):
    w = WorkerProcess(
        model_path(),
        "--max-queue", "1",
        "--max-tokens-in", "256",
        "--max-tokens-out", "1000",
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


def metric_values(w: WorkerProcess) -> dict[tuple, float]:
    r = w.client.get("/metrics")
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


def test_health_fields_and_types(server):
    r = httpx.get(f"{server.url}/health")  # no token: /health is public
    assert r.status_code == 200
    h = r.json()
    expected = {
        "status": "healthy",
        "model": "model-q4_k_m.gguf",
        "resident": True,
        "quant_kind": "Q4_K_M",
        "tokenizer_kind": "gguf-bpe",
        "vocab_size": 1024,  # the oracle's hf_config
        "context_length": 512,
        "device": DEVICE,
        "worker_id": server.worker_id,
        "max_tokens_in": 256,
        "max_tokens_out": 1000,
        "max_queue": 1,
    }
    assert {k: h[k] for k in expected} == expected
    assert isinstance(h["vram_bytes_used"], int) and h["vram_bytes_used"] > 0
    if DEVICE == "cpu":
        assert h["sm"] is None and h["cuda_runtime_version"] is None
    else:
        assert h["sm"].startswith("sm_") and isinstance(h["cuda_runtime_version"], int)
    assert isinstance(h["uptime_seconds"], float) and h["uptime_seconds"] > 0


@pytest.mark.parametrize(
    "method, path, body",
    [("POST", "/execute", job("auth")), ("POST", "/cancel", {"job_id": "x"}), ("GET", "/metrics", None),
     ("POST", "/shutdown", {})],
)  # fmt: skip
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {API_KEY}"])
def test_every_endpoint_but_health_needs_the_key(server, method, path, body, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.request(method, f"{server.url}{path}", json=body, headers=headers)
    assert r.status_code == 401
    assert r.json()["code"] == "UNAUTHORIZED"
    assert r.headers["www-authenticate"] == "Bearer"


# -- validation: 400 before any work starts --------------------------------------------------------------------

STOP_OVER_32_TOKENS = "".join(chr(0x4E00 + i) for i in range(40))
DROP = object()
INVALID = [
    ({"job_id": DROP}, "job_id"),
    ({"job_id": ""}, "job_id"),
    ({"job_id": 7}, "job_id"),
    ({"prompt": DROP}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 32769}, "prompt"),
    ({"prompt": ["hi"]}, "prompt"),
    ({"prompt": "hello " * 300}, "prompt"),  # 901 tokens > --max-tokens-in 256
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2049}, "max_tokens"),
    ({"max_tokens": 1001}, "max_tokens"),  # > --max-tokens-out 1000
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": -0.01}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1025}, "top_k"),  # > vocab_size 1024
    ({"top_k": 0.5}, "top_k"),
    ({"min_p": -0.5}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": -0.1}, "repetition_penalty"),
    ({"repetition_penalty": 2.5}, "repetition_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "a"}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": [STOP_OVER_32_TOKENS]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "42"}, "seed"),
    ({"colour": "blue"}, "colour"),
]


def bad_body(patch: dict) -> dict:
    body = {"job_id": f"bad-{time.monotonic_ns()}", "prompt": "hi", "max_tokens": 4, **patch}
    return {k: v for k, v in body.items() if v is not DROP}


def test_the_stop_case_really_is_over_32_tokens():
    tok = worker.load_tokenizer(model_path())
    assert len(tok.encode(STOP_OVER_32_TOKENS, add_bos=False)) > 32


@pytest.mark.parametrize("patch, field", INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)])
def test_every_invalid_field_is_400_naming_it(server, patch, field):
    r = server.client.post("/execute", json=bad_body(patch))
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["code"] == "INVALID_REQUEST"
    assert err["field"] == field
    assert field in err["message"]


@pytest.mark.parametrize(
    "content",
    [
        b"{bad",
        b"",
        b"\xff\xfe",
        b'{"job_id": "a", "prompt": "\xff"}',
        b'{"job_id": "a", "prompt": "\\ud800"}',
        b"[1, 2]",
        b'"text"',
        b"null",
    ],
)
def test_malformed_or_non_object_json_is_400(server, content):
    r = server.client.post("/execute", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "INVALID_REQUEST" and r.json()["field"] == "body"


def test_body_over_the_limit_is_413(server):
    r = server.client.post("/execute", content=b'{"prompt": "' + b"x" * (1 << 20) + b'"}')
    assert r.status_code == 413
    assert r.json() == {"code": "INVALID_REQUEST", "message": "the request body exceeds 1048576 bytes", "field": "body"}


def test_refused_requests_started_no_work(server):
    started = [e for e in server.events() if e["event"] == "execute_start" and e["job_id"].startswith("bad-")]
    assert started == []
    assert requests_by_outcome(metric_values(server))["invalid"] >= len(INVALID)


# -- streams ---------------------------------------------------------------------------------------------------


def test_stream_is_started_tokens_end_with_the_payload_fields(server):
    body = job("shape", max_tokens=12, seed=123)
    with server.client.stream("POST", "/execute", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(read_sse(r.iter_lines()))
    names = [n for n, _ in events]
    assert names[0] == "started" and names[-1] == "end"
    assert set(names[1:-1]) <= {"token", "metrics"} and names[-2] == "metrics"
    for name, data in events:
        if name in PAYLOAD_KEYS:
            assert set(data) == PAYLOAD_KEYS[name], name
    started, end = events[0][1], events[-1][1]
    assert started["job_id"] == body["job_id"] and started["seed"] == 123 and started["model"] == "model-q4_k_m.gguf"
    assert started["started_at"].endswith("Z") and "T" in started["started_at"]
    indices = [d["i"] for n, d in events if n == "token"]
    assert indices == sorted(indices) and all(0 <= i < end["tokens_out"] for i in indices)
    assert end["stop_reason"] in ("max_tokens", "eos") and 1 <= end["tokens_out"] <= 12
    assert isinstance(end["decode_time_ms"], float)


def test_same_seed_same_stream_and_unseeded_gets_a_seed(server):
    a = server.execute(**job("seed-a", seed=99, max_tokens=10))
    b = server.execute(**job("seed-b", seed=99, max_tokens=10))
    tokens = [[d for n, d in ev if n == "token"] for _, ev in (a, b)]
    assert tokens[0] == tokens[1] and tokens[0]
    status, ev = server.execute(**job("no-seed", max_tokens=2))
    seed = ev[0][1]["seed"]
    assert status == 200 and isinstance(seed, int) and 0 <= seed < 2**64


def test_stop_sequence_ends_the_stream(server):
    _, ev = server.execute(**job("greedy", temperature=0.0, max_tokens=20))
    text = "".join(d["t"] for n, d in ev if n == "token")
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    _, ev = server.execute(**job("stopped", temperature=0.0, max_tokens=20, stop=[stop]))
    assert ev[-1] == ("end", {**ev[-1][1], "stop_reason": "stop_sequence"})
    assert "".join(d["t"] for n, d in ev if n == "token") == text[: text.index(stop)]


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


def test_cancel_request_is_validated(server):
    r = server.client.post("/cancel", json={"job": "x"})
    assert r.status_code == 400 and r.json()["field"] in ("job_id", "job")


def test_client_disconnect_cancels_the_job(server):
    before = metric_values(server)
    body = job("disconnect", **LONG)
    r, events = open_stream(server, body)
    assert next(events)[0] == "started"
    assert next(events)[0] == "token"
    r.close()  # the client goes away mid-stream
    end = server.wait_for_log(timeout=30, event="execute_end", job_id=body["job_id"])
    assert end["code"] == "CANCELLED"
    after = metric_values(server)
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
        while httpx.get(f"{server.url}/health").json()["queue_depth"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        third = server.client.post("/execute", json=job("refused"))
        assert third.status_code == 503
        assert third.json()["code"] == "QUEUE_FULL" and third.headers["retry-after"] == "1"
        dup = server.client.post("/execute", json={**second, "prompt": "again"})
        assert dup.status_code == 400 and dup.json()["field"] == "job_id"
        for b in (second, first):
            assert server.client.post("/cancel", json={"job_id": b["job_id"]}).json()["cancelled"] is True
        rest = list(ev1)
    finally:
        r1.close()
    t.join(60)
    assert rest[-1][1]["code"] == "CANCELLED"
    status, ev2 = results["second"]
    assert status == 200 and [n for n, _ in ev2] == ["started", "error"] and ev2[1][1]["code"] == "CANCELLED"


# -- metrics and the client ------------------------------------------------------------------------------------


def test_metrics_parse_and_count_by_outcome(server):
    before = metric_values(server)
    _, ev = server.execute(**job("counted", max_tokens=5, temperature=0.0))
    server.client.post("/execute", json=job("counted-bad", max_tokens=0))
    after = metric_values(server)
    ok, bad = requests_by_outcome(after), requests_by_outcome(before)
    assert ok["ok"] == bad["ok"] + 1 and ok["invalid"] == bad["invalid"] + 1
    assert set(ok) == {"ok", "cancelled", "timeout", "oom", "error", "invalid", "queue_full", "shutting_down"}
    tokens_out = ev[-1][1]["tokens_out"]
    assert (
        counter(after, "worker_tokens_generated_total") == counter(before, "worker_tokens_generated_total") + tokens_out
    )
    assert (
        counter(after, "worker_inference_duration_ms_count")
        == counter(before, "worker_inference_duration_ms_count") + 1
    )
    for (name, labels), value in after.items():
        assert dict(labels).get("quant_kind") == "Q4_K_M", name
        if name in ("worker_vram_bytes", "worker_uptime_seconds"):
            assert value > 0


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
