"""The engine: one thread owns the device and runs up to max_batch jobs at once (continuous batching,
worker/batch.py; `max_batch` 1 is M0's one job at a time, M0-W-1301), with a bounded queue of waiting jobs.

A job is submitted with a sink that receives its events in order: Started (when it joins the running batch),
TokenEvent*, then exactly one of End or ErrorEvent; nothing follows the terminal event. A cancel (POST /cancel,
client disconnect, shutdown) ends the job at once, from the cancelling thread, with ErrorEvent CANCELLED: a waiting
job also frees its place in the queue then; a running one's row and pages are freed by the engine thread at its
next check, between decode dispatches, and whatever the device still produces for it is dropped. So a cancel
lands within M0-W-1610's 100 ms even while a dispatch runs longer (several jobs on the CPU). A job's cancel,
timeout or failure ends that job only; the others keep streaming.

Stop rules: end-of-generation ids, max_tokens, the end of the context, and stop strings matched on the generated
text (a stop string may span tokens; text that could still become a stop string is held back, and the stop string
itself is never emitted).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker import device as devices
from worker.batch import Batch, Delivery
from worker.errors import ErrorCode, WorkerError
from worker.model import Model
from worker.sampling import MAX_SEED, SamplingParams, TokenLogprobs, new_seed
from worker.scheduler import Sequence
from worker.step_trace import EVENTS, STEP, StepTracer, span
from worker.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)

MAX_STOP_TOKENS = 32  # REQUIREMENTS §6: each stop string at most 32 tokens


class QueueFull(WorkerError):
    """The bounded queue is full: HTTP 503, retry later."""

    def __init__(self, limit: int):
        super().__init__(ErrorCode.QUEUE_FULL, f"the worker is busy: {limit} job(s) already waiting; retry later")


def invalid(field: str, message: str) -> WorkerError:
    return WorkerError(ErrorCode.INVALID_REQUEST, message, field)


class ShuttingDown(WorkerError):
    def __init__(self):
        super().__init__(ErrorCode.SHUTTING_DOWN, "the worker is shutting down and accepts no new jobs")


@dataclass(frozen=True)
class JobRequest:
    """`prompt` is text, tokenized with the file's BOS rule and no control tokens; `prompt_ids` (e.g. a chat
    template's rendering, worker/chat.py) replaces it when given. `logprobs`: report each generated token's
    log-probability and the top alternatives (TokenEvent.logprobs)."""

    job_id: str
    prompt: str
    max_tokens: int = 2048
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prompt_ids: tuple[int, ...] | None = None
    logprobs: bool = False


@dataclass(frozen=True)
class Started:
    job_id: str
    model: str
    started_at: str
    seed: int
    prompt_tokens: int


@dataclass(frozen=True)
class TokenEvent:
    job_id: str
    text: str
    index: int  # 0, 1, 2, ... per event: text held back (split UTF-8, stop-string prefixes) shares a later index
    # (id, TokenLogprobs) of each generated token since the previous event, when the request asked for them
    logprobs: tuple[tuple[int, TokenLogprobs], ...] = ()

    def __reduce__(self):
        # pickled by its fields' tuple (server/engine_link.py sends a pass's events at once): the frozen dataclass's
        # own way, a state dict set field by field, took 2.5x as long to load (1,024 events: 5.1 -> 2.1 ms)
        return TokenEvent, (self.job_id, self.text, self.index, self.logprobs)


@dataclass(frozen=True)
class End:
    job_id: str
    tokens_out: int
    decode_time_ms: float
    stop_reason: str  # max_tokens | eos | stop_sequence | context
    prompt_tokens: int
    ttft_ms: float


@dataclass(frozen=True)
class ErrorEvent:
    job_id: str
    code: ErrorCode
    message: str
    retriable: bool


Event = Started | TokenEvent | End | ErrorEvent
Sink = Callable[[Event], None]


@dataclass(eq=False)
class _Job:
    req: JobRequest
    sink: Sink
    prompt_ids: list[int]
    seed: int
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    seq: Sequence | None = None  # its place in the batch, once the engine thread has taken it
    output: _Output | None = None  # set when it starts running
    # Events come from the engine thread and, for a cancel, the cancelling thread: the lock orders them and `ended`
    # drops whatever follows the terminal event. Reentrant: a sink may cancel its own job.
    emit_lock: threading.RLock = field(default_factory=threading.RLock)
    ended: bool = False


class _Output:
    """A running job's text side: detokenizing, stop strings, token events, counts and timing."""

    def __init__(self, engine: Engine, job: _Job):
        self.engine, self.job = engine, job
        self.decoder = StreamDecoder(engine.model.tokenizer, continuation=True)
        self.stops = StopMatcher(job.req.stop)
        self.started = time.monotonic()
        self.produced, self.chunks, self.ttft = 0, 0, None
        self.unsent: list[tuple[int, TokenLogprobs]] = []

    def feed(self, tokens: list[int], logprobs: list[TokenLogprobs] | None) -> bool:
        """Emit what `tokens` make safe to show; True when a stop string ended the job."""
        for n, tok in enumerate(tokens):
            if self.ttft is None:
                self.ttft = time.monotonic() - self.started
            self.produced += 1
            if logprobs is not None:
                self.unsent.append((tok, logprobs[n]))
            text, hit = self.stops.feed(self.decoder.push(tok))
            if text:
                self._send(text)
            if hit:
                return True
        return False

    def _send(self, text: str) -> None:
        self.engine._emit(self.job, TokenEvent(self.job.req.job_id, text, self.chunks, tuple(self.unsent)))
        self.unsent.clear()
        self.chunks += 1

    def end(self, reason: str) -> None:
        if reason != "stop_sequence":
            tail, hit = self.stops.feed(self.decoder.flush())
            tail += "" if hit else self.stops.flush()
            if tail:
                self._send(tail)
        req, ttft = self.job.req, self.ttft or 0.0
        decode_ms = (time.monotonic() - self.started - ttft) * 1000.0
        n_prompt = len(self.job.prompt_ids)
        end = End(req.job_id, self.produced, round(decode_ms, 3), reason, n_prompt, round(ttft * 1e3, 3))
        if self.engine._emit(self.job, end):
            done = {"job_id": req.job_id, "tokens_out": self.produced, "stop_reason": reason}
            self.engine._on_event("execute_end", done)


class StopMatcher:
    """Finds stop strings in the growing generated text and tells how much text is safe to emit."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Append `piece`; returns (text now safe to emit, whether a stop string was found)."""
        if not self.stops:  # nothing to hold back (the common case, once a token for every running job)
            return piece, False
        self.text += piece
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.emitted = self.text[self.emitted : cut], max(self.emitted, cut)
            return out, True
        hold = max((self._partial(s) for s in self.stops), default=0)
        safe = len(self.text) - hold
        out = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def _partial(self, stop: str) -> int:
        """Length of the longest suffix of the text that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(self.text)), 0, -1):
            if self.text.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


class Engine:
    def __init__(
        self,
        model: Model,
        *,
        max_queue: int = 4,
        max_tokens_in: int | None = None,
        max_tokens_out: int = 2048,
        inference_timeout_s: float = 300.0,
        on_event: Callable[[str, dict], None] | None = None,
    ):
        self.model = model
        self.max_queue = max_queue
        self.max_batch = model.runner.max_batch
        self.max_tokens_in = min(max_tokens_in or model.context_length, model.context_length)
        self.max_tokens_out = max_tokens_out
        self.inference_timeout_s = inference_timeout_s
        self._on_event = on_event or (lambda name, fields: None)
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        # Jobs waiting, in arrival order, and those running: a job is in exactly one of them until it ends. A
        # waiting job that is cancelled leaves `_waiting` at once (its place is free); the engine thread drops it.
        self._waiting: dict[str, _Job] = {}
        self._running: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self.compiling = False  # after shutdown: a program still being compiled ahead (Runner.stop_compiling_ahead)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._tracer = StepTracer.from_env(self.max_batch)
        self.cpu_seconds = 0.0  # the engine thread's CPU time so far (/metrics: the host side of serving)
        # Called on the engine thread after each pass (the jobs that arrived taken, a step run and its events sent):
        # where server/engine_link.py sends a pass's events on as one message.
        self.after_pass: Callable[[], None] = lambda: None

    # -- public API (any thread) --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    # -- what the serving layer reads (server/service.py; server/engine_link.py answers the same from afar) ----

    def facts(self) -> dict[str, Any]:
        """The model's and this engine's facts that do not change while it serves (/health), and where its warm-up's
        time went (`ready`'s log event)."""
        model, runner = self.model, self.model.runner
        return {
            "model": model.path.name,
            "architecture": model.architecture,
            "quant_kind": model.quant_kind,
            "tokenizer_kind": model.tokenizer.kind,
            "vocab_size": model.tokenizer.vocab_size,
            "context_length": model.context_length,
            "max_tokens_in": self.max_tokens_in,
            "max_tokens_out": self.max_tokens_out,
            "max_queue": self.max_queue,
            "max_batch": self.max_batch,
            "deterministic": runner.deterministic,
            "decode_steps": model.decode_steps,
            "bf16_experts": model.bf16_experts,
            "kv_page_size": runner.page_size,
            "kv_pages_total": model.batch.scheduler.pool.total,
            **devices.device_info(model.device),
            "warm_up": model.warmed.fields() if model.warmed is not None else None,
        }

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    @property
    def kv_pages_used(self) -> int:
        return self.model.batch.scheduler.pool.used

    def device_report(self) -> tuple[bool, list[dict]]:
        """Whether every weight is resident, and per device its bytes in use (Model.device_report)."""
        return self.model.resident(), self.model.device_report()

    def device_bytes(self) -> dict[int, int]:
        return self.model.device_bytes()

    def on_decode(self, told: Callable[[int], None]) -> None:
        """`told` hears each decode dispatch's sequence count (the batch size histogram), on the engine thread."""
        self.model.batch.on_decode = told

    @property
    def queue_depth(self) -> int:
        """Jobs waiting to join the running batch: what --max-queue bounds and QUEUE_FULL reports."""
        with self._lock:
            return len(self._waiting)

    @property
    def running(self) -> list[str]:
        """The running jobs' ids, in the order they started."""
        with self._lock:
            return list(self._running)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._running or self._waiting)

    def submit(self, req: JobRequest, sink: Sink) -> None:
        """Check the request against this worker's model and limits, then enqueue; a refusal is raised here, before
        any work starts (INVALID_REQUEST naming the field, QUEUE_FULL, SHUTTING_DOWN). The engine owns these
        rules; the request's static shape (types, ranges, lengths) is the caller's (the HTTP schema). A job waits
        only when max_batch jobs already run; then at most max_queue may wait."""
        if not self._accepting:
            raise ShuttingDown()
        ids = self.validate(req)
        job = _Job(req, sink, ids, req.seed if req.seed is not None else new_seed())
        with self._lock:
            if req.job_id in self._waiting or req.job_id in self._running:
                raise invalid("job_id", f"job_id: {req.job_id!r} is already running or waiting")
            free_rows = self.max_batch - len(self._running)
            if len(self._waiting) >= self.max_queue + max(0, free_rows):
                raise QueueFull(self.max_queue)
            self._waiting[req.job_id] = job
        self._inbox.put(job)

    def validate(self, req: JobRequest) -> list[int]:
        """The rules that depend on the model and this worker's limits; returns the prompt's token ids."""
        if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
            raise invalid("seed", f"seed: must be a uint64 (0..{MAX_SEED}) (got {req.seed})")
        if req.max_tokens > self.max_tokens_out:
            raise invalid(
                "max_tokens",
                f"max_tokens: {req.max_tokens} exceeds this worker's limit of {self.max_tokens_out} (--max-tokens-out)",
            )
        tokenizer = self.model.tokenizer
        if req.top_k > tokenizer.vocab_size:
            raise invalid("top_k", f"top_k: {req.top_k} exceeds the model's vocabulary size {tokenizer.vocab_size}")
        for n, s in enumerate(req.stop):
            count = len(tokenizer.encode(s, add_bos=False))
            if count > MAX_STOP_TOKENS:
                raise invalid("stop", f"stop[{n}]: is {count} tokens; at most {MAX_STOP_TOKENS} are allowed")
        ids = list(req.prompt_ids) if req.prompt_ids is not None else tokenizer.encode(req.prompt)
        if req.prompt_ids is not None and not all(0 <= i < tokenizer.vocab_size for i in ids):
            raise invalid("prompt", f"prompt: token ids must lie in [0, {tokenizer.vocab_size})")
        if not ids:
            raise invalid("prompt", "prompt: is empty (no tokens)")
        if len(ids) > self.max_tokens_in:
            raise invalid(
                "prompt",
                f"prompt: is {len(ids)} tokens; this worker accepts at most {self.max_tokens_in} "
                f"(context {self.model.context_length})",
            )
        return ids

    def cancel(self, job_id: str) -> bool:
        """Idempotent. True if the job was waiting or running and this call ended it; it then ends with error
        CANCELLED when this returns (a waiting job's place in the queue is free then; a running job's row and pages
        at the engine thread's next check). False for a job that had already ended, also while the engine thread
        has yet to drop it (a second cancel of the same job)."""
        with self._lock:
            job = self._waiting.pop(job_id, None)
            running = self._running.get(job_id)
        if job is not None:
            job.cancelled.set()
            self._fail(job, WorkerError(ErrorCode.CANCELLED, f"job {job_id} was cancelled before it started"))
            return True
        if running is not None:
            # The terminal event first, then the flag: with the flag first, the engine thread's check between
            # dispatches could end the job itself before this call did, and a /cancel that ended the job answered
            # `cancelled: false` (seen with the suite on two processes).
            ended_here = self._fail(running, WorkerError(ErrorCode.CANCELLED, f"job {job_id} was cancelled"))
            running.cancelled.set()  # the engine thread frees the job's row at its next check
            return ended_here
        return False

    def shutdown(self, deadline_s: float = 5.0) -> None:
        """Stop accepting, cancel the waiting jobs at once, let the running jobs finish within the first half of
        the deadline (then cancel them), end the thread."""
        self._accepting = False
        with self._lock:
            waiting = list(self._waiting)
        for job_id in waiting:
            self.cancel(job_id)
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(deadline_s / 2)
            with self._lock:
                running = list(self._running.values())
            for job in running:
                job.cancelled.set()
            self._thread.join(deadline_s / 2)
        self.compiling = self.model.runner.stop_compiling_ahead()

    # -- the engine thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        batch, stopping = self.model.batch, False
        while not stopping or batch.busy:
            try:
                while True:  # take what arrived; wait for it only when there is nothing to run
                    job = self._inbox.get(block=not batch.busy and not stopping, timeout=None)
                    if job is None:
                        stopping = True
                        break
                    self._take(job, batch)
            except queue.Empty:
                pass
            if batch.busy:
                try:
                    self._iteration(batch)
                except Exception as e:  # a defect of ours, or the device's: every job in the batch fails, we go on
                    self._fail_all(batch, map_runtime_error(e))
                self.cpu_seconds = time.thread_time()
            self.after_pass()

    def _iteration(self, batch: Batch) -> None:
        """Between dispatches: the running jobs' cancels and timeouts, a batch step, its events. Anything raised here
        ends the batch's jobs, never the engine thread: a thread that died would leave every later job waiting."""
        self._check_running(batch)
        self._tracer.before_step(len(batch.scheduler.running))
        try:
            with span(STEP):
                deliveries = batch.step()
        finally:
            self._tracer.after_step()
        with span(EVENTS):
            for d in deliveries:
                self._handle(d, batch)
            self._start_admitted(batch)

    def _take(self, job: _Job, batch: Batch) -> None:
        """A submitted job joins the batch's line, unless it was cancelled while in the inbox."""
        with self._lock:
            if self._waiting.get(job.req.job_id) is not job:
                return  # cancelled while it waited: it has had its terminal event
        req = job.req
        params = SamplingParams(req.temperature, req.top_k, req.top_p, req.min_p, req.repetition_penalty,
                                logprobs=req.logprobs)  # fmt: skip
        try:
            job.seq = self.model.sequence(job.prompt_ids, req.max_tokens, params, job.seed, owner=job)
            batch.add(job.seq)
        except Exception as e:
            with self._lock:
                self._waiting.pop(req.job_id, None)
            self._fail(job, e if isinstance(e, WorkerError) else map_runtime_error(e))

    def _start(self, job: _Job, batch: Batch) -> bool:
        """The job has joined the running batch (idempotent): Started, then its output. False for a job cancelled
        while it waited (it has had its terminal event): its sequence leaves the batch."""
        if job.output is not None:
            return True
        with self._lock:
            waiting = self._waiting.pop(job.req.job_id, None) is job
            if waiting:
                self._running[job.req.job_id] = job
        if not waiting:
            batch.release(job.seq)
            return False
        req = job.req
        started_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self._emit(job, Started(req.job_id, self.model.path.name, started_at, job.seed, len(job.prompt_ids))):
            self._on_event("execute_start", {"job_id": req.job_id, "prompt_tokens": len(job.prompt_ids)})
        job.output = _Output(self, job)
        return True

    def _start_admitted(self, batch: Batch) -> None:
        for seq in batch.scheduler.running:
            self._start(seq.owner, batch)

    def _check_running(self, batch: Batch) -> None:
        """Between dispatches: a cancelled or timed-out running job ends now, alone; a job cancelled while it
        waited leaves the batch's line."""
        for seq in list(batch.scheduler.waiting):
            if seq.owner.cancelled.is_set():
                batch.release(seq)
        with self._lock:
            running = list(self._running.values())
        for job in running:
            if job.cancelled.is_set():
                self._end_failed(job, batch, WorkerError(ErrorCode.CANCELLED, f"job {job.req.job_id} was cancelled"))
            elif time.monotonic() - job.output.started > self.inference_timeout_s:
                err = WorkerError(ErrorCode.INFERENCE_TIMEOUT, f"job exceeded {self.inference_timeout_s:g} s")
                self._end_failed(job, batch, err)

    def _handle(self, d: Delivery, batch: Batch) -> None:
        job: _Job = d.seq.owner
        if not self._start(job, batch):
            return
        if d.error is not None:
            err = d.error if isinstance(d.error, WorkerError) else map_runtime_error(d.error)
            self._end_failed(job, batch, err)
            return
        try:
            hit = job.output.feed(d.tokens, d.logprobs)
        except Exception as e:
            self._end_failed(job, batch, map_runtime_error(e))
            return
        if hit or d.finished is not None:
            batch.release(d.seq)
            self._finish(job)
            job.output.end("stop_sequence" if hit else d.finished)

    def _finish(self, job: _Job) -> None:
        with self._lock:
            self._running.pop(job.req.job_id, None)
            self._waiting.pop(job.req.job_id, None)

    def _end_failed(self, job: _Job, batch: Batch, err: WorkerError) -> None:
        if job.seq is not None:
            batch.release(job.seq)
        self._finish(job)
        self._fail(job, err)

    def _fail_all(self, batch: Batch, err: WorkerError) -> None:
        with self._lock:
            jobs = [j for j in (*self._running.values(), *self._waiting.values()) if j.seq is not None]
        for job in jobs:
            self._end_failed(job, batch, err)

    def _emit(self, job: _Job, event: Event) -> bool:
        """Send `event` unless the job has had its terminal event; True if it was sent."""
        with job.emit_lock:
            if job.ended:
                return False
            job.ended = isinstance(event, End | ErrorEvent)
            try:
                job.sink(event)
            except Exception:  # a broken sink (client gone) must not take the engine down
                log.exception("event sink failed for job %s", job.req.job_id)
                job.cancelled.set()
            return True

    def _fail(self, job: _Job, err: WorkerError) -> bool:
        """End the job with `err`; False if it had already ended (its terminal event was sent)."""
        if not self._emit(job, ErrorEvent(job.req.job_id, err.code, err.message, err.retriable)):
            return False
        self._on_event(
            "execute_end" if err.code == ErrorCode.CANCELLED else "error",
            {"job_id": job.req.job_id, "code": str(err.code), "message": err.message},
        )
        return True


def map_runtime_error(e: Exception) -> WorkerError:
    """XLA's RESOURCE_EXHAUSTED is device memory (the job fails, the worker lives on); other runtime errors are
    device/runtime failures; anything else is a defect of ours."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        return WorkerError(ErrorCode.VRAM_OOM, f"device out of memory: {text.splitlines()[0][:300]}")
    if type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError"):
        return WorkerError(ErrorCode.CUDA_ERROR, f"device runtime error: {text.splitlines()[0][:300]}")
    log.exception("internal error")
    return WorkerError(ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {text[:300]}")
