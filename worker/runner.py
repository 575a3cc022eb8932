"""The compiled steps: prefill (a prompt chunk into the cache, logits of its last position) and decode (several
sampled steps per dispatch, sampling on the device), both with the KV cache donated so XLA updates it in place.

Prompt lengths are bucketed to powers of two (at least MIN_BUCKET, at most the chunk size) so a compile happens
once per bucket; prompts longer than the chunk size are prefilled chunk by chunk.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from worker.kv_cache import KVCache, bytes_per_slot, dtype_for, init_cache
from worker.sampling import ALL_STAGES, SamplingArrays, SamplingPlan, sample, token_logprobs

# (token log-probability, top ids, top log-probabilities) of sampled rows, on the device; None when not asked for
Scores = tuple[jax.Array, jax.Array, jax.Array] | None

MIN_BUCKET = 16
MIN_ACTIVE_SLOTS = 256


def bucket(n: int, chunk: int) -> int:
    return min(chunk, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


def with_active(cache: KVCache, n_positions: int) -> KVCache:
    """The cache with attention limited to a power-of-two bucket covering positions < n_positions (one compile
    per bucket; a short sequence never reads the whole cache)."""
    n = min(cache.slots, max(MIN_ACTIVE_SLOTS, 1 << (max(n_positions, 1) - 1).bit_length()))
    return dataclasses.replace(cache, active=n)


class Runner:
    """Owns the compiled entry points of one model on one device."""

    def __init__(
        self,
        adapter: ModuleType,
        cfg: Any,
        weights: Any,
        device: jax.Device,
        slots: int,
        chunk: int = 512,
    ):
        self.adapter, self.cfg, self.weights, self.device = adapter, cfg, weights, device
        self.slots, self.chunk, self.cache_dtype = slots, min(chunk, slots), dtype_for(device.platform)
        self._prefill = jax.jit(partial(_prefill, adapter, cfg), donate_argnums=(4,))
        self._decode = jax.jit(partial(_decode, adapter, cfg), static_argnums=(8, 9), donate_argnums=(3, 4))
        self._sample = jax.jit(_sample_rows, static_argnums=(5,))
        self._all_logits = jax.jit(partial(_all_logits, adapter, cfg), donate_argnums=(3,))

    def cache_bytes(self, batch: int = 1) -> int:
        return batch * self.slots * bytes_per_slot(self.cfg, self.cache_dtype)

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
            yield self._put(tokens), self._put(positions), len(part), start + off + len(part)

    def _put(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(a, self.device)

    def prefill(self, ids: list[int], cache: KVCache, start: int = 0) -> tuple[jax.Array, KVCache]:
        """Feed `ids` at positions start.. ; returns the logits [1, vocab] after the last id."""
        logits = None
        for tokens, positions, n, end in self._chunks(ids, start):
            cache = with_active(cache, end)
            logits, cache = self._prefill(self.weights, tokens, positions, self._put(np.int32(n - 1)), cache)
        return logits, cache

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: logits after each prefix (a fresh cache; for tests and scoring)."""
        cache, rows = self.new_cache(), []
        for tokens, positions, n, end in self._chunks(ids):
            out, cache = self._all_logits(self.weights, tokens, positions, with_active(cache, end))
            rows.append(np.asarray(out[0, :n]))
        return np.concatenate(rows)

    def seen_mask(self, ids: list[int]) -> jax.Array:
        """[1, vocab] bool: the ids the repetition penalty applies to."""
        mask = np.zeros((1, self.cfg.vocab_size), bool)
        mask[0, [i for i in ids if 0 <= i < self.cfg.vocab_size]] = True
        return self._put(mask)

    def sample(
        self,
        logits: jax.Array,
        sp: SamplingArrays,
        key: jax.Array,
        index: int,
        seen: jax.Array,
        plan: SamplingPlan = ALL_STAGES,
    ) -> tuple[jax.Array, jax.Array, Scores]:
        """The token after a prefill: ids [1], the updated seen mask and its log-probabilities (None unless
        plan.logprobs)."""
        return self._sample(logits, sp, key, self._put(np.int32(index)), seen, plan)

    def decode(
        self,
        token: jax.Array,
        position: int,
        cache: KVCache,
        seen: jax.Array,
        sp: SamplingArrays,
        key: jax.Array,
        index: int,
        steps: int,
        plan: SamplingPlan = ALL_STAGES,
    ) -> tuple[jax.Array, KVCache, jax.Array, Scores]:
        """`steps` steps from `token` [1] (not yet in the cache) at `position`; generated token i uses draw
        index i. Returns ids [1, steps] (left on the device), the cache, the seen mask and the log-probabilities
        (each [1, steps, ...]; None unless plan.logprobs). `plan`: the sampling stages compiled in
        (SamplingParams.plan(); one compiled variant per plan and steps)."""
        pos, idx = self._put(np.asarray([position], np.int32)), self._put(np.int32(index))
        cache = with_active(cache, position + steps)
        return self._decode(self.weights, token, pos, cache, seen, sp, key, idx, steps, plan)

    def compile_first_steps(self, sp: SamplingArrays, key: jax.Array, plan: SamplingPlan, steps: int) -> None:
        """Compile, side by side, what a request with a prompt of at most MIN_BUCKET tokens runs first: the
        prefill, the first sample and a decode dispatch of `steps` steps with `plan`. Each is a whole-model XLA
        compile (~15 s on a 2-core CPU for Gemma 3 270M) that releases the GIL, so threads overlap them. Lowered
        from shapes only: no KV cache or input is allocated."""
        c, on = self.cfg, jax.sharding.SingleDeviceSharding(self.device)

        def spec(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(shape, dtype, sharding=on)

        kv = spec((c.n_layers, 1, self.slots, c.n_kv_heads, c.head_dim), self.cache_dtype)
        cache, n = KVCache(kv, kv), min(MIN_BUCKET, self.chunk)
        ids, index, seen = spec((1, n), jnp.int32), spec((), jnp.int32), spec((1, c.vocab_size), jnp.bool_)
        token, logits = spec((1,), jnp.int32), spec((1, c.vocab_size), jnp.float32)
        jobs = [
            lambda: self._prefill.lower(self.weights, ids, ids, index, with_active(cache, n)),
            lambda: self._sample.lower(logits, sp, key, index, seen, plan),
            lambda: self._decode.lower(
                self.weights, token, token, with_active(cache, n + steps), seen, sp, key, index, steps, plan
            ),
        ]
        with ThreadPoolExecutor(len(jobs)) as pool:
            for done in [pool.submit(lambda job=job: job().compile()) for job in jobs]:
                done.result()


def _prefill(adapter, cfg, weights, tokens, positions, last, cache):
    hidden, cache = adapter.forward(weights, cfg, tokens, positions, cache)
    h_last = jax.lax.dynamic_slice_in_dim(hidden, last, 1, axis=1)  # [1, 1, D]
    return adapter.logits(weights, cfg, h_last)[:, 0], cache


def _all_logits(adapter, cfg, weights, tokens, positions, cache):
    hidden, cache = adapter.forward(weights, cfg, tokens, positions, cache)
    return adapter.logits(weights, cfg, hidden), cache


def _sample_rows(logits, sp, key, index, seen, plan=ALL_STAGES):
    ids = jax.vmap(partial(sample, plan=plan), in_axes=(0, None, None, None, 0))(logits, sp, key, index, seen)
    scores = token_logprobs(logits, ids) if plan.logprobs else None  # static: off costs nothing
    return ids, seen.at[jnp.arange(ids.shape[0]), ids].set(True), scores


def _decode(adapter, cfg, weights, token, position, cache, seen, sp, key, index, steps, plan):
    def step(carry, i):
        tok, pos, cache, seen = carry
        hidden, cache = adapter.forward(weights, cfg, tok[:, None], pos[:, None], cache)
        nxt, seen, scores = _sample_rows(adapter.logits(weights, cfg, hidden)[:, 0], sp, key, index + i, seen, plan)
        return (nxt, pos + 1, cache, seen), (nxt, scores)

    (_, _, cache, seen), (ids, scores) = jax.lax.scan(step, (token, position, cache, seen), jnp.arange(steps))
    return ids.T, cache, seen, jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), scores)
