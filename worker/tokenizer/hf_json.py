"""hf-json: a tokenizer.json loaded with HF `tokenizers`, encoding exactly as the file says, behind the same
interface as gguf-bpe.

BOS/EOS come from tokenizer_config.json beside the file (bos_token, eos_token, add_bos_token, add_eos_token)
where there is one; without it, BOS is the special token the post-processor template puts first. Which tokens
are rendered and which end generation follows the same llama.cpp rules as for GGUF files (special.py), with
added special tokens as control tokens and other added tokens as user-defined.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from worker.errors import ErrorCode, WorkerError
from worker.tokenizer import special as sp
from worker.tokenizer.base import Tokenizer, byte_level_bytes

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Decoders whose effect on one token is known here; the others (WordPiece, CTC, ...) are for non-LLM vocabularies.
_KNOWN_DECODERS = {"ByteLevel", "ByteFallback", "Metaspace", "Replace", "Strip", "Fuse", "Sequence"}


def from_file(path: str | Path, config_path: str | Path | None = None) -> Tokenizer:
    """The tokenizer in `path` (a tokenizer.json); `config_path` defaults to tokenizer_config.json beside it."""
    path = Path(path)

    def fail(reason: str) -> WorkerError:
        return WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"{path}: {reason}")

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception on a missing or malformed file
        raise fail(f"not a readable tokenizer.json ({e})") from e
    config_path = Path(config_path) if config_path else path.with_name("tokenizer_config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise fail(f"{config_path} is not readable JSON ({e})") from e

    decoders = list(_decoders(_state(hf.decoder)))
    unknown = {d.get("type") for d in decoders} - _KNOWN_DECODERS
    if unknown:
        raise fail(f"decoder {sorted(unknown)} is not supported (byte-level or SentencePiece-style only)")
    byte_level = any(d["type"] == "ByteLevel" for d in decoders)
    byte_fallback = any(d["type"] == "ByteFallback" for d in decoders)
    replacements = [(d["pattern"].get("String"), d["content"]) for d in decoders if d["type"] == "Replace"]
    if any(old is None for old, _ in replacements):
        raise fail("a Replace decoder with a regex pattern is not supported (plain strings only)")
    replacements += [(d.get("replacement", "▁"), " ") for d in decoders if d["type"] == "Metaspace"]
    strips_prefix_space = any(
        (d["type"] == "Metaspace" and (d.get("prepend_scheme", "always") != "never" or d.get("add_prefix_space")))
        or (d["type"] == "Strip" and d.get("content") == " " and d.get("start", 0) > 0)
        for d in decoders
    )

    added_tokens = hf.get_added_tokens_decoder()
    n = max(hf.get_vocab_size(with_added_tokens=True), max(added_tokens, default=-1) + 1)
    texts = [hf.id_to_token(i) or "" for i in range(n)]
    vocab = {t: i for i, t in enumerate(texts) if t}
    # ids the file leaves undefined render as nothing
    attrs = [(sp.BYTE if byte_fallback and _BYTE_TOKEN.fullmatch(t) else sp.NORMAL) if t else sp.UNUSED for t in texts]
    for i, added in added_tokens.items():
        attrs[i] = sp.CONTROL if added.special else sp.USER_DEFINED

    def config_id(key: str) -> int | None:
        value = config.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        return vocab.get(content) if isinstance(content, str) else None

    template_bos = _template_bos(_state(hf.post_processor))
    bos_id = config_id("bos_token") if "bos_token" in config else template_bos
    eos_id = config_id("eos_token")
    eog_ids = sp.apply_llama_rules(texts, attrs, vocab, {"eos": eos_id})

    def piece(t: str, a: int) -> bytes:
        if a & sp.SPLIT:
            return t.encode()
        if a & sp.BYTE:
            return bytes([int(t[3:5], 16)])
        if not a & sp.NORMAL:
            return b""
        if byte_level:
            return byte_level_bytes(t)
        for old, new in replacements:
            t = t.replace(old, new)
        return t.encode()

    return Tokenizer(
        kind="hf-json",
        hf=hf,
        pieces=[piece(t, a) for t, a in zip(texts, attrs, strict=True)],
        hidden=[bool(a & sp.HIDDEN) for a in attrs],
        bos_id=bos_id,
        eos_id=eos_id,
        eog_ids=eog_ids,
        add_bos=bool(config.get("add_bos_token", template_bos is not None)),
        add_eos=bool(config.get("add_eos_token", False)),
        strips_prefix_space=strips_prefix_space,
    )


def _state(component: Any) -> dict[str, Any] | None:
    """The JSON form of a tokenizers component (decoder, post-processor), as it stands in tokenizer.json."""
    return None if component is None else json.loads(component.__getstate__())


def _decoders(decoder: dict[str, Any] | None):
    if decoder is None:
        return
    if decoder.get("type") == "Sequence":
        for d in decoder.get("decoders", []):
            yield from _decoders(d)
    else:
        yield decoder


def _template_bos(post: dict[str, Any] | None) -> int | None:
    """The id of the special token a TemplateProcessing post-processor puts before the text, if any."""
    if not post:
        return None
    if post.get("type") == "Sequence":
        return next((b for p in post.get("processors", []) if (b := _template_bos(p)) is not None), None)
    if post.get("type") != "TemplateProcessing" or not post.get("single"):
        return None
    first = post["single"][0].get("SpecialToken")
    if first is None:
        return None
    ids = post.get("special_tokens", {}).get(first["id"], {}).get("ids", [])
    return ids[0] if ids else None
