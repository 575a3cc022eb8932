"""The ops layer: one dispatch point per operation the models use (quantized matmul, embedding lookup, norms,
RoPE, attention). These are the plain jax.numpy implementations the CPU path runs and the GPU kernels
(worker/pallas_kernels) are tested against. Which of the two a call traces to is its `backend` argument, carried by
the model's config (no module state: two models on two backends live in one process).

Shapes: B batch, T query positions, S cache slots, H query heads, K kv heads, G = H / K, D head dim.
The CPU path computes everything in float32: the oracles are float64 references and it matches them to ~1e-6
relative. The GPU backend's prefill matmuls use bf16 operands with f32 accumulation (see qmatmul), its prefill
attention float16 (the cache's dtype) with f32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as QT
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from worker import cpu_kernels, sharding
from worker.kv_cache import KVCache, gather_layer, write_layer
from worker.pallas_kernels import moe_matmul as grouped_matmul
from worker.pallas_kernels import paged_attention as paged
from worker.pallas_kernels import prefill_attention, qmatvec, qmatvec_int8
from worker.pallas_kernels import rms_norm as rms_norm_kernel
from worker.pallas_kernels import top_k as top_k_kernel
from worker.quant import NIBBLE_GROUP, Int8Blocks, QuantArray, dequantize, nibble_halves, widened

Weight = QuantArray | Int8Blocks | jax.Array
# The CPU matmul's row tile: at most this many bytes of float32 weights at a time, each tile widened next to its dot
# (docs/PERFORMANCE.md, "CPU"). A call of few rows of x (decode: one row a call on a deterministic CPU) takes the
# smaller tile, which stays in a core's L2 cache from its widening to its dot; more rows (prefill) the larger, whose
# dots are bigger products. Measured on 2 cores of a Xeon (2026-12-06, Gemma 3 270M, 256 KiB against 8 MiB): at one
# row the tied 262,144-row head 30.1 against 48.9 ms, a layer's matmuls 1.82 against 2.54 ms, decode 19.0 against
# 12.8 tok/s; at 16 rows a layer 2.74 against 3.92 ms, the head 66 against 62; at 64 rows the head 203 against 152
# ms; a 512-token prefill 447 against 548 tok/s. A tile splits the rows of w, never the sum over K: the same bits
# either way (tests/test_cpu_layout.py).
CPU_TILE_BYTES = 8 << 20
CPU_DECODE_TILE_BYTES = 256 << 10
CPU_DECODE_ROWS = 16  # rows of x up to which a call takes CPU_DECODE_TILE_BYTES
# Rows of x up to which a call takes the CPU's own kernel where it builds (worker/cpu_kernels). Measured on 2 cores
# of a Xeon (2026-12-06, half of Gemma 3's head, 131,072 x 640 Q8_0, best of 8): 1 row 6.0 against the tile walk's
# 10.4 ms, 2 rows 7.3 / 15.0, 4 rows 11.6 / 15.4, 8 rows 21.8 / 20.6, 16 rows 45.8 / 32.8.
CPU_KERNEL_ROWS = 4
FOLD_COUNTS = 1024  # the epilogues' shared counts (`FoldCounts`): more than one stream's products use (<= 2 x 528)

# Which implementation the quantized matmuls, attention and MoE trace to: "cpu" (the jax.numpy path below, exact
# float32), "gpu" (Pallas kernels for decode-sized matmuls and short prefill chunks: `_on_kernels`;
# attention (decode and prefill) unless WORKER_ATTENTION_KERNEL=0; the grouped MoE matmul; RMSNorm unless
# WORKER_NORM_KERNEL=0) or "interpret" (those kernels in Pallas interpret mode, for CPU tests).
BACKENDS = ("cpu", "gpu", "interpret")
# The attention kernels on the non-CPU backends; WORKER_ATTENTION_KERNEL=0 keeps attention on jax.numpy.
_attention_kernel = os.environ.get("WORKER_ATTENTION_KERNEL", "1") != "0"


def kernel_backends(setting: str) -> dict[str, bool]:
    """A default-on kernel's WORKER_* setting -> whether each kernel backend takes it: on the "gpu" backend unless
    "0"; on "interpret" only with "1" (its interpreted launches would cost the CPU suite minutes; its own tests run it
    there on purpose)."""
    return {"gpu": setting != "0", "interpret": setting == "1"}


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer WORKER_* setting (unset or empty: `default`); anything else than an integer >= minimum is refused
    with the variable's name, at import, before a model loads."""
    value = os.environ.get(name, "").strip() or str(default)
    if not value.isdigit() or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer, at least {minimum}")
    return int(value)


# RMSNorm's kernel (worker/pallas_kernels/rms_norm.py), one launch a norm where XLA takes ~2.5: on by default on the
# "gpu" backend with one device (an H100, 2026-12-06: qwen2.5-0.5b decode 980.0 against 951.0 tok/s, 1.030x;
# gpt-oss-20b 324.6-326.5 against 323.3; docs/PERFORMANCE.md, thirtieth session); WORKER_NORM_KERNEL=0 turns it off.
# Other bits than jax.numpy's (another order of the sum of squares), the same bits for a row whatever its batch.
_norm_kernel = kernel_backends(os.environ.get("WORKER_NORM_KERNEL", ""))
# RMSNorm done by the kernel that rounds x to int8 for the matvec after it (`qmatmul`'s `norm`): one launch where
# there are two; the norm kernel's values on the card (its gpu tests). On by default on the "gpu" backend
# (WORKER_NORM_ROUNDING=0 turns it off): an H100, 2026-12-06, qwen2.5-0.5b decode 997.4 against 979.5 tok/s (1.018x),
# gpt-oss-20b 383.7 against 382.7 (docs/PERFORMANCE.md, thirty-first session).
_norm_rounding = kernel_backends(os.environ.get("WORKER_NORM_ROUNDING", ""))
# A decode step's new keys and values stored by the paged attention kernel that reads them (`write_and_attend`)
# instead of kv_cache.write_layer's two XLA scatters a layer, on the kernel backends with one device; the same bits.
# On by default on the "gpu" backend (WORKER_KV_WRITE_KERNEL=0 turns it off): an H100, 2026-12-06, qwen2.5-0.5b
# decode 1,058.8 against 1,018.1 tok/s (1.040x), its gpu tests passing (docs/PERFORMANCE.md, thirty-third session).
_kv_write_kernel = kernel_backends(os.environ.get("WORKER_KV_WRITE_KERNEL", ""))
# A MoE layer's routing (`top_k`) as one Pallas kernel, the same bits as lax.top_k: on by default on the "gpu" backend
# (WORKER_TOPK_KERNEL=0 turns it off): an H100, 2026-12-06, gpt-oss-20b decode 393.0 against 382.7 tok/s (1.027x);
# with the norm in the rounding kernel 394.3 against 381.6 (1.033x), the batch-invariance gpu tests passing with both.
_topk_kernel = kernel_backends(os.environ.get("WORKER_TOPK_KERNEL", ""))
# A decode step's RoPE of q and the new key done by the attention kernel that reads them (`write_and_attend`'s
# `rotary`, with the KV-writing kernel), where XLA took two launches a layer (0.080 ms of qwen2.5-0.5b's 1.167 ms step
# on an H100, docs/PERFORMANCE.md, thirty-fourth session). ops.rope's products and sums, within float32's rounding of
# its values (a compiler's fused multiply-adds). On by default on the "gpu" backend (WORKER_ROPE_KERNEL=0 turns it
# off): an H100, 2026-12-07, qwen2.5-0.5b decode 1,059.4 against 1,039.5 tok/s (1.019x), gpt-oss-20b 406.7 against
# 401.7 (the baseline's clean run), its 11 gpu tests passing there (docs/PERFORMANCE.md, thirty-seventh session).
_rope_kernel = kernel_backends(os.environ.get("WORKER_ROPE_KERNEL", ""))
# WORKER_FOLD_EPILOGUE=1: a product followed by its residual add (the output projection, a dense FFN's down) on the
# int8-x per-row kernel folds its split-K partial sums, adds its bias and the residual in the kernel's last program of
# each column tile (qmatvec_int8.Epilogue), where XLA took a launch of its own after it: two a layer of a dense
# model's decode step. The same bits (its gpu tests passed). Opt-in: its first build lost on the card (an H100,
# 2026-12-06, qwen2.5-0.5b decode 934.1 against 1,036.2 tok/s, 0.901x: the down projections' kernels 5.4 -> 10.7 us,
# and 85 us between decode steps where XLA's loop took 1.7; docs/PERFORMANCE.md, thirty-fourth session).
_fold_epilogue = kernel_backends(os.environ.get("WORKER_FOLD_EPILOGUE", "0"))
# WORKER_GLU_ROUNDING=1: a gated unit's act(gate) * up computed by the kernel that rounds it to int8 for the down
# projection (`qmatmul`'s `glu`), where XLA took a launch of its own (one a layer of a dense model's decode step:
# 0.033 ms of qwen2.5-0.5b's 1.167 ms on an H100, docs/PERFORMANCE.md, thirty-fourth session). Triton's lowering of
# the activation on the card (the same operations as jax.nn's in interpret mode; its kernel's 4 gpu tests passed on an
# H200, thirty-fifth session); opt-in until timed there.
_glu_rounding = kernel_backends(os.environ.get("WORKER_GLU_ROUNDING", "0"))
# The CPU kernel's tiles form for a one-device model's products of many rows (prefill; `_cpu_kernel_form`), where
# XLA's tile walk runs on about one core; WORKER_CPU_TILES=0 keeps the walk (an A/B switch; other bits: another
# order of each sum).
_cpu_tiles = os.environ.get("WORKER_CPU_TILES", "") != "0"
# WORKER_MOE_SORTED_PAIRS=N: the routed matvec sorts its (token, selection) pairs by expert from N pairs on (default
# qmatvec.SORTED_PAIRS; 0 sorts always, as all but one token did before the thirtieth session): an A/B switch, the
# same bits either way.
_moe_sorted_pairs = env_int("WORKER_MOE_SORTED_PAIRS", qmatvec.SORTED_PAIRS)
# A decode call of the grouped MoE matmul of at most this many (token, selection) pairs is "few": one or two streams'
# tokens, whose 4 or 8 experts' tiles leave most of the card idle unless K splits in more programs.
FEW_PAIRS = 8


def _decode_splits(value: str) -> tuple[int, int]:
    """WORKER_MOE_DECODE_SPLITS's "FEW:MANY" (K's splits at a decode call of at most FEW_PAIRS pairs, and of more)
    or "N" (both), powers of two."""
    try:
        few, many = (int(v) for v in (value.split(":") if ":" in value else (value, value)))
    except ValueError:
        few = many = 0
    if min(few, many) < 1 or few & (few - 1) or many & (many - 1):
        raise ValueError(f"WORKER_MOE_DECODE_SPLITS={value!r}: must be FEW:MANY or N, powers of two (e.g. 4:2)")
    return few, many


# Every decode call of the grouped MoE matmul sums K in max(FEW, MANY) leaves and splits it in FEW programs at a call
# of few pairs, MANY at more (moe_matmul.Plan.leaves and .splits; WORKER_MOE_DECODE_SPLITS=FEW:MANY or N for an A/B):
# a pair's bits depend on the leaves alone, so a token's are the same in every bucket whatever its splits. Measured
# on an H100 (docs/PERFORMANCE.md, forty-fourth session), each split a leaf then: gpt-oss-20b's batch-1 decode 263.7
# tok/s at 2 splits, 285.6 at 4, 292.9 at 8; through HTTP, one stream 260.5 -> 282.2 at 4, but 64 streams 3,915.0
# -> 3,707.2. Hence 4 for one stream's buckets and 2 beyond (the forty-second session: 225.7 -> 237.4 at 2).
_moe_decode_splits = _decode_splits(os.environ.get("WORKER_MOE_DECODE_SPLITS", "").strip() or "4:2")
# WORKER_MXFP4_PTX (on unless 0): the grouped MoE matmul decodes the stored MXFP4 to bf16 by inline PTX
# (moe_matmul.Plan.ptx; sm_90 and later, else the integer build): 8.1 instructions a value against 12.7 in its loop at
# one stream's decode tiles (sm_90a, static, tools/kernel_sass.py), where Nsight Compute found the kernel bound by
# issue. The same values, so the same bits: the asm interpreted on the CPU gives gguf-py's for every code and exponent
# (tests/test_pallas_moe_matmul.py), and on the card its gpu test gives the integer build's bits. Measured on an H100
# (docs/PERFORMANCE.md, forty-fifth session): gpt-oss-20b's batch-1 decode 284.4 -> 313.1 tok/s (1.101x), prefill
# 15,323.8 -> 16,903.4; through HTTP one stream 282.4 -> 309.2, 64 streams 3,791.6 -> 4,369.0 tok/s.
_mxfp4_ptx = os.environ.get("WORKER_MXFP4_PTX", "1") != "0"
# WORKER_INT8_UNROLL=1: the int8-x kernels with their K loop written out (qmatvec.Plan.unroll: the same bits); off:
# +0.6% a decode step on the card, for ten times the first compile (docs/kernels.md).
_int8_unroll = os.environ.get("WORKER_INT8_UNROLL", "0") == "1"


def _swap_formats(value: str) -> frozenset:
    """WORKER_TC_SWAP's formats: every one for "1", none for "0", else the named GGML formats (any case)."""
    if value in ("0", "1"):
        return frozenset(QT) if value == "1" else frozenset()
    try:
        return frozenset(QT[name.strip().upper()] for name in value.split(",") if name.strip())
    except KeyError as err:
        raise ValueError(f"WORKER_TC_SWAP: {err.args[0]!r} is not 0, 1 or a comma-separated list of GGML formats "
                         "(e.g. q8_0,q5_0,mxfp4)") from None  # fmt: skip


# The swapped dot (WORKER_TC_SWAP=0 turns it off): decode's float tensor-core products with the weight tile as the
# MMA's M and the rows as its N (qmatvec.Plan.swap), so that the row tile follows the rows: one stream stages a
# 16-row x tile, not 64 rows of zeros; the grouped MoE matmul's too (moe_matmul.Plan.swap, its row tile by the call's
# pairs). A row's bits are the same at every row tile on the card (its gpu tests and the invariance tests passed on an
# H100, 2026-12-07), other bits than the unswapped dot's. Measured there, worker only, two rounds each
# (docs/PERFORMANCE.md, forty-first session): one stream qwen2.5-0.5b +2.4-3.0%, phi3-mini the same, gpt-oss-20b
# +13%; 64 streams the same on qwen2.5-0.5b, 0.957x and 1.004x on phi3-mini, +6-14% on gpt-oss-20b. Alone it lost
# 4-21% on the K-quants at one row, so WORKER_TC_SWAP also takes a comma-separated list of the formats that swap
# (e.g. q8_0,q5_0,q4_0,mxfp4): an A/B of the choice by format in whole steps. A row's bits stay the same at every
# tile either way: a call's choice is its weight's format (the experts' stored one), whatever the batch.
_tc_swap = _swap_formats(os.environ.get("WORKER_TC_SWAP", "1"))


def _stages_by_tile(value: str) -> dict[int, int]:
    """WORKER_SWAP_STAGES's "16:3,32:2" -> {16: 3, 32: 2}: the swapped dot's pipeline depth by row tile."""
    stages = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        tile, _, depth = item.partition(":")
        if not (tile.isdigit() and depth.isdigit() and int(depth) >= 1):
            raise ValueError(f"WORKER_SWAP_STAGES: {item!r} is not ROW_TILE:STAGES (e.g. 16:3,32:3)")
        stages[int(tile)] = int(depth)
    return stages


# WORKER_DENSE_PTX=1 (off by default, untimed on a card): decode's float tensor-core products make their weight tiles
# by inline PTX in float16 pairs (qmatvec.Plan.ptx, the formats of qmatvec.PTX_TYPES, an NVIDIA GPU's): 3.91 SASS
# instructions a value where the float path takes 6.84 (phi3's Q4_K gate_up swapped at one row; 4.08 against 7.07
# at 64 rows; Q5_K 9.30 against 11.07, Q6_K 7.02 against 10.02; sm_90a, tools/kernel_sass.py; docs/kernels.md). The
# K-quants' values then round d * sc and dmin * m to float16 first: other bits than the float path's (a model takes
# one or the other for every call).
_dense_ptx = os.environ.get("WORKER_DENSE_PTX", "0") == "1"
# WORKER_SWAP_STAGES=16:3,32:3: the swapped dot's software pipeline depth by row tile (qmatvec.swap_row_tile), where the
# tensor-core plan takes one stage (its unswapped 64-row x tile in shared memory; the swapped dot's follows the rows).
# Stages change when a step's loads are issued, not its arithmetic, so a bucket's depth leaves a row's bits as they are
# (`bench.kernels --sweep-kernel swapped` checks that on the card, and times it). An A/B knob: on an H100 (2026-12-07)
# qwen2.5's small Q4_K down at 2 rows, a shape bound by latency (2.4 MB), gained nothing from 2-4 stages; phi3's
# bandwidth-bound shapes are untimed. Counted for sm_90a (tools/kernel_sass.py), phi3's Q4_K qkv swapped at one stage
# takes 173 registers (2 programs a multiprocessor, 8 warps) against the per-row kernel's 127 (4, 16 warps) and
# three stages 168 (3 programs): fewer bytes in flight is the suspect.
_swap_stages = _stages_by_tile(os.environ.get("WORKER_SWAP_STAGES", ""))


def tc_swapped(qtype: QT) -> bool:
    """Whether decode's tensor-core products on weights of this format take the swapped dot (`_tc_swap`)."""
    return qtype in _tc_swap


_ENV_TILES = ("block_n", "chunk", "splits", "num_warps", "num_stages", "programs")  # qmatvec.plan's integer ones


def _tiles_from_env(name: str) -> dict[str, int]:
    """`NAME=block_n=128,num_warps=4` -> {"block_n": 128, "num_warps": 4}: qmatvec.plan's tile arguments."""
    tiles = {}
    for item in filter(None, os.environ.get(name, "").split(",")):
        key, _, value = item.partition("=")
        if key not in _ENV_TILES or not value.isdigit():
            names = f"{', '.join(_ENV_TILES[:-1])} or {_ENV_TILES[-1]}"
            raise ValueError(f"{name}: {item!r} is not {names} = an integer")
        tiles[key] = int(value)
    return tiles


# WORKER_INT8_TILES="block_n=128,num_warps=4": the int8-x kernels' plan with these overrides (a model's every int8-x
# call, dense and routed experts; other splits give other bits): the A/B of a tiling in a real step on the card,
# after bench.kernels --sweep-kernel int8 has timed it alone.
_int8_tiles = _tiles_from_env("WORKER_INT8_TILES")
# WORKER_INT8_EXPERT_TILES: the same, for the routed experts' int8-x matvec only (on top of WORKER_INT8_TILES): their
# plan is the dense calls' (128 output rows on 4 warps, timed on qwen2.5 and phi3 only), and gpt-oss-20b's one-stream
# decode fell from 319.5 to 274.5 tok/s on an H200 between the eighteenth and twenty-sixth sessions.
_int8_expert_tiles = _int8_tiles | _tiles_from_env("WORKER_INT8_EXPERT_TILES")
# Which kernels the decode-sized products use on the kernel backends (ModelConfig.decode_kernels, set while a
# model's step is traced: `decode_kernels`):
#   "tensor-cores"  the tensor-core kernels for every call: qmatvec's ROW_TILE-row dot, the grouped MoE matmul. One
#                   pass over the weights for up to 64 rows, but its cost hardly shrinks with fewer (H200, one
#                   call of phi3-mini's gate_up: 65 us for 1 row, 90 us for 64; gpt-oss-20b, a step: 8.7 ms for 1
#                   row, 21.0 ms for 64).
#   "per-row"       the per-row kernels for every call: qmatvec's multiply-add loop, the routed MoE matvec (each
#                   pair reads its expert). Fast for a few rows (the same gate_up: 50 us for 1 row), one pass per
#                   8 rows (583 us for 64).
#   "by-rows"       per-row up to qmatvec.MAX_ROWS rows, tensor cores above: the fastest, but a row's bits then
#                   depend on how many rows share its call (not batch invariant).
#   "per-row-int8"  "per-row", with the weights of qmatvec_int8's formats (dense, and the routed experts) on x
#                   rounded to int8 (integer dot products, worker.load's int8_x: another precision of x,
#                   docs/kernels.md); batch invariant. One stream's fastest decode (docs/PERFORMANCE.md).
# A batch-invariant model uses "tensor-cores" or "per-row" for every call (worker/model.py picks by --max-batch),
# or "per-row-int8" where asked for.
DECODE_KERNELS = ("tensor-cores", "per-row", "by-rows", "per-row-int8")
_decode_kernels: ContextVar[str] = ContextVar("decode_kernels", default="by-rows")
# A decode step's live rows ([B] bool, runner: rows with a sequence), for the per-row kernels to skip the others.
_live_rows: ContextVar[jax.Array | None] = ContextVar("live_rows", default=None)
_fold_counts: ContextVar[FoldCounts | None] = ContextVar("fold_counts", default=None)
_cpu_rows_kernel: ContextVar[bool] = ContextVar("cpu_rows_kernel", default=False)


@contextmanager
def decode_kernels(mode: str) -> Iterator[None]:
    """The decode kernels (DECODE_KERNELS) of the ops traced inside."""
    if mode not in DECODE_KERNELS:
        raise ValueError(f"unknown decode kernels {mode!r} (one of {', '.join(DECODE_KERNELS)})")
    token = _decode_kernels.set(mode)
    try:
        yield
    finally:
        _decode_kernels.reset(token)


@dataclasses.dataclass
class FoldCounts:
    """The counts that the kernels' epilogues share (qmatvec_int8.Epilogue), handed from one product to the next
    while a forward pass is traced (`fold_counts`): every call leaves them zeros, so one buffer, zeroed once a
    pass, serves every product in turn, each updating it in place (no zeroed buffer a call: a launch each). `trace`:
    the JAX trace they belong to (a product traced inside another, e.g. a loop's body, takes a buffer of its own)."""

    counts: jax.Array | None = None
    trace: object = None


@contextmanager
def fold_counts() -> Iterator[None]:
    """The products traced inside hand the epilogues' counts on from one to the next (`FoldCounts`)."""
    token = _fold_counts.set(FoldCounts())
    try:
        yield
    finally:
        _fold_counts.reset(token)


def _take_counts(need: int) -> tuple[FoldCounts | None, jax.Array | None]:
    """The shared counts for a product that uses `need` of them (None: it makes its own), and their holder."""
    held = _fold_counts.get()
    if held is None:
        return None, None
    trace = _current_trace()
    if trace is None:
        return None, None
    if held.counts is None or held.trace is not trace or held.counts.shape[0] < need:
        held.counts, held.trace = jnp.zeros((max(need, FOLD_COUNTS),), jnp.int32), trace
    return held, held.counts


def _current_trace() -> object | None:
    """The JAX trace being built (None where this JAX does not say: each product then zeroes its own counts). JAX
    has no public name for it; a buffer of an outer trace used inside an inner one would be a leaked tracer."""
    from jax._src import core

    ctx = getattr(core, "trace_ctx", None)
    return getattr(ctx, "trace", None)


@contextmanager
def live_rows(live: jax.Array) -> Iterator[None]:
    """The ops traced inside are one decode step's ([B, 1, D] rows) whose `live` [B] rows alone are used: a dense
    per-row matvec computes no group of dead rows (qmatvec.when_live; their results are zeros)."""
    token = _live_rows.set(live)
    try:
        yield
    finally:
        _live_rows.reset(token)


@contextmanager
def cpu_rows_kernel() -> Iterator[None]:
    """The CPU layout's products traced inside take the CPU's own kernel whatever their rows: a row's bits then do
    not depend on the rows beside it (runner: a deterministic CPU decode step computes its rows together)."""
    token = _cpu_rows_kernel.set(True)
    try:
        yield
    finally:
        _cpu_rows_kernel.reset(token)


def _tensor_cores(rows: int) -> bool:
    mode = _decode_kernels.get()
    return mode == "tensor-cores" or (mode == "by-rows" and rows > qmatvec.MAX_ROWS)


def _int8_x(w: QuantArray) -> bool:
    """Whether a decode-shaped call on `w` takes x rounded to int8 ("per-row-int8" and a format with that kernel)."""
    return _decode_kernels.get() == "per-row-int8" and w.qtype in qmatvec_int8.INT8_TYPES


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r} (one of {', '.join(BACKENDS)})")
    return name


def _attention_kernels_on(backend: str) -> bool:
    return backend != "cpu" and _attention_kernel


# Which products stay on the matvec kernels. A decode-shaped product ([R, 1, In]: one position a sequence) and a
# prefill-shaped one whose sequences each feed at most PREFILL_KERNEL_ROWS positions ([G, T, In], T <= that) take
# them in one call for any number of rows, each row's bits the same in a call of any size (the kernels' contract).
# So several sequences' prompt chunks can share a prefill dispatch (runner `prefill_group`) and each still gets the
# bits it gets alone: batch invariance by construction, decided by the sequence's own chunk length, never by how
# many others share the call. Longer chunks (one sequence a dispatch) go to dequantize + XLA's dot: cuBLAS is
# faster than the kernel's plain float16 product (docs/kernels.md), and with one sequence a dispatch its
# rows-dependent sum order changes nothing.
PREFILL_KERNEL_ROWS = 128


def _on_kernels(x: jax.Array) -> bool:
    """Whether x's product may take the kernels by its shape: [..., T, In] with T <= PREFILL_KERNEL_ROWS; a 2-D
    x ([M, In]) counts as one sequence of M positions."""
    return (x.shape[-2] if x.ndim >= 3 else x.size // max(1, x.shape[-1])) <= PREFILL_KERNEL_ROWS


def _kernel_fits(w: Weight, plane_ndim: int, backend: str, types: frozenset = qmatvec.KERNEL_TYPES) -> bool:
    return (
        backend != "cpu"
        and isinstance(w, QuantArray)
        and w.qtype in types
        and w.shape[-1] % qmatvec.FORMATS[w.qtype].sb == 0
        and all(p.ndim == plane_ndim for p in w.planes.values())
    )


def as_f32(w: Weight) -> jax.Array:
    return dequantize(w, jnp.float32) if isinstance(w, QuantArray | Int8Blocks) else w.astype(jnp.float32)


# Tensor parallelism with the kernel backends (docs/tensor-parallel.md): XLA's SPMD partitioner cannot split a
# Pallas call, so under a mesh each kernel runs inside `jax.shard_map` on its device's shards, with the one
# collective the split needs written out (a psum over the devices whose partial sums meet, in a fixed order for a
# given mesh). check_vma=False: with the check on, every pallas_call's out_shape would have to declare how it varies
# over the mesh axes (ShapeDtypeStruct's manual_axis_type), in kernel code that knows nothing of meshes (JAX
# 0.10 refuses the call otherwise); the out specs below say what varies.
def _ways(axes: str | tuple[str, ...] | None, mesh: Mesh) -> int:
    names = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(mesh.shape[a] for a in names)


def _on_shards(body, mesh: Mesh, in_specs: tuple, out_specs: P):
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _local(w: QuantArray | Int8Blocks) -> tuple[int, ...]:
    """A split weight's shape on one device."""
    spec = (*w.sharding.spec, *(None,) * (len(w.shape) - len(w.sharding.spec)))
    return tuple(n // _ways(a, w.sharding.mesh) for n, a in zip(w.shape, spec, strict=True))


def _split_qmatvec(x: jax.Array, w: QuantArray, interpret: bool, tensor_cores: bool) -> jax.Array:
    """qmatvec of a weight split by output rows (q/k/v, gate/up, vocabulary: each device its rows of y, no
    collective) or by input columns (attn_output, ffn_down: x arrives split the same way, each device's partial
    sums are added by one psum)."""
    mesh, (rows, cols) = w.sharding.mesh, (*w.sharding.spec, None, None)[:2]
    lead = (None,) * (x.ndim - 1)
    local = _local(w)

    def body(x: jax.Array, planes: dict[str, jax.Array]) -> jax.Array:
        y = qmatvec.qmatvec(x, QuantArray(planes, w.qtype, local), interpret=interpret, tensor_cores=tensor_cores)
        return jax.lax.psum(y, cols) if cols is not None else y

    return _on_shards(body, mesh, (P(*lead, cols), P(rows, cols)), P(*lead, rows))(x, w.planes)


def _expert_parallel(kernel, x: jax.Array, experts: QuantArray, expert_ids: jax.Array, interpret: bool) -> jax.Array:
    """A MoE kernel over experts split by whole experts: each device computes the selections of its own experts
    (the others' pairs are pointed at its first expert and their results zeroed), one psum adds them up (a
    selection belongs to one device, so the sum adds only zeros to it)."""
    mesh, axes = experts.sharding.mesh, experts.sharding.spec[0]
    local = _local(experts)

    def body(x: jax.Array, planes: dict[str, jax.Array], ids: jax.Array) -> jax.Array:
        own = ids - jax.lax.axis_index(axes) * local[0]
        mine = (own >= 0) & (own < local[0])
        y = kernel(x, QuantArray(planes, experts.qtype, local), jnp.where(mine, own, 0), interpret=interpret)
        return jax.lax.psum(jnp.where(mine[..., None], y, 0.0), axes)

    return _on_shards(body, mesh, (P(), P(axes), P()), P())(x, experts.planes, expert_ids)


def _per_kv_head(kernel, mesh: Mesh, q: jax.Array, kv: tuple[jax.Array, ...], kv_axis: int, sinks: jax.Array | None,
                 rest: tuple, fits) -> jax.Array | None:  # fmt: skip
    """An attention kernel on each device's query heads (q [B, T, H, D], axis 2) and kv heads (axis `kv_axis` of
    the k/v arrays): a device's query heads belong to the kv heads it holds (sharding.make_mesh), so no
    collective. `rest`: replicated arguments after k, v. None where the kernel does not take the local shapes."""
    heads, kv_heads = sharding.RULES["heads"], sharding.RULES["kv_heads"]
    b, t, h, d = q.shape
    kv_shape = list(kv[0].shape)
    kv_shape[kv_axis] //= _ways(kv_heads, mesh)
    if not fits((b, t, h // _ways(heads, mesh), d), tuple(kv_shape)):
        return None
    q_spec = P(None, None, heads, None)
    kv_spec = P(*(kv_heads if i == kv_axis else None for i in range(kv[0].ndim)))
    args = (q, *kv, *rest) + ((sinks,) if sinks is not None else ())
    specs = (q_spec, kv_spec, kv_spec, *(P() for _ in rest)) + ((P(heads),) if sinks is not None else ())

    def body(q, k, v, *more):
        local_sinks = more[len(rest)] if sinks is not None else None
        return kernel(q, k, v, *more[: len(rest)], local_sinks)

    return _on_shards(body, mesh, specs, q_spec)(*args)


def _tile_rows(n: int, k: int, rows: int) -> int:
    """Rows per tile of an [n, k] weight against `rows` rows of x: the largest divisor of n within the tile bytes
    (CPU_DECODE_TILE_BYTES up to CPU_DECODE_ROWS rows, else CPU_TILE_BYTES) of float32 and below n (XLA removes a
    one-trip loop and would then widen the whole matrix at the program's start); where n splits badly (a tile under
    a quarter of the limit), the limit itself, the remainder then being a tile of its own."""
    tile_bytes = CPU_DECODE_TILE_BYTES if rows <= CPU_DECODE_ROWS else CPU_TILE_BYTES
    limit = max(1, min(n // 2, tile_bytes // (4 * k)))
    tile = next(t for t in range(limit, 0, -1) if n % t == 0)
    return tile if tile >= limit // 4 else limit


# A nested jit: the many matmuls of one shape (every layer's) are traced and lowered once, not once each (a start
# of the CPU worker spent ~10 s tracing 250 tile loops).
@functools.partial(jax.jit, static_argnames=("kernel", "threads"))
def int8_matmul(x: jax.Array, w: Int8Blocks, kernel: str | None = None, threads: int = cpu_kernels.ALL_THREADS,
                ) -> jax.Array:  # fmt: skip
    """x [..., K] @ w.T -> [..., N] float32, walking row tiles of w: each tile is widened to float32 (exactly,
    as `dequantize`) next to its dot, inside a loop body. Why: XLA's CPU backend neither fuses a widening into a
    dot nor reuses the buffers of widenings outside loops, so a whole-matrix widening costs a fresh float32 copy
    of every weight per call (page faults, mostly); a tile's buffer is reused and stays in cache. One device's
    matrix (a split one: `_split_int8`).
    `kernel` (`_cpu_kernel_form`): the CPU's own kernel instead (worker/cpu_kernels) in that form: "rows", each code
    widened in a register, each row of x on its own; "tiles", w's rows widened a tile at a time and dotted with
    every row of x (many rows). `threads`: how many of XLA's intra-op threads the kernel takes beside the calling
    one (cpu_kernels.int8_matvec: all for one device's whole model, a share for each of several devices')."""
    n, k = w.shape
    x2 = x.reshape(-1, k).astype(jnp.float32)
    if kernel is not None:
        y = cpu_kernels.int8_matvec(x2, w, threads=threads, tiles=kernel == "tiles")
        return y.reshape(*x.shape[:-1], n)
    return _int8_rows(x2, w).T.reshape(*x.shape[:-1], n)


def _cpu_kernel_form(x: jax.Array, w: Int8Blocks, threads: int) -> str | None:
    """Which form of the CPU's own kernel x @ w.T takes, where the kernel builds and takes w's blocks: "rows" up to
    CPU_KERNEL_ROWS rows of x (decode), or any number inside `cpu_rows_kernel` (a decode step whose rows must not
    change each other's bits); "tiles" for more rows where the call takes threads of XLA's pool (`threads`, as
    int8_matmul's: a one-device model's prefill, or a device's share of more cores than devices); else None, XLA's
    tile walk (more rows on a device's own thread, where XLA's dot is faster)."""
    if not (cpu_kernels.fits(w) and cpu_kernels.available()):
        return None
    rows = x.size // max(1, x.shape[-1])
    if rows <= CPU_KERNEL_ROWS or _cpu_rows_kernel.get():
        return "rows"
    # Measured on 2 cores (Gemma 3 270M, docs/PERFORMANCE.md "CPU", thirty-fifth session): one device's prefill
    # 447-452 tok/s on the tile walk (about one core), 555-579 on the tiles over both cores; on one of two devices
    # the tiles on the device's own thread lost to the walk (561 against 692 in one pair of runs).
    return "tiles" if threads > 0 and _cpu_tiles else None


# WORKER_CPU_KERNEL_TASKS=N: each of several host devices' kernel calls takes N of XLA's pool threads beside its own,
# not its share of the cores (cpu_kernels.kernel_tasks); 0 was the layout's only way before the forty-sixth session.
# An A/B setting (tools/gpu-session.sh `cpu-cores`).
_cpu_kernel_tasks = (
    env_int("WORKER_CPU_KERNEL_TASKS", 0) if os.environ.get("WORKER_CPU_KERNEL_TASKS", "").strip() else None
)


def _device_kernel_tasks(devices: int) -> int:
    """The pool threads a kernel call on one of `devices` host devices takes beside its own."""
    return cpu_kernels.kernel_tasks(devices) if _cpu_kernel_tasks is None else _cpu_kernel_tasks


def _split_int8(x: jax.Array, w: Int8Blocks) -> jax.Array:
    """int8_matmul of a matrix split over devices, on each device's shard: by output rows (each device its rows of
    y, no collective) or by input columns (x arrives split the same way; each device's partial sums added by one
    psum). Why not XLA's partitioner on the global tile loop: it all-reduced each tile's partial sums inside the
    loop (Gemma 3 270M over 2 host devices: 36 all-reduces in the loops' bodies, a trip each)."""
    mesh, (rows, cols) = w.sharding.mesh, (*w.sharding.spec, None, None)[:2]
    lead = (None,) * (x.ndim - 1)
    local = _local(w)
    threads = _device_kernel_tasks(mesh.size)
    kernel = _cpu_kernel_form(x, w, threads)

    def body(x: jax.Array, shard: Int8Blocks) -> jax.Array:
        y = int8_matmul(x, dataclasses.replace(shard, shape=local, sharding=None), kernel, threads)
        return jax.lax.psum(y, cols) if cols is not None else y

    return _on_shards(body, mesh, (P(*lead, cols), P(rows, cols)), P(*lead, rows))(x, w)


def _int8_rows(x2: jax.Array, w: Int8Blocks) -> jax.Array:
    """x2 [M, K] against every row of w, tile by tile: [N, M]."""
    n, k = w.shape
    hi = jax.lax.Precision.HIGHEST
    tile = _tile_rows(n, k, x2.shape[0])
    full = n // tile
    if w.nibbles is None:

        def dot(part: Int8Blocks) -> jax.Array:  # [tile, M]: stacked tiles are then [N, M] without a copy
            return jnp.einsum("nk,mk->nm", dequantize(part), x2, precision=hi)

    else:
        # Codes two a byte: each nibble group's low halves and high halves against x's matching values, two dots
        # summed. Why not the unpacked tile in one dot: XLA:CPU computes the interleaving of the halves element by
        # element (the walk 3x slower than on int8 codes), where each half alone is a plain elementwise widening.
        x_halves = x2.reshape(x2.shape[0], -1, 2, NIBBLE_GROUP // 2)
        x_halves = [x_halves[:, :, h].reshape(x2.shape[0], -1) for h in range(2)]

        def dot(part: Int8Blocks) -> jax.Array:
            halves = zip(nibble_halves(part), x_halves, strict=True)
            return sum(jnp.einsum("nk,mk->nm", v, xh, precision=hi) for v, xh in halves)

    _, ys = jax.lax.scan(lambda c, i: (c, dot(w.rows(i * tile, tile))), None, jnp.arange(full))
    y = ys.reshape(full * tile, -1)
    if full * tile < n:
        y = jnp.concatenate([y, dot(w.rows(full * tile, n - full * tile))])
    return y


def qmatmul(
    x: jax.Array,
    w: Weight,
    bias: jax.Array | None = None,
    *,
    backend: str = "cpu",
    exact: bool = False,
    norm: tuple[jax.Array, float] | None = None,
    residual: jax.Array | None = None,
    glu: str | None = None,
) -> jax.Array:
    """x [..., In] @ w[Out, In].T (+ bias) (+ residual, added last: `residual` + (y + bias)) -> [..., Out]; w stays
    quantized in memory, dequantized per call.
    On the GPU backend decode-shaped calls and prefill chunks of up to PREFILL_KERNEL_ROWS positions a sequence go
    to the Pallas matvec (any number of rows, `_on_kernels`); longer chunks to dequantize + XLA's dot.
    `exact`: float32 operands on every backend, for a product whose result picks something discrete (the MoE
    router: bf16 operands flipped near-tied experts, 1.1 relative error at one position of a gpt-oss oracle); on
    the kernel backends the per-row kernel, whose rows never depend on each other.
    A weight in the CPU layout (Int8Blocks) goes to `int8_matmul` (float32, exact like the CPU path).
    `norm` (w [In], eps): x is RMSNorm's input, normalized first (`rms_norm` on one device); with
    `_norm_rounding` (the gpu backend by default), on the int8-x kernels by the kernel that rounds x (one launch where
    there are two).
    `residual`: with `_fold_epilogue`, on the int8-x per-row kernel, the bias and the residual are added by the
    kernel's last program of each column tile (`_epilogue_matvec`); the same bits as XLA's adds after it.
    `glu` (a name of qmatvec_int8.GLU_ACTIVATIONS): x is a gated unit's [gate | up] [..., 2 In], and the product's
    input act(gate) * up; with `_glu_rounding`, on the int8-x kernels, computed by the kernel that rounds it."""
    int8_x = _on_int8_x_kernels(x, w, backend, exact)
    if glu is not None and not (_glu_rounding.get(backend) and int8_x and norm is None):
        x, glu = qmatvec_int8.glu_product(x, glu), None
    if norm is not None and not (_norm_rounding.get(backend) and int8_x):
        x, norm = rms_norm(x, *norm, backend), None
    rows = x.size // max(1, x.shape[-1])
    per_row = int8_x and rows <= qmatvec.MAX_ROWS and not _tensor_cores(rows)
    if residual is not None and per_row and _fold_epilogue.get(backend):
        return _epilogue_matvec(x, w, bias, residual, norm, glu, backend)
    if isinstance(w, Int8Blocks):
        split = w.sharding is not None and any(a is not None for a in w.sharding.spec)
        # Replicated: XLA's partitioner splits x's tokens, each device's kernel on its share of XLA's threads. One
        # device (no sharding): the kernel on all of them.
        threads = cpu_kernels.ALL_THREADS if w.sharding is None else _device_kernel_tasks(w.sharding.mesh.size)
        y = _split_int8(x, w) if split else int8_matmul(x, w, _cpu_kernel_form(x, w, threads), threads)
    elif _kernel_fits(w, 2, backend, types=qmatvec.MATVEC_TYPES) and _on_kernels(x):
        # A prefill-shaped product takes the tensor cores whatever the decode kernels. `exact`: the per-row kernel,
        # float32 throughout.
        interpret = backend == "interpret"
        prefill = x.ndim >= 3 and x.shape[-2] > 1
        tensor_cores = not exact and (prefill or _tensor_cores(rows))
        if w.sharding is not None:
            y = _split_qmatvec(x, w, interpret, tensor_cores)
        elif prefill and tensor_cores:
            # Thousands of rows: the weight dequantized once (into the dot's operand type), then a plain tensor-core
            # product with prefill's tiles, where dequantizing in registers would redo it for every row tile.
            plain = widened(w, jnp.float32 if interpret else jnp.float16)
            y = qmatvec.qmatvec(x, plain, interpret=interpret, **qmatvec.PREFILL_TILES)
        else:
            # More rows than a per-row program takes: the int8-x dot, whose rows have the per-row kernel's bits
            # (exact integer sums, one float order: qmatvec_int8._mma_kernel), so the switch keeps batch invariance.
            tensor_cores = tensor_cores or (int8_x and rows > qmatvec.MAX_ROWS)
            # The dead rows skipped on the float per-row kernel. Measured on an H200 (2026-12-04, one stream,
            # bench.worker_bench): float phi3-mini 252.7 -> 277.0 tok/s, qwen2.5-0.5b 821.0 -> 814.2. Not on int8 x,
            # whose two-row programs are faster than one row a program with the dead one's skipped: measured twice,
            # with `pl.when` (H200, 2026-12-04: phi3-mini 325.9 -> 315.5, qwen2.5 905.9 -> 840.3) and with a trip count
            # of 0 (qmatvec.live_steps; H200, 2026-12-06: phi3-mini 340.0 -> 262.4, qwen2.5 974.8 -> 917.2).
            live = _live_rows.get()
            skip = not tensor_cores and not int8_x
            live = live if live is not None and live.size == rows and skip else None
            if int8_x:
                tiles = _int8_x_tiles(norm, glu)
            else:
                tiles = _float_tiles(tensor_cores and tc_swapped(w.qtype), rows,
                                     tensor_cores and dense_ptx(w.qtype, backend))  # fmt: skip
            y = qmatvec.qmatvec(x, w, interpret=interpret, tensor_cores=tensor_cores, live=live, **tiles)
    elif backend == "gpu" and not exact:
        # Prefill on the GPU: dequantize into a bf16 scratch and let XLA's dot use the tensor cores (f32
        # accumulation). bf16 operands cost ~1e-2 relative on the logits (docs/gpu.md), not the CPU's 1e-6.
        wb = dequantize(w, jnp.bfloat16) if isinstance(w, QuantArray) else w.astype(jnp.bfloat16)
        y = jnp.einsum("...i,oi->...o", x.astype(jnp.bfloat16), wb, preferred_element_type=jnp.float32)
    else:
        y = jnp.einsum("...i,oi->...o", x.astype(jnp.float32), as_f32(w), precision=jax.lax.Precision.HIGHEST)
    y = y if bias is None else y + bias
    return y if residual is None else residual + y


def _float_tiles(swap: bool, rows: int, ptx: bool = False) -> dict:
    """qmatvec's arguments for a dense product on the float kernels: the swapped dot's, with its bucket's pipeline
    depth where WORKER_SWAP_STAGES names its row tile; `ptx`: the tensor-core kernel's tiles made by inline PTX."""
    stages = _swap_stages.get(qmatvec.swap_row_tile(rows)) if swap else None
    return {"swap": swap} | ({"num_stages": stages} if stages else {}) | ({"ptx": True} if ptx else {})


def dense_ptx(qtype: QT, backend: str) -> bool:
    """Whether decode's tensor-core products on weights of this format make their tiles by inline PTX
    (`_dense_ptx`; an NVIDIA GPU only, qmatvec.ptx_runs)."""
    return _dense_ptx and backend == "gpu" and qtype in qmatvec.PTX_TYPES and qmatvec.ptx_runs()


def _int8_x_tiles(norm: tuple[jax.Array, float] | None, glu: str | None) -> dict:
    """qmatvec's arguments for a dense product on the int8-x kernels, with `norm` (w, eps) or `glu` done by the kernel
    that rounds x where given."""
    tiles = dict(int8_x=True, unroll=_int8_unroll, glu=glu, **_int8_tiles)
    return tiles if norm is None else tiles | dict(norm_w=norm[0], norm_eps=float(norm[1]))


def _epilogue_matvec(x: jax.Array, w: QuantArray, bias: jax.Array | None, residual: jax.Array,
                     norm: tuple[jax.Array, float] | None, glu: str | None, backend: str) -> jax.Array:  # fmt: skip
    """`qmatmul` with a residual on the int8-x per-row kernel, which folds, adds the bias and the residual itself
    (qmatvec_int8.Epilogue), the counts handed on (`FoldCounts`)."""
    tiles = _int8_x_tiles(norm, glu)
    n, k = w.shape
    rows = x.size // max(1, x.shape[-1])  # x is [..., 2K] with `glu`
    p = qmatvec.plan(w.qtype, n, k, 1, **{a: v for a, v in tiles.items() if a in qmatvec.TILE_ARGS})
    groups = -(-rows // qmatvec.row_group(rows, False))
    held, counts = _take_counts(qmatvec_int8.epilogue_counts(groups, -(-n // p.block_n)))
    y, counts = qmatvec.qmatvec(x, w, interpret=backend == "interpret", tensor_cores=False,
                                epilogue=(bias, residual, counts), **tiles)  # fmt: skip
    if held is not None:
        held.counts = counts
    return y


def _on_int8_x_kernels(x: jax.Array, w: Weight, backend: str, exact: bool) -> bool:
    """Whether `qmatmul` takes the int8-x kernels (per-row or dot) for x @ w.T (its one decision of it): its branch
    of decode-shaped rows on the kernels, an unsharded weight of an int8-x format, not `exact`."""
    if isinstance(w, Int8Blocks) or exact or not _kernel_fits(w, 2, backend, types=qmatvec.MATVEC_TYPES):
        return False
    prefill = x.ndim >= 3 and x.shape[-2] > 1
    return _on_kernels(x) and w.sharding is None and not prefill and _int8_x(w)


def embed(table: Weight, ids: jax.Array) -> jax.Array:
    """Rows `ids` of an [Vocab, D] table: gathers the quantized rows first, so only those are dequantized."""
    if isinstance(table, Int8Blocks):
        return dequantize(table.take(ids.reshape(-1))).reshape(*ids.shape, table.shape[-1])
    if isinstance(table, QuantArray):
        rows = {k: jnp.take(p, ids.reshape(-1), axis=0) for k, p in table.planes.items()}
        q = QuantArray(planes=rows, qtype=table.qtype, shape=(ids.size, *table.shape[1:]))
        return dequantize(q, jnp.float32).reshape(*ids.shape, table.shape[-1])
    return jnp.take(table, ids, axis=0).astype(jnp.float32)


def row_sum(x: jax.Array) -> jax.Array:
    """The sum over the last axis, keeping it: a fixed tree of elementwise adds (the halves added, an odd tail
    carried). Why not jnp.sum: XLA picks a reduction's order from the whole shape, and on an H200 a row's norm
    came out otherwise in a 512-row prefill dispatch than in its own 64-row one; elementwise adds have one order
    per row whatever the other rows (batch invariance, like qmatvec.fold_splits)."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        pairs = x[..., :half] + x[..., half : 2 * half]
        x = jnp.concatenate([pairs, x[..., 2 * half :]], axis=-1) if x.shape[-1] % 2 else pairs
    return x


def rms_norm(x: jax.Array, w: jax.Array, eps: float, backend: str = "cpu", mesh: Mesh | None = None) -> jax.Array:
    """x [..., D] * rsqrt(mean(x^2) + eps) * w, float32. On the GPU with one device (and on "interpret" with
    WORKER_NORM_KERNEL=1: `_norm_kernel`), one Pallas kernel (a row a program: its launches, not its arithmetic, are
    what XLA's version costs); else here, a fixed tree of adds."""
    if mesh is None and _norm_kernel.get(backend, False):
        return rms_norm_kernel.rms_norm(x, w, eps, interpret=backend == "interpret")
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(row_sum(x * x) / x.shape[-1] + eps) * w


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = row_sum(x) / x.shape[-1]
    var = row_sum(jnp.square(x - mean)) / x.shape[-1]
    return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def rope_inv_freq(dim: int, base: float) -> jax.Array:
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def yarn_inv_freq(dim: int, base: float, factor: float, original_context: int, beta_fast: float,
                  beta_slow: float, truncate: bool) -> tuple[jax.Array, float]:  # fmt: skip
    """YaRN RoPE frequencies and attention factor (the `mscale` of `rope`), as HF transformers computes them.

    Dimensions that turn fewer than `beta_slow` times over the original context are interpolated (divided by
    `factor`), those that turn more than `beta_fast` times keep their frequency, with a linear ramp between.
    `truncate` floors/ceils the ramp's ends: llama.cpp always does; gpt-oss's HF config says not to, and the
    difference is ~2e-3 relative on the logits. Computed in float64 on the host: the config is static.
    """

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, dim - 1.0)
    if low == high:  # HF's guard against a zero-width ramp
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)  # 0: keep, 1: interpolate
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2) / dim)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1.0 - ramp)
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return jnp.asarray(inv_freq, jnp.float32), mscale


def rope_tables(positions: jax.Array, inv_freq: jax.Array, mscale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, rot/2] of positions [B, T] at each frequency, times `mscale`: what `rope` multiplies by."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * mscale, jnp.sin(angles) * mscale


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, neox: bool, mscale: float = 1.0) -> jax.Array:
    """Rotate x [B, T, N, D] by positions [B, T]. NEOX pairs (i, i + d/2); NORM (llama) pairs (2i, 2i + 1), the
    layout llama.cpp's converter leaves after permuting HF's q/k rows. Only the first 2 * len(inv_freq) dims
    rotate (partial rotary); `mscale` multiplies cos/sin (YaRN's attention factor)."""
    rot = 2 * inv_freq.shape[0]
    cos, sin = (a[:, :, None, :] for a in rope_tables(positions, inv_freq, mscale))
    xr, xp = x[..., :rot].astype(jnp.float32), x[..., rot:]
    if neox:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    return jnp.concatenate([out, xp.astype(jnp.float32)], axis=-1) if rot < x.shape[-1] else out


def attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    scale: float,
    window: int | None = None,
    sinks: jax.Array | None = None,
    *,
    backend: str = "cpu",
    mesh: Mesh | None = None,
) -> jax.Array:
    """Causal GQA attention of q [B, T, H, D] over the cache [B, S, K, D], where slot j holds position j.

    Key j is visible from a query at position p iff j <= p (and p - j < window on sliding layers). Slots past
    the sequence hold stale data from earlier jobs; the causal mask is what keeps them out. `sinks` [H]: a
    learned logit per head that joins the softmax denominator only (gpt-oss).
    On the gpu/interpret backends prefill (T > 1) goes to the flash-attention kernel of worker/pallas_kernels
    (float16 operands with float32 accumulation on the GPU); decode reads the paged cache (`paged_attention`).
    """
    if _attention_kernels_on(backend):

        def kernel(q, k, v, pos, sinks):
            return prefill_attention.prefill_attention(
                q, k, v, pos, scale, window, sinks, interpret=backend == "interpret"
            )

        if mesh is None and prefill_attention.fits(q.shape, k_cache.shape):
            return kernel(q, k_cache, v_cache, q_positions, sinks)
        if mesh is not None:
            out = _per_kv_head(kernel, mesh, q, (k_cache, v_cache), 2, sinks, (q_positions,), prefill_attention.fits)
            if out is not None:
                return out
    b, t, h, d = q.shape
    s, kh = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(b, t, kh, h // kh, d).astype(jnp.float32)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", qg, k_cache.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    ) * jnp.float32(scale)
    key_pos = jnp.arange(s)[None, None, :]
    qp = q_positions[:, :, None]
    visible = key_pos <= qp
    if window is not None:
        visible &= qp - key_pos < window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)  # [B, K, G, T, S]
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.reshape(kh, h // kh)[None, :, :, None, None], (*scores.shape[:-1], 1))
        scores = jnp.concatenate([scores, sink.astype(jnp.float32)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    if sinks is not None:
        probs = probs[..., :s]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, h, d)


def write_and_attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cache: KVCache,
    layer: int,
    table: jax.Array,
    q_positions: jax.Array,
    scale: float,
    window: int | None = None,
    sinks: jax.Array | None = None,
    *,
    backend: str = "cpu",
    mesh: Mesh | None = None,
    rotary: tuple[jax.Array, bool, float] | None = None,
) -> tuple[jax.Array, KVCache]:
    """Store k, v [B, T, K, D] at positions [B, T] of the rows of `table` in layer `layer` of the cache, then
    `paged_attention` of q over it: (its output, the cache). A decode step (T = 1) on the kernels with one device
    does both in the attention kernel (paged_decode_attention's `new_kv`; `_kv_write_kernel`).
    `rotary` (inv_freq, neox, mscale): q and k are given before RoPE (`rope`), done here first, or with
    `_rope_kernel` by that attention kernel as it reads them (a whole head rotated)."""
    one_device_kernel = _attention_kernels_on(backend) and mesh is None and paged.fits(q.shape, cache.k.shape)
    writing_kernel = _kv_write_kernel.get(backend) and q.shape[1] == 1 and one_device_kernel
    tables, neox = None, True
    if rotary is not None:
        inv_freq, neox, mscale = rotary
        if writing_kernel and _rope_kernel.get(backend) and 2 * inv_freq.shape[0] == q.shape[-1]:
            tables = tuple(a[:, 0] for a in rope_tables(q_positions, inv_freq, mscale))
        else:
            q, k = (rope(a, q_positions, inv_freq, neox, mscale) for a in (q, k))
    if writing_kernel:
        out, k_pages, v_pages = paged.paged_decode_attention(
            q, cache.k, cache.v, table, q_positions[:, 0], layer, scale, window, sinks,
            interpret=backend == "interpret", new_kv=(k, v), rope=tables, neox=neox,
        )  # fmt: skip
        return out, KVCache(k_pages, v_pages)
    cache = write_layer(cache, layer, k, v, table, q_positions)
    return paged_attention(q, cache, layer, table, q_positions, scale, window, sinks, backend=backend, mesh=mesh), cache


def paged_attention(
    q: jax.Array,
    cache: KVCache,
    layer: int,
    table: jax.Array,
    q_positions: jax.Array,
    scale: float,
    window: int | None = None,
    sinks: jax.Array | None = None,
    *,
    backend: str = "cpu",
    mesh: Mesh | None = None,
) -> jax.Array:
    """`attention` of q [B, T, H, D] over layer `layer` of the paged cache, row b reading the pages of table[b].

    Decode (T = 1) is the paged flash-decoding kernel on the gpu/interpret backends and its jax.numpy twin on the
    CPU: both walk each row's own pages and sum in an order fixed by the row alone, so a row's result depends
    neither on the table's width (a bucket of the longest row in the batch) nor on the other rows (batch
    invariance, docs/batching.md). Prefill (T > 1, one sequence's chunk) gathers the row's pages into logical
    order and runs `attention`."""
    if q.shape[1] == 1:
        args = (q, cache.k, cache.v, table, q_positions[:, 0], layer, scale, window, sinks)
        if _attention_kernels_on(backend) and mesh is not None:

            def kernel(q, k, v, table, pos, sinks):
                return paged.paged_decode_attention(q, k, v, table, pos, layer, scale, window, sinks,
                                                    interpret=backend == "interpret")  # fmt: skip

            out = _per_kv_head(kernel, mesh, q, (cache.k, cache.v), 3, sinks, (table, q_positions[:, 0]), paged.fits)
            if out is not None:
                return out
        elif _attention_kernels_on(backend) and paged.fits(q.shape, cache.k.shape):
            return paged.paged_decode_attention(*args, interpret=backend == "interpret")
        return paged.paged_decode_attention_twin(*args)
    k, v = gather_layer(cache, layer, table)
    return attention(q, k, v, q_positions, scale, window, sinks, backend=backend, mesh=mesh)


def top_k(x: jax.Array, k: int, backend: str = "cpu", mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """x [M, N] -> (the k largest values of each row, largest first, float32 [M, k]; their indices int32 [M, k]),
    the lower index first among equal values: lax.top_k, or its kernel (worker/pallas_kernels/top_k.py, the same
    bits) on one device where `_topk_kernel` says (the gpu backend by default; XLA's partitioner cannot split a
    Pallas call, and over a mesh the routing is a replicated op of its own)."""
    if mesh is None and _topk_kernel.get(backend, False):
        return top_k_kernel.top_k(x, k, interpret=backend == "interpret")
    values, indices = jax.lax.top_k(x.astype(jnp.float32), k)
    return values, indices.astype(jnp.int32)


def moe_decode_tiles(qtype: QT, pairs: int, n_experts: int, copy: bool) -> dict:
    """The grouped MoE matmul's tiles for a decode call of `pairs` (token, selection) pairs on experts stored as
    `qtype` (read as the bf16 copy where `copy`). Swapped (`_tc_swap`: its row tile by the call's pairs), either read
    takes the copy's tiles: on the stored experts the fastest grouped decode timed alone (gpt-oss-20b's gate_up at 64
    tokens 315.8 us, the copy 428.8 swapped and 457.8 not; an H100, 2026-12-07, docs/PERFORMANCE.md), with other bits
    than the copy's (MXFP4's two nibble halves are two dots a step). K in `_moe_decode_splits`' leaves and splits."""
    swap = tc_swapped(qtype)
    tiles = grouped_matmul.swapped_tiles(pairs, n_experts) if swap else {}
    if swap or copy:
        tiles = grouped_matmul.DECODE_COPY_TILES | tiles
    few, many = _moe_decode_splits
    leaves = max(few, many)
    if leaves != 1:
        tiles |= {"splits": few if pairs <= FEW_PAIRS else many, "leaves": leaves}
    return tiles | ({} if copy else _ptx_tiles(qtype))


def _ptx_tiles(qtype: QT) -> dict:
    """The grouped matmul's MXFP4 decode by inline PTX (on stored experts) unless WORKER_MXFP4_PTX=0, where the
    device runs it (sm_90 and later)."""
    return {"ptx": True} if _mxfp4_ptx and qtype == QT.MXFP4 and grouped_matmul.ptx_runs() else {}


def moe_matmul(
    x: jax.Array,
    experts: QuantArray,
    expert_ids: jax.Array,
    *,
    backend: str = "cpu",
    per_token: bool = False,
    live: jax.Array | None = None,
    decode_copy: QuantArray | None = None,
) -> jax.Array:
    """Each token's selected experts: x [M, In] (one input shared by the k selections) or [M, k, In] (one per
    selection) times experts [E, Out, In] at expert_ids [M, k] -> [M, k, Out].

    On the gpu/interpret backends: many selections go to the Pallas grouped matmul (pairs sorted by expert, tiles
    dequantized in registers, bf16 operands with f32 accumulation; a pair's result does not depend on the other
    pairs), decode (`per_token`) or few selections (M * k <= E) to it or to the routed matvec (each pair reads its
    expert's planes) as `decode_kernels` says (the matvec also takes what the grouped kernel lacks). On the CPU:
    `per_token` or few selections gather only the selected experts' planes and dequantize those, each token on its
    own; many walk the experts one at a time, each dequantized once and applied to every token, keeping the rows
    that selected it: E / k times the needed arithmetic, but never more than one expert in float32.
    `live` [M] (bool, optional): tokens whose results are used. The grouped kernel and the routed matvec skip the
    others' pairs (their results are zeros); the CPU path computes them as any token.
    `decode_copy`: the experts widened to bf16 at load (worker/model.py, `bf16_experts`), which a decode step's
    grouped kernel reads instead of dequantizing every expert's tiles again each step (the same bf16 values).
    """
    n_experts, n_out = experts.shape[:2]
    on_kernels = backend != "cpu" and grouped_matmul.fits(experts)
    # Prefill on the kernel backends always takes the grouped kernel, however few its tokens: whether a chunk's
    # selections outnumber the experts would depend on how many sequences share its dispatch (batch invariance).
    gathered = per_token or (expert_ids.size <= n_experts and not on_kernels)
    interpret = backend == "interpret"
    kernel = None
    grouped = not gathered or _tensor_cores(expert_ids.shape[0])
    if on_kernels and grouped:
        kernel = grouped_matmul.moe_matmul
    elif gathered and 1 <= expert_ids.shape[0] <= qmatvec.MAX_BATCH and _kernel_fits(experts, 3, backend):
        kernel = qmatvec.moe_matvec
    if kernel is not None and experts.sharding is not None:
        return _expert_parallel(kernel, x, experts, expert_ids, interpret)
    if kernel is grouped_matmul.moe_matmul and not per_token:
        # A prefill call takes prefill's tiles, whatever its size or company (batch invariance).
        tiles = grouped_matmul.PREFILL_TILES | _ptx_tiles(experts.qtype)
        return kernel(x, experts, expert_ids, live, interpret=interpret, **tiles)
    if kernel is grouped_matmul.moe_matmul:
        # Every decode call reads one thing (batch invariance: one route for all rows): the bf16 copy where there is
        # one, else the stored experts.
        tiles = moe_decode_tiles(experts.qtype, expert_ids.size, n_experts, decode_copy is not None)
        read = experts if decode_copy is None else decode_copy
        return kernel(x, read, expert_ids, live, interpret=interpret, **tiles)
    if kernel is not None:
        int8_x = _int8_x(experts)
        tiles = dict(int8_x=True, unroll=_int8_unroll, **_int8_expert_tiles) if int8_x else {}
        # The routed matvec skips dead tokens' pairs (a program a pair either way, so nothing else changes): one
        # stream's bucket of 2 rows otherwise computes the padding row's k experts too, twice a gpt-oss-20b step's
        # expert work. Measured on int8 x (H200, 2026-12-06, with the dense calls' skip too, which alone is slower):
        # 274.5 -> 315.2 tok/s.
        return kernel(x, experts, expert_ids, interpret=interpret, live=live, sorted_pairs=_moe_sorted_pairs, **tiles)
    x = x.astype(jnp.float32)
    shared = x.ndim == expert_ids.ndim
    hi = jax.lax.Precision.HIGHEST
    if gathered:
        planes = {k: jnp.take(p, expert_ids, axis=0) for k, p in experts.planes.items()}
        wf = dequantize(QuantArray(planes, experts.qtype, experts.shape), jnp.float32)  # [M, k, Out, In]
        return jnp.einsum("mi,mkoi->mko" if shared else "mki,mkoi->mko", x, wf, precision=hi)

    def one_expert(out, e_planes):
        e, planes = e_planes
        we = dequantize(QuantArray(planes, experts.qtype, experts.shape[1:]), jnp.float32)  # [Out, In]
        y = jnp.einsum("mi,oi->mo" if shared else "mki,oi->mko", x, we, precision=hi)
        y = y[:, None, :] if shared else y
        return jnp.where((expert_ids == e)[..., None], y, out), None

    def walk(ids: jax.Array, planes: dict[str, jax.Array]) -> jax.Array:
        out, _ = jax.lax.scan(one_expert, jnp.zeros((*expert_ids.shape, n_out), jnp.float32), (ids, planes))
        return out

    if experts.parts == 1:
        return walk(jnp.arange(n_experts), experts.planes)
    # Experts split over devices: each device walks its own experts (a walk over the global expert axis would make
    # XLA gather every expert onto every device); a selection belongs to one expert, so the sum adds only zeros.
    p = experts.parts
    planes = {k: a.reshape(p, n_experts // p, *a.shape[1:]) for k, a in experts.planes.items()}
    return jax.vmap(walk)(jnp.arange(n_experts).reshape(p, -1), planes).sum(0)
