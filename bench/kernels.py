"""Decode matvec kernels (worker/pallas_kernels/qmatvec.py) against their jax.numpy twins on real-model shapes:
time per call of the tensor-core kernel, weight bytes read per second, and that rate as a share of the card's copy
bandwidth; for a dense weight also the per-row kernel's time, and whether row 0 computed alone has the same bits
as among M rows (batch invariance). Then prefill at --prefill tokens, as prefill runs it (the prefill tiles): the
grouped MoE matmul (worker/pallas_kernels/moe_matmul.py) on gpt-oss-20b's experts, time per call and useful
TFLOP/s (2 * tokens * k * Out * In), against decode's tiles and its twin (each expert over every token); and dense
products of that many rows (the weight widened once a call) against the weight dequantized in registers and
dequantize + XLA's dot. With --decode-moe, a decode step's grouped MoE matmul at each --rows (tokens of one
position each, k experts apiece): the experts dequantized in registers (decode's tiles) against the bf16 copy made
at load (moe_matmul.DECODE_COPY_TILES), with the copy's bytes read per second.

    python -m bench.kernels [--rows 1,8] [--only Q4_K,MXFP4] [--prefill 512] [--sweep] [--smoke]
    python -m bench.kernels --rows 0 --prefill 4096 --sweep     # prefill only: tune the PREFILL_TILES
    python -m bench.kernels --rows 1,64,256 --prefill 0 --decode-moe --only MXFP4 --sweep   # tune DECODE_COPY_TILES
    python -m bench.kernels --rows 1,2,8 --prefill 0 --sweep --sweep-kernel per-row --labels phi3   # the per-row tiles
    python -m bench.kernels --rows 2 --prefill 0 --sweep --sweep-kernel int8 --labels phi3   # the int8-x kernel's

Each timed call cycles through enough copies of the weight to exceed the L2 cache (>= 512 MB in all), so the
rate is DRAM's, not L2's, in passes that make at least MIN_MATVECS matvecs; calls go back to back, one wait at the
end. So the figures are the device's: the host's ~4 us a weight plane of a call's arguments overlaps the previous
call (before 2026-12-04 it did not, and small weights' figures were mostly the host's; docs/PERFORMANCE.md,
sixteenth session). The copy bandwidth is (read + write bytes) / time of `a + 1` on 1 GiB of float32.
`--sweep` also times a few other tilings per case (block_n, chunk, splits, num_warps, num_stages; prefill: the
row tile) and prints the best, to tune `qmatvec.plan` and the PREFILL_TILES. `--smoke` runs two tiny cases in
interpret mode (checks the script, on CPU).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from worker.pallas_kernels import moe_matmul as mm
from worker.pallas_kernels import qmatvec as qmv
from worker.pallas_kernels import qmatvec_int8
from worker.quant import dequantize, quant_array, widened

# (label, format, N, K) and, for MoE, (label, format, E, N, K, k): real-model decode shapes.
DENSE = [
    ("qwen2.5-0.5b q/o", QT.Q8_0, 896, 896),
    ("qwen2.5-0.5b gate", QT.Q5_0, 4864, 896),
    ("qwen2.5-0.5b down", QT.Q4_K, 896, 4864),
    ("qwen2.5-0.5b down", QT.Q6_K, 896, 4864),
    ("qwen2.5-0.5b output", QT.Q8_0, 151936, 896),
    ("qwen2.5-0.5b output", QT.Q4_0, 151936, 896),
    ("phi3 qkv", QT.Q4_K, 9216, 3072),
    ("phi3 gate_up", QT.Q4_K, 16384, 3072),
    ("phi3 gate_up", QT.Q5_K, 16384, 3072),
    ("phi3 down", QT.Q6_K, 3072, 8192),
    ("phi3 output", QT.Q6_K, 32064, 3072),
    ("gemma3-270m output", QT.Q8_0, 262144, 640),
    ("gemma3-270m down", QT.Q4_K, 640, 2048),
    ("gpt-oss q", QT.Q8_0, 4096, 2880),
    ("gpt-oss q", QT.Q4_1, 4096, 2880),
    ("gpt-oss q", QT.Q5_1, 4096, 2880),
    ("gpt-oss output", QT.Q8_0, 201088, 2880),
]
MOE = [("gpt-oss gate_up", QT.MXFP4, 32, 5760, 2880, 4), ("gpt-oss down", QT.MXFP4, 32, 2880, 2880, 4)]
# Prefill-shaped dense products (--prefill rows): a weight of each model, in a format it has.
PREFILL_DENSE = [
    ("gpt-oss q", QT.Q8_0, 4096, 2880),
    ("qwen2.5-0.5b gate", QT.Q5_0, 4864, 896),
    ("phi3 gate_up", QT.Q4_K, 16384, 3072),
]


def matvec_tilings(block_ns: tuple[int, ...], chunks: tuple[int | None, ...]) -> list[dict]:
    """--sweep's tilings of a matvec kernel: each block_n x chunk x splits (the plan's, 1) x warps (4, 8), then two
    pipeline depths over the defaults."""
    grid = itertools.product(block_ns, chunks, (None, 1), (4, 8))
    tilings = [dict(block_n=b, chunk=c, splits=s, num_warps=w) for b, c, s, w in grid]
    return tilings + [dict(num_stages=2), dict(num_stages=4)]


# The tensor-core kernel's also over smaller row tiles (qmatvec.ROW_TILE is 64): at one row a tile is mostly
# masked rows. A row tile must be one for every call (a row's bits), so these inform that constant.
SWEEP = (
    matvec_tilings((32, 64), (None, 4))
    + [dict(row_tile=r, block_n=b) for r in (16, 32) for b in (32, 64)]
    + [dict(fma=True), dict(fma=True, block_n=64)]  # the dequantization's fused multiply-adds (qmatvec.Plan.fma)
)
# --sweep-kernel per-row: the per-row kernel's tilings (at a few rows it reads each weight tile once a row group,
# so wider tiles and more super-blocks a step put more bytes in flight a program), then a few with the scales
# factored out of the inner loop and with fused multiply-adds (qmatvec.Plan.factored, .fma).
SWEEP_PER_ROW = (
    matvec_tilings((32, 64, 128), (None, 2))
    + [dict(factored=True, **t) for t in ({}, dict(num_stages=4), dict(block_n=64), dict(num_warps=8), dict(chunk=2))]
    + [
        dict(fma=True, **t)
        for t in ({}, dict(factored=True), dict(prefetch=True), dict(num_stages=4), dict(block_n=64))
    ]
    # x rounded to int8, integer dot products (qmatvec.Plan.int8_x; the quantized formats; others are reported
    # as refused): fewer registers and instructions a value, so wider tiles and more warps may pay
    + [dict(int8_x=True, **t) for t in ({}, dict(num_stages=4), dict(block_n=64), dict(num_warps=8), dict(chunk=2))]
    + [dict(int8_x=True, unroll=True), dict(int8_x=True, unroll=True, chunk=2)]  # the K loop written out
)
# --sweep-kernel int8: the int8-x per-row kernel's tilings over its plan (qmatvec.INT8_BLOCK_N's 128 output rows on
# 4 warps): other rows and warps a program, two super-blocks a step. Timed on an H200 (2026-12-05) on qwen2.5's gate
# at 2 rows, more K splits and other pipeline depths gained nothing, and fewer warps than rows/32 (a row's terms
# computed by several threads) lost up to 2x. More super-blocks a step: a thread reads its own row, 64 bytes of it a
# step at Q8_0's plan (34 at MXFP4's); and fewer programs than column tiles, each taking several in turn
# (qmatvec.Plan.programs). On an H100 (2026-12-06, 2 rows) gpt-oss-20b's 201k-row Q8_0 head read at 0.74 TB/s on a
# program a tile, 0.78 on 8 super-blocks a step, 1.78 on 528 programs (4 a multiprocessor of a 132-SM card):
# qmatvec.INT8_PROGRAMS, the plan's default since. The sweep tries around it: a program a tile (`programs=0`), 2 and
# 8 a multiprocessor. 32 rows on one warp read the head at 1.66 TB/s on a program a tile (6,284 programs of 32
# threads): with fewer programs, 4, 8 and 16 a multiprocessor (the warps in flight those of 528 programs of 4 warps
# at 16).
SWEEP_INT8 = (
    [dict(block_n=b, num_warps=w) for b, w in ((32, 1), (64, 1), (64, 2), (64, 4), (128, 2), (256, 8))]
    + [dict(chunk=c) for c in (2, 4, 8)]
    + [dict(programs=p) for p in (0, 264, 1056)]
    + [dict(block_n=32, num_warps=1, programs=p) for p in (528, 1056, 2112)]
)
# --sweep-kernel swapped: the swapped dot's launch settings only, warps and pipeline depth (the dense tensor-core
# plan takes one stage: its 64-row x tile in shared memory, where the swapped dot's follows the rows). They leave
# the arithmetic as it is, so a row's bits should stay the default swapped call's: each line says whether they do,
# and a setting that keeps them may differ by bucket without breaking batch invariance.
SWEEP_SWAPPED = [dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3, 4) if (w, s) != (4, 1)]
# --sweep's tilings for decode's grouped matmul on the bf16 copy, each over moe_matmul.DECODE_COPY_TILES.
SWEEP_COPY = (
    [dict(block_m=m, block_n=b) for m in (16, 32, 64) for b in (64, 128)]
    + [dict(chunk=c) for c in (2, 8)]
    + [dict(num_warps=8), dict(num_stages=2), dict(num_stages=4), dict(block_n=128, num_warps=8, num_stages=4)]
)
# --sweep's tilings for prefill, each over the prefill defaults (moe_matmul.PREFILL_TILES; qmatvec.PREFILL_TILES,
# on the weight widened to float16 as prefill takes it).
SWEEP_GROUPED = (
    [dict(block_m=m, block_n=b, num_warps=w) for m in (64, 128) for b in (64, 128) for w in (4, 8)]
    + [dict(chunk=c) for c in (2, 8)]
    + [dict(num_stages=s) for s in (2, 4)]
    + [dict(ptx=True)]  # MXFP4 decoded by inline PTX (WORKER_MXFP4_PTX; the stored MXFP4 only, not the copy)
)
SWEEP_PREFILL = (
    [dict(row_tile=64, block_n=128, num_warps=4)]
    + [dict(row_tile=128, block_n=b, num_warps=w) for b in (64, 128, 256) for w in (4, 8)]
    + [dict(row_tile=256, block_n=128, num_warps=8)]
    + [dict(num_stages=s) for s in (2, 4)]
    + [dict(chunk=c) for c in (1, 2)]
)
# The best in-register tiles of a dense prefill product (before prefill widened its weights).
IN_REGISTERS_DENSE = dict(row_tile=128, block_n=128, splits=1, num_warps=4)
L2_BYTES = 512 << 20


def random_planes(qtype: QT, shape: tuple[int, ...], seed: int):
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (math.prod(shape) // block, size), dtype=np.uint8)
    if qtype == QT.MXFP4:
        raw[:, 0] = rng.integers(120, 128, raw.shape[0])
    elif qtype in (QT.Q6_K,):
        raw[:, 208:210] = np.array([0.01], np.float16).view(np.uint8)
    else:  # the leading f16 scale (and minimum) of every other format
        raw[:, 0:4] = np.frombuffer(np.float16([0.01, 0.001]).tobytes(), np.uint8)
    return quant_array(raw.reshape(*shape[:-1], -1), qtype, shape, put=jax.device_put)


def timed(fn, *args, repeat: int) -> float:
    """Seconds a call of fn(*args), after a compile-and-warm call: the median over three rounds of `repeat` calls
    issued back to back (one wait at the end), so the host's work for a call (its arguments: ~4 us a weight plane
    on the H200's host) overlaps the device's work for the previous one instead of adding to it."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):  # each result dropped as the next is issued: its memory serves a later call
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / repeat)
    return statistics.median(times)


def copy_bandwidth(repeat: int) -> float:
    """(read + write bytes) / the median time of `a + 1` on 1 GiB of float32, one call at a time (issued back to
    back, each call's 1 GiB result would be a fresh allocation while the others are alive)."""
    a = jnp.ones((1 << 28,), jnp.float32)
    fn = jax.jit(lambda a: a + 1)
    jax.block_until_ready(fn(a))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(a))
        times.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(times)


# Matvecs a timed call makes at least (passes over the weight copies): a small weight's matvec takes ~2 us on the
# device, and a call's host work (~4 us a weight plane passed) must stay below its device work to time the device.
MIN_MATVECS = 256


def weight_copies(qtype: QT, shape: tuple[int, ...], smoke: bool = False) -> list:
    """Random weights of one shape, enough together to exceed the L2 cache (one for a smoke run)."""
    w = random_planes(qtype, shape, seed=0)
    copies = max(2, min(32, -(-L2_BYTES // w.nbytes))) if not smoke else 1
    return [w] + [random_planes(qtype, shape, seed=i) for i in range(1, copies)]


def matvec_program(op, n_weights: int, passes: int | None = None, **tiles) -> tuple[Callable, int]:
    """(jitted fn(weights, x, ids), matvecs a call): `op` applied to each weight copy in turn, in `passes` (default:
    MIN_MATVECS matvecs; each pass on x scaled by its own factor, so that no two products are the same expression
    for XLA to share). A twin takes one pass: XLA would dequantize each copy once for all its passes."""
    if passes is None:  # interpret mode: a check, not a time
        passes = 1 if tiles.get("interpret") else -(-MIN_MATVECS // n_weights)

    def run(ws, x, ids):
        args = (ids,) if ids is not None else ()
        return sum(op(x * (1 + p / 64), w, *args, **tiles) for p in range(passes) for w in ws)

    return jax.jit(run), n_weights * passes


def per_call(op, weights, x, ids, repeat: int, passes: int | None = None, **tiles) -> float:
    """Seconds per matvec on the device (`matvec_program`'s calls, issued back to back)."""
    fn, matvecs = matvec_program(op, len(weights), passes, **tiles)
    return timed(fn, weights, x, ids, repeat=repeat) / matvecs


def bench_case(label, qtype, shape, rows, k_sel, args, bw) -> None:
    weights = weight_copies(qtype, shape, args.smoke)
    w = weights[0]
    kdim = shape[-1]
    x = jax.random.normal(jax.random.key(0), (rows, kdim), jnp.float32)
    if k_sel:
        ids = jax.random.permutation(jax.random.key(1), shape[0])[: rows * k_sel].reshape(rows, k_sel)
        ops = (qmv.moe_matvec, qmv.moe_matvec_twin)
        read = w.nbytes * rows * k_sel / shape[0]  # the selected experts' planes
    else:
        ids, ops = None, (qmv.qmatvec, qmv.qmatvec_twin)
        read = w.nbytes
    interp = dict(interpret=True) if args.smoke else {}
    if args.sweep and args.sweep_kernel == "int8":  # the int8-x per-row kernel alone, then its tilings
        if qtype in qmatvec_int8.INT8_TYPES:
            kind = dict(int8_x=True) | ({} if k_sel else dict(tensor_cores=False))
            t_int8 = per_call(ops[0], weights, x, ids, args.repeat, **interp, **kind)
            p = qmv.plan(qtype, shape[-2], kdim, k_sel or 1, int8_x=True)
            print(f"{label:22s} {qtype.name:6s} {'x'.join(map(str, shape)):>16s} M={rows:<2d} per-row int8 x "
                  f"{t_int8 * 1e6:9.1f} us {read / t_int8 / 1e9:7.1f} GB/s  bn={p.block_n} w={p.num_warps} "
                  f"c={p.chunk} s={p.splits}", flush=True)  # fmt: skip
            best = best_tiling(lambda **tiles: per_call(ops[0], weights, x, ids, args.repeat, **interp, **kind,
                                                        **tiles),
                               t_int8, SWEEP_INT8, lambda t: f"{read / t / 1e9:.1f} GB/s")  # fmt: skip
            print(f"    best int8 x {best[0] * 1e6:.1f} us {read / best[0] / 1e9:.1f} GB/s with {best[1]}", flush=True)
        return
    t_kernel = per_call(ops[0], weights, x, ids, args.repeat, **interp)
    t_twin = per_call(ops[1], weights, x, ids, args.repeat, passes=1)
    p = qmv.plan(qtype, shape[-2], kdim, k_sel or 1)
    line = (
        f"{label:22s} {qtype.name:6s} {'x'.join(map(str, shape)):>16s} M={rows:<2d} "
        f"kernel {t_kernel * 1e6:9.1f} us {read / t_kernel / 1e9:7.1f} GB/s ({read / t_kernel / bw:5.1%})  "
        f"twin {t_twin * 1e6:9.1f} us  x{t_twin / t_kernel:5.1f}  bn={p.block_n} c={p.chunk} s={p.splits}"
    )
    if not k_sel:  # the dense call: the per-row kernel beside it, and whether row 0 has the same bits alone
        t_rows = per_call(ops[0], weights, x, ids, args.repeat, **interp, tensor_cores=False)
        one = jax.jit(lambda x, w: ops[0](x, w, **interp))
        same = bool(jnp.array_equal(one(x[:1], w)[0], one(x, w)[0]))
        line += f"  per-row {t_rows * 1e6:9.1f} us  row 0 alone: {'same bits' if same else 'OTHER BITS'}"
        # the swapped dot (qmatvec.Plan.swap: its row tile by the rows), and row 0's bits alone against among M
        t_swap = per_call(ops[0], weights, x, ids, args.repeat, **interp, swap=True)
        swapped = jax.jit(lambda x, w: ops[0](x, w, **interp, swap=True))
        same = bool(jnp.array_equal(swapped(x[:1], w)[0], swapped(x, w)[0]))
        line += f"  swapped {t_swap * 1e6:9.1f} us ({'same bits' if same else 'OTHER BITS'} alone)"
    if qtype in qmatvec_int8.INT8_TYPES and not args.no_int8:  # the per-row kernel on x rounded to int8
        kind = {} if k_sel else dict(tensor_cores=False)
        t_int8 = per_call(ops[0], weights, x, ids, args.repeat, **interp, **kind, int8_x=True)
        line += f"  per-row int8 x {t_int8 * 1e6:9.1f} us"
        t_unrolled = per_call(ops[0], weights, x, ids, args.repeat, **interp, **kind, int8_x=True, unroll=True)
        line += f" (unrolled {t_unrolled * 1e6:9.1f} us)"  # its K loop written out (qmatvec.Plan.unroll)
        if not k_sel:  # the int8-x dot (IMMA), a row's bits the per-row kernel's: what takes more than 8 rows
            t_dot8 = per_call(ops[0], weights, x, ids, args.repeat, **interp, int8_x=True)
            line += f"  int8 x dot {t_dot8 * 1e6:9.1f} us"
    if not k_sel and rows == 2 and not args.no_int8:  # one stream's bucket: its second row dead, skipped
        # (qmatvec.live_steps, when_live)
        one_live = dict(tensor_cores=False, live=jnp.array([True, False]))
        t_live = per_call(ops[0], weights, x, ids, args.repeat, **interp, **one_live)
        line += f"  one live row: per-row {t_live * 1e6:9.1f} us"
        if qtype in qmatvec_int8.INT8_TYPES:
            t_live8 = per_call(ops[0], weights, x, ids, args.repeat, **interp, **one_live, int8_x=True)
            line += f", int8 x {t_live8 * 1e6:9.1f} us"
    print(line, flush=True)
    if args.sweep and args.sweep_kernel == "swapped" and not k_sel:
        sweep_bits(SWEEP_SWAPPED,
                   lambda **tiles: per_call(ops[0], weights, x, ids, args.repeat, **interp, swap=True, **tiles),
                   lambda **tiles: jax.jit(lambda x, w: ops[0](x, w, **interp, swap=True, **tiles))(x, w),
                   "swapped", lambda t: f" {read / t / 1e9:7.1f} GB/s")  # fmt: skip
        return
    # the dense call's per-row kernel where asked (`t_rows` its default's time); the MoE call has only that one
    kinds = {"tensor-cores": [False], "per-row": [True], "both": [False, True]}.get(args.sweep_kernel, [])
    kinds = kinds if args.sweep else []
    for per_row in kinds if not k_sel else kinds[:1]:
        kind, default_s = (dict(tensor_cores=False), t_rows) if per_row and not k_sel else ({}, t_kernel)
        best = best_tiling(lambda kind=kind, **tiles: per_call(ops[0], weights, x, ids, args.repeat, **interp, **kind,
                                                               **tiles),
                           default_s, SWEEP_PER_ROW if per_row else SWEEP,
                           lambda t: f"{read / t / 1e9:.1f} GB/s")  # fmt: skip
        print(f"    best{' per-row' if per_row else ''} {best[0] * 1e6:.1f} us {read / best[0] / 1e9:.1f} GB/s "
              f"with {best[1]}", flush=True)  # fmt: skip


def rejected(tiles: dict, e: Exception) -> None:
    """A sweep's line for a tiling the shape or Triton rejects (e.g. out of shared memory)."""
    print(f"    {tiles}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")


def sweep_bits(tilings: list[dict], time_with: Callable[..., float], run_with: Callable[..., jax.Array],
               label: str, rate: Callable[[float], str] = lambda t: "") -> None:  # fmt: skip
    """Each tiling's time (`time_with(**tiles)`, seconds; `rate` of it) and whether its result (`run_with(**tiles)`)
    has the default's bits (`run_with()`); a tiling the shape or Triton rejects is reported and skipped."""
    base = run_with()
    for tiles in tilings:
        try:
            t, y = time_with(**tiles), run_with(**tiles)
        except Exception as e:
            rejected(tiles, e)
            continue
        same = "same bits" if bool(jnp.array_equal(y, base)) else "OTHER BITS"
        print(f"    {label} {t * 1e6:9.1f} us{rate(t)} {tiles} ({same})", flush=True)


def best_tiling(time_with: Callable[..., float], default_s: float, tilings: list[dict],
                rate: Callable[[float], str] | None = None) -> tuple[float, str]:  # fmt: skip
    """(seconds, tiling) of the fastest of the default and `tilings`; a tiling the shape or Triton rejects (e.g.
    out of shared memory) is reported and skipped. `rate`: also print each tiling's time and rate."""
    best = (default_s, "default")
    for tiles in tilings:
        try:
            t = time_with(**tiles)
        except Exception as e:
            rejected(tiles, e)
            continue
        if rate is not None:
            print(f"    {t * 1e6:9.1f} us {rate(t)} {tiles}", flush=True)
        best = min(best, (t, str(tiles)))
    return best


def grouped_call_s(op, x, experts, ids, repeat: int, **tiles) -> float:
    """Seconds per call of a grouped matmul (`op`: the kernel or its twin) with these tiles."""
    return timed(jax.jit(lambda x, w, i: op(x, w, i, **tiles)), x, experts, ids, repeat=repeat)


def bench_grouped(label, qtype, shape, k_sel, tokens, args) -> None:
    """The prefill grouped matmul with prefill's tiles (moe_matmul.PREFILL_TILES): `tokens` tokens, each routed to
    k_sel distinct experts at random; decode's tiles, the experts' bf16 copy (the one decode reads) with prefill's
    tiles, and the twin (each expert over every token) beside it. Why the copy: prefill dequantizes every expert
    tile in registers, and that was 2/3 of a 32-prompt gpt-oss-20b group on the H200 (docs/PERFORMANCE.md, ninth
    session); with --sweep the copy's tiles are swept too."""
    e, n, kdim = shape
    w = random_planes(qtype, shape, seed=0)
    x = jax.random.normal(jax.random.key(0), (tokens, kdim), jnp.float32)
    ids = jax.lax.top_k(jax.random.normal(jax.random.key(1), (tokens, e)), k_sel)[1]
    interp = dict(interpret=True) if args.smoke else {}
    flops = 2 * tokens * k_sel * n * kdim

    def per_call_grouped(op, **tiles) -> float:
        return grouped_call_s(op, x, w, ids, args.repeat, **tiles)

    t_kernel = per_call_grouped(mm.moe_matmul, **interp, **mm.PREFILL_TILES)
    t_decode = per_call_grouped(mm.moe_matmul, **interp)
    copy = widened(w, jnp.bfloat16)
    t_copy = grouped_call_s(mm.moe_matmul, x, copy, ids, args.repeat, **interp, **mm.PREFILL_TILES)
    t_twin = per_call_grouped(mm.moe_matmul_twin)
    line = (
        f"{label:22s} {qtype.name:6s} {'x'.join(map(str, shape)):>16s} M={tokens} k={k_sel} "
        f"kernel {t_kernel * 1e6:9.1f} us {flops / t_kernel / 1e12:6.1f} TFLOP/s  decode's tiles "
        f"{t_decode * 1e6:9.1f} us  bf16 copy {t_copy * 1e6:9.1f} us {flops / t_copy / 1e12:6.1f} TFLOP/s  "
        f"twin {t_twin * 1e6:9.1f} us  tiles {mm.PREFILL_TILES}"
    )
    print(line, flush=True)
    if args.sweep:
        rate = lambda t: f"{flops / t / 1e12:.1f} TFLOP/s"  # noqa: E731
        best = best_tiling(lambda **tiles: per_call_grouped(mm.moe_matmul, **interp, **(mm.PREFILL_TILES | tiles)),
                           t_kernel, SWEEP_GROUPED, rate)  # fmt: skip
        print(f"    best {best[0] * 1e6:.1f} us {flops / best[0] / 1e12:.1f} TFLOP/s with {best[1]}", flush=True)
        on_copy = [t for t in SWEEP_GROUPED if "ptx" not in t]  # the copy holds no MXFP4 to decode
        best = best_tiling(lambda **tiles: grouped_call_s(mm.moe_matmul, x, copy, ids, args.repeat, **interp,
                                                          **(mm.PREFILL_TILES | tiles)),
                           t_copy, on_copy, rate)  # fmt: skip
        print(f"    bf16 copy: best {best[0] * 1e6:.1f} us {flops / best[0] / 1e12:.1f} TFLOP/s with {best[1]}",
              flush=True)  # fmt: skip


def bench_decode_moe(label, qtype, shape, k_sel, rows, args, bw) -> None:
    """A decode step's grouped matmul: `rows` tokens, each routed to k_sel distinct experts at random, the experts
    dequantized in registers (decode's tiles) and as the bf16 copy; the rate is the touched experts' bf16 bytes."""
    e, n, kdim = shape
    w = random_planes(qtype, shape, seed=0)
    copy = widened(w, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (rows, kdim), jnp.float32)
    ids = jax.lax.top_k(jax.random.normal(jax.random.key(1), (rows, e)), k_sel)[1]
    touched = len(np.unique(np.asarray(ids)))
    read = touched * n * kdim * 2
    interp = dict(interpret=True) if args.smoke else {}

    def per_call_grouped(experts, **tiles) -> float:
        return grouped_call_s(mm.moe_matmul, x, experts, ids, args.repeat, **tiles)

    t_stored = per_call_grouped(w, **interp)
    t_copy = per_call_grouped(copy, **interp, **mm.DECODE_COPY_TILES)
    # The swapped dot (WORKER_TC_SWAP, moe_matmul.swapped_tiles): its row tile by the pairs; on the stored experts
    # too, whose dequantized tile is then the MMA's left operand (it may stay in registers, where the unswapped
    # dot's right operand goes through shared memory): the same bf16 operands and tiles as the copy's, though other
    # bits (the stored MXFP4's two nibble halves are two dots a step: ops.moe_matmul)
    swap = mm.DECODE_COPY_TILES | mm.swapped_tiles(rows * k_sel, e)
    t_swap_stored = per_call_grouped(w, **interp, **swap)
    t_swap_copy = per_call_grouped(copy, **interp, **swap)
    print(f"{label:22s} {qtype.name:6s} {'x'.join(map(str, shape)):>16s} M={rows} k={k_sel} ({touched} experts) "
          f"in registers {t_stored * 1e6:9.1f} us  bf16 copy {t_copy * 1e6:9.1f} us {read / t_copy / 1e9:7.1f} GB/s "
          f"({read / t_copy / bw:5.1%})  tiles {mm.DECODE_COPY_TILES}  swapped: in registers "
          f"{t_swap_stored * 1e6:9.1f} us, bf16 copy {t_swap_copy * 1e6:9.1f} us (block_m {swap['block_m']})",
          flush=True)  # fmt: skip
    if args.sweep and args.sweep_kernel == "swapped":  # the stored experts swapped: warps and stages (same bits?),
        # then K splits (other bits, expectedly)
        def grouped(**tiles) -> jax.Array:
            return jax.jit(lambda x, w, i: mm.moe_matmul(x, w, i, **interp, **swap, **tiles))(x, w, ids)

        sweep_bits(SWEEP_SWAPPED + [dict(splits=s) for s in (2, 4)],
                   lambda **tiles: per_call_grouped(w, **interp, **swap, **tiles), grouped,
                   "swapped, in registers")  # fmt: skip
    elif args.sweep:
        best = best_tiling(lambda **tiles: per_call_grouped(copy, **interp, **(mm.DECODE_COPY_TILES | tiles)),
                           t_copy, SWEEP_COPY, lambda t: f"{read / t / 1e9:.1f} GB/s")  # fmt: skip
        print(f"    best {best[0] * 1e6:.1f} us {read / best[0] / 1e9:.1f} GB/s with {best[1]}", flush=True)


def bench_prefill_dense(label, qtype, shape, rows, args) -> None:
    """A prefill-shaped dense product ([rows, K]) as ops.qmatmul runs it for a group of prompt chunks (the weight
    widened to float16 once a call, qmatvec.PREFILL_TILES), against the weight dequantized in registers and
    against dequantize + XLA's dot (a long chunk's route)."""
    n, kdim = shape
    w = random_planes(qtype, shape, seed=0)
    x = jax.random.normal(jax.random.key(0), (rows, kdim), jnp.float32)
    interp = dict(interpret=True) if args.smoke else {}
    flops = 2 * rows * n * kdim
    plain = jnp.float32 if args.smoke else jnp.float16

    def per_call_dense(widen: bool, **tiles) -> float:
        fn = lambda x, w: qmv.qmatvec(x, widened(w, plain) if widen else w, **interp, **tiles)  # noqa: E731
        return timed(jax.jit(fn), x, w, repeat=args.repeat)

    def xla_dot(x, w):
        return jnp.einsum("mi,oi->mo", x.astype(jnp.bfloat16), dequantize(w, jnp.bfloat16),
                          preferred_element_type=jnp.float32)  # fmt: skip

    t_kernel = per_call_dense(True, **qmv.PREFILL_TILES)
    t_reg = per_call_dense(False, **IN_REGISTERS_DENSE)
    t_xla = timed(jax.jit(xla_dot), x, w, repeat=args.repeat)
    print(f"{label:22s} {qtype.name:6s} {n}x{kdim} M={rows} widened {t_kernel * 1e6:9.1f} us "
          f"{flops / t_kernel / 1e12:6.1f} TFLOP/s  in registers {t_reg * 1e6:9.1f} us  dequantize + XLA dot "
          f"{t_xla * 1e6:9.1f} us  tiles {qmv.PREFILL_TILES}", flush=True)  # fmt: skip
    if args.sweep:
        best = best_tiling(lambda **tiles: per_call_dense(True, **(qmv.PREFILL_TILES | tiles)), t_kernel,
                           SWEEP_PREFILL, lambda t: f"{flops / t / 1e12:.1f} TFLOP/s")  # fmt: skip
        print(f"    best {best[0] * 1e6:.1f} us {flops / best[0] / 1e12:.1f} TFLOP/s with {best[1]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8", help="rows of x (decode batch), comma-separated; 0: none")
    ap.add_argument("--only", default="", help="formats to keep, e.g. Q4_K,MXFP4")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=512,
                    help="prefill tokens (rows) of the MoE and dense prefill cases (0: skip)")  # fmt: skip
    ap.add_argument("--sweep", action="store_true", help="also try other tilings and print the best")
    ap.add_argument("--sweep-kernel", default="tensor-cores",
                    choices=("tensor-cores", "per-row", "both", "int8", "swapped"),
                    help="the decode kernel --sweep tiles (int8: the int8-x per-row one; swapped: the swapped dot's "
                         "warps and stages, each against its default's bits, dense and --decode-moe)")  # fmt: skip
    ap.add_argument("--no-int8", action="store_true",
                    help="leave out the int8-x and one-live-row columns (their compiles take minutes)")  # fmt: skip
    ap.add_argument("--labels", default="", help="cases whose label contains one of these, e.g. phi3,qwen2.5")
    ap.add_argument("--decode-moe", action="store_true",
                    help="only decode's grouped MoE matmul at --rows: in registers against the bf16 copy")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="two tiny cases in interpret mode (CPU)")
    args = ap.parse_args()
    rows_list = [r for r in map(int, args.rows.split(",")) if r > 0]  # --rows 0: no decode cases
    keep = {QT[f] for f in args.only.split(",") if f}
    labels = [part for part in args.labels.split(",") if part]
    dense, moe, prefill_dense = ([c for c in cases if not labels or any(part in c[0] for part in labels)]
                                 for cases in (DENSE, MOE, PREFILL_DENSE))  # fmt: skip
    if args.smoke:
        dense, moe, args.repeat = [("smoke", QT.Q4_K, 64, 512)], [("smoke moe", QT.MXFP4, 4, 64, 256, 2)], 2
        prefill_dense = dense
        rows_list, args.prefill = rows_list[:1], min(args.prefill, 9)
    dev = jax.devices()[0]
    bw = copy_bandwidth(args.repeat)
    print(f"{dev.device_kind} ({jax.default_backend()}), JAX {jax.__version__}: copy bandwidth {bw / 1e9:.0f} GB/s")
    if args.decode_moe:
        for rows in rows_list:
            for label, qtype, e, n, k, k_sel in moe:
                if not keep or qtype in keep:
                    bench_decode_moe(label, qtype, (e, n, k), k_sel, rows, args, bw)
        return
    for rows in rows_list:
        for label, qtype, n, k in dense:
            if not keep or qtype in keep:
                bench_case(label, qtype, (n, k), rows, 0, args, bw)
        for label, qtype, e, n, k, k_sel in moe:
            if (not keep or qtype in keep) and rows * k_sel <= e:
                bench_case(label, qtype, (e, n, k), rows, k_sel, args, bw)
    if args.prefill:
        for label, qtype, e, n, k, k_sel in moe:
            if not keep or qtype in keep:
                bench_grouped(label, qtype, (e, n, k), k_sel, args.prefill, args)
        for label, qtype, n, k in prefill_dense:
            if not keep or qtype in keep:
                bench_prefill_dense(label, qtype, (n, k), args.prefill, args)


if __name__ == "__main__":
    main()
