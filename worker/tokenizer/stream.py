"""Streaming detokenization: token ids in one at a time, text out in complete UTF-8 characters only.

A character can be split over several tokens (byte-level BPE pieces, SentencePiece <0xXX> byte tokens); its
bytes are held back until it is complete. The concatenation of everything push() and flush() return equals
Tokenizer.decode of all the ids with the same options.
"""

from __future__ import annotations

import codecs

from worker.tokenizer.base import Tokenizer


class StreamDecoder:
    """Decode one token at a time. special/continuation mean what they mean for Tokenizer.decode; an engine
    streaming generated tokens after a prompt passes continuation=True."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False, continuation: bool = False):
        self._tokenizer = tokenizer
        self._special = special
        self._continuation = continuation
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._count = 0
        self._strip_at: int | None = None

    def push(self, id: int) -> str:
        """The text that `id` completes; "" while a character is still incomplete."""
        piece = self._tokenizer.token_bytes(id, self._special)
        if self._count == 0 and not self._continuation:
            self._strip_at = self._tokenizer.prefix_space_position(id)
        if self._count == self._strip_at and piece[:1] == b" ":
            piece = piece[1:]
        self._count += 1
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD); the decoder can then be reused
        for a new sequence."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._count = 0
        self._strip_at = None
        return text
