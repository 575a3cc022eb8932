"""Quantized weights in device memory: GGUF block formats re-packed into "planes" (`QuantArray`), their exact
dequantization in jax.numpy, and the file's quant kind name (`/health.quant_kind`).

A tensor of logical shape (..., N, K) (numpy order; K is the blocked axis, GGUF's ne0; leading dims such as
experts are kept) is stored as a few arrays, each with the tensor's leading dims (..., N) and one last axis.
`pack` builds them on the host from the file's raw bytes without a float copy; kernels read them with wide,
aligned loads. Memory: each format's planes take at most 3.7% more bytes than its GGUF blocks (Q3_K; Q4_K 2.8%).

Codes keep the file's order, only without the per-block headers in between. A "nibble plane" `qs`
(uint8 [..., N, K/2]) is cut into groups of G values, and byte i of a group holds value i in its low nibble
and value i + G/2 in its high nibble (G = 32 for Q4_0/Q4_1/Q5_0/Q5_1/MXFP4/IQ4_NL/IQ4_XS, 64 for Q4_K/Q5_K, 128 for
Q6_K). A "crumb plane" (Q2_K/Q3_K `qs`, uint8 [..., N, K/4]) holds values l, l + 32, l + 64, l + 96 of each 128 in
bits 0-1, 2-3, 4-5, 6-7 of byte l of each 32; a "bit plane" (Q3_K `hmask`, [..., N, K/8]) bit b of byte l of each
32 for value 32b + l of each 256 (the file's layouts).

| format | plane   | dtype    | shape          | meaning                                                     |
|--------|---------|----------|----------------|-------------------------------------------------------------|
| F32    | w       | float32  | [..., N, K]    | the values                                                  |
| F16    | w       | float16  | [..., N, K]    | the values                                                  |
| BF16   | w       | bfloat16 | [..., N, K]    | the values                                                  |
| Q4_0   | qs      | uint8    | [..., N, K/2]  | nibble plane (G 32) of q in 0..15; w = d * (q - 8)          |
|        | d       | float16  | [..., N, K/32] | block scale                                                 |
| Q4_1   | qs      | uint8    | [..., N, K/2]  | nibble plane (G 32) of q in 0..15; w = d * q + m            |
|        | d, m    | float16  | [..., N, K/32] | block scale, block minimum                                  |
| Q5_0   | qs      | uint8    | [..., N, K/2]  | nibble plane (G 32): low 4 bits of q; w = d * (q - 16)      |
|        | qh      | uint32   | [..., N, K/32] | bit j = bit 4 of the block's value j                        |
|        | d       | float16  | [..., N, K/32] | block scale                                                 |
| Q5_1   | qs, qh  |          |                | as Q5_0; w = d * q + m                                      |
|        | d, m    | float16  | [..., N, K/32] | block scale, block minimum                                  |
| Q8_0   | qs      | int8     | [..., N, K]    | q; w = d * q                                                |
|        | d       | float16  | [..., N, K/32] | block scale                                                 |
| MXFP4  | qs      | uint8    | [..., N, K/2]  | nibble plane (G 32) of E2M1 codes;                          |
|        |         |          |                | w = 2^(e - 128) * MXFP4_KVALUES[code]                       |
|        | e       | uint8    | [..., N, K/32] | E8M0 block exponent                                         |
| Q4_K   | qs      | uint8    | [..., N, K/2]  | nibble plane (G 64) of q in 0..15; w = d*sc * q - dmin*mn   |
|        | scales  | uint8    | [..., N, K/32] | sc, the 6-bit sub-block scales, unpacked                    |
|        | mins    | uint8    | [..., N, K/32] | mn, the 6-bit sub-block minimums, unpacked                  |
|        | d, dmin | float16  | [..., N, K/256]| super-block scales of the scales and of the minimums        |
| Q5_K   | qs      | uint8    | [..., N, K/2]  | nibble plane (G 64): low 4 bits of q; w as Q4_K             |
|        | qh      | uint8    | [..., N, K/8]  | 32 bytes per 256 values: bit b of byte l = bit 4 of value   |
|        |         |          |                | 32b + l                                                     |
|        | scales, mins, d, dmin | |           | as Q4_K                                                     |
| Q6_K   | qs      | uint8    | [..., N, K/2]  | nibble plane (G 128): low 4 bits of q; w = d*sc * (q - 32)  |
|        | qh      | uint8    | [..., N, K/4]  | 32 bytes per 128 values: bits 2k, 2k+1 of byte l = bits 4, 5|
|        |         |          |                | of value 32k + l                                            |
|        | scales  | int8     | [..., N, K/16] | sc, one per 16 values                                       |
|        | d       | float16  | [..., N, K/256]| super-block scale                                           |
| Q2_K   | qs      | uint8    | [..., N, K/4]  | crumb plane of q in 0..3; w = d*(s & 15) * q - dmin*(s >> 4)|
|        | scales  | uint8    | [..., N, K/16] | s: a 4-bit scale and a 4-bit minimum per 16 values (as filed)|
|        | d, dmin | float16  | [..., N, K/256]| super-block scales of the scales and of the minimums        |
| Q3_K   | qs      | uint8    | [..., N, K/4]  | crumb plane: low 2 bits of q; w = d*sc * (q - 4)            |
|        | hmask   | uint8    | [..., N, K/8]  | bit plane: bit 2 of q                                       |
|        | scales  | int8     | [..., N, K/16] | sc, the 6-bit scales minus 32, unpacked                     |
|        | d       | float16  | [..., N, K/256]| super-block scale                                           |
| IQ4_NL | qs      | uint8    | [..., N, K/2]  | nibble plane (G 32) of q; w = d * IQ4_KVALUES[q]            |
|        | d       | float16  | [..., N, K/32] | block scale                                                 |
| IQ4_XS | qs      | uint8    | [..., N, K/2]  | nibble plane (G 32) of q; w = d*sc * IQ4_KVALUES[q]         |
|        | scales  | int8     | [..., N, K/32] | sc, the 6-bit scales minus 32, unpacked                     |
|        | d       | float16  | [..., N, K/256]| super-block scale                                           |

Exactness: `dequantize` equals gguf-py's `gguf.quants.dequantize` (bit-identical to ggml's to_float) bit for
bit, in every format. The products of a float16 scale with the 6-bit scales and the codes fit in float32's
24-bit significand, so they are exact and at most one rounding (the "+ m" or "- dmin*mn") remains: whether
XLA fuses a*b+c into an FMA cannot change a bit. One exception, on CPU only: XLA's CPU backend flushes
subnormal floats, so MXFP4 blocks with exponent byte 0 or 1 (|w| < 2^-125, never in real files) read as 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as QT
from gguf.quants import Q4_K as GGUF_Q4_K
from jax.sharding import NamedSharding
from jax.typing import DTypeLike

PLAIN_TYPES = {QT.F32: np.float32, QT.F16: np.float16, QT.BF16: jnp.bfloat16}

# Byte fields of one GGUF block that are copied out as they are: (plane, first byte, end byte, dtype).
# Little-endian hosts only, as the file is little-endian.
_FIELDS: dict[QT, tuple[tuple[str, int, int, type], ...]] = {
    QT.Q4_0: (("d", 0, 2, np.float16), ("qs", 2, 18, np.uint8)),
    QT.Q4_1: (("d", 0, 2, np.float16), ("m", 2, 4, np.float16), ("qs", 4, 20, np.uint8)),
    QT.Q5_0: (("d", 0, 2, np.float16), ("qh", 2, 6, np.uint32), ("qs", 6, 22, np.uint8)),
    QT.Q5_1: (
        ("d", 0, 2, np.float16),
        ("m", 2, 4, np.float16),
        ("qh", 4, 8, np.uint32),
        ("qs", 8, 24, np.uint8),
    ),
    QT.Q8_0: (("d", 0, 2, np.float16), ("qs", 2, 34, np.int8)),
    QT.MXFP4: (("e", 0, 1, np.uint8), ("qs", 1, 17, np.uint8)),
    QT.Q4_K: (("d", 0, 2, np.float16), ("dmin", 2, 4, np.float16), ("qs", 16, 144, np.uint8)),
    QT.Q5_K: (
        ("d", 0, 2, np.float16),
        ("dmin", 2, 4, np.float16),
        ("qh", 16, 48, np.uint8),
        ("qs", 48, 176, np.uint8),
    ),
    QT.Q6_K: (
        ("qs", 0, 128, np.uint8),
        ("qh", 128, 192, np.uint8),
        ("scales", 192, 208, np.int8),
        ("d", 208, 210, np.float16),
    ),
    QT.Q2_K: (
        ("scales", 0, 16, np.uint8),
        ("qs", 16, 80, np.uint8),
        ("d", 80, 82, np.float16),
        ("dmin", 82, 84, np.float16),
    ),
    QT.Q3_K: (("hmask", 0, 32, np.uint8), ("qs", 32, 96, np.uint8), ("d", 108, 110, np.float16)),
    QT.IQ4_NL: (("d", 0, 2, np.float16), ("qs", 2, 18, np.uint8)),
    QT.IQ4_XS: (("d", 0, 2, np.float16), ("qs", 8, 136, np.uint8)),
}
_K_SCALES = (4, 16)  # Q4_K/Q5_K: the 12 bytes that pack 8 6-bit scales and 8 6-bit minimums
_Q3_K_SCALES = (96, 108)  # Q3_K: 16 6-bit scales, low nibbles in bytes 0-7, high crumbs in bytes 8-11
_IQ4_XS_SCALES = (2, 8)  # IQ4_XS: a uint16 of 8 high crumbs, then 4 bytes of 8 low nibbles

SUPPORTED_TYPES: frozenset[QT] = frozenset(PLAIN_TYPES) | frozenset(_FIELDS)

# E2M1 code -> value, doubled (ggml's kvalues_mxfp4); the E8M0 scale is halved to compensate.
MXFP4_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
# IQ4_NL/IQ4_XS code -> value (ggml's kvalues_iq4nl: a non-linear 4-bit grid)
IQ4_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclasses.dataclass(frozen=True)
class QuantArray:
    """A weight in device memory: its planes (the pytree's leaves) and, as static metadata, its GGUF type and
    logical shape. Under `lax.scan`/`vmap` over leading dims the planes lose those dims while `shape` keeps
    them; `dequantize` follows the planes."""

    planes: dict[str, jax.Array]
    qtype: QT
    shape: tuple[int, ...]
    parts: int = 1  # shards of the leading axis over devices (tensor parallelism's experts: ops.moe_matmul)
    # Tensor parallelism: how the planes are split over the mesh, by the logical shape's axes (every plane has the
    # same spec). Static, so that ops can wrap a Pallas kernel in shard_map at trace time; None: one device.
    sharding: NamedSharding | None = None

    @property
    def nbytes(self) -> int:
        return sum(math.prod(p.shape) * p.dtype.itemsize for p in self.planes.values())


jax.tree_util.register_dataclass(
    QuantArray, data_fields=["planes"], meta_fields=["qtype", "shape", "parts", "sharding"]
)


def pack(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Re-pack one tensor's GGUF data (the raw uint8 view, or a typed F32/F16 view) into host planes.

    The planes are new arrays, never views of `raw`: `jnp.asarray` on CPU aliases host memory, and a view
    would tie the device array to the file's mmap. Host memory used: about the tensor's bytes, no float copy.
    Raises ValueError for an unsupported type or a size that does not match the shape.
    """
    qtype = QT(qtype)
    shape = tuple(int(d) for d in shape)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"unsupported tensor type {qtype.name}")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if not shape or shape[-1] % block:
        raise ValueError(f"{qtype.name}: shape {shape} has no last axis that is a multiple of {block}")
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    expected = math.prod(shape) // block * type_size
    if data.size != expected:
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {data.size}")
    lead = shape[:-1]
    if qtype in PLAIN_TYPES:
        return {"w": data.view(PLAIN_TYPES[qtype]).reshape(shape).copy()}
    blocks = data.reshape(*lead, shape[-1] // block, type_size)

    def field(start: int, stop: int, dtype: type) -> np.ndarray:
        return blocks[..., start:stop].copy().view(dtype).reshape(*lead, -1)

    planes = {name: field(start, stop, dtype) for name, start, stop, dtype in _FIELDS[qtype]}
    if qtype in (QT.Q4_K, QT.Q5_K):
        # gguf-py's unpacking of the 6-bit scales, the one its dequantizer (and ggml's get_scale_min_k4) uses.
        packed = field(*_K_SCALES, np.uint8).reshape(-1, _K_SCALES[1] - _K_SCALES[0])
        scales, mins = GGUF_Q4_K.get_scale_min(packed)
        planes["scales"], planes["mins"] = scales.reshape(*lead, -1), mins.reshape(*lead, -1)
    elif qtype == QT.Q3_K:
        planes["scales"] = _q3_k_scales(field(*_Q3_K_SCALES, np.uint8).reshape(-1, 12)).reshape(*lead, -1)
    elif qtype == QT.IQ4_XS:
        planes["scales"] = _iq4_xs_scales(field(*_IQ4_XS_SCALES, np.uint8).reshape(-1, 6)).reshape(*lead, -1)
    return planes


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes per block -> its 16 scales minus 32, int8 [blocks, 16] (gguf-py's and ggml's
    unpacking): scale s is bits 4(s // 8).. of byte s % 8 (low 4) and bits 2(s // 4).. of byte 8 + s % 4 (high 2)."""
    s = np.arange(16)
    low = (packed[:, s % 8] >> (4 * (s // 8))) & 0x0F
    high = (packed[:, 8 + s % 4] >> (2 * (s // 4))) & 0x03
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)


def _iq4_xs_scales(packed: np.ndarray) -> np.ndarray:
    """IQ4_XS's 6 scale bytes per block -> its 8 scales minus 32, int8 [blocks, 8]: scale s is nibble s % 2 of
    byte 2 + s // 2 (low 4) and bits 2s.. of the leading uint16 (high 2)."""
    s = np.arange(8)
    high = (packed[:, :2].copy().view(np.uint16) >> (2 * s)) & 0x03
    low = (packed[:, 2 + s // 2] >> (4 * (s % 2))) & 0x0F
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)


def quant_array(
    raw: np.ndarray, qtype: QT, shape: tuple[int, ...], put: Callable[[np.ndarray], jax.Array] = jnp.asarray
) -> QuantArray:
    """Pack one tensor and place each plane with `put`, e.g. `functools.partial(jax.device_put, device=d)`."""
    planes = {name: put(p) for name, p in pack(raw, qtype, shape).items()}
    return QuantArray(planes, QT(qtype), tuple(int(d) for d in shape))


def _nibbles(qs: jax.Array, group: int) -> jax.Array:
    """uint8 [..., K/2] nibble plane with groups of `group` values -> uint8 [..., K/group, group] values."""
    qs = qs.reshape(*qs.shape[:-1], -1, group // 2)
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _bits_of_bytes(qh: jax.Array, bits_per_value: int) -> jax.Array:
    """uint8 [..., n*32] where byte l of each 32 holds, `bits_per_value` at a time, values l, 32+l, 64+l, ...
    -> uint8 [..., n * 8/bits_per_value, 32] with those values in order."""
    shifts = jnp.arange(0, 8, bits_per_value, dtype=jnp.uint8)[:, None]
    qh = qh.reshape(*qh.shape[:-1], -1, 1, 32) >> shifts
    return (qh & ((1 << bits_per_value) - 1)).reshape(*qh.shape[:-3], -1, 32)


# Every block format's value is `scale * code + offset` per block of B values (B = 32, or 16 for Q2_K/Q3_K/Q6_K), with
# small integer codes and float32 scale/offset: the parts functions return (codes int8 [..., K/B, B], scale
# float32 [..., K/B, 1], offset float32 [..., K/B, 1] or None). `dequantize` and the CPU layout (`Int8Blocks`)
# both build on them, so the two cannot disagree.
Parts = tuple[jax.Array, jax.Array, jax.Array | None]


def _q4_0(p: dict[str, jax.Array]) -> Parts:
    return _nibbles(p["qs"], 32).astype(jnp.int8) - 8, _f32(p["d"])[..., None], None


def _q4_1(p: dict[str, jax.Array]) -> Parts:
    return _nibbles(p["qs"], 32).astype(jnp.int8), _f32(p["d"])[..., None], _f32(p["m"])[..., None]


def _q5_codes(p: dict[str, jax.Array]) -> jax.Array:
    high = (p["qh"][..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (_nibbles(p["qs"], 32) | (high.astype(jnp.uint8) << 4)).astype(jnp.int8)


def _q5_0(p: dict[str, jax.Array]) -> Parts:
    return _q5_codes(p) - 16, _f32(p["d"])[..., None], None


def _q5_1(p: dict[str, jax.Array]) -> Parts:
    return _q5_codes(p), _f32(p["d"])[..., None], _f32(p["m"])[..., None]


def _q8_0(p: dict[str, jax.Array]) -> Parts:
    return p["qs"].reshape(*p["qs"].shape[:-1], -1, 32), _f32(p["d"])[..., None], None


def _mxfp4(p: dict[str, jax.Array]) -> Parts:
    # ggml_e8m0_to_fp32_half, by bits: 2^(e-128), a subnormal for e < 2.
    e = p["e"].astype(jnp.uint32)
    bits = jnp.where(e < 2, jnp.uint32(0x00200000) << e, (e - 1) << 23)
    d = jax.lax.bitcast_convert_type(bits, jnp.float32)
    codes = jnp.asarray(MXFP4_KVALUES, jnp.int8)[_nibbles(p["qs"], 32)]
    return codes, d[..., None], None


def _k_scales(p: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Q4_K/Q5_K: d*sc and dmin*mn as float32 [..., K/32, 1]."""
    sc, mn = p["scales"], p["mins"]
    sub = sc.reshape(*sc.shape[:-1], -1, 8)
    dsc = (_f32(p["d"])[..., None] * _f32(sub)).reshape(*sc.shape, 1)
    dmn = (_f32(p["dmin"])[..., None] * _f32(mn.reshape(sub.shape))).reshape(*mn.shape, 1)
    return dsc, dmn


def _q4_k(p: dict[str, jax.Array]) -> Parts:
    dsc, dmn = _k_scales(p)
    q = _nibbles(p["qs"], 64).reshape(*dsc.shape[:-1], 32)
    return q.astype(jnp.int8), dsc, -dmn  # dsc*q + (-dmn) is dsc*q - dmn, bit for bit


def _q5_k(p: dict[str, jax.Array]) -> Parts:
    dsc, dmn = _k_scales(p)
    low = _nibbles(p["qs"], 64).reshape(*dsc.shape[:-1], 32)
    q = low | (_bits_of_bytes(p["qh"], 1) << 4)
    return q.astype(jnp.int8), dsc, -dmn


def _q6_k(p: dict[str, jax.Array]) -> Parts:
    sc = p["scales"]
    dsc = (_f32(p["d"])[..., None] * _f32(sc.reshape(*sc.shape[:-1], -1, 16))).reshape(*sc.shape, 1)
    low = _nibbles(p["qs"], 128).reshape(*sc.shape[:-1], -1, 32)
    q = (low | (_bits_of_bytes(p["qh"], 2) << 4)).astype(jnp.int8) - 32
    return q.reshape(*sc.shape, 16), dsc, None


def _q2_k(p: dict[str, jax.Array]) -> Parts:
    s = p["scales"]
    d, dmin = (_f32(p[n])[..., None] for n in ("d", "dmin"))
    sub = s.reshape(*s.shape[:-1], -1, 16)
    dsc = (d * _f32(sub & 0x0F)).reshape(*s.shape, 1)
    dmn = (dmin * _f32(sub >> 4)).reshape(*s.shape, 1)
    q = _bits_of_bytes(p["qs"], 2).reshape(*s.shape, 16)
    return q.astype(jnp.int8), dsc, -dmn  # dsc*q + (-dmn) is gguf-py's dl*q - ml, bit for bit


def _q3_k(p: dict[str, jax.Array]) -> Parts:
    sc = p["scales"]
    dsc = (_f32(p["d"])[..., None] * _f32(sc.reshape(*sc.shape[:-1], -1, 16))).reshape(*sc.shape, 1)
    low = _bits_of_bytes(p["qs"], 2).reshape(*sc.shape, 16)
    high = _bits_of_bytes(p["hmask"], 1).reshape(*sc.shape, 16)
    return (low | (high << 2)).astype(jnp.int8) - 4, dsc, None  # gguf-py's q - 4 * (1 - high)


def _iq4_codes(qs: jax.Array) -> jax.Array:
    return jnp.asarray(IQ4_KVALUES, jnp.int8)[_nibbles(qs, 32)]


def _iq4_nl(p: dict[str, jax.Array]) -> Parts:
    return _iq4_codes(p["qs"]), _f32(p["d"])[..., None], None


def _iq4_xs(p: dict[str, jax.Array]) -> Parts:
    sc = p["scales"]
    dsc = (_f32(p["d"])[..., None] * _f32(sc.reshape(*sc.shape[:-1], -1, 8))).reshape(*sc.shape, 1)
    return _iq4_codes(p["qs"]), dsc, None


def _bf16(p: dict[str, jax.Array]) -> jax.Array:
    # By bits, as gguf-py does: a convert could flush bfloat16 subnormals on CPU.
    bits = jax.lax.bitcast_convert_type(p["w"], jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


_PLAIN: dict[QT, Callable[[dict[str, jax.Array]], jax.Array]] = {
    QT.F32: lambda p: p["w"],
    QT.F16: lambda p: _f32(p["w"]),
    QT.BF16: _bf16,
}
_PARTS: dict[QT, Callable[[dict[str, jax.Array]], Parts]] = {
    QT.Q4_0: _q4_0,
    QT.Q4_1: _q4_1,
    QT.Q5_0: _q5_0,
    QT.Q5_1: _q5_1,
    QT.Q8_0: _q8_0,
    QT.MXFP4: _mxfp4,
    QT.Q4_K: _q4_k,
    QT.Q5_K: _q5_k,
    QT.Q6_K: _q6_k,
    QT.Q2_K: _q2_k,
    QT.Q3_K: _q3_k,
    QT.IQ4_NL: _iq4_nl,
    QT.IQ4_XS: _iq4_xs,
}


def _combine(codes: jax.Array, scale: jax.Array, offset: jax.Array | None) -> jax.Array:
    w = scale * _f32(codes)
    return w if offset is None else w + offset


# The CPU layout's codes two to a byte where a format's fit in 4 bits: "u4" 0..15, "s4" -8..7 (two's complement).
# Byte 16g + i of a row holds value 32g + i in its low nibble and value 32g + 16 + i in its high one, so any kLanes
# (<= 16) consecutive values are one nibble of consecutive bytes (worker/cpu_kernels/int8_matvec.cc).
NIBBLE_CODES: dict[QT, str] = {QT.Q4_0: "s4", QT.Q3_K: "s4", QT.Q4_1: "u4", QT.Q4_K: "u4", QT.Q2_K: "u4"}
NIBBLE_GROUP = 32  # values a nibble group spans: a split of a row must fall on its boundaries


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """int8 codes [..., K] of at most 4 bits -> [..., K/2] bytes of two (NIBBLE_CODES' order; either sign), typed
    int8 as the CPU kernel takes its codes: a bitcast at every call made XLA copy the whole matrix."""
    g = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, 2, NIBBLE_GROUP // 2) & 0x0F
    packed = (g[..., 0, :] | (g[..., 1, :] << 4)).reshape(*codes.shape[:-1], -1)
    return jax.lax.bitcast_convert_type(packed, jnp.int8)


def _nibble_codes(packed: jax.Array, nibbles: str) -> tuple[jax.Array, jax.Array]:
    """[..., K/2] bytes of two codes (NIBBLE_CODES' order) -> each nibble group's low and high codes, int8 [...,
    K/32, 16] each; "s4"'s shifted to the top of an int8 and back, arithmetically (their sign)."""
    g = jax.lax.bitcast_convert_type(packed, jnp.uint8).reshape(*packed.shape[:-1], -1, NIBBLE_GROUP // 2)
    if nibbles == "s4":
        return (g << 4).astype(jnp.int8) >> 4, g.astype(jnp.int8) >> 4
    return (g & 0x0F).astype(jnp.int8), (g >> 4).astype(jnp.int8)


def unpack_nibbles(packed: jax.Array, nibbles: str) -> jax.Array:
    """[..., K/2] bytes of two codes (NIBBLE_CODES' order) -> int8 codes [..., K]. A reference (dequantize, the
    embedding's rows); the tile walk takes `nibble_halves`."""
    return jnp.stack(_nibble_codes(packed, nibbles), axis=-2).reshape(*packed.shape[:-1], -1)


def nibble_halves(w: Int8Blocks) -> list[jax.Array]:
    """The values of a matrix of nibble codes as two float32 [N, K/2]: every nibble group's first 16 values (the
    low nibbles), then its last 16 (the high ones), each scale * code + offset as `dequantize` forms them."""
    n = w.codes.shape[0]
    per = NIBBLE_GROUP // w.block  # scales a group: 1 (blocks of 32) or 2 (of 16), one for each half
    out = []
    for h, codes in enumerate(_nibble_codes(w.codes, w.nibbles)):
        scale, offset = (None if a is None else a.reshape(n, -1, per)[..., h % per, None] for a in (w.scale, w.offset))
        out.append(_combine(codes, scale, offset).reshape(n, -1))
    return out


@dataclasses.dataclass(frozen=True)
class Int8Blocks:
    """The CPU layout of a block-format matrix [N, K]: a small integer code per value and, per block of `block`
    values, a float32 scale and (formats with a minimum) a float32 offset; w = scale * code + offset, the very
    products `dequantize` forms, so the values are the same bit for bit. The codes are int8 [N, K], or two to a byte
    ([N, K/2], typed int8; `nibbles` "u4" or "s4": NIBBLE_CODES) for the formats whose codes fit in 4 bits.

    Why not the block planes on the CPU: XLA's CPU backend does not fuse a dequantization into a dot, so a
    matmul over planes writes the whole float32 matrix to a fresh buffer each call (the tied 262,144 x 640 output
    matrix of Gemma 3: 671 MB a decode step, mostly page faults). ops.qmatmul instead walks row tiles of this
    layout, widening each tile next to its dot; plain codes make that a convert-and-scale (a nibble's shift and
    mask before it), where the planes would need high-bit and sub-scale unpacking per tile. Memory: about 1.13
    bytes a weight (1.25 with an offset) for int8 codes, 0.63 (0.75) for nibbles, against 0.33-1.06 for the block
    formats: Q4_K 0.75 against the file's 0.56."""

    codes: jax.Array  # int8 [N, K], or int8 [N, K / 2] of two nibbles each (`nibbles`)
    scale: jax.Array  # float32 [N, K / block]
    offset: jax.Array | None  # float32 [N, K / block], or None
    qtype: QT
    block: int
    shape: tuple[int, ...]
    # A matrix split over devices (worker/sharding.py; the planes' sharding, by rows or input columns): ops.qmatmul
    # runs its tile walk on each device's shard inside shard_map. A tile loop over the global matrix would make XLA
    # gather the whole matrix (rows) or all-reduce every tile's partial sums (columns).
    sharding: jax.sharding.NamedSharding | None = None
    nibbles: str | None = None  # None: int8 codes; "u4" / "s4": two a byte (NIBBLE_CODES)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(self))

    def int8_codes(self) -> jax.Array:
        """The codes as int8 [..., K] (unpacked where they are nibbles)."""
        return self.codes if self.nibbles is None else unpack_nibbles(self.codes, self.nibbles)

    def rows(self, start: jax.Array | int, n: int) -> Int8Blocks:
        """Rows start .. start + n (a dynamic start: XLA reads them in place inside a fused consumer)."""
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, n, axis=0)  # noqa: E731
        return self._with_rows(take, n)

    def take(self, ids: jax.Array) -> Int8Blocks:
        """Rows `ids` (an embedding lookup)."""
        return self._with_rows(lambda a: jnp.take(a, ids, axis=0), ids.size)

    def _with_rows(self, pick: Callable[[jax.Array], jax.Array], n: int) -> Int8Blocks:
        offset = None if self.offset is None else pick(self.offset)
        return Int8Blocks(pick(self.codes), pick(self.scale), offset, self.qtype, self.block, (n, self.shape[1]),
                          nibbles=self.nibbles)  # fmt: skip


jax.tree_util.register_dataclass(
    Int8Blocks, data_fields=["codes", "scale", "offset"], meta_fields=["qtype", "block", "shape", "sharding", "nibbles"]
)


def widened(q: QuantArray, dtype: DTypeLike) -> QuantArray:
    """q's values as an unquantized QuantArray of `dtype` (float32, float16 or bfloat16): a weight dequantized once
    for a call that reads every tile many times (ops.qmatmul's prefill on the kernels)."""
    qtype = {jnp.dtype(v): k for k, v in PLAIN_TYPES.items()}[jnp.dtype(dtype)]
    return QuantArray({"w": dequantize(q, dtype)}, qtype, q.shape, q.parts, q.sharding)


def dequantize(q: QuantArray | Int8Blocks, dtype: DTypeLike = jnp.float32) -> jax.Array:
    """The full-precision values, shape (*planes' leading dims, K): exact in float32, then cast to `dtype`.
    A reference (CPU path, tests); hot paths dequantize tiles inside kernels instead."""
    if isinstance(q, Int8Blocks):
        lead = q.codes.shape[:-1]
        offset = None if q.offset is None else q.offset[..., None]
        w = _combine(q.int8_codes().reshape(*lead, -1, q.block), q.scale[..., None], offset)
        return w.reshape(*lead, -1).astype(dtype)
    if q.qtype in PLAIN_TYPES and q.planes["w"].dtype == jnp.dtype(dtype):
        return q.planes["w"]
    out = _PLAIN[q.qtype](q.planes) if q.qtype in _PLAIN else _combine(*_PARTS[q.qtype](q.planes))
    lead = next(iter(q.planes.values())).shape[:-1]
    return out.reshape(*lead, q.shape[-1]).astype(dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _int8_parts(planes: dict[str, jax.Array], qtype: QT) -> Parts:
    codes, scale, offset = _PARTS[qtype](planes)
    n = codes.shape[0]
    codes = codes.reshape(n, -1)
    codes = pack_nibbles(codes) if qtype in NIBBLE_CODES else codes
    return codes, scale.reshape(n, -1), None if offset is None else offset.reshape(n, -1)


def cpu_block(qtype: QT) -> int:
    """Values a scale covers in the CPU layout (Int8Blocks.block): the format's block, or its sub-blocks' for the
    K-quants and IQ4_XS (Q4_K, Q5_K and IQ4_XS 32; Q2_K, Q3_K and Q6_K 16)."""
    subs = {QT.Q4_K: 32, QT.Q5_K: 32, QT.IQ4_XS: 32, QT.Q2_K: 16, QT.Q3_K: 16, QT.Q6_K: 16}
    return subs.get(qtype, GGML_QUANT_SIZES[qtype][0])


# The formats whose CPU layout keeps an offset per block (a minimum: Q4_1/Q5_1's m, the K-quants' dmin * mn).
OFFSET_TYPES = frozenset({QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q2_K})


def cpu_layout_nbytes(qtype: QT, shape: tuple[int, ...]) -> int | None:
    """Bytes of a matrix [N, K] of `qtype` in the CPU layout (codes, float32 scales and offsets), or None where the
    CPU keeps the planes (vectors, unquantized matrices, stacked experts)."""
    if len(shape) != 2 or qtype not in _PARTS:  # _PARTS: the block formats
        return None
    values = math.prod(shape)
    scales = values // cpu_block(qtype) * 4 * (2 if qtype in OFFSET_TYPES else 1)
    return (values // 2 if qtype in NIBBLE_CODES else values) + scales


def cpu_split(qtype: QT) -> int:
    """The values a split of a CPU-layout row must fall on (sharding._check_split): its blocks, and the nibble
    groups of the formats whose codes are nibbles (Q2_K and Q3_K: 32, not their blocks of 16)."""
    return max(cpu_block(qtype), NIBBLE_GROUP if qtype in NIBBLE_CODES else 1)


def to_int8_blocks(q: QuantArray) -> Int8Blocks:
    """A block-format matrix [N, K] in the CPU layout (on the planes' device)."""
    codes, scale, offset = _int8_parts(q.planes, q.qtype)
    if q.sharding is not None:  # the planes' split, which XLA's propagation through the nibbles' reshapes may lose
        codes, scale, offset = (None if a is None else jax.device_put(a, q.sharding) for a in (codes, scale, offset))
    block = q.shape[-1] // scale.shape[-1]
    return Int8Blocks(codes, scale, offset, q.qtype, block, q.shape, q.sharding, NIBBLE_CODES.get(q.qtype))


def cpu_layout(weights: Any, settle: Callable[[Int8Blocks], Int8Blocks] = lambda m: m) -> Any:
    """The weights pytree with every block-format matrix (2-D QuantArray) in the CPU layout; each one's planes
    are freed as soon as it is converted, and `settle` given the matrix (several host devices: device.held_once).
    Vectors, float matrices and stacked experts (3-D: ops.moe_matmul gathers their planes) are left as they are."""

    done: dict[int, Int8Blocks] = {}  # a matrix the tree holds twice is converted once

    def convert(leaf: Any) -> Any:
        if not (isinstance(leaf, QuantArray) and leaf.qtype in _PARTS and len(leaf.shape) == 2):
            return leaf
        if id(leaf) not in done:
            done[id(leaf)] = settle(to_int8_blocks(leaf))
            for plane in leaf.planes.values():
                plane.delete()
        return done[id(leaf)]

    return jax.tree_util.tree_map(convert, weights, is_leaf=lambda x: isinstance(x, QuantArray))


# general.file_type values whose llama.cpp name differs from the type the /health report should carry.
_KIND_RENAMES = {"MXFP4_MOE": "MXFP4"}
_FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})


def quant_kind(file_type: int | None, tensor_types: Iterable[QT] | Mapping[QT, int]) -> str:
    """The file's format as llama.cpp names it ("Q4_K_M", "Q8_0", "MXFP4", ...), from general.file_type.

    Without a known file_type: the quantized tensor type that holds the most weight, else such a float type.
    `tensor_types` is one entry per tensor, or a mapping of type -> bytes (then bytes decide).
    """
    try:
        ftype = LlamaFileType(file_type) if file_type is not None else None
    except ValueError:
        ftype = None
    if ftype is not None and ftype != LlamaFileType.GUESSED:
        name = ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        return _KIND_RENAMES.get(name, name)
    weights: dict[QT, int] = {}
    if isinstance(tensor_types, Mapping):
        for t, n in tensor_types.items():
            weights[QT(t)] = weights.get(QT(t), 0) + int(n)
    else:
        for t in tensor_types:
            weights[QT(t)] = weights.get(QT(t), 0) + 1
    if not weights:
        raise ValueError("no general.file_type and no tensors: the quant kind is unknown")
    quantized = {t: n for t, n in weights.items() if t not in _FLOAT_TYPES}
    pool = quantized or weights
    return max(pool, key=lambda t: (pool[t], -int(t))).name
