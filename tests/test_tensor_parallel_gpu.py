"""Tensor parallelism on several GPUs of one host (run with `just test-gpu` on a machine with 2 or more GPUs; they
skip, saying why, on fewer). The split model runs the jax.numpy ops (the Pallas kernels are not wrapped in shard_map
yet: docs/tensor-parallel.md), partitioned by XLA's SPMD partitioner, with collectives over NCCL.

Gates: the GPU's (tests/test_gpu.py): argmax equal to the float64 oracle where its top-2 margin exceeds 0.05; and
the split model against the same model on one GPU with the same ops: the float16 KV cache rounds k and v that
differ by float32 rounding (a sum split over devices adds in another order), so the logits may move by an f16 ulp
of a cached value, far below 1e-3 relative."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from model_oracles import manifest, rel_err

import worker

pytestmark = pytest.mark.gpu
MARGIN, SAME_OPS = 0.05, 1e-3
VARIANTS = {"llama": "q8_0", "gpt-oss": "mxfp4_moe", "phi3": "q8_0"}


def gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


def splits() -> list[int]:
    return [n for n in (2, 4) if n <= gpu_count()]


@pytest.fixture(autouse=True)
def _needs_gpus():
    if gpu_count() < 2:
        pytest.skip(f"tensor parallelism needs 2 or more GPUs; JAX sees {gpu_count()}")


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_split_logits_on_gpus_match_one_gpu_and_the_oracle(oracles, arch):
    d = oracles / "models" / arch
    path, ids = d / f"model-{VARIANTS[arch]}.gguf", manifest(d)["input"]["ids"]
    ref = np.load(d / f"logits-hf-f64-{VARIANTS[arch]}-dequant.npy")
    one = worker.load(path, device="gpu", backend="cpu").logits(ids)  # the same (jax.numpy) ops on one GPU
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > MARGIN
    for n in splits():
        m = worker.load(path, device="gpu", tensor_parallel=n)
        assert m.resident() and len({d.id for d in m.devices}) == n
        assert all(d["bytes_limit"] and d["resident"] for d in m.device_report())
        split = m.logits(ids)
        print(
            f"{arch} N={n}: relative error {rel_err(split, ref):.2e} to the oracle, {rel_err(split, one):.2e} to 1 GPU"
        )
        assert rel_err(split, one.astype(np.float64)) <= SAME_OPS
        assert np.nonzero(clear & (split.argmax(-1) != ref.argmax(-1)))[0].tolist() == []


@pytest.mark.parametrize("arch", ["llama", "gpt-oss"])
def test_seeded_generation_on_gpus_equals_one_gpu(oracles, arch):
    d = oracles / "models" / arch
    path, ids = d / f"model-{VARIANTS[arch]}.gguf", manifest(d)["input"]["ids"]

    def runs(m):
        greedy = m.generate(ids, max_tokens=16, stop_at_eos=False)
        return greedy, m.generate(ids, max_tokens=16, temperature=0.9, seed=3, top_p=0.95, stop_at_eos=False)

    expected = runs(worker.load(path, device="gpu", backend="cpu"))
    for n in splits():
        assert runs(worker.load(path, device="gpu", tensor_parallel=n)) == expected, n
