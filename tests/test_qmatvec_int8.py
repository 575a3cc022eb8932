"""The per-row matvec on an int8 x (worker/pallas_kernels/qmatvec_int8.py, qmatvec's `int8_x`), in interpret mode
against float64: x rounded here by llama.cpp's rule for its q8_1 blocks (written out in numpy below), the weight by
gguf-py's dequantizer. The integer sums are exact, so the kernel must equal that to float32 rounding; and against
the exact x, it must stay within the rounding's own bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_pallas_qmatvec import EDGE_TILES, TOL, _bound, _gpu, _on_device, assert_close, random_weight

from worker.pallas_kernels import qmatvec as qmv
from worker.pallas_kernels import qmatvec_int8 as q8

TYPES = sorted(q8.INT8_TYPES, key=lambda t: t.name)


def llama_cpp_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, scale per 32) as ggml's quantize_q8_1 makes them: d = amax / 127, q = roundf(x / d)."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = blocks * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # roundf: halves away from zero
    return q.astype(np.int8).reshape(x.shape), d[..., 0]


def rounded_x(x: np.ndarray) -> np.ndarray:
    q, d = llama_cpp_q8(x)
    return (q.reshape(*d.shape, 32).astype(np.float64) * d[..., None]).reshape(x.shape)


def test_quantize_x_rounds_as_llama_cpp_does_and_packs_bytes_in_order():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[1, :32] = 0  # a zero block: scale 0, codes 0
    x[2, 32:64] = np.arange(32) - 15.5  # amax 15.5: halves land exactly on steps' midpoints
    words, dx, sums = jax.jit(q8.quantize_x)(x)
    q, d = llama_cpp_q8(x)
    np.testing.assert_array_equal(np.asarray(dx), d)
    np.testing.assert_array_equal(np.asarray(words).view(np.int8).reshape(q.shape), q)  # little-endian bytes
    np.testing.assert_array_equal(np.asarray(sums), q.reshape(3, -1, 16).astype(np.int32).sum(-1))
    assert np.asarray(dx)[1, 0] == 0 and not np.asarray(words)[1, :8].any()


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
def test_dp4a_by_shifts_is_the_integer_sum_of_byte_products(signed):
    """Interpret mode's dp4a: every byte value on both sides (the extremes included), against numpy's int64."""
    rng = np.random.default_rng(2)
    a_bytes = np.concatenate([np.arange(256), rng.integers(0, 256, 1024)]).astype(np.uint8)
    b_bytes = np.concatenate([np.arange(256)[::-1], rng.integers(0, 256, 1024)]).astype(np.uint8)
    a, b = a_bytes.view(np.int32), b_bytes.view(np.int32)
    got = np.asarray(jax.jit(lambda a, b: q8.dp4a(a, b, signed, compiled=False))(a, b))
    av = (a_bytes.view(np.int8) if signed else a_bytes).astype(np.int64).reshape(-1, 4)
    want = (av * b_bytes.view(np.int8).astype(np.int64).reshape(-1, 4)).sum(-1)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_int8_x_matvec_at_tile_edges_equals_float64_on_the_rounded_x(qtype):
    """Every tile edge (a K loop of several steps in several splits, rows and super-blocks masked), 3 rows: the
    float64 product of the rounded x to float32's rounding; the exact x's within the rounding's bound (each x
    value moves at most half a step, amax / 254 of its block); a row's bits the same alone, and with the code planes
    given as words."""
    sb = qmv.FORMATS[qtype].sb
    blocks, tiles = EDGE_TILES[sb]
    n, k = 40, blocks * sb
    w, w64 = random_weight(qtype, (n, k), seed=11)
    x = np.random.default_rng(12).standard_normal((3, k)).astype(np.float32)
    call = jax.jit(lambda x, w: qmv.qmatvec(x, w, interpret=True, tensor_cores=False, int8_x=True, **tiles))
    y = call(x, w)
    xr = rounded_x(x)
    assert_close(y, xr @ w64.T, np.abs(xr) @ np.abs(w64).T, f"{qtype.name} vs float64 on the rounded x", TOL)
    _, d = llama_cpp_q8(x)
    exact = x.astype(np.float64) @ w64.T
    step_bound = np.repeat(d / 2, 32, axis=-1) @ np.abs(w64).T + TOL * (np.abs(x) @ np.abs(w64).T)
    assert (np.abs(np.asarray(y, np.float64) - exact) <= step_bound).all(), "outside the rounding's bound"
    assert np.array_equal(np.asarray(call(x[1:2], w))[0], np.asarray(y)[1]), "row 1 alone: other bits"
    assert np.array_equal(np.asarray(call(x, q8.word_planes(w))), np.asarray(y)), "word planes: other bits"


def test_int8_x_is_refused_where_it_has_no_kernel():
    w, _ = random_weight(QT.Q4_1, (16, 64), seed=0)
    x = jnp.ones((1, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match="int8-x matvec kernel for Q4_1.*Q5_0"):
        qmv.qmatvec(x, w, interpret=True, tensor_cores=False, int8_x=True)
    q4k, _ = random_weight(QT.Q4_K, (16, 256), seed=0)
    with pytest.raises(ValueError, match="per-row kernel"):
        qmv.qmatvec(jnp.ones((1, 256), jnp.float32), q4k, interpret=True, int8_x=True)


@pytest.mark.gpu
@pytest.mark.parametrize(("qtype", "shape"), [(QT.Q4_K, (16384, 3072)), (QT.Q6_K, (3072, 8192)), (QT.Q8_0, (896, 896)),
                                              (QT.Q5_0, (4864, 896)), (QT.Q4_0, (151936, 896))],
                         ids=lambda v: v.name if isinstance(v, QT) else "x".join(map(str, v)))  # fmt: skip
def test_int8_x_compiled_on_real_shapes(qtype, shape):
    """Compiled (PTX dp4a): the same integer sums as interpret mode, so within float32's rounding of the float64
    product on the x the card rounded (its quantize_x: llama.cpp's codes, but where the card's float32 division
    lands a value on the other side of a half step); a row's bits the same alone as among 3, with bytes or words."""
    _gpu()
    w = _on_device(qtype, shape, seed=6)
    x = jax.random.normal(jax.random.key(7), (3, shape[1]), jnp.float32)
    call = jax.jit(lambda x, w: qmv.qmatvec(x, w, tensor_cores=False, int8_x=True))
    y = call(x, w)
    words, dx, _ = jax.jit(q8.quantize_x)(x)
    codes = np.asarray(words).view(np.int8).reshape(x.shape)
    want, _ = llama_cpp_q8(np.asarray(x))
    moved = np.abs(codes.astype(np.int32) - want)
    assert moved.max() <= 1 and moved.sum() <= 8, "the card's int8 x is not llama.cpp's"
    xr = jnp.asarray(codes.reshape(*dx.shape, 32) * np.asarray(dx)[..., None]).reshape(x.shape)
    ref = jax.jit(qmv.qmatvec_twin)(xr, w)
    assert_close(y, np.asarray(ref, np.float64), _bound(xr, w) + 1e-30, f"{qtype.name} {shape} int8_x")
    assert np.array_equal(np.asarray(call(x[1:2], w))[0], np.asarray(y)[1]), "row 1 alone: other bits"
    assert np.array_equal(np.asarray(call(x, q8.word_planes(w))), np.asarray(y)), "word planes: other bits"
