"""gpt-oss's harmony format on the output side: the text an assistant turn generates, after the prompt's
`<|start|>assistant`, is a sequence of messages `<|channel|>NAME<|message|>BODY<|end|>` (the last one ending with
<|return|> or <|call|>, which end generation and are not rendered), the later ones starting again with
`<|start|>assistant`. The analysis channel is the model's reasoning (sent as `reasoning_content`, as vLLM does);
every other channel (final, commentary) is `content`.

The markers are single tokens that decode renders (llama.cpp makes them user-defined), so they arrive whole, but
a piece of streamed text may end inside one (stop-string hold-back): such a tail is kept until the next piece.
"""

from __future__ import annotations

MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
BODY_ENDS = ("<|end|>", "<|start|>", "<|return|>", "<|call|>")
MARKERS = (MESSAGE, CHANNEL, "<|constrain|>", *BODY_ENDS)
REASONING, CONTENT = "reasoning_content", "content"


class HarmonyStream:
    """feed() pieces of generated text, get (field, text) pieces: field is "content" or "reasoning_content"."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_body = False
        self._field = CONTENT
        self._saw_marker = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        while True:
            if not self._in_body:
                cut = self._buf.find(MESSAGE)
                if cut < 0:
                    return out
                self._field = _field_of(self._buf[:cut])
                self._buf, self._in_body, self._saw_marker = self._buf[cut + len(MESSAGE) :], True, True
                continue
            ends = [(i, m) for m in BODY_ENDS if (i := self._buf.find(m)) >= 0]
            if ends:
                cut, marker = min(ends)
                _append(out, self._field, self._buf[:cut])
                # after <|start|> comes the next header ("assistant<|channel|>final"); after <|end|>, a <|start|>
                self._buf, self._in_body = self._buf[cut + len(marker) :], False
                continue
            keep = _marker_prefix_len(self._buf)
            _append(out, self._field, self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return out

    def flush(self) -> list[tuple[str, str]]:
        """The rest at the end of generation. Text of a model that never wrote a harmony header is content."""
        out: list[tuple[str, str]] = []
        if self._in_body:
            _append(out, self._field, self._buf)
        elif not self._saw_marker and not any(m in self._buf for m in MARKERS):
            _append(out, CONTENT, self._buf)
        self._buf = ""
        return out


def _field_of(header: str) -> str:
    at = header.rfind(CHANNEL)
    if at < 0:
        return CONTENT
    name = header[at + len(CHANNEL) :].split("<|", 1)[0].split()
    return REASONING if name and name[0] == "analysis" else CONTENT


def _marker_prefix_len(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    for n in range(min(len(text), max(map(len, MARKERS)) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in MARKERS):
            return n
    return 0


def _append(out: list[tuple[str, str]], field: str, text: str) -> None:
    if text:
        out.append((field, text))
