"""worker/pallas_kernels/decode_attention.py: the flash-decoding kernel against a float64 numpy reference (an
independent implementation of the masking rules) and against its twin, ops.attention on the CPU backend. On the
CPU in Pallas interpret mode on small shapes (GQA groups 1..8, windows, sinks, positions at both ends of the cache,
several splits, a head dim that is not a power of two); `gpu`-marked variants compile it with Triton on real-model
shapes with a float16 cache up to 32k slots (`just test-gpu tests/test_pallas_attention.py`)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worker import ops
from worker.pallas_kernels import decode_attention as da


def reference(q, k, v, positions, scale, window, sinks) -> np.ndarray:
    """float64, one query head at a time with explicit visible-key lists."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b_n, _, h, d = q.shape
    g_n = h // k.shape[2]
    out = np.zeros((b_n, 1, h, d))
    for b in range(b_n):
        p = int(positions[b, 0])
        keys = [j for j in range(k.shape[1]) if j <= p and (window is None or p - j < window)]
        for head in range(h):
            kv = head // g_n
            logits = np.array([q[b, 0, head] @ k[b, j, kv] for j in keys]) * scale
            extra = [] if sinks is None else [float(sinks[head])]
            top = max([logits.max(), *extra])
            w = np.exp(logits - top)
            denom = w.sum() + sum(np.exp(e - top) for e in extra)
            out[b, 0, head] = (w[:, None] * v[b, keys, kv]).sum(0) / denom
    return out


def inputs(b, h, kh, d, s, positions, sinks, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, 1, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, kh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, kh, d), jnp.float32).astype(dtype)
    sink = jax.random.normal(keys[3], (h,), jnp.float32) * 2 if sinks else None
    return q, k, v, jnp.asarray(positions, jnp.int32).reshape(b, 1), sink


# (batch, heads, kv heads, head dim, slots, positions, window, sinks, splits)
CPU_CASES = [
    (1, 2, 2, 32, 64, [0], None, False, None),  # G = 1, the first position: one visible key
    (2, 4, 2, 64, 128, [63, 127], None, True, 2),  # G = 2, mid and last slot, sinks
    (2, 8, 2, 32, 256, [5, 200], 40, False, 4),  # G = 4, window inside one split and across splits
    (1, 8, 1, 16, 256, [255], 16, True, 4),  # G = 8, gpt-oss-like: window, sinks, the last slot, one tile a split
    (2, 8, 1, 96, 128, [1, 100], None, True, None),  # D = 96 (phi3): padded to 128 with masked loads
    (1, 7, 1, 64, 96, [90], 50, False, None),  # G = 7 (qwen2.5), S not a power of two: 32-slot tiles
]


@pytest.mark.parametrize(("b", "h", "kh", "d", "s", "positions", "window", "sinks", "splits"), CPU_CASES)
def test_kernel_matches_reference_and_twin(b, h, kh, d, s, positions, window, sinks, splits):
    q, k, v, pos, sink = inputs(b, h, kh, d, s, positions, sinks)
    scale = d**-0.5
    y = da.decode_attention(q, k, v, pos, scale, window, sink, interpret=True, splits=splits)
    assert y.shape == (b, 1, h, d) and y.dtype == jnp.float32
    ref = reference(q, k, v, np.asarray(pos), scale, window, None if sink is None else np.asarray(sink))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)
    twin = ops.attention(q, k, v, pos, scale, window, sink)
    np.testing.assert_allclose(y, twin, rtol=1e-5, atol=1e-6)


def test_only_visible_keys_count():
    """Slots past p or before the window hold data of earlier jobs. Tiles wholly outside [p - window, p] are never
    loaded (NaN there would leak), and huge values in the partly visible tile are masked out."""
    q, k, v, pos, _ = inputs(1, 4, 1, 32, 256, [150], False)
    slot = jnp.arange(256)[None, :, None, None]
    hidden = (slot > 150) | (slot < 150 - 20 + 1)
    garbage = jnp.where((slot >= 128) & (slot < 192), 1e30, jnp.nan)  # 64-slot tiles: only tile 2 is visited
    kp, vp = jnp.where(hidden, garbage, k), jnp.where(hidden, garbage, v)
    y = da.decode_attention(q, kp, vp, pos, 0.2, 20, None, interpret=True, splits=2)
    np.testing.assert_allclose(y, ops.attention(q, k, v, pos, 0.2, 20), rtol=1e-5, atol=1e-6)


def test_a_layer_of_the_whole_cache_read_in_place():
    """layer=l over the whole [L, B, S, K, D] cache, attending its first `slots` slots, equals the kernel on that
    layer's slice; the other layers and the slots past `slots` are NaN, so a read of them would show."""
    q, k, v, pos, sink = inputs(2, 4, 2, 32, 128, [40, 127], True)
    nan = jnp.full((3, 2, 256, 2, 32), jnp.nan, jnp.float32)
    kc, vc = nan.at[1, :, :128].set(k), nan.at[1, :, :128].set(v)
    y = da.decode_attention(q, kc, vc, pos, 0.2, 64, sink, layer=jnp.int32(1), slots=128, interpret=True, splits=2)
    np.testing.assert_allclose(y, ops.attention(q, k, v, pos, 0.2, 64, sink), rtol=1e-5, atol=1e-6)


def test_shapes_the_kernel_takes():
    assert da.fits((1, 1, 14, 64), (1, 256, 2, 64))
    assert not da.fits((1, 2, 14, 64), (1, 256, 2, 64))  # prefill
    assert not da.fits((1, 1, 34, 64), (1, 256, 2, 64))  # G = 17
    assert not da.fits((1, 1, 2, 512), (1, 256, 2, 512))  # D > 256
    assert not da.fits((1, 1, 2, 64), (1, 100, 2, 64))  # S not a multiple of 16
    assert da.plan_splits(1, 2, 512) == 256 and da.plan_splits(1, 32, 4) == 2 and da.plan_splits(8, 32, 512) == 4
    assert da.plan_splits(32, 4, 20) == 5  # tiles not a power of two: a divisor
    with pytest.raises(ValueError, match="do not divide"):
        q, k, v, pos, _ = inputs(1, 2, 1, 16, 64, [3], False)
        da.decode_attention(q, k, v, pos, 1.0, interpret=True, splits=3)


def test_ops_sends_decode_to_the_paged_kernel_not_this_one():
    """The models decode through ops.paged_attention (the paged kernel; its twin on the CPU); ops.attention, what
    prefill runs, never routes to this dense kernel (kept as bench/paged_attention.py's comparison)."""
    from worker.kv_cache import KVCache

    q, k, v, pos, sink = inputs(1, 4, 2, 32, 64, [20], True)
    cache = KVCache(k.reshape(1, 4, 16, 2, 32), v.reshape(1, 4, 16, 2, 32))  # 4 pages of 16: the 64 slots in order
    table = jnp.arange(4, dtype=jnp.int32)[None]

    def kernels(fn) -> list[str]:
        jaxpr = str(jax.make_jaxpr(fn)(q))
        return [n for n in ("name=decode_attention", "name=paged_decode_attention") if n in jaxpr]

    assert kernels(lambda q: ops.attention(q, k, v, pos, 0.3, 8, sink, backend="interpret")) == []
    on = partial(ops.paged_attention, backend="interpret")
    assert kernels(lambda q: on(q, cache, 0, table, pos, 0.3, 8, sink)) == ["name=paged_decode_attention"]
    assert kernels(lambda q: ops.paged_attention(q, cache, 0, table, pos, 0.3, 8, sink)) == []
    y = on(q, cache, 0, table, pos, 0.3, 8, sink)
    np.testing.assert_allclose(y, ops.attention(q, k, v, pos, 0.3, 8, sink), rtol=1e-5, atol=1e-6)


# Real-model attention shapes: (name, heads, kv heads, head dim, window, sinks).
GPU_MODELS = [
    ("qwen2.5", 14, 2, 64, None, False),
    ("gemma3", 4, 1, 256, 512, False),
    ("gpt-oss", 64, 8, 64, 128, True),
    ("phi3", 32, 32, 96, None, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("s", [256, 4096, 32768])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize(("name", "h", "kh", "d", "window", "sinks"), GPU_MODELS, ids=[m[0] for m in GPU_MODELS])
def test_kernel_compiled_on_real_shapes(name, h, kh, d, window, sinks, b, s):
    if jax.default_backend() != "gpu":
        pytest.skip("no GPU visible to JAX")
    positions = [s - 1, s // 3][:b]
    q, k, v, pos, sink = inputs(b, h, kh, d, s, positions, sinks, dtype=jnp.float16, seed=s)
    scale = d**-0.5
    f = jax.jit(da.decode_attention, static_argnames=("scale", "window"))
    y = f(q, k, v, pos, scale=scale, window=window, sinks=sink)
    twin = jax.jit(ops.attention, static_argnames=("scale", "window"))(q, k, v, pos, scale=scale, window=window,
                                                                      sinks=sink)  # fmt: skip
    np.testing.assert_allclose(np.asarray(y), np.asarray(twin), rtol=1e-4, atol=1e-5, err_msg=f"{name} S={s}")
