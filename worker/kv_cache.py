"""The KV cache: static shape [L, B, S, K, D] per k and v, slot j holding position j of sequence b.

Fixed capacity so the compiled steps never change shape; donated to each step so XLA updates it in place.
Writes go through a scatter with mode="drop": a padded prompt position is given slot index S (out of range)
and its write is dropped instead of clamped onto a real slot.

Attention reads only the first `active` slots (a static bucket >= the highest position of the step, chosen by the
runner): a decode step at position 200 of a 32k-slot cache then reads 256 slots, not 32k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

# float32 on the CPU (exact math against the float64 oracles), float16 on the GPU (the spec's KV cache).
DTYPES = {"cpu": jnp.float32, "gpu": jnp.float16}


def dtype_for(device_kind: str) -> Any:
    return DTYPES["cpu" if device_kind == "cpu" else "gpu"]


def bytes_per_slot(cfg: Any, dtype: Any) -> int:
    """Bytes one token slot takes: a key and a value per layer and kv head."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, D]
    v: jax.Array  # [L, B, S, K, D]
    active: int | None = field(default=None, metadata={"static": True})  # slots attention reads; None = all

    def layer(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """k, v [B, active, K, D] of one layer."""
        n = self.active or self.k.shape[2]
        return self.k[layer, :, :n], self.v[layer, :, :n]

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def init_cache(
    n_layers: int, batch: int, slots: int, n_kv_heads: int, head_dim: int, dtype=jnp.float32, device=None
) -> KVCache:
    shape = (n_layers, batch, slots, n_kv_heads, head_dim)
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    zeros = jax.jit(lambda: (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)), out_shardings=(sharding, sharding))
    return KVCache(*zeros())


def write_layer(cache: KVCache, layer: int, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
    """Store k, v [B, T, K, D] of `layer` at slots `positions` [B, T]."""
    b = jnp.arange(k.shape[0])[:, None]
    new_k = cache.k.at[layer, b, positions].set(k.astype(cache.k.dtype), mode="drop")
    new_v = cache.v.at[layer, b, positions].set(v.astype(cache.v.dtype), mode="drop")
    return KVCache(new_k, new_v, cache.active)
