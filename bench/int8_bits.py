"""Where the int8-x dot's bits part from the per-row kernel's on the card (tests/test_qmatvec_int8.py's gpu test only
says that they do; on 2026-12-05 they did for Q6_K [3072, 8192] at 9 rows).

    python -m bench.int8_bits [--only Q6_K] [--rows 9]
    python -m bench.int8_bits --interpret --small   # the script itself on the CPU (every kernel in interpret mode)

Per real shape: both compiled kernels' split-K partials (qmatvec_int8.call, before qmatvec folds them), value by
value: how many differ, by how many float32 ulps, in which splits, rows and column positions (x normal, as the gpu
test's); then on an x that every quantizer rounds alike (integers of at most 127 times 2^-7, each block's largest
127: a block scale of exactly 2^-7; the card's float32 division otherwise moves a rare value by a step, and then a
row's every output) each kernel against interpret mode, the two kernels' one defined arithmetic (exact integer sums,
the float steps in float64 rounded once), on the first column tile: which of the two departs from it. Interpret mode
rounds the multiply-adds twice (float64, then float32), which differs from one rounding only on rare ties, so a
kernel that keeps the arithmetic shows none or a stray one there. Each compiled call's seconds (its compile the
most of them) are printed too.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as QT

from bench.kernels import random_planes
from worker.pallas_kernels import qmatvec as qmv
from worker.pallas_kernels import qmatvec_int8
from worker.quant import QuantArray

# The gpu tests' dense shapes (tests/test_qmatvec_int8.py's GPU_DENSE, the ones its dot test takes)
SHAPES = [(QT.Q4_K, (16384, 3072)), (QT.Q6_K, (3072, 8192)), (QT.Q8_0, (896, 896)), (QT.Q5_0, (4864, 896)),
          (QT.Q4_0, (151936, 896)), (QT.MXFP4, (2880, 2880))]  # fmt: skip


def partials(x: jax.Array, w: QuantArray, p: qmv.Plan, dot: bool, interpret: bool) -> np.ndarray:
    """[splits, rows, columns] float32: the per-row kernel's (in qmatvec's row groups) or the dot's (qmatvec's
    row tile for these rows), on plan `p` whatever the weight's rows (the column slice keeps the full shape's
    plan)."""
    n, rows = w.shape[0], x.shape[0]
    if dot:
        tile = min(qmv.ROW_TILE, max(qmv.MIN_DOT, 1 << (rows - 1).bit_length()))
        out = qmatvec_int8.call(x, w, None, 1, n, p, interpret, tile, row_tile=tile)
    else:
        out = qmatvec_int8.call(x, w, None, 1, n, p, interpret, qmv.row_group(rows, False))
    return np.asarray(out)[:, :rows, :n]


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| in float32 steps (signed-magnitude bits mapped to one ordered integer line)."""

    def ordered(v):
        i = np.ascontiguousarray(v, np.float32).view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    return np.abs(ordered(a) - ordered(b))


def describe(name: str, a: np.ndarray, b: np.ndarray, block_n: int) -> None:
    d = ulps(a, b)
    bad = np.argwhere(d > 0)
    print(f"  {name}: {len(bad)} of {d.size} values differ, at most {d.max()} ulps", flush=True)
    if not len(bad):
        return
    splits, rows, cols = bad.T
    print(f"    splits {np.bincount(splits, minlength=a.shape[0]).tolist()}")
    print(f"    rows   {np.bincount(rows, minlength=a.shape[1]).tolist()}")
    at = np.bincount(cols % block_n, minlength=block_n)
    print(f"    column % {block_n} (where any): {dict((int(c), int(v)) for c, v in enumerate(at) if v)}")
    print(f"    ulps   {np.bincount(np.minimum(d[d > 0], 9), minlength=10).tolist()[1:]} (1..8, 9+)")
    for s, r, c in bad[:6]:
        print(f"    [{s}, {r}, {c}] {a[s, r, c]!r} against {b[s, r, c]!r}")


def exact_x(rows: int, k: int) -> jax.Array:
    """[rows, k]: integers in [-127, 127] times 2^-7, each 32-value block's first 127 times it: every quantizer's
    block scale is 2^-7 exactly and every value a whole step, so the card's and interpret mode's int8 x agree."""
    codes = np.random.default_rng(rows).integers(-127, 128, (rows, k // 32, 32))
    codes[..., 0] = 127
    return jnp.asarray(codes.reshape(rows, k) * 2.0**-7, jnp.float32)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    print(f"    ({fn.__name__}{'' if args[-1] else ' compiled'}, {'dot' if args[-2] else 'per-row'}: "
          f"{time.perf_counter() - start:.1f} s)", flush=True)  # fmt: skip
    return out


def sliced(w: QuantArray, n: int) -> QuantArray:
    """The weight's first n rows (its planes' leading axis)."""
    return QuantArray({k: v[:n] for k, v in w.planes.items()}, w.qtype, (n, *w.shape[1:]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="formats to keep, e.g. Q6_K")
    ap.add_argument("--rows", type=int, default=9)
    ap.add_argument("--interpret", action="store_true", help="the 'compiled' kernels in interpret mode too (CPU)")
    ap.add_argument("--small", action="store_true", help="small shapes of the same formats (CPU)")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    shapes = [(q, (96, 2 * qmv.FORMATS[q].sb)) for q, _ in SHAPES] if args.small else SHAPES
    for qtype, shape in shapes:
        if only and qtype.name not in only:
            continue
        n, k = shape
        w = random_planes(qtype, shape, seed=8)
        x = jax.random.normal(jax.random.key(args.rows), (args.rows, k), jnp.float32)
        p = qmv.plan(qtype, n, k, int8_x=True)
        print(f"{qtype.name} {n}x{k} at {args.rows} rows: {p}", flush=True)
        per_row, dot = (timed(partials, x, w, p, d, args.interpret) for d in (False, True))
        describe("the dot against the per-row kernel", dot, per_row, p.block_n)
        x = exact_x(args.rows, k)
        per_row, dot = (timed(partials, x, w, p, d, args.interpret) for d in (False, True))
        describe("the dot against the per-row kernel, x exact", dot, per_row, p.block_n)
        cols = p.block_n  # the first column tile in interpret mode, on the full shape's plan
        head = sliced(w, cols)
        for d, compiled in ((False, per_row), (True, dot)):
            want = partials(x, head, p, d, True)
            describe(f"{'the dot' if d else 'per-row'} against interpret mode (columns < {cols})",
                     compiled[:, :, :cols], want, cols)  # fmt: skip


if __name__ == "__main__":
    main()
