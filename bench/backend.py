"""#15's backend question on the card: the same per-row int8-x Q4_K matvec as a Pallas Triton kernel (the worker's,
worker/pallas_kernels/qmatvec_int8.py) and as a Triton kernel called through jax-triton (bench/triton_matvec.py),
on the same planes, x and plan. Per shape and rows: whether the two give the same split-K partials bit for bit,
and the device time of a matvec on each, as the worker calls it (x's rounding by the same Pallas quantizer, the
kernel, the fold of its splits)

- alone: bench.kernels' method (weight copies past L2, calls issued back to back, one wait), and
- in a chain: 64 dependent matvecs on one square weight in one jitted program, as a decode step strings its
  kernels: a kernel that XLA cannot put in its command buffers (CUDA graphs) is launched from the host one by one
  there, which shows as a longer time a matvec in the chain than alone.

    python -m bench.backend [--rows 1,2,8] [--repeat 10] [--unrolled]  # on the card (jax-triton's wheel staged)
    python -m bench.backend --interpret                                # on the CPU: bits only, Triton's interpreter

`--interpret` runs the Triton kernel in Triton's interpreter (needs the `triton` package, not a dependency of the
worker) against the Pallas kernel in interpret mode, on small shapes with masked tails. docs/kernels.md has the
results and what the card's numbers would decide.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as QT

from bench.kernels import per_call, random_planes, timed, weight_copies
from worker.pallas_kernels import qmatvec as qmv
from worker.pallas_kernels import qmatvec_int8

# (label, N, K): Q4_K decode shapes; phi3-mini's attention output, the square one the chain takes, first (the chain
# answers whether XLA's command buffers take the port's call)
SHAPES = [("phi3 o", 3072, 3072), ("phi3 gate_up", 16384, 3072), ("phi3 qkv", 9216, 3072)]
# CPU (interpreter) cases, (label, N, K, plan overrides): N not a multiple of the 64-column tile; K's 5
# super-blocks in 2 splits of 2 steps of 2 (the last 3 masked); the default plan's 5 splits
SMALL = [("N tail", 72, 512, {}), ("K tail", 64, 1280, dict(chunk=2, splits=2)), ("K splits", 64, 1280, {})]
CHAIN = 64


def inputs(x: jax.Array, w, rows: int, interpret: bool) -> tuple[list, list]:
    """The kernel's inputs as the Pallas call builds them: x padded to whole groups of `rows` and rounded
    (qmatvec_int8.padded_x: words, dx, sums), the weight's planes (qs as int32 words)."""
    x_args = list(qmatvec_int8.padded_x(x, QT.Q4_K, rows, interpret))
    planes = [qmatvec_int8._words(w.planes["qs"])] + [w.planes[name] for name in ("scales", "mins", "d", "dmin")]
    return x_args, planes


def plan(n: int, k: int, **tiles):
    return qmv.plan(QT.Q4_K, n, k, int8_x=True, **tiles)


def pallas_partials(x, w, rows: int, interpret: bool, **tiles) -> jax.Array:
    n, k = w.shape
    return qmatvec_int8.call(x, w, None, 1, n, plan(n, k, **tiles), interpret, rows)


def triton_op(x: jax.Array, w, rows: int) -> jax.Array:
    """The port's matvec x [T, K] -> [T, N], folded as qmatvec folds the Pallas kernel's partials."""
    from bench import triton_matvec

    n, k = w.shape
    p = plan(n, k)
    x_args, planes = inputs(x, w, rows, False)
    out = triton_matvec.partials(x_args, planes, n, k, p, rows, p.num_warps, p.num_stages)
    return qmv.fold_splits(out)[: x.shape[0], :n]


def pallas_op(x: jax.Array, w, rows: int, unroll: bool = False) -> jax.Array:
    """`unroll`: the K loop written out (qmatvec.Plan.unroll), as the port's build writes its own out."""
    n = w.shape[0]
    return qmv.fold_splits(pallas_partials(x, w, rows, False, unroll=unroll))[: x.shape[0], :n]


def pallas_unrolled_op(x: jax.Array, w, rows: int) -> jax.Array:
    return pallas_op(x, w, rows, unroll=True)


def check_interpret() -> bool:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton_matvec's kernels are made
    from bench import triton_matvec

    ok = True
    for label, n, k, tiles in SMALL:
        w = random_planes(QT.Q4_K, (n, k), seed=1)
        p = plan(n, k, **tiles)
        for rows in (1, 2, 8):
            x = jax.random.normal(jax.random.key(rows), (3, k), jnp.float32)
            x_args, planes = inputs(x, w, rows, True)
            mine = triton_matvec.interpret_partials([np.asarray(a) for a in x_args], [np.asarray(a) for a in planes],
                                                    n, k, p, rows)  # fmt: skip
            theirs = np.asarray(pallas_partials(x, w, rows, True, **tiles))
            same = mine.shape == theirs.shape and np.array_equal(mine.view(np.uint32), theirs.view(np.uint32))
            ok &= same
            print(f"{label:8s} [{n}, {k}] rows {rows} ({p.splits} splits x {p.steps} steps x {p.chunk}): "
                  f"{'same bits' if same else 'OTHER BITS'}", flush=True)  # fmt: skip
    return ok


def chain_s(op, w, rows: int, repeat: int) -> float:
    """Seconds a matvec in a chain of CHAIN dependent ones on the square weight w."""
    k = w.shape[1]

    def chain(x, w):
        for i in range(CHAIN):
            x = op(x * (1 + i / 256), w, rows) / k  # each input the previous output, kept in range
        return x

    return timed(jax.jit(chain), jax.random.normal(jax.random.key(0), (rows, k), jnp.float32), w,
                 repeat=repeat) / CHAIN  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="2", help="x rows a call (the per-row kernels' range: 1-8; 2 is one stream's)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--unrolled", action="store_true", help="also the Pallas kernel with its K loop written out")
    ap.add_argument("--interpret", action="store_true", help="CPU: the bits in Triton's interpreter only")
    args = ap.parse_args()
    if args.interpret:
        raise SystemExit(0 if check_interpret() else 1)
    from bench import triton_matvec

    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    ops = {"pallas": pallas_op, "jax-triton": triton_op} | ({"pallas unrolled": pallas_unrolled_op}
                                                             if args.unrolled else {})  # fmt: skip
    t0 = time.perf_counter()

    def say(what: str) -> None:  # each number as it comes, with the seconds so far: a cut run still tells
        print(f"[{time.perf_counter() - t0:6.1f} s] {what}", flush=True)

    for label, n, k in SHAPES:
        weights = weight_copies(QT.Q4_K, (n, k))
        for rows in map(int, args.rows.split(",")):
            case = f"{label:13s} [{n}, {k}] rows {rows}:"
            x = jax.random.normal(jax.random.key(rows), (rows, k), jnp.float32)
            p = plan(n, k)
            x_args, planes = inputs(x, weights[0], rows, False)
            mine = triton_matvec.partials(x_args, planes, n, k, p, rows, p.num_warps, p.num_stages)
            same = bool(jnp.array_equal(jax.lax.bitcast_convert_type(mine, jnp.uint32),
                                        jax.lax.bitcast_convert_type(pallas_partials(x, weights[0], rows, False),
                                                                     jnp.uint32)))  # fmt: skip
            say(f"{case} {'same bits' if same else 'OTHER BITS'}")
            for name, op in ops.items():
                secs = per_call(op, weights, x, None, args.repeat, rows=rows)
                say(f"{case} alone: {name} {secs * 1e6:7.1f} us ({weights[0].nbytes / secs / 1e9:.0f} GB/s)")
                if n == k:
                    say(f"{case} chain of {CHAIN}: {name} {chain_s(op, weights[0], rows, args.repeat) * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
