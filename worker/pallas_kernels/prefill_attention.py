"""Prefill attention (T > 1) over the KV cache, flash attention with GQA heads packed into the query tile, so every
k/v tile serves a whole group; its twin is ops.attention. Design, tiles and measurements: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from worker.pallas_kernels.tiling import NEG, TritonParams, kernel_entry, key_tile, masked_load, padded_dim

BLOCK_M = 64  # query rows (positions x heads of a group) per program
MIN_BLOCK = 16  # tl.dot's smallest tile dimension
MAX_D = 256
TILE_VALUES = 8192  # values per k (and v) tile: BLOCK_K 64 at D <= 128, 32 at D = 256


@dataclasses.dataclass(frozen=True)
class Plan:
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


def pick_block_k(slots: int, d: int) -> int | None:
    """Slots per k/v tile (tiling.key_tile at this kernel's TILE_VALUES); None if none divides."""
    return key_tile(slots, d, TILE_VALUES)


def fits(q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> bool:
    """Whether the kernel handles these shapes: more than one query position, H a multiple of K, D <= 256, S a
    multiple of 16."""
    _b, t, h, d = q_shape
    s, kh = k_shape[1], k_shape[2]
    return t > 1 and h % kh == 0 and d <= MAX_D and pick_block_k(s, d) is not None


def plan(slots: int, d: int, block_m: int | None = None, block_k: int | None = None, num_warps: int | None = None,
         num_stages: int = 2) -> Plan:  # fmt: skip
    """The tiling for `slots` cache slots of head dim d; arguments left None get the module docstring's."""
    bm = block_m or BLOCK_M
    bk = block_k or pick_block_k(slots, d)
    num_warps = num_warps or (4 if padded_dim(d) <= 64 else 8)
    for name, v in (("block_m", bm), ("block_k", bk)):
        if v is None or v < MIN_BLOCK or v & (v - 1):
            raise ValueError(f"prefill_attention: {name} must be a power of two >= {MIN_BLOCK}, got {v}")
    if slots % bk:
        raise ValueError(f"prefill_attention: block_k {bk} does not divide the {slots} cache slots")
    return Plan(bm, bk, num_warps, num_stages)


def _kernel(pos_ref, q_ref, k_ref, v_ref, *refs, d, dp, bm, bk, slots, window, sinks: bool):
    sink_ref, o_ref = refs if sinks else (None, *refs)
    b, kh, r0 = pl.program_id(0), pl.program_id(1), pl.program_id(2) * bm
    p = pos_ref[b, pl.ds(r0, bm)]  # [BM]
    # Tiles that hold a key visible to some row: [lo, hi).
    hi = jnp.minimum(jnp.max(p), slots - 1) // bk + 1
    lo = 0 if window is None else jnp.maximum(jnp.min(p) - window + 1, 0) // bk
    d_ok = jax.lax.broadcast_in_dim(jnp.arange(dp) < d, (bk, dp), (1,)) if dp != d else None
    q = q_ref[b, kh, pl.ds(r0, bm), :]  # [BM, Dp], scaled, the cache dtype

    def load(ref, s0):
        return masked_load(ref.at[b, pl.ds(s0, bk), kh, pl.ds(0, dp)], d_ok)

    def step(tile, carry):
        m, l_, acc = carry
        s0 = tile * bk
        k, v = load(k_ref, s0), load(v_ref, s0)  # [BK, Dp]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [BM, BK]
        j = s0 + jnp.arange(bk)
        visible = j[None, :] <= p[:, None]
        if window is not None:
            visible &= p[:, None] - j[None, :] < window
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        w = jnp.exp(s - m_new[:, None])
        pv = jax.lax.dot_general(w.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, l_ * alpha + jnp.sum(w, axis=1), acc * alpha[:, None] + pv

    if sinks:
        init_m, init_l = sink_ref[kh, pl.ds(r0, bm)], jnp.ones((bm,), jnp.float32)
    else:
        init_m, init_l = jnp.full((bm,), NEG, jnp.float32), jnp.zeros((bm,), jnp.float32)
    _, l_, acc = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), step, (init_m, init_l, jnp.zeros((bm, dp), jnp.float32)))
    o_ref[b, kh, pl.ds(r0, bm), :] = acc / jnp.where(l_ > 0, l_, 1)[:, None]


@kernel_entry("scale", "window", "interpret", "block_m", "block_k", "num_warps", "num_stages")
def prefill_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    scale: float,
    window: int | None = None,
    sinks: jax.Array | None = None,
    *,
    interpret: bool = False,
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> jax.Array:
    """ops.attention for q [B, T, H, D] (T > 1) -> float32 [B, T, H, D]; the keywords after `interpret` override
    the tiling (tests, benchmarks)."""
    if not fits(q.shape, k_cache.shape) or k_cache.shape != v_cache.shape:
        raise ValueError(f"prefill_attention: unsupported shapes q {q.shape}, cache {k_cache.shape}")
    b, t, h, d = q.shape
    s, kh = k_cache.shape[1], k_cache.shape[2]
    g_n, dp = h // kh, padded_dim(d)
    p = plan(s, d, block_m, block_k, num_warps, num_stages)
    rows = t * g_n
    pad = -rows % p.block_m
    # [B, K, rows, Dp], row r = t * G + g; padding rows repeat the last row (same keys: no extra tiles).
    qr = (q.astype(jnp.float32) * jnp.float32(scale)).reshape(b, t, kh, g_n, d).transpose(0, 2, 1, 3, 4)
    qr = jnp.pad(qr.reshape(b, kh, rows, d), ((0, 0), (0, 0), (0, pad), (0, dp - d))).astype(k_cache.dtype)
    pos = jnp.pad(jnp.repeat(q_positions.astype(jnp.int32), g_n, axis=1), ((0, 0), (0, pad)), mode="edge")
    extra = []
    if sinks is not None:  # [K, rows]: the sink of row r's head
        extra.append(jnp.pad(jnp.tile(sinks.astype(jnp.float32).reshape(kh, g_n), (1, t)), ((0, 0), (0, pad))))
    kernel = functools.partial(
        _kernel, d=d, dp=dp, bm=p.block_m, bk=p.block_k, slots=s, window=window, sinks=sinks is not None
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, kh, rows + pad, dp), jnp.float32),
        grid=(b, kh, (rows + pad) // p.block_m),
        compiler_params=TritonParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=interpret,
        name="prefill_attention",
    )(pos, qr, k_cache, v_cache, *extra)
    return out[:, :, :rows, :d].reshape(b, kh, t, g_n, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
