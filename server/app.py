"""The HTTP API (REQUIREMENTS §6): Litestar routes, the msgspec request schemas and their validation, the SSE
framing of engine events, bearer-token auth and the JSON error body {"code", "message", "field"?}.

An /execute request is validated completely before any work starts: its shape, types and ranges here (the msgspec
schema), the rules that depend on the model and the worker's limits by the engine at submit, whose refusals name
the field. The engine's events reach the SSE stream through a per-job asyncio queue fed from the engine thread. If
the client goes away, the stream's close path cancels the job (M0-W-1611).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.background_tasks import BackgroundTask
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Operation
from litestar.response import Stream
from msgspec import Meta

from server.metrics import CONTENT_TYPE, outcome_of
from server.service import WorkerService
from worker.engine import End, ErrorEvent, JobRequest, Started, TokenEvent
from worker.errors import ErrorCode, WorkerError

MAX_PROMPT_CHARS = 32768
MAX_STOP_STRINGS = 4
# Request head limits, checked here for every route (limit_headers). uvicorn's h11 parser is also told
# MAX_HEADER_BYTES (server/cli.py), but it only bounds a head that arrives in pieces: one that arrives whole is
# parsed whatever its size.
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
OPENAPI_VERSION = "1"
UNAUTHORIZED = "UNAUTHORIZED"  # HTTP-layer code (no job was involved), like QUEUE_FULL and SHUTTING_DOWN


class ExecuteRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /execute body: the §6 table. This schema owns the static rules (types, ranges, lengths); the rules that
    depend on the model and the worker's limits (top_k <= vocab_size, stop strings of at most 32 tokens, prompt
    tokens, max_tokens <= --max-tokens-out, seed <= 2^64-1, a job_id not in use) are the engine's
    (Engine.validate), whose refusals name the field."""

    job_id: Annotated[str, Meta(min_length=1)]
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)]
    max_tokens: Annotated[int, Meta(ge=1, le=2048)] = 2048
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    stop: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=MAX_STOP_STRINGS)] = []
    seed: Annotated[int, Meta(ge=0)] | None = None  # msgspec bounds stop at int64: the engine checks the uint64 top


class CancelRequest(msgspec.Struct, forbid_unknown_fields=True):
    job_id: Annotated[str, Meta(min_length=1)]


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The body of every refusal (documented in the OpenAPI schema; the handlers build it as a dict)."""

    code: str
    message: str
    field: str | None = None


class ApiError(Exception):
    """An HTTP error answered as {"code", "message", "field"?}; no job was started."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def invalid(field: str | None, message: str) -> ApiError:
    return ApiError(400, ErrorCode.INVALID_REQUEST, message, field)


# -- validation ----------------------------------------------------------------------------------------------

_FIELD_IN_PATH = re.compile(r"at `\$\.(\w+)")
_FIELD_NAMED = re.compile(r"field `([^`]+)`")


T = TypeVar("T")


def decode_body(body: bytes, schema: type[T]) -> T:
    """JSON bytes -> schema instance; malformed JSON and every schema violation become 400 INVALID_REQUEST naming
    the field. Decoding to plain objects first separates "not JSON" from "JSON of the wrong shape"."""
    try:
        obj = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise invalid("body", f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # msgspec's decoder stops at the interpreter's recursion limit (about 1,000 levels)
        raise invalid(
            "body", "the request body is nested too deeply (no field of the API nests more than 2 levels)"
        ) from None
    if not isinstance(obj, dict):
        raise invalid("body", f"the request body must be a JSON object, not {type(obj).__name__}")
    try:
        return msgspec.convert(obj, schema, strict=True)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _FIELD_IN_PATH.search(text) or _FIELD_NAMED.search(text)
        field = m.group(1) if m else None
        reason = text.split(" - at ")[0]
        shown = f" (got {_short(obj[field])})" if field in obj else ""
        raise invalid(field, f"{field}: {reason}{shown}" if field else reason) from None


def _short(value: Any) -> str:
    try:
        text = msgspec.json.encode(value).decode()
    except RecursionError:  # a value nested nearly as deep as the decoder allows, encoded from a deeper stack
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else f"{text[:57]}..."


def submit_error(e: WorkerError) -> ApiError:
    """An engine refusal at submit time -> HTTP; an INVALID_REQUEST carries the field it is about."""
    if e.code == ErrorCode.QUEUE_FULL:
        return ApiError(503, e.code, e.message, headers={"Retry-After": "1"})
    if e.code == ErrorCode.SHUTTING_DOWN:
        return ApiError(503, e.code, e.message)
    if e.code == ErrorCode.INVALID_REQUEST:
        return invalid(e.field, e.message)
    return ApiError(500, e.code, e.message)


def refusal_outcome(e: ApiError | HTTPException) -> str:
    """The metrics outcome of an /execute request refused before any work started."""
    status = e.status if isinstance(e, ApiError) else e.status_code
    if isinstance(e, ApiError) and e.code in (ErrorCode.QUEUE_FULL, ErrorCode.SHUTTING_DOWN):
        return outcome_of(ErrorCode(e.code))
    return "invalid" if status < 500 else "error"


# -- SSE -----------------------------------------------------------------------------------------------------


def sse(event: str, data: dict[str, Any]) -> bytes:
    # msgspec escapes control characters, so the JSON is one line and one `data:` field carries it.
    return b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def frames_of(ev: object) -> bytes:
    """One engine event as SSE frames with exactly the §6 payloads (End also gets an optional `metrics` frame)."""
    if isinstance(ev, TokenEvent):
        return sse("token", {"t": ev.text, "i": ev.index})
    if isinstance(ev, Started):
        return sse("started", {"job_id": ev.job_id, "model": ev.model, "started_at": ev.started_at, "seed": ev.seed})
    if isinstance(ev, End):
        decode_s = ev.decode_time_ms / 1000.0
        # the first token comes from prefill; decode_time_ms covers the ones after it
        rate = (ev.tokens_out - 1) / decode_s if ev.tokens_out > 1 and decode_s > 0 else None
        metrics = {
            "prompt_tokens": ev.prompt_tokens,
            "tokens_out": ev.tokens_out,
            "ttft_ms": ev.ttft_ms,
            "decode_time_ms": ev.decode_time_ms,
            "decode_tokens_per_s": round(rate, 2) if rate is not None else None,
        }
        end = {"tokens_out": ev.tokens_out, "decode_time_ms": ev.decode_time_ms, "stop_reason": ev.stop_reason}
        return sse("metrics", metrics) + sse("end", end)
    if isinstance(ev, ErrorEvent):
        return sse("error", {"code": str(ev.code), "message": ev.message, "retriable": ev.retriable})
    raise TypeError(f"unknown engine event {ev!r}")


class EventRelay:
    """Hands engine events to the event loop in batches. The engine thread delivers a dispatch's tokens for every
    running job at once; a `call_soon_threadsafe` for each event would wake the loop once per event (a write to its
    self-pipe and a callback each), where one wake-up carries all the events pending by then, in order."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, ev: object) -> None:
        with self._lock:
            waiting = self._pending.setdefault(loop, [])
            waiting.append((queue, ev))
            if len(waiting) > 1:
                return  # a flush is already scheduled on that loop and takes this one too
        try:
            loop.call_soon_threadsafe(self._flush, loop)
        except RuntimeError:  # the loop is closed: nobody reads its queues; later events must not wait on it
            with self._lock:
                self._pending.pop(loop, None)
            raise

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._pending.pop(loop, [])
        for queue, ev in batch:
            queue.put_nowait(ev)


class KeepAlive:
    """Puts None (a keep-alive comment) into the queue of every stream that has had nothing for `period` seconds:
    one timer task a loop and period for all its streams. Why not asyncio.wait_for around each stream's wait: that
    made a task and a timer for every wait of every stream: 3.5-11% of the event loop's samples at 256 streams on
    the 2-core CPU (py-spy, bench.host --http; docs/PERFORMANCE.md, eleventh session)."""

    TICKS = 4  # checks a period: a keep-alive comes 1 to 1.25 periods after the stream's last event

    def __init__(self):
        self._streams: dict[tuple[asyncio.AbstractEventLoop, float], set[JobStream]] = {}

    def watch(self, stream: JobStream, loop: asyncio.AbstractEventLoop, period: float) -> None:
        """From `loop`'s thread; the first stream of a (loop, period) starts its timer."""
        key = (loop, period)
        streams = self._streams.get(key)
        if streams is None:
            streams = self._streams[key] = set()
            loop.create_task(self._tick(key, streams))
        streams.add(stream)

    def forget(self, stream: JobStream, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self._streams.get((loop, period), set()).discard(stream)

    async def _tick(self, key: tuple[asyncio.AbstractEventLoop, float], streams: set[JobStream]) -> None:
        loop, period = key
        try:
            while streams:  # no await between the last check and the removal: a new stream starts a new timer
                await asyncio.sleep(period / self.TICKS)
                now = loop.time()
                for stream in streams:
                    if stream.queue.empty() and now - stream.quiet_since >= period:
                        stream.queue.put_nowait(None)
                        stream.quiet_since = now
        finally:
            if self._streams.get(key) is streams:
                del self._streams[key]


class JobStream:
    """One job's events: pushed from the engine thread into an asyncio queue, framed by `frames()`.

    `close()` runs when the stream ends for any reason (generator exit, or the response's background task after
    a disconnect, even if the generator never started); a job whose terminal event was not seen is cancelled."""

    relay = EventRelay()  # every stream's, in this process
    keepalive = KeepAlive()

    def __init__(self, service: WorkerService, job_id: str, loop: asyncio.AbstractEventLoop):
        self.service, self.job_id, self.loop = service, job_id, loop
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.finished = False
        self.closed = False
        self.t0: float | None = None
        self.tokens = 0
        self.quiet_since = 0.0  # the loop's time of the last event or keep-alive this stream took (KeepAlive)
        self._lock = threading.Lock()  # the engine thread and the shutdown thread may both end the stream

    def register(self) -> None:
        """Make the stream known to shutdown (after a successful submit: a refused duplicate job_id must not
        replace the live job's entry)."""
        with self._lock:
            if not self.finished:
                self.service.open_streams[self.job_id] = self.abort

    def _unregister(self) -> None:
        if self.service.open_streams.get(self.job_id) == self.abort:
            del self.service.open_streams[self.job_id]

    def sink(self, ev: object) -> bool:
        """Called on the engine thread. Metrics are counted here, so a job whose client left still counts.
        False if the stream had already ended (by abort); the engine's late events have no reader."""
        with self._lock:
            if self.finished:
                return False
            try:
                self._observe(ev)
            finally:
                self.relay.put(self.loop, self.queue, ev)
            return True

    def abort(self, message: str) -> None:
        """End the stream with error CANCELLED although the engine has not (yet) ended the job."""
        if self.sink(ErrorEvent(self.job_id, ErrorCode.CANCELLED, message, False)):
            self.service.narrator.emit(
                "execute_end", job_id=self.job_id, code=str(ErrorCode.CANCELLED), message=message, engine_stopped=False
            )

    def _observe(self, ev: object) -> None:
        if isinstance(ev, Started):
            self.t0 = time.monotonic()
        elif isinstance(ev, TokenEvent):
            self.tokens = max(self.tokens, ev.index + 1)
        elif isinstance(ev, End | ErrorEvent):
            self.finished = True
            self._unregister()
            duration = (time.monotonic() - self.t0) * 1000.0 if self.t0 is not None else 0.0
            if self.closed:  # the client left first: its end reaches nobody. Counted before the job's end (and so
                # before its execute_end log line), so a reader of that line finds the disconnect in /metrics.
                self.service.metrics.client_disconnected()
            if isinstance(ev, End):
                self.service.metrics.job_finished("ok", ev.tokens_out, duration, ev.ttft_ms)
            else:
                self.service.metrics.job_finished(outcome_of(ev.code), self.tokens, duration, None)
            self.service.refresh_bytes()

    async def batches(self) -> AsyncIterator[list[object] | None]:
        """The job's engine events in order, in batches: each batch is what had queued up by the time this stream
        ran, so under load a stream's tokens go out in one write rather than one each (with hundreds of streams
        decoding a token a dispatch, the event loop's time went to those writes: bench/README.md). None every
        keep-alive period while nothing comes (a job waiting in the queue; `KeepAlive`). Ends after the terminal
        event."""
        period = self.service.keepalive_s
        self.quiet_since = self.loop.time()
        self.keepalive.watch(self, self.loop, period)
        try:
            while True:
                first = self.queue.get_nowait() if not self.queue.empty() else await self.queue.get()
                self.quiet_since = self.loop.time()
                if first is None:
                    yield None
                    continue
                batch = [first]
                while not isinstance(batch[-1], End | ErrorEvent) and not self.queue.empty():
                    ev = self.queue.get_nowait()
                    if ev is not None:  # a keep-alive with events behind it: the events speak for themselves
                        batch.append(ev)
                yield batch
                if isinstance(batch[-1], End | ErrorEvent):
                    return
        finally:
            self.keepalive.forget(self, self.loop, period)

    async def frames(self):
        try:
            async for batch in self.batches():
                # None: an SSE comment, which keeps proxies from timing out a queued job
                yield b": keep-alive\n\n" if batch is None else b"".join(map(frames_of, batch))
        finally:
            self.close()

    def close(self) -> None:
        if self.closed or self.finished:
            return
        self.closed = True  # before the cancel: `_observe` counts the disconnect when the job's end arrives
        self.service.engine.cancel(self.job_id)
        # the engine's CANCELLED event still arrives (and is counted); nobody reads the stream any more
        self._unregister()


# -- routes --------------------------------------------------------------------------------------------------


def _json_body(schema: type[msgspec.Struct]) -> type[Operation]:
    """An OpenAPI operation that documents `schema` as its JSON request body. The handlers read and validate the
    body themselves (decode_body: strict types, errors naming the field), so Litestar sees no `data` parameter to
    document; msgspec's JSON Schema of the struct is what OpenAPI 3.1 takes."""
    body_schema = msgspec.json.schema(schema)
    body_schema = {**body_schema.pop("$defs")[schema.__name__]}  # the structs nest no other struct
    body_schema.pop("description", None)  # the docstring speaks of the code, not the API

    @dataclass
    class JsonBodyOperation(Operation):
        def to_schema(self) -> dict[str, Any]:
            out = super().to_schema()
            out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
            return out

    return JsonBodyOperation


def _refusals(*statuses: int) -> dict[int, ResponseSpec]:
    return {s: ResponseSpec(ErrorBody, description=_REFUSALS[s], generate_examples=False) for s in statuses}


_REFUSALS = {
    400: "INVALID_REQUEST: a field breaks its rule (`field` names it), or the body is not a JSON object",
    401: "UNAUTHORIZED: --api-key is set and the bearer token is missing or wrong",
    413: "INVALID_REQUEST: the body is larger than --max-body-bytes",
    431: "INVALID_REQUEST: too many headers, or headers too large",
    503: "QUEUE_FULL (with Retry-After) or SHUTTING_DOWN",
}


def _service(request: Request) -> WorkerService:
    return request.app.state.service


@post(
    "/execute",
    status_code=200,
    media_type="text/event-stream",
    operation_class=_json_body(ExecuteRequest),
    responses=_refusals(400, 401, 413, 431, 503),
)
async def execute(request: Request) -> Stream:
    service = _service(request)
    try:
        if not service.accepting:
            raise ApiError(503, ErrorCode.SHUTTING_DOWN, "the worker is shutting down and accepts no new jobs")
        req = decode_body(await request.body(), ExecuteRequest)
        job = JobStream(service, req.job_id, asyncio.get_running_loop())
        job_request = JobRequest(
            job_id=req.job_id,
            prompt=req.prompt,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            stop=tuple(req.stop),
            seed=req.seed,
        )
        try:  # in a thread: the engine's checks tokenize the prompt and the stop strings
            await asyncio.to_thread(service.engine.submit, job_request, job.sink)
        except WorkerError as e:
            raise submit_error(e) from None
        job.register()
    except (ApiError, HTTPException) as e:
        service.metrics.request(refusal_outcome(e))
        raise
    return Stream(
        job.frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(job.close),
    )


@post("/cancel", status_code=202, operation_class=_json_body(CancelRequest), responses=_refusals(400, 401, 413, 431))
async def cancel(request: Request) -> dict[str, Any]:
    req = decode_body(await request.body(), CancelRequest)
    live = _service(request).engine.cancel(req.job_id)
    return {"job_id": req.job_id, "cancelled": live}


@post("/shutdown", status_code=202, responses=_refusals(401, 431))
async def shutdown(request: Request) -> Response:
    service = _service(request)
    return Response(
        {"status": "shutting_down", "deadline_s": service.shutdown_deadline_s},
        status_code=202,
        background=BackgroundTask(service.begin_shutdown, "POST /shutdown"),
    )


@get("/health", opt={"public": True}, responses=_refusals(431))
async def health(request: Request) -> dict[str, Any]:
    return _service(request).health()


@get("/metrics", media_type=CONTENT_TYPE, responses=_refusals(401, 431))
async def metrics(request: Request) -> Response:
    # a coroutine runs on the event loop's thread: its CPU time is the loop's
    return Response(_service(request).metrics.render(loop_cpu_seconds=time.thread_time()), media_type=CONTENT_TYPE)


# -- auth and errors -----------------------------------------------------------------------------------------


def limit_headers(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    headers = connection.scope["headers"]
    size = sum(len(name) + len(value) for name, value in headers)
    if len(headers) > MAX_HEADERS or size > MAX_HEADER_BYTES:
        message = (
            f"the request has {len(headers)} headers of {size} bytes; at most {MAX_HEADERS} headers of "
            f"{MAX_HEADER_BYTES} bytes in all are allowed"
        )
        raise ApiError(431, ErrorCode.INVALID_REQUEST, message, "headers")


def require_api_key(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    key = connection.app.state.service.api_key
    if key is None or handler.opt.get("public"):
        return
    # The scheme is case-insensitive (RFC 7235 §2.1), the token is not.
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.lstrip(" ").encode(), key.encode()):
        raise ApiError(
            401,
            UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <api key>)",
            None,
            {"WWW-Authenticate": "Bearer"},
        )


def _error_body(code: str, message: str, field: str | None) -> dict[str, Any]:
    body = {"code": str(code), "message": message}
    if field is not None:
        body["field"] = field
    return body


def api_error_response(_: Request, e: ApiError) -> Response:
    return Response(_error_body(e.code, e.message, e.field), status_code=e.status, headers=e.headers)


_HTTP_CODES = {401: UNAUTHORIZED, 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


def http_error_response(request: Request, e: HTTPException) -> Response:
    status = e.status_code
    if status == 413:
        limit = request.app.state.service.max_body_bytes
        return Response(
            _error_body(ErrorCode.INVALID_REQUEST, f"the request body exceeds {limit} bytes", "body"), status_code=413
        )
    code = _HTTP_CODES.get(status, ErrorCode.INVALID_REQUEST if status < 500 else ErrorCode.INTERNAL)
    return Response(_error_body(code, str(e.detail), None), status_code=status, headers=e.headers)


def internal_error_response(request: Request, e: Exception) -> Response:
    request.app.state.service.narrator.emit(
        "error", level="error", code=str(ErrorCode.INTERNAL), message=f"{type(e).__name__}: {e}", path=request.url.path
    )
    return Response(_error_body(ErrorCode.INTERNAL, f"internal error: {type(e).__name__}", None), status_code=500)


def create_app(service: WorkerService) -> Litestar:
    from server.openai_api import openai_router  # it builds on this module's schemas and JobStream

    return Litestar(
        route_handlers=[execute, cancel, shutdown, health, metrics, openai_router],
        state=State({"service": service}),
        guards=[limit_headers, require_api_key],
        exception_handlers={
            ApiError: api_error_response,
            HTTPException: http_error_response,
            Exception: internal_error_response,
        },
        request_max_body_size=service.max_body_bytes,
        # the schema (JSON only: the UI pages would load scripts from the internet) at /schema/openapi.json
        openapi_config=OpenAPIConfig(
            title="worker-orcd", version=OPENAPI_VERSION, path="/schema", render_plugins=[JsonRenderPlugin()]
        ),
        logging_config=None,
    )
