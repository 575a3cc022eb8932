"""The top-k kernel (worker/pallas_kernels/top_k.py) against jax.lax.top_k, bit for bit: values and indices, ties
(the lower index first), -inf and equal rows, k of 1 to the whole row, widths that are and are not powers of two;
in interpret mode here and compiled on the card (`gpu`); and gpt-oss routing through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_oracles import manifest

import worker
from worker import ops
from worker.pallas_kernels import top_k as kernel
from worker.sampling import SamplingParams

# (rows, width, k): gpt-oss's 32 experts choosing 4, a width not a power of two, k = 1 and the whole row
CASES = [(5, 32, 4), (3, 20, 3), (2, 8, 1), (2, 8, 8), (4, 128, 8)]


def rows(m: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(m * n)
    x = rng.standard_normal((m, n)).astype(np.float32)
    x[0, ::3] = x[0, 1]  # ties: the lower index first
    if m > 1:
        x[1, : n // 2] = -np.inf  # -inf among the best k when k > n / 2, chosen in index order
    if m > 2:
        x[2] = 0.5  # a row of one value
    return x


def check(m: int, n: int, k: int, interpret: bool) -> None:
    x = rows(m, n)
    values, indices = jax.jit(kernel.top_k, static_argnums=1, static_argnames="interpret")(x, k, interpret=interpret)
    want_values, want_indices = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    assert indices.dtype == jnp.int32 and values.dtype == jnp.float32


@pytest.mark.parametrize(("m", "n", "k"), CASES, ids=lambda v: str(v))
def test_top_k_in_interpret_mode_is_lax_top_k(m, n, k):
    check(m, n, k, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "n", "k"), CASES, ids=lambda v: str(v))
def test_top_k_compiled_is_lax_top_k(m, n, k):
    if jax.default_backend() != "gpu":
        pytest.fail("gpu-marked tests need a GPU visible to JAX (run them with `just test-gpu`)")
    check(m, n, k, interpret=False)


def test_a_k_outside_the_row_is_refused():
    with pytest.raises(ValueError, match="k = 5 of rows of 4"):
        kernel.top_k(jnp.zeros((1, 4)), 5)


def test_gpt_oss_routes_through_the_kernel_with_the_same_bits(oracles, monkeypatch):
    """The kernel on the interpret backend (WORKER_TOPK_KERNEL=1 there; the gpu backend's default): every MoE
    layer's routing takes the kernel, and a greedy generation's ids and log-probabilities are those of lax.top_k."""
    d = oracles / "models" / "gpt-oss"
    ids = manifest(d)["input"]["ids"]

    def generate(on: bool):
        monkeypatch.setattr(ops, "_topk_kernel", {"gpu": on, "interpret": on})
        calls, real = [], kernel.top_k
        monkeypatch.setattr(kernel, "top_k", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
        m = worker.load(d / "model-mxfp4_moe.gguf", device="cpu", backend="interpret", slots=256, max_batch=2)
        logprobs: list = []
        out = list(m.generate_ids(ids, 4, SamplingParams(logprobs=True), stop_at_eos=False, logprobs=logprobs))
        assert bool(calls) == on and all(k == m.cfg.n_experts_used for k in calls), calls
        return out, logprobs

    assert generate(True) == generate(False)
