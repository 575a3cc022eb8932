"""The HTTP contract, in process: the Litestar app (server/app.py) on a real engine and a tiny random qwen2 model
(the oracle's Q4_K_M file, context 512), spoken to through Litestar's own test client (`litestar.testing`). Health,
auth, request validation, the stream's shape, seeds, stop strings, metrics. What needs a real process and a real
socket (mid-stream cancel and disconnect, the queue under load, the ready callback, SIGTERM, the Python client) is in
test_server.py; the real Gemma 3 end to end in test_server_gemma.py.

The worker is configured as test_server.py's: an API key, a queue of 1, --max-tokens-in 256, --max-tokens-out 1000.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from litestar.testing import TestClient

import worker
from server.app import EventRelay, JobStream, create_app, frames_of
from server.service import WorkerService
from tests.conftest import oracles_dir
from tests.worker_process import PAYLOAD_KEYS, counter, metric_values, read_sse, requests_by_outcome
from worker.engine import End, Engine, TokenEvent
from worker.narration import Narrator

API_KEY = "test-key-123"


def model_path():
    return oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf"


class InProcess:
    """The app on an engine thread; `client` carries the API key, `anon` does not; `events()` is the log."""

    def __init__(self):
        self.worker_id = str(uuid.uuid4())
        self.log = io.StringIO()
        narrator = Narrator(self.worker_id, str(model_path()), 0, stream=self.log)
        model = worker.load(model_path(), device="cpu")
        self.engine = Engine(
            model,
            max_queue=1,
            max_tokens_in=256,
            max_tokens_out=1000,
            on_event=lambda name, fields: narrator.emit(name, level="error" if name == "error" else "info", **fields),
        )
        self.engine.start()
        service = WorkerService(self.engine, narrator, worker_id=self.worker_id, api_key=API_KEY)
        app = create_app(service)
        self.client = TestClient(app, timeout=300)
        self.client.headers["Authorization"] = f"Bearer {API_KEY}"
        self.anon = TestClient(app, timeout=60)

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def execute(self, **body) -> tuple[int, list[tuple[str, dict]]]:
        r = self.client.post("/execute", json=body)
        if r.status_code != 200:
            return r.status_code, [("http_error", r.json())]
        return 200, list(read_sse(r.text.splitlines()))


@pytest.fixture(scope="module")
def server():
    s = InProcess()
    with s.client, s.anon:
        yield s
    s.engine.shutdown(5.0)


def job(name: str, **kw) -> dict:
    return {"job_id": f"{name}-{time.monotonic_ns()}", "prompt": "hello", "max_tokens": 8, **kw}


def test_health_fields_and_types(server):
    r = server.anon.get("/health")  # no token: /health is public
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
        "device": "cpu",
        "worker_id": server.worker_id,
        "max_tokens_in": 256,
        "max_tokens_out": 1000,
        "max_queue": 1,
        "decode_steps": 1,  # the CPU's (worker/model.py)
        "bf16_experts": False,  # no experts
    }
    assert {k: h[k] for k in expected} == expected
    assert isinstance(h["vram_bytes_used"], int) and h["vram_bytes_used"] > 0
    assert h["sm"] is None and h["cuda_runtime_version"] is None
    assert isinstance(h["uptime_seconds"], float) and h["uptime_seconds"] > 0


@pytest.mark.parametrize(
    "method, path, body",
    [("POST", "/execute", job("auth")), ("POST", "/cancel", {"job_id": "x"}), ("GET", "/metrics", None),
     ("POST", "/shutdown", {})],
)  # fmt: skip
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {API_KEY}"])
def test_every_endpoint_but_health_needs_the_key(server, method, path, body, header):
    headers = {"Authorization": header} if header else {}
    r = server.anon.request(method, path, json=body, headers=headers)
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
    assert requests_by_outcome(metric_values(server.client))["invalid"] >= len(INVALID)


# -- streams ---------------------------------------------------------------------------------------------------


def test_stream_is_started_tokens_end_with_the_payload_fields(server):
    body = job("shape", max_tokens=12, seed=123)
    r = server.client.post("/execute", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = list(read_sse(r.text.splitlines()))
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


def test_cancel_request_is_validated(server):
    r = server.client.post("/cancel", json={"job": "x"})
    assert r.status_code == 400 and r.json()["field"] in ("job_id", "job")


# -- metrics -------------------------------------------------------------------------------------------------


def test_metrics_parse_and_count_by_outcome(server):
    before = metric_values(server.client)
    _, ev = server.execute(**job("counted", max_tokens=5, temperature=0.0))
    server.client.post("/execute", json=job("counted-bad", max_tokens=0))
    after = metric_values(server.client)
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
    # the host's CPU by thread: the engine's grew with the job, the event loop's is there and never falls
    cpu = {
        dict(k[1])["thread"]: (before.get(k, 0.0), v) for k, v in after.items() if k[0] == "worker_thread_cpu_seconds"
    }
    assert set(cpu) == {"engine", "event_loop"}
    assert cpu["engine"][1] > cpu["engine"][0] and cpu["event_loop"][1] >= cpu["event_loop"][0] > 0


def test_events_that_queued_up_go_out_in_one_write():
    """JobStream.frames: what the engine queued while the stream waited for the event loop is one chunk (one
    socket write), the same bytes as one frame each; nothing follows the terminal event."""

    async def drain() -> list[bytes]:
        service = SimpleNamespace(keepalive_s=5.0, open_streams={}, engine=SimpleNamespace(cancel=lambda _: False))
        job = JobStream(service, "j", asyncio.get_running_loop())
        events = [TokenEvent("j", "a", 0), TokenEvent("j", "b", 1), End("j", 2, 1.0, "max_tokens", 3, 1.0)]
        for ev in events[:2]:
            job.queue.put_nowait(ev)
        chunks = []
        async for chunk in job.frames():
            chunks.append(chunk)
            if len(chunks) == 1:
                job.queue.put_nowait(events[2])
                job.queue.put_nowait(TokenEvent("j", "late", 2))  # after the end: never read
        assert chunks == [frames_of(events[0]) + frames_of(events[1]), frames_of(events[2])]
        return chunks

    asyncio.run(drain())


def test_a_quiet_stream_gets_a_keep_alive_each_period_and_its_events_after_them():
    """JobStream.frames with nothing queued: an SSE comment about every keep-alive period (one timer for all
    streams: KeepAlive), none among events queued together, then the events; the timer task ends with the last
    stream."""

    async def drain() -> tuple[list[bytes], list[float]]:
        loop = asyncio.get_running_loop()
        service = SimpleNamespace(keepalive_s=0.2, open_streams={}, engine=SimpleNamespace(cancel=lambda _: False))
        quiet, busy = JobStream(service, "q", loop), JobStream(service, "b", loop)
        events = [TokenEvent("q", "a", 0), End("q", 1, 1.0, "max_tokens", 3, 1.0)]
        chunks, at, t0 = [], [], loop.time()
        busy_frames = busy.frames()
        busy.queue.put_nowait(TokenEvent("b", "x", 0))
        assert await anext(busy_frames) == frames_of(TokenEvent("b", "x", 0))  # a second stream on the same timer
        async for chunk in quiet.frames():
            chunks.append(chunk)
            at.append(loop.time() - t0)
            if len(chunks) == 3:
                for ev in (events[0], None, events[1]):  # a keep-alive queued among events: dropped
                    quiet.queue.put_nowait(ev)
        busy.queue.put_nowait(End("b", 1, 1.0, "max_tokens", 3, 1.0))
        rest = [c async for c in busy_frames]  # quiet while unread too: one keep-alive a period at most
        assert rest[-1] == frames_of(End("b", 1, 1.0, "max_tokens", 3, 1.0)) and len(rest) <= 2
        assert set(rest[:-1]) <= {b": keep-alive\n\n"}
        await asyncio.sleep(0.2)
        assert (loop, 0.2) not in JobStream.keepalive._streams  # the timer ended with its last stream
        return chunks, at

    chunks, at = asyncio.run(drain())
    end = End("q", 1, 1.0, "max_tokens", 3, 1.0)
    assert chunks == [b": keep-alive\n\n"] * 3 + [frames_of(TokenEvent("q", "a", 0)) + frames_of(end)]
    gaps = [b - a for a, b in zip([0.0, *at[:2]], at[:3], strict=True)]
    assert all(0.19 <= g <= 0.6 for g in gaps), gaps


def test_the_relay_hands_events_over_in_order_with_one_wake_up_for_those_pending():
    """EventRelay: events put from the engine thread reach each stream's queue in order; the ones put before the loop
    ran take one wake-up (call_soon_threadsafe) together."""
    relay = EventRelay()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        wakes, real = [], loop.call_soon_threadsafe
        # the relay's wake-ups (to_thread's own completion also calls it)
        loop.call_soon_threadsafe = lambda fn, *a: (wakes.append(fn == relay._flush), real(fn, *a))[1]
        queues = [asyncio.Queue(), asyncio.Queue()]

        def engine() -> None:  # a dispatch's tokens for two jobs, then (after the loop ran) one more
            for i in range(50):
                relay.put(loop, queues[i % 2], i)

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()  # blocking the loop: every event is pending before it runs again
        await asyncio.sleep(0)
        got = [[q.get_nowait() for _ in range(q.qsize())] for q in queues]
        assert got == [list(range(0, 50, 2)), list(range(1, 50, 2))] and sum(wakes) == 1
        await asyncio.to_thread(relay.put, loop, queues[0], 50)
        assert await asyncio.wait_for(queues[0].get(), 5) == 50 and sum(wakes) == 2

    asyncio.run(run())
