"""Architecture parameters checked before anything is sized from them.

A GGUF file's `<arch>.*` metadata says how many layers, heads and dimensions the model has, and the adapters size
tuples, divide and build the weight table from those numbers. A hostile or broken file can say anything (2^31
layers beside 26 tensors, an embedding of 1, a head count that divides to zero), so every parameter an adapter
reads is checked here first: its type, sane bounds, the rules that tie parameters together (dimensions that must
divide, counts within counts) and what the tensors actually present say (the blocks, the embedding width, the
vocabulary). Each failure is a MODEL_LOAD_FAILED naming the key, the value and the rule.

The adapters' `config` functions call `check` first, and `inspect` runs the same checks, so a file inspect calls
valid is one the worker will load. The tensors' shapes against the parameters are the weight tables' own checks
(models/*.weight_table), which run before any memory is sized from a parameter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from worker.errors import ErrorCode, WorkerError
from worker.gguf import GGUFFile

# Upper bounds well above any real model (the largest have embeddings of ~16k, FFNs of ~100k, contexts of ~10M
# tokens, a few hundred experts) and low enough that nothing sized from them runs away.
MAX_DIM = 1 << 24
MAX_CONTEXT = 1 << 24
MAX_EXPERTS = 4096
MAX_YARN_BETA = 1e6

_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class _Int:
    lo: int
    hi: int


@dataclass(frozen=True)
class _Float:
    lo: float
    hi: float
    lo_open: bool  # lo itself is refused (a positive epsilon, a RoPE base above 1)


@dataclass(frozen=True)
class _Str:
    choices: tuple[str, ...]


@dataclass(frozen=True)
class _Flags:
    """A non-empty array of booleans (a per-layer pattern, repeated over the layers)."""


_Rule = _Int | _Float | _Str | _Flags

_DIM = _Int(1, MAX_DIM)
_EPS = _Float(0.0, 1.0, lo_open=True)
_ROPE_BASE = _Float(1.0, math.inf, lo_open=True)

# Per architecture family: the keys (after `<arch>.`) its adapter reads, with their rule and whether they are
# required. Keys an adapter does not read are not checked: they cannot make it misbehave.
_COMMON: dict[str, tuple[_Rule, bool]] = {
    "block_count": (_Int(1, 2**64 - 1), True),  # bounded by the blocks present (_check_blocks)
    "context_length": (_Int(1, MAX_CONTEXT), True),
    "embedding_length": (_DIM, True),
    "attention.head_count": (_DIM, True),
}
_LLAMA = {
    **_COMMON,
    "feed_forward_length": (_DIM, True),
    "attention.head_count_kv": (_DIM, False),
    "attention.key_length": (_DIM, False),
    "attention.value_length": (_DIM, False),
    "attention.layer_norm_rms_epsilon": (_EPS, False),
    "attention.sliding_window": (_Int(0, MAX_CONTEXT), False),
    "attention.sliding_window_pattern": (_Flags(), False),
    "rope.dimension_count": (_DIM, False),
    "rope.freq_base": (_ROPE_BASE, False),
    "rope.freq_base_swa": (_ROPE_BASE, False),
    "final_logit_softcapping": (_Float(0.0, math.inf, lo_open=False), False),
}
_GPT2 = {
    **_COMMON,
    "feed_forward_length": (_DIM, False),
    "attention.layer_norm_epsilon": (_EPS, False),
}
_GPT_OSS = {
    **_COMMON,
    "attention.head_count_kv": (_DIM, False),
    "attention.key_length": (_DIM, True),
    "attention.value_length": (_DIM, False),
    "attention.layer_norm_rms_epsilon": (_EPS, False),
    "attention.sliding_window": (_Int(0, MAX_CONTEXT), False),
    "rope.freq_base": (_ROPE_BASE, False),
    "rope.scaling.type": (_Str(("none", "yarn")), False),
    "rope.scaling.factor": (_Float(1.0, math.inf, lo_open=False), False),
    "rope.scaling.original_context_length": (_Int(1, MAX_CONTEXT), False),
    "rope.scaling.yarn_beta_fast": (_Float(0.0, MAX_YARN_BETA, lo_open=True), False),
    "rope.scaling.yarn_beta_slow": (_Float(0.0, MAX_YARN_BETA, lo_open=True), False),
    "expert_count": (_Int(1, MAX_EXPERTS), True),
    "expert_used_count": (_Int(1, MAX_EXPERTS), True),
    "expert_feed_forward_length": (_DIM, True),
}
RULES: dict[str, dict[str, tuple[_Rule, bool]]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "gemma3": _LLAMA,
    "gpt2": _GPT2,
    "gpt-oss": _GPT_OSS,
}


def check(gf: GGUFFile) -> None:
    """Raise MODEL_LOAD_FAILED for the first architecture parameter that breaks its rule."""
    arch = gf.architecture
    rules = RULES.get(arch)
    if rules is None:
        return  # open_gguf refuses unknown architectures; nothing here to check
    for suffix, (rule, required) in rules.items():
        key = f"{arch}.{suffix}"
        if key in gf.metadata:
            _check_value(gf, key, gf.metadata[key], rule)
        elif required:
            raise _fail(gf, f"missing required metadata key {key!r}")
    _check_blocks(gf)
    _check_vocabulary(gf)
    _check_heads(gf)
    if arch == "gpt-oss":
        _check_experts(gf)


def _fail(gf: GGUFFile, reason: str) -> WorkerError:
    return WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"{gf.path}: {reason}")


def _bad(gf: GGUFFile, key: str, value: Any, rule: str) -> WorkerError:
    shown = repr(value) if not isinstance(value, list) else f"an array of {len(value)}"
    return _fail(gf, f"metadata {key!r} = {shown[:80]}: {rule}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(gf: GGUFFile, key: str, v: Any, rule: _Rule) -> None:
    if isinstance(rule, _Int):
        if not _is_int(v):
            raise _bad(gf, key, v, f"must be an integer, not {type(v).__name__}")
        if not rule.lo <= v <= rule.hi:
            raise _bad(gf, key, v, f"must be in {rule.lo}..{rule.hi}")
    elif isinstance(rule, _Float):
        if not (_is_int(v) or isinstance(v, float)):
            raise _bad(gf, key, v, f"must be a number, not {type(v).__name__}")
        low_ok = v > rule.lo if rule.lo_open else v >= rule.lo
        if not (math.isfinite(v) and low_ok and v <= rule.hi):
            low = f"> {rule.lo:g}" if rule.lo_open else f">= {rule.lo:g}"
            high = "" if rule.hi == math.inf else f" and <= {rule.hi:g}"
            raise _bad(gf, key, v, f"must be a finite number {low}{high}")
    elif isinstance(rule, _Str):
        if v not in rule.choices:
            raise _bad(gf, key, v, f"must be one of {', '.join(rule.choices)}")
    elif not (isinstance(v, list) and v and all(isinstance(x, bool) for x in v)):
        raise _bad(gf, key, v, "must be a non-empty array of booleans")


def _get(gf: GGUFFile, suffix: str, default: Any = None) -> Any:
    return gf.metadata.get(f"{gf.architecture}.{suffix}", default)


def _check_blocks(gf: GGUFFile) -> None:
    """block_count must match the blk.N tensors: 0..block_count-1, each present."""
    present = {int(m.group(1)) for name in gf.tensors if (m := _BLOCK.match(name))}
    n = _get(gf, "block_count")
    if n != len(present) or present != set(range(n)):  # the length first: range(n) may be 2^64 long
        found = f"blk.0..blk.{max(present)} ({len(present)} present)" if present else "no blk.N tensors"
        raise _bad(gf, f"{gf.architecture}.block_count", n, f"must equal the blocks in the file, which has {found}")


def _check_heads(gf: GGUFFile) -> None:
    arch, d_model = gf.architecture, _get(gf, "embedding_length")
    n_heads = _get(gf, "attention.head_count")
    n_kv = _get(gf, "attention.head_count_kv", n_heads)
    if n_kv > n_heads or n_heads % n_kv:
        raise _bad(gf, f"{arch}.attention.head_count_kv", n_kv, f"must divide head_count ({n_heads})")
    head_dim = _get(gf, "attention.key_length")
    if head_dim is None:  # derived from the embedding, as llama.cpp does
        if d_model % n_heads:
            rule = f"must divide embedding_length ({d_model}) when attention.key_length is absent"
            raise _bad(gf, f"{arch}.attention.head_count", n_heads, rule)
        head_dim = d_model // n_heads
    value_dim = _get(gf, "attention.value_length", head_dim)
    if value_dim != head_dim:
        rule = f"must equal the key length ({head_dim}): the worker's attention has one head size"
        raise _bad(gf, f"{arch}.attention.value_length", value_dim, rule)
    rope_dim = _get(gf, "rope.dimension_count")
    if rope_dim is not None and (rope_dim > head_dim or rope_dim % 2):
        raise _bad(gf, f"{arch}.rope.dimension_count", rope_dim, f"must be even and at most the head size {head_dim}")


def _check_vocabulary(gf: GGUFFile) -> None:
    """The token embedding fixes the vocabulary and the width; the tokenizer's list and special ids must fit."""
    embd = gf.tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        raise _fail(gf, "tensor 'token_embd.weight' is missing or not a matrix")
    n_vocab, width = embd.shape
    d_model = _get(gf, "embedding_length")
    if d_model != width:
        rule = f"must equal the width of tensor 'token_embd.weight' ({width})"
        raise _bad(gf, f"{gf.architecture}.embedding_length", d_model, rule)
    out = gf.tensors.get("output.weight")
    if out is not None and out.shape != embd.shape:
        raise _fail(gf, f"tensor 'output.weight' has shape {out.shape}; the token embedding's is {embd.shape}")
    tokens = gf.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if len(tokens) != n_vocab:
        rule = f"must hold one token per row of tensor 'token_embd.weight' ({n_vocab})"
        raise _bad(gf, "tokenizer.ggml.tokens", tokens, rule)
    for key, v in gf.metadata.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and not (_is_int(v) and 0 <= v < n_vocab):
            raise _bad(gf, key, v, f"must be a token id in 0..{n_vocab - 1}")


def _check_experts(gf: GGUFFile) -> None:
    n_experts, n_used = _get(gf, "expert_count"), _get(gf, "expert_used_count")
    if n_used > n_experts:
        raise _bad(gf, "gpt-oss.expert_used_count", n_used, f"must be at most expert_count ({n_experts})")
    if _get(gf, "rope.scaling.type", "none") == "yarn" and _get(gf, "rope.scaling.factor") is None:
        raise _fail(gf, "missing required metadata key 'gpt-oss.rope.scaling.factor' (rope.scaling.type is yarn)")
