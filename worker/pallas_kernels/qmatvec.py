"""Quantized matrix-vector products for decode: y[M, N] = x[M, K] @ dequant(W[N, K]).T with M <= 8, reading the
GGUF planes of worker/quant.py and dequantizing in registers (Pallas, Triton backend), plus the expert-gathered
variant for MoE decode. Each kernel has a jax.numpy twin with the same signature (dequantize, then an XLA dot);
`interpret=True` runs the kernel on the CPU for tests.

Formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, Q4_K, Q5_K, Q6_K. Precision: codes and scales are exact in float32
(see worker/quant.py), x is cast to float32, products and sums are float32 (no bf16 anywhere); the only
difference from the twin is the order of the float32 additions (~1e-6 relative).

How it works. K is cut into super-blocks of SB values (32 for the 32-value formats, 256 for K-quants); each
plane is viewed (a free reshape) as [E, N, K/SB, *inner] with `inner` splitting one super-block's bytes along
the plane's own layout, and x as [M, K/SB, *x_inner] in the matching value order. A program owns BLOCK_N rows
and a contiguous range of super-blocks (its split of K); it loops over that range CHUNK super-blocks at a time,
loads each plane tile [BLOCK_N, CHUNK, ...] with one masked load, turns it into one or more float32 "parts"
whose values line up with a slice of x (a nibble plane's low and high nibbles are two parts, so no tile is
ever re-ordered in registers), multiplies by x, and reduces to BLOCK_N partial sums per row of x. Rows past N
and super-blocks past K are masked, never read: there is no divisibility requirement beyond the format's
own (K a multiple of its block). Split-K partials go to [splits, M, N_pad] and are summed by XLA.

Bytes read per call (dense): the weight's planes once, i.e. per weight value Q4_0 0.5625, Q4_1 0.625, Q5_0
0.6875, Q5_1 0.75, Q8_0 1.0625, MXFP4 0.53125, Q4_K 0.578 and Q5_K 0.703 (GGUF's 0.5625/0.6875 plus the
unpacked sub-block scales), Q6_K 0.8203; plus x (M*K*4, read by every row block but from L2/L1 after the
first); plus 2 * splits * M * N_pad * 4 for the split-K partials: at M = 1 at most 6% of the weight bytes on
bench/kernels.py's shapes, at M = 8 up to half of them on the smallest (< 1 MB, so mostly L2 traffic).
Gathered: the selected experts' planes, one read per (token, selection) pair, plus the same small terms.

Tiles (the defaults of `plan`; bench/kernels.py times them and `--sweep` tries others). BLOCK_N = 32 rows and
CHUNK super-blocks per step such that a program handles ~8192 weight values per step (4-bit: 4 KiB, two
16-byte loads per thread at 4 warps; Q4_K: one super-block of 32 rows); for M >= 4 half of that (K-quants:
BLOCK_N 16), as every row of x adds a product tile and its x loads. Splits of K so that the grid has about 4
programs per SM (132 SMs on H100 SXM and H200) where N / BLOCK_N alone gives fewer, e.g. 28 row blocks x 19
splits for an [896, 4864] weight; never more splits than chunks, none empty. num_warps 4, num_stages 3.
Checked without a GPU: each format's Triton module, as JAX 0.10.2 and 0.11.2 lower it, compiles with Triton
3.9 for sm_90a at these tiles to 48-118 registers per thread at M = 1 (<= 136 at M = 8) with no spills.

Backend: JAX 0.11 lowers pallas_call on GPU to Mosaic GPU unless the compiler params are Triton's, so every
call passes them (the class is looked up by name, below). The Triton backend is deprecated upstream (a
DeprecationWarning at lowering); a successor would plug in behind the same functions.
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

from worker.quant import QuantArray, dequantize

# The Triton backend's compiler-params class: `CompilerParams` in JAX 0.10-0.11, `TritonCompilerParams` before.
_TritonParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams

MAX_ROWS = 8  # rows of x per call: one accumulator and one x load per row, unrolled
SM_COUNT = 132  # H100 SXM and H200
TARGET_PROGRAMS = 4 * SM_COUNT
TARGET_VALUES = 8192  # weight values per program per loop step

_ALL = slice(None)
Load = Callable[..., jax.Array]
Parts = list[tuple[jax.Array, tuple]]


@dataclasses.dataclass(frozen=True)
class Format:
    """How one GGUF format is viewed and dequantized. `planes`: name -> inner view of one super-block's
    elements. `x_inner`: x's view of one super-block. `parts(load)` returns (float32 tile [BN, C, *t], index
    into x_inner selecting the matching [C, *t] values) pairs; `load(name, *index)` loads a masked plane tile
    [BN, C, *rest] with `index` applied to the plane's inner view."""

    sb: int
    planes: dict[str, tuple[int, ...]]
    x_inner: tuple[int, ...]
    parts: Callable[[Load], Parts]


def _f32(a: jax.Array) -> jax.Array:
    return a.astype(jnp.float32)


def _lift(a: jax.Array, ndim: int) -> jax.Array:
    """Trailing unit axes up to `ndim` (a per-block scale against its values). expand_dims, not reshape: Triton
    keeps an expanded tensor in its parent's layout, where a reshape costs a layout conversion."""
    return jax.lax.expand_dims(a, tuple(range(a.ndim, ndim)))


def _nibble_parts(qs: jax.Array) -> tuple[jax.Array, jax.Array]:
    q = qs.astype(jnp.int32)
    return q & 0xF, q >> 4


def _q8_0(load: Load) -> Parts:
    qs, d = load("qs", _ALL), load("d")  # [BN, C, 32], [BN, C]
    return [(_lift(_f32(d), 3) * _f32(qs), (_ALL,))]


def _q4_0(load: Load) -> Parts:
    d = _lift(_f32(load("d")), 3)
    return [(d * _f32(q - 8), (p, _ALL)) for p, q in enumerate(_nibble_parts(load("qs", _ALL)))]


def _q4_1(load: Load) -> Parts:
    d, m = _lift(_f32(load("d")), 3), _lift(_f32(load("m")), 3)
    return [(d * _f32(q) + m, (p, _ALL)) for p, q in enumerate(_nibble_parts(load("qs", _ALL)))]


def _q5_codes(load: Load) -> list[jax.Array]:
    """The 5-bit codes of the low and high halves of each 32-value block, int32 [BN, C, 16]."""
    qh = _lift(load("qh").astype(jnp.uint32), 3)  # bit j = bit 4 of value j
    shift = jnp.arange(16, dtype=jnp.uint32)
    out = []
    for p, low in enumerate(_nibble_parts(load("qs", _ALL))):
        high = ((qh >> (shift + 16 * p)) & 1).astype(jnp.int32)
        out.append(low | (high << 4))
    return out


def _q5_0(load: Load) -> Parts:
    d = _lift(_f32(load("d")), 3)
    return [(d * _f32(q - 16), (p, _ALL)) for p, q in enumerate(_q5_codes(load))]


def _q5_1(load: Load) -> Parts:
    d, m = _lift(_f32(load("d")), 3), _lift(_f32(load("m")), 3)
    return [(d * _f32(q) + m, (p, _ALL)) for p, q in enumerate(_q5_codes(load))]


def _e2m1_doubled(code: jax.Array) -> jax.Array:
    """ggml's kvalues_mxfp4[code] (E2M1 times 2) by arithmetic, as Triton has no register-table lookup:
    magnitude m = 0..7 -> 0, 1, 2, 3, 4, 6, 8, 12, i.e. (2 + mantissa) << (exponent - 1) from m = 2 on."""
    m = code & 7
    mag = jnp.where(m < 2, m, ((2 | (m & 1)) << (m >> 1)) >> 1)
    v = _f32(mag)
    return jnp.where(code >= 8, -v, v)


def _mxfp4(load: Load) -> Parts:
    # ggml_e8m0_to_fp32_half by bits: 2^(e - 128), a subnormal for e < 2 (as worker/quant.py).
    e = load("e").astype(jnp.uint32)
    bits = jnp.where(e < 2, jnp.uint32(0x00200000) << e, (e - 1) << 23)
    d = _lift(jax.lax.bitcast_convert_type(bits, jnp.float32), 3)
    return [(d * _e2m1_doubled(q), (p, _ALL)) for p, q in enumerate(_nibble_parts(load("qs", _ALL)))]


def _k_scale_min(load: Load, p: int) -> tuple[jax.Array, jax.Array]:
    """Q4_K/Q5_K: d*sc and dmin*mn of sub-block 2j + p for the 4 groups j of a super-block, [BN, C, 4, 1]."""
    d, dmin = _lift(_f32(load("d")), 3), _lift(_f32(load("dmin")), 3)
    dsc = d * _f32(load("scales", _ALL, p))
    dmn = dmin * _f32(load("mins", _ALL, p))
    return _lift(dsc, 4), _lift(dmn, 4)


def _q4_k(load: Load) -> Parts:
    out = []
    for p, q in enumerate(_nibble_parts(load("qs", _ALL, _ALL))):  # [BN, C, 4, 32]
        dsc, dmn = _k_scale_min(load, p)
        out.append((dsc * _f32(q) - dmn, (_ALL, p, _ALL)))
    return out


def _q5_k(load: Load) -> Parts:
    qh = jax.lax.expand_dims(load("qh", _ALL).astype(jnp.int32), (2,))  # [BN, C, 1, 32]
    group = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 4, 1), 2)
    out = []
    for p, low in enumerate(_nibble_parts(load("qs", _ALL, _ALL))):
        high = (qh >> (2 * group + p)) & 1  # bit 2j + p of byte l: bit 4 of value 64j + 32p + l
        dsc, dmn = _k_scale_min(load, p)
        out.append((dsc * _f32(low | (high << 4)) - dmn, (_ALL, p, _ALL)))
    return out


def _q6_k(load: Load) -> Parts:
    # Value 128h + 64p + 32k + 16l + r: qs byte (h, k, l, r) nibble p, qh byte (h, l, r) bits 2(2p + k),
    # scale (h, p, k, l). Eight parts of [BN, C, 2(h), 16(r)].
    d = _lift(_f32(load("d")), 3)
    out = []
    for l in range(2):
        qh = load("qh", _ALL, l, _ALL).astype(jnp.int32)
        for k in range(2):
            for p, low in enumerate(_nibble_parts(load("qs", _ALL, k, l, _ALL))):
                q = low | (((qh >> (2 * (2 * p + k))) & 3) << 4)
                sc = _lift(d * _f32(load("scales", _ALL, p, k, l)), 4)
                out.append((sc * _f32(q - 32), (_ALL, p, k, l, _ALL)))
    return out


FORMATS: dict[QT, Format] = {
    QT.Q8_0: Format(32, {"qs": (32,), "d": ()}, (32,), _q8_0),
    QT.Q4_0: Format(32, {"qs": (16,), "d": ()}, (2, 16), _q4_0),
    QT.Q4_1: Format(32, {"qs": (16,), "d": (), "m": ()}, (2, 16), _q4_1),
    QT.Q5_0: Format(32, {"qs": (16,), "qh": (), "d": ()}, (2, 16), _q5_0),
    QT.Q5_1: Format(32, {"qs": (16,), "qh": (), "d": (), "m": ()}, (2, 16), _q5_1),
    QT.MXFP4: Format(32, {"qs": (16,), "e": ()}, (2, 16), _mxfp4),
    QT.Q4_K: Format(256, {"qs": (4, 32), "scales": (4, 2), "mins": (4, 2), "d": (), "dmin": ()}, (4, 2, 32), _q4_k),
    QT.Q5_K: Format(
        256,
        {"qs": (4, 32), "qh": (32,), "scales": (4, 2), "mins": (4, 2), "d": (), "dmin": ()},
        (4, 2, 32),
        _q5_k,
    ),
    QT.Q6_K: Format(
        256, {"qs": (2, 2, 2, 16), "qh": (2, 2, 16), "scales": (2, 2, 2, 2), "d": ()}, (2, 2, 2, 2, 16), _q6_k
    ),
}
KERNEL_TYPES = frozenset(FORMATS)


@dataclasses.dataclass(frozen=True)
class Plan:
    block_n: int
    chunk: int  # super-blocks per loop step
    splits: int  # programs along K
    steps: int  # loop steps per program
    num_warps: int = 4
    num_stages: int = 3


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def plan(
    qtype: QT,
    n: int,
    k: int,
    rows: int,
    groups: int = 1,
    block_n: int | None = None,
    chunk: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> Plan:
    """The tiling for an [n, k] weight and `rows` rows of x (`groups`: independent (token, expert) pairs).
    Arguments left None get the defaults of the module docstring; bench/kernels.py --sweep tries others."""
    fmt = FORMATS[qtype]
    blocks = k // fmt.sb
    values = TARGET_VALUES if rows < 4 else TARGET_VALUES // 2  # registers: x and a product tile per row
    if block_n is None:
        block_n = min(32, _pow2_floor(values // fmt.sb), pl.next_power_of_2(n))
    if chunk is None:
        chunk = min(_pow2_floor(values // (block_n * fmt.sb)), pl.next_power_of_2(blocks))
    for name, v in (("block_n", block_n), ("chunk", chunk)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two (a Triton tile dimension), got {v}")
    n_chunks = pl.cdiv(blocks, chunk)
    if splits is None:
        splits = max(1, pl.cdiv(TARGET_PROGRAMS, pl.cdiv(n, block_n) * groups))
    steps = pl.cdiv(n_chunks, min(max(1, splits), n_chunks))
    return Plan(block_n, chunk, pl.cdiv(n_chunks, steps), steps, num_warps, num_stages)


def _index(i):
    """A static int index as an int32 scalar: the interpreter's masked load (JAX 0.10) rejects Python ints."""
    return jnp.int32(i) if isinstance(i, int) else i


def _kernel(*refs, fmt: Format, names: Sequence[str], n: int, blocks: int, rows: int, p: Plan, gathered: bool):
    """Program (i, j[, t]): rows [i*BN, (i+1)*BN) over split j of K; gathered: only x row t, with expert ids[t]."""
    if gathered:
        ids_ref, x_ref, *plane_refs, o_ref = refs
    else:
        x_ref, *plane_refs, o_ref = refs
    planes = dict(zip(names, plane_refs, strict=True))
    bn, c = p.block_n, p.chunk
    row0 = pl.program_id(0) * bn
    split = pl.program_id(1)
    if gathered:
        t = pl.program_id(2)
        expert, x_rows = ids_ref[t], [t]
    else:
        expert, x_rows = _index(0), list(range(rows))
    rows_ok = (row0 + jnp.arange(bn)) < n if n % bn else None
    mask_k = p.splits * p.steps * c > blocks

    def step(s, acc):
        b0 = (split * p.steps + s) * c
        blocks_ok = (b0 + jnp.arange(c)) < blocks if mask_k else None

        def tile_mask(shape: tuple[int, ...]) -> jax.Array | None:
            mask = None
            if rows_ok is not None:
                mask = jax.lax.broadcast_in_dim(rows_ok, shape, (0,))
            if blocks_ok is not None:
                kmask = jax.lax.broadcast_in_dim(blocks_ok, shape, (1,))
                mask = kmask if mask is None else mask & kmask
            return mask

        def load(name: str, *index) -> jax.Array:
            inner = fmt.planes[name]
            index = index + (_ALL,) * (len(inner) - len(index))
            shape = (bn, c, *(d for d, i in zip(inner, index, strict=True) if i == _ALL))
            ref = planes[name].at[expert, pl.ds(row0, bn), pl.ds(b0, c), *map(_index, index)]
            mask = tile_mask(shape)
            return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)

        parts = fmt.parts(load)
        out = []
        for a, m in zip(acc, x_rows, strict=True):
            prod = None
            for w, x_index in parts:
                ref = x_ref.at[_index(m), pl.ds(b0, c), *map(_index, x_index)]
                if blocks_ok is None:
                    xv = plgpu.load(ref)
                else:
                    xv = plgpu.load(ref, mask=jax.lax.broadcast_in_dim(blocks_ok, w.shape[1:], (0,)), other=0)
                term = w * jax.lax.expand_dims(xv, (0,))
                prod = term if prod is None else prod + term
            while prod.ndim > 1:  # Triton reduces one axis at a time
                prod = jnp.sum(prod, axis=-1)
            out.append(a + prod)
        return tuple(out)

    acc = jax.lax.fori_loop(0, p.steps, step, tuple(jnp.zeros((bn,), jnp.float32) for _ in x_rows))
    for a, m in zip(acc, x_rows, strict=True):
        o_ref[split, _index(m), pl.ds(row0, bn)] = a


def _views(w: QuantArray, experts: int, n: int, k: int) -> tuple[list[str], list[jax.Array]]:
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
) -> jax.Array:
    """x [T, K]; returns the split-K partial sums summed: [T, N] float32."""
    fmt = FORMATS[w.qtype]
    t, k = x.shape
    names, planes = _views(w, experts, n, k)
    xv = x.astype(jnp.float32).reshape(t, k // fmt.sb, *fmt.x_inner)
    gathered = ids is not None
    n_blocks = pl.cdiv(n, p.block_n)
    kernel = functools.partial(_kernel, fmt=fmt, names=names, n=n, blocks=k // fmt.sb, rows=t, p=p, gathered=gathered)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p.splits, t, n_blocks * p.block_n), jnp.float32),
        grid=(n_blocks, p.splits, t) if gathered else (n_blocks, p.splits),
        compiler_params=_TritonParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=interpret,
        name=f"qmatvec_{w.qtype.name.lower()}",
    )(*([ids] if gathered else []), xv, *planes)
    return jnp.sum(out, axis=0)[:, :n]


def _check(w: QuantArray, plane_ndim: int) -> None:
    if w.qtype not in FORMATS:
        raise NotImplementedError(f"no quantized matvec kernel for {w.qtype.name}")
    if any(a.ndim != plane_ndim for a in w.planes.values()):
        raise ValueError(f"{w.qtype.name} weight: expected planes of rank {plane_ndim}")


def qmatvec(x: jax.Array, w: QuantArray, *, interpret: bool = False, **tiles: int | None) -> jax.Array:
    """x [..., K] @ dequant(w [N, K]).T -> float32 [..., N], for at most MAX_ROWS rows of x. `tiles`: overrides
    of `plan`'s arguments (block_n, chunk, splits, num_warps, num_stages)."""
    _check(w, 2)
    n, k = next(iter(w.planes.values())).shape[0], w.shape[-1]
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if x.shape[-1] != k or not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"qmatvec: x {x.shape} against weight [{n}, {k}] (1..{MAX_ROWS} rows)")
    p = plan(w.qtype, n, k, rows, 1, **tiles)
    return _call(x.reshape(rows, k), w, None, 1, n, p, interpret).reshape(*lead, n)


def qmatvec_twin(x: jax.Array, w: QuantArray, *, interpret: bool = False, **_tiles) -> jax.Array:
    """The jax.numpy twin of `qmatvec` (the CPU path of worker.ops.qmatmul)."""
    del interpret
    return jnp.einsum(
        "...i,oi->...o", x.astype(jnp.float32), dequantize(w, jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def _selected_rows(x: jax.Array, expert_ids: jax.Array) -> jax.Array:
    """x [M, In] (shared by the k selections) or [M, k, In] -> [M * k, In]."""
    if x.ndim == expert_ids.ndim:
        x = jnp.broadcast_to(x[:, None], (*expert_ids.shape, x.shape[-1]))
    return x.reshape(-1, x.shape[-1])


def moe_matvec(
    x: jax.Array, experts: QuantArray, expert_ids: jax.Array, *, interpret: bool = False, **tiles: int | None
) -> jax.Array:
    """The selected experts' products, as worker.ops.moe_matmul: x [M, In] or [M, k, In], experts [E, Out, In],
    expert_ids [M, k] -> float32 [M, k, Out]. Each (token, selection) pair reads its expert's planes once."""
    _check(experts, 3)
    e, n = next(iter(experts.planes.values())).shape[:2]
    k = experts.shape[-1]
    xs = _selected_rows(x, expert_ids)
    if xs.shape[-1] != k:
        raise ValueError(f"moe_matvec: x {x.shape} against experts [{e}, {n}, {k}]")
    ids = jnp.clip(expert_ids.reshape(-1).astype(jnp.int32), 0, e - 1)  # an id out of range must not read OOB
    p = plan(experts.qtype, n, k, 1, xs.shape[0], **tiles)
    return _call(xs, experts, ids, e, n, p, interpret).reshape(*expert_ids.shape, n)


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
