"""RMSNorm as one kernel: x [..., D] * rsqrt(mean(x^2) + eps) * w, a row a program; its twin and the CPU's path
is ops.rms_norm (jax.numpy).

Why a kernel: XLA builds the norm's fixed-order sum of squares (ops.row_sum, a tree of elementwise adds, for batch
invariance) and the scaling as two to three kernels of ~1.5 us each, twice a layer: in gpt-oss-20b's decode step on
an H100, 123 of XLA's 466 launches and 0.19 ms of a 3.88 ms step (docs/PERFORMANCE.md, twenty-ninth session). Here
a program reads its row once and writes it once. Batch invariance: a row's sum is one Triton reduction over a block
of the same shape in a call of any size, never touching another row. On by default on the GPU
(WORKER_NORM_KERNEL=0 turns it off, worker/ops.py): +3.0% decode on qwen2.5-0.5b on an H100 (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.pallas_kernels.tiling import TritonParams, kernel_entry, masked_load, pow2_at_least

# Rows a program: one on the card (a row's values across the threads of a program); in interpret mode 32, padded,
# because the interpreter copies the whole output per program (a 512-row prefill's norm took 167 ms on a row a
# program against 0.7 ms on jax.numpy). Either way a row's sum is over a block of one shape in every call.
INTERPRET_ROWS = 32


def _kernel(x_ref, w_ref, o_ref, *, d: int, rows: int, eps: float):
    """Program r: rows [r * rows, (r + 1) * rows) of x [R, D] (D rounded up to a power of two, the tail masked)."""
    dp = pow2_at_least(d)
    at = (pl.ds(pl.program_id(0) * rows, rows), pl.ds(0, dp))
    ok = None if dp == d else jax.lax.broadcast_in_dim(jnp.arange(dp) < d, (rows, dp), (1,))
    plgpu.store(o_ref.at[at], normalized(x_ref.at[at], w_ref.at[at[1]], d, eps), mask=ok)


def normalized(x_ref, w_ref, d: int, eps: float) -> jax.Array:
    """The rows of block x_ref [rows, dp] (dp: d rounded up to a power of two, the tail masked to zeros) normalized
    and scaled by w_ref [dp]: float32 [rows, dp]. Also the start of qmatvec_int8's norm-and-round kernel (the same
    values)."""
    rows, dp = x_ref.shape
    cols_ok = None if dp == d else jnp.arange(dp) < d
    ok = None if cols_ok is None else jax.lax.broadcast_in_dim(cols_ok, (rows, dp), (1,))
    x, w = masked_load(x_ref, ok).astype(jnp.float32), masked_load(w_ref, cols_ok).astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / d + eps)
    return x * inv * w


def warps(d: int) -> int:
    """A program's warps for rows of d values: 16 values a thread at most up to 4,096."""
    return min(8, max(1, pow2_at_least(d) // 512))


@kernel_entry("eps", "interpret")
def rms_norm(x: jax.Array, w: jax.Array, eps: float, interpret: bool = False) -> jax.Array:
    """x [..., D] normalized over its last axis and scaled by w [D]: float32 [..., D]."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    n = flat.shape[0]
    rows = INTERPRET_ROWS if interpret else 1
    flat = jnp.pad(flat, ((0, pl.cdiv(n, rows) * rows - n), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, d=d, rows=rows, eps=float(eps)),
        out_shape=jax.ShapeDtypeStruct(flat.shape, jnp.float32),
        grid=(flat.shape[0] // rows,),
        compiler_params=TritonParams(num_warps=warps(d), num_stages=1),
        interpret=interpret,
        name="rms_norm",
    )(flat, w.reshape(d))
    return out[:n].reshape(x.shape)
