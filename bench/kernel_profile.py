"""One call of each decode matvec variant on one weight, for a profiler that reads hardware counters (Nsight
Compute) to say where a kernel's time goes: occupancy, registers, the bytes it moves against the card's bandwidth,
and what its warps wait on. Each variant is compiled and warmed first; then the profiler is started
(cuProfilerStart, for `ncu --profile-from-start off`) and each variant is called once after a marker on stdout,
so the n-th qmatvec launch profiled is the n-th variant.

    ncu --clock-control none --profile-from-start off -k regex:qmatvec --section SpeedOfLight \\
        --section Occupancy --section LaunchStats --section WarpStateStats \\
        python -m bench.kernel_profile --cases "phi3 gate_up:Q4_K,qwen2.5-0.5b q/o" --rows 1

Variants: the tensor-core kernel (the server's default) and its best tiling at one row on the H200 (16-row x
tiles, 64-row weight tiles: docs/PERFORMANCE.md, sixteenth session), then the per-row kernel at its defaults, with
four pipeline stages, with its scales factored out of the inner loop, and with fused multiply-adds
(qmatvec.Plan.factored, .fma).

With --experts, a decode step's experts instead (bench.kernels.MOE: gpt-oss-20b's gate|up and down, MXFP4, --rows
tokens routed to 4 distinct experts each): the grouped matmul as decode calls it (swapped, the stored experts, K in
ops' splits of its leaves), at one, two and eight splits, with MXFP4 by inline PTX, and the routed matvec (a program
a pair: the per-row kernels' route), plain and on int8 x. At one token the grouped one ran at 0.39 TB/s in a traced
step (docs/PERFORMANCE.md, forty-third entry): the counters say whether its warps wait on memory, on their own
arithmetic or on too few programs (forty-fourth entry: on issue and too few warps).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import gzip
import json
import os
import re
from collections import Counter

import jax
import jax.numpy as jnp

from bench.kernels import DENSE, MOE, matvec_program, random_planes, timed, weight_copies
from bench.trace import device_busy, device_kernels
from worker import ops
from worker.pallas_kernels import moe_matmul as mm
from worker.pallas_kernels import qmatvec as qmv
from worker.pallas_kernels import qmatvec_int8

VARIANTS = {
    "tensor-cores": dict(tensor_cores=True),
    "tensor-cores row_tile 16, block_n 64": dict(tensor_cores=True, row_tile=16, block_n=64),
    "tensor-cores fma": dict(tensor_cores=True, fma=True),
    "per-row": dict(tensor_cores=False),
    "per-row 4 stages": dict(tensor_cores=False, num_stages=4),
    "per-row factored": dict(tensor_cores=False, factored=True),
    "per-row fma": dict(tensor_cores=False, fma=True),
    "per-row fma factored": dict(tensor_cores=False, fma=True, factored=True),
    "per-row int8 x": dict(tensor_cores=False, int8_x=True),  # the quantized formats (others skip it)
    "int8 x dot": dict(tensor_cores=True, int8_x=True),  # its rows the per-row int8 kernel's bits
}


def expert_variants(qtype, pairs: int, n_experts: int) -> dict[str, tuple]:
    """--experts' variants: name -> (kernel, tiles). The grouped matmul's are ops.moe_matmul's decode tiles on the
    stored experts (ops.moe_decode_tiles), then decode's leaves of K in one and in two splits, K in eight, and
    decode's with MXFP4 decoded by inline PTX (WORKER_MXFP4_PTX's build)."""
    decode = ops.moe_decode_tiles(qtype, pairs, n_experts, copy=False)
    leaves = decode.get("leaves", 1)
    return {
        f"grouped, decode's ({decode.get('splits', 1)} splits of {leaves} leaves)": (mm.moe_matmul, decode),
        f"grouped, 1 split of {leaves} leaves": (mm.moe_matmul, decode | {"splits": 1}),
        f"grouped, 2 splits of {leaves} leaves": (mm.moe_matmul, decode | {"splits": min(2, leaves)}),
        "grouped, 8 splits": (mm.moe_matmul, decode | {"splits": 8, "leaves": 8}),
        "grouped, decode's, MXFP4 by inline PTX": (mm.moe_matmul, decode | {"ptx": True}),
        "routed matvec": (qmv.moe_matvec, {}),
        "routed matvec, int8 x": (qmv.moe_matvec, {"int8_x": True}),
    }


def moe_cases(spec: str) -> list[tuple]:
    """The bench.kernels.MOE cases whose labels "label,..." names (all where empty), or SystemExit if none."""
    labels = [c.strip() for c in spec.split(",")] if spec else [c[0] for c in MOE]
    cases = [c for c in MOE if c[0] in labels]
    if not cases:
        raise SystemExit(f"--cases {spec!r}: none of bench.kernels.MOE ({', '.join(c[0] for c in MOE)})")
    return cases


def expert_calls(spec: str, rows: int, interpret: bool) -> list[tuple]:
    """--experts' calls, each compiled and warmed: (what, fn, x, experts, ids)."""
    calls = []
    for label, qtype, e, n, k, k_sel in moe_cases(spec):
        w = random_planes(qtype, (e, n, k), seed=0)
        x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32)
        ids = jax.lax.top_k(jax.random.normal(jax.random.key(1), (rows, e)), k_sel)[1]
        for name, (kernel, tiles) in expert_variants(qtype, rows * k_sel, e).items():
            fn = jax.jit(lambda x, w, i, kernel=kernel, tiles=tiles: kernel(x, w, i, interpret=interpret, **tiles))
            jax.block_until_ready(fn(x, w, ids))  # compile and warm
            calls.append((f"{label} {qtype.name} {e}x{n}x{k} tokens={rows}: {name}", fn, x, w, ids))
    return calls


# A decode step's MoE layers (gpt-oss-20b's 24): --experts --trace calls a kernel this many times in one program
LAYERS = 24


def layered_traces(cases: list[tuple], rows: int, trace_dir: str, interpret: bool, layers: int = LAYERS) -> None:
    """--experts --trace on `cases` (bench.kernels.MOE's): decode's grouped matmul and the routed matvec, `layers`
    calls in one program, traced, in two ways: on one expert array with one routing every call (as a call alone is
    profiled), and on `layers` arrays, each with its own routing (as a step reads them: other experts of other
    layers each call). The forty-fourth session traced the grouped kernel at 75.9 us a launch in the step against
    47.8 alone under ncu: if the second way is the slower here, the cost is in reading other memory each call (the
    TLB's reach, DRAM pages), not in the step."""
    for label, qtype, e, n, k, k_sel in cases:
        first = random_planes(qtype, (e, n, k), seed=0)
        # the copies on the device: their values do not matter to the time, their addresses do
        arrays = [first] + [jax.tree_util.tree_map(lambda a: a.copy(), first) for _ in range(layers - 1)]
        x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32)
        keys = jax.random.split(jax.random.key(1), layers)
        routes = [jax.lax.top_k(jax.random.normal(key, (rows, e)), k_sel)[1] for key in keys]
        decode = ops.moe_decode_tiles(qtype, rows * k_sel, e, copy=False)
        for name, (kernel, tiles) in {"grouped, decode's": (mm.moe_matmul, decode),
                                      "routed matvec": (qmv.moe_matvec, {})}.items():  # fmt: skip

            def program(ws, x, ids, kernel=kernel, tiles=tiles):  # x scaled a call: no two calls are one expression
                return sum(kernel(x * (1 + i / 64), w, r, interpret=interpret, **tiles)
                           for i, (w, r) in enumerate(zip(ws, ids, strict=True)))  # fmt: skip

            fn = jax.jit(program)
            for way, ws, ids in (("one array, one routing", [first] * layers, [routes[0]] * layers),
                                 (f"{layers} arrays, {layers} routings", arrays, routes)):  # fmt: skip
                wall = timed(fn, ws, x, ids, repeat=5) / layers
                kernels = device_kernels(traced(fn, (ws, x, ids), trace_dir, f"{label} {name} {way}"))
                main = {kn: d for kn, d in kernels.items() if "moe_matmul" in kn or "qmatvec" in kn}
                print(f"{label} {qtype.name} {e}x{n}x{k} tokens={rows} {name}, {way}: {wall * 1e6:.1f} us a call "
                      "(wall); " + ", ".join(f"{kn} {sum(d) / len(d):.1f} us a launch x{len(d)} (min {min(d):.1f}, "
                                             f"max {max(d):.1f})" for kn, d in main.items()), flush=True)  # fmt: skip


def applicable(qtype, tiles: dict) -> bool:
    return not tiles.get("int8_x") or qtype in qmatvec_int8.INT8_TYPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases",
        default="phi3 gate_up:Q4_K",
        help="comma-separated labels of bench.kernels.DENSE, each with :FORMAT where it has several",
    )
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--interpret", action="store_true", help="interpret mode (checks the script on the CPU)")
    ap.add_argument("--trace", metavar="DIR", help="no counters: time each variant as bench.kernels does (a jitted "
                    "call over weight copies past L2) and trace it with the JAX profiler, to split the call's time "
                    "into the kernel's and the rest's")  # fmt: skip
    ap.add_argument("--experts", action="store_true", help="a decode step's experts (bench.kernels.MOE; --cases "
                    "picks among their labels, all by default) on the grouped and routed kernels; with --trace, "
                    "each traced as a step's layers call it (layered_traces)")  # fmt: skip
    args = ap.parse_args()
    if args.experts:
        spec = "" if args.cases == ap.get_default("cases") else args.cases
        if args.trace:
            layered_traces(moe_cases(spec), args.rows, args.trace, args.interpret)
        else:
            profiled(expert_calls(spec, args.rows, args.interpret))
        return
    cases = selected_cases(args.cases)
    if args.trace:
        for case in cases:
            traced_calls(case, args.rows, args.trace, args.interpret)
        return
    calls = []
    for label, qtype, n, k in cases:
        w = random_planes(qtype, (n, k), seed=0)
        x = jax.random.normal(jax.random.key(0), (args.rows, k), jnp.float32)
        for name, tiles in VARIANTS.items():
            if not applicable(qtype, tiles):
                continue
            fn = jax.jit(lambda x, w, tiles=tiles: qmv.qmatvec(x, w, interpret=args.interpret, **tiles))
            jax.block_until_ready(fn(x, w))  # compile and warm
            calls.append((f"{label} {qtype.name} {n}x{k} rows={args.rows}: {name}", fn, x, w))
    profiled(calls)


def profiled(calls: list[tuple]) -> None:
    """Start the profiler, then each (what, fn, *args) once after its marker line."""
    try:  # the driver's, present wherever a GPU is; a profiler started with --profile-from-start off waits for it
        ctypes.CDLL("libcuda.so.1").cuProfilerStart()
    except OSError:
        print("no libcuda.so.1: the profiler (if any) sees the warm-up calls too")
    for i, (what, fn, *args) in enumerate(calls):
        print(f"=== profiled launch {i}: {what}", flush=True)
        jax.block_until_ready(fn(*args))


def selected_cases(spec: str) -> list[tuple]:
    """The bench.kernels.DENSE cases named by "label[:FORMAT],...": exactly one each, or SystemExit saying which."""
    cases = []
    for case in spec.split(","):
        label, _, fmt = case.partition(":")
        found = [c for c in DENSE if c[0] == label.strip() and fmt in ("", c[1].name)]
        if len(found) != 1:
            raise SystemExit(f"{case!r}: {len(found)} cases of bench.kernels.DENSE match (name one with :FORMAT)")
        cases += found
    return cases


def traced_calls(case: tuple, rows: int, trace_dir: str, interpret: bool) -> None:
    """Each variant on `case` timed as bench.kernels times it, then one traced call: the device's kernels by name
    (us a matvec), and the compiled program's instructions by opcode (a copy there is a copy a call)."""
    label, qtype, n, k = case
    ws = weight_copies(qtype, (n, k))
    x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32)
    for name, tiles in VARIANTS.items():
        if not applicable(qtype, tiles):
            continue
        fn, matvecs = matvec_program(qmv.qmatvec, len(ws), interpret=interpret, **tiles)
        wall = timed(fn, ws, x, None, repeat=10) / matvecs
        hlo = fn.lower(ws, x, None).compile().as_text()
        ops = Counter(re.findall(r"= \S+ (\w[\w-]*)\(", entry_computation(hlo)))
        trace = traced(fn, (ws, x, None), trace_dir, f"{label} {qtype.name} {name}")
        kernels, (window, busy) = device_kernels(trace), device_busy(trace)
        per = {kn: sum(d) / matvecs for kn, d in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))}
        print(f"{label} {qtype.name} {n}x{k} rows={rows} {name}: {wall * 1e6:.1f} us a matvec (wall); kernels: "
              + ", ".join(f"{kn} {t:.1f} us x{len(kernels[kn]) / matvecs:g}" for kn, t in list(per.items())[:6])
              + f"; device window {window / matvecs:.1f} us a matvec, busy {busy / max(window, 1e-9):.0%}"
              + f"; program: {dict(ops.most_common(8))}", flush=True)  # fmt: skip


def traced(fn, args: tuple, trace_dir: str, what: str) -> dict:
    """One call of fn(*args) under the JAX profiler, its trace written under trace_dir in a folder named for `what`,
    and read back (empty where the profiler wrote none)."""
    out = os.path.join(trace_dir, re.sub(r"\W+", "-", what))
    jax.profiler.start_trace(out, create_perfetto_trace=True)
    jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    files = sorted(glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        return {}
    with gzip.open(files[-1]) as f:
        return json.load(f)


def entry_computation(hlo: str) -> str:
    """The ENTRY computation of an HLO module's text: the program's top-level instructions (what runs as kernels,
    copies and custom calls), without the fusions' bodies."""
    start = hlo.find("\nENTRY ")
    return hlo[start : hlo.find("\n}", start)] if start >= 0 else ""


if __name__ == "__main__":
    main()
