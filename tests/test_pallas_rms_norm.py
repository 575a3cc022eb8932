"""RMSNorm's kernel (worker/pallas_kernels/rms_norm.py) against float64: in interpret mode here, compiled on the
card (`gpu`), on the real models' widths (a power of two and not), the q/k norms' [B, T, H, hd] rows, a masked tail;
and models on a kernel backend with the kernel on (the GPU's default; WORKER_NORM_KERNEL=1 on "interpret") take it
at every norm and follow their float64 oracles.
Rows alone and among others: the test_batching norm test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_oracles import check_logits, manifest, rel_err, teacher_forced_decode
from test_backends import MARGIN, TOL

import worker
from worker import ops
from worker.pallas_kernels import rms_norm as kernel

# gemma3-270m 640, qwen2.5 896, gpt-oss 2880, phi3 3072, a 96-wide head (phi3's head dim), the q/k norms' 256
SHAPES = [(3, 640), (2, 5, 896), (2, 1, 2880), (4, 3072), (3, 96), (1, 2, 4, 256)]


def float64_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w.astype(np.float64)


def check(shape: tuple[int, ...], interpret: bool) -> None:
    d = shape[-1]
    rng = np.random.default_rng(d)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 30, shape[:-1] + (1,))).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    y = np.asarray(kernel.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, interpret=interpret))
    assert y.shape == shape and y.dtype == np.float32
    ref = float64_norm(x, w, 1e-6)
    # float32 throughout: a sum of d squares and a few roundings a value
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_norm_kernel_in_interpret_mode_follows_float64(shape):
    check(shape, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(4096, 2880)], ids=lambda s: "x".join(map(str, s)))
def test_the_norm_kernel_compiled_follows_float64(shape):
    if jax.default_backend() != "gpu":
        pytest.skip("no GPU visible to JAX")
    check(shape, interpret=False)


ON = ops.kernel_backends("1")  # WORKER_NORM_KERNEL=1


def test_the_kernel_is_on_by_default_on_the_gpu_only_and_the_setting_turns_it_on_or_off():
    assert ops.kernel_backends("") == {"gpu": True, "interpret": False}
    assert ops.kernel_backends("0") == {"gpu": False, "interpret": False}
    assert ops.kernel_backends("1") == {"gpu": True, "interpret": True}


def test_the_kernel_backends_take_the_kernel_and_the_cpu_and_meshes_do_not(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "_norm_kernel", ON)
    monkeypatch.setattr(kernel, "rms_norm", lambda *a, **k: calls.append(k["interpret"]) or a[0])
    x, w = jnp.ones((2, 8)), jnp.ones(8)
    ops.rms_norm(x, w, 1e-6, "interpret")
    ops.rms_norm(x, w, 1e-6, "gpu")
    assert calls == [True, False]
    ops.rms_norm(x, w, 1e-6)
    ops.rms_norm(x, w, 1e-6, "gpu", mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",)))
    monkeypatch.setattr(ops, "_norm_kernel", ops.kernel_backends("0"))
    ops.rms_norm(x, w, 1e-6, "gpu")
    assert calls == [True, False]


# gemma3: every norm site (attention, q/k, post-attention, ffn, post-ffn, output), at the CPU gate; gpt-oss: the
# experts' norm, at 1e-2: the interpret backend's MoE prefill has bf16 operands (4.08e-3 from the oracle with the
# kernel or without, 2026-12-06)
NORMS = [("gemma3", "model-q8_0.gguf", "logits-hf-f64-q8_0-dequant.npy", 6, TOL),
         ("gpt-oss", "model-mxfp4_moe.gguf", "logits-hf-f64-mxfp4_moe-dequant.npy", 2, 1e-2)]  # fmt: skip


@pytest.mark.parametrize(("arch", "file", "logits", "per_layer", "tol"), NORMS, ids=[n[0] for n in NORMS])
def test_a_model_on_the_norm_kernel_follows_its_oracle(oracles, monkeypatch, arch, file, logits, per_layer, tol):
    """WORKER_NORM_KERNEL=1 on the interpret backend: a prompt's logits through every norm site on the kernel, within
    the backend's gate of the float64 HF oracle."""
    monkeypatch.setattr(ops, "_norm_kernel", ON)
    calls, real = [], kernel.rms_norm
    monkeypatch.setattr(kernel, "rms_norm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    d = oracles / "models" / arch
    m = worker.load(d / file, device="cpu", backend="interpret", slots=256, max_batch=2)
    ours = m.logits(manifest(d)["input"]["ids"])
    assert len(calls) == per_layer * m.cfg.n_layers + 1, calls  # traced once a site: a layer's, and the output's
    check_logits(ours, np.load(d / logits), tol, MARGIN)


@pytest.mark.gpu
@pytest.mark.parametrize(("arch", "file", "logits"), [n[:3] for n in NORMS], ids=[n[0] for n in NORMS])
def test_a_model_on_the_norm_kernel_compiled_keeps_its_greedy_ids(oracles, monkeypatch, arch, file, logits):
    """The kernel on the card (its default there): prefill's logits and the teacher-forced decode's greedy ids equal
    the float64 argmax wherever its top-2 margin exceeds 0.05 (the GPU gate, tests/test_gpu.py)."""
    if jax.default_backend() != "gpu":
        pytest.skip("no GPU visible to JAX")
    monkeypatch.setattr(ops, "_norm_kernel", ON)
    d = oracles / "models" / arch
    m = worker.load(d / file, device="gpu")
    ids, ref = manifest(d)["input"]["ids"], np.load(d / logits)
    ours = m.logits(ids)
    print(f"{arch}: relative error on the norm kernel {rel_err(ours, ref):.2e}")
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert (ours.argmax(-1) == ref.argmax(-1))[clear].all()
    assert (teacher_forced_decode(m, ids) == ref.argmax(-1))[clear].all()
