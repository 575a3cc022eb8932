"""The compiled steps: prefill (a prompt chunk into the cache, logits of its last position) and decode (several
greedy/sampled steps per dispatch), both with the KV cache donated so XLA updates it in place.

Prompt lengths are bucketed to powers of two (at least MIN_BUCKET, at most the chunk size) so a compile happens
once per bucket; prompts longer than the chunk size are prefilled chunk by chunk.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from worker.kv_cache import KVCache, init_cache

MIN_BUCKET = 16


def bucket(n: int, chunk: int) -> int:
    return min(chunk, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


class Runner:
    """Owns the compiled entry points of one model on one device."""

    def __init__(self, adapter: ModuleType, cfg: Any, weights: Any, device: jax.Device, slots: int,
                 chunk: int = 512, cache_dtype=jnp.float32):  # fmt: skip
        self.adapter, self.cfg, self.weights, self.device = adapter, cfg, weights, device
        self.slots, self.chunk, self.cache_dtype = slots, min(chunk, slots), cache_dtype
        self._prefill = jax.jit(partial(_prefill, adapter, cfg), donate_argnums=(4,))
        self._decode = jax.jit(partial(_decode, adapter, cfg), static_argnums=(4,), donate_argnums=(3,))
        self._all_logits = jax.jit(partial(_all_logits, adapter, cfg), donate_argnums=(3,))

    def new_cache(self, batch: int = 1) -> KVCache:
        c = self.cfg
        return init_cache(c.n_layers, batch, self.slots, c.n_kv_heads, c.head_dim, self.cache_dtype, self.device)

    def _chunks(self, ids: list[int], start: int = 0):
        """(tokens [1, Tb], positions [1, Tb], n_valid) per chunk; padding gets slot index `slots` (dropped)."""
        for off in range(0, len(ids), self.chunk):
            part = ids[off : off + self.chunk]
            tb = bucket(len(part), self.chunk)
            tokens = np.zeros((1, tb), np.int32)
            tokens[0, : len(part)] = part
            positions = np.full((1, tb), self.slots, np.int32)
            positions[0, : len(part)] = np.arange(start + off, start + off + len(part))
            yield self._put(tokens), self._put(positions), len(part)

    def _put(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(a, self.device)

    def prefill(self, ids: list[int], cache: KVCache, start: int = 0) -> tuple[jax.Array, KVCache]:
        """Feed `ids` at positions start.. ; returns the logits [1, vocab] after the last id."""
        logits = None
        for tokens, positions, n in self._chunks(ids, start):
            logits, cache = self._prefill(self.weights, tokens, positions, self._put(np.int32(n - 1)), cache)
        return logits, cache

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: logits after each prefix (a fresh cache; for tests and scoring)."""
        cache, rows = self.new_cache(), []
        for tokens, positions, n in self._chunks(ids):
            out, cache = self._all_logits(self.weights, tokens, positions, cache)
            rows.append(np.asarray(out[0, :n]))
        return np.concatenate(rows)

    def decode(self, token: jax.Array, position: jax.Array, cache: KVCache, steps: int
               ) -> tuple[jax.Array, KVCache]:  # fmt: skip
        """`steps` greedy steps from `token` [1] at `position` [1]: returns ids [1, steps] (stays on device)."""
        return self._decode(self.weights, token, position, cache, steps)


def _prefill(adapter, cfg, weights, tokens, positions, last, cache):
    hidden, cache = adapter.forward(weights, cfg, tokens, positions, cache)
    h_last = jax.lax.dynamic_slice_in_dim(hidden, last, 1, axis=1)  # [1, 1, D]
    return adapter.logits(weights, cfg, h_last)[:, 0], cache


def _all_logits(adapter, cfg, weights, tokens, positions, cache):
    hidden, cache = adapter.forward(weights, cfg, tokens, positions, cache)
    return adapter.logits(weights, cfg, hidden), cache


def _decode(adapter, cfg, weights, token, position, cache, steps):
    def step(carry, _):
        tok, pos, cache = carry
        hidden, cache = adapter.forward(weights, cfg, tok[:, None], pos[:, None], cache)
        nxt = jnp.argmax(adapter.logits(weights, cfg, hidden)[:, 0], axis=-1).astype(jnp.int32)
        return (nxt, pos + 1, cache), nxt

    (_, _, cache), ids = jax.lax.scan(step, (token, position, cache), None, length=steps)
    return ids.T, cache
