"""worker/pallas_kernels/prefill_attention.py: the flash-attention kernel for prefill against a float64 numpy
reference (an independent implementation of the masking rules) and against its twin, ops.attention on the CPU
backend. On the CPU in Pallas interpret mode on small shapes (GQA groups 1..8, windows, sinks, chunks that start
mid-cache, padded rows, head dims that are not a power of two, row counts that are not a multiple of the tile),
the tiny gemma3 and gpt-oss oracle models prefilled through it, and the four real-model shapes at 1024 slots);
`gpu`-marked variants compile it with Triton on the real-model shapes with a float16 cache up to 32k slots
(`just test-gpu tests/test_pallas_prefill_attention.py`)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_oracles import check_logits, manifest

import worker
from worker import ops
from worker.pallas_kernels import prefill_attention as pa


def reference(q, k, v, positions, scale, window, sinks) -> np.ndarray:
    """float64, one query row at a time with an explicit list of visible keys."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b_n, t_n, h, d = q.shape
    g_n = h // k.shape[2]
    out = np.zeros((b_n, t_n, h, d))
    for b in range(b_n):
        for t in range(t_n):
            p = int(positions[b, t])
            keys = [j for j in range(k.shape[1]) if j <= p and (window is None or p - j < window)]
            for head in range(h):
                kv = head // g_n
                logits = k[b, keys, kv] @ q[b, t, head] * scale
                extra = [] if sinks is None else [float(sinks[head])]
                top = max([*logits, *extra])
                w = np.exp(logits - top)
                out[b, t, head] = w @ v[b, keys, kv] / (w.sum() + sum(np.exp(e - top) for e in extra))
    return out


def inputs(b, t, h, kh, d, s, starts, sinks, dtype=jnp.float32, seed=0):
    """Random q, k, v, sinks and positions starts[b] .. starts[b] + t - 1 (a prompt chunk)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32)
    k = jax.random.normal(keys[1], (b, s, kh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, kh, d), jnp.float32).astype(dtype)
    sink = jax.random.normal(keys[3], (h,), jnp.float32) * 2 if sinks else None
    pos = jnp.asarray(np.asarray(starts)[:, None] + np.arange(t)[None, :], jnp.int32)
    return q, k, v, pos, sink


def kernel(q, k, v, pos, scale, window, sink, interpret=True, **tiles) -> jax.Array:
    """The kernel under jit (interpret mode then runs as one XLA program: seconds faster than eagerly)."""
    f = jax.jit(pa.prefill_attention, static_argnames=("scale", "window", "interpret", *tiles))
    return f(q, k, v, pos, scale=scale, window=window, sinks=sink, interpret=interpret, **tiles)


def twin(q, k, v, pos, scale, window, sink) -> jax.Array:
    """ops.attention on the CPU backend (jitted: one compile, not one per operation)."""
    return jax.jit(ops.attention, static_argnames=("scale", "window"))(q, k, v, pos, scale=scale, window=window,
                                                                      sinks=sink)  # fmt: skip


def check(q, k, v, pos, scale, window, sink, **tiles) -> jax.Array:
    """The kernel (interpret mode) against the float64 reference and the twin; returns its output."""
    y = kernel(q, k, v, pos, scale, window, sink, **tiles)
    assert y.shape == q.shape and y.dtype == jnp.float32
    ref = reference(q, k, v, np.asarray(pos), scale, window, None if sink is None else np.asarray(sink))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, twin(q, k, v, pos, scale, window, sink), rtol=1e-5, atol=1e-6)
    return y


# (batch, T, heads, kv heads, head dim, slots, chunk starts, window, sinks, tiles)
CPU_CASES = [
    (1, 16, 2, 2, 32, 64, [0], None, False, {}),  # G = 1 from position 0: row 0 sees one key
    (2, 32, 4, 2, 64, 128, [40, 96], None, True, {"block_m": 16}),  # G = 2, chunks mid-cache and to the end, sinks
    (1, 32, 8, 1, 16, 256, [200], 20, True, {"block_k": 16}),  # G = 8 (gpt-oss): window across key tiles, sinks
    (2, 16, 8, 2, 32, 128, [3, 60], 8, False, {"block_m": 32}),  # G = 4: window shorter than the chunk
    (1, 16, 4, 4, 96, 64, [10], None, False, {}),  # D = 96 (phi3): padded to 128 with masked loads
    (1, 16, 7, 1, 64, 128, [30], None, False, {}),  # G = 7 (qwen2.5): 112 rows padded to the 128 of two tiles
    (1, 24, 4, 2, 32, 64, [5], 12, False, {"block_m": 32}),  # T = 24: rows not a multiple of the tile
]


@pytest.mark.parametrize(("b", "t", "h", "kh", "d", "s", "starts", "window", "sinks", "tiles"), CPU_CASES)
def test_kernel_matches_reference_and_twin(b, t, h, kh, d, s, starts, window, sinks, tiles):
    q, k, v, pos, sink = inputs(b, t, h, kh, d, s, starts, sinks)
    check(q, k, v, pos, d**-0.5, window, sink, **tiles)


def test_padded_rows_are_finite():
    """A chunk's padding rows have position `slots` of the whole cache, past the active slots the kernel sees:
    without a window they see every key (as the twin), on a sliding layer none at all (0, where the twin's
    softmax is 0/0). The real rows are unaffected."""
    q, k, v, pos, sink = inputs(1, 32, 4, 2, 32, 64, [20], True)
    pos = pos.at[0, 20:].set(256)
    check(q, k, v, pos, 0.2, None, sink)
    y = kernel(q, k, v, pos, 0.2, 16, None)
    assert np.isfinite(np.asarray(y)).all() and not np.asarray(y[0, 20:]).any()
    ref = reference(q[:, :20], k, v, np.asarray(pos[:, :20]), 0.2, 16, None)
    np.testing.assert_allclose(np.asarray(y[:, :20], np.float64), ref, rtol=1e-5, atol=1e-5)


def test_only_visible_keys_count():
    """Slots past the chunk or before the window hold data of earlier jobs. Key tiles wholly outside every row's
    [p - window + 1, p] are never loaded (NaN there would leak), and huge values in the partly visible tiles are
    masked out."""
    q, k, v, pos, _ = inputs(1, 32, 4, 1, 32, 256, [128], False)
    slot = jnp.arange(256)[None, :, None, None]
    hidden = (slot > 159) | (slot < 128 - 20 + 1)
    garbage = jnp.where((slot >= 96) & (slot < 160), 1e30, jnp.nan)  # 32-slot tiles: only tiles 3 and 4 are read
    kp, vp = jnp.where(hidden, garbage, k), jnp.where(hidden, garbage, v)
    y = kernel(q, kp, vp, pos, 0.2, 20, None, block_k=32)
    np.testing.assert_allclose(y, twin(q, k, v, pos, 0.2, 20, None), rtol=1e-5, atol=1e-6)


def test_shapes_the_kernel_takes():
    assert pa.fits((1, 512, 14, 64), (1, 32768, 2, 64)) and pa.fits((1, 16, 32, 96), (1, 256, 32, 96))
    assert not pa.fits((1, 1, 14, 64), (1, 256, 2, 64))  # decode
    assert not pa.fits((1, 16, 3, 64), (1, 256, 2, 64))  # H not a multiple of K
    assert not pa.fits((1, 16, 2, 512), (1, 256, 2, 512))  # D > 256
    assert not pa.fits((1, 16, 2, 64), (1, 100, 2, 64))  # S not a multiple of 16
    assert pa.plan(32768, 64) == pa.Plan(64, 64, 4, 2) and pa.plan(4096, 256) == pa.Plan(64, 32, 8, 2)
    assert pa.plan(48, 64).block_k == 16  # the largest power of two dividing S
    q, k, v, pos, _ = inputs(1, 16, 2, 1, 16, 64, [0], False)
    with pytest.raises(ValueError, match="does not divide"):
        pa.prefill_attention(q, k[:, :48], v[:, :48], pos, 1.0, interpret=True, block_k=32)
    with pytest.raises(ValueError, match="power of two"):
        pa.prefill_attention(q, k, v, pos, 1.0, interpret=True, block_m=48)
    with pytest.raises(ValueError, match="unsupported shapes"):
        pa.prefill_attention(q[:, :1], k, v, pos[:, :1], 1.0, interpret=True)


def test_ops_dispatch_sends_prefill_to_the_kernel():
    q, k, v, pos, sink = inputs(1, 16, 4, 2, 32, 64, [8], True)

    def kernels(t, backend: str) -> list[str]:
        on = partial(ops.attention, backend=backend)
        jaxpr = str(jax.make_jaxpr(lambda q: on(q, k, v, pos[:, :t], 0.3, 8, sink))(q[:, :t]))
        return [name for name in ("decode_attention", "prefill_attention") if f"name={name}" in jaxpr]

    assert kernels(16, "cpu") == []
    assert kernels(16, "interpret") == ["prefill_attention"] and kernels(1, "interpret") == []  # decode is paged
    y = ops.attention(q, k, v, pos, 0.3, 8, sink, backend="interpret")
    np.testing.assert_allclose(y, ops.attention(q, k, v, pos, 0.3, 8, sink), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gemma3", "gpt-oss"])
def test_oracle_model_prefill_through_the_kernel(oracles, arch, monkeypatch):
    """The tiny model's prefill (48 ids; sliding layers of window 32 (gemma3) and 16 with sinks (gpt-oss)) with
    every T > 1 attention on the kernel (interpret mode, float32 cache) and everything else on the CPU path:
    the HF float64 logits at the CPU gate."""
    calls = []
    twin = ops.attention

    def attention(q, k, v, positions, scale, window=None, sinks=None, *, backend="cpu", mesh=None):
        if q.shape[1] == 1:
            return twin(q, k, v, positions, scale, window, sinks)
        calls.append(window)
        return pa.prefill_attention(q, k, v, positions, scale, window, sinks, interpret=True)

    monkeypatch.setattr(ops, "attention", attention)
    d = oracles / "models" / arch
    ids = manifest(d)["input"]["ids"]
    m = worker.load(d / "model-q8_0.gguf", device="cpu")
    ours = m.logits(ids)
    assert len(calls) == m.cfg.n_layers and any(w is not None for w in calls), calls
    check_logits(ours, np.load(d / "logits-hf-f64-q8_0-dequant.npy"), 1e-3, 0.01)


# Real-model attention shapes: (name, heads, kv heads, head dim, window, sinks).
GPU_MODELS = [
    ("qwen2.5", 14, 2, 64, None, False),
    ("gemma3", 4, 1, 256, 512, False),
    ("gpt-oss", 64, 8, 64, 128, True),
    ("phi3", 32, 32, 96, None, False),
]


@pytest.mark.parametrize(
    ("s", "interpret"), [(1024, True), *(pytest.param(s, False, marks=pytest.mark.gpu) for s in (1024, 4096, 32768))]
)
@pytest.mark.parametrize(("name", "h", "kh", "d", "window", "sinks"), GPU_MODELS, ids=[m[0] for m in GPU_MODELS])
def test_kernel_on_real_shapes(name, h, kh, d, window, sinks, s, interpret):
    """A 512-position chunk at the end of the cache and one a third in, the second with 100 padding rows, float16
    cache: float16 operands against the float32 twin (~3e-4 relative). Compiled by Triton on the GPU (`gpu`
    marked); in interpret mode on the CPU at 1024 slots (the real tiles and row layout, the same roundings)."""
    if not interpret and jax.default_backend() != "gpu":
        pytest.skip("no GPU visible to JAX")
    t = 512
    q, k, v, pos, sink = inputs(2, t, h, kh, d, s, [s - t, s // 3], sinks, dtype=jnp.float16, seed=s)
    pos = pos.at[1, t - 100 :].set(s)
    scale = d**-0.5
    y = np.asarray(kernel(q, k, v, pos, scale, window, sink, interpret=interpret), np.float64)
    ref = np.asarray(twin(q, k, v, pos, scale, window, sink), np.float64)
    assert np.isfinite(y).all()
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-3, name
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=2e-3, err_msg=f"{name} S={s}")
