"""Decode attention (T = 1) over the KV cache, flash-decoding: reads only the tiles that hold a visible key, split
over S to fill the GPU; its twin and reference is ops.attention. Design, tiles and measurements: docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.pallas_kernels.tiling import (
    NEG,
    TARGET_PROGRAMS,
    TritonParams,
    key_tile,
    online_softmax_tile,
    padded_dim,
    pow2_at_least,
)

# Values per k (and v) tile: 32 slots at D = 64, 16 at D >= 128; the largest without register spills
# (docs/kernels.md).
TILE_VALUES = 2048
MIN_TILES_PER_SPLIT = 2
MAX_GROUP = 16  # query heads per kv head, unrolled in the kernel
STAT_WIDTH = 16  # m and l are stored broadcast over a short row: a vector store, not a scalar one


def block_s(slots: int, d: int) -> int | None:
    """This kernel's slots per tile: key_tile at TILE_VALUES."""
    return key_tile(slots, d, TILE_VALUES)


def fits(q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> bool:
    """Whether the kernel handles these shapes: one query position, S a multiple of 16, G <= 16, D <= 256."""
    _b, t, h, d = q_shape
    s, kh = k_shape[1], k_shape[2]
    return t == 1 and h % kh == 0 and h // kh <= MAX_GROUP and d <= 256 and block_s(s, d) is not None


def plan_splits(batch: int, kv_heads: int, tiles: int) -> int:
    """Splits of S (dividing `tiles`, at least MIN_TILES_PER_SPLIT tiles each where there are that many) so that
    the grid has about TARGET_PROGRAMS programs."""
    splits = max(1, min(pow2_at_least(-(-TARGET_PROGRAMS // (batch * kv_heads))), tiles // MIN_TILES_PER_SPLIT))
    while tiles % splits:  # only for S not a power of two
        splits -= 1
    return splits


def _kernel(pos_ref, layer_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, g_n, d, dp, bs, tiles_per_split,
            scale, window):  # fmt: skip
    b, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    p, layer = pos_ref[b], layer_ref[0]
    d_ok = jnp.arange(dp) < d if dp != d else None
    # Tiles that hold a visible key: [lo, hi), cut to this split's range.
    first = split * tiles_per_split
    hi = jnp.minimum(p // bs + 1, first + tiles_per_split)
    lo = first if window is None else jnp.maximum(jnp.maximum(p - window + 1, 0) // bs, first)

    def load(ref, index, tile: bool):
        if d_ok is None:
            return plgpu.load(ref.at[index])
        mask = jax.lax.broadcast_in_dim(d_ok, (bs, dp), (1,)) if tile else d_ok
        return plgpu.load(ref.at[index], mask=mask, other=0)

    qs = [load(q_ref, (b, kh, jnp.int32(g), pl.ds(0, dp)), False) for g in range(g_n)]

    def step(tile, carry):
        s0 = tile * bs
        k = load(k_ref, (layer, b, pl.ds(s0, bs), kh, pl.ds(0, dp)), True).astype(jnp.float32)
        v = load(v_ref, (layer, b, pl.ds(s0, bs), kh, pl.ds(0, dp)), True).astype(jnp.float32)
        j = s0 + jnp.arange(bs)
        visible = j <= p
        if window is not None:
            visible &= p - j < window
        return online_softmax_tile(carry, qs, k, v, visible, scale)

    init = tuple((jnp.float32(NEG), jnp.float32(0), jnp.zeros((dp,), jnp.float32)) for _ in range(g_n))
    final = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), step, init)
    for g, (m, l_, acc) in enumerate(final):
        gi = jnp.int32(g)
        acc_ref[b, kh, split, gi, pl.ds(0, dp)] = acc
        m_ref[b, kh, split, gi, pl.ds(0, STAT_WIDTH)] = jnp.full((STAT_WIDTH,), m, jnp.float32)
        l_ref[b, kh, split, gi, pl.ds(0, STAT_WIDTH)] = jnp.full((STAT_WIDTH,), l_, jnp.float32)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    scale: float,
    window: int | None = None,
    sinks: jax.Array | None = None,
    *,
    layer: int | jax.Array | None = None,
    slots: int | None = None,
    interpret: bool = False,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """ops.attention for q [B, 1, H, D] -> float32 [B, 1, H, D]; `splits` overrides plan_splits (tests).

    With `layer`, k_cache and v_cache are the whole cache [L, B, S, K, D] and the kernel reads that layer in place
    (slicing it first would make XLA copy it, every layer and step). `slots`: only the first `slots` slots are
    attended (the cache's active bucket; default all)."""
    if layer is None:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    s = slots or k_cache.shape[2]
    if not fits(q.shape, (k_cache.shape[1], s, *k_cache.shape[3:])) or s > k_cache.shape[2]:
        raise ValueError(f"decode_attention: unsupported shapes q {q.shape}, cache {k_cache.shape}, slots {s}")
    b, _, h, d = q.shape
    kh = k_cache.shape[3]
    g_n, dp, bs = h // kh, padded_dim(d), block_s(s, d)
    tiles = s // bs
    splits = splits or plan_splits(b, kh, tiles)
    if tiles % splits:
        raise ValueError(f"decode_attention: {splits} splits do not divide {tiles} tiles")
    qg = q.reshape(b, kh, g_n, d).astype(jnp.float32)
    pos = q_positions.reshape(b).astype(jnp.int32)
    kernel = functools.partial(
        _kernel, g_n=g_n, d=d, dp=dp, bs=bs, tiles_per_split=tiles // splits, scale=float(scale), window=window
    )
    acc, m, l_ = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, kh, splits, g_n, dp), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, g_n, STAT_WIDTH), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, g_n, STAT_WIDTH), jnp.float32),
        ),
        grid=(b, kh, splits),
        compiler_params=TritonParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(pos, jnp.asarray(layer, jnp.int32).reshape(1), qg, k_cache, v_cache)
    return combine(acc[..., :d], m[..., 0], l_[..., 0], sinks).reshape(b, 1, h, d)


def combine(acc: jax.Array, m: jax.Array, l_: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """Merge the splits' partials acc [B, K, splits, G, D], m and l [B, K, splits, G] (and the sinks [H], each
    a logit with a zero value vector) into the softmax-weighted sum [B, K, G, D]."""
    b, kh, _, g_n, _ = acc.shape
    top = jnp.max(m, axis=2)  # [B, K, G]
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(kh, g_n), top.shape)
        top = jnp.maximum(top, sink)
    w = jnp.exp(m - top[:, :, None])
    denom = jnp.sum(w * l_, axis=2)
    if sinks is not None:
        denom = denom + jnp.exp(sink - top)
    return jnp.sum(w[..., None] * acc, axis=2) / denom[..., None]
