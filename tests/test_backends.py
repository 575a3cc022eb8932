"""The ops backend is carried by each model's config, not by process state: two models loaded on two backends in one
process each trace to their own implementation and each match their own float64 HF oracle."""

from __future__ import annotations

import numpy as np
import pytest
from model_oracles import check_logits, manifest

import worker
from worker.pallas_kernels import prefill_attention

TOL, MARGIN = 1e-3, 0.01  # the CPU gate (tests/test_models_llama.py): the interpret backend keeps a float32 cache


def test_two_models_on_two_backends_in_one_process(oracles, monkeypatch):
    calls = []
    real = prefill_attention.prefill_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prefill_attention, "prefill_attention", counted)
    qwen, gemma = oracles / "models" / "qwen2", oracles / "models" / "gemma3"
    on_cpu = worker.load(qwen / "model-q8_0.gguf", device="cpu")
    on_kernels = worker.load(gemma / "model-q8_0.gguf", device="cpu", backend="interpret")
    assert (on_cpu.cfg.backend, on_kernels.cfg.backend) == ("cpu", "interpret")

    # The CPU model compiles after the interpret one was loaded: a process-wide backend would send it to the kernels.
    cpu_logits = on_cpu.logits(manifest(qwen)["input"]["ids"])
    assert calls == []
    kernel_logits = on_kernels.logits(manifest(gemma)["input"]["ids"])
    assert len(calls) == on_kernels.cfg.n_layers
    check_logits(cpu_logits, np.load(qwen / "logits-hf-f64-q8_0-dequant.npy"), TOL, MARGIN)
    check_logits(kernel_logits, np.load(gemma / "logits-hf-f64-q8_0-dequant.npy"), TOL, MARGIN)


def test_an_unknown_backend_is_refused(oracles):
    with pytest.raises(ValueError, match="unknown ops backend 'tpu'"):
        worker.load(oracles / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", backend="tpu")


@pytest.mark.gpu
def test_a_gpu_model_and_a_cpu_model_in_one_process(oracles):
    """On the GPU machine: the same file on the GPU (backend gpu: the kernels, float16 cache) and on the CPU (exact
    float32), loaded GPU first; each at its own gate (the CPU's 1e-3, the GPU's clear-argmax of test_gpu.py)."""
    d = oracles / "models" / "qwen2"
    ids = manifest(d)["input"]["ids"]
    ref = np.load(d / "logits-hf-f64-q8_0-dequant.npy")
    on_gpu = worker.load(d / "model-q8_0.gguf", device="gpu")
    on_cpu = worker.load(d / "model-q8_0.gguf", device="cpu")
    assert (on_gpu.cfg.backend, on_cpu.cfg.backend) == ("gpu", "cpu")
    cpu_logits, gpu_logits = on_cpu.logits(ids), on_gpu.logits(ids)
    check_logits(cpu_logits, ref, TOL, MARGIN)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.05
    assert (gpu_logits.argmax(-1) == ref.argmax(-1))[clear].all()
    assert not np.array_equal(cpu_logits, gpu_logits)  # the GPU path really ran (bf16 prefill operands)
