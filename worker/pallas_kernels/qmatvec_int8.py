"""The per-row quantized matvec on an int8 x: x rounded to 8 bits in blocks of 32 values (a scale a block), and each
weight code multiplied by it in integer dot products of four byte pairs (PTX dp4a), scaled once a block. An opt-in
variant of qmatvec's per-row kernels, dense and expert-gathered (`Plan.int8_x`; a model's with worker.load's
int8_x). On an H200 it made one stream's decode 1.29x (phi3-mini) to 1.34x (gpt-oss-20b) the float per-row
kernels' rate (docs/PERFORMANCE.md).

Why: the float per-row kernel is bound by its instructions, not by memory. On an H200 it spent 8.6 warp instructions
a weight value on phi3-mini's Q4_K gate_up (ncu), where the bytes alone would take a third of its time
(docs/kernels.md). Here four values take one dp4a, and a code plane is read as 32-bit words, so that extracting
four 4-bit codes is one AND (two with the shift of a high nibble). llama.cpp's CUDA matvec (mmvq) rounds x the
same way.

Precision: each x value moves by at most half a step, 1/254 of its block's largest |value|. The integer sums are
exact, so a row's result depends only on its own x and the weight (batch invariant), and interpret mode's integer
arithmetic is the card's to the bit; only the float scaling after the sums may round differently there.

Two kernels, one arithmetic: the per-row one (`_kernel`, dp4a) and the dot (`_mma_kernel`, int8 tensor cores, for
more rows than a per-row program takes) sum each group exactly and then apply the same float operations in the same
order (`_group`, `_fma`), so a row has the same bits from either, and a model may switch between them by a call's
rows without losing batch invariance (docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as QT
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.pallas_kernels import qmatvec, rms_norm
from worker.pallas_kernels.qmatvec import MIN_DOT, _f32, _lift, e8m0_half, live_steps, tile_loader
from worker.pallas_kernels.tiling import ALL, TritonParams, pow2_at_least, static_index
from worker.quant import QuantArray

X_BLOCK = 32  # x values that share one int8 scale
SUM_BLOCK = 16  # x values per sum of codes (Q6_K's scale runs; Q4_K adds two)
LOW_NIBBLES = 0x0F0F0F0F


@dataclasses.dataclass(frozen=True)
class IntPart:
    """One group of a super-block's values that share one weight scale: `codes`, its pieces, int32 [BN, 1, W] each
    (four 8-bit codes a word), multiplied with x's words at the matching `x_index`. Why pieces: a thread loads at
    most 16 bytes at once, and a tile of 8 words a row is spread over two threads, whose products then meet through
    warp shuffles and shared memory (counted for sm_90a: phi3's Q4_K gate_up 2.00 instructions a value and 59
    registers in one piece, 1.62 and 34 in two). The group's integer sum s = sum(codes * x) - sum(minus * x) +
    int_offset * sum(x) (the terms that are there) enters the result as dx * (scale * s + offset * sum(x)), dx
    being x's block scale at `dx_index`; the sums of x are at `sum_index`. scale and offset [BN, 1, 1] float32."""

    codes: tuple[jax.Array, ...]
    signed: bool  # the codes' bytes: int8 (Q8_0) or uint8
    x_index: tuple[tuple, ...]
    dx_index: tuple
    scale: jax.Array
    offset: jax.Array | None = None
    int_offset: int | None = None
    sum_index: tuple | None = None
    minus: jax.Array | None = None  # one piece's codes whose products are subtracted (MXFP4's negative values)


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """A GGUF format seen as words. `planes`: name -> inner view of one super-block, the code planes (`words`)
    in 32-bit words. `x_inner`, `dx_inner`, `sum_inner`: the views of one super-block of x's words, block scales and
    sums of `sum_block` values. `parts(load, compiled, g, pieces)`: the IntParts of a super-block's g-th of `groups`
    slices (`load` as qmatvec.tile_loader's), in the order both kernels add them, each part's codes in pieces of at
    most 4 words where `pieces` (the per-row kernel; Q8_0's compiled only), else in one piece (the dot, whose
    operand is one tile).
    `x_order`: where a format's codes come out of their words in another order than the values', x's words follow
    it (None: in order)."""

    sb: int
    planes: dict[str, tuple[int, ...]]
    words: frozenset[str]
    x_inner: tuple[int, ...]
    dx_inner: tuple[int, ...]
    sum_inner: tuple[int, ...]
    sum_block: int
    parts: Callable[[Callable[..., jax.Array], bool, int, bool], list[IntPart]]
    x_order: tuple[int, ...] | None = None  # x's values of a 32-value block in the order its words hold them
    groups: int = 1  # slices of a super-block that `parts` takes one at a time (the K formats' scale groups)


def _q8_0(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    d = _lift(_f32(load("d")), 3)  # [BN, C, 1]
    # 16 bytes a piece on the card; the block's 32 as one in the dot and in interpret mode (where two pieces made a
    # Q8_0 model's tests 40% slower to compile; the same integers either way)
    halves = list(range(2)) if pieces and compiled else [ALL]
    codes = tuple(load("qs", h, ALL).astype(jnp.int32) for h in halves)
    return [IntPart(codes, True, tuple((h, ALL) for h in halves), (), d)]


def _q4_0(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    words = load("qs", ALL).astype(jnp.int32)  # [BN, C, 4]: the low nibbles are values 4w + b, the high 16 + 4w + b
    d = _lift(_f32(load("d")), 3)
    return [IntPart(((words >> (4 * p)) & LOW_NIBBLES,), False, ((p, ALL),), (), d, None, -8, (p,)) for p in range(2)]


def _q4_1(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    words = load("qs", ALL).astype(jnp.int32)  # [BN, C, 4], as Q4_0's; value d * code + m
    d, m = _lift(_f32(load("d")), 3), _lift(_f32(load("m")), 3)
    return [IntPart(((words >> (4 * p)) & LOW_NIBBLES,), False, ((p, ALL),), (), d, m, None, (p,)) for p in range(2)]


# Four bits v spread to bit 0 of each byte: v * SPREAD adds copies of v shifted by 0, 7, 14 and 21 bits, which do not
# overlap (no carries), so bit b of v lands at bit 8b in the copy shifted by 7b; the mask keeps bits 0, 8, 16, 24.
SPREAD = 0x00204081


def _q5_codes(load) -> list[jax.Array]:
    """Q5_0/Q5_1: the 5-bit codes of a block's two halves, as words [BN, C, 4]."""
    words = load("qs", ALL).astype(jnp.int32)  # [BN, C, 4]
    qh = _lift(load("qh").astype(jnp.int32), 3)  # bit j: bit 4 of value j
    first = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 4), 2) * 4  # word w's values' first bit in qh
    out = []
    for p in range(2):
        high = ((((qh >> (first + 16 * p)) & 0xF) * SPREAD) & 0x01010101) << 4
        out.append(((words >> (4 * p)) & LOW_NIBBLES) | high)
    return out


def _q5_0(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    d = _lift(_f32(load("d")), 3)
    return [IntPart((codes,), False, ((p, ALL),), (), d, None, -16, (p,)) for p, codes in enumerate(_q5_codes(load))]


def _q5_1(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    d, m = _lift(_f32(load("d")), 3), _lift(_f32(load("m")), 3)
    return [IntPart((codes,), False, ((p, ALL),), (), d, m, None, (p,)) for p, codes in enumerate(_q5_codes(load))]


# MXFP4: the E2M1 code's magnitude (its low three bits) -> ggml's doubled value (0, 1, 2, 3, 4, 6, 8, 12), as the
# eight bytes that `prmt` selects from.
E2M1_LOW, E2M1_HIGH = 0x03020100, 0x0C080604
# prmt's selectors are the four nibbles of a 16-bit half h of qs word w, its bytes 2h and 2h + 1, each one's low
# nibble then its high one, so the values come out as (l, 16 + l, l + 1, 17 + l), l = 4w + 2h; x's words follow.
MXFP4_ORDER = tuple(v for h in range(2) for w in range(4) for l in [4 * w + 2 * h] for v in (l, 16 + l, l + 1, 17 + l))


def _mxfp4(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    """Each half of a word's eight codes to four bytes by one `prmt` over the magnitudes' table: a code with its
    sign bit set selects in prmt's sign-replicating mode, which gives 0 (the table's bytes are below 0x80); the same
    selectors without sign bits give every magnitude, so their difference (an XOR) is the negative codes'."""
    words = load("qs", ALL).astype(jnp.int32)  # [BN, C, 4]
    d = _lift(e8m0_half(load("e")), 3)
    out = []
    for h in range(2):
        sel = words >> (16 * h)
        positive = prmt(E2M1_LOW, E2M1_HIGH, sel, compiled)
        negative = prmt(E2M1_LOW, E2M1_HIGH, sel & 0x7777, compiled) ^ positive
        out.append(IntPart((positive,), False, ((h, ALL),), (), d, minus=negative))
    return out


def _k_parts(load, g: int, pieces: bool, high: Callable[[Any], jax.Array] | None) -> list[IntPart]:
    """Q4_K/Q5_K, group g of 64 values: 8 qs words in halves h of 4, whose bytes 4w.. hold values 64g + 16h + 4w + b
    in their low nibbles, 64g + 32 + 16h + 4w + b in their high ones. `pieces`: a half a piece, [BN, C, 4] (the
    per-row kernel); else one piece [BN, C, 2, 4] (the dot, which flattens it). `high(h)`: Q5_K's fifth bits of
    both parts' codes in half h (ALL: both halves), bit p of each byte part p's."""
    halves = list(range(2)) if pieces else [ALL]
    words = [load("qs", g, h, ALL).astype(jnp.int32) for h in halves]
    fifth = [high(h) for h in halves] if high is not None else None
    # offset = (-dmin) * min: the product's negation exact, and one per super-block (Triton negates by 0 - x, which
    # ptxas keeps as an add: -(dmin * min) cost one a part)
    d, minus_dmin = _f32(load("d")), -_f32(load("dmin"))
    out = []
    for p in range(2):
        codes = [(w >> (4 * p)) & LOW_NIBBLES for w in words]
        if fifth is not None:
            codes = [c | (((f >> p) & 0x01010101) << 4) for c, f in zip(codes, fifth, strict=True)]
        scale = _lift(d * _f32(load("scales", g, p)), 3)
        offset = _lift(minus_dmin * _f32(load("mins", g, p)), 3)
        x_index = tuple((g, p, h, ALL) for h in halves)
        out.append(IntPart(tuple(codes), False, x_index, (g, p), scale, offset, None, (g, p)))
    return out


def _q4_k(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    return _k_parts(load, g, pieces, None)


def _q5_k(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    # qh byte l's bit 2g + p: bit 4 of value 64g + 32p + l
    return _k_parts(load, g, pieces, lambda h: load("qh", h, ALL).astype(jnp.int32) >> (2 * g))


def _q6_k(load, compiled: bool, g: int, pieces: bool) -> list[IntPart]:
    # Value 128h + 64p + 32k + 16l + 4w + b (h = g): qs word (h, k, l, w) nibble p, qh word (h, l, w) bits
    # 2(2p + k) of each byte, scale (h, p, k, l); code - 32. Eight parts of 16 values, [BN, C, 4 (w)].
    d = _f32(load("d"))
    out = []
    for l in range(2):
        qh = load("qh", g, l, ALL).astype(jnp.int32)
        for k in range(2):
            ql = load("qs", g, k, l, ALL).astype(jnp.int32)
            for p in range(2):
                codes = ((ql >> (4 * p)) & LOW_NIBBLES) | (((qh >> (2 * (2 * p + k))) & 0x03030303) << 4)
                scale = _lift(d * _f32(load("scales", g, p, k, l)), 3)
                out.append(IntPart((codes,), False, ((g, p, k, l, ALL),), (g, p, k), scale, None, -32, (g, p, k, l)))
    return out


INT8_FORMATS: dict[QT, IntFormat] = {
    QT.Q8_0: IntFormat(32, {"qs": (2, 4), "d": ()}, frozenset({"qs"}), (2, 4), (), (2,), 16, _q8_0),
    QT.Q4_0: IntFormat(32, {"qs": (4,), "d": ()}, frozenset({"qs"}), (2, 4), (), (2,), 16, _q4_0),
    QT.Q5_0: IntFormat(32, {"qs": (4,), "qh": (), "d": ()}, frozenset({"qs"}), (2, 4), (), (2,), 16, _q5_0),
    QT.Q4_1: IntFormat(32, {"qs": (4,), "d": (), "m": ()}, frozenset({"qs"}), (2, 4), (), (2,), 16, _q4_1),
    QT.Q5_1: IntFormat(32, {"qs": (4,), "qh": (), "d": (), "m": ()}, frozenset({"qs"}), (2, 4), (), (2,), 16, _q5_1),
    QT.MXFP4: IntFormat(32, {"qs": (4,), "e": ()}, frozenset({"qs"}), (2, 4), (), (2,), 16, _mxfp4, MXFP4_ORDER),
    QT.Q4_K: IntFormat(
        256,
        {"qs": (4, 2, 4), "scales": (4, 2), "mins": (4, 2), "d": (), "dmin": ()},
        frozenset({"qs"}),
        (4, 2, 2, 4),
        (4, 2),
        (4, 2),
        32,
        _q4_k,
        groups=4,
    ),
    QT.Q5_K: IntFormat(
        256,
        {"qs": (4, 2, 4), "qh": (2, 4), "scales": (4, 2), "mins": (4, 2), "d": (), "dmin": ()},
        frozenset({"qs", "qh"}),
        (4, 2, 2, 4),
        (4, 2),
        (4, 2),
        32,
        _q5_k,
        groups=4,
    ),
    QT.Q6_K: IntFormat(
        256,
        {"qs": (2, 2, 2, 4), "qh": (2, 2, 4), "scales": (2, 2, 2, 2), "d": ()},
        frozenset({"qs", "qh"}),
        (2, 2, 2, 2, 4),
        (2, 2, 2),
        (2, 2, 2, 2),
        16,
        _q6_k,
        groups=2,
    ),
}
INT8_TYPES = frozenset(INT8_FORMATS)


def quantize_x(x: jax.Array, order: Sequence[int] | None = None, sum_block: int = SUM_BLOCK,
               interpret: bool = False, norm: tuple[jax.Array, float] | None = None, glu: str | None = None,
               ) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """x [T, K] -> (words int32 [T, K / 4], four int8 values each, the first in the lowest byte; dx float32
    [T, K / 32]; sums int32 [T, K / sum_block] of `sum_block` (16 or 32) int8 values each). A block's dx is its
    largest |value| / 127 and its values round to the nearest step, halves away from zero, as llama.cpp's
    quantize_q8_1 does. `order`: each 32-value block's values in this order in the words and sums (a format's
    `x_order`): inside the kernel where it is a transpose of the block's five binary digits (MXFP4's is), else an
    XLA gather first. One Pallas kernel (interpret mode on the CPU). Why not XLA: there it takes three kernels (the
    blocks' maxima, the rounding, the packing), ~3.5 us a matvec on the card, a third of an int8-x matvec's time;
    and the gather of MXFP4's order alone was one more, 2.1 us each of gpt-oss-20b's 48 a step (an H100,
    docs/PERFORMANCE.md, twenty-ninth session). `norm` (w [K], eps): x is RMSNorm's input, normalized first in the
    same kernel (`_norm_quantize_kernel`: a row a program, RMSNorm's kernel's arithmetic). `glu` (a name of
    GLU_ACTIVATIONS): x is [T, 2K], a gated unit's [gate | up], and the values rounded are act(gate) * up, computed
    in the same kernel (a launch fewer: XLA's elementwise fusion before it was one a layer)."""
    if glu is not None and (norm is not None or (order is not None and _digit_axes(tuple(order)) is None)):
        x, glu = glu_product(x, glu), None  # a norm needs the whole row, a gather its input: the product first
    t, k = x.shape
    k //= 2 if glu is not None else 1
    n = k // X_BLOCK
    axes = _digit_axes(tuple(order)) if order is not None else None
    out_shape = (
        jax.ShapeDtypeStruct((t, n, 2, 4), jnp.int32),
        jax.ShapeDtypeStruct((t, n), jnp.float32),
        jax.ShapeDtypeStruct((t, n, 2 if sum_block == SUM_BLOCK else 1), jnp.int32),
    )
    if norm is not None:
        if order is not None and axes is None:
            raise ValueError("quantize_x: a norm first takes an order that is a transpose of a block's digits")
        w, eps = norm
        kernel = functools.partial(_norm_quantize_kernel, d=k, sum_block=sum_block, axes=axes, compiled=not interpret,
                                   eps=float(eps))  # fmt: skip
        words, dx, sums = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(t,),
            compiler_params=TritonParams(num_warps=rms_norm.warps(k), num_stages=1),
            interpret=interpret,
            name="rms_norm_quantize_x_int8",
        )(x, w.reshape(k))
        return words.reshape(t, k // 4), dx, sums.reshape(t, -1)
    blocks = x.reshape(t, -1, X_BLOCK)
    if order is not None and axes is None:
        blocks = blocks[..., jnp.asarray(order)]
    nb = math.gcd(n, 32)  # blocks a program: a power of two (Triton's tiles) that divides the row
    kernel = functools.partial(_quantize_kernel, nb=nb, sum_block=sum_block, axes=axes, compiled=not interpret,
                               glu=glu, n=n)  # fmt: skip
    words, dx, sums = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(t, n // nb),
        compiler_params=TritonParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="quantize_x_int8" if glu is None else f"{glu}_glu_quantize_x_int8",
    )(blocks.reshape(t, blocks.shape[1], *((2,) * 5 if axes else (2, 4, 4))))
    return words.reshape(t, k // 4), dx, sums.reshape(t, -1)


@functools.cache
def _digit_axes(order: tuple[int, ...]) -> tuple[int, ...] | None:
    """The permutation of a 32-value block's five binary digits (as axes of [2, 2, 2, 2, 2]) whose transpose puts
    its values in `order`, or None where no such transpose does."""
    digits = np.arange(X_BLOCK).reshape((2,) * 5)  # numpy: called while a kernel is traced
    for axes in itertools.permutations(range(5)):
        if tuple(int(v) for v in digits.transpose(axes).ravel()) == order:
            return axes
    return None


def _quantize_kernel(x_ref, words_ref, dx_ref, sums_ref, *, nb: int, sum_block: int, axes, compiled: bool,
                     glu: str | None, n: int):  # fmt: skip
    """Program (r, j): x row r's blocks [j*nb, (j+1)*nb), each as [2 halves, 4 words, 4 bytes] (with `axes`, as
    five binary digits put in order by that transpose first); with `glu`, act(gate) * up of the gate's blocks
    there and the up's n blocks on."""
    row, j = static_index(pl.program_id(0)), pl.program_id(1) * nb
    at = (row, pl.ds(j, nb))
    x = _f32(plgpu.load(x_ref.at[at]))  # [nb, 2, 4, 4] or [nb, 2, 2, 2, 2, 2]
    if glu is not None:
        x = GLU_ACTIVATIONS[glu](x) * _f32(plgpu.load(x_ref.at[row, pl.ds(j + n, nb)]))
    words, dx, sums = _round_blocks(_in_order(x, axes), sum_block, compiled)
    plgpu.store(words_ref.at[at], words)
    plgpu.store(dx_ref.at[at], dx)
    plgpu.store(sums_ref.at[at], sums)


def _norm_quantize_kernel(x_ref, w_ref, words_ref, dx_ref, sums_ref, *, d: int, sum_block: int, axes,
                          compiled: bool, eps: float):  # fmt: skip
    """Program r: x row r [D] normalized as RMSNorm's kernel does a row (worker/pallas_kernels/rms_norm.py: the same
    block, warps and operations, so the same values on the card), then its blocks rounded as `_quantize_kernel`
    rounds them: one launch where there were two."""
    row, dp = pl.program_id(0), pow2_at_least(d)
    h = rms_norm.normalized(x_ref.at[pl.ds(row, 1), pl.ds(0, dp)], w_ref.at[pl.ds(0, dp)], d, eps)  # [1, dp]
    nbp, n = dp // X_BLOCK, d // X_BLOCK
    words, dx, sums = _round_blocks(_in_order(h.reshape(nbp, *((2,) * 5 if axes else (2, 4, 4))), axes), sum_block,
                                    compiled)  # fmt: skip
    ok = None if nbp == n else jnp.arange(nbp) < n  # the blocks of the row (past them: the power of two's padding)
    at = (static_index(row), pl.ds(0, nbp))
    for ref, value in ((words_ref, words), (dx_ref, dx), (sums_ref, sums)):
        mask = None if ok is None else jax.lax.broadcast_in_dim(ok, value.shape, (0,))
        plgpu.store(ref.at[at], value, mask=mask)


# The gated units' activations, as the models compute them (jax.nn's: the same operations in interpret mode, Triton's
# lowering of them on the card).
GLU_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def glu_product(x: jax.Array, glu: str) -> jax.Array:
    """x [..., 2K] = [gate | up] -> act(gate) * up [..., K]: `quantize_x`'s `glu` done by XLA."""
    gate, up = jnp.split(x, 2, axis=-1)
    return GLU_ACTIVATIONS[glu](gate) * up


def _in_order(x: jax.Array, axes) -> jax.Array:
    """Blocks [nb, 2, 4, 4], or [nb, 2, 2, 2, 2, 2] put in order by the transpose of their digits `axes`."""
    if axes is None:
        return x
    return jnp.transpose(x, (0, *(a + 1 for a in axes))).reshape(x.shape[0], 2, 4, 4)


def _round_blocks(x: jax.Array, sum_block: int, compiled: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Blocks x [nb, 2, 4, 4] float32 -> their words [nb, 2, 4], dx [nb] and sums [nb, 2 or 1] (`quantize_x`)."""
    amax = jnp.abs(x)
    for _ in range(3):  # Triton reduces one axis at a time
        amax = jnp.max(amax, axis=-1)
    dx = _div_rn(amax, jnp.full(amax.shape, 127, jnp.float32), compiled)
    inv = jnp.where(amax > 0, _div_rn(jnp.ones_like(dx), jnp.where(amax > 0, dx, 1), compiled), 0)
    v = x * _lift(inv, 4)
    steps = jnp.floor(jnp.abs(v) + 0.5)
    q = jnp.where(v < 0, -steps, steps).astype(jnp.int32)
    shifts = 8 * jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, 4), 3)
    words = jnp.sum((q & 0xFF) << shifts, axis=-1)  # disjoint bytes: the sum is their OR
    sums = jnp.sum(jnp.sum(q, axis=-1), axis=-1)  # [nb, 2]: 16 values each
    if sum_block != SUM_BLOCK:
        sums = jnp.sum(sums, axis=-1, keepdims=True)
    return words, dx, sums


def _div_rn(a: jax.Array, b: jax.Array, compiled: bool) -> jax.Array:
    """a / b in float32, rounded to nearest (IEEE), as XLA and numpy divide. Why by hand: Triton's `/` is PTX
    div.full.f32, up to 2 ulp off, which would move a rounded x value across a half step now and then; and XLA
    turns a division by a constant into a product with its reciprocal (not the same bits), which the barrier
    stops."""
    if not compiled:
        return a / jax.lax.optimization_barrier(b)
    (out,) = plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])  # fmt: skip
    return out


def dp4a(a: jax.Array, b: jax.Array, signed: bool, compiled: bool, acc: jax.Array | None = None) -> jax.Array:
    """acc (default 0) plus the sum over the four bytes of int32 words a and b (one shape) of a's byte (int8 if
    `signed`, else uint8) times b's (int8), int32. `compiled`: PTX dp4a by inline assembly (a Triton kernel only);
    else the same integers by shifts (interpret mode): exact either way, so the bits are the same."""
    if compiled:
        (out,) = plgpu.elementwise_inline_asm(
            f"dp4a.{'s32' if signed else 'u32'}.s32 $0, $1, $2, $3;",
            args=[a, b, jnp.zeros(a.shape, jnp.int32) if acc is None else acc],
            constraints="=r,r,r,r",
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)],
        )
        return out
    total = None
    for k in range(4):
        byte_a = (a << (24 - 8 * k)) >> 24 if signed else (a >> (8 * k)) & 0xFF
        term = byte_a * ((b << (24 - 8 * k)) >> 24)
        total = term if total is None else total + term
    return total if acc is None else acc + total


def _word_chain(codes: jax.Array, x: jax.Array, signed: bool, compiled: bool, acc: jax.Array | None) -> jax.Array:
    """acc [BN, 1, 1] (None: 0) plus the dp4a sums of codes and x [BN, 1, W] over their W words, as one chain of
    dp4a whose accumulator carries the sum (the words taken apart by Triton's split, in registers): no separate
    integer adds, which a sum over the last axis leaves (ptxas does not fold them into the dp4a). Interpret mode
    sums the products instead (the same integers, fewer operations to compile), of pieces of any shape."""
    if not compiled:
        piece = jnp.sum(dp4a(codes, x, signed, compiled).reshape(codes.shape[0], 1, -1), axis=-1, keepdims=True)
        return piece if acc is None else acc + piece
    words = codes.shape[-1]
    for c, xw in zip(jnp.split(codes, words, axis=-1), jnp.split(x, words, axis=-1), strict=True):
        acc = dp4a(c, xw, signed, compiled, acc)
    return acc


def prmt(a: int | jax.Array, b: int | jax.Array, c: jax.Array, compiled: bool) -> jax.Array:
    """PTX prmt.b32 (default mode) of int32 tiles: output byte i is byte (sel & 7) of the eight bytes a (0-3), b (4-7),
    sel being c's nibble i; where sel's bit 3 is set, that byte's top bit replicated (0x00 or 0xFF) instead.
    `compiled`: the instruction by inline assembly (a Triton kernel only); else the same bits by shifts."""
    a, b = (jnp.broadcast_to(jnp.asarray(v, jnp.int32), c.shape) for v in (a, b))
    if compiled:
        (out,) = plgpu.elementwise_inline_asm(
            "prmt.b32 $0, $1, $2, $3;",
            args=[a, b, c],
            constraints="=r,r,r,r",
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.int32)],
        )
        return out
    out = jnp.zeros(c.shape, jnp.int32)
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        index = sel & 7
        byte = jnp.where(index < 4, a >> (8 * (index & 3)), b >> (8 * (index & 3))) & 0xFF
        byte = jnp.where(sel & 8, jnp.where(byte & 0x80, 0xFF, 0), byte)
        out = out | (byte << (8 * i))
    return out


def _flat(v: jax.Array) -> jax.Array:
    """[B, 1, L] -> [B, L], or [B] where L = 1: a group's tile without its unit axes."""
    return v.reshape(v.shape[0], -1) if v.shape[-1] > 1 else v.reshape(v.shape[0])


def _group(part: IntPart, sums: jax.Array, x_sums: jax.Array | None, compiled: bool) -> jax.Array:
    """A group's scaled sum from its exact integer sum of codes * x: scale * sum + offset * sum(x), one rounding
    for the multiply-add. The result then gains dx * group, another (`_fma`): both kernels' one float arithmetic."""
    if part.int_offset is not None:
        sums = sums + part.int_offset * x_sums
    if part.offset is None:
        return _mul(part.scale, _f32(sums), compiled)
    return _fma(part.scale, _f32(sums), _mul(part.offset, _f32(x_sums), compiled), compiled)


def _fma(a: jax.Array, b: jax.Array, c: jax.Array, compiled: bool) -> jax.Array:
    """a * b + c in float32 with one rounding: PTX fma.rn.f32 on the card; in interpret mode in float64 (the product
    exact there), rounded to float64 and then float32 (that double rounding differs from one only on rare ties).
    Why by hand: the two kernels must round the same way, and XLA:CPU fuses a multiply with an add where its
    fusions happen to put them together, which differs between them (1 ulp here and there)."""
    if compiled:
        return qmatvec._fma(a, b, c, True)
    with jax.enable_x64(True):
        return (a.astype(jnp.float64) * b.astype(jnp.float64) + c.astype(jnp.float64)).astype(jnp.float32)


def _mul(a: jax.Array, b: jax.Array, compiled: bool) -> jax.Array:
    """a * b in float32, never fused with an add that follows (see `_fma`): exact in float64, then rounded once."""
    if compiled:
        return a * b
    with jax.enable_x64(True):
        return (a.astype(jnp.float64) * b.astype(jnp.float64)).astype(jnp.float32)


def _kernel(*refs, fmt: IntFormat, names: Sequence[str], n: int, blocks: int, rows: int, p, gathered: bool,
            compiled: bool, has_live: bool, tiles: int, x_share: int = 1,
            epilogue: Epilogue | None = None):  # fmt: skip
    """qmatvec's per-row kernel (its grid, masks, splits and live rows) with integer products. Dense: program
    (r, i, j) computes output columns [i*BN, (i+1)*BN) over split j of K for x rows [r*rows, (r+1)*rows).
    Gathered: program (t, i, j), for output row t only, with expert ids[t] and x row t // x_share. With
    `Plan.programs` (`call` keeps it only below `tiles`, the column tiles), program i takes tiles i, i + programs,
    ... one after another. Each part's term is added on its own, in the order of the format's groups and parts,
    super-blocks in K order: `_mma_kernel`'s order, so the two give a row the same bits.
    With an `epilogue` (dense): the program that finishes a column tile's last split folds the tile's partial sums
    and adds the bias and the residual (`Epilogue`), storing y as well."""
    live_ref, *refs = refs if has_live else (None, *refs)
    epi_refs = None
    if epilogue is not None:  # inputs: bias, residual (those given), the counts in; outputs: partials, y, counts
        *refs, o_ref, y_ref, count_ref = refs
        n_in = int(epilogue.bias) + int(epilogue.residual) + 1
        refs, epi_in = refs[: len(refs) - n_in], refs[len(refs) - n_in : -1]
        epi_refs = (epi_in, y_ref, count_ref)
        refs = [*refs, o_ref]
    if gathered:
        ids_ref, x_ref, dx_ref, sums_ref, *plane_refs, o_ref = refs
    else:
        x_ref, dx_ref, sums_ref, *plane_refs, o_ref = refs
    planes = dict(zip(names, plane_refs, strict=True))
    bn, c = p.block_n, p.chunk
    first, tile, split = pl.program_id(0) * rows, pl.program_id(1), pl.program_id(2)
    expert = qmatvec.expert_at(ids_ref, first, plane_refs[0]) if gathered else static_index(0)
    mask_k = p.splits * p.steps * c > blocks

    def x_tile(ref, m, b, index, block_ok):
        ref = ref.at[static_index(m), pl.ds(b, 1), *map(static_index, index)]
        if block_ok is None:
            v = plgpu.load(ref)
        else:
            v = plgpu.load(ref, mask=jax.lax.broadcast_in_dim(block_ok, ref.shape, (0,)), other=0)
        return jax.lax.expand_dims(v, (0,))  # [1, 1, ...] against the weight's [BN, 1, ...]

    def step(row0, rows_ok, s, acc):  # the K loop's step s for the output columns row0..
        acc = list(acc)
        for i in range(c):  # one super-block at a time, its groups in order
            b = (split * p.steps + s) * c + i
            block_ok = (b + jnp.arange(1)) < blocks if mask_k else None
            load = tile_loader(planes, fmt, expert, row0, b, bn, 1, rows_ok, block_ok)
            for g in range(fmt.groups):
                parts = fmt.parts(load, compiled, g, True)
                for r in range(rows):
                    m = first + r if x_share == 1 else first // x_share  # x's row (gathered: one row a program)
                    for part in parts:
                        sums = None  # [BN, 1, 1]: one dp4a chain over the pieces' words (`_word_chain`)
                        for codes, index in zip(part.codes, part.x_index, strict=True):
                            xw = jnp.broadcast_to(x_tile(x_ref, m, b, index, block_ok), codes.shape)
                            sums = _word_chain(codes, xw, part.signed, compiled, sums)
                            if part.minus is not None:  # a chain of its own, subtracted once
                                sums = sums - _word_chain(part.minus, xw, part.signed, compiled, None)
                        dx = _lift(x_tile(dx_ref, m, b, part.dx_index, block_ok), 3)
                        x_sums = None
                        if part.sum_index is not None:
                            x_sums = _lift(x_tile(sums_ref, m, b, part.sum_index, block_ok), 3)
                        group = _group(part, sums, x_sums, compiled)
                        acc[r] = _fma(_flat(dx), _flat(group), acc[r], compiled)
        return tuple(acc)

    steps = live_steps(live_ref, [first + r for r in range(rows)], p.steps)  # 0 for a program of dead rows

    def column_tile(i) -> None:  # the output columns of tile i: the K loop, then each x row's sums stored
        row0 = i * bn
        rows_ok = (row0 + jnp.arange(bn)) < n if n % bn else None
        acc = _k_loop(steps, functools.partial(step, row0, rows_ok), (jnp.zeros((bn,), jnp.float32),) * rows,
                      p.unroll)  # fmt: skip
        if epilogue is None or p.splits > 1:
            for r, a in enumerate(acc):
                o_ref[split, first + r, pl.ds(row0, bn)] = a
        if epilogue is not None:
            slot = pl.program_id(0) * tiles + i
            _finish_tile(epilogue, *epi_refs, o_ref, acc, first, row0, bn, slot, p.splits, compiled)

    def next_tile(t, carry):
        column_tile(tile + t * p.programs)
        return carry

    if not p.programs:
        column_tile(tile)
    else:  # this program's tiles: tile, tile + programs, ... below `tiles`
        jax.lax.fori_loop(0, (tiles - tile + p.programs - 1) // p.programs, next_tile, 0)


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """What a dense product's last program of a column tile does after the K loop (`call`'s `epilogue`): fold the
    tile's split-K partial sums in split order (qmatvec.fold_splits' chain of adds), add the `bias` [N] and then
    add the result to the `residual` [T, N] (a residual stream's x + (y + b)), where XLA took a launch of its own
    after the kernel. The same float operations in the same order, so the same bits.
    How the last program is known: each program adds 1 to its tile's count in memory (an atomic with acquire and
    release order, after a barrier of the program's threads, so that its partial sums are visible first); the one
    that finds splits - 1 there reads the other programs' partial sums and sets the count back to 0, so that the
    counts are zeros again after every call (`counts`, threaded from call to call: ops.fold_counts)."""

    bias: bool  # whether a bias is added
    residual: bool  # whether y is added to a residual


def _finish_tile(epilogue: Epilogue, epi_in, y_ref, count_ref, o_ref, acc, first, row0, bn: int, slot, splits: int,
                 compiled: bool) -> None:  # fmt: skip
    """`Epilogue` for the column tile at row0 and x rows first..first + len(acc): with one split, this program's
    own sums; else, in the program that is the tile's last to finish, the splits' partial sums read back."""
    bias_ref = epi_in[0] if epilogue.bias else None
    res_ref = epi_in[-1] if epilogue.residual else None
    cols = pl.ds(row0, bn)

    def store(r: int, total: jax.Array) -> None:
        if bias_ref is not None:
            total = total + bias_ref[cols]
        if res_ref is not None:
            total = res_ref[first + r, cols] + total
        y_ref[first + r, cols] = total

    if splits == 1:
        for r, a in enumerate(acc):
            store(r, a)
        return
    if compiled:  # every thread's partial sums stored before the count says so (the atomic orders one thread's)
        plgpu.debug_barrier()
    done = plgpu.atomic_add(count_ref, slot, jnp.ones((), jnp.int32))

    @pl.when(done == splits - 1)
    def _fold() -> None:
        for r in range(len(acc)):
            # ".cg": read from L2, where the other programs' stores are, never from a stale line of this SM's L1. Not
            # volatile, which would keep the loads in order, one after another: suspected of the first build's cost
            # on the card (a down projection's 19 splits, its kernel 5.4 -> 10.7 us), not yet timed without it.
            parts = [plgpu.load(o_ref.at[static_index(j), first + r, cols], cache_modifier=".cg" if compiled else None)
                     for j in range(splits)]  # fmt: skip
            total = parts[0]
            for part in parts[1:]:
                total = total + part
            store(r, total)
        count_ref[slot] = jnp.int32(0)


def _bytes(words: jax.Array) -> jax.Array:
    """int32 words [B, W] -> their bytes [B, 4W] (int32, each in -128..127 as int8 reads it; byte k of word w at
    4w + k, as x's bytes lie in memory). The dot takes codes as int8, which holds every format's: Q8_0's are int8,
    the unsigned ones at most 63 (Q6_K). Why stacks: Triton joins two tensors along a new last axis, nothing wider."""
    b = [(words << (24 - 8 * k)) >> 24 for k in range(4)]  # sign-extended bytes
    pairs = jnp.stack([jnp.stack([b[0], b[2]], axis=-1), jnp.stack([b[1], b[3]], axis=-1)], axis=-1)
    return pairs.reshape(words.shape[0], 4 * words.shape[1])  # [B, W, 2 (i), 2 (j)]: byte 2i + j


# The int8 dot's smallest K: Triton's front end refuses a tl.dot of 8-bit operands with K < 32 on NVIDIA (its
# backend's min_dot_size); Pallas builds the dot below that check, and the card computed a K = 16 dot wrong (a Q6_K
# part's 16 values: every output of the int8-x dot off, 2026-12-05, bench.int8_bits on an H100).
MIN_INT8_DOT_K = 32


def _widened(v: jax.Array) -> jax.Array:
    """[B, K] -> [B, max(K, MIN_INT8_DOT_K)] with zeros between its values (the same sums of products: the codes' zeros
    multiply whatever x has there). Why interleaved: Triton joins tensors along a new last axis, nothing wider."""
    while v.shape[-1] < MIN_INT8_DOT_K:
        v = jnp.stack([v, jnp.zeros_like(v)], axis=-1).reshape(v.shape[0], 2 * v.shape[-1])
    return v


def _mma_kernel(x_ref, dx_ref, sums_ref, *refs, fmt: IntFormat, names: Sequence[str], n: int, blocks: int, bm: int,
                p, compiled: bool):  # fmt: skip
    """The int8-x matvec for many rows: program (r, i, j) computes x rows [r*BM, (r+1)*BM) against output columns
    [i*BN, (i+1)*BN) over split j of K, each part's integer sums as one int8 tensor-core dot [BM, values] x [values,
    BN] (exact int32), then the part's term as `_kernel` forms it, added in `_kernel`'s order: a row's bits are the
    per-row kernel's, whatever BM and the rows around it. x_ref holds x's bytes (int8: the words' last axis four
    times as long)."""
    *plane_refs, o_ref = refs
    planes = dict(zip(names, plane_refs, strict=True))
    bn, c = p.block_n, p.chunk
    r0, row0, split = pl.program_id(0) * bm, pl.program_id(1) * bn, pl.program_id(2)
    rows_ok = (row0 + jnp.arange(bn)) < n if n % bn else None
    mask_k = p.splits * p.steps * c > blocks

    def x_tile(ref, b, index, block_ok):
        ref = ref.at[pl.ds(r0, bm), pl.ds(b, 1), *map(static_index, index)]
        if block_ok is None:
            return plgpu.load(ref)
        return plgpu.load(ref, mask=jax.lax.broadcast_in_dim(block_ok, ref.shape, (1,)), other=0)

    def step(s, acc):
        for i in range(c):
            b = (split * p.steps + s) * c + i
            block_ok = (b + jnp.arange(1)) < blocks if mask_k else None
            load = tile_loader(planes, fmt, static_index(0), row0, b, bn, 1, rows_ok, block_ok)
            for g in range(fmt.groups):
                for part in fmt.parts(load, compiled, g, False):
                    (codes,), (index,) = part.codes, part.x_index  # one piece each
                    codes = _bytes(_flat(codes))
                    if part.minus is not None:
                        codes = codes - _bytes(_flat(part.minus))
                    xb = _flat(x_tile(x_ref, b, index, block_ok))  # int8 [BM, 4W], x's bytes in order
                    xb, codes = _widened(xb), _widened(codes.astype(jnp.int8))  # 16-value parts: K 16 -> 32
                    sums = jnp.dot(xb, codes.T, preferred_element_type=jnp.int32)
                    x_sums = None if part.sum_index is None else x_tile(sums_ref, b, part.sum_index, block_ok)
                    column = {name: _flat(getattr(part, name))[None, :] for name in ("scale", "offset")
                              if getattr(part, name) is not None}  # fmt: skip
                    group = _group(dataclasses.replace(part, **column), sums, x_sums, compiled)
                    acc = _fma(x_tile(dx_ref, b, part.dx_index, block_ok), group, acc, compiled)
        return acc

    acc = _k_loop(p.steps, step, jnp.zeros((bm, bn), jnp.float32), p.unroll)
    o_ref[split, pl.ds(r0, bm), pl.ds(row0, bn)] = acc


def _k_loop(steps: int | jax.Array, step, acc, unroll: bool):
    """`step` over the K steps 0..steps-1: a loop, or with `unroll` (and a trip count known when tracing) the
    steps written out one after the other (`Plan.unroll`). The same operations in the same order either way."""
    if not unroll or not isinstance(steps, int):
        return jax.lax.fori_loop(0, steps, step, acc)
    for s in range(steps):
        acc = step(s, acc)
    return acc


def _format(qtype: QT) -> IntFormat:
    if qtype not in INT8_FORMATS:
        supported = ", ".join(sorted(q.name for q in INT8_FORMATS))
        raise NotImplementedError(f"no int8-x matvec kernel for {qtype.name} (int8_x takes {supported})")
    return INT8_FORMATS[qtype]


def _words(plane: jax.Array) -> jax.Array:
    """A code plane's bytes as int32 words, four codes each (the first in the lowest byte). On the card this bitcast
    costs nothing (bench.kernels timed byte and word planes the same, 2026-12-04), so weights stay bytes; XLA:CPU
    copies it (interpret mode only)."""
    return jax.lax.bitcast_convert_type(plane.reshape(*plane.shape[:-1], -1, 4), jnp.int32)


def plane_views(w: QuantArray, experts: int, n: int, k: int) -> tuple[list[str], list[jax.Array]]:
    """Each plane of `w` as [experts, n, k / SB, *inner], the code planes as 32-bit words."""
    fmt = _format(w.qtype)
    names = sorted(fmt.planes)
    views = []
    for name in names:
        plane = _words(w.planes[name]) if name in fmt.words else w.planes[name]
        views.append(plane.reshape(experts, n, k // fmt.sb, *fmt.planes[name]))
    return names, views


def padded_x(x: jax.Array, qtype: QT, rows: int, interpret: bool, norm: tuple[jax.Array, float] | None = None,
             glu: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """x [T, K] padded with zero rows to whole groups of `rows` and rounded for a weight of `qtype` (`quantize_x`
    in the format's x order and sum run, after `norm` or `glu` where given): what `call`'s kernels read
    (bench/backend.py's port too)."""
    fmt = _format(qtype)
    t = x.shape[0]
    x = jnp.pad(x, ((0, pl.cdiv(t, rows) * rows - t), (0, 0)))
    return quantize_x(x, fmt.x_order, fmt.sum_block, interpret, norm=norm, glu=glu)


def call(x: jax.Array, w: QuantArray, ids: jax.Array | None, experts: int, n: int, p, interpret: bool,
         rows_per_program: int, live: jax.Array | None = None, row_tile: int | None = None,
         x_share: int = 1, norm: tuple[jax.Array, float] | None = None, glu: str | None = None,
         epilogue: tuple[jax.Array | None, jax.Array | None, jax.Array | None] | None = None,
         ) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """x [T, K] -> the split-K partial sums [splits, T', N'] of qmatvec's per-row kernel on an int8 x (T' padded to
    whole groups of `rows_per_program`, N' to whole column tiles); qmatvec folds them. `ids` [T * x_share]: each
    output row's expert of `w` [experts, N, K] (gathered; one row a program, reading x row i // x_share: qmatvec's
    `_call`). `live` int32 [T']: qmatvec.live_steps'.
    `norm`, `glu`: x before RMSNorm, or a gated unit's [gate | up] [T, 2K] (`quantize_x`'s).
    `row_tile` (dense): `_mma_kernel` on tiles of that many rows instead (T' whole tiles; columns in tiles of at
    least MIN_DOT, the dot's smallest), with the same bits a row.
    `epilogue` (bias [N], residual [T, N], counts; dense per-row only): the kernel also folds the partial sums and
    adds the bias and the residual (`Epilogue`; None for one left out); returns (partials, y [T', N'], counts), the
    counts zeros again (`epilogue_counts` of them, or None: a zeroed buffer of its own)."""
    fmt = _format(w.qtype)
    k = x.shape[1] // (2 if glu is not None else 1)
    if epilogue is not None and (ids is not None or row_tile is not None):
        raise ValueError("the epilogue is the dense per-row kernel's")
    if row_tile is not None:
        if ids is not None or live is not None:
            raise ValueError("the int8-x tensor-core matvec is dense, and computes every row")
        # 32 columns on 4 warps: at 64 columns a 64-row tile's accumulators spill (tools/kernel_sass.py)
        rows_per_program, p = row_tile, dataclasses.replace(p, block_n=max(MIN_DOT, min(32, p.block_n)), num_warps=4,
                                                            programs=0)  # fmt: skip
    n_blocks = pl.cdiv(n, p.block_n)
    if p.programs >= n_blocks:  # no fewer programs than column tiles: a program a tile
        p = dataclasses.replace(p, programs=0)
    words, dx, sums = padded_x(x, w.qtype, rows_per_program, interpret, norm, glu)
    x_rows = words.shape[0]
    out_rows = x_rows * x_share
    blocks = k // fmt.sb
    x_args = [a.reshape(x_rows, blocks, *inner) for a, inner in
              ((words, fmt.x_inner), (dx, fmt.dx_inner), (sums, fmt.sum_inner))]  # fmt: skip
    if row_tile is not None:  # the dot reads x's bytes as int8 (a free view here; in the kernel, 4 shifts a word)
        *inner, n_words = fmt.x_inner
        x_args[0] = jax.lax.bitcast_convert_type(x_args[0], jnp.int8).reshape(x_rows, blocks, *inner, 4 * n_words)
    names, planes = plane_views(w, experts, n, k)
    common = dict(fmt=fmt, names=names, n=n, blocks=blocks, p=p, compiled=not interpret)
    if row_tile is not None:
        kernel = functools.partial(_mma_kernel, **common, bm=row_tile)
    else:
        kernel = functools.partial(_kernel, **common, rows=rows_per_program, gathered=ids is not None, x_share=x_share,
                                   has_live=live is not None, tiles=n_blocks)  # fmt: skip
    partials = jax.ShapeDtypeStruct((p.splits, out_rows, n_blocks * p.block_n), jnp.float32)
    args = [*([] if live is None else [live]), *([] if ids is None else [ids]), *x_args, *planes]
    out_shape, aliases = partials, {}
    name = f"qmatvec_{w.qtype.name.lower()}_int8{'_dot' if row_tile is not None else ''}"
    if epilogue is not None:
        bias, residual, counts = epilogue
        width = n_blocks * p.block_n
        extra = [] if bias is None else [jnp.pad(bias.astype(jnp.float32), (0, width - n))]
        if residual is not None:
            extra.append(jnp.pad(residual.astype(jnp.float32), ((0, out_rows - residual.shape[0]), (0, width - n))))
        need = epilogue_counts(out_rows // rows_per_program, n_blocks)
        counts = jnp.zeros((need,), jnp.int32) if counts is None else counts
        if counts.shape[0] < need:
            raise ValueError(f"epilogue counts: {counts.shape[0]} for a call that needs {need}")
        aliases = {len(args) + len(extra): 2}  # the counts, updated in place
        args += [*extra, counts]
        out_shape = (partials, jax.ShapeDtypeStruct((out_rows, width), jnp.float32), counts)
        kernel = functools.partial(kernel, epilogue=Epilogue(bias is not None, residual is not None))
        name += "_epilogue"
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(out_rows // rows_per_program, p.programs or n_blocks, p.splits),
        input_output_aliases=aliases,
        compiler_params=TritonParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=interpret,
        name=name,
    )(*args)


def epilogue_counts(row_groups: int, tiles: int) -> int:
    """The counts an epilogue call uses (`Epilogue`): one a column tile of each group of x rows."""
    return row_groups * tiles
