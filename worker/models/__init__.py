"""The architecture registry: GGUF `general.architecture` -> the adapter module that maps it (one place; gguf.py's
validation and every error message read it). An adapter provides `config(gf)` (a frozen base.ModelConfig: static
under jit), `weight_table(gf, cfg)`, `forward(weights, cfg, tokens,
positions, cache, table) -> (hidden, cache)` (table: the rows' KV page tables) and
`logits(weights, cfg, hidden)`. Adapters import lazily: this module is imported by gguf.py and imports nothing."""

from __future__ import annotations

import importlib
from types import ModuleType

from worker.errors import ErrorCode, WorkerError

ADAPTERS: dict[str, str] = {
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "phi3": "llama",
    "gemma3": "llama",
    "gpt2": "gpt2",
    "gpt-oss": "gpt_oss",
}
ARCHITECTURES = tuple(ADAPTERS)


def adapter_for(arch: str) -> ModuleType:
    if arch not in ADAPTERS:
        raise WorkerError(
            ErrorCode.MODEL_LOAD_FAILED, f"unknown architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    return importlib.import_module(f"worker.models.{ADAPTERS[arch]}")
