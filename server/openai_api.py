"""The OpenAI-compatible API over the same engine as /execute: POST /v1/chat/completions, POST /v1/completions
(both streamed as SSE `data: {...}` chunks ending with `data: [DONE]`, or answered whole), GET /v1/models, and
llama.cpp's POST /tokenize and /detokenize. docs/http.md describes them.

Everything /execute has applies: the bearer key (the app's guard), validation before any work (the same limits,
the engine's at submit), the engine's queue, metrics and narration (JobStream's sink and the engine's events), and a
cancel when the client goes away: a stream's close path, or for a whole answer a watcher of the connection's
http.disconnect. Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with /execute's codes.

Chat requests are rendered by the model's chat template into prompt ids (worker/chat.py); for gpt-oss the
harmony channels of the answer are split into content and reasoning_content (worker/harmony.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.background_tasks import BackgroundTask
from litestar.exceptions import HTTPException
from litestar.response import Stream

from server.app import (
    MAX_PROMPT_CHARS,
    ApiError,
    JobStream,
    decode_body,
    invalid,
    refusal_outcome,
    submit_error,
)
from server.openai_schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    TokenizeRequest,
    _Sampling,
)
from server.service import WorkerService
from worker.chat import ChatError
from worker.engine import End, ErrorEvent, JobRequest, Started, TokenEvent
from worker.errors import ErrorCode, WorkerError
from worker.harmony import CONTENT, HarmonyStream
from worker.sampling import TokenLogprobs

FINISH_REASON = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length", "context": "length"}
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- requests -> engine jobs -------------------------------------------------------------------------------------


def _service(request: Request) -> WorkerService:
    return request.app.state.service


def _job_request(
    req: _Sampling,
    service: WorkerService,
    job_id: str,
    *,
    prompt: str = "",
    prompt_ids: list[int] | None = None,
    max_tokens: int | None,
    logprobs: bool,
) -> JobRequest:
    """The engine job for a request (the engine checks the rules that depend on the model when it is submitted:
    seed, max_tokens, top_k, stop, the prompt's tokens)."""
    return JobRequest(
        job_id=job_id,
        prompt=prompt,
        max_tokens=max_tokens if max_tokens is not None else service.engine.max_tokens_out,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        stop=(req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()),
        seed=req.seed,
        prompt_ids=tuple(prompt_ids) if prompt_ids is not None else None,
        logprobs=logprobs,
    )


def _template_message(m: Message) -> dict[str, Any]:
    """A message as chat templates read it: content a string (text parts joined by newlines, as vLLM does)."""
    content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or [])
    out: dict[str, Any] = {"role": m.role, "content": content}
    for key in ("name", "reasoning_content", "tool_call_id"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


def _chat_job(req: ChatRequest, service: WorkerService, job_id: str) -> JobRequest:
    """Runs in a thread: renders the template and tokenizes."""
    if service.chat_template is None:
        raise invalid(
            "messages",
            f"model {service.model_name} has no chat template (no tokenizer.chat_template in the file): "
            "use /v1/completions with your own prompt format, or start the worker with --chat-template FILE",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "top_logprobs: needs logprobs: true")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise invalid("max_completion_tokens", "max_completion_tokens: give it or max_tokens, not both")
    try:
        ids = service.chat_template.encode([_template_message(m) for m in req.messages])
    except ChatError as e:
        raise invalid("messages", e.message) from None
    return _job_request(
        req,
        service,
        job_id,
        prompt_ids=ids,
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        logprobs=bool(req.logprobs),
    )


def _completion_job(req: CompletionRequest, service: WorkerService, job_id: str) -> JobRequest:
    prompt, ids = req.prompt, None
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            prompt, ids = "", list(prompt)
        else:
            raise invalid("prompt", "prompt: a list must be one string or token ids (batches are not supported)")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid("prompt", f"prompt: is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    logprobs = req.logprobs is not None
    return _job_request(
        req, service, job_id, prompt=prompt, prompt_ids=ids, max_tokens=req.max_tokens, logprobs=logprobs
    )


async def _admit(request: Request, schema: type, build: Callable[[Any, WorkerService, str], JobRequest], prefix: str):
    """Validate, build and submit a job; a refusal is counted in the metrics as /execute counts it."""
    service = _service(request)
    try:
        if not service.accepting:
            raise ApiError(503, ErrorCode.SHUTTING_DOWN, "the worker is shutting down and accepts no new jobs")
        req = decode_body(await request.body(), schema)
        job_id = f"{prefix}-{uuid.uuid4().hex}"
        job_request = await asyncio.to_thread(build, req, service, job_id)
        job = JobStream(service, job_id, asyncio.get_running_loop())
        try:
            await asyncio.to_thread(service.engine.submit, job_request, job.sink)
        except WorkerError as e:
            refusal = submit_error(e)
            if refusal.field == "prompt" and schema is ChatRequest:  # the prompt a chat request's messages render to
                refusal.field = "messages"
            raise refusal from None
        job.register()
    except (ApiError, HTTPException) as e:
        service.metrics.request(refusal_outcome(e))
        raise
    return req, job


async def _events(job: JobStream) -> AsyncIterator[object]:
    """The job's engine events; None every keep-alive period while nothing comes (a job waiting in the queue)."""
    try:
        async for batch in job.batches():
            for ev in batch or (None,):
                yield ev
    finally:
        job.close()


async def _cancel_on_disconnect(request: Request, job: JobStream) -> None:
    """For a whole (not streamed) answer: the connection's http.disconnect cancels the job."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.close()
            return


# -- answers -----------------------------------------------------------------------------------------------------


class _Answer:
    """Accumulates one job's output as OpenAI reports it: text pieces by field (content, and reasoning_content for
    harmony), log-probabilities, usage and the finish reason."""

    def __init__(self, service: WorkerService, job_id: str, harmony: bool):
        self.tokenizer = service.tokenizer
        self.id, self.model, self.created = job_id, service.model_name, int(time.time())
        self.harmony = HarmonyStream() if harmony else None
        self.prompt_tokens = 0
        self.text_offset = 0

    def pieces(self, text: str) -> list[tuple[str, str]]:
        if self.harmony is not None:
            return self.harmony.feed(text)
        return [(CONTENT, text)] if text else []

    def rest(self) -> list[tuple[str, str]]:
        return self.harmony.flush() if self.harmony is not None else []

    def head(self, obj: str) -> dict[str, Any]:
        """The fields every answer and chunk of this job starts with; `obj`: OpenAI's object name."""
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, end: End) -> dict[str, int]:
        return {
            "prompt_tokens": end.prompt_tokens,
            "completion_tokens": end.tokens_out,
            "total_tokens": end.prompt_tokens + end.tokens_out,
        }

    def _token(self, id: int) -> tuple[str, list[int]]:
        raw = self.tokenizer.token_bytes(id)
        return raw.decode("utf-8", "replace"), list(raw)

    def chat_logprobs(self, items: tuple[tuple[int, TokenLogprobs], ...], top: int) -> list[dict[str, Any]]:
        out = []
        for id, lp in items:
            token, raw = self._token(id)
            alternatives = []
            for alt, alt_lp in lp.top[:top]:
                alt_token, alt_raw = self._token(alt)
                alternatives.append({"token": alt_token, "logprob": alt_lp, "bytes": alt_raw})
            out.append({"token": token, "logprob": lp.logprob, "bytes": raw, "top_logprobs": alternatives})
        return out

    def completion_logprobs(self, items: tuple[tuple[int, TokenLogprobs], ...], top: int) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for id, lp in items:
            token = self._token(id)[0]
            out["tokens"].append(token)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self._token(alt)[0]: alt_lp for alt, alt_lp in lp.top[:top]})
            out["text_offset"].append(self.text_offset)
            self.text_offset += len(token)
        return out


def _error_body(code: str, message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error"}
    return {
        "error": {
            "message": message,
            "type": kind.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": str(code),
        }
    }


def _failed(ev: ErrorEvent) -> ApiError:
    """A job that ended in error, for a whole answer (a stream sends it as an `error` chunk)."""
    status = {ErrorCode.CANCELLED: 503, ErrorCode.INFERENCE_TIMEOUT: 504}.get(ev.code, 500)
    return ApiError(status, ev.code, ev.message)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def _chat_chunks(req: ChatRequest, job: JobStream, a: _Answer) -> AsyncIterator[bytes]:
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    top = req.top_logprobs or 0

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: list | None = None) -> bytes:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": finish,
        }
        usage = {"usage": None} if include_usage else {}
        return _sse({**a.head("chat.completion.chunk"), "choices": [choice], **usage})

    unsent: list = []
    async for ev in _events(job):
        if ev is None:
            yield b": keep-alive\n\n"
        elif isinstance(ev, Started):
            yield chunk({"role": "assistant", "content": ""})
        elif isinstance(ev, TokenEvent):
            if req.logprobs:
                unsent += a.chat_logprobs(ev.logprobs, top)
            for field, text in a.pieces(ev.text):
                yield chunk({field: text}, logprobs=unsent if req.logprobs else None)
                unsent = []
        elif isinstance(ev, End):
            for field, text in a.rest():
                yield chunk({field: text}, logprobs=unsent if req.logprobs else None)
                unsent = []
            yield chunk({}, FINISH_REASON[ev.stop_reason])
            if include_usage:
                yield _sse({**a.head("chat.completion.chunk"), "choices": [], "usage": a.usage(ev)})
            yield DONE
        elif isinstance(ev, ErrorEvent):
            yield _sse(_error_body(ev.code, ev.message, 500))
            yield DONE


async def _completion_chunks(req: CompletionRequest, job: JobStream, a: _Answer) -> AsyncIterator[bytes]:
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(text: str, finish: str | None = None, logprobs: dict | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**a.head("text_completion"), "choices": [choice], **({"usage": None} if include_usage else {})})

    async for ev in _events(job):
        if ev is None:
            yield b": keep-alive\n\n"
        elif isinstance(ev, TokenEvent):
            lp = a.completion_logprobs(ev.logprobs, req.logprobs) if req.logprobs is not None else None
            yield chunk(ev.text, logprobs=lp)
        elif isinstance(ev, End):
            yield chunk("", FINISH_REASON[ev.stop_reason])
            if include_usage:
                yield _sse({**a.head("text_completion"), "choices": [], "usage": a.usage(ev)})
            yield DONE
        elif isinstance(ev, ErrorEvent):
            yield _sse(_error_body(ev.code, ev.message, 500))
            yield DONE


async def _whole(request: Request, job: JobStream) -> tuple[list[TokenEvent], End]:
    """Every event of a job answered as one body; the job is cancelled if the client leaves meanwhile."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    tokens: list[TokenEvent] = []
    try:
        async for ev in _events(job):
            if isinstance(ev, TokenEvent):
                tokens.append(ev)
            elif isinstance(ev, End):
                return tokens, ev
            elif isinstance(ev, ErrorEvent):
                raise _failed(ev)
    finally:
        watcher.cancel()
    raise ApiError(500, ErrorCode.INTERNAL, "the job ended without a terminal event")


def _stream(chunks: AsyncIterator[bytes], job: JobStream) -> Stream:
    return Stream(chunks, media_type="text/event-stream", headers=SSE_HEADERS, background=BackgroundTask(job.close))


# -- routes ------------------------------------------------------------------------------------------------------


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request) -> Response | Stream:
    service = _service(request)
    req, job = await _admit(request, ChatRequest, _chat_job, "chatcmpl")
    a = _Answer(service, job.job_id, service.chat_template.harmony)
    if req.stream:
        return _stream(_chat_chunks(req, job, a), job)
    tokens, end = await _whole(request, job)
    fields: dict[str, str] = {}
    for field, text in [p for t in tokens for p in a.pieces(t.text)] + a.rest():
        fields[field] = fields.get(field, "") + text
    message: dict[str, Any] = {"role": "assistant", "content": fields.get(CONTENT, "")}
    if "reasoning_content" in fields:
        message["reasoning_content"] = fields["reasoning_content"]
    logprobs = None
    if req.logprobs:
        logprobs = {"content": [x for t in tokens for x in a.chat_logprobs(t.logprobs, req.top_logprobs or 0)]}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": FINISH_REASON[end.stop_reason]}
    return Response({**a.head("chat.completion"), "choices": [choice], "usage": a.usage(end)})


@post("/v1/completions", status_code=200)
async def completions(request: Request) -> Response | Stream:
    service = _service(request)
    req, job = await _admit(request, CompletionRequest, _completion_job, "cmpl")
    a = _Answer(service, job.job_id, harmony=False)
    if req.stream:
        return _stream(_completion_chunks(req, job, a), job)
    tokens, end = await _whole(request, job)
    logprobs = None
    if req.logprobs is not None:
        logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            for key, values in a.completion_logprobs(t.logprobs, req.logprobs).items():
                logprobs[key] += values
    text = "".join(t.text for t in tokens)
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": FINISH_REASON[end.stop_reason]}
    return Response({**a.head("text_completion"), "choices": [choice], "usage": a.usage(end)})


@get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    service = _service(request)
    created = int(time.time() - service.uptime())
    model = {"id": service.model_name, "object": "model", "created": created, "owned_by": "worker-orcd"}
    return {"object": "list", "data": [model]}


@post("/tokenize", status_code=200)
async def tokenize(request: Request) -> dict[str, Any]:
    req = decode_body(await request.body(), TokenizeRequest)
    tok = _service(request).tokenizer
    try:
        ids = await asyncio.to_thread(
            tok.encode, req.content, None if req.add_special else False, special=req.parse_special
        )
    except WorkerError as e:
        raise invalid("content", f"content: {e.message}") from None
    if not req.with_pieces:
        return {"tokens": ids}
    pieces = []
    for id in ids:
        raw = tok.token_bytes(id, special=True)
        try:
            pieces.append({"id": id, "piece": raw.decode("utf-8")})
        except UnicodeDecodeError:  # a piece of a character: llama.cpp gives its bytes
            pieces.append({"id": id, "piece": list(raw)})
    return {"tokens": pieces}


@post("/detokenize", status_code=200)
async def detokenize(request: Request) -> dict[str, Any]:
    req = decode_body(await request.body(), DetokenizeRequest)
    tok = _service(request).tokenizer
    bad = next((i for i in req.tokens if not 0 <= i < tok.vocab_size), None)
    if bad is not None:
        raise invalid("tokens", f"tokens: {bad} is outside the vocabulary [0, {tok.vocab_size})")
    return {"content": tok.decode(req.tokens, special=True)}


# -- errors in OpenAI's shape ------------------------------------------------------------------------------------


def _api_error(_: Request, e: ApiError) -> Response:
    return Response(_error_body(e.code, e.message, e.status, e.field), status_code=e.status, headers=e.headers)


def _http_error(request: Request, e: HTTPException) -> Response:
    status = e.status_code
    if status == 413:
        message = f"the request body exceeds {_service(request).max_body_bytes} bytes"
        return Response(_error_body(ErrorCode.INVALID_REQUEST, message, 413, "body"), status_code=413)
    code = {401: "UNAUTHORIZED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(
        status, ErrorCode.INVALID_REQUEST if status < 500 else ErrorCode.INTERNAL
    )
    return Response(_error_body(code, str(e.detail), status), status_code=status, headers=e.headers)


def _internal_error(request: Request, e: Exception) -> Response:
    _service(request).narrator.emit(
        "error", level="error", code=str(ErrorCode.INTERNAL), message=f"{type(e).__name__}: {e}", path=request.url.path
    )
    body = _error_body(ErrorCode.INTERNAL, f"internal error: {type(e).__name__}", 500)
    return Response(body, status_code=500)


openai_router = Router(
    path="/",
    route_handlers=[chat_completions, completions, models, tokenize, detokenize],
    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
)
