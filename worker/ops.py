"""The ops layer: one dispatch point per operation the models use (quantized matmul, embedding lookup, norms,
RoPE, attention). These are the plain jax.numpy implementations the CPU path runs and the GPU kernels
(worker/pallas_kernels) are tested against; a backend switch here is where the kernels plug in.

Shapes: B batch, T query positions, S cache slots, H query heads, K kv heads, G = H / K, D head dim.
Everything computes in float32: the oracles are float64 references and the CPU path is meant to match them to
~1e-6 relative, so no bf16 shortcuts here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from worker.quant import QuantArray, dequantize

Weight = QuantArray | jax.Array


def as_f32(w: Weight) -> jax.Array:
    return dequantize(w, jnp.float32) if isinstance(w, QuantArray) else w.astype(jnp.float32)


def qmatmul(x: jax.Array, w: Weight, bias: jax.Array | None = None) -> jax.Array:
    """x [..., In] @ w[Out, In].T (+ bias) -> [..., Out]; w stays quantized in memory, dequantized per call."""
    y = jnp.einsum("...i,oi->...o", x.astype(jnp.float32), as_f32(w), precision=jax.lax.Precision.HIGHEST)
    return y if bias is None else y + bias


def embed(table: Weight, ids: jax.Array) -> jax.Array:
    """Rows `ids` of an [Vocab, D] table: gathers the quantized rows first, so only those are dequantized."""
    if isinstance(table, QuantArray):
        rows = {k: jnp.take(p, ids.reshape(-1), axis=0) for k, p in table.planes.items()}
        q = QuantArray(planes=rows, qtype=table.qtype, shape=(ids.size, *table.shape[1:]))
        return dequantize(q, jnp.float32).reshape(*ids.shape, table.shape[-1])
    return jnp.take(table, ids, axis=0).astype(jnp.float32)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def rope_inv_freq(dim: int, base: float) -> jax.Array:
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, neox: bool, mscale: float = 1.0) -> jax.Array:
    """Rotate x [B, T, N, D] by positions [B, T]. NEOX pairs (i, i + d/2); NORM (llama) pairs (2i, 2i + 1), the
    layout llama.cpp's converter leaves after permuting HF's q/k rows. Only the first 2 * len(inv_freq) dims
    rotate (partial rotary); `mscale` multiplies cos/sin (YaRN's attention factor)."""
    rot = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    cos = (jnp.cos(angles) * mscale)[:, :, None, :]
    sin = (jnp.sin(angles) * mscale)[:, :, None, :]
    xr, xp = x[..., :rot].astype(jnp.float32), x[..., rot:]
    if neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out, xp.astype(jnp.float32)], axis=-1) if rot < x.shape[-1] else out


def attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    scale: float,
    window: int | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Causal GQA attention of q [B, T, H, D] over the cache [B, S, K, D], where slot j holds position j.

    Key j is visible from a query at position p iff j <= p (and p - j < window on sliding layers). Slots past
    the sequence hold stale data from earlier jobs; the causal mask is what keeps them out. `sinks` [H]: a
    learned logit per head that joins the softmax denominator only (gpt-oss).
    """
    b, t, h, d = q.shape
    s, kh = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d).astype(jnp.float32)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", qg, k_cache.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    ) * jnp.float32(scale)
    key_pos = jnp.arange(s)[None, None, :]
    qp = q_positions[:, :, None]
    visible = key_pos <= qp
    if window is not None:
        visible &= qp - key_pos < window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)  # [B, K, G, T, S]
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.reshape(kh, h // kh)[None, :, :, None, None], (*scores.shape[:-1], 1))
        scores = jnp.concatenate([scores, sink.astype(jnp.float32)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    if sinks is not None:
        probs = probs[..., :s]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, h, d)


def default_attn_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
