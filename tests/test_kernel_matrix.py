"""Every block format the kernels take x every GPU path that reads weights x row lengths that are and are not
multiples of each kernel's tiles, against float64 products of gguf-py's dequantized weights (independent of our
planes, kernels and twins). The GPU tests compare with the host's float64, not with a twin computed on the same
device: a fault in what XLA:GPU or Triton makes of a format would otherwise pass unseen.

Paths: the dense decode matvec, the routed-expert decode matvec, the grouped MoE prefill matmul (qmatvec /
moe_matmul kernels), and the prefill dequantize + dot (ops.qmatmul on the GPU backend, bf16 operands). Row
lengths (K): 32 (one block), 128 (under one chunk: gpt-oss files where llama.cpp's Q4_K_M falls back to 32-value
formats), 256, 2880 (gpt-oss's n_ff: 90 blocks, masked K tails) for the 32-value formats; 256, 768, 3072 for the
K-quants. Interpret mode on the CPU runs the small cases; `gpu` runs them all compiled."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_pallas_qmatvec import dense_tol, random_weight

from worker import ops
from worker.pallas_kernels import moe_matmul as mm
from worker.pallas_kernels import qmatvec as qmv

TYPES = sorted(qmv.KERNEL_TYPES, key=lambda t: t.name)
PATHS = ("dense", "moe_matvec", "moe_matmul", "prefill_dot")
# float32 products and sums: a few ulps of sum |x| |w| (dense: float16 operands on the GPU, test_pallas_qmatvec's
# dense_tol). bf16 operands: 2^-8 relative per product (2^-9 for x and for the weight each), so at most 2^-8.
TOL = {"dense": 1e-5, "moe_matvec": 1e-5, "moe_matmul": 2.0**-8, "prefill_dot": 2.0**-8}
E, K_SEL = 4, 2
TOKENS = {"dense": 8, "moe_matvec": 2, "moe_matmul": 70, "prefill_dot": 40}


def row_lengths(qtype: QT) -> tuple[int, ...]:
    return (32, 128, 256, 2880) if qmv.FORMATS[qtype].sb == 32 else (256, 768, 3072)


def out_rows(k: int) -> int:
    """48: a multiple of 16 (the grouped kernel's smallest column tile) that 32-row blocks do not divide; the
    gpt-oss-sized case is square."""
    return 2880 if k == 2880 else 48


def run_path(path: str, qtype: QT, k: int, seed: int, interpret: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ours, float64 reference, sum |x| |w|) for one case."""
    n, m = out_rows(k), TOKENS[path]
    rng = np.random.default_rng(seed)
    if path in ("dense", "prefill_dot"):
        w, w64 = random_weight(qtype, (n, k), seed)
        x = rng.standard_normal((m, k)).astype(np.float32)
        if path == "dense":
            y = jax.jit(lambda x, w: qmv.qmatvec(x, w, interpret=interpret))(x, w)
        else:
            backend = "cpu" if interpret else "gpu"  # the GPU backend's prefill dot: bf16 operands
            y = jax.jit(lambda x, w: ops.qmatmul(x, w, backend=backend))(x, w)
        x64 = x.astype(np.float64)
        return np.asarray(y, np.float64), x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    experts, w64 = random_weight(qtype, (E, n, k), seed)
    ids = np.stack([rng.permutation(E)[:K_SEL] for _ in range(m)]).astype(np.int32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    kernel = qmv.moe_matvec if path == "moe_matvec" else mm.moe_matmul
    y = jax.jit(lambda x, w, i: kernel(x, w, i, interpret=interpret))(x, experts, ids)
    xs = np.broadcast_to(x[:, None].astype(np.float64), (m, K_SEL, k))
    picked = w64[ids]  # [M, k, Out, In]
    ref = np.einsum("mki,mkoi->mko", xs, picked)
    return np.asarray(y, np.float64), ref, np.einsum("mki,mkoi->mko", np.abs(xs), np.abs(picked))


def check(path: str, qtype: QT, k: int, interpret: bool) -> None:
    y, ref, bound = run_path(path, qtype, k, seed=k + 7 * PATHS.index(path), interpret=interpret)
    assert y.shape == ref.shape and np.isfinite(y).all()
    err = float(np.max(np.abs(y - ref) / (bound + 1e-30)))
    tol = dense_tol(interpret) if path == "dense" else TOL[path]
    assert err <= tol, f"{path} {qtype.name} K={k}: max error {err:.3g} of sum|x||w| (tolerance {tol:.3g})"


# On the CPU only the row length that llama.cpp's fallbacks produce and that fits under one chunk (the tile
# edges have their own interpret tests in test_pallas_qmatvec.py and test_pallas_moe_matmul.py).
# The expert paths of the 256-value formats that no oracle model holds (Q2_K, Q3_K, IQ4_XS: llama.cpp's Q2_K, Q3_K_*
# and IQ4_XS files) at one super-block; their dense matvec is test_pallas_qmatvec's.
CPU_CASES = [(p, t, 128) for p in PATHS[:3] for t in TYPES if qmv.FORMATS[t].sb == 32]
CPU_CASES += [(p, t, 256) for p in PATHS[1:3] for t in (QT.IQ4_XS, QT.Q2_K, QT.Q3_K)]


@pytest.mark.parametrize(("path", "qtype", "k"), CPU_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_kernels_in_interpret_mode(path, qtype, k):
    check(path, qtype, k, interpret=True)


@pytest.fixture
def gpu_backend():
    if jax.default_backend() != "gpu":
        pytest.fail("gpu-marked tests need a GPU visible to JAX (run them with `just test-gpu`)")


GPU_CASES = [(p, t, k) for p in PATHS for t in TYPES for k in row_lengths(t)]


@pytest.mark.gpu
@pytest.mark.parametrize(("path", "qtype", "k"), GPU_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_gpu_paths_against_float64(gpu_backend, path, qtype, k):
    check(path, qtype, k, interpret=False)
