"""The tiling rules the Pallas kernels share (Triton compiler params, grid sizing, power-of-two tiles, the k/v tile
of the attention kernels), so that no kernel reaches into another's private helpers."""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

# JAX 0.11 lowers pallas_call on GPU to Mosaic GPU unless the compiler params are Triton's, so every call passes
# them. The class is `CompilerParams` in JAX 0.10-0.11, `TritonCompilerParams` before.
TritonParams = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams

SM_COUNT = 132  # H100 SXM and H200
TARGET_PROGRAMS = 4 * SM_COUNT  # programs a grid aims for: a few per SM hide the memory latency
ALL = slice(None)
NEG = -1e30  # the attention kernels' running max before any key: finite, so exp(m - m_new) never sees inf - inf
MAX_BLOCK_S = 64  # slots per k/v tile of the attention kernels


def cuda_capability() -> float | None:
    """The default device's CUDA compute capability (9.0 for an H100), or None: not a GPU, or another vendor's (its
    capability not a number)."""
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if device.platform != "gpu" or re.fullmatch(r"\d+(\.\d+)?", capability) is None:
        return None
    return float(capability)


def kernel_entry(*static: str) -> Callable[[Callable], Callable]:
    """A kernel's public entry point as a jitted function of its own (`static`: the arguments that are Python
    values). Why: one decode step calls the same kernel (one weight format and shape, one attention layout) once
    per layer; a nested jit is traced and lowered once per distinct call in a program, not once per call. JAX
    0.11's Pallas Triton lowering compiles each kernel to PTX while lowering (jax._src.lib.triton.compile), so
    this takes a decode bucket of qwen2.5-0.5b from 217 kernel compiles to the ~10 distinct ones. XLA inlines
    the calls, so the compiled program is the same."""

    def wrap(fn: Callable) -> Callable:
        return jax.jit(fn, static_argnames=static)

    return wrap


def static_index(i):
    """A static int index as an int32 scalar: the interpreter's masked load (JAX 0.10) rejects Python ints."""
    return jnp.int32(i) if isinstance(i, int) else i


def masked_load(ref, mask: jax.Array | None) -> jax.Array:
    """`ref`'s block, zeros where `mask` is false; None: every element (Triton's load takes no `other` without a
    mask)."""
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


def pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def padded_dim(d: int) -> int:
    """A head dim as a Triton tile dimension: a power of two, at least 16 (phi3's 96 -> 128, masked)."""
    return max(16, pow2_at_least(d))


def key_tile(slots: int, d: int, tile_values: int) -> int | None:
    """Slots per k/v tile: the largest power of two <= MAX_BLOCK_S, <= tile_values / padded D (but >= 16) and
    dividing `slots`, at least 16; None if there is none."""
    bs = min(MAX_BLOCK_S, max(16, tile_values // padded_dim(d)))
    while bs >= 16 and slots % bs:
        bs //= 2
    return bs if bs >= 16 else None


def online_softmax_tile(carry: tuple, qs: list, k, v, visible, scale: float) -> tuple:
    """One key tile of the decode attention kernels' online softmax: for each query head g of the group, its
    running (max, denominator, weighted value sum) updated with k, v [bs, dp] (float32) where `visible` [bs]."""
    out = []
    for (m, l_, acc), qv in zip(carry, qs, strict=True):
        s = jnp.sum(k * jax.lax.expand_dims(qv, (0,)), axis=1) * jnp.float32(scale)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s))
        alpha = jnp.exp(m - m_new)
        w = jnp.exp(s - m_new)
        acc = acc * alpha + jnp.sum(jax.lax.expand_dims(w, (1,)) * v, axis=0)
        out.append((m_new, l_ * alpha + jnp.sum(w), acc))
    return tuple(out)
