"""#15's backend question, one side of it: the per-row int8-x Q4_K matvec (worker/pallas_kernels/qmatvec_int8.py's
`_kernel` on a dense Q4_K weight) written in triton.language and called through jax-triton, so that the card can
time a Triton kernel outside Pallas against the Pallas Triton one (deprecated in JAX 0.11) on the same planes, the
same x and the same plan (bench/backend.py; docs/kernels.md, "The kernels' future").

It reads the same planes as the Pallas kernel (the weight's nibble words, unpacked 6-bit scales and minimums, the
f16 super-block scales) and x as `qmatvec_int8.quantize_x` gives it, and it writes the same split-K partials
[splits, T', N'], each element by the same operations in the same order: per super-block (K order), group g
(0-3) and half p (0-1), the exact integer sum of eight dp4a over the group's 32 codes, then
`group = fma(d*sc, sum, -(dmin*mn) * sum(x))` and `acc = fma(dx, group, acc)`. So its partials must equal the Pallas
kernel's bit for bit (tests/test_bench_backend.py on the card; `python -m bench.backend --interpret` here, in
Triton's interpreter).

Why in bench/ and not worker/: it is a measuring instrument until the card decides (docs/kernels.md); the winner's
kernels move into worker/ then. This module imports triton (not a dependency of the worker: the card has it, with
PyTorch); jax_triton is imported only to call the kernel on the card.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl


@triton.jit
def _dp4a(codes, x, acc, ASM: tl.constexpr):
    """acc + the sum over the four bytes of int32 words of codes' byte (uint8) times x's (int8), int32 ([ROWS, BN]
    from codes [BN] and x [ROWS]); PTX dp4a where ASM (the card), else by shifts (Triton's interpreter cannot run
    PTX): exact either way."""
    codes = tl.broadcast_to(codes[None, :], acc.shape)
    x = tl.broadcast_to(x[:, None], acc.shape)
    if ASM:
        total = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [codes, x, acc],
                                          dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        total = acc + (codes & 0xFF) * ((x << 24) >> 24)
        total += ((codes >> 8) & 0xFF) * ((x << 16) >> 24)
        total += ((codes >> 16) & 0xFF) * ((x << 8) >> 24)
        total += ((codes >> 24) & 0xFF) * (x >> 24)
    return total


@triton.jit
def _dot(codes, x, acc, W: tl.constexpr, ASM: tl.constexpr):
    """acc + the products of W words of codes [BN, W] with x's [ROWS, W], summed, as a chain of dp4a. Why halves by
    tl.split and not one sum over the words: a reduction leaves the words where the load's layout put them, spread
    over threads (warp shuffles: 3.35 SASS instructions a value on phi3's gate_up against 2.00), and a split keeps
    a row's words in its thread. The integer sums are exact, so their order changes no bit."""
    if W == 1:
        acc = _dp4a(tl.reshape(codes, (codes.shape[0],)), tl.reshape(x, (x.shape[0],)), acc, ASM)
    else:
        c0, c1 = tl.split(tl.reshape(codes, (codes.shape[0], W // 2, 2)))
        x0, x1 = tl.split(tl.reshape(x, (x.shape[0], W // 2, 2)))
        acc = _dot(c0, x0, acc, W // 2, ASM)
        acc = _dot(c1, x1, acc, W // 2, ASM)
    return acc


@triton.jit
def _fma(a, b, c, ASM: tl.constexpr):
    """a * b + c in float32 with one rounding (PTX fma.rn.f32) where ASM; else in float64 rounded to float32, as
    the Pallas kernel's interpret mode computes it (the interpreter's fma rounds the product first)."""
    if ASM:  # noqa: SIM108  (a static branch of Triton's: one side is built)
        out = tl.fma(a, b, c)
    else:
        out = (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    return out


@triton.jit
def q4_k_int8_kernel(
    xw_ptr, dx_ptr, xs_ptr, qs_ptr, sc_ptr, mn_ptr, d_ptr, dmin_ptr, out_ptr,
    n: tl.constexpr, blocks: tl.constexpr, steps: tl.constexpr, out_rows: tl.constexpr, out_cols: tl.constexpr,
    BN: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    """Program (r, i, j): output columns [i*BN, (i+1)*BN) over split j of K for x rows [r*ROWS, (r+1)*ROWS).
    x: words int32 [T', blocks, 4 (g), 2 (p), 8], dx float32 and sums int32 [T', blocks, 4, 2]; weight: qs int32
    words [N, blocks, 4, 8], scales and mins uint8 [N, blocks, 4, 2], d and dmin float16 [N, blocks]; out float32
    [splits, T', N']. A masked load reads 0, as the Pallas kernel's (`other=0`). The sizes are constants of the
    build, as Pallas bakes them into its kernels."""
    first = tl.program_id(0) * ROWS
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    rows = first + tl.arange(0, ROWS)
    quad = tl.arange(0, 4)
    col_ok = cols < n
    acc = tl.zeros((ROWS, BN), tl.float32)
    for s in range(steps):
        for i in tl.static_range(CHUNK):
            b = (split * steps + s) * CHUNK + i
            w_ok = cols >= 0  # all true
            if MASK_N:
                w_ok = col_ok
            x_ok = rows >= 0
            if MASK_K:
                w_ok = w_ok & (b < blocks)
                x_ok = x_ok & (b < blocks)
            wb = cols * blocks + b  # each weight row's super-block b
            xb = rows * blocks + b
            d = tl.load(d_ptr + wb, mask=w_ok, other=0).to(tl.float32)
            dmin = tl.load(dmin_ptr + wb, mask=w_ok, other=0).to(tl.float32)
            for g in tl.static_range(4):
                # the group's 8 words as two 16-byte halves, each a thread's vector load (see `_dot`)
                qs_lo = tl.load(qs_ptr + (wb * 4 + g)[:, None] * 8 + quad[None, :], mask=w_ok[:, None], other=0)
                qs_hi = tl.load(qs_ptr + (wb * 4 + g)[:, None] * 8 + 4 + quad[None, :], mask=w_ok[:, None], other=0)
                for p in tl.static_range(2):
                    # [BN, 4] each: values 64g + 32p + 4w + byte of words w 0-3 and 4-7
                    codes_lo = (qs_lo >> (4 * p)) & 0x0F0F0F0F
                    codes_hi = (qs_hi >> (4 * p)) & 0x0F0F0F0F
                    sc = tl.load(sc_ptr + wb * 8 + g * 2 + p, mask=w_ok, other=0).to(tl.float32)
                    mn = tl.load(mn_ptr + wb * 8 + g * 2 + p, mask=w_ok, other=0).to(tl.float32)
                    scale = d * sc
                    offset = -(dmin * mn)
                    x_at = ((xb * 4 + g) * 2 + p)[:, None] * 8 + quad[None, :]
                    xw_lo = tl.load(xw_ptr + x_at, mask=x_ok[:, None], other=0)
                    xw_hi = tl.load(xw_ptr + x_at + 4, mask=x_ok[:, None], other=0)
                    sums = _dot(codes_lo, xw_lo, tl.zeros((ROWS, BN), tl.int32), 4, ASM)
                    sums = _dot(codes_hi, xw_hi, sums, 4, ASM)  # [ROWS, BN], exact
                    x_sums = tl.load(xs_ptr + xb * 8 + g * 2 + p, mask=x_ok, other=0).to(tl.float32)
                    dx = tl.load(dx_ptr + xb * 8 + g * 2 + p, mask=x_ok, other=0)
                    group = _fma(scale[None, :], sums.to(tl.float32), offset[None, :] * x_sums[:, None], ASM)
                    acc = _fma(dx[:, None], group, acc, ASM)
    out = (split * out_rows + rows)[:, None] * out_cols + cols[None, :]
    tl.store(out_ptr + out, acc)


def launch_args(t_rows: int, n: int, k: int, p, rows: int) -> tuple[tuple[int, int, int], dict]:
    """(grid, the kernel's scalar and constexpr arguments) for x of `t_rows` rows (whole groups of `rows`), a
    weight [n, k] and qmatvec's Plan `p`: the Pallas kernel's grid and tiles."""
    if rows & (rows - 1):
        raise ValueError(f"rows a program must be a power of two (Triton's tiles), got {rows}")
    blocks = k // 256
    n_blocks = -(-n // p.block_n)
    grid = (t_rows // rows, n_blocks, p.splits)
    args = dict(n=n, blocks=blocks, steps=p.steps, out_rows=t_rows, out_cols=n_blocks * p.block_n, BN=p.block_n,
                CHUNK=p.chunk, ROWS=rows, MASK_N=n % p.block_n != 0,
                MASK_K=p.splits * p.steps * p.chunk > blocks)  # fmt: skip
    return grid, args


class _HostTensor:
    """A numpy array as Triton's interpreter takes a tensor argument (it expects PyTorch's: data_ptr, dtype by
    name, a storage it copies to the host and back). Host memory already, so the copies are the array itself.
    Why by hand: the interpreter has no numpy path, and PyTorch is not a dependency here."""

    def __init__(self, a: np.ndarray):
        self.a = np.ascontiguousarray(a)
        self.dtype = f"torch.{self.a.dtype.name}"

    def data_ptr(self) -> int:
        return self.a.ctypes.data

    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def copy_(self, other):
        return self

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args):
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self) -> tuple[int, ...]:
        return self.a.shape

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self.a.itemsize for s in self.a.strides)


def interpret_partials(x_args, planes, n: int, k: int, p, rows: int) -> np.ndarray:
    """The kernel in Triton's interpreter (TRITON_INTERPRET=1 must be set before this module is imported): x_args
    (words, dx, sums) and planes (qs words, scales, mins, d, dmin) as numpy arrays in the layouts above; returns
    the partials [splits, T', N']. dp4a by shifts (the same integers)."""
    t_rows = x_args[0].shape[0]
    grid, args = launch_args(t_rows, n, k, p, rows)
    out = np.zeros((p.splits, t_rows, args["out_cols"]), np.float32)
    tensors = [_HostTensor(np.asarray(a)) for a in (*x_args, *planes)] + [_HostTensor(out)]
    q4_k_int8_kernel[grid](*tensors, **args, ASM=False)
    return tensors[-1].a


def partials(x_args, planes, n: int, k: int, p, rows: int, num_warps: int, num_stages: int):
    """The kernel on the card through jax_triton.triton_call (jax arrays in, the partials [splits, T', N'] out)."""
    import jax
    import jax.numpy as jnp
    import jax_triton

    t_rows = x_args[0].shape[0]
    grid, args = launch_args(t_rows, n, k, p, rows)
    out_shape = jax.ShapeDtypeStruct((p.splits, t_rows, args["out_cols"]), jnp.float32)
    return jax_triton.triton_call(*x_args, *planes, kernel=q4_k_int8_kernel, out_shape=out_shape, grid=grid,
                                  num_warps=num_warps, num_stages=num_stages, **args, ASM=True)  # fmt: skip
