"""MXFP4 numerical micro-goldens (M0-W-1822): dequant -> matmul of random MXFP4 blocks (plain and per
expert), and a small attention with sinks and a sliding window on MXFP4 projections, against float64 numpy
references written here from the format's definition (OCP MX: E8M0 block scale, E2M1 elements; ggml's block
layout), within 1% relative."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from worker import ops
from worker.quant import quant_array

BLOCK = 32
BLOCK_BYTES = 17  # 1 byte E8M0 exponent, then 16 bytes of E2M1 nibbles
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # code & 7 -> magnitude; bit 3 is the sign
REL = 1e-2


def random_mxfp4(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Raw GGUF MXFP4 bytes for a tensor of `shape` (last axis blocked): uint8 [..., K/32 * 17]."""
    *lead, k = shape
    blocks = rng.integers(0, 256, size=(*lead, k // BLOCK, BLOCK_BYTES), dtype=np.uint8)
    blocks[..., 0] = rng.integers(120, 132, size=blocks.shape[:-1])  # scales 2^-7 .. 2^4
    return blocks.reshape(*lead, -1)


def reference_dequant(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float64 values: byte j of a block's 16 holds element j (low nibble) and element j + 16 (high nibble);
    value = (-1)^sign * E2M1[magnitude] * 2^(exponent - 127)."""
    *lead, k = shape
    blocks = raw.reshape(*lead, k // BLOCK, BLOCK_BYTES)
    scale = np.exp2(blocks[..., 0].astype(np.float64) - 127.0)[..., None]
    qs = blocks[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    values = np.where(codes & 8, -1.0, 1.0) * E2M1[codes & 7]
    return (values * scale).reshape(shape)


def rel(ours, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def test_reference_dequant_agrees_with_gguf():
    """The test's own reference is right: it matches gguf-py's dequantizer (bit-identical to ggml's)."""
    rng = np.random.default_rng(0)
    raw = random_mxfp4(rng, (16, 128))
    theirs = gguf_dequantize(raw, QT.MXFP4).reshape(16, 128)
    np.testing.assert_array_equal(reference_dequant(raw, (16, 128)), theirs)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 64, 256), (7, 96, 512), (32, 128, 1024)])
def test_dequant_matmul(m, n, k):
    rng = np.random.default_rng(m * n + k)
    raw = random_mxfp4(rng, (n, k))
    x = rng.standard_normal((m, k)).astype(np.float32)
    ours = ops.qmatmul(jnp.asarray(x), quant_array(raw, QT.MXFP4, (n, k)))
    ref = x.astype(np.float64) @ reference_dequant(raw, (n, k)).T
    assert rel(ours, ref) < REL


@pytest.mark.parametrize("tokens", [1, 16])  # 1 * k <= E: gather the selected experts; 16 * k > E: walk them
@pytest.mark.parametrize("shared", [True, False])
def test_expert_dequant_matmul(tokens, shared):
    e, top, n, k = 8, 2, 64, 128
    rng = np.random.default_rng(tokens + shared)
    raw = random_mxfp4(rng, (e, n, k))
    experts = quant_array(raw, QT.MXFP4, (e, n, k))
    ids = np.stack([rng.choice(e, top, replace=False) for _ in range(tokens)]).astype(np.int32)
    x = rng.standard_normal((tokens, k) if shared else (tokens, top, k)).astype(np.float32)
    ours = ops.moe_matmul(jnp.asarray(x), experts, jnp.asarray(ids))
    w = reference_dequant(raw, (e, n, k))
    xs = np.broadcast_to(x[:, None], (tokens, top, k)) if shared else x
    ref = np.einsum("mti,mtoi->mto", xs.astype(np.float64), w[ids])
    assert ours.shape == (tokens, top, n)
    assert rel(ours, ref) < REL


def test_decode_dequantizes_only_the_selected_experts():
    """One token's step must not materialise every expert in float32: the decode path gathers planes first."""
    e, top, n, k = 16, 2, 64, 128
    raw = random_mxfp4(np.random.default_rng(3), (e, n, k))
    experts = quant_array(raw, QT.MXFP4, (e, n, k))
    jaxpr = jax.make_jaxpr(ops.moe_matmul)(jnp.zeros((1, k)), experts, jnp.zeros((1, top), jnp.int32))
    biggest = max(v.aval.size for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if v.aval.dtype == jnp.float32)
    assert biggest <= top * n * k


def reference_attention(q, k, v, sinks, scale, window):
    """q [T, H, D], k/v [T, Kh, D] at positions 0..T-1; query head h reads kv head h // (H / Kh). The sink is
    an extra logit per head in the softmax denominator with no value."""
    t, h, _ = q.shape
    group = h // k.shape[1]
    out = np.zeros_like(q)
    for head in range(h):
        kh = head // group
        for i in range(t):
            visible = [j for j in range(t) if j <= i and (window is None or i - j < window)]
            logits = np.array([q[i, head] @ k[j, kh] * scale for j in visible])
            top = max(logits.max(), sinks[head])
            p = np.exp(logits - top)
            p /= p.sum() + np.exp(sinks[head] - top)
            out[i, head] = p @ v[visible, kh]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_attention_with_sinks_on_mxfp4_projections(window):
    """x -> MXFP4 q/k/v projections -> causal GQA attention with sinks (and a window) -> output, all compared
    with float64 numpy from the same raw blocks."""
    t, d, h, kh, hd = 12, 128, 4, 2, 32
    rng = np.random.default_rng(11 if window is None else 12)
    x = rng.standard_normal((t, d)).astype(np.float32)
    rows = {"q": h * hd, "k": kh * hd, "v": kh * hd}
    raws = {name: random_mxfp4(rng, (n, d)) for name, n in rows.items()}
    sinks = rng.standard_normal(h).astype(np.float32)
    scale = 1.0 / np.sqrt(hd)

    def project(name, heads):
        w = quant_array(raws[name], QT.MXFP4, (heads * hd, d))
        return ops.qmatmul(jnp.asarray(x), w).reshape(1, t, heads, hd)

    q, k, v = project("q", h), project("k", kh), project("v", kh)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    ours = ops.attention(q, k, v, positions, float(scale), window, jnp.asarray(sinks))[0]

    x64 = x.astype(np.float64)
    q64, k64, v64 = (
        (x64 @ reference_dequant(raws[name], (heads * hd, d)).T).reshape(t, heads, hd)
        for name, heads in (("q", h), ("k", kh), ("v", kh))
    )
    ref = reference_attention(q64, k64, v64, sinks.astype(np.float64), scale, window)
    assert rel(ours, ref) < REL
