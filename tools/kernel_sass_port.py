"""The TTIR of bench/triton_matvec.py's kernel (the jax-triton port of the per-row int8-x Q4_K matvec) for
tools/kernel_sass.py, run by the Python of a venv with pip's triton, as kernel_sass_compile.py is:

    $TRITON_VENV/bin/python tools/kernel_sass_port.py CALL.json OUT.ttir CAPABILITY

CALL.json: {"t_rows", "n", "k", "rows", "plan": qmatvec.Plan's fields}. Prints the launch grid as JSON. The
pointers get jax-triton's specialization (16-byte aligned), so the TTIR is what the card's build starts from.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.triton_matvec import launch_args, q4_k_int8_kernel  # noqa: E402

POINTERS = {"xw_ptr": "*i32", "dx_ptr": "*fp32", "xs_ptr": "*i32", "qs_ptr": "*i32", "sc_ptr": "*u8",
            "mn_ptr": "*u8", "d_ptr": "*fp16", "dmin_ptr": "*fp16", "out_ptr": "*fp32"}  # fmt: skip


def main() -> None:
    call_path, out, capability = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    call = json.loads(Path(call_path).read_text())
    grid, constexprs = launch_args(call["t_rows"], call["n"], call["k"], types.SimpleNamespace(**call["plan"]),
                                   call["rows"])  # fmt: skip
    constexprs["ASM"] = True
    signature = POINTERS | {name: "constexpr" for name in constexprs}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(POINTERS))}
    source = ASTSource(q4_k_int8_kernel, signature, {(q4_k_int8_kernel.arg_names.index(k),): v
                                                     for k, v in constexprs.items()}, aligned)  # fmt: skip
    options = {"num_warps": call["plan"]["num_warps"]}  # as the card launches it (the TTIR is the same)
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    out.write_text(kernel.asm["ttir"])
    print(json.dumps({"grid": grid}))


if __name__ == "__main__":
    main()
