"""worker/quant.py: re-packed planes dequantize bit for bit like gguf-py's reference dequantizer
(`gguf.quants.dequantize`, bit-identical to ggml's to_float), on random blocks that cover every code and the
whole range of scales, and on every tensor of the llama.cpp-quantized oracle models."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from gguf import GGMLQuantizationType as QT

from worker import quant
from worker.quant import SUPPORTED_TYPES, QuantArray, dequantize, pack, quant_array, quant_kind

QUANTIZED = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.MXFP4, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q2_K, QT.Q3_K,
             QT.IQ4_NL, QT.IQ4_XS)  # fmt: skip
PLAIN = (QT.F32, QT.F16, QT.BF16)

# Byte offsets of the float16 scale fields in one block (ggml-common.h: block_q4_0 ... block_q6_K).
F16_FIELDS = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.IQ4_NL: (0,),
    QT.IQ4_XS: (0,),
}  # fmt: skip

# float16 bit patterns at the edges: +-0, smallest and largest subnormal, smallest normal, 1, largest finite.
F16_EDGES = np.array(
    [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x8400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF],
    np.uint16,
)

# Expected planes: name -> (dtype, values per plane element along K), per the table in worker/quant.py.
PLANES = {
    QT.F32: {"w": (np.float32, 1)},
    QT.F16: {"w": (np.float16, 1)},
    QT.BF16: {"w": (jnp.bfloat16, 1)},
    QT.Q4_0: {"qs": (np.uint8, 2), "d": (np.float16, 32)},
    QT.Q4_1: {"qs": (np.uint8, 2), "d": (np.float16, 32), "m": (np.float16, 32)},
    QT.Q5_0: {"qs": (np.uint8, 2), "qh": (np.uint32, 32), "d": (np.float16, 32)},
    QT.Q5_1: {"qs": (np.uint8, 2), "qh": (np.uint32, 32), "d": (np.float16, 32), "m": (np.float16, 32)},
    QT.Q8_0: {"qs": (np.int8, 1), "d": (np.float16, 32)},
    QT.MXFP4: {"qs": (np.uint8, 2), "e": (np.uint8, 32)},
    QT.Q4_K: {"qs": (np.uint8, 2), "scales": (np.uint8, 32), "mins": (np.uint8, 32),
              "d": (np.float16, 256), "dmin": (np.float16, 256)},
    QT.Q5_K: {"qs": (np.uint8, 2), "qh": (np.uint8, 8), "scales": (np.uint8, 32), "mins": (np.uint8, 32),
              "d": (np.float16, 256), "dmin": (np.float16, 256)},
    QT.Q6_K: {"qs": (np.uint8, 2), "qh": (np.uint8, 4), "scales": (np.int8, 16), "d": (np.float16, 256)},
    QT.Q2_K: {"qs": (np.uint8, 4), "scales": (np.uint8, 16), "d": (np.float16, 256), "dmin": (np.float16, 256)},
    QT.Q3_K: {"qs": (np.uint8, 4), "hmask": (np.uint8, 8), "scales": (np.int8, 16), "d": (np.float16, 256)},
    QT.IQ4_NL: {"qs": (np.uint8, 2), "d": (np.float16, 32)},
    QT.IQ4_XS: {"qs": (np.uint8, 2), "scales": (np.int8, 32), "d": (np.float16, 256)},
}  # fmt: skip

SHAPES = ((7, 512), (3, 5, 1024))  # (rows, cols) and experts-style (E, N, K)

dequantize_jit = jax.jit(dequantize, static_argnames="dtype")


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n float16 bit patterns: the edge values first, then uniform over all finite patterns (any exponent)."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits)  # inf/NaN -> same mantissa, exponent 0
    k = min(n, F16_EDGES.size)
    bits[:k] = F16_EDGES[:k]
    return bits


def mxfp4_exponents(n: int) -> np.ndarray:
    """E8M0 bytes 2..252, each as often as n allows: every exponent whose blocks stay finite (from 253, code 12
    overflows to inf). On CPU, 0 and 1 are left out: XLA flushes their subnormal scales (see worker/quant.py)."""
    low = 2 if jax.default_backend() == "cpu" else 0
    return (np.arange(n) % (253 - low) + low).astype(np.uint8)


def random_raw(qtype: QT, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """GGUF bytes of a random tensor: uniform codes and 6/8-bit sub-scales, scales over their whole range."""
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = math.prod(shape) // block
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        blocks[:, off : off + 2] = rng.permutation(finite_f16_bits(rng, n_blocks)).view(np.uint8).reshape(-1, 2)
    if qtype == QT.MXFP4:
        blocks[:, 0] = rng.permutation(mxfp4_exponents(n_blocks))
    if qtype == QT.F16:
        blocks = finite_f16_bits(rng, n_blocks).view(np.uint8)
    elif qtype == QT.BF16:
        b = blocks.view(np.uint16).reshape(-1)
        b[(b & 0x7F80) == 0x7F80] &= 0x807F  # inf/NaN -> exponent 0 (subnormal or zero)
        b[:6] = [0x0000, 0x8000, 0x0001, 0x807F, 0x7F7F, 0xFF7F]  # zeros, subnormals, largest finite
    elif qtype == QT.F32:
        b = blocks.view(np.uint32).reshape(-1)
        b[(b & 0x7F800000) == 0x7F800000] &= 0x807FFFFF
        b[:4] = [0x00000000, 0x80000000, 0x00000001, 0x7F7FFFFF]
    return blocks.reshape(*shape[:-1], -1)


def reference(raw: np.ndarray, qtype: QT) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow or invalid op would mean the inputs are not inf/NaN-free
        return quants.dequantize(raw, qtype)


def assert_bit_equal(out: jax.Array | np.ndarray, ref: np.ndarray) -> None:
    out = np.asarray(out)
    assert out.dtype == np.float32 and ref.dtype == np.float32
    assert out.shape == ref.shape
    assert not np.isnan(ref).any()
    bad = out.view(np.uint32) != ref.view(np.uint32)
    if bad.any():
        i = tuple(int(x[0]) for x in np.nonzero(bad))
        pytest.fail(f"{bad.sum()} of {bad.size} values differ; first at {i}: {out[i]!r} vs reference {ref[i]!r}")


def test_supported_types_match_the_file_validator():
    from worker.gguf import SUPPORTED_TENSOR_TYPES

    assert SUPPORTED_TYPES == SUPPORTED_TENSOR_TYPES == frozenset(PLANES)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("qtype", QUANTIZED + PLAIN, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype: QT, shape: tuple[int, ...]):
    raw = random_raw(qtype, shape, seed=int(qtype) * 1000 + len(shape))
    ref = reference(raw, qtype)
    q = quant_array(raw, qtype, shape, put=jax.device_put)

    assert isinstance(q, QuantArray) and q.qtype == qtype and q.shape == shape
    expected = {n: (np.dtype(dt), (*shape[:-1], shape[-1] // per)) for n, (dt, per) in PLANES[qtype].items()}
    assert {n: (p.dtype, p.shape) for n, p in q.planes.items()} == expected
    assert q.nbytes <= 1.037 * raw.nbytes  # device memory stays within a few percent of the file (Q3_K: 3.6%)
    assert_bit_equal(dequantize_jit(q), ref.reshape(shape))


@pytest.mark.parametrize("qtype", (QT.Q4_1, QT.Q6_K, QT.BF16), ids=lambda t: t.name)
def test_dequantize_to_bfloat16_rounds_the_exact_values(qtype: QT):
    shape = (4, 256)
    raw = random_raw(qtype, shape, seed=7)
    out = np.asarray(dequantize_jit(quant_array(raw, qtype, shape), dtype=jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out.view(np.uint16), reference(raw, qtype).astype(jnp.bfloat16).view(np.uint16))


def test_dequantize_follows_the_planes_under_vmap_and_scan():
    shape = (3, 4, 256)
    raw = random_raw(QT.Q4_K, shape, seed=11)
    q = quant_array(raw, QT.Q4_K, shape)
    ref = reference(raw, QT.Q4_K)
    assert_bit_equal(jax.jit(jax.vmap(dequantize))(q), ref)
    _, stacked = jax.lax.scan(lambda c, qe: (c, dequantize(qe)), 0, q)
    assert_bit_equal(stacked, ref)


def test_pack_copies_and_accepts_typed_views():
    raw = random_raw(QT.F32, (4, 64), seed=3).view(np.float32)
    planes = pack(raw, QT.F32, (4, 64))
    assert not np.shares_memory(planes["w"], raw)
    np.testing.assert_array_equal(planes["w"], raw)

    f16 = np.arange(128, dtype=np.float16).reshape(2, 64)
    np.testing.assert_array_equal(pack(f16, QT.F16, (2, 64))["w"], f16)

    one_block = random_raw(QT.Q8_0, (1, 32), seed=5)  # a single block slices into contiguous views
    q = pack(one_block, QT.Q8_0, (1, 32))
    assert not any(np.shares_memory(p, one_block) for p in q.values())


def test_pack_rejects_what_it_cannot_hold():
    raw = np.zeros((2, 18), np.uint8)
    with pytest.raises(ValueError, match="needs 36 bytes"):
        pack(raw[:, :17], QT.Q4_0, (2, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        pack(raw, QT.Q4_0, (2, 16, 2))
    with pytest.raises(ValueError, match="unsupported tensor type IQ2_XXS"):
        pack(np.zeros(66, np.uint8), QT.IQ2_XXS, (256,))


def test_quant_array_is_a_pytree_of_its_planes():
    q = quant_array(random_raw(QT.Q5_0, (2, 64), seed=1), QT.Q5_0, (2, 64))
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.qtype == QT.Q5_0 and back.shape == (2, 64)
    assert q.nbytes == 2 * (32 + 2 * 4 + 2 * 2)


@pytest.mark.parametrize(
    "file_type, kind",
    [(0, "F32"), (1, "F16"), (2, "Q4_0"), (3, "Q4_1"), (7, "Q8_0"), (8, "Q5_0"), (9, "Q5_1"), (10, "Q2_K"),
     (11, "Q3_K_S"), (12, "Q3_K_M"), (13, "Q3_K_L"), (14, "Q4_K_S"), (15, "Q4_K_M"), (16, "Q5_K_S"),
     (17, "Q5_K_M"), (18, "Q6_K"), (32, "BF16"), (38, "MXFP4")],
)  # fmt: skip
def test_quant_kind_from_file_type(file_type: int, kind: str):
    assert quant_kind(file_type, [QT.F32]) == kind


def test_quant_kind_falls_back_to_the_dominant_tensor_type():
    by_bytes = {QT.F32: 10_000_000, QT.Q6_K: 300, QT.Q4_K: 900, QT.Q8_0: 200}
    assert quant_kind(None, by_bytes) == "Q4_K"  # quantized types win over larger float tensors
    assert quant_kind(1024, by_bytes) == "Q4_K"  # LLAMA_FTYPE_GUESSED
    assert quant_kind(999, by_bytes) == "Q4_K"  # a value this gguf package does not know
    assert quant_kind(None, [QT.F32, QT.MXFP4, QT.Q8_0, QT.MXFP4]) == "MXFP4"  # one entry per tensor
    assert quant_kind(None, [QT.F32, QT.BF16, QT.BF16]) == "BF16"
    with pytest.raises(ValueError):
        quant_kind(None, [])


def test_real_files_bit_exact_and_named(oracles):
    """Every tensor of every llama.cpp-quantized oracle model, as read by gguf-py and by worker.gguf."""
    from worker.gguf import open_gguf

    files = sorted(oracles.glob("models/*/model-*.gguf"))
    assert len(files) >= 13
    seen: set[QT] = set()
    for path in files:
        reader = GGUFReader(path)
        ours = open_gguf(path)
        file_type = int(reader.fields["general.file_type"].contents())
        expected = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M", "mxfp4_moe": "MXFP4"}[path.stem.removeprefix("model-")]
        assert quant_kind(file_type, [QT(t.tensor_type) for t in reader.tensors]) == expected
        for t in reader.tensors:
            qtype, shape = QT(t.tensor_type), tuple(int(d) for d in reversed(t.shape))
            seen.add(qtype)
            q = quant_array(t.data, qtype, shape)
            assert_bit_equal(dequantize_jit(q), reference(t.data, qtype).reshape(shape))
            from_loader = pack(ours.tensors[t.name].data, qtype, ours.tensors[t.name].shape)
            assert from_loader.keys() == q.planes.keys()
            assert all(np.array_equal(from_loader[n], np.asarray(q.planes[n])) for n in from_loader)
    assert {QT.F32, QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.MXFP4} <= seen


def test_module_docstring_documents_every_format():
    doc = quant.__doc__
    for qtype, planes in PLANES.items():
        assert f"| {qtype.name} " in doc
        for name in planes:
            assert f" {name} " in doc or f" {name}," in doc
