"""The k largest values of each row and their indices, as one kernel: a MoE layer's routing (gpt-oss: the 4 best
of 32 experts a token). Its twin is jax.lax.top_k, whose results it equals bit for bit: the same values, and among
equal values the lower index first.

Why a kernel: XLA runs top_k as a kernel launch of its own, 24 a gpt-oss-20b decode step (0.053 ms of 3.37 on an
H100, docs/PERFORMANCE.md, twenty-ninth session), for a row of 32 values. Here a program takes a row: k passes of
a max and the lowest index holding it, the chosen index then out of the running. On by default on the GPU
(worker/ops.py; WORKER_TOPK_KERNEL=0 turns it off): gpt-oss-20b decode 1.027x on an H100 (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.pallas_kernels.tiling import TritonParams, kernel_entry, pow2_at_least, static_index


@kernel_entry("k", "interpret")
def top_k(x: jax.Array, k: int, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """x [M, N] float32 -> (values float32 [M, k], indices int32 [M, k]), each row's largest first. Rows holding a
    NaN are not lax.top_k's (which takes a NaN as the largest): a NaN's index is never chosen, and its place may
    come out with the index N (the routed matvec clamps an id to the experts)."""
    m, n = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"top_k: k = {k} of rows of {n}")
    width, kp = pow2_at_least(n), pow2_at_least(k)  # Triton's blocks: powers of two, the rest masked
    kernel = functools.partial(_kernel, n=n, k=k, width=width, kp=kp)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((m, k), jnp.int32)),
        grid=(m,),
        compiler_params=TritonParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="top_k",
    )(x.astype(jnp.float32))


def _kernel(x_ref, values_ref, indices_ref, *, n: int, k: int, width: int, kp: int):
    row = static_index(pl.program_id(0))
    lanes = jnp.arange(width)
    inside = lanes < n
    x = plgpu.load(x_ref.at[row, pl.ds(0, width)], mask=inside, other=-jnp.inf)
    free = inside  # not chosen yet (a chosen -inf must not be chosen again)
    slots = jnp.arange(kp)
    values, indices = jnp.zeros((kp,), jnp.float32), jnp.zeros((kp,), jnp.int32)
    for i in range(k):
        best = jnp.max(jnp.where(free, x, -jnp.inf))
        at = jnp.min(jnp.where(free & (x == best), lanes, width))
        values = jnp.where(slots == i, best, values)
        indices = jnp.where(slots == i, at, indices)
        free &= lanes != at
    ok = slots < k
    plgpu.store(values_ref.at[row, pl.ds(0, kp)], values, mask=ok)
    plgpu.store(indices_ref.at[row, pl.ds(0, kp)], indices.astype(jnp.int32), mask=ok)
