"""The tokenizer object the engine uses, whatever it was built from (GGUF metadata or tokenizer.json): encoding
through a HF `tokenizers` object, decoding through a table of each token's bytes.

Decoding goes through bytes because single tokens need not be valid UTF-8 (byte-level BPE pieces and
SentencePiece <0xXX> byte tokens split characters); only whole sequences are.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Sequence

import tokenizers

from worker.errors import ErrorCode, WorkerError


@functools.cache
def byte_level_table() -> dict[int, int]:
    """GPT-2's byte-level alphabet as str.translate table: printable unicode code point -> the byte it stands
    for. Bytes that are printable latin-1 stand for themselves; the others were moved to U+0100 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: b for b in printable}
    shifted = (b for b in range(256) if b not in table)
    table.update({256 + n: b for n, b in enumerate(shifted)})
    return table


def byte_level_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE piece stands for. A character outside the alphabet (only in hand-edited
    vocabularies) is kept as its UTF-8, where llama.cpp would print an [UNK_BYTE_...] marker."""
    mapped = piece.translate(byte_level_table())
    try:
        return mapped.encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(c.encode("latin-1") if ord(c) < 256 else c.encode() for c in mapped)


def _not_text(text: object) -> Exception:
    if not isinstance(text, str):
        return TypeError(f"text to encode must be str, not {type(text).__name__}")
    bad = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) < 0xE000)  # what JSON escapes can smuggle in
    return WorkerError(
        ErrorCode.INVALID_REQUEST, f"text is not valid Unicode: lone surrogate U+{ord(text[bad]):04X} at {bad}"
    )


class Tokenizer:
    """Text <-> token ids for one vocabulary.

    kind: "gguf-bpe" or "hf-json". eog_ids: the ids that end generation (eos plus end-of-turn tokens, as
    llama.cpp decides from the vocabulary). add_bos/add_eos: the file's own rule, applied when encode() is not
    told otherwise. strips_prefix_space: the vocabulary is SentencePiece with add_space_prefix, so encode puts a
    space before the text and decode removes it again from the first token.
    """

    def __init__(
        self,
        *,
        kind: str,
        hf: tokenizers.Tokenizer,
        pieces: list[bytes],
        hidden: Iterable[bool],
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: frozenset[int],
        add_bos: bool,
        add_eos: bool,
        strips_prefix_space: bool,
    ):
        self.kind = kind
        self.vocab_size = len(pieces)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = eog_ids
        self.add_bos = add_bos and bos_id is not None
        self.add_eos = add_eos and eos_id is not None
        self.strips_prefix_space = strips_prefix_space
        self._hf = hf
        # encode_special_tokens is state on the shared Rust object: callers on other threads must not see it flip.
        self._lock = threading.Lock()
        self._pieces_special = pieces
        self._pieces = [b"" if h else p for p, h in zip(pieces, hidden, strict=True)]

    def __repr__(self) -> str:
        return f"<Tokenizer {self.kind} vocab_size={self.vocab_size} bos={self.bos_id} eos={self.eos_id}>"

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of `text`. add_bos=None applies the file's rule (BOS, and EOS where the file asks for it);
        True/False forces BOS on or off and adds no EOS. special=True matches control-token texts such as
        <start_of_turn> as single tokens; user-defined tokens are matched either way."""
        with self._lock:
            self._hf.encode_special_tokens = not special
            try:
                # the batch entry point skips the character offsets encode() computes, which nothing here needs
                ids = self._hf.encode_batch_fast([text], add_special_tokens=False)[0].ids
            except TypeError:
                raise _not_text(text) from None
        if add_bos if add_bos is not None else self.add_bos:
            if self.bos_id is None:
                raise ValueError("this vocabulary has no BOS token")
            ids.insert(0, self.bos_id)
        if add_bos is None and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def is_control(self, id: int) -> bool:
        """A control token: matched in text and rendered only when asked (special=True), like <|im_end|>."""
        return self._pieces[id] == b"" and self._pieces_special[id] != b""

    def split_control(self, text: str) -> list[int | str]:
        """`text` cut at the control tokens encode(special=True) would match: their ids, and the text between them
        (whitespace a control token strips, e.g. Phi-3's, goes with the token). encode(special=True) equals the
        concatenation of the ids and of encode(special=False) of each text part, as the split is the tokenizer's."""
        with self._lock:
            self._hf.encode_special_tokens = False
            try:
                enc = self._hf.encode(text, add_special_tokens=False)
            except TypeError:
                raise _not_text(text) from None
        parts: list[int | str] = []
        done = 0
        for id, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            if self.is_control(id) and start >= done:
                if start > done:
                    parts.append(text[done:start])
                parts.append(id)
                done = end
        if done < len(text):
            parts.append(text[done:])
        return parts

    def token_bytes(self, id: int, special: bool = False) -> bytes:
        """The raw bytes of one token's piece; control tokens give b"" unless special=True."""
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        return (self._pieces_special if special else self._pieces)[id]

    def decode_bytes(self, ids: Sequence[int], special: bool = False, continuation: bool = False) -> bytes:
        """The bytes `ids` stand for. See decode()."""
        ids = [int(i) for i in ids]
        if ids and not (min(ids) >= 0 and max(ids) < self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        table = self._pieces_special if special else self._pieces
        parts = [table[i] for i in ids]
        k = self.prefix_space_position(ids[0]) if ids and not continuation else None
        if k is not None and k < len(parts) and parts[k][:1] == b" ":
            parts[k] = parts[k][1:]
        return b"".join(parts)

    def decode(self, ids: Sequence[int], special: bool = False, continuation: bool = False) -> str:
        """The text `ids` stand for: control tokens (BOS, <end_of_turn>, ...) are left out unless special=True.

        Where the vocabulary adds a space prefix, the space before the first word (after an optional BOS) is
        removed so that decode(encode(text)) == text; continuation=True keeps it, for ids that continue earlier
        text (generated tokens after a prompt). Spaces are never "cleaned up" around punctuation as llama.cpp's
        clean_spaces does for some BPE vocabularies: decode is the exact inverse of encode, and the
        concatenation of streamed pieces equals it."""
        return self.decode_bytes(ids, special, continuation).decode("utf-8", errors="replace")

    def prefix_space_position(self, first_id: int) -> int | None:
        """Index of the token whose leading space decode removes, given the first id; None if none is removed."""
        if not self.strips_prefix_space:
            return None
        return 1 if first_id == self.bos_id else 0
