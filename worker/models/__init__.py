"""Model adapters by GGUF `general.architecture`. Each adapter module provides:
`config(gf) -> Config` (frozen, hashable: static under jit), `weight_table(gf, cfg)` (GGUF name -> pytree path),
`forward(weights, cfg, tokens, positions, cache) -> (hidden, cache)` and `logits(weights, cfg, hidden)`.
Configs expose n_layers, n_kv_heads, head_dim, vocab_size and context_length for the cache and the engine."""

from __future__ import annotations

from types import ModuleType

from worker.errors import ErrorCode, WorkerError
from worker.gguf import SUPPORTED_ARCHITECTURES
from worker.models import llama

_ADAPTERS: dict[str, ModuleType] = {arch: llama for arch in llama.ARCHITECTURES}


def adapter_for(arch: str) -> ModuleType:
    if arch in ("gpt2", "gpt-oss") and arch not in _ADAPTERS:
        from worker.models import gpt2, gpt_oss

        _ADAPTERS.update({"gpt2": gpt2, "gpt-oss": gpt_oss})
    if arch not in _ADAPTERS:
        raise WorkerError(
            ErrorCode.MODEL_LOAD_FAILED,
            f"unknown architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
    return _ADAPTERS[arch]
