"""Grouped matmul for MoE (megablocks style): pairs sorted by expert, expert tiles dequantized in registers (or read
as bf16, decode's copy of the experts) and fed to bf16 tensor-core dots; its twin is moe_matmul_twin. Design, tiles
and measurements: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from gguf import GGMLQuantizationType as QT
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.pallas_kernels.qmatvec import (
    FORMATS,
    KERNEL_TYPES,
    PLAIN_TYPES,
    PTX_SPREAD,
    load_x_part,
    parts_layout,
    plane_views,
    tile_loader,
    x_parts,
)
from worker.pallas_kernels.tiling import ALL, TritonParams, cuda_capability, kernel_entry, pow2_floor
from worker.quant import QuantArray, dequantize

BLOCK_M = 64
# Prefill's tiles (ops.moe_matmul: every call that is not a decode step's). A bigger row tile dequantizes each
# expert's tiles once per more rows: a group of 32 prompt chunks of 128 positions routes ~512 pairs to each of
# gpt-oss's 32 experts, eight 64-row tiles each, and the kernel is bound by the dequantization (docs/kernels.md). A
# pair's bits depend on the row tile, so every prefill call takes these whatever its size (batch invariance).
# Timed on an H200 (`python -m bench.kernels --rows 0 --prefill 4096 --sweep`, docs/PERFORMANCE.md): gpt-oss's
# gate_up 3.91 ms at decode's tiles, 2.90 with these; experts dequantized once into bf16 and a plain grouped
# product took 3.93 (the dequantization of all 32 experts ~0.5 ms, the product no faster than in registers).
PREFILL_TILES = {"block_m": 128, "num_warps": 8}
# Decode's tiles on the experts' bf16 copy (ops.moe_matmul `decode_copy`): each decode step reads every expert a
# 64-row tile's pairs route to, and at 64 or more rows that is nearly all of them, so the kernel is bound by the
# bytes it reads. Swept on an H200 (`bench.kernels --decode-moe --rows 64,256 --sweep`, docs/PERFORMANCE.md, seventh
# session): 64 K values a loop step took gpt-oss's gate_up from 493 to 476 us and down from 379 to 336 us at 256
# rows (the same within 3% at 64 rows). 16-row tiles were best at 64 rows (492 / 289 us) but read each expert twice
# at 256 (749 us); one row tile serves every decode call (batch invariance), and 256 rows is where throughput peaks.
DECODE_COPY_TILES = {"chunk": 2}
MIN_BLOCK_N = 16  # tl.dot's smallest tile dimension
CHUNK_VALUES = 128  # K values per loop step
# What the kernel takes: the quantized kernel formats (dequantized tile by tile in registers) and bfloat16, the
# dot's operand type (decode's copy of the experts, widened once at load: worker/model.py, `bf16_experts`).
TYPES = KERNEL_TYPES | (PLAIN_TYPES & {QT.BF16})


@dataclasses.dataclass(frozen=True)
class Plan:
    block_m: int
    block_n: int
    chunk: int  # super-blocks per loop step
    steps: int  # loop steps over one leaf's part of K
    num_warps: int = 4
    num_stages: int = 3
    # The dot swapped, as qmatvec.Plan.swap: each expert tile as the MMA's M (BN columns), the row tile's pairs as its
    # N, so that the row tile can follow a decode step's pairs (`swapped_tiles`): a token's bits the same in every
    # bucket on the card (its gpu test passed on an H100, 2026-12-07); decode's default.
    swap: bool = False
    # K split in this many parts, a program each: more programs in flight where a decode step's few tiles each walk
    # all of K alone (one stream: 4 experts' tiles).
    splits: int = 1
    # K in this many leaves, each summed from zero in its own accumulator, the leaves' sums added as a balanced binary
    # tree (`tree_sum`): a program takes leaves / splits neighbouring leaves, a loop step taking the same step of each
    # (one loop and its pipeline, not one a leaf: 9,375 instructions a program against 10,529 in two loops and 9,579
    # for one leaf, 66 registers against 64 and 51, at 64 tokens, static), and adds them as the tree's subtree, and the
    # call adds the programs' partials as its top (`fold_tree`). So a pair's bits depend on the leaves, not on the
    # splits: a decode step of few pairs can split K in more programs than a step of many and give each pair the same
    # bits (ops.moe_decode_tiles). Other bits than one leaf.
    leaves: int = 1
    # MXFP4 decoded to bf16 pairs by inline PTX (`_mxfp4_ptx`) where the call is compiled for the card, whose
    # instructions need sm_90 (`ptx_runs`: the caller asks only there); interpret mode, which cannot run PTX, takes
    # the integer build (`_mxfp4_bf16`), the same values by construction.
    ptx: bool = False


def swapped_tiles(pairs: int, n_experts: int) -> dict:
    """A decode call's tiles on the swapped dot for `pairs` (token, selection) pairs over n_experts experts: row
    tiles of about the pairs an expert gets (at least 16, tl.dot's smallest, at most BLOCK_M); the expert tiles are
    `plan`'s, 64 columns where they divide Out (wgmma's M). One stream's 4 pairs then stage 16-row x tiles where the
    unswapped dot stages 64."""
    per_expert = -(-pairs // n_experts)
    return {"swap": True, "block_m": min(BLOCK_M, max(MIN_BLOCK_N, pl.next_power_of_2(per_expert)))}


def _fits(qtype, n: int, k: int) -> bool:
    return qtype in TYPES and k % FORMATS[qtype].sb == 0 and n % MIN_BLOCK_N == 0


def fits(experts: object) -> bool:
    """Whether the kernel takes these experts: in TYPES, [E, Out, In] with planes of rank 3, Out a multiple of
    MIN_BLOCK_N."""
    return (
        isinstance(experts, QuantArray)
        and len(experts.shape) == 3
        and all(a.ndim == 3 for a in experts.planes.values())
        and _fits(experts.qtype, *experts.shape[1:])
    )


def plan(
    qtype,
    n: int,
    k: int,
    block_m: int = BLOCK_M,
    block_n: int | None = None,
    chunk: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    swap: bool = False,
    splits: int = 1,
    leaves: int | None = None,
    ptx: bool = False,
) -> Plan:
    """The tiling for [n, k] experts; arguments left None get the module docstring's defaults. `leaves` (powers of
    two, default `splits`) and `splits` at most leaves, as Plan says; a K of fewer chunks than leaves takes the
    largest power of two of leaves it has (a function of K alone, so the same for every split)."""
    if not _fits(qtype, n, k):
        raise ValueError(f"moe_matmul: no kernel tiling for {getattr(qtype, 'name', qtype)} experts [{n}, {k}]")
    blocks = k // FORMATS[qtype].sb
    if block_n is None:
        block_n = next(b for b in (64, 32, 16) if n % b == 0)
    if chunk is None:
        chunk = min(max(1, CHUNK_VALUES // FORMATS[qtype].sb), pl.next_power_of_2(blocks))
    leaves = splits if leaves is None else leaves
    for name, v in (("block_m", block_m), ("block_n", block_n), ("chunk", chunk), ("splits", splits),
                    ("leaves", leaves)):  # fmt: skip
        if v < 1 or v & (v - 1):
            raise ValueError(f"moe_matmul: {name} must be a power of two, got {v}")
    if n % block_n or block_m < 16 or block_n < MIN_BLOCK_N:
        raise ValueError(f"moe_matmul: block_n {block_n} must divide Out {n}; block_m and block_n >= 16")
    if splits > leaves:
        raise ValueError(f"moe_matmul: {splits} splits of K in {leaves} leaves (a split takes whole leaves)")
    chunks = pl.cdiv(blocks, chunk)
    leaves = min(leaves, pow2_floor(chunks))
    return Plan(block_m, block_n, chunk, pl.cdiv(chunks, leaves), num_warps, num_stages, swap, min(splits, leaves),
                leaves, ptx and qtype == QT.MXFP4)  # fmt: skip


def _mxfp4_exponent(load) -> jax.Array:
    """An MXFP4 block's exponent byte [BN, C] as int32, clamped to [2, 252], where every value of its block is a
    normal bf16 (both builds of the bf16 values, `_mxfp4_bf16` and `_mxfp4_ptx`)."""
    return jnp.clip(load("e").astype(jnp.int32), 2, 252)


def _mxfp4_bf16(load) -> list[jax.Array]:
    """MXFP4's two parts [BN, C, 16] (low nibbles, high nibbles) as bf16 bits built with integer ops (~13 SASS per
    value on sm_90a, against ~20 for the float32 dequantization and a cast): 2^(e - 128) * kvalues[code] has at most
    two significant bits, so it is exact in bf16, and for t = code & 7 >= 2 its magnitude's bits are
    ((e - 1) << 7) + (t << 6) (2, 3, 4, 6, 8, 12 = {1, 1.5} * 2^1..3), for t = 1 (e - 1) << 7, for t = 0 zero; bit 3
    of the code is the sign. The same bf16 values as the float32 path for exponent bytes 2..252; one outside
    (|w| < 2^-125 or > 2^124, never in real files) is clamped into that range."""
    base = jax.lax.expand_dims((_mxfp4_exponent(load) - 1) << 7, (2,))  # [BN, C, 1]
    q = load("qs", ALL).astype(jnp.int32)  # [BN, C, 16]
    out = []
    for code in (q & 0xF, q >> 4):
        t = code & 7
        bits = jnp.where(t < 2, t * base, base + (t << 6)) | ((code & 8) << 12)
        out.append(jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16))
    return out


# MXFP4 in inline PTX (Plan.ptx): four bytes of codes (a 32-bit register) give their low (or high) nibbles' four
# bf16 values, two bf16x2 registers, in 3.5 instructions a value (the kernel's loop at one stream's decode tiles:
# 8.1 a value against the integer build's 12.7, sm_90a, static: tools/kernel_sass.py). A byte permute spreads two
# code bytes into the halves of a word (PTX_SPREAD); a nibble's magnitude bits (e2m1's exponent and mantissa)
# shifted to bf16's bits 6-8 and its sign to bit 15 are the bf16 of its value times 2^-126 (code 1, 0.5, a
# subnormal: PTX's bf16x2 multiply has no flush to zero), which two packed multiplies take to value * 2^126 * the
# block's scale, each product exact. The scale is 2^(e - 127), bf16 bits e << 7, e clamped to [2, 252] as in the
# integer build. One asm a part: JAX's lowering of the inline asm takes one result.
# (magnitude mask, its shift, sign mask, its shift) of both halves' low nibbles, then their high nibbles
_PTX_NIBBLES = ((0x00070007, 6, 0x00080008, 12), (0x00700070, 2, 0x00800080, 8))
_PTX_2_126 = 0x7E807E80  # bf16x2 of 2^126


def _mxfp4_ptx_asm(part: int) -> str:
    """The inline PTX of `_mxfp4_ptx`'s `part` (0: low nibbles, 1: high): operands $0 $1 the bf16x2 pairs of the
    values, $2 four code bytes, $3 $4 the scale's bf16x2 pairs (element j of each is byte j's)."""
    mag, mag_shift, sign, sign_shift = _PTX_NIBBLES[part]
    lines = ["{", ".reg .b32 w, m, s, v, k;", f"mov.b32 k, {_PTX_2_126:#x};"]
    for half, selector in enumerate(PTX_SPREAD):
        lines += [
            f"prmt.b32 w, $2, 0, {selector:#x};",
            f"and.b32 m, w, {mag:#x};",
            f"shl.b32 m, m, {mag_shift};",
            f"and.b32 s, w, {sign:#x};",
            f"shl.b32 s, s, {sign_shift};",
            "or.b32 v, m, s;",
            "mul.rn.bf16x2 v, v, k;",
            f"mul.rn.bf16x2 ${half}, v, ${3 + half};",
        ]
    return "\n".join([*lines, "}"])


@functools.cache
def ptx_runs() -> bool:
    """Whether the default device runs `_mxfp4_ptx_asm`: an NVIDIA GPU of sm_90 or later (PTX's mul.rn.bf16x2 needs
    it); a capability that is not a number (another vendor's) does not."""
    capability = cuda_capability()
    return capability is not None and capability >= 9


def _mxfp4_ptx(load) -> list[jax.Array]:
    """`_mxfp4_bf16`'s two parts by inline PTX (Plan.ptx; the GPU only)."""
    q = load("qs", ALL)  # [BN, C, 16] uint8
    bits = (_mxfp4_exponent(load) << 7).astype(jnp.uint16)  # [BN, C]: 2^(e - 127)
    scale = jnp.broadcast_to(jax.lax.bitcast_convert_type(bits, jnp.bfloat16)[:, :, None], q.shape)
    out = jax.ShapeDtypeStruct(q.shape, jnp.bfloat16)
    return [
        plgpu.elementwise_inline_asm(_mxfp4_ptx_asm(part), args=[q, scale], constraints="=r,=r,r,r,r", pack=4,
                                     result_shape_dtypes=[out])[0]
        for part in (0, 1)
    ]  # fmt: skip


def _kernel(ids_ref, x_ref, *refs, qtype, names, blocks: int, p: Plan, interpret: bool):
    """Program (j, t, split): output columns [j*BN, (j+1)*BN) of row tile t, whose rows all select expert ids[t]."""
    *plane_refs, o_ref = refs
    j, t, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    fmt = FORMATS[qtype]
    t_size = math.prod(parts_layout(qtype)[1])
    planes = dict(zip(names, plane_refs, strict=True))
    bm, bn, c = p.block_m, p.block_n, p.chunk
    n0 = j * bn
    r0 = t * bm
    expert = ids_ref[t]
    per_split = p.leaves // p.splits
    mask_k = p.leaves * p.steps * c > blocks

    @pl.when(expert >= 0)
    def _():
        def step(leaf, s, acc):
            b0 = (leaf * p.steps + s) * c
            blocks_ok = (b0 + jnp.arange(c)) < blocks if mask_k else None
            load = tile_loader(planes, fmt, expert, n0, b0, bn, c, None, blocks_ok)  # Out % BN == 0: no row mask
            if qtype == QT.MXFP4:
                parts = _mxfp4_ptx(load) if p.ptx and not interpret else _mxfp4_bf16(load)
            else:
                parts = [w.astype(jnp.bfloat16) for w, _ in fmt.parts(load)]
            for part, w in enumerate(parts):
                w = w.reshape(bn, c * t_size)
                xv = load_x_part(x_ref, part, r0, bm, b0, c, t_size, blocks, None, blocks_ok)
                lhs, rhs = (w, xv) if p.swap else (xv, w)
                acc += jax.lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            return acc

        def steps(s, sums):  # step s of each of the program's leaves, each into its own sum
            return tuple(step(split * per_split + j, s, acc) for j, acc in enumerate(sums))

        zeros = jnp.zeros((bn, bm) if p.swap else (bm, bn), jnp.float32)
        acc = tree_sum(jax.lax.fori_loop(0, p.steps, steps, (zeros,) * per_split))
        o_ref[split, pl.ds(r0, bm), pl.ds(n0, bn)] = acc.T if p.swap else acc


def tree_sum(terms) -> jax.Array:
    """A power of two of terms added as a balanced binary tree ((t0 + t1) + (t2 + t3), ...), taken one at a time:
    at most log2(n) + 1 sums held at once. A subtree's sum is the same wherever it is formed (in a program, or of
    the programs' partials after the call: `fold_tree`), so K's leaves give the same bits in any number of splits.
    Why not jnp.sum: XLA picks a reduction's order from the whole shape (qmatvec.fold_splits)."""
    held: list[tuple[int, jax.Array]] = []  # (terms in it, sum), the larger first
    for term in terms:
        size, total = 1, term
        while held and held[-1][0] == size:
            total = held.pop()[1] + total
            size *= 2
        held.append((size, total))
    if len(held) != 1:
        raise ValueError(f"tree_sum: {sum(n for n, _ in held)} terms are not a power of two")
    return held[0][1]


def fold_tree(partials: jax.Array) -> jax.Array:
    """The programs' partial sums [splits, ...] added as the top of the leaves' tree (`tree_sum`)."""
    return tree_sum(partials[i] for i in range(partials.shape[0]))


@dataclasses.dataclass(frozen=True)
class Groups:
    """The sorted, padded row order of the pairs: `rows` [M*k] each pair's padded row, `src` [R] the x row each
    padded row reads, `tile_expert` [R / BLOCK_M] each row tile's expert (-1: unused tile)."""

    rows: jax.Array
    src: jax.Array
    tile_expert: jax.Array


# Pairs up to which `group` ranks them by comparing every pair with every other (one fusion each for the ranks and
# the padded rows' pairs: a decode step's 4-512 pairs) instead of a sort and three scatters, each a launch or two
# with its buffer's copy, in every MoE layer of every decode step. Both give the same groups.
COMPARE_PAIRS = 512


def group(expert_ids: jax.Array, n_experts: int, block_m: int, shared: bool, live: jax.Array | None = None) -> Groups:
    """Sort the (token, selection) pairs by expert and pad each expert's group to a multiple of block_m rows.
    `live` [M]: the pairs of a token where it is False go last, into no expert's tiles (their rows lie in tiles
    that are not computed). Within a group the pairs keep their order (a stable sort)."""
    n_pairs = expert_ids.size
    k_sel = expert_ids.shape[-1]
    flat = jnp.clip(expert_ids.reshape(-1).astype(jnp.int32), 0, n_experts - 1)  # out of range must not read OOB
    if live is not None:  # a dead token's pairs: expert n_experts, a group that gets no tiles
        flat = jnp.where(jnp.repeat(live.reshape(-1), k_sel), flat, n_experts)
    pair = jnp.arange(n_pairs, dtype=jnp.int32)
    n_tiles = pl.cdiv(n_pairs + min(n_experts, n_pairs) * (block_m - 1), block_m)
    compare = n_pairs <= COMPARE_PAIRS
    if compare:
        counts = (flat[None, :] == jnp.arange(n_experts + 1, dtype=jnp.int32)[:, None]).sum(1, dtype=jnp.int32)
        rank = ((flat[None, :] == flat[:, None]) & (pair[None, :] < pair[:, None])).sum(1, dtype=jnp.int32)
    else:
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted position -> pair
        counts = jnp.zeros((n_experts + 1,), jnp.int32).at[flat].add(1)
        first = jnp.cumsum(counts) - counts  # sorted position of each group's first pair
        rank = jnp.zeros((n_pairs,), jnp.int32).at[order].set(pair - first[flat[order]])
    tiles = ((counts + block_m - 1) // block_m).at[n_experts].set(0)
    tile_end = jnp.cumsum(tiles)
    rows = (tile_end - tiles)[flat] * block_m + rank  # each pair's padded row: its group's first tile, then its rank
    value = pair // k_sel if shared else pair
    if compare:  # each padded row's pair, 0 where none (a dead pair's row past the tiles: none)
        padded = jnp.arange(n_tiles * block_m, dtype=jnp.int32)
        src = jnp.where(rows[None, :] == padded[:, None], value[None, :], 0).sum(1, dtype=jnp.int32)
    else:
        src = jnp.zeros((n_tiles * block_m,), jnp.int32).at[rows].set(value)
    # compare_all: E x tiles comparisons, no loop (the default method is a while loop, in every MoE call of a step)
    tiles_at = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_e = jnp.searchsorted(tile_end[:n_experts], tiles_at, side="right", method="compare_all").astype(jnp.int32)
    return Groups(rows, src, jnp.where(tile_e < n_experts, tile_e, -1))


def _check(x: jax.Array, experts: QuantArray, expert_ids: jax.Array) -> tuple[int, int, int, bool]:
    if experts.qtype not in TYPES:
        raise NotImplementedError(f"no grouped matmul kernel for {experts.qtype.name}")
    if any(a.ndim != 3 for a in experts.planes.values()):
        raise ValueError(f"{experts.qtype.name} experts: expected planes of rank 3")
    e, n = next(iter(experts.planes.values())).shape[:2]
    k = experts.shape[-1]
    shared = x.ndim == expert_ids.ndim
    want = (expert_ids.shape[0], k) if shared else (*expert_ids.shape, k)
    if expert_ids.ndim != 2 or x.shape != want:
        raise ValueError(f"moe_matmul: x {x.shape}, expert_ids {expert_ids.shape} against experts [{e}, {n}, {k}]")
    return e, n, k, shared


@kernel_entry("interpret", "block_m", "block_n", "chunk", "num_warps", "num_stages", "swap", "splits", "leaves", "ptx")
def moe_matmul(
    x: jax.Array,
    experts: QuantArray,
    expert_ids: jax.Array,
    live: jax.Array | None = None,
    *,
    interpret: bool = False,
    **tiles: int | None,
) -> jax.Array:
    """As worker.ops.moe_matmul: x [M, In] (shared by the k selections) or [M, k, In], experts [E, Out, In],
    expert_ids [M, k] -> float32 [M, k, Out]. `live` [M] (bool): tokens whose pairs are computed; the others' are
    zeros (a decode bucket's empty rows, a prefill chunk's padding: they would add experts' tiles). A live pair's
    bits do not depend on which tokens are live. `tiles`: overrides of `plan`'s arguments."""
    e, n, k, shared = _check(x, experts, expert_ids)
    p = plan(experts.qtype, n, k, **tiles)
    g = group(expert_ids, e, p.block_m, shared, live)
    xp = jnp.take(x_parts(x.reshape(-1, k), experts.qtype, jnp.bfloat16), g.src, axis=1)  # [P, R, K / P]
    names, planes = plane_views(experts, e, n, k)
    kernel = functools.partial(_kernel, qtype=experts.qtype, names=names, blocks=k // FORMATS[experts.qtype].sb, p=p,
                               interpret=interpret)  # fmt: skip
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p.splits, g.src.shape[0], n), jnp.float32),
        grid=(n // p.block_n, g.tile_expert.shape[0], p.splits),
        compiler_params=TritonParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=interpret,
        name=f"moe_matmul_{experts.qtype.name.lower()}",
    )(g.tile_expert, xp, *planes)
    out = fold_tree(out[:, g.rows]).reshape(*expert_ids.shape, n)
    # A dead pair's row lies in a tile no program wrote: its values are whatever the buffer held.
    return out if live is None else jnp.where(live.reshape(-1, 1, 1), out, 0.0)


def moe_matmul_twin(
    x: jax.Array, experts: QuantArray, expert_ids: jax.Array, *, interpret: bool = False, **_tiles
) -> jax.Array:
    """The jax.numpy twin of `moe_matmul`, with the kernel's operand rounding (bf16 x and weights, float32
    sums): each expert in turn, dequantized to bf16 and applied to every token, keeping the rows that chose it."""
    del interpret
    e, n, _, shared = _check(x, experts, expert_ids)
    xb = x.astype(jnp.bfloat16)

    def one_expert(out, e_planes):
        i, planes = e_planes
        w = dequantize(QuantArray(planes, experts.qtype, experts.shape[1:]), jnp.bfloat16)  # [Out, In]
        y = jnp.einsum("mi,oi->mo" if shared else "mki,oi->mko", xb, w, preferred_element_type=jnp.float32)
        return jnp.where((expert_ids == i)[..., None], y[:, None, :] if shared else y, out), None

    out = jnp.zeros((*expert_ids.shape, n), jnp.float32)
    out, _ = jax.lax.scan(one_expert, out, (jnp.arange(e), experts.planes))
    return out
