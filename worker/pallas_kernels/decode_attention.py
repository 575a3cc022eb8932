"""Decode attention (one query position per sequence) over the KV cache as a Pallas kernel (Triton backend):
flash-decoding. Same semantics as worker/ops.py `attention` at T = 1, which is its jax.numpy twin and the
reference the tests hold it to; `interpret=True` runs it on the CPU.

q [B, 1, H, D] with H = K * G (GQA), k/v [B, S, K, D] (float16 on the GPU, any float dtype), positions [B, 1]
int32. Key j is visible iff j <= p (and p - j < window); `sinks` [H] join the softmax denominator only.

How it works. The grid is (B, K, splits): a program owns one kv head of one sequence (its G query heads) and a
contiguous range of the S slots (its split). It walks that range BLOCK_S slots at a time (32 at D = 64, 16 at D =
256), but only the tiles that hold a visible key: the loop bounds come from the position (and window), so a decode
at position 300 of a 32k-slot cache reads 10 tiles, not 1024. Per tile it loads k and v [BLOCK_S, D] once, and for
each of the G query heads (unrolled; G <= 16) computes the scores by an elementwise product and a sum over D
(float32, no tensor cores: G is 1..8 rows, below tl.dot's 16, and the step is memory-bound anyway), then the online
softmax update (running max m, denominator l, accumulator acc). Each program writes its partial (m, l, acc); a
jax.numpy step merges the splits and the sinks. D that is not a power of two (phi3's 96) is padded to one with
masked loads.

Precision: k/v are read in their stored dtype and cast to float32; every product, exponential and sum is float32;
the difference from the twin is the order of additions (~1e-6 relative).

Backend: JAX 0.11 lowers pallas_call on GPU to Mosaic GPU unless the compiler params are Triton's, so every call
passes them (as worker/pallas_kernels/qmatvec.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.pallas_kernels.qmatvec import SM_COUNT, _TritonParams

TARGET_PROGRAMS = 4 * SM_COUNT
MAX_BLOCK_S = 64  # slots per tile
# Values per k (and v) tile: 32 slots at D = 64, 16 at D >= 128. Checked without a GPU (JAX 0.10.2's Triton
# module compiled by Triton 3.9 for sm_90a, 4 warps): qwen2.5, gemma3, gpt-oss and phi3 shapes use 56-255
# registers a thread with no spills; 4096 (64 slots at D = 64) spilled on gpt-oss's G = 8.
TILE_VALUES = 2048
MIN_TILES_PER_SPLIT = 2
MAX_GROUP = 16  # query heads per kv head, unrolled in the kernel
STAT_WIDTH = 16  # m and l are stored broadcast over a short row: a vector store, not a scalar one
_NEG = -1e30  # the running max before any key: finite, so exp(m - m_new) never sees inf - inf


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def padded_dim(d: int) -> int:
    return max(16, _pow2_at_least(d))


def key_tile(slots: int, d: int, tile_values: int) -> int | None:
    """Slots per k/v tile: the largest power of two <= MAX_BLOCK_S, <= tile_values / padded D (but >= 16) and
    dividing `slots`, at least 16; None if there is none. Shared with worker/pallas_kernels/prefill_attention.py."""
    bs = min(MAX_BLOCK_S, max(16, tile_values // padded_dim(d)))
    while bs >= 16 and slots % bs:
        bs //= 2
    return bs if bs >= 16 else None


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
    splits = max(1, min(_pow2_at_least(-(-TARGET_PROGRAMS // (batch * kv_heads))), tiles // MIN_TILES_PER_SPLIT))
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
        out = []
        for (m, l_, acc), qv in zip(carry, qs, strict=True):
            s = jnp.sum(k * jax.lax.expand_dims(qv, (0,)), axis=1) * jnp.float32(scale)
            s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s))
            alpha = jnp.exp(m - m_new)
            w = jnp.exp(s - m_new)
            acc = acc * alpha + jnp.sum(jax.lax.expand_dims(w, (1,)) * v, axis=0)
            out.append((m_new, l_ * alpha + jnp.sum(w), acc))
        return tuple(out)

    init = tuple((jnp.float32(_NEG), jnp.float32(0), jnp.zeros((dp,), jnp.float32)) for _ in range(g_n))
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
        compiler_params=_TritonParams(num_warps=num_warps, num_stages=num_stages),
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
