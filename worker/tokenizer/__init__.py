"""Tokenizers (REQUIREMENTS §7, M0-W-1360..1365): one interface (base.Tokenizer) over two backends, gguf-bpe
(built from a GGUF file's tokenizer.ggml.* metadata, gguf_bpe.py) and hf-json (a tokenizer.json, hf_json.py),
and a streaming detokenizer (stream.py).

Usage: `tok = load_tokenizer("model.gguf")`, `ids = tok.encode(text, special=True)`, `tok.decode(ids)`;
`StreamDecoder(tok, continuation=True).push(id)` gives complete UTF-8 characters only.
"""

from __future__ import annotations

import os
from pathlib import Path

from worker.errors import ErrorCode, WorkerError
from worker.tokenizer.base import Tokenizer
from worker.tokenizer.stream import StreamDecoder

__all__ = ["StreamDecoder", "Tokenizer", "load_tokenizer"]


def load_tokenizer(path, tokenizer_json: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The tokenizer of `path`: a GGUF file (or an opened worker.gguf.GGUFFile) gives gguf-bpe, a .json file
    hf-json. With `tokenizer_json`, that file is used instead of the GGUF's metadata (hf-json, BOS/EOS from
    the tokenizer_config.json beside it). Failures raise WorkerError(MODEL_LOAD_FAILED)."""
    if tokenizer_json is not None or (isinstance(path, str | os.PathLike) and str(path).lower().endswith(".json")):
        from worker.tokenizer import hf_json

        json_path = Path(tokenizer_json if tokenizer_json is not None else path)
        if not json_path.is_file():
            raise WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"{json_path}: tokenizer file not found")
        return hf_json.from_file(json_path)

    from worker.gguf import GGUFFile, open_gguf
    from worker.tokenizer import gguf_bpe

    gf = path if isinstance(path, GGUFFile) else open_gguf(path, require_tensors=False)
    return gguf_bpe.from_metadata(gf.metadata, str(gf.path))
