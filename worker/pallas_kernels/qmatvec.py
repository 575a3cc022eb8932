"""Quantized matvec for decode and short prefill chunks (dense and expert-gathered): dequantizes the GGUF planes
in registers, so a decode step reads each weight byte from memory once. Batch invariant: a row's result does not
depend on the other rows of the call (docs/kernels.md, "Batch invariance"). Design, tiles and measurements:
docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from gguf import GGMLQuantizationType as QT
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.pallas_kernels.tiling import (
    ALL,
    TARGET_PROGRAMS,
    TritonParams,
    cuda_capability,
    kernel_entry,
    masked_load,
    pow2_floor,
    static_index,
)
from worker.quant import IQ4_KVALUES, QuantArray, dequantize

MAX_ROWS = 8  # the per-row kernel: rows of x per program (one accumulator and one x load per row, unrolled)
MAX_BATCH = 1024  # the most rows of a decode dispatch (--max-batch) in the batch-invariant mode (worker/model.py)
# The tensor-core kernel: rows of x per program (rows past x's are masked loads of zeros). Each call is a dot of
# this many rows against each dequantized weight tile, whatever the number of rows it was given, so a row's
# arithmetic never depends on the call's size (batch invariance), and 64 rows cost one pass over the weights where
# the per-row kernel makes one per 8 rows. The dot's operands are float16: x divided by its row's power of two
# (`row_scale`, exact) and the dequantized weight, each rounded to a 10-bit mantissa as TF32 would round them, at
# twice TF32's tensor-core rate. On an H200 (phi3-mini's Q4_K gate_up, one call): per-row kernel 50 us for one row,
# 583 us for 64; this kernel 65 us for one, 90 us for 64 (with TF32 operands: 139 and 145; docs/PERFORMANCE.md).
ROW_TILE = 64
# The swapped dot's output columns a tile (Plan.swap): the MMA's M, which Hopper's wgmma takes as 64 rows a warpgroup.
SWAP_BLOCK_N = 64
# moe_matvec sorts its (token, selection) pairs by expert from this many on. The pairs are the grid's fastest axis,
# so a column tile's pairs are consecutive programs: fewer than 64 run in one wave of the card's 132 multiprocessors
# and meet in L2 in any order, and the sort would only add its XLA kernels (the argsort and the gathers around the
# call: with the clamp of the ids, 0.093 ms of gpt-oss-20b's 3.37 ms step at one stream on an H100, twenty-ninth
# session).
SORTED_PAIRS = 64
MIN_DOT = 16  # tl.dot's smallest tile dimension
TARGET_VALUES = 8192  # weight values per program per loop step
# The int8-x kernels' output rows a program, one a thread (num_warps = block_n // 32). They add a group's term to each
# output row on its own (qmatvec_int8), so fewer warps than rows / 32 compute each term several times over (counted
# for sm_90a, tools/kernel_sass.py: phi3's Q4_K gate_up 3.72 instructions a value at 32 rows on 4 warps, 2.00 at 64
# on 2). Between 64 on 2 warps and 128 on 4, the count is alike and the warps in flight double: timed on an H100
# (2026-12-05, bench.worker_bench --max-batch 2 --int8-x, one run each) one stream of qwen2.5-0.5b 747 -> 877 tok/s,
# phi3-mini 324 -> 332; alone (bench.kernels --sweep-kernel int8, 2 rows) qwen2.5's gate on an H200 5.0 -> 4.1 us,
# phi3's gate_up on the H100 22.7 -> 23.7 us.
INT8_BLOCK_N = 128
# The int8-x per-row kernel's programs along N at most (`Plan.programs`; TARGET_PROGRAMS, 4 a multiprocessor):
# only a weight of more than 528 column tiles (67,584 rows: an output head) has fewer programs than tiles. Timed on
# an H100 (2026-12-06, bench.kernels --sweep-kernel int8, 2 rows): gpt-oss-20b's 201k-row Q8_0 head 832 us with a
# program a tile (0.74 TB/s), 412 / 346 / 419 us with 264 / 528 / 1,056 programs (1.78 TB/s at 528); its decode,
# one stream, 278.6 -> 322.0 tok/s (bench.worker_bench --max-batch 2 --int8-x, two runs each).
INT8_PROGRAMS = TARGET_PROGRAMS
# `plan`'s overrides
TILE_ARGS = ("block_n", "chunk", "splits", "num_warps", "num_stages", "factored", "prefetch", "fma", "int8_x", "unroll",
             "programs", "ptx")  # fmt: skip
# The tiles of prefill-shaped calls (ops.qmatmul: a prompt chunk's positions, or several sequences' chunks in one
# dispatch: thousands of rows), which take the weight dequantized once into float16 (`quant.widened`): a plain
# tensor-core product, with one split of K (no partial sums to write). A row's bits depend on these tiles, so every
# prefill-shaped call takes them whatever its size (and decode its own): a chunk gets the same bits alone as among
# others (batch invariance). Timed on an H200 at 4,096 rows (`python -m bench.kernels --rows 0 --prefill 4096
# --sweep`, docs/PERFORMANCE.md): gpt-oss's Q8_0 q 435 us (dequantized in registers, best tiles: 687; decode's
# tiles: 1,124), phi3's Q4_K gate_up 1,441 us (2,980; 3,516). Dequantize + XLA's dot is faster still (301, 812)
# but sums a row in an order that depends on the product's rows.
PREFILL_TILES = {"row_tile": 128, "block_n": 256, "splits": 1, "num_warps": 8, "num_stages": 3}

Load = Callable[..., jax.Array]
Parts = list[tuple[jax.Array, tuple]]
# A format's values in factors: (code [BN, C, *g, S] float32, scale [BN, C, *g, 1] or None, offset [BN, C, *g, 1]
# or None, index into x_inner), the value being scale * code + offset. The S values of a code tile's last axis
# share their scale and offset (one sub-block's, or a part of one).
Factors = list[tuple[jax.Array, jax.Array | None, jax.Array | None, tuple]]


@dataclasses.dataclass(frozen=True)
class Format:
    """How one GGUF format is viewed and dequantized. `planes`: name -> inner view of one super-block's
    elements. `x_inner`: x's view of one super-block. `factors(load)` returns its values in factors (`Factors`),
    each with the index into x_inner selecting the matching [C, *t] values of x; `load(name, *index)` loads a
    masked plane tile [BN, C, *rest] with `index` applied to the plane's inner view."""

    sb: int
    planes: dict[str, tuple[int, ...]]
    x_inner: tuple[int, ...]
    factors: Callable[[Load], Factors]
    # The tensor-core kernel's float16 parts made as inline PTX makes them (Plan.ptx), where the format has them:
    # `parts`' tiles in its order, as float16; ptx(load, asm): by the asm (a compiled kernel), else by its twin.
    ptx: Callable[[Load, bool], list[jax.Array]] | None = None
    # The swapped tensor-core dot's `factors` and `ptx`, where they load differently (the same values:
    # `_k_scale_min`'s `whole`).
    swapped_factors: Callable[[Load], Factors] | None = None
    swapped_ptx: Callable[[Load, bool], list[jax.Array]] | None = None

    def parts(self, load: Load) -> Parts:
        """(dequantized tile [BN, C, *t] (float32; a plain format's in its own dtype), index into x_inner) pairs."""
        return [(_value(code, scale, offset), index) for code, scale, offset, index in self.factors(load)]


def _value(code: jax.Array, scale: jax.Array | None, offset: jax.Array | None, fused: bool = False) -> jax.Array:
    if scale is None:
        return code
    return scale * code if offset is None else _fma(scale, code, offset, fused)


def _fma(a: jax.Array, b: jax.Array, c: jax.Array, fused: bool) -> jax.Array:
    """a * b + c in float32, rounded once where `fused` (PTX fma.rn.f32; a Triton kernel only), else twice."""
    if not fused:
        return a * b + c
    shape = jnp.broadcast_shapes(a.shape, b.shape, c.shape)
    args = [jnp.broadcast_to(v.astype(jnp.float32), shape) for v in (a, b, c)]
    (out,) = plgpu.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=r,r,r,r", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])  # fmt: skip
    return out


def _f32(a: jax.Array) -> jax.Array:
    return a.astype(jnp.float32)


def _lift(a: jax.Array, ndim: int) -> jax.Array:
    """Trailing unit axes up to `ndim` (a per-block scale against its values). expand_dims, not reshape: Triton
    keeps an expanded tensor in its parent's layout, where a reshape costs a layout conversion."""
    return jax.lax.expand_dims(a, tuple(range(a.ndim, ndim)))


def _nibble_parts(qs: jax.Array) -> tuple[jax.Array, jax.Array]:
    q = qs.astype(jnp.int32)
    return q & 0xF, q >> 4


def _q8_0(load: Load) -> Factors:
    qs, d = load("qs", ALL), load("d")  # [BN, C, 32], [BN, C]
    return [(_f32(qs), _lift(_f32(d), 3), None, (ALL,))]


def _q8_0_ptx(load: Load, asm: bool) -> list[jax.Array]:
    return [bytes_f16(load("qs", ALL), _lift(_f32(load("d")), 3), asm)]


def _q4_0(load: Load) -> Factors:
    d = _lift(_f32(load("d")), 3)
    return [(_f32(q - 8), d, None, (p, ALL)) for p, q in enumerate(_nibble_parts(load("qs", ALL)))]


def _q4_1(load: Load) -> Factors:
    d, m = _lift(_f32(load("d")), 3), _lift(_f32(load("m")), 3)
    return [(_f32(q), d, m, (p, ALL)) for p, q in enumerate(_nibble_parts(load("qs", ALL)))]


def _q5_fifth_bits(load: Load) -> list[jax.Array]:
    """Q5_0's and Q5_1's fifth bit of each value of the low and high halves of each 32-value block, uint32 [BN, C,
    16] (bit j of the block's qh is value j's)."""
    qh = _lift(load("qh").astype(jnp.uint32), 3)
    shift = jnp.arange(16, dtype=jnp.uint32)
    return [(qh >> (shift + 16 * p)) & 1 for p in range(2)]


def _q5_codes(load: Load) -> list[jax.Array]:
    """The 5-bit codes of the low and high halves of each 32-value block, int32 [BN, C, 16]."""
    parts = zip(_nibble_parts(load("qs", ALL)), _q5_fifth_bits(load), strict=True)
    return [low | (high.astype(jnp.int32) << 4) for low, high in parts]


def _q5_0(load: Load) -> Factors:
    d = _lift(_f32(load("d")), 3)
    return [(_f32(q - 16), d, None, (p, ALL)) for p, q in enumerate(_q5_codes(load))]


def _q5_1(load: Load) -> Factors:
    d, m = _lift(_f32(load("d")), 3), _lift(_f32(load("m")), 3)
    return [(_f32(q), d, m, (p, ALL)) for p, q in enumerate(_q5_codes(load))]


def _blocks_of_32_ptx(load: Load, asm: bool, bits: int, offset: bool) -> list[jax.Array]:
    """The two parts of Q4_0 and Q5_0 (d * (q - 2^(bits - 1)) as fma(q, d, -2^(bits - 1) d): the float path's
    values to the bit) or Q4_1 and Q5_1 (`offset`: d * q + m) by `nibbles_f16`; five bits: each value's fifth bit
    moved to bit 0 of a byte first (`_q5_fifth_bits`)."""
    d, qs = _lift(_f32(load("d")), 3), load("qs", ALL)
    m = _lift(_f32(load("m")), 3) if offset else -float(1 << (bits - 1)) * d
    fifth = [a.astype(jnp.uint8) for a in _q5_fifth_bits(load)] if bits == 5 else [None, None]
    return [nibbles_f16(qs, p, d, m, asm, fifth[p]) for p in range(2)]


def _e2m1_tiny(code: jax.Array) -> jax.Array:
    """2^-15 times ggml's kvalues_mxfp4[code] (E2M1 times 2: 0, 1, 2, 3, 4, 6, 8, 12 and their negatives) in float32,
    by bits, as Triton has no register-table lookup: the code's sign, two exponent bits and mantissa bit placed in a
    float16's sign, two lowest exponent bits and top mantissa bit make that value exactly (code 1, E2M1's subnormal
    0.5, a float16 subnormal). The 2^15 goes into the block's scale (`_e8m0_times_2_15`). Why this way: a
    shift-and-select by arithmetic took 20.6 instructions a value in the per-row kernel (tools/kernel_sass.py)."""
    bits = ((code & 7) << 9) | ((code & 8) << 12)
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32)


def _e8m0_times_2_15(e: jax.Array) -> jax.Array:
    """2^15 * e8m0_half(e) = 2^(e - 113), by bits: always a normal float32, one multiply a block where the value's
    2^15 took one a value (`_e2m1_tiny`; the products are exact either way, so the values are the same). Exponent
    bytes above 240 (|w| >= 2^113, never in a real file) are clamped to 240, where 2^(e - 113) would overflow."""
    e = jnp.minimum(e.astype(jnp.uint32), jnp.uint32(240))
    return jax.lax.bitcast_convert_type((e + 14) << 23, jnp.float32)


def e8m0_half(e: jax.Array) -> jax.Array:
    """ggml_e8m0_to_fp32_half of an MXFP4 block's exponent byte, by bits: 2^(e - 128) in float32, a subnormal for
    e < 2 (as worker/quant.py)."""
    e = e.astype(jnp.uint32)
    bits = jnp.where(e < 2, jnp.uint32(0x00200000) << e, (e - 1) << 23)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _mxfp4(load: Load) -> Factors:
    d = _lift(_e8m0_times_2_15(load("e")), 3)
    return [(_e2m1_tiny(q), d, None, (p, ALL)) for p, q in enumerate(_nibble_parts(load("qs", ALL)))]


def _k_scale_min(load: Load, p: int, whole: bool = False) -> tuple[jax.Array, jax.Array]:
    """Q4_K/Q5_K: d*sc and -(dmin*mn) of sub-block 2j + p for the 4 groups j of a super-block, [BN, C, 4, 1]
    (x - y and x + (-y) are the same float, so the value is the dequantizer's d*sc*q - dmin*mn to the bit).
    `whole` (Q4_K's swapped tensor-core dot): the scales and mins loaded whole, [BN, C, 4, 2], and part p picked by a
    select and a sum of two, one of them zero (exact: the same values), as Pallas' Triton lowering has no slice.
    There a tile's two parts then convert one plane each to the dot's layout through shared memory where they
    converted two (counted for sm_90a, tools/kernel_sass.py, phi3's Q4_K gate_up: at one row 7.68 -> 6.84
    instructions a value, 175 -> 152 registers, by inline PTX 4.70 -> 3.91, barriers 20 -> 10; at 64 rows 7.98 ->
    7.07, 255 registers and a spill -> 207). The per-row kernels lose by it (8.45 -> 9.52), and so do the unswapped
    dot (7.45 -> 8.42) and Q5_K's swapped one (11.07 -> 13.57), so they load a part at a time."""
    d, dmin = _lift(_f32(load("d")), 3), _lift(_f32(load("dmin")), 3)
    if whole:
        pick = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, 2), 3) == p
        sc = jnp.sum(jnp.where(pick, _f32(load("scales", ALL, ALL)), 0.0), axis=-1)
        mn = jnp.sum(jnp.where(pick, _f32(load("mins", ALL, ALL)), 0.0), axis=-1)
    else:
        sc, mn = _f32(load("scales", ALL, p)), _f32(load("mins", ALL, p))
    return _lift(d * sc, 4), -_lift(dmin * mn, 4)


def _q4_k(load: Load, whole: bool = False) -> Factors:
    out = []
    for p, q in enumerate(_nibble_parts(load("qs", ALL, ALL))):  # [BN, C, 4, 32]
        out.append((_f32(q), *_k_scale_min(load, p, whole), (ALL, p, ALL)))
    return out


def _q4_k_ptx(load: Load, asm: bool, whole: bool = False) -> list[jax.Array]:
    qs = load("qs", ALL, ALL)  # [BN, C, 4, 32]
    return [nibbles_f16(qs, p, *_k_scale_min(load, p, whole), asm) for p in range(2)]


# Nibbles to float16 by inline PTX (Plan.ptx): a byte permute spreads two code bytes into the halves of a word
# (PTX_SPREAD), a nibble masked into each half's low mantissa bits under float16's exponent of 1024 (0x6400) is
# 1024 + code exactly, and a packed subtract and fused multiply-add give scale * code + offset, rounded once, two
# values an instruction. The scale and offset are float16, each rounded once from the format's float32: for Q4_0
# and Q4_1 the file's own halves (and -8d), so the values are the float path's wherever its float32 sum is exact;
# for the K-quants, d * sc and dmin * m are rounded to float16 first (other bits than the float path's, each within
# float16's 2^-11). Why by hand: the float path converts each code to float32, scales it in float32 and converts the
# value to float16 (phi3's Q4_K gate_up swapped: 6.8 SASS instructions a value in all, against 3.9: docs/kernels.md).
PTX_SPREAD = (0x4140, 0x4342)  # prmt selectors: code bytes 0 and 1 (2 and 3) into bytes 0 and 2 of a word
PTX_MAGIC = 0x64006400  # float16x2 of 1024


def _nibbles_f16_asm(part: int, high_shift: int | None = None) -> str:
    """The inline PTX of `nibbles_f16`'s `part` (0: low nibbles, 1: high): operands $0 $1 the float16x2 pairs of the
    values, $2 four code bytes, then (`high_shift` S given) four bytes whose bits S and S + 1 are the codes' bits 4
    and 5, then the scales' float16x2 pairs and the offsets' (element j of each is byte j's, as Triton packs them:
    each value's operands are its own, whatever the layout puts beside it)."""
    lines = ["{", ".reg .b32 w, k, c, h, t;", f"mov.b32 k, {PTX_MAGIC:#x};"]
    lines += ["shr.b32 c, $2, 4;"] if part else ["mov.b32 c, $2;"]
    scales = 3
    if high_shift is not None:  # each byte's two bits to its bits 4 and 5 (what crosses a byte is masked off)
        lines += [f"shl.b32 h, $3, {4 - high_shift};" if high_shift < 4 else f"shr.b32 h, $3, {high_shift - 4};"]
        scales = 4
    for half, selector in enumerate(PTX_SPREAD):
        lines += [f"prmt.b32 w, c, 0, {selector:#x};", "and.b32 w, w, 0x000f000f;"]
        if high_shift is not None:
            lines += [f"prmt.b32 t, h, 0, {selector:#x};", "and.b32 t, t, 0x00300030;", "or.b32 w, w, t;"]
        lines += [
            "or.b32 w, w, k;",
            "sub.f16x2 w, w, k;",
            f"fma.rn.f16x2 ${half}, w, ${scales + half}, ${scales + 2 + half};",
        ]
    return "\n".join([*lines, "}"])


def nibbles_f16(codes: jax.Array, part: int, scale: jax.Array, offset: jax.Array | None, asm: bool,
                high: jax.Array | None = None, high_shift: int = 0) -> jax.Array:  # fmt: skip
    """scale * code + offset of each code byte of `codes` (uint8; `part` 0 its low nibble, 1 its high; with `high`,
    uint8 like `codes`, its bits high_shift and high_shift + 1 are the code's bits 4 and 5) in float16, rounded once;
    `scale` and `offset` (float32) broadcast against `codes`, each rounded to float16 first. `asm`: by inline PTX (a
    compiled kernel), else by its twin in float32 (interpret mode), which rounds twice where float32's sum is
    inexact (tests/test_pallas_qmatvec.py counts those)."""
    offset = jnp.zeros_like(scale) if offset is None else offset
    halves = [jnp.broadcast_to(v.astype(jnp.float16), codes.shape) for v in (scale, offset)]
    if not asm:
        code = (codes.astype(jnp.int32) >> (4 * part)) & 0xF
        if high is not None:
            code = code | (((high.astype(jnp.int32) >> high_shift) & 3) << 4)
        return (_f32(code) * _f32(halves[0]) + _f32(halves[1])).astype(jnp.float16)
    out = jax.ShapeDtypeStruct(codes.shape, jnp.float16)
    text = _nibbles_f16_asm(part, None if high is None else high_shift)
    args = [codes, *([] if high is None else [jnp.broadcast_to(high, codes.shape)]), *halves]
    registers = (1 if high is None else 2) + 4  # four bytes of codes (and of high bits) a register, two halves one
    return plgpu.elementwise_inline_asm(text, args=args, constraints="=r,=r" + ",r" * registers, pack=4,
                                        result_shape_dtypes=[out])[0]  # fmt: skip


def _bytes_f16_asm() -> str:
    """The inline PTX of `bytes_f16`: operands $0 $1 the float16x2 pairs of the values, $2 four signed code bytes,
    $3 $4 the scales' float16x2 pairs. A byte spread into a half, its sign bit flipped and put under float16's 1024,
    is 1024 + 128 + code exactly; less 1152, times the scale, rounded once."""
    lines = ["{", ".reg .b32 w, k, b;", f"mov.b32 k, {PTX_MAGIC:#x};", "mov.b32 b, 0x64806480;"]
    for half, selector in enumerate(PTX_SPREAD):
        lines += [
            f"prmt.b32 w, $2, 0, {selector:#x};",
            "xor.b32 w, w, 0x00800080;",
            "or.b32 w, w, k;",
            "sub.f16x2 w, w, b;",
            f"mul.rn.f16x2 ${half}, w, ${3 + half};",
        ]
    return "\n".join([*lines, "}"])


def bytes_f16(codes: jax.Array, scale: jax.Array, asm: bool) -> jax.Array:
    """scale * code of each signed code byte of `codes` (int8) in float16, rounded once (Q8_0: the float path's
    values to the bit, a float16 scale times an int8 code being exact in float32); `scale` (float32) broadcast
    against `codes`, rounded to float16 first. `asm`: by inline PTX, else by its twin (the same values)."""
    half = jnp.broadcast_to(scale.astype(jnp.float16), codes.shape)
    if not asm:
        return (_f32(codes) * _f32(half)).astype(jnp.float16)
    out = jax.ShapeDtypeStruct(codes.shape, jnp.float16)
    return plgpu.elementwise_inline_asm(_bytes_f16_asm(), args=[codes, half], constraints="=r,=r,r,r,r", pack=4,
                                        result_shape_dtypes=[out])[0]  # fmt: skip


def _q5_k_fifth_bits(load: Load, dtype) -> list[jax.Array]:
    """Q5_K's fifth bit of each value of part p (0, 1), `dtype` [BN, C, 4, 32]: bit 2j + p of qh byte l is value 64j
    + 32p + l's."""
    qh = jax.lax.expand_dims(load("qh", ALL).astype(dtype), (2,))  # [BN, C, 1, 32]
    group = jax.lax.broadcasted_iota(dtype, (1, 1, 4, 1), 2)
    return [(qh >> (2 * group + p)) & 1 for p in range(2)]


def _q5_k(load: Load) -> Factors:
    out = []
    for p, (low, high) in enumerate(zip(_nibble_parts(load("qs", ALL, ALL)), _q5_k_fifth_bits(load, jnp.int32),
                                        strict=True)):  # fmt: skip
        out.append((_f32(low | (high << 4)), *_k_scale_min(load, p), (ALL, p, ALL)))
    return out


def _q5_k_ptx(load: Load, asm: bool) -> list[jax.Array]:
    # the fifth bit to bit 0 of a byte a value first: its shift differs along the tile, which the asm's is not
    qs, fifth = load("qs", ALL, ALL), _q5_k_fifth_bits(load, jnp.uint8)
    return [nibbles_f16(qs, p, *_k_scale_min(load, p), asm, fifth[p]) for p in range(2)]


def _q6_k(load: Load) -> Factors:
    # Value 128h + 64p + 32k + 16l + r: qs byte (h, k, l, r) nibble p, qh byte (h, l, r) bits 2(2p + k),
    # scale (h, p, k, l). Eight parts of [BN, C, 2(h), 16(r)].
    d = _lift(_f32(load("d")), 3)
    out = []
    for l in range(2):
        qh = load("qh", ALL, l, ALL).astype(jnp.int32)
        for k in range(2):
            for p, low in enumerate(_nibble_parts(load("qs", ALL, k, l, ALL))):
                q = low | (((qh >> (2 * (2 * p + k))) & 3) << 4)
                sc = _lift(d * _f32(load("scales", ALL, p, k, l)), 4)
                out.append((_f32(q - 32), sc, None, (ALL, p, k, l, ALL)))
    return out


def _q6_k_ptx(load: Load, asm: bool) -> list[jax.Array]:
    # `_q6_k`'s eight parts in its order: d * sc * (q - 32) as fma(q, s, -32 s), s = d * sc rounded to float16.
    d = _lift(_f32(load("d")), 3)
    out = []
    for l in range(2):
        qh = load("qh", ALL, l, ALL)
        for k in range(2):
            qs = load("qs", ALL, k, l, ALL)
            for p in range(2):
                sc = _lift(d * _f32(load("scales", ALL, p, k, l)), 4)
                out.append(nibbles_f16(qs, p, sc, -32.0 * sc, asm, qh, 2 * (2 * p + k)))
    return out


def _q2_k(load: Load) -> Factors:
    # Value 128h + 32j + 16s + r: qs byte (h, s, r) bits 2j, scales byte (h, j, s). Four parts of [BN, C, 2, 2, 16].
    d, dmin = _lift(_f32(load("d")), 4), _lift(_f32(load("dmin")), 4)
    qs = load("qs", ALL, ALL, ALL).astype(jnp.int32)
    out = []
    for j in range(4):
        s = load("scales", ALL, j, ALL).astype(jnp.int32)  # [BN, C, 2, 2]
        dsc, dmn = _lift(d * _f32(s & 0xF), 5), _lift(dmin * _f32(s >> 4), 5)
        out.append((_f32((qs >> (2 * j)) & 3), dsc, -dmn, (ALL, j, ALL, ALL)))
    return out


def _q3_k(load: Load) -> Factors:
    # Value 128h + 32j + 16s + r: qs byte (h, s, r) bits 2j, hmask byte (s, r) bit 4h + j, scale (h, j, s).
    d = _lift(_f32(load("d")), 4)
    qs = load("qs", ALL, ALL, ALL).astype(jnp.int32)
    hmask = jax.lax.expand_dims(load("hmask", ALL, ALL).astype(jnp.int32), (2,))  # [BN, C, 1, 2, 16]
    half = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 1), 2)
    out = []
    for j in range(4):
        q = ((qs >> (2 * j)) & 3) | (((hmask >> (4 * half + j)) & 1) << 2)
        sc = _lift(d * _f32(load("scales", ALL, j, ALL)), 5)
        out.append((_f32(q - 4), sc, None, (ALL, j, ALL, ALL)))
    return out


# IQ4_KVALUES as four little-endian words of four int8 bytes: `_iq4_value` looks a code up by shifts and selects, as
# Triton has no register-table lookup.
_IQ4_WORDS = tuple(sum((v & 0xFF) << (8 * i) for i, v in enumerate(IQ4_KVALUES[w : w + 4])) for w in range(0, 16, 4))


def _iq4_value(code: jax.Array) -> jax.Array:
    """IQ4_KVALUES[code] for int32 codes 0..15, as float32: the code's word picked by its bits 3 and 2, its byte by
    bits 1 and 0, then sign-extended."""
    w = [jnp.uint32(v) for v in _IQ4_WORDS]
    word = jnp.where((code & 8) != 0, jnp.where((code & 4) != 0, w[3], w[2]), jnp.where((code & 4) != 0, w[1], w[0]))
    byte = ((word >> ((code & 3) * 8).astype(jnp.uint32)) & 0xFF).astype(jnp.int32)
    return _f32(byte - ((byte & 0x80) << 1))


def _iq4_nl(load: Load) -> Factors:
    d = _lift(_f32(load("d")), 3)
    return [(_iq4_value(q), d, None, (p, ALL)) for p, q in enumerate(_nibble_parts(load("qs", ALL)))]


def _iq4_xs(load: Load) -> Factors:
    # Value 32b + 16p + r: qs byte (b, r) nibble p, scale b. Two parts of [BN, C, 8, 16].
    sc = _lift(_lift(_f32(load("d")), 3) * _f32(load("scales", ALL)), 4)
    return [(_iq4_value(q), sc, None, (ALL, p, ALL)) for p, q in enumerate(_nibble_parts(load("qs", ALL, ALL)))]


FORMATS: dict[QT, Format] = {
    QT.Q8_0: Format(32, {"qs": (32,), "d": ()}, (32,), _q8_0, _q8_0_ptx),
    QT.Q4_0: Format(
        32, {"qs": (16,), "d": ()}, (2, 16), _q4_0, functools.partial(_blocks_of_32_ptx, bits=4, offset=False)
    ),
    QT.Q4_1: Format(
        32, {"qs": (16,), "d": (), "m": ()}, (2, 16), _q4_1, functools.partial(_blocks_of_32_ptx, bits=4, offset=True)
    ),
    QT.Q5_0: Format(
        32, {"qs": (16,), "qh": (), "d": ()}, (2, 16), _q5_0, functools.partial(_blocks_of_32_ptx, bits=5, offset=False)
    ),
    QT.Q5_1: Format(
        32,
        {"qs": (16,), "qh": (), "d": (), "m": ()},
        (2, 16),
        _q5_1,
        functools.partial(_blocks_of_32_ptx, bits=5, offset=True),
    ),
    QT.MXFP4: Format(32, {"qs": (16,), "e": ()}, (2, 16), _mxfp4),
    QT.Q4_K: Format(
        256,
        {"qs": (4, 32), "scales": (4, 2), "mins": (4, 2), "d": (), "dmin": ()},
        (4, 2, 32),
        _q4_k,
        _q4_k_ptx,
        functools.partial(_q4_k, whole=True),
        functools.partial(_q4_k_ptx, whole=True),
    ),
    QT.Q5_K: Format(
        256,
        {"qs": (4, 32), "qh": (32,), "scales": (4, 2), "mins": (4, 2), "d": (), "dmin": ()},
        (4, 2, 32),
        _q5_k,
        _q5_k_ptx,
    ),
    QT.Q6_K: Format(
        256,
        {"qs": (2, 2, 2, 16), "qh": (2, 2, 16), "scales": (2, 2, 2, 2), "d": ()},
        (2, 2, 2, 2, 16),
        _q6_k,
        _q6_k_ptx,
    ),
    QT.Q2_K: Format(256, {"qs": (2, 2, 16), "scales": (2, 4, 2), "d": (), "dmin": ()}, (2, 4, 2, 16), _q2_k),
    QT.Q3_K: Format(256, {"qs": (2, 2, 16), "hmask": (2, 16), "scales": (2, 4, 2), "d": ()}, (2, 4, 2, 16), _q3_k),
    QT.IQ4_NL: Format(32, {"qs": (16,), "d": ()}, (2, 16), _iq4_nl),
    QT.IQ4_XS: Format(256, {"qs": (8, 16), "scales": (8,), "d": ()}, (8, 2, 16), _iq4_xs),
}
KERNEL_TYPES = frozenset(FORMATS)  # the quantized formats (the MoE kernels take these)


def _plain(load: Load) -> Factors:
    """Unlike the quantized formats' float32 codes, the values in their own dtype and no scale: every caller casts
    them to its dot's operand type, and a float16 or bfloat16 tile loaded for a dot of that type then needs no
    conversion."""
    return [(load("w"), None, None, (ALL,))]


# Unquantized matrices (a tiny model's projections, an f16 output head, the MoE router's f32 weights), viewed in
# blocks of 32 like Q8_0 without a scale. Why the kernels take them at all: XLA's dot sums a row in an order that
# depends on the product's rows (measured on an H200: the rows past 256 of a 512-row product change bits), and a
# prefill dispatch of several sequences must give each the bits it gets alone. The tensor-core dot rounds them to
# float16 (10-bit mantissas: BF16's 8 bits fit; values past float16's range would not, and model weights are far
# inside it); the per-row kernel keeps float32.
PLAIN_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})
FORMATS |= {qt: Format(32, {"w": (32,)}, (32,), _plain) for qt in PLAIN_TYPES}
MATVEC_TYPES = frozenset(FORMATS)  # what `qmatvec` takes
PTX_TYPES = frozenset(qt for qt, fmt in FORMATS.items() if fmt.ptx is not None)  # what Plan.ptx takes


@functools.cache
def ptx_runs() -> bool:
    """Whether the default device runs Plan.ptx's asm: an NVIDIA GPU of sm_53 or later (PTX's packed float16
    arithmetic needs it)."""
    capability = cuda_capability()
    return capability is not None and capability >= 5.3


@functools.cache
def parts_layout(qtype: QT) -> tuple[tuple[tuple, ...], tuple[int, ...]]:
    """Per part of the format's dequantization: its index into x's super-block view (`Format.x_inner`), and the
    shape t of one super-block's slice of that part (the same for every part of a format)."""
    fmt = FORMATS[qtype]
    indices: list[tuple] = []

    def dequantized():
        def load(name, *index):
            inner = fmt.planes[name]
            index = index + (ALL,) * (len(inner) - len(index))
            return jnp.zeros((1, 1, *(d for d, i in zip(inner, index, strict=True) if i == ALL)), jnp.uint8)

        parts = fmt.parts(load)
        indices.extend(x_index for _, x_index in parts)
        return [w for w, _ in parts]

    shapes = jax.eval_shape(dequantized)
    part_shapes = {s.shape[2:] for s in shapes}
    assert len(part_shapes) == 1, part_shapes
    return tuple(indices), part_shapes.pop()


def x_parts(x: jax.Array, qtype: QT, dtype) -> jax.Array:
    """x [rows, K] -> [P, rows, K / P] of `dtype`: part p's values of each super-block, in the part's order (what
    a dot with the dequantized part [BN, C * t] takes, without reshaping x in the kernel)."""
    fmt = FORMATS[qtype]
    x_indices, _ = parts_layout(qtype)
    rows, k = x.shape
    xv = x.astype(dtype).reshape(rows, k // fmt.sb, *fmt.x_inner)
    return jnp.stack([xv[(ALL, ALL, *idx)].reshape(rows, -1) for idx in x_indices])


@dataclasses.dataclass(frozen=True)
class Plan:
    block_n: int
    chunk: int  # super-blocks per loop step
    splits: int  # programs along K
    steps: int  # loop steps per program
    num_warps: int = 4
    num_stages: int = 3
    # The per-row kernel: sum code * x over each run of values that share a scale, then scale that sum (and add
    # offset * the run's sum of x), instead of dequantizing every value first: per value a multiply and an add
    # fewer. Other bits than the dequantize-first order (another order of float32 operations). Not yet timed.
    factored: bool = False
    # The per-row kernel: load the next step's plane tiles before this step's arithmetic (carried in registers),
    # so their latency overlaps it. Why by hand: Triton's pipeliner stages the loads that feed a dot, and these
    # do not. Not yet timed.
    prefetch: bool = False
    # Each value's scale * code + offset as one fused multiply-add (both kernels), and the per-row kernel's
    # products' multiply-adds too (PTX fma.rn.f32 by inline assembly; interpret mode rounds twice). Why by hand:
    # XLA builds the kernels' float multiplies and adds apart (no FFMA on the card, docs/PERFORMANCE.md, sixteenth
    # session). Other bits (one rounding where there were two). Not yet timed.
    fma: bool = False
    # The per-row kernel on x rounded to int8 in blocks of 32 (worker/pallas_kernels/qmatvec_int8.py): integer dot
    # products of four codes at once. Every quantized format, dense and gathered. Another precision of x. Timed on
    # an H200: 16.4 us against 25.9 float on phi3-mini's Q4_K gate_up (docs/kernels.md), before the nineteenth
    # session's one float order and INT8_BLOCK_N. With tensor_cores, qmatvec's dense call takes the
    # int8-x dot instead, with the same bits a row.
    int8_x: bool = False
    # The int8-x kernels' K loop written out step by step (qmatvec_int8._k_loop), as a Triton kernel whose sizes are
    # constants gets it: every step's loads can be issued before the first step's arithmetic, and their addresses
    # are constant offsets. The same operations in the same order, so the same bits. Counted for sm_90a (one row,
    # tools/kernel_sass.py, instructions a program): phi3's Q4_K gate_up 1,526 -> 1,260 (4 steps; 43 -> 46
    # registers), its qkv -14%, Q6_K down -8%, gpt-oss's Q8_0 -10%, MXFP4 -2%, its gathered experts -11%; the dot
    # loses Triton's software pipeline (shared memory 16 -> 2 KiB at 16 rows). Timed alone on an H200 (2026-12-05,
    # bench.kernels' `unrolled` column): no faster (phi3's gate_up 19.7 against 19.2 us, qwen2.5's gate 3.8 against
    # 3.9). In the whole step (qwen2.5-0.5b one stream, H100, 2026-12-06): +0.6%, with a first compile of 109 s
    # against 10 s. Off; WORKER_INT8_UNROLL=1 turns it on.
    unroll: bool = False
    # The int8-x per-row kernel: at most this many programs along N (the output's columns), each taking the column
    # tiles `programs` apart one after another (0: a program a tile). Fewer weight rows in flight at once, each read
    # for longer: gpt-oss-20b's 201k-row Q8_0 head had every one of its 1,571 tiles in flight (occupancy 100%) and
    # read at 0.73 TB/s, a quarter of the copy bandwidth, where its 5k-row q|k|v read at 1.38 (H100, 2026-12-06).
    # The same operations a row, so the same bits. `plan`'s default: INT8_PROGRAMS (timed there).
    programs: int = 0
    # The float tensor-core kernel's dot swapped (`_dot_kernel`): the dequantized weight tile as its left operand, so
    # that the MMA's M is the tile's SWAP_BLOCK_N output columns, and x's rows as its right, its N, which Hopper's
    # wgmma takes from 8 up; the row tile then follows the rows (16, 32 or 64) where the unswapped dot must keep 64
    # (its smaller tiles are another MMA instruction, with other bits: docs/kernels.md). At one row the unswapped
    # dot stages a 64-row x tile of masked zeros in shared memory every step, and the card's L1/shared path was its
    # bound (73% busy, DRAM 15%: docs/PERFORMANCE.md, sixteenth session). A row's bits are the same for every row
    # tile on the card (wgmma's N: its gpu test passed on an H100, 2026-12-07); decode's default. Other bits than the
    # unswapped dot (another tile of columns, so another K split), so a model takes one or the other for every call.
    swap: bool = False
    # The float tensor-core kernel's weight tiles made by inline PTX in float16 pairs (Format.ptx, the formats that
    # have it; interpret mode runs its float32 twin): 3.91 instructions a value where the float path takes 6.84
    # (phi3's Q4_K gate_up, swapped, one row; sm_90a, tools/kernel_sass.py). The K-quants' bits differ from the
    # float path's (docs/kernels.md).
    ptx: bool = False


def plan(
    qtype: QT,
    n: int,
    k: int,
    selections: int = 1,
    block_n: int | None = None,
    chunk: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
    factored: bool = False,
    prefetch: bool = False,
    fma: bool = False,
    int8_x: bool = False,
    unroll: bool = False,
    programs: int | None = None,
    swap: bool = False,
    ptx: bool = False,
) -> Plan:
    """The tiling for an [n, k] weight: a function of the weight's shape and format only, never of the number of
    rows of x or of (token, expert) pairs, so that every row is computed with the same tiles, K split and
    summation order in a call of any size (batch invariance). `selections`: the experts each token selects (a
    model constant; 1 for a dense weight): splits are sized for one token's call. Arguments left None get the
    defaults of docs/kernels.md; bench/kernels.py --sweep tries others."""
    fmt = FORMATS[qtype]
    blocks = k // fmt.sb
    if block_n is None and int8_x:  # one output row a thread (`INT8_BLOCK_N`)
        block_n = min(INT8_BLOCK_N, pl.next_power_of_2(n))
    elif block_n is None:
        block_n = min(32, pow2_floor(TARGET_VALUES // fmt.sb), pl.next_power_of_2(n))
    else:  # never wider than the weight (a function of its shape still)
        block_n = min(block_n, max(MIN_DOT, pl.next_power_of_2(n)))
    if chunk is None:
        chunk = min(pow2_floor(TARGET_VALUES // (block_n * fmt.sb)), pl.next_power_of_2(blocks))
    if unroll and not int8_x:
        raise ValueError("unroll is the int8-x kernels' (int8_x=True); the float kernels keep their loop")
    if programs is None:
        programs = INT8_PROGRAMS if int8_x else 0
    if swap and int8_x:
        raise ValueError("swap is the float tensor-core kernel's; the int8-x dot's row tile follows the rows already")
    if programs and not int8_x or programs < 0:
        raise ValueError(f"programs is the int8-x per-row kernel's (int8_x=True), 0 or more; got {programs}")
    for name, v in (("block_n", block_n), ("chunk", chunk)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two (a Triton tile dimension), got {v}")
    n_chunks = pl.cdiv(blocks, chunk)
    if splits is None:
        splits = max(1, pl.cdiv(TARGET_PROGRAMS, pl.cdiv(n, block_n) * selections))
    steps = pl.cdiv(n_chunks, min(max(1, splits), n_chunks))
    if num_warps is None:
        num_warps = max(1, block_n // 32) if int8_x else 4
    splits = pl.cdiv(n_chunks, steps)
    if ptx and (int8_x or fmt.ptx is None):
        names = ", ".join(sorted(t.name for t in PTX_TYPES))
        raise ValueError(f"ptx is the float tensor-core kernel's, on {names}; got {qtype.name}")
    return Plan(block_n, chunk, splits, steps, num_warps, num_stages, factored, prefetch, fma, int8_x, unroll, programs,
                swap, ptx)  # fmt: skip


def _kernel(*refs, fmt: Format, names: Sequence[str], n: int, blocks: int, rows: int, p: Plan, gathered: bool,
            fused: bool, has_live: bool = False, x_share: int = 1):  # fmt: skip
    """The per-row kernel (a float32 multiply-add per value and row). Dense: program (r, i, j) computes output
    columns [i*BN, (i+1)*BN) over split j of K for x rows [r*rows, (r+1)*rows). Gathered: program (t, i, j), for
    output row t only, with expert ids[t] and x row t // x_share. `has_live`: the first operand says which rows are
    live (`when_live`)."""
    live_ref, *refs = refs if has_live else (None, *refs)
    if gathered:
        ids_ref, x_ref, *plane_refs, o_ref = refs
    else:
        x_ref, *plane_refs, o_ref = refs
    planes = dict(zip(names, plane_refs, strict=True))
    bn, c = p.block_n, p.chunk
    if gathered:
        t, row0, split = pl.program_id(0), pl.program_id(1) * bn, pl.program_id(2)
        expert, x_rows = expert_at(ids_ref, t, plane_refs[0]), [t]
    else:
        first, row0, split = pl.program_id(0) * rows, pl.program_id(1) * bn, pl.program_id(2)
        expert, x_rows = static_index(0), [first + m for m in range(rows)]
    rows_ok = (row0 + jnp.arange(bn)) < n if n % bn else None
    mask_k = p.splits * p.steps * c > blocks

    def blocks_at(s):
        b0 = (split * p.steps + s) * c
        return b0, (b0 + jnp.arange(c)) < blocks if mask_k else None

    def tiles_at(s) -> list[jax.Array]:
        """Step s's plane tiles, in the order fmt.factors loads them (its arithmetic here is dead code)."""
        tiles: list[jax.Array] = []
        b0, blocks_ok = blocks_at(s)
        load = tile_loader(planes, fmt, expert, row0, b0, bn, c, rows_ok, blocks_ok)
        fmt.factors(lambda name, *index: tiles.append(load(name, *index)) or tiles[-1])
        return tiles

    def step(s, carry):
        acc, tiles = carry if p.prefetch else (carry, None)
        b0, blocks_ok = blocks_at(s)
        if p.prefetch:  # the next step's loads first (the last step loads its own tiles again: in bounds, cached)
            ahead = tiles_at(jnp.minimum(s + 1, p.steps - 1))
            loaded = iter(tiles)
            factors = fmt.factors(lambda *_: next(loaded))
        else:
            factors = fmt.factors(tile_loader(planes, fmt, expert, row0, b0, bn, c, rows_ok, blocks_ok))
        if not p.factored:
            factors = [(_value(code, scale, offset, fused), None, None, x_index)
                       for code, scale, offset, x_index in factors]  # fmt: skip
        out = []
        for a, m in zip(acc, x_rows, strict=True):
            prod = None
            for code, scale, offset, x_index in factors:
                ref = x_ref.at[static_index(m // x_share if x_share > 1 else m), pl.ds(b0, c),
                               *map(static_index, x_index)]  # fmt: skip
                if blocks_ok is None:
                    xv = plgpu.load(ref)
                else:
                    xv = plgpu.load(ref, mask=jax.lax.broadcast_in_dim(blocks_ok, code.shape[1:], (0,)), other=0)
                xv = jax.lax.expand_dims(xv, (0,))
                if scale is None:  # dequantized first (or a plain format): value * x, added to the parts before
                    # Unfused: prod + value * x in that order, as before the option (interpret mode's XLA may
                    # contract a product and an add, so the operands' order can change its bits).
                    prod = code * xv if prod is None else _fma(code, xv, prod, True) if fused else prod + code * xv
                    continue
                # scale * sum(code * x) + offset * sum(x) over each run sharing a scale
                term = scale * jnp.sum(code * xv, axis=-1, keepdims=True)
                if offset is not None:
                    term = _fma(offset, jnp.sum(xv, axis=-1, keepdims=True), term, fused)
                prod = term if prod is None else prod + term
            while prod.ndim > 1:  # Triton reduces one axis at a time
                prod = jnp.sum(prod, axis=-1)
            out.append(a + prod)
        return (tuple(out), ahead) if p.prefetch else tuple(out)

    def store(acc) -> None:
        for a, m in zip(acc, x_rows, strict=True):
            o_ref[split, static_index(m), pl.ds(row0, bn)] = a

    def compute() -> None:
        acc = tuple(jnp.zeros((bn,), jnp.float32) for _ in x_rows)
        acc = jax.lax.fori_loop(0, p.steps, step, (acc, tiles_at(0)) if p.prefetch else acc)
        store(acc[0] if p.prefetch else acc)

    when_live(live_ref, x_rows, compute, lambda: store([jnp.zeros((bn,), jnp.float32)] * len(x_rows)))


def when_live(live_ref, x_rows: Sequence, compute: Callable[[], None], store_zeros: Callable[[], None]) -> None:
    """compute() where any of the program's `x_rows` is live (live_ref: int32 a row, nonzero for live; None: all
    are), else store_zeros(). Why: a one-stream decode step runs a bucket of 2 rows (runner.MIN_ROWS), and the
    per-row kernels are bound by their instructions, so the padding row cost ~65% more on phi3-mini's gate_up
    (ncu on an H200, int8 x: 28.0 us against 16.9 for one row); its program now reads nothing. The float kernel's
    form; the int8-x kernel's is `live_steps` (docs/kernels.md)."""
    if live_ref is None:
        compute()
        return
    alive = _any_live(live_ref, x_rows)
    pl.when(alive)(compute)
    pl.when(jnp.logical_not(alive))(store_zeros)


def live_steps(live_ref, x_rows: Sequence, steps: int) -> int | jax.Array:
    """A program's K-loop trip count: `steps` where any of its `x_rows` is live (live_ref as `when_live`'s; None:
    all are), else 0, so a dead program stores the loop's zeros without reading the weights. The same skip as
    `when_live` with one straight path (the int8-x kernel inside `pl.when` was slower on an H200). A model passes it
    only to the routed experts' calls, a program a pair either way: on dense calls, one row a program with the
    padding row's skipped was slower than two rows a program (H200, 2026-12-06: phi3-mini 340.0 -> 262.4 tok/s;
    worker.ops.qmatmul)."""
    if live_ref is None:
        return steps
    return jnp.where(_any_live(live_ref, x_rows), jnp.int32(steps), jnp.int32(0))


def _any_live(live_ref, x_rows: Sequence) -> jax.Array:
    alive = live_ref[static_index(x_rows[0])] != 0
    for m in x_rows[1:]:
        alive = alive | (live_ref[static_index(m)] != 0)
    return alive


def _dot_kernel(x_ref, *refs, fmt: Format, names: Sequence[str], n: int, blocks: int, p: Plan, t_size: int,
                x_rows: int, bm: int, precision, fused: bool, interpret: bool):  # fmt: skip
    """Dense: program (r, i, j) computes rows [r*BM, (r+1)*BM) of x (in parts, `x_parts`; `x_rows` rows) against
    output columns [i*BN, (i+1)*BN) over split j of K, one dot per dequantized part. Rows past x_rows are masked
    loads of zeros, not zeros in memory: one row reads one row of x, while its dot is the same BM-row product as in
    a full call (so the row's bits are too). With `Plan.swap`, each dot is w @ x.T ([BN, BM]: the MMA's M is the
    weight tile's columns), and the sums are stored transposed."""
    *plane_refs, o_ref = refs
    planes = dict(zip(names, plane_refs, strict=True))
    bn, c = p.block_n, p.chunk
    r0, row0, split = pl.program_id(0) * bm, pl.program_id(1) * bn, pl.program_id(2)
    rows_ok = (row0 + jnp.arange(bn)) < n if n % bn else None
    x_ok = (r0 + jnp.arange(bm)) < x_rows if x_rows % bm else None
    mask_k = p.splits * p.steps * c > blocks

    def step(s, acc):
        b0 = (split * p.steps + s) * c
        blocks_ok = (b0 + jnp.arange(c)) < blocks if mask_k else None
        load = tile_loader(planes, fmt, static_index(0), row0, b0, bn, c, rows_ok, blocks_ok)
        if p.ptx:
            tiles = ((p.swap and fmt.swapped_ptx) or fmt.ptx)(load, not interpret)
        else:
            factors = ((p.swap and fmt.swapped_factors) or fmt.factors)(load)
            tiles = [_value(code, scale, offset, fused) for code, scale, offset, _ in factors]
        for part, w in enumerate(tiles):
            xv = load_x_part(x_ref, part, r0, bm, b0, c, t_size, blocks, x_ok, blocks_ok)
            w = w.reshape(bn, c * t_size).astype(xv.dtype)
            lhs, rhs = (w, xv) if p.swap else (xv, w)
            acc += jax.lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())), precision=precision,
                                       preferred_element_type=jnp.float32)  # fmt: skip
        return acc

    acc = jax.lax.fori_loop(0, p.steps, step, jnp.zeros((bn, bm) if p.swap else (bm, bn), jnp.float32))
    acc = acc.T if p.swap else acc
    out = o_ref.at[split, pl.ds(r0, bm), pl.ds(row0, bn)]
    if x_ok is None:
        out[...] = acc
    else:  # the output holds x's rows only (`_call`): a row tile's rows past them are not stored
        plgpu.store(out, acc, mask=_mask((bm, bn), x_ok, None))


def _mask(shape: tuple[int, ...], along0: jax.Array | None, along1: jax.Array | None) -> jax.Array | None:
    """The and of `along0` broadcast along axis 0 of `shape` and `along1` along axis 1; None when both are None."""
    masks = [jax.lax.broadcast_in_dim(m, shape, (axis,)) for axis, m in ((0, along0), (1, along1)) if m is not None]
    return masks[0] & masks[1] if len(masks) == 2 else (masks[0] if masks else None)


def tile_loader(planes, fmt: Format, expert, row0, b0, bn: int, c: int, rows_ok, blocks_ok) -> Load:
    """load(name, *index): the masked tile [BN, C, *rest] of a plane at output rows row0.., super-blocks b0..,
    with `index` applied to the plane's inner view (what Format.parts calls). The tensor-core kernels' too."""

    def load(name: str, *index) -> jax.Array:
        inner = fmt.planes[name]
        index = index + (ALL,) * (len(inner) - len(index))
        shape = (bn, c, *(d for d, i in zip(inner, index, strict=True) if i == ALL))
        ref = planes[name].at[expert, pl.ds(row0, bn), pl.ds(b0, c), *map(static_index, index)]
        return masked_load(ref, _mask(shape, rows_ok, blocks_ok))

    return load


def load_x_part(x_ref, part: int, r0, bm: int, b0, c: int, t_size: int, blocks: int, rows_ok, blocks_ok) -> jax.Array:
    """The tensor-core kernels' x tile [BM, C * t] of part `part` (x laid out by `x_parts`) at rows r0..,
    super-blocks b0..: rows where rows_ok is false and super-blocks past `blocks` load as zeros."""
    ref = x_ref.at[static_index(part), pl.ds(r0, bm), pl.ds(b0 * t_size, c * t_size)]
    cols_ok = None if blocks_ok is None else (b0 * t_size + jnp.arange(c * t_size)) < blocks * t_size
    return masked_load(ref, _mask((bm, c * t_size), rows_ok, cols_ok))


def plane_views(w: QuantArray, experts: int, n: int, k: int) -> tuple[list[str], list[jax.Array]]:
    """Each plane of `w` viewed (a free reshape) as [experts, n, k / SB, *inner] in its format's layout."""
    fmt = FORMATS[w.qtype]
    names = sorted(fmt.planes)
    return names, [w.planes[name].reshape(experts, n, k // fmt.sb, *fmt.planes[name]) for name in names]


def _call(
    x: jax.Array,
    w: QuantArray,
    ids: jax.Array | None,
    experts: int,
    n: int,
    p: Plan,
    interpret: bool,
    tensor_cores: bool = False,
    row_tile: int = ROW_TILE,
    f16: bool | None = None,
    live: jax.Array | None = None,
    x_share: int = 1,
    norm: tuple[jax.Array, float] | None = None,
    epilogue: tuple | None = None,
    glu: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array | None]:
    """x [T, K]; returns the split-K partial sums summed: [T, N] float32 (with `epilogue`: as `qmatvec`). Dense
    with `tensor_cores`: rows in tiles of `row_tile` (`_dot_kernel`), float16 operands where `f16` (default: not in
    interpret mode); dense without: rows in groups of `row_group`, the last padded with zero rows; gathered: one
    program per row, or with `x_share` a program per (row, selection) pair: x [M, K] and ids [M * x_share], output
    row i reading x row i // x_share (the k selections of a token share its x: neither broadcast by XLA nor rounded
    k times). `live` [T] (per-row only): a group of rows none of which is live is zeros, computed by nobody."""
    fmt = FORMATS[w.qtype]
    t, k = x.shape[0] * x_share, x.shape[1]
    if live is not None and tensor_cores:
        raise ValueError("live rows are an option of the per-row kernels")
    group = 1 if ids is not None else row_group(t, live is not None)
    out_rows = t if tensor_cores else pl.cdiv(t, group) * group  # the per-row kernels' rows: whole groups
    live_arg = [] if live is None else [jnp.pad(live.reshape(t).astype(jnp.int32), (0, out_rows - t))]
    if p.int8_x:
        from worker.pallas_kernels import qmatvec_int8  # it builds on this module's tiles

        tile = {"row_tile": row_tile} if tensor_cores else {}
        if epilogue is not None and not tensor_cores and ids is None:
            _, y, counts = qmatvec_int8.call(x, w, ids, experts, n, p, interpret, group, *live_arg, x_share=x_share,
                                             norm=norm, glu=glu, epilogue=epilogue)  # fmt: skip
            return y[:t, :n], counts
        out = qmatvec_int8.call(x, w, ids, experts, n, p, interpret, group, *live_arg, **tile, x_share=x_share,
                                norm=norm, glu=glu)  # fmt: skip
        y = fold_splits(out)[:t, :n]
        return y if epilogue is None else _epilogue_after(y, *epilogue)
    names, planes = plane_views(w, experts, n, k)
    n_blocks = pl.cdiv(n, p.block_n)
    # `fused`: Plan.fma's inline assembly, which only a compiled kernel runs (interpret mode rounds twice)
    common = dict(fmt=fmt, names=names, n=n, blocks=k // fmt.sb, p=p, fused=p.fma and not interpret)
    scale = None
    if tensor_cores:
        # x and the output keep their own rows: a row tile's rows past them are masked loads of zeros and masked
        # stores. Why not pad the output to whole row tiles: a decode step of two rows would then write and fold
        # 64 rows of split-K partials a matvec, for phi3-mini a third again of the bytes its weights take.
        if f16 if f16 is not None else not interpret:
            # float16 operands (10-bit mantissas, as TF32's, at twice TF32's tensor-core rate), float32 sums
            scale = row_scale(x)
            xp, precision = x_parts(x / scale, w.qtype, jnp.float16), None
        else:  # float32 operands and sums
            xp, precision = x_parts(x, w.qtype, jnp.float32), jax.lax.Precision.HIGHEST  # [P, T, K / P]
        t_size = math.prod(parts_layout(w.qtype)[1])
        kernel = functools.partial(_dot_kernel, **common, t_size=t_size, x_rows=t, bm=row_tile, precision=precision,
                                   interpret=interpret)  # fmt: skip
        grid, args = (pl.cdiv(t, row_tile), n_blocks, p.splits), (xp, *planes)
    else:
        xv = jnp.pad(x.astype(jnp.float32), ((0, (out_rows - t) // x_share), (0, 0)))
        xv = xv.reshape(out_rows // x_share, k // fmt.sb, *fmt.x_inner)
        kernel = functools.partial(_kernel, **common, rows=group, gathered=ids is not None, has_live=bool(live_arg),
                                   x_share=x_share)  # fmt: skip
        grid, args = (out_rows // group, n_blocks, p.splits), (*live_arg, *([] if ids is None else [ids]), xv, *planes)
    # The row tiles (gathered: the rows) vary fastest, so the programs that read one weight tile run together and
    # share it through L2.
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p.splits, out_rows, n_blocks * p.block_n), jnp.float32),
        grid=grid,
        compiler_params=TritonParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=interpret,
        name=f"qmatvec_{w.qtype.name.lower()}{'_dot' if tensor_cores else ''}",  # the kinds apart in traces
    )(*args)
    y = fold_splits(out)[:t, :n]
    y = y if scale is None else y * scale
    return y if epilogue is None else _epilogue_after(y, *epilogue)


def _epilogue_after(y: jax.Array, bias: jax.Array | None, residual: jax.Array | None,
                    counts: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:  # fmt: skip
    """`qmatvec`'s epilogue done after the kernel, by XLA: residual + (y + bias), the counts untouched."""
    y = y if bias is None else y + bias
    return (y if residual is None else residual + y), counts


def row_group(t: int, live: bool) -> int:
    """Rows a dense per-row program computes (weight tiles decoded once for them all): min(T, MAX_ROWS); with live
    rows known, one a program up to 2 rows (one stream's bucket, whose padding row's program then skips)."""
    return 1 if live and t <= 2 else min(t, MAX_ROWS)


def row_scale(x: jax.Array) -> jax.Array:
    """[T, 1]: each row's power of two at or above its largest |value| (1 for a zero row), so x / scale lies in
    [-1, 1], inside float16's range, and dividing by it rounds nothing. A row's scale is its own (batch invariant)."""
    _, e = jnp.frexp(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True))  # top = m * 2^e, m < 1
    return jnp.ldexp(jnp.ones(e.shape, jnp.float32), e)


def fold_splits(partials: jax.Array) -> jax.Array:
    """The sum over the leading (split) axis as a chain of adds in split order. Why not jnp.sum: XLA picks a
    reduction's order from the whole shape (the number of rows included), which would make a row's result depend
    on the batch; elementwise adds in a fixed order do not."""
    total = partials[0]
    for part in partials[1:]:
        total = total + part
    return total


def _check(w: QuantArray, plane_ndim: int) -> None:
    if w.qtype not in FORMATS:
        raise NotImplementedError(f"no quantized matvec kernel for {w.qtype.name}")
    if any(a.ndim != plane_ndim for a in w.planes.values()):
        raise ValueError(f"{w.qtype.name} weight: expected planes of rank {plane_ndim}")


def swap_row_tile(rows: int) -> int:
    """The row tile of a call of `rows` rows where it follows the rows (the swapped dot's MMA N, the int8-x dot's)."""
    return min(ROW_TILE, max(MIN_DOT, pl.next_power_of_2(rows)))


@kernel_entry("interpret", "tensor_cores", "row_tile", "f16", "norm_eps", "glu", "swap", *TILE_ARGS)
def qmatvec(
    x: jax.Array,
    w: QuantArray,
    *,
    interpret: bool = False,
    tensor_cores: bool = True,
    row_tile: int | None = None,
    swap: bool = False,
    f16: bool | None = None,
    live: jax.Array | None = None,
    norm_w: jax.Array | None = None,
    norm_eps: float = 0.0,
    glu: str | None = None,
    epilogue: tuple[jax.Array | None, jax.Array | None, jax.Array | None] | None = None,
    **tiles: int | None,
) -> jax.Array | tuple[jax.Array, jax.Array | None]:
    """x [..., K] @ dequant(w [N, K]).T -> float32 [..., N], for any number of rows of x; each row's result is
    the same bits in a call of any size with the same `tensor_cores` and tiles. `live` [...] (bool, per-row kernels
    only): the rows whose results are used; the others may come out as zeros, uncomputed. `tensor_cores`: the dot of
    `row_tile` rows (default ROW_TILE; float16 operands, float32 sums on the GPU; one pass over the weights a row
    tile), else the per-row multiply-add loop (float32; one pass per 8 rows, faster for a few). `f16`: the
    tensor-core dot's float16 operands, by default on the GPU only; interpret mode takes float32 (the CPU's model
    tests gate at float32's error) unless f16=True, which runs the GPU's arithmetic on the CPU (tests). `tiles`:
    overrides of `plan`'s arguments (block_n, chunk, splits, num_warps, num_stages, int8_x); PREFILL_TILES are
    prefill's. With int8_x, `tensor_cores` takes the int8-x dot (its row tile by the rows unless given), whose rows
    have the per-row int8-x kernel's bits (qmatvec_int8). `norm_w` (int8_x only): x is RMSNorm's input (weight
    norm_w, epsilon norm_eps), normalized by the kernel that rounds it (qmatvec_int8.quantize_x's `norm`). `glu`
    (int8_x only; qmatvec_int8.GLU_ACTIVATIONS): x is [..., 2K], a gated unit's [gate | up], and the product's input
    act(gate) * up, computed by the kernel that rounds it (quantize_x's `glu`).
    `epilogue` (bias [N] or None, residual [..., N] or None, counts or None): returns (residual + (y + bias),
    counts), done by the int8-x per-row kernel's last program of each column tile (qmatvec_int8.Epilogue; `counts`
    threaded from call to call, zeros before and after), else by XLA after the kernel: the same bits either way.
    `swap` (float tensor cores only; Plan.swap): the dot with the weight as its left operand, SWAP_BLOCK_N columns
    a tile by default, and the row tile by the rows (unless given)."""
    _check(w, 2)
    n, k = next(iter(w.planes.values())).shape[0], w.shape[-1]
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x_k = 2 * k if glu is not None else k
    if x.shape[-1] != x_k or rows < 1:
        raise ValueError(f"qmatvec: x {x.shape} against weight [{n}, {k}] (at least one row)")
    # A dot tile is at least MIN_DOT wide. One stage: the x tile lives in shared memory, and more stages buffer
    # more of it. Timed on an H200 (docs/PERFORMANCE.md; bench/kernels.py --sweep): block_n 64, 8 warps, two stages or
    # two super-blocks a step each win on some formats and lose on others, by at most ~20%; these defaults are
    # within that of the best everywhere. The arithmetic, and so each row's bits, do not depend on these.
    # int8 x: the per-row kernel's plan for either kernel (the same K splits, so the same bits a row).
    int8_x = bool(tiles.get("int8_x"))
    if swap and not tensor_cores:
        raise ValueError("qmatvec: swap is an option of the tensor-core kernel (tensor_cores=True)")
    dense = {"block_n": max(MIN_DOT, min(SWAP_BLOCK_N if swap else 32, pl.next_power_of_2(n))), "num_stages": 1}
    p = plan(w.qtype, n, k, 1, swap=swap, **((dense if tensor_cores and not int8_x else {}) | tiles))
    # The int8-x dot sums rows exactly, so its tile can follow the rows; the float dot's only where swapped (the rows
    # are then the MMA's N), not as its M (another instruction below 64 rows: docs/kernels.md)
    follows = int8_x or swap
    row_tile = row_tile or (swap_row_tile(rows) if follows else ROW_TILE)
    if row_tile < MIN_DOT or row_tile & (row_tile - 1):
        raise ValueError(f"row_tile must be a power of two >= {MIN_DOT}, got {row_tile}")
    if (norm_w is not None or glu is not None) and not int8_x:
        raise ValueError("qmatvec: a norm or a gated unit first is an option of the int8-x kernels")
    norm = None if norm_w is None else (norm_w, norm_eps)
    if epilogue is not None:
        bias, residual, counts = epilogue
        residual = None if residual is None else residual.reshape(rows, n)
        y, counts = _call(x.reshape(rows, x_k), w, None, 1, n, p, interpret, tensor_cores, row_tile, f16, live,
                          norm=norm, epilogue=(bias, residual, counts), glu=glu)  # fmt: skip
        return y.reshape(*lead, n), counts
    y = _call(x.reshape(rows, x_k), w, None, 1, n, p, interpret, tensor_cores, row_tile, f16, live, norm=norm,
              glu=glu)  # fmt: skip
    return y.reshape(*lead, n)


def qmatvec_twin(x: jax.Array, w: QuantArray, *, interpret: bool = False, **_tiles) -> jax.Array:
    """The jax.numpy twin of `qmatvec` (the CPU path of worker.ops.qmatmul)."""
    del interpret
    return jnp.einsum(
        "...i,oi->...o", x.astype(jnp.float32), dequantize(w, jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def expert_at(ids_ref, i, plane_ref) -> jax.Array:
    """Expert id i of `ids_ref`, clamped to the experts of `plane_ref` [E, ...]: an id out of range must not read
    out of bounds. Clamped here, not by XLA before the call: there it was a kernel launch of its own, one a layer."""
    return jnp.clip(ids_ref[i], 0, plane_ref.shape[0] - 1)


def _selected_rows(x: jax.Array, expert_ids: jax.Array) -> jax.Array:
    """x [M, In] (shared by the k selections) or [M, k, In] -> [M * k, In]."""
    if x.ndim == expert_ids.ndim:
        x = jnp.broadcast_to(x[:, None], (*expert_ids.shape, x.shape[-1]))
    return x.reshape(-1, x.shape[-1])


@kernel_entry("interpret", "sorted_pairs", *TILE_ARGS)
def moe_matvec(
    x: jax.Array,
    experts: QuantArray,
    expert_ids: jax.Array,
    *,
    interpret: bool = False,
    live: jax.Array | None = None,
    sorted_pairs: int | None = None,
    **tiles: int | None,
) -> jax.Array:
    """The selected experts' products, as worker.ops.moe_matmul: x [M, In] or [M, k, In], experts [E, Out, In],
    expert_ids [M, k] -> float32 [M, k, Out], for any number of tokens. Each (token, selection) pair reads its
    expert's planes once and is computed the same way in a call of any size (the plan depends on k, not M).
    `live` [M] (bool): the tokens whose results are used; the others' pairs read nothing and come out as zeros
    (`when_live` / qmatvec_int8's trip count of 0), a live pair's bits unchanged. `sorted_pairs`: the pairs are
    sorted by expert from this many on (default SORTED_PAIRS; 0: always)."""
    _check(experts, 3)
    e, n = next(iter(experts.planes.values())).shape[:2]
    k = experts.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"moe_matvec: x {x.shape} against experts [{e}, {n}, {k}]")
    ids = expert_ids.reshape(-1).astype(jnp.int32)  # clamped in the kernels (`expert_at`)
    pairs_live = None
    if live is not None:  # a token's liveness for each of its k pairs, in the pairs' order
        pairs_live = jnp.broadcast_to(live.reshape(-1, 1), expert_ids.shape).reshape(-1)
    p = plan(experts.qtype, n, k, expert_ids.shape[-1], **tiles)
    sorted_from = SORTED_PAIRS if sorted_pairs is None else sorted_pairs
    if ids.size < sorted_from:  # the pairs in the tokens' order, a token's shared x read where it is
        x_share = expert_ids.shape[-1] if x.ndim == expert_ids.ndim else 1
        y = _call(x.reshape(-1, k), experts, ids, e, n, p, interpret, live=pairs_live, x_share=x_share)
        return y.reshape(*expert_ids.shape, n)
    # Many pairs: sorted by expert (a stable sort), so that the pairs of one expert are neighbours on the grid's
    # fastest axis and read its tiles from L2, not each from memory. A pair's arithmetic is the same wherever it
    # sits, so the sort (and skipping it for few pairs) keeps batch invariance.
    order = jnp.argsort(ids, stable=True)
    sorted_live = None if pairs_live is None else pairs_live[order]
    y = _call(_selected_rows(x, expert_ids)[order], experts, ids[order], e, n, p, interpret, live=sorted_live)
    return y[jnp.argsort(order)].reshape(*expert_ids.shape, n)


def moe_matvec_twin(
    x: jax.Array, experts: QuantArray, expert_ids: jax.Array, *, interpret: bool = False, **_tiles
) -> jax.Array:
    """The jax.numpy twin of `moe_matvec`: gather the selected experts' planes, dequantize, contract."""
    del interpret
    picked = QuantArray({k: jnp.take(p, expert_ids, axis=0) for k, p in experts.planes.items()}, experts.qtype,
                        experts.shape)  # fmt: skip
    wf = dequantize(picked, jnp.float32)  # [M, k, Out, In]
    eq = "mi,mkoi->mko" if x.ndim == expert_ids.ndim else "mki,mkoi->mko"
    return jnp.einsum(eq, x.astype(jnp.float32), wf, precision=jax.lax.Precision.HIGHEST)
