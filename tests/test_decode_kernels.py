"""The tensor-core decode kernels at the model level, in Pallas interpret mode on the CPU: a batch-invariant model
whose --max-batch is above 8 decodes every call with qmatvec's 64-row dot and (gpt-oss) the grouped MoE matmul
(model.decode_kernels_for), and its teacher-forced greedy decode agrees with the float64 HF oracle wherever the
oracle's margin is clear. (The per-row kernels, at --max-batch <= 8, are what the other interpret-mode model tests
run.)"""

from __future__ import annotations

import numpy as np
import pytest
from model_oracles import manifest, teacher_forced_decode

import worker
from worker.pallas_kernels import moe_matmul as mm
from worker.pallas_kernels import qmatvec as qmv

CASES = [("qwen2", "model-q8_0.gguf", "logits-hf-f64-q8_0-dequant.npy"),
         ("gpt-oss", "model-mxfp4_moe.gguf", "logits-hf-f64-mxfp4_moe-dequant.npy")]  # fmt: skip


@pytest.mark.parametrize(("arch", "file", "logits"), CASES, ids=[c[0] for c in CASES])
def test_tensor_core_decode_matches_the_oracle(oracles, monkeypatch, arch, file, logits):
    flags, moe = [], []
    dense, grouped = qmv.qmatvec, mm.moe_matmul

    def spy_dense(*args, **kwargs):
        flags.append((args[1].shape, kwargs.get("tensor_cores")))
        return dense(*args, **kwargs)

    def spy_grouped(*args, **kwargs):
        moe.append(args[0].shape[0])  # tokens of the call
        return grouped(*args, **kwargs)

    monkeypatch.setattr(qmv, "qmatvec", spy_dense)
    monkeypatch.setattr(mm, "moe_matmul", spy_grouped)
    d = oracles / "models" / arch
    m = worker.load(d / file, device="cpu", backend="interpret", max_batch=16)
    assert m.cfg.decode_kernels == "tensor-cores"
    ids = manifest(d)["input"]["ids"]
    ref = np.load(d / logits)
    decoded = teacher_forced_decode(m, ids)
    # Every dense call, prefill and decode, took the dot; the MoE router (`exact`, [experts, D]) the per-row kernel.
    router = (m.cfg.n_experts, m.cfg.d_model) if arch == "gpt-oss" else None
    assert flags and all(dot != (shape == router) for shape, dot in flags), set(flags)
    if arch == "gpt-oss":
        assert m.runner.min_rows in moe  # decode's rows went to the grouped matmul
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.sum() > len(ids) // 2
    assert (decoded == ref.argmax(-1))[clear].all()
