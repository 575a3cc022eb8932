"""The engine in one process and the HTTP server in another (`worker-orcd --http-process`), joined by one pipe.

Why: with hundreds of streams the HTTP side's Python (each stream's SSE write every step: 40-75 µs a token on the
H200's host) and the engine's (~40 µs a token) shared one interpreter lock, and the engine thread waited for it
before each launch: 54 ms a step at 1,024 streams (docs/PERFORMANCE.md, eleventh session). Apart, each process
has its own lock, and the engine's process sends one message a pass for all its jobs.

The engine's process keeps what it has without the split (the model, the engine thread, start-up, signals); the
HTTP process holds the app and a RemoteEngine, which answers the calls WorkerService makes of an Engine.

Messages on the pipe:
- HTTP -> engine: `(call_id, name, args)`: submit, device_report and shutdown are answered; cancel is not (the HTTP
  side ends the job's stream itself at once).
- engine -> HTTP: `("events", events, state)`: a pass's events for every job, in order, and the engine's counters;
  `("reply", call_id, ok, value)`, sent after every event the call caused; `("stop", reason)`: a signal reached
  the engine's process, so the HTTP server should shut down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from worker.engine import End, Engine, ErrorEvent, Event, JobRequest, Sink, Started, invalid
from worker.errors import ErrorCode, WorkerError
from worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineHost:
    """The engine's end: answers the HTTP process's calls (`serve`, on a thread of its own) and sends the events of
    each engine pass as one message (`flush`, from the engine thread's `after_pass`)."""

    def __init__(self, engine: Engine, conn: Connection):
        self.engine, self.conn = engine, conn
        self._lock = threading.Lock()  # the outbox and the pipe's sending end
        self._outbox: list[Event] = []
        self._batch_sizes: list[int] = []
        self._pages_sent = 0
        engine.after_pass = self.flush
        engine.on_decode(self._decoded)

    def _sink(self, ev: Event) -> None:
        with self._lock:
            self._outbox.append(ev)

    def _decoded(self, rows: int) -> None:
        with self._lock:
            self._batch_sizes.append(rows)

    def flush(self) -> None:
        with self._lock:
            self._send_events()

    def _send_events(self) -> None:
        """With the lock held. Also with no events when the KV pages in use changed: a cancelled job's pages are
        freed a pass after its (already sent) terminal event, and the last job's must still reach /health."""
        pages = self.engine.kv_pages_used
        if not self._outbox and not self._batch_sizes and pages == self._pages_sent:
            return
        state: dict[str, Any] = {"cpu_seconds": self.engine.cpu_seconds, "kv_pages_used": pages,
                                 "batch_sizes": self._batch_sizes}  # fmt: skip
        self._pages_sent = pages
        if any(isinstance(ev, End | ErrorEvent) for ev in self._outbox):  # a job's end: device bytes (/health)
            state["device_bytes"] = self.engine.device_bytes()
        self._send(("events", self._outbox, state))
        self._outbox, self._batch_sizes = [], []

    def _send(self, message: tuple) -> None:
        """With the lock held. A pipe whose other end is gone drops the message: the engine thread must live on to
        finish or cancel its jobs (serve_split shuts it down once the HTTP process has ended)."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(message)

    def stop(self, reason: str) -> None:
        """Ask the HTTP process to shut down (a signal reached this process). Not from a signal handler: the lock
        may be held by the code the signal interrupted."""
        with self._lock:
            self._send(("stop", reason))

    def serve(self) -> None:
        """Answer calls until the HTTP process closes its end of the pipe."""
        while True:
            try:
                call_id, name, args = self.conn.recv()
            except (EOFError, OSError):
                return
            if name == "cancel":
                self.engine.cancel(*args)
                self.flush()
            elif name == "shutdown":  # waits for the running jobs: on its own thread, so cancels still get through
                threading.Thread(target=self._answer, args=(call_id, self.engine.shutdown, args), daemon=True).start()
            else:
                self._answer(call_id, {"submit": self._submit, "device_report": self.engine.device_report}[name], args)

    def _answer(self, call_id: int, call: Callable[..., Any], args: tuple) -> None:
        try:
            ok, value = True, call(*args)
        except WorkerError as e:
            ok, value = False, (str(e.code), e.message, e.field)
        except Exception as e:  # a defect of ours: the caller gets INTERNAL, this end goes on
            log.exception("engine link call %s failed", call)
            ok, value = False, (str(ErrorCode.INTERNAL), f"internal error: {type(e).__name__}: {e}", None)
        with self._lock:
            self._send_events()  # every event the call caused goes first
            self._send(("reply", call_id, ok, value))

    def _submit(self, req: JobRequest) -> None:
        self.engine.submit(req, self._sink)


class RemoteEngine:
    """The HTTP process's end: an Engine's calls (submit, cancel, shutdown, the counters /health and /metrics read)
    over the pipe. The jobs' states (waiting, running) follow their events, so the counters need no call."""

    def __init__(self, conn: Connection, facts: dict[str, Any], tokenizer: Tokenizer):
        self._conn, self._facts, self.tokenizer = conn, facts, tokenizer
        self.max_tokens_in, self.max_tokens_out = facts["max_tokens_in"], facts["max_tokens_out"]
        self.max_queue, self.max_batch = facts["max_queue"], facts["max_batch"]
        self.cpu_seconds = 0.0
        self.kv_pages_used = 0
        self.on_stop: Callable[[str], None] = lambda reason: None  # the engine's process was told to stop
        self.on_lost: Callable[[], None] = lambda: None  # the engine's process is gone
        self._device_bytes: dict[int, int] = {}
        self._told_decode: Callable[[int], None] = lambda rows: None
        self._lock = threading.Lock()  # the jobs' tables and the pipe's sending end
        self._sinks: dict[str, Sink] = {}  # live jobs: waiting or running, as far as their events have told
        self._running: dict[str, None] = {}  # in the order they started
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._lost: str | None = None
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="engine-link", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """End the reader thread, then close this end of the pipe (the engine's process reads its end). Why not
        just close it: a reader blocked in the pipe's read keeps reading after the close, and a read it starts next
        takes the file descriptor by number, which the next file or socket this process opens reuses. A
        `Connection` closed under its reader thread let that thread take bytes of the next pipe's messages."""
        self._closing = True
        with contextlib.suppress(OSError), socket.fromfd(self._conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.shutdown(socket.SHUT_RDWR)  # the reader reads the end of the pipe, and so does the engine's end
        if self._reader.is_alive():
            self._reader.join(timeout_s)
        with self._lock:  # no send is under way
            self._conn.close()

    # -- Engine's calls --------------------------------------------------------------------------------------

    def facts(self) -> dict[str, Any]:
        return self._facts

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._sinks) - len(self._running)

    @property
    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._sinks)

    def submit(self, req: JobRequest, sink: Sink) -> None:
        """Refusals as Engine.submit raises them. The prompt is tokenized here, so that the engine's process
        does not spend its time on it."""
        if req.prompt_ids is None:
            req = dataclasses.replace(req, prompt_ids=tuple(self.tokenizer.encode(req.prompt)))
        with self._lock:
            if req.job_id in self._sinks:
                raise invalid("job_id", f"job_id: {req.job_id!r} is already running or waiting")
            self._sinks[req.job_id] = sink
        try:
            self._call("submit", req)
        except WorkerError:
            with self._lock:
                self._sinks.pop(req.job_id, None)
            raise
        with self._lock:
            if req.job_id not in self._sinks and self._lost is None:
                # Cancelled while the submit was on its way (a /cancel from elsewhere): that cancel may have reached
                # the engine before the job did. Tell it again (a job that had ended already is left alone).
                self._send((-1, "cancel", (req.job_id,)))

    def cancel(self, job_id: str) -> bool:
        """As Engine.cancel: the job's stream ends with CANCELLED when this returns. The engine's process is told
        and frees the job's row at its next check; what it still sends for the job is dropped."""
        with self._lock:
            sink = self._sinks.pop(job_id, None)
            started = self._running.pop(job_id, 0) is None
            if sink is not None and self._lost is None:
                self._send((-1, "cancel", (job_id,)))
        if sink is None:
            return False
        message = f"job {job_id} was cancelled" if started else f"job {job_id} was cancelled before it started"
        sink(ErrorEvent(job_id, ErrorCode.CANCELLED, message, False))
        return True

    def shutdown(self, deadline_s: float = 5.0) -> None:
        # gone, or stuck where it cannot stop (an XLA compile): the server ends the streams still open itself
        # (WorkerService._drain)
        with contextlib.suppress(WorkerError, TimeoutError):
            self._call("shutdown", deadline_s, timeout=deadline_s + 5.0)

    def device_report(self) -> tuple[bool, list[dict]]:
        try:
            return self._call("device_report")
        except WorkerError:
            return False, []

    def device_bytes(self) -> dict[int, int]:
        return self._device_bytes

    def on_decode(self, told: Callable[[int], None]) -> None:
        self._told_decode = told

    # -- the pipe --------------------------------------------------------------------------------------------

    def _call(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        future: Future = Future()
        with self._lock:
            if self._lost is not None:
                raise WorkerError(ErrorCode.INTERNAL, self._lost)
            call_id = next(self._call_ids)
            self._calls[call_id] = future
            if not self._send((call_id, name, args)):
                del self._calls[call_id]
                raise WorkerError(ErrorCode.INTERNAL, "the engine's process ended")
        ok, value = future.result(timeout)
        if not ok:
            code, message, field = value
            raise WorkerError(ErrorCode(code), message, field)
        return value

    def _send(self, message: tuple) -> bool:
        """With the lock held; False if the engine's process is gone (the reader then ends every job)."""
        try:
            self._conn.send(message)
        except (OSError, ValueError):
            return False
        return True

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                if not self._closing:
                    self._lose("the engine's process ended; the worker is shutting down")
                return
            kind = message[0]
            if kind == "events":
                self._deliver(message[1], message[2])
            elif kind == "reply":
                with self._lock:
                    future = self._calls.pop(message[1])
                future.set_result(message[2:])
            elif kind == "stop":
                self.on_stop(message[1])

    def _deliver(self, events: list[Event], state: dict[str, Any]) -> None:
        self.cpu_seconds, self.kv_pages_used = state["cpu_seconds"], state["kv_pages_used"]
        self._device_bytes = state.get("device_bytes", self._device_bytes)
        for rows in state["batch_sizes"]:
            self._told_decode(rows)
        for ev in events:
            with self._lock:
                sink = self._sinks.get(ev.job_id)
                if sink is None:
                    continue  # cancelled here already
                if isinstance(ev, Started):
                    self._running[ev.job_id] = None
                elif isinstance(ev, End | ErrorEvent):
                    del self._sinks[ev.job_id]
                    self._running.pop(ev.job_id, None)
            sink(ev)

    def _lose(self, message: str) -> None:
        """The engine's process is gone: every live job ends with an error, every call waiting is answered."""
        with self._lock:
            self._lost = message
            sinks, self._sinks = self._sinks, {}
            self._running.clear()
            calls, self._calls = self._calls, {}
        for job_id, sink in sinks.items():
            sink(ErrorEvent(job_id, ErrorCode.INTERNAL, message, True))
        for future in calls.values():
            future.set_result((False, (str(ErrorCode.INTERNAL), message, None)))
        self.on_lost()
