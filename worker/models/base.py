"""What every model adapter shares: the adapter interface, metadata readers, and weight loading through an
explicit GGUF-name table (unknown, missing or duplicate names fail loudly)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import gguf.quants
import jax
import numpy as np

from worker.errors import ErrorCode, WorkerError
from worker.gguf import GGUFFile, TensorInfo
from worker.kv_cache import KVCache
from worker.quant import QuantArray, quant_array

Put = Callable[[np.ndarray], jax.Array]


class Adapter(Protocol):
    """One per architecture family. `cfg` is a frozen, hashable dataclass: passed to jit as static."""

    architectures: tuple[str, ...]

    def config(self, gf: GGUFFile) -> Any: ...

    def weight_table(self, gf: GGUFFile, cfg: Any) -> dict[str, tuple[tuple, bool]]:
        """GGUF tensor name -> (path in the weights pytree, required)."""
        ...

    def forward(
        self, weights: Any, cfg: Any, tokens: jax.Array, positions: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """tokens, positions [B, T] -> final hidden states [B, T, D] (before the output norm) and the cache."""
        ...

    def logits(self, weights: Any, cfg: Any, hidden: jax.Array) -> jax.Array:
        """Output norm + projection: [B, T, D] -> [B, T, vocab] float32."""
        ...


@dataclass(frozen=True)
class CacheSpec:
    n_layers: int
    n_kv_heads: int
    head_dim: int


def load_error(gf: GGUFFile, reason: str) -> WorkerError:
    return WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"{gf.path}: {reason}")


def meta(gf: GGUFFile, suffix: str, default: Any = ..., cast: Callable = lambda v: v) -> Any:
    """`<arch>.<suffix>` from the metadata; a missing key with no default is a load error naming the key."""
    key = f"{gf.architecture}.{suffix}"
    if key in gf.metadata:
        return cast(gf.metadata[key])
    if default is ...:
        raise load_error(gf, f"missing required metadata key {key!r}")
    return default


def to_weight(t: TensorInfo, put: Put, matrix: bool) -> QuantArray | jax.Array:
    """Matrices stay in their stored format (QuantArray); vectors (norms, biases, sinks) become float32."""
    if matrix:
        return quant_array(t.data, t.qtype, t.shape, put=put)
    return put(np.asarray(gguf.quants.dequantize(t.data, t.qtype), np.float32).reshape(t.shape))


def load_weights(
    gf: GGUFFile, table: dict[str, tuple[tuple, bool]], put: Put, on_tensor: Callable[[int], None] | None = None
) -> dict:
    """Build the nested weights dict from `table`; path elements are dict keys or list indices."""
    unknown = [n for n in gf.tensors if n not in table]
    if unknown:
        raise load_error(gf, f"unexpected tensor(s) for {gf.architecture}: {', '.join(unknown[:5])}")
    missing = [n for n, (_, required) in table.items() if required and n not in gf.tensors]
    if missing:
        raise load_error(gf, f"missing tensor(s) for {gf.architecture}: {', '.join(missing[:5])}")
    root: dict = {}
    for name, t in gf.tensors.items():
        path, _ = table[name]
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = to_weight(t, put, matrix=len(t.shape) >= 2)
        if on_tensor is not None:
            on_tensor(t.nbytes)
    return _lists(root)


def _lists(node):
    """{0: a, 1: b} -> [a, b] (per-layer dicts become lists so the pytree has a fixed order)."""
    if isinstance(node, dict):
        if node and all(isinstance(k, int) for k in node):
            return [_lists(node[i]) for i in range(len(node))]
        return {k: _lists(v) for k, v in node.items()}
    return node


def check_shape(gf: GGUFFile, name: str, expected: tuple[int, ...]) -> None:
    t = gf.tensors.get(name)
    if t is not None and t.shape != expected:
        raise load_error(gf, f"tensor {name!r} has shape {t.shape}, expected {expected} from the metadata")
