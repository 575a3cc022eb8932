"""Static SASS instruction counts of the Pallas Triton kernels of a qmatvec call, for the H200 (sm_90a), with no GPU:

    .venv/bin/python tools/kernel_sass.py --expr 'qmatvec Q4_K 16384x3072 rows=1 tensor_cores=False' \\
        --expr 'qmatvec Q4_K 16384x3072 rows=1 tensor_cores=False factored=True'

Why: CI has no GPU and a session has 30 minutes of device time, so a kernel variant's instructions are counted
here first (its main loop's body, per weight value, registers, spills) and only the variants worth it are timed on
the card (bench/kernels.py, bench/kernel_profile.py). An --expr is `qmatvec FORMAT NxK [rows=R] [key=value ...]`:
the keys other than rows and live (True: a decode step's live rows given) are qmatvec's (tensor_cores, row_tile
and plan's tiles: block_n, factored, ...). A `moe_matvec FORMAT ExNxK [rows=R] [k=S]` counts the gathered kernel:
R tokens of S selections each; `moe_matmul FORMAT ExNxK [rows=R] [k=S] [tiles]` the grouped kernel (BF16: decode's
bf16 copy of the experts; e.g. `swap=True block_m=16 block_n=64 chunk=2`, moe_matmul.swapped_tiles);
`triton_port Q4_K NxK [rows=R]` the jax-triton port of the per-row int8-x kernel
(bench/triton_matvec.py), which `qmatvec Q4_K NxK rows=R tensor_cores=False int8_x=True` is the Pallas side of.

How: jax lowers the call for "cuda" (no device needed); Pallas' custom call __gpu$xla.gpu.triton carries each
kernel's TTIR with its num_warps, num_stages and grid. The pip triton of TRITON_VENV (default /tmp/kernel-sass/venv)
compiles that to PTX (tools/kernel_sass_compile.py), its ptxas assembles it for sm_90a and cuobjdump disassembles it.

Caveats: the counts are static (each loop body counted once; the grid estimate multiplies by the trip count).
Registers differ from XLA's build of the same TTIR (127 here against 96 measured for per-row Q4_K): compare them
between variants only. Floating-point fusion is off by default because XLA's build has none (no FFMA on the card).
Capture relies on jaxlib lowering the TTIR into the custom call, as 0.10.2 does; later ones compile it to PTX while
lowering instead. Triton's own TTIR passes run on the captured TTIR first (tools/kernel_sass_compile.py), as XLA's
pipeline runs them; counts before 2026-12-07's forty-fourth session skipped them, so each dot there started from
zero and was added to the loop's sum by FADDs (8-16 a loop step a thread) that the card's build does not have.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRITON_VENV = Path(os.environ.get("TRITON_VENV", "/tmp/kernel-sass/venv"))
ARCH = "sm_90a"  # the H200's
sys.dont_write_bytecode = True  # a run leaves nothing in the checkout
sys.path.insert(0, str(REPO))  # jax and the worker are imported where used, after this


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    ttir: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def captured_kernels(fn: Callable, *args: Any) -> list[Kernel]:
    """The Triton kernels of jax.jit(fn)(*args) lowered for CUDA; args may be jax.ShapeDtypeStruct pytrees."""
    import jax
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect

    configs = []
    custom_call = mlir.custom_call

    def spy(call_target_name, *a, backend_config=None, **k):
        if call_target_name == "__gpu$xla.gpu.triton":
            ints = {key: ir.IntegerAttr(backend_config[key]).value for key in ("num_warps", "num_stages")}
            grid = tuple(ir.IntegerAttr(backend_config[f"grid_{d}"]).value for d in "xyz")
            configs.append((backend_config["name"].value, backend_config["ir"].value_bytes, ints, grid))
        return custom_call(call_target_name, *a, backend_config=backend_config, **k)

    mlir.custom_call = spy
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        mlir.custom_call = custom_call
    if not configs:
        raise SystemExit("no __gpu$xla.gpu.triton custom call: this jaxlib compiles Triton to PTX while lowering")
    kernels = []
    for name, bytecode, ints, grid in configs:
        with ir.Context() as ctx, ir.Location.unknown():
            dialect.register_dialect(ctx)
            ttir = ir.Module.parse(bytecode).operation.get_asm(enable_debug_info=True)
        kernels.append(Kernel(name, ttir, ints["num_warps"], ints["num_stages"], grid))
    return kernels


@dataclasses.dataclass(frozen=True)
class Build:
    regs: int
    spill_stores: int  # bytes
    spill_loads: int
    stack: int
    shared: int
    sass: str
    triton: str


def triton_tool(name: str) -> str:
    found = sorted(TRITON_VENV.glob(f"lib/python*/site-packages/triton/backends/nvidia/bin/{name}"))
    if not found:
        raise SystemExit(
            f"no pip triton at TRITON_VENV={TRITON_VENV}; make it with: python3.11 -m venv {TRITON_VENV} && "
            f"{TRITON_VENV}/bin/pip install triton==3.9.0 numpy"
        )
    return str(found[0])


def build(kernel: Kernel, workdir: Path, fp_fusion: bool) -> Build:
    workdir.mkdir(parents=True, exist_ok=True)
    ttir = workdir / "captured.ttir"  # Triton writes its own kernel.ttir, after its passes
    ttir.write_text(kernel.ttir)
    compile_args = [ttir, workdir, kernel.num_warps, kernel.num_stages, int(fp_fusion), re.sub(r"\D", "", ARCH)]
    compile_cmd = [str(TRITON_VENV / "bin/python"), str(Path(__file__).with_name("kernel_sass_compile.py"))]
    r = subprocess.run(compile_cmd + [str(a) for a in compile_args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"triton failed on {ttir}:\n{r.stderr[-4000:]}")
    meta = json.loads((workdir / "meta.json").read_text())
    # Assembled again, with Triton's own ptxas flags (backends/nvidia/compiler.py, make_cubin), for -v's report of
    # registers and spills, which Triton keeps to itself. ptxas-blackwell is the one Triton 3.9 runs for sm_90 up.
    cubin = workdir / "ptxas.cubin"
    fmad = [] if fp_fusion else ["--fmad=false"]
    cmd = [triton_tool("ptxas-blackwell"), "-lineinfo", "-v", "--regAllocOptLevel=2", *fmad, f"--gpu-name={ARCH}"]
    log = subprocess.run(cmd + [str(workdir / "kernel.ptx"), "-o", str(cubin)], capture_output=True, text=True)
    if log.returncode:
        raise SystemExit(f"ptxas failed: {' '.join(cmd)}\n{log.stderr}")
    sass = subprocess.run([triton_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True)
    (workdir / "kernel.sass").write_text(sass.stdout)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.stderr)
    regs, stack = (int(re.search(p, log.stderr)[1]) for p in (r"Used (\d+) registers", r"(\d+) bytes stack frame"))
    return Build(regs, int(spills[1]), int(spills[2]), stack, meta["shared"], sass.stdout, meta["triton"])


# one instruction of cuobjdump -sass: /*0520*/  @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, text) of each instruction of the first kernel, without the NOPs that pad its end."""
    out = []
    for line in sass.splitlines():
        if m := _INSTRUCTION.search(line):
            body = re.sub(r"^@!?U?P\w+\s+", "", m[2])  # the predicate guard
            out.append((int(m[1], 16), body.split()[0].split(".")[0], m[2]))
    while out and out[-1][1] == "NOP":
        out.pop()
    return out


def main_loop(ins: list[tuple[int, str, str]]) -> tuple[tuple[int, int] | None, int]:
    """(first, last) index of the largest innermost loop, None without one; and the number of loops. A loop is
    the range from a backward branch's target to the branch."""
    index = {address: i for i, (address, _, _) in enumerate(ins)}
    loops = []
    for i, (address, op, text) in enumerate(ins):
        m = re.search(r"(?:BRA|JMP)\S*\s+(?:`\()?(0x[0-9a-f]+)", text) if op in ("BRA", "JMP") else None
        if m and int(m[1], 16) < address and int(m[1], 16) in index:
            loops.append((index[int(m[1], 16)], i))
    inner = [(s, e) for s, e in loops if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]
    return max(inner, key=lambda r: r[1] - r[0], default=None), len(loops)


def report(label: str, k: Kernel, b: Build, values_per_step: int, steps: int, top: int, show_sass: bool) -> None:
    ins = instructions(b.sass)
    loop, n_loops = main_loop(ins)
    threads = 32 * k.num_warps
    programs = k.grid[0] * k.grid[1] * k.grid[2]
    whole = collections.Counter(op for _, op, _ in ins)
    print(
        f"== {label}: kernel {k.name}  grid {k.grid} ({programs} programs)  num_warps {k.num_warps} "
        f"num_stages {k.num_stages}  smem {b.shared} B"
    )
    print(f"   registers {b.regs}  spills: {b.spill_stores} B stores / {b.spill_loads} B loads  stack {b.stack} B")
    print(f"   SASS instructions (static, whole kernel): {len(ins)}")
    print("   kernel top:  " + "  ".join(f"{op} {n}" for op, n in whole.most_common(top)))
    if loop is None:
        print("   no backward branch: no loop in the SASS")
        return
    s, e = loop
    body = ins[s : e + 1]
    print(
        f"   loops (backward branches): {n_loops}; main loop body: {len(body)} instructions "
        f"[0x{ins[s][0]:04x}..0x{ins[e][0]:04x}]"
    )
    print(f"   loop body top-{top}:")
    for op, n in collections.Counter(op for _, op, _ in body).most_common(top):
        print(f"     {op:<14}{n:6d}")
    print(
        f"   values per iteration {values_per_step} ({values_per_step / threads:g} per thread): "
        f"{len(body) * threads / values_per_step:.2f} instructions per value per thread "
        f"({len(body) * k.num_warps / values_per_step:.4f} warp instructions per value)"
    )
    outside = len(ins) - len(body)
    grid_total = programs * k.num_warps * (len(body) * steps + outside)
    print(
        f"   loop trips {steps}: ~{grid_total / 1e6:.2f}M warp instructions for the grid "
        f"(loop {len(body)} x {steps} + {outside} outside, each counted once; static estimate)"
    )
    if show_sass:
        print("\n".join(f"     /*{address:04x}*/ {text}" for address, _, text in body))


def qmatvec_call(expr: str) -> tuple[list[Kernel], Any, int]:
    """The Triton kernels of an --expr's qmatvec call, the qmatvec.Plan they were tiled by (what a loop step
    covers) and the format's super-block size."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as QT

    from worker.pallas_kernels import moe_matmul as mm
    from worker.pallas_kernels import qmatvec as qmv
    from worker.quant import quant_array

    name, fmt, shape, *options = expr.split()
    if name not in ("qmatvec", "moe_matvec", "moe_matmul"):
        raise SystemExit(f"--expr {expr!r}: only qmatvec's, moe_matvec's and moe_matmul's kernels are counted")
    qtype, shape = QT[fmt], tuple(int(d) for d in shape.lower().split("x"))
    kwargs = {}
    for option in options:
        key, _, value = option.partition("=")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    rows = kwargs.pop("rows", 1)
    selections = kwargs.pop("k", 4)  # moe_matvec: the experts each token selects
    live = kwargs.pop("live", False)  # qmatvec: a decode step's live rows given (the dead-row skip's code)
    # The planes' shapes and dtypes from an all-zero tensor: lowering needs no values.
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((*shape[:-1], shape[-1] // block * size), np.uint8)
    w = quant_array(raw, qtype, shape, put=lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype))
    x = jax.ShapeDtypeStruct((rows, shape[-1]), jnp.float32)
    # qmatvec picks its tiles from the shape and the overrides; recording its `plan` call reads them from the one
    # place that decides them.
    plans = []
    module = mm if name == "moe_matmul" else qmv
    plan = module.plan

    def recorded_plan(*a, **k):
        plans.append(plan(*a, **k))
        return plans[-1]

    module.plan = recorded_plan
    try:
        if name != "qmatvec":  # the experts: the grouped kernel (BF16: decode's copy of the experts), the gathered one
            op = mm.moe_matmul if name == "moe_matmul" else qmv.moe_matvec
            ids = jax.ShapeDtypeStruct((rows, selections), jnp.int32)
            kernels = captured_kernels(lambda x, w, ids: op(x, w, ids, **kwargs), x, w, ids)
        else:
            alive = jax.ShapeDtypeStruct((rows,), jnp.bool_) if live else None
            kernels = captured_kernels(lambda x, w, alive: qmv.qmatvec(x, w, live=alive, **kwargs), x, w, alive)
    finally:
        module.plan = plan
    return kernels, plans[-1], qmv.FORMATS[qtype].sb


def port_call(expr: str, workdir: Path) -> tuple[list[Kernel], Any, int]:
    """`triton_port Q4_K NxK [rows=R] [tiles]`: bench/triton_matvec.py's kernel (the jax-triton port of the per-row
    int8-x Q4_K matvec) with the plan qmatvec gives the Pallas one, its TTIR made by TRITON_VENV's triton."""
    from gguf import GGMLQuantizationType as QT

    from worker.pallas_kernels import qmatvec as qmv

    name, fmt, shape, *options = expr.split()
    if fmt != "Q4_K":
        raise SystemExit(f"--expr {expr!r}: the port is of the Q4_K kernel only")
    kwargs = {key: ast.literal_eval(value) for key, _, value in (o.partition("=") for o in options)}
    rows = kwargs.pop("rows", 1)
    n, k = (int(d) for d in shape.lower().split("x"))
    p = qmv.plan(QT.Q4_K, n, k, int8_x=True, **kwargs)
    workdir.mkdir(parents=True, exist_ok=True)
    call = workdir / "call.json"
    call.write_text(json.dumps({"t_rows": rows, "n": n, "k": k, "rows": rows, "plan": dataclasses.asdict(p)}))
    cmd = [str(TRITON_VENV / "bin/python"), str(Path(__file__).with_name("kernel_sass_port.py")), str(call),
           str(workdir / "port.ttir"), re.sub(r"\D", "", ARCH)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the port's TTIR failed:\n{r.stderr[-4000:]}")
    grid = tuple(json.loads(r.stdout)["grid"])
    kernel = Kernel("q4_k_int8_kernel (jax-triton port)", (workdir / "port.ttir").read_text(), p.num_warps,
                    p.num_stages, grid)  # fmt: skip
    return [kernel], p, qmv.FORMATS[QT.Q4_K].sb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expr", action="append", required=True, help="a qmatvec call; repeat to compare variants")
    ap.add_argument("--fp-fusion", action="store_true", help="let ptxas fuse multiply+add to FFMA (Triton's default)")
    ap.add_argument("--keep", type=Path, help="write Triton's stages, the cubin and the SASS here, one folder a kernel")
    ap.add_argument("--top", type=int, default=15, help="opcodes listed, most frequent first")
    ap.add_argument("--sass", action="store_true", help="print the main loop's SASS")
    args = ap.parse_args()
    ptxas_version = subprocess.run([triton_tool("ptxas-blackwell"), "--version"], capture_output=True, text=True)
    print(f"# ptxas {ptxas_version.stdout.strip().splitlines()[-1]}, fp fusion {'on' if args.fp_fusion else 'off'}")
    with tempfile.TemporaryDirectory(prefix="kernel-sass-") as scratch:
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(scratch, "triton-cache"))  # for the compile step
        for j, expr in enumerate(args.expr):
            if expr.startswith("triton_port"):
                kernels, p, sb = port_call(expr, (args.keep or Path(scratch)) / str(j) / "port")
            else:
                kernels, p, sb = qmatvec_call(expr)
            leaves = getattr(p, "leaves", 1) // getattr(p, "splits", 1)  # moe_matmul: a program's leaves, one loop
            values_per_step = p.block_n * p.chunk * sb * max(1, leaves)
            print(f"# {p}: weight values per program per loop step = block_n {p.block_n} x chunk {p.chunk} x {sb}"
                  + (f" x {leaves} leaves" if leaves > 1 else ""))  # fmt: skip
            for i, k in enumerate(kernels):
                workdir = (args.keep or Path(scratch)) / str(j) / f"{i}_{k.name}"
                b = build(k, workdir, args.fp_fusion)
                if i == 0 and j == 0:
                    print(f"# triton {b.triton}" + (f"; files in {args.keep}" if args.keep else ""))
                report(expr, k, b, values_per_step, p.steps, args.top, args.sass)


if __name__ == "__main__":
    main()
