"""Request bodies of the OpenAI-compatible routes (server/openai_api.py) and llama.cpp's /tokenize and
/detokenize, as msgspec structs. Fields are OpenAI's (plus top_k, min_p and repetition_penalty, which llama.cpp
and vLLM accept); the value rules are /execute's (server/app.py). Unknown fields are refused, as OpenAI refuses
them; fields OpenAI defines that the worker does not implement are accepted only with the value that means "off".
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from server.app import MAX_STOP_STRINGS
from worker.sampling import TOP_LOGPROBS


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's reasoning (gpt-oss's templates read it)
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Sampling(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What both routes share. None (or null, which some clients send) = OpenAI's default (temperature 1, top_p 1,
    max_tokens the worker's limit, not streamed)."""

    model: Annotated[str, Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1, le=2048)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Annotated[int, Meta(ge=0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=0.0, le=0.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=0.0, le=0.0)] | None = None
    user: str | None = None
    # llama.cpp / vLLM extensions
    top_k: Annotated[int, Meta(ge=0)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Annotated[int, Meta(ge=1, le=2048)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=TOP_LOGPROBS)] | None = None


class CompletionRequest(_Sampling, kw_only=True):
    # text, a list of one text, or token ids (as OpenAI allows; ids are used as they are)
    prompt: str | Annotated[list[str | int], Meta(min_length=1)]
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: Literal[False] | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """llama.cpp's POST /tokenize."""

    content: str
    add_special: bool = False  # the vocabulary's BOS rule
    parse_special: bool = True  # control-token texts become control tokens
    with_pieces: bool = False


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[int]
