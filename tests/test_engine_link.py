"""`--http-process`: the HTTP server in one process, the engine in another, joined by server/engine_link.py's pipe.

The link must not show: a job's events through it are the in-process engine's, refusals keep their codes and
fields, a cancel ends the stream when it returns. If the engine's process goes, every live job still gets a
terminal event. Last, the real command with `--http-process`: two processes, one log, SIGTERM ends both."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.engine_link import RemoteEngine
from server.service import WorkerService
from tests.tiny_worker import model_path, tiny_model, tiny_service, wait_until
from tests.worker_process import WorkerProcess, assert_log_sequence, read_sse
from worker.engine import ErrorEvent, JobRequest, Started, TokenEvent
from worker.errors import ErrorCode, WorkerError


def stream(client: TestClient, **body) -> str:
    return client.post("/execute", json={"prompt": "Once upon a time", "max_tokens": 12, **body}).text


def outcome(text: str) -> list[tuple]:
    """A stream's events less what differs from run to run (started_at, timings)."""
    kept = {"started": ("job_id", "seed"), "token": ("t", "i"), "end": ("tokens_out", "stop_reason")}
    return [(name, *(data[k] for k in kept[name])) for name, data in read_sse(text.splitlines()) if name in kept]


def test_a_seeded_job_through_the_link_streams_what_the_engine_streams_in_process():
    jobs = {f"j{i}": {"temperature": 0.9, "seed": 11 + i, "max_tokens": 10 + 3 * i} for i in range(5)}
    results: dict[bool, dict[str, list[tuple]]] = {}
    for link in (False, True):
        with tiny_service(max_batch=4, max_queue=4, link=link) as service, TestClient(create_app(service)) as client:
            out: dict[str, str] = {}

            def run(job_id: str, body: dict, out: dict = out, client: TestClient = client) -> None:
                out[job_id] = stream(client, job_id=job_id, **body)

            threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            results[link] = {j: outcome(text) for j, text in out.items()}
    assert results[True] == results[False]
    for j, events in results[True].items():
        assert events[0] == ("started", j, jobs[j]["seed"])
        assert events[-1] == ("end", jobs[j]["max_tokens"], "max_tokens")


def test_refusals_through_the_link_keep_their_codes_and_fields():
    with tiny_service(max_batch=1, max_queue=0, max_tokens_out=LONG_TOKENS, link=True) as service:
        client = TestClient(create_app(service))
        with client:
            r = client.post("/execute", json={"job_id": "big", "prompt": "hi", "max_tokens": LONG_TOKENS + 1})
            assert r.status_code == 400 and (r.json()["code"], r.json()["field"]) == ("INVALID_REQUEST", "max_tokens")
            # the refusals need the long job still running; on a fast machine it may end first: try again
            assert any(refusals_while_a_job_runs(client, service, f"long{n}") for n in range(3))
            wait_until(lambda: not service.engine.busy)
            health = client.get("/health").json()
            assert (health["running_jobs"], health["queue_depth"], health["status"]) == (0, 0, "healthy")


LONG_TOKENS = 440  # the tiny model's 512 slots less the prompt


def refusals_while_a_job_runs(client: TestClient, service: WorkerService, job_id: str) -> bool:
    """False when the running job ended before its refusals could be seen."""
    done = threading.Event()
    long = {"job_id": job_id, "max_tokens": LONG_TOKENS, "temperature": 1.0, "seed": 11}
    threading.Thread(target=lambda: (stream(client, **long), done.set())).start()
    wait_until(lambda: job_id in service.engine.running or done.is_set())
    r = client.post("/execute", json={"job_id": job_id, "prompt": "hi", "max_tokens": 8})
    if r.status_code == 200:
        return not done.wait(60)
    assert r.status_code == 400 and r.json()["field"] == "job_id"
    r = client.post("/execute", json={"job_id": f"{job_id}-more", "prompt": "hi", "max_tokens": 8})
    if r.status_code == 200:
        return not done.wait(60)
    assert r.status_code == 503 and r.json()["code"] == "QUEUE_FULL"
    if client.post("/cancel", json={"job_id": job_id}).json()["cancelled"] is not True:
        return not done.wait(60)
    assert client.post("/cancel", json={"job_id": job_id}).json()["cancelled"] is False
    assert done.wait(60)
    return True


def test_the_pages_of_a_cancelled_last_job_come_back_in_health():
    """A cancelled job's pages are freed a pass after its terminal event; with no job left, no event follows."""
    with tiny_service(max_batch=2, max_queue=2, link=True) as service, TestClient(create_app(service)) as client:
        done = threading.Event()
        # Greedy on a counting prompt: no end-of-sequence within 400 tokens (test_server.LONG), where a sampled job
        # could meet one within a few tokens and end before it was seen running (CI, 2026-12-06: 30 s unseen)
        job = {"job_id": "x", "prompt": "Count: one two three", "max_tokens": 400, "temperature": 0.0}
        threading.Thread(target=lambda: (stream(client, **job), done.set())).start()
        wait_until(lambda: "x" in service.engine.running and service.engine.kv_pages_used > 0)
        assert client.post("/cancel", json={"job_id": "x"}).json()["cancelled"] is True
        assert done.wait(30)
        wait_until(lambda: client.get("/health").json()["kv_pages_used"] == 0, 10)


def far_end_by_hand() -> tuple[Connection, RemoteEngine]:
    """A RemoteEngine whose engine's end of the pipe the test plays itself (the first value)."""
    here, there = multiprocessing.Pipe()
    facts = {"max_tokens_in": 64, "max_tokens_out": 64, "max_queue": 1, "max_batch": 1}
    return here, RemoteEngine(there, facts, tiny_model(1).tokenizer)


def submitting(remote: RemoteEngine, req: JobRequest) -> tuple[list[object], threading.Thread]:
    """`remote.submit(req)` on a thread of its own (it waits for the hand-played reply); the job's events."""
    events: list[object] = []
    submitted = threading.Thread(target=remote.submit, args=(req, events.append))
    submitted.start()
    return events, submitted


def test_when_the_engines_process_goes_every_live_job_ends_and_calls_fail_clearly():
    """The far end is played by hand here: it takes one job, starts it, and goes away."""
    here, remote = far_end_by_hand()
    model = tiny_model(1)
    lost = threading.Event()
    remote.on_lost = lost.set
    remote.start()
    events, submitted = submitting(remote, JobRequest("a", "hello", max_tokens=8))
    call_id, name, (req,) = here.recv()
    assert name == "submit" and req.prompt_ids == tuple(model.tokenizer.encode("hello"))  # tokenized on this side
    here.send(("events", [Started("a", "m", "t", 1, 2), TokenEvent("a", "x", 0)], {"cpu_seconds": 0.5,
              "kv_pages_used": 3, "batch_sizes": [1]}))  # fmt: skip
    here.send(("reply", call_id, True, None))
    submitted.join(10)
    wait_until(lambda: remote.running == ["a"])
    assert (remote.cpu_seconds, remote.kv_pages_used, remote.queue_depth) == (0.5, 3, 0)
    here.close()
    assert lost.wait(10)
    assert [type(e) for e in events] == [Started, TokenEvent, ErrorEvent] and events[-1].code == ErrorCode.INTERNAL
    assert not remote.busy and remote.running == []
    with pytest.raises(WorkerError) as refused:
        remote.submit(JobRequest("b", "hello"), events.append)
    assert refused.value.code == ErrorCode.INTERNAL and "engine's process ended" in refused.value.message
    assert remote.device_report() == (False, [])
    remote.shutdown(1.0)  # returns: nothing is left to stop


def test_a_cancel_ends_the_stream_when_it_returns_and_the_engines_late_events_are_dropped():
    here, remote = far_end_by_hand()
    remote.start()
    events, submitted = submitting(remote, JobRequest("a", "hello"))
    call_id, _, _ = here.recv()
    here.send(("events", [Started("a", "m", "t", 1, 2)], {"cpu_seconds": 0, "kv_pages_used": 1, "batch_sizes": []}))
    here.send(("reply", call_id, True, None))
    submitted.join(10)
    wait_until(lambda: remote.running == ["a"])
    assert remote.cancel("a") is True
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == ErrorCode.CANCELLED
    assert here.recv() == (-1, "cancel", ("a",))  # the engine is told, and answers with its own events:
    late = [TokenEvent("a", "x", 0), ErrorEvent("a", ErrorCode.CANCELLED, "job a was cancelled", False)]
    here.send(("events", late, {"cpu_seconds": 0, "kv_pages_used": 0, "batch_sizes": []}))
    heard = threading.Event()
    remote.on_stop = lambda reason: heard.set()
    here.send(("stop", "SIGTERM"))  # ordered after those events: once it is heard, they were handled
    assert heard.wait(10)
    assert [type(e) for e in events] == [Started, ErrorEvent] and not remote.busy
    here.close()


def test_close_ends_the_reader_first_and_the_engines_end_reads_the_end():
    """A pipe end closed under its reader thread: that thread's next read takes the file descriptor's number, which
    the next pipe opened in the process reuses, and a CI run lost the first bytes of the next test's pipe so."""
    here, remote = far_end_by_hand()
    lost = threading.Event()
    remote.on_lost = lost.set
    before = set(threading.enumerate())
    remote.start()
    (reader,) = [t for t in set(threading.enumerate()) - before if t.name == "engine-link"]
    remote.close()
    assert not reader.is_alive()  # ended before the close
    with pytest.raises(EOFError):
        here.recv()  # the engine's process reads the end of the pipe, as when the HTTP process exits
    assert not lost.is_set()  # a close of ours is not the engine's process going
    later, peer = multiprocessing.Pipe()  # reuses the closed end's descriptor: nothing else reads it
    peer.send(("events", [], {}))
    assert later.poll(5) and later.recv() == ("events", [], {})


def test_the_worker_with_http_process_serves_and_stops_on_sigterm():
    w = WorkerProcess(model_path(), "--http-process", "--max-batch", "2")
    try:
        w.wait_ready()
        status, events = w.execute(job_id="j1", prompt="Once upon a time", max_tokens=6, temperature=0.0)
        assert status == 200 and [e for e, _ in events][0] == "started" and events[-1][0] == "end"
        assert events[-1][1]["tokens_out"] == 6
        health = w.client.get("/health").json()
        assert health["status"] == "healthy" and health["max_batch"] == 2 and health["busy"] is False
        assert w.stop() == 0
    finally:
        w.stop()
    assert_log_sequence(w, "j1", "SIGTERM")


def http_child(w: WorkerProcess) -> int:
    """The pid of the worker's HTTP process (multiprocessing's spawned child; the other is its resource tracker)."""
    for pid in Path(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise AssertionError("the worker has no HTTP process")


def test_when_the_http_process_dies_the_worker_exits_1_and_says_why():
    w = WorkerProcess(model_path(), "--http-process")
    try:
        w.wait_ready()
        os.kill(http_child(w), signal.SIGKILL)
        assert w.proc.wait(60) == 1
        w.wait_for_log(event="error", message=f"the HTTP process exited with {-signal.SIGKILL}")
    finally:
        w.stop()


def test_when_the_engines_process_dies_the_http_process_ends_too():
    """An HTTP process left behind would hold the port and answer nothing."""
    w = WorkerProcess(model_path(), "--http-process")
    try:
        w.wait_ready()
        child = http_child(w)
        w.proc.kill()
        w.proc.wait(10)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{child}").exists() and b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the HTTP process outlived the engine's"
            time.sleep(0.1)
        w.wait_for_log(event="shutdown", reason="the engine's process ended")
    finally:
        w.stop()


def test_a_job_cancelled_while_its_submit_is_on_the_way_is_cancelled_again_once_it_is_in():
    """The first cancel may reach the engine before the job does; the second cannot."""
    here, remote = far_end_by_hand()
    remote.start()
    events, submitted = submitting(remote, JobRequest("a", "hello"))
    call_id, name, _ = here.recv()
    assert name == "submit" and remote.cancel("a") is True
    assert here.recv() == (-1, "cancel", ("a",))
    here.send(("reply", call_id, True, None))
    submitted.join(10)
    assert here.poll(10) and here.recv() == (-1, "cancel", ("a",))
    assert [type(e) for e in events] == [ErrorEvent] and not remote.busy
    here.close()


def test_a_sigterm_while_the_http_process_starts_still_ends_both_with_exit_0():
    """The stop request can reach the HTTP process before its server exists: it is kept until then."""
    w = WorkerProcess(model_path(), "--http-process")
    try:
        deadline = time.monotonic() + 300
        while True:  # the moment the child exists, well before it is ready
            assert time.monotonic() < deadline and w.proc.poll() is None, "\n".join(w.lines[-20:])
            try:
                http_child(w)
                break
            except (AssertionError, FileNotFoundError):
                time.sleep(0.01)
        assert w.stop() == 0
        last = w.events()[-1]
        assert last["event"] == "shutdown" and last["reason"] == "SIGTERM", last
    finally:
        w.stop()
