"""TTIR -> PTX for tools/kernel_sass.py, run by the Python of a venv with pip's triton (not a dependency of the
worker: jaxlib's own Triton sits behind XLA and hands back no PTX). One kernel a call:

    $TRITON_VENV/bin/python tools/kernel_sass_compile.py KERNEL.ttir OUT_DIR NUM_WARPS NUM_STAGES FP_FUSION CAPABILITY

writes each of Triton's stages (OUT_DIR/kernel.ttgir, .llir, .ptx, .cubin, ...) and OUT_DIR/meta.json (Triton's
version and the kernel's shared memory in bytes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import triton
from triton._C.libtriton import ir, nvidia
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ttir", help="the kernel's TTIR as text; triton.compile reads a path by its .ttir suffix")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("num_warps", type=int)
    ap.add_argument("num_stages", type=int)
    ap.add_argument("fp_fusion", type=int, choices=(0, 1))
    ap.add_argument("capability", type=int, help="e.g. 90 for sm_90a")
    args = ap.parse_args()
    # triton.compile starts an IR source after its own stage, so a .ttir skips Triton's TTIR passes (the combine
    # pass among them, which folds `acc + dot(a, b, 0)` into `dot(a, b, acc)`); XLA's pipeline runs them. So they
    # run here first, on the captured TTIR, and the compile starts from their output.
    ctx = ir.context()
    ir.load_dialects(ctx)
    nvidia.load_dialects(ctx)
    module = ir.parse_mlir_module(args.ttir, ctx)
    module.context = ctx  # as triton.compile sets it on a parsed module (make_ttir reads it)
    CUDABackend.make_ttir(module, None, None, args.capability)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    combined = args.out_dir / "combined.ttir"
    combined.write_text(str(module))
    kernel = triton.compile(
        str(combined),
        target=GPUTarget("cuda", args.capability, 32),
        options=dict(num_warps=args.num_warps, num_stages=args.num_stages, enable_fp_fusion=bool(args.fp_fusion)),
    )
    for stage, text in kernel.asm.items():
        path = args.out_dir / f"kernel.{stage}"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
    meta = {"triton": triton.__version__, "shared": kernel.metadata.shared}
    (args.out_dir / "meta.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    main()
