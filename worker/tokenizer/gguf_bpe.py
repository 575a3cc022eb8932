"""gguf-bpe: the tokenizer of a GGUF file built from its tokenizer.ggml.* metadata alone, giving llama.cpp's ids
(the oracle) through HF `tokenizers` objects.

- "gpt2" (byte-level BPE): a BPE model from tokens + merges, pre-tokenized by the regexes llama.cpp uses for
  the file's tokenizer.ggml.pre, then GPT-2's byte-to-unicode mapping.
- "llama" (SentencePiece): llama.cpp's SPM tokenizer merges adjacent symbols of a whole text fragment (no split
  at spaces), highest token score first and leftmost on equal scores, starting from UTF-8 characters, with
  spaces escaped as U+2581 and leftover characters spelled as <0xXX> byte tokens. That is a BPE whose merges are
  every split of every token into two tokens, ranked by the score of the result. HF breaks ties by rank where
  llama.cpp takes the leftmost pair; the one tie in real vocabularies is the runs of U+2581 that Llama 2 and
  Phi-3 all score -1e9, ranked here longest left part first so that a run grows from the left as in llama.cpp
  (tests/test_tokenizer.py compares with llama.cpp's algorithm on such runs). A BPE merge needs both halves to
  be tokens where llama.cpp also merges a character that is not one; the vocabularies here have no such
  character.

Special tokens follow special.py and become HF added tokens: user-defined ones are always split out of the
text first, control ones only with special=True.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from gguf import Keys
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from worker.errors import ErrorCode, WorkerError
from worker.tokenizer import special as sp
from worker.tokenizer.base import Tokenizer, byte_level_bytes

K = Keys.Tokenizer
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
# The pre-tokenizer regexes of llama.cpp's llm_tokenizer_bpe, applied in sequence (each splits the pieces of the
# one before; text between matches stays a piece of its own, as HF's "isolated" split does).
_GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",)
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",)
# o200k as tiktoken and the tokenizer.json of gpt-oss write it (llama.cpp rewrites the letter classes for its own
# regex engine; oniguruma has them).
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2[0], r"\p{N}+", r"[0-9][0-9][0-9]")


def _pre(regexes: tuple[str, ...], ignore_merges: bool = False, add_bos: bool = False) -> dict[str, Any]:
    return {"regexes": regexes, "ignore_merges": ignore_merges, "add_bos": add_bos}


# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp maps the names (llama_vocab::impl::load). ignore_merges: a
# piece that is itself a token is taken whole (Llama 3 has tokens its merges do not reach; o200k has none, so
# tiktoken's whole-piece lookup and llama.cpp's plain merging agree). add_bos: llama.cpp's default where the
# file has no add_bos_token key.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "default": _pre(_DEFAULT),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), _pre(_LLAMA3, ignore_merges=True, add_bos=True)),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4", "mpt", "olmo",
                     "jais", "trillion", "granite-docling"), _pre(_GPT2)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "solar-open"), _pre(_QWEN2)),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _pre(_GPT4O)),
}  # fmt: skip

# Metadata key of each id special.py needs; the deprecated prefix/suffix/middle keys win, as in llama.cpp.
_ID_KEYS = {
    "eot": (K.EOT_ID,),
    "eom": (K.EOM_ID,),
    "fim_pre": (K.PREFIX_ID, K.FIM_PRE_ID),
    "fim_suf": (K.SUFFIX_ID, K.FIM_SUF_ID),
    "fim_mid": (K.MIDDLE_ID, K.FIM_MID_ID),
    "fim_pad": (K.FIM_PAD_ID,),
    "fim_rep": (K.FIM_REP_ID,),
    "fim_sep": (K.FIM_SEP_ID,),
}


def from_metadata(md: Mapping[str, Any], source: str) -> Tokenizer:
    """The tokenizer described by a GGUF file's metadata; `source` names the file in error messages."""

    def fail(reason: str) -> WorkerError:
        return WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"{source}: {reason}")

    model = md.get(K.MODEL)
    if model is None:
        raise fail(f"no tokenizer in the file ({K.MODEL} missing)")
    if model not in ("gpt2", "llama"):
        raise fail(f"tokenizer model {model!r} is not supported (gpt2 or llama)")
    texts = md.get(K.LIST)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise fail(f"{K.LIST} is missing or not a list of strings")
    n = len(texts)
    # llama.cpp renames empty tokens so that every text maps to one id.
    texts = [t or f"[EMPTY_{i}]" for i, t in enumerate(texts)]

    def per_token(key: str, kind: type | tuple[type, ...], default: list) -> list:
        value = md.get(key, default)
        if not isinstance(value, list) or len(value) < n or not all(isinstance(v, kind) for v in value[:n]):
            raise fail(f"{key} is not a list of {n} numbers, one per token")
        return value[:n]

    attrs = [sp.ATTR_OF_TYPE.get(t, 0) for t in per_token(K.TOKEN_TYPE, int, [sp.TYPE_NORMAL] * n)]
    index = {t: i for i, t in enumerate(texts)}  # duplicates: the last id wins, as in llama.cpp's token_to_id

    def token_id(keys: tuple[str, ...], default: int | None = None) -> int | None:
        for key in keys:
            value = md.get(key)
            if isinstance(value, int) and 0 <= value < n:
                return value
        return default if default is not None and default < n else None

    spm = model == "llama"
    # llama.cpp's defaults where the file names no id: 1/2 for SentencePiece, 11/11 for byte-level BPE.
    bos_id = token_id((K.BOS_ID,), 1 if spm else 11)
    eos_id = token_id((K.EOS_ID,), 2 if spm else 11)
    ids = {"eos": eos_id, **{name: token_id(keys) for name, keys in _ID_KEYS.items()}}
    eog_ids = sp.apply_llama_rules(texts, attrs, index, ids, md.get("general.name", ""))

    if spm:
        scores = per_token(K.SCORES, (int, float), [0.0] * n)
        hf = HFTokenizer(BPE(index, _spm_merges(texts, scores, index), byte_fallback=True))
        add_space_prefix = bool(md.get(K.ADD_PREFIX, True))
        escape = [normalizers.Replace(" ", "▁")]
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *escape] if add_space_prefix else escape)
        add_bos = True
    else:
        pre_name = md.get(K.PRE) or "default"
        pre = PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise fail(f"{K.PRE} {pre_name!r} is not supported (known: {', '.join(sorted(PRE_TOKENIZERS))})")
        if not isinstance(md.get(K.MERGES), list):
            raise fail(f"{K.MERGES} is missing")
        hf = HFTokenizer(BPE(index, _bpe_merges(md[K.MERGES], index), ignore_merges=pre["ignore_merges"]))
        splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in pre["regexes"]]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
        add_space_prefix = False
        add_bos = pre["add_bos"]

    def added(i: int, a: int) -> AddedToken:
        strip = {"lstrip": bool(a & sp.LSTRIP), "rstrip": bool(a & sp.RSTRIP)}
        return AddedToken(texts[i], special=bool(a & sp.HIDDEN), normalized=False, **strip)

    hf.add_tokens([added(i, a) for i, a in enumerate(attrs) if a & sp.USER_DEFINED and not a & sp.HIDDEN])
    hf.add_special_tokens([added(i, a) for i, a in enumerate(attrs) if a & sp.HIDDEN])

    return Tokenizer(
        kind="gguf-bpe",
        hf=hf,
        pieces=[_piece(t, a, spm) for t, a in zip(texts, attrs, strict=True)],
        hidden=[bool(a & sp.HIDDEN) for a in attrs],
        bos_id=bos_id,
        eos_id=eos_id,
        eog_ids=eog_ids,
        add_bos=bool(md.get(K.ADD_BOS, add_bos)),
        add_eos=bool(md.get(K.ADD_EOS, False)),
        strips_prefix_space=add_space_prefix,
    )


def _spm_merges(texts: list[str], scores: list[float], index: Mapping[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best score of the result first (see the module docstring)."""
    found = [(i, k) for t, i in index.items() for k in range(1, len(t)) if t[:k] in index and t[k:] in index]
    if not found:
        return []
    token, cut = np.array(found, dtype=np.int64).T
    order = np.lexsort((token, -cut, -np.asarray(scores, dtype=np.float64)[token]))
    return [(texts[i][:k], texts[i][k:]) for i, k in zip(token[order].tolist(), cut[order].tolist(), strict=True)]


def _bpe_merges(merges: list[Any], index: Mapping[str, int]) -> list[tuple[str, str]]:
    """The file's merges in rank order. A repeated pair keeps its first rank (llama.cpp's map keeps the first
    insert); a merge whose halves or result are not tokens is dropped (HF refuses it; in llama.cpp it can only
    build a piece that is then spelled byte by byte)."""
    out: dict[tuple[str, str], None] = {}
    for m in merges:
        cut = m.find(" ", 1) if isinstance(m, str) else -1
        if cut < 0:
            continue
        pair = (m[:cut], m[cut + 1 :])
        if pair[0] in index and pair[1] in index and m[:cut] + m[cut + 1 :] in index:
            out.setdefault(pair)
    return list(out)


def _piece(text: str, attr: int, spm: bool) -> bytes:
    """A token's bytes as llama.cpp's token_to_piece(special=true) gives them."""
    if attr & sp.SPLIT:
        return text.encode()
    if attr & sp.NORMAL:
        return text.replace("▁", " ").encode() if spm else byte_level_bytes(text)
    if attr & sp.BYTE:
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            return b""
    return b""  # unused and undefined tokens render as nothing
