"""The KV cache: a pool of fixed-size pages shared by every sequence, and a page table per sequence.

Each of k and v is [L, P, page_size, K, D]: page p holds page_size consecutive positions of one sequence. Row b of
a page table [B, n] names the physical page of each of the sequence's logical pages, so position j of row b lives
at (table[b, j // page_size], j % page_size). Physical page 0 is the null page: never given to a sequence, it is
what unused table entries point at, so the writes of padding positions and of rows without a job land there
(harmless garbage that no visible key ever reads) and no index is ever out of bounds. The pool has a static shape
(the compiled steps never change shape) and is donated to each step, so XLA updates it in place.

Which pages a sequence holds is decided on the host (worker/scheduler.py); this module owns the layout, the
dtype and the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# float32 on the CPU (exact math against the float64 oracles), float16 on the GPU (the spec's KV cache).
DTYPES = {"cpu": jnp.float32, "gpu": jnp.float16}
PAGE_SIZE = 16  # positions per page: vLLM's default; small enough that a short sequence wastes little
NULL_PAGE = 0


def dtype_for(device_kind: str) -> Any:
    return DTYPES["cpu" if device_kind == "cpu" else "gpu"]


def bytes_per_slot(cfg: Any, dtype: Any) -> int:
    """Bytes one token position takes: a key and a value per layer and kv head."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def pages_for(positions: int, page_size: int = PAGE_SIZE) -> int:
    return -(-positions // page_size)


def table_row(pages: list[int], width: int) -> np.ndarray:
    """A sequence's page table as `width` entries (a table bucket): its pages in logical order, then the null page;
    pages past the width are cut (no position the row covers reaches them)."""
    row = np.full(width, NULL_PAGE, np.int32)
    n = min(len(pages), width)
    row[:n] = pages[:n]
    return row


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    k: jax.Array  # [L, P, page_size, K, D]
    v: jax.Array  # [L, P, page_size, K, D]

    @property
    def pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def init_cache(
    n_layers: int, pages: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32, device=None,
    page_size: int = PAGE_SIZE, sharding: jax.sharding.Sharding | None = None,
) -> KVCache:  # fmt: skip
    """A zeroed pool (zeros, not uninitialised memory: a masked key's weight is 0 and 0 * NaN would be NaN).
    `sharding` (tensor parallelism: sharding.cache_sharding) replaces the one `device`."""
    shape = (n_layers, pages, page_size, n_kv_heads, head_dim)
    sharding = sharding or jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    zeros = jax.jit(lambda: (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), out_shardings=(sharding, sharding))
    return KVCache(*zeros())


def slots_of(cache: KVCache, table: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(physical page, offset) of positions [B, T] of the rows of `table` [B, n]; a position past the table (a
    padding position) maps to the null page."""
    ps = cache.page_size
    page = jnp.take_along_axis(table, positions // ps, axis=1, mode="fill", fill_value=NULL_PAGE)
    return page, positions % ps


def write_layer(cache: KVCache, layer: int, k: jax.Array, v: jax.Array, table: jax.Array, positions: jax.Array
                ) -> KVCache:  # fmt: skip
    """Store k, v [B, T, K, D] of `layer` at positions [B, T] of the rows of `table`."""
    page, offset = slots_of(cache, table, positions)
    new_k = cache.k.at[layer, page, offset].set(k.astype(cache.k.dtype))
    new_v = cache.v.at[layer, page, offset].set(v.astype(cache.v.dtype))
    return KVCache(new_k, new_v)


def gather_layer(cache: KVCache, layer: int, table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k, v [B, n * page_size, K, D] of `layer`: the rows' pages in logical order (slot j = position j)."""
    b, n = table.shape
    k, v = cache.k[layer][table], cache.v[layer][table]  # [B, n, page_size, K, D]
    shape = (b, n * cache.page_size, *cache.k.shape[3:])
    return k.reshape(shape), v.reshape(shape)
