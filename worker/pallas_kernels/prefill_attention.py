"""Prefill attention (T > 1 query positions per sequence) over the KV cache as a Pallas kernel (Triton backend):
flash attention with GQA heads packed into the query tile. Same semantics as worker/ops.py `attention`, which is
its jax.numpy twin and the reference the tests hold it to; `interpret=True` runs it on the CPU.

q [B, T, H, D] with H = K * G (GQA), k/v [B, S, K, D] (float16 on the GPU, any float dtype), positions [B, T]
int32, any order (a prompt chunk: consecutive from any start; padded rows at a position >= S). Key j is visible iff
j <= p (and p - j < window); `sinks` [H] join the softmax denominator only.

How it works. The wrapper lays the queries of one kv head out as rows r = t * G + g (position t, query head g of
the group), so a tile of BLOCK_M rows holds BLOCK_M / G positions of all G heads and every k/v tile loaded serves
them all; rows are padded to a multiple of BLOCK_M (copies of the last row, dropped after). The grid is
(B, K, row tiles). A program loads its q tile [BLOCK_M, D] and the rows' positions, and walks the cache BLOCK_K
slots at a time over only the tiles that hold a key visible to some row: from the tile of min(p) - window + 1 (0
without a window) to the tile of max(p), clamped to S - 1. So a row tile of a chunk at positions 512..1023 reads
keys 0..its last position, never the stale slots past it, and on gpt-oss's window-128 layers 3 or 4 tiles. Per tile:
scores = q k^T and acc += w v as tensor-core dots, the mask applied per element (causal, window), the online
softmax update (running max m, denominator l, accumulator acc) per row. The sinks enter as the initial state (m =
sink, l = 1: a logit whose value vector is zero), which is the twin's softmax over [scores, sink]. A row that sees
no key at all (a padded row at position `slots` of a cache sliced to fewer active slots, on a sliding layer) gives
0, where the twin gives 0/0. D that is not a power of two (phi3's 96) is padded: q in the wrapper, k/v by masked
loads.

Precision: q is scaled and cast to the cache dtype (float16 on the GPU: ~2^-11 relative per element); the scores
and acc accumulate in float32; the softmax (max, exp, sums) is float32; the weights w are cast to the cache
dtype for the w v dot (2^-11 relative). Against the float32 twin that is ~3e-4 relative (Frobenius) on the
output of random inputs; with a float32 cache (the CPU tests) the dots are float32 and the difference is the
order of additions (~1e-6).

Tiles (`plan`): BLOCK_M 64 rows (one wgmma M; 8 positions at G = 8, so the causal skipping stays fine-grained;
qwen2.5's 512-position chunk makes 56 row tiles per kv head: 112 programs at B = 1), BLOCK_K 64 slots at D <=
128 and 32 at D = 256; 4 warps at D <= 64, 8 above; num_stages 2. Checked without a GPU: the Triton modules that
JAX 0.10.2 and 0.11.2 lower (identical) compile with Triton 3.9 for sm_90a (ptxas 13.4 -v) to wgmma with no
spills: qwen2.5 (G 7, D 64) and gpt-oss (G 8, D 64, window, sinks) 127 registers a thread, 40 KiB shared
memory; phi3 (D 96 padded to 128) 168 / 80 KiB; gemma3 (D 256, window) 230 / 96 KiB. Other tilings: gemma3 at 4
warps spills (BLOCK_K 32 or 16), as BLOCK_M 128 at 8 warps does; phi3 at 4 warps 243 registers; num_stages 3
adds 20..40 registers and a third of shared memory.

Backend: JAX 0.11 lowers pallas_call on GPU to Mosaic GPU unless the compiler params are Triton's, so every call
passes them (as worker/pallas_kernels/qmatvec.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.pallas_kernels.decode_attention import _NEG, key_tile, padded_dim
from worker.pallas_kernels.qmatvec import _TritonParams

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
    """Slots per k/v tile (decode_attention.key_tile at this kernel's TILE_VALUES); None if none divides."""
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
        at = ref.at[b, pl.ds(s0, bk), kh, pl.ds(0, dp)]
        return plgpu.load(at) if d_ok is None else plgpu.load(at, mask=d_ok, other=0)

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
        init_m, init_l = jnp.full((bm,), _NEG, jnp.float32), jnp.zeros((bm,), jnp.float32)
    _, l_, acc = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), step, (init_m, init_l, jnp.zeros((bm, dp), jnp.float32)))
    o_ref[b, kh, pl.ds(r0, bm), :] = acc / jnp.where(l_ > 0, l_, 1)[:, None]


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
        compiler_params=_TritonParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=interpret,
        name="prefill_attention",
    )(pos, qr, k_cache, v_cache, *extra)
    return out[:, :, :rows, :d].reshape(b, kh, t, g_n, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
