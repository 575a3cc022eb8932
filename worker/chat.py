"""Chat templates: a model's `tokenizer.chat_template` (or --chat-template FILE) rendered as HF transformers'
`apply_chat_template` renders it, and the rendered conversation turned into prompt ids.

Rendering matches transformers (utils/chat_template_utils.py): a jinja2 ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and the loopcontrols extension; globals raise_exception, strftime_now, dict and a
namespace that refuses underscore attributes; a tojson filter that does not escape HTML; the template sees
`messages`, `tools`, `documents`, `add_generation_prompt`, `bos_token` and `eos_token`, and a message's reasoning
also as `thinking` (what gpt-oss's template reads).

Templates are untrusted (they come with the model file): besides the sandbox, a render is stopped after
RENDER_TIMEOUT_S (a trace function on the template's own frames sees every loop iteration) or once its output
passes MAX_RENDER_CHARS, and `*`, `+` and `**` refuse results larger than that.

Special tokens: the template's control tokens (<|im_start|>, <start_of_turn>, ...) become their ids, while text that
came from a request (message contents, names) is tokenized as /execute tokenizes a prompt, never matching control
tokens: a message containing "<|im_end|>" does not end its turn. To tell them apart, every control-token text in a
request string gets a SENTINEL (a noncharacter) after its first character before rendering, so the rendered text
matches control tokens only where the template wrote them; the sentinels are removed before the text parts are
tokenized. Tokens the vocabulary marks user-defined (gpt-oss's <|channel|>, <|message|>, <|end|>) are matched in
any text, as llama.cpp and /execute do.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

from worker.errors import ErrorCode, WorkerError
from worker.tokenizer import Tokenizer

RENDER_TIMEOUT_S = 1.0
MAX_RENDER_CHARS = 1 << 21
SENTINEL = "\ufdd0"
_TEMPLATE_FILE = "<template>"  # the file name jinja2 gives code compiled from a string


class ChatError(WorkerError):
    """A chat request this model cannot render: 400 INVALID_REQUEST (the template refused the conversation,
    rendering ran too long or too large, or the model has no template)."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.INVALID_REQUEST, message)


class _RenderLimit(Exception):
    pass


class _Environment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' environment, with the size bound on the operators that can blow a value up."""

    intercepted_binops = frozenset(["*", "+", "**"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise _RenderLimit(f"exponent {right} is too large")
        if operator == "*" and isinstance(left, int) and isinstance(right, str | list | tuple):
            left, right = right, left
        if operator == "*" and isinstance(left, str | list | tuple) and isinstance(right, int):
            _check_size(len(left) * right)
        if operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            _check_size(len(left) + len(right))
        return super().call_binop(context, operator, left, right)


def _check_size(n: int) -> None:
    if n > MAX_RENDER_CHARS:
        raise _RenderLimit(f"a value of {n} items or characters exceeds the bound of {MAX_RENDER_CHARS}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore attributes (no route to CPython internals), as transformers'."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' (got {name!r})")


class _Dict:
    """`dict(...)` for templates without handing them the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class ChatTemplate:
    """One model's chat template bound to its tokenizer. `now` gives strftime_now's time (tests fix it);
    `special_tokens` overrides the bos_token/eos_token texts taken from the tokenizer."""

    def __init__(
        self,
        source: str,
        tokenizer: Tokenizer,
        *,
        now: Callable[[], datetime] = datetime.now,
        special_tokens: dict[str, str | None] | None = None,
    ):
        self.tokenizer = tokenizer
        env = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(
            raise_exception=_raise_exception,
            strftime_now=lambda fmt: now().strftime(fmt),
            dict=_Dict(),
            namespace=_Namespace,
        )
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise WorkerError(
                ErrorCode.MODEL_LOAD_FAILED, f"the chat template does not parse: {e.message} (line {e.lineno})"
            ) from None
        self.special = {
            "bos_token": _text(tokenizer, tokenizer.bos_id),
            "eos_token": _text(tokenizer, tokenizer.eos_id),
            **(special_tokens or {}),
        }
        control = sorted(
            {
                tokenizer.token_bytes(i, special=True).decode("utf-8", "replace")
                for i in range(tokenizer.vocab_size)
                if tokenizer.is_control(i)
            },
            key=len,
            reverse=True,  # longest first: the regex then matches as the tokenizer does (leftmost-longest)
        )
        self._control = re.compile("|".join(map(re.escape, control))) if control else None
        self.harmony = "<|channel|>" in source and "<|message|>" in source

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The conversation as text, as transformers' apply_chat_template(tokenize=False) gives it."""
        chat = [_alias_reasoning(m) for m in messages]
        context = {
            "messages": chat,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
            **self.special,
            **kwargs,
        }
        deadline = time.monotonic() + RENDER_TIMEOUT_S

        def on_line(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and time.monotonic() > deadline:
                raise _RenderLimit(f"rendering took longer than {RENDER_TIMEOUT_S:g} s")
            return on_line

        def on_call(frame: Any, event: str, arg: Any) -> Any:
            return on_line if frame.f_code.co_filename == _TEMPLATE_FILE else None

        out: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(on_call)
        try:
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > MAX_RENDER_CHARS:
                    raise _RenderLimit(f"the rendered prompt exceeds {MAX_RENDER_CHARS} characters")
                out.append(piece)
        except _RenderLimit as e:
            raise ChatError(f"messages: the chat template was stopped: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatError(f"messages: the chat template refused the conversation: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            reason = f"{type(e).__name__}: {e}"
            raise ChatError(f"messages: the chat template failed on this conversation: {reason}") from None
        finally:
            sys.settrace(previous)
        return "".join(out)

    def encode(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Prompt ids: control tokens where the template wrote them, request text never matching one."""
        marked = [_map_strings(m, self._mark) for m in messages]
        rendered = self.render(marked, add_generation_prompt, **kwargs)
        ids: list[int] = []
        for part in self.tokenizer.split_control(rendered):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self.tokenizer.encode(part.replace(SENTINEL, ""), add_bos=False, special=False)
        return ids

    def _mark(self, text: str) -> str:
        if SENTINEL in text:
            raise ChatError(f"messages: the noncharacter U+{ord(SENTINEL):04X} is not accepted in a chat message")
        if self._control is None:
            return text
        return self._control.sub(lambda m: m.group(0)[0] + SENTINEL + m.group(0)[1:], text)


def _text(tokenizer: Tokenizer, id: int | None) -> str | None:
    return None if id is None else tokenizer.token_bytes(id, special=True).decode("utf-8", "replace")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """Reasoning under the names templates read: reasoning_content (the standard) and thinking (gpt-oss)."""
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if message.get(k)), None)
    if reasoning is None:
        return dict(message)
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _map_strings(value: Any, f: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return f(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, f) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(v, f) for v in value]
    return value


def load_chat_template(
    tokenizer: Tokenizer, metadata_template: str | None, override: str | Path | None = None
) -> ChatTemplate | None:
    """The model's template: the file `override` (--chat-template) if given, else the GGUF's
    tokenizer.chat_template; None when there is neither (chat requests then get a clear 400)."""
    if override is not None:
        try:
            source = Path(override).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"--chat-template {override}: cannot read it: {e}") from None
        return ChatTemplate(source, tokenizer)
    if not metadata_template:
        return None
    return ChatTemplate(metadata_template, tokenizer)
