"""The `inspect` report of a GGUF file: what a user wants to know about a new file before serving it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from worker.gguf import open_gguf
from worker.models import adapter_for
from worker.models.base import check_names
from worker.quant import quant_kind


def inspect_model(path: str) -> dict[str, Any]:
    """Validate the file as loading does, short of placing the weights (raises WorkerError MODEL_LOAD_FAILED),
    and summarise it: the architecture parameters (hparams), the weight table and its tensor shapes."""
    gf = open_gguf(path)
    adapter = adapter_for(gf.architecture)
    check_names(gf, adapter.weight_table(gf, adapter.config(gf)))
    types = Counter(t.qtype.name for t in gf.tensors.values())
    type_bytes: Counter[str] = Counter()
    for t in gf.tensors.values():
        type_bytes[t.qtype.name] += t.nbytes
    tok_model = gf.get("tokenizer.ggml.model")
    return {
        "path": str(gf.path),
        "valid": True,
        "gguf_version": gf.version,
        "architecture": gf.architecture,
        "name": gf.get("general.name"),
        "quant_kind": quant_kind(gf.get("general.file_type"), (t.qtype for t in gf.tensors.values())),
        "context_length": gf.arch_key("context_length"),
        "block_count": gf.arch_key("block_count"),
        "embedding_length": gf.arch_key("embedding_length"),
        "expert_count": gf.arch_key("expert_count"),
        "parameters": gf.n_params,
        "tensor_count": len(gf.tensors),
        "tensor_types": dict(types.most_common()),
        "tensor_type_bytes": dict(type_bytes.most_common()),
        "tensor_bytes": gf.tensor_bytes,
        "file_bytes": gf.path.stat().st_size,
        "tokenizer_kind": "gguf-bpe" if tok_model else None,
        "tokenizer_model": tok_model,
        "vocab_size": len(gf.metadata["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in gf.metadata else None,
    }


def render(report: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {n}" for k, n in v.items())
        if isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
            return f"{v:,}"
        return str(v)

    width = max(len(k) for k in report)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in report.items() if v is not None)
