"""The tensor-core decode kernels at the model level, in Pallas interpret mode on the CPU: a batch-invariant model
whose --max-batch is above 8 decodes every call with qmatvec's 64-row dot and (gpt-oss) the grouped MoE matmul
(model.decode_kernels_for), and its teacher-forced greedy decode agrees with the float64 HF oracle wherever the
oracle's margin is clear. (The per-row kernels, at --max-batch <= 8, are what the other interpret-mode model tests
run.)"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from model_oracles import manifest, teacher_forced_decode
from test_pallas_qmatvec import random_weight

import worker
from worker import device as devices
from worker import ops
from worker.errors import ErrorCode, WorkerError
from worker.gguf import open_gguf
from worker.pallas_kernels import moe_matmul as mm
from worker.pallas_kernels import qmatvec as qmv

# (arch, file, HF logits, the experts' bf16 copy for decode: worker/model.py with_bf16_experts, on by default on a GPU;
# decode's dots swapped: WORKER_TC_SWAP, qmatvec.Plan.swap and moe_matmul.Plan.swap)
CASES = [("qwen2", "model-q8_0.gguf", "logits-hf-f64-q8_0-dequant.npy", False, False),
         ("gpt-oss", "model-mxfp4_moe.gguf", "logits-hf-f64-mxfp4_moe-dequant.npy", False, False),
         ("gpt-oss", "model-mxfp4_moe.gguf", "logits-hf-f64-mxfp4_moe-dequant.npy", True, False),
         ("qwen2", "model-q8_0.gguf", "logits-hf-f64-q8_0-dequant.npy", False, True),
         ("gpt-oss", "model-mxfp4_moe.gguf", "logits-hf-f64-mxfp4_moe-dequant.npy", True, True),
         ("gpt-oss", "model-mxfp4_moe.gguf", "logits-hf-f64-mxfp4_moe-dequant.npy", False, True)]  # fmt: skip


@pytest.mark.parametrize(("arch", "file", "logits", "copy", "swap"), CASES,
                         ids=[c[0] + ("-bf16-experts" if c[3] else "") + ("-swapped" if c[4] else "")
                              for c in CASES])  # fmt: skip
def test_tensor_core_decode_matches_the_oracle(oracles, monkeypatch, arch, file, logits, copy, swap):
    flags, moe = [], []
    dense, grouped = qmv.qmatvec, mm.moe_matmul

    def spy_dense(*args, **kwargs):
        flags.append((args[1].shape, kwargs.get("tensor_cores"), kwargs.get("swap", False)))
        return dense(*args, **kwargs)

    def spy_grouped(*args, **kwargs):
        moe.append((args[0].shape[0], args[1].qtype, kwargs.get("swap", False)))  # tokens, the experts' format
        return grouped(*args, **kwargs)

    monkeypatch.setattr(qmv, "qmatvec", spy_dense)
    monkeypatch.setattr(mm, "moe_matmul", spy_grouped)
    monkeypatch.setattr(ops, "_tc_swap", ops._swap_formats("1" if swap else "0"))
    d = oracles / "models" / arch
    m = worker.load(d / file, device="cpu", backend="interpret", max_batch=16, bf16_experts=copy or None)
    assert m.cfg.decode_kernels == "tensor-cores" and m.bf16_experts == copy
    ids = manifest(d)["input"]["ids"]
    ref = np.load(d / logits)
    decoded = teacher_forced_decode(m, ids)
    # Every dense call, prefill and decode, took the dot; the MoE router (`exact`, [experts, D]) the per-row kernel.
    # Swapped: decode's dots (the calls of min_rows rows), not prefill's.
    router = (m.cfg.n_experts, m.cfg.d_model) if arch == "gpt-oss" else None
    assert flags and all(dot != (shape == router) for shape, dot, _ in flags), set(flags)
    assert any(swapped for *_, swapped in flags) == swap
    if arch == "gpt-oss":  # decode's rows went to the grouped matmul, on the bf16 copy where there is one
        assert (m.runner.min_rows, QT.BF16 if copy else QT.MXFP4, swap) in moe
        assert all(fmt == QT.MXFP4 and not swapped for rows, fmt, swapped in moe if rows != m.runner.min_rows)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.sum() > len(ids) // 2
    assert (decoded == ref.argmax(-1))[clear].all()


def test_bf16_experts_are_refused_where_nothing_would_read_them(oracles):
    gpt_oss, qwen2 = oracles / "models/gpt-oss/model-mxfp4_moe.gguf", oracles / "models/qwen2/model-q8_0.gguf"
    for path, backend in ((gpt_oss, "cpu"), (qwen2, "interpret")):  # the CPU path; a file without experts
        with pytest.raises(WorkerError, match="bf16 experts") as err:
            worker.load(path, device="cpu", backend=backend, max_batch=16, bf16_experts=True)
        assert err.value.code == ErrorCode.INVALID_REQUEST
    assert not worker.load(gpt_oss, device="cpu", backend="interpret", max_batch=16).bf16_experts  # auto: GPU only


def test_bf16_experts_by_default_only_unswapped_and_where_the_copy_fits(oracles, monkeypatch):
    """The default on a GPU (the gpu backend, loaded here on the CPU device): none while the experts' decode dot is
    swapped (the default: the stored experts are the faster read); unswapped, the copy where the pre-flight check
    passes with it, none where only the stored weights fit; asked for, a copy that does not fit is refused."""
    path = oracles / "models/gpt-oss/model-mxfp4_moe.gguf"
    assert not worker.load(path, device="cpu", backend="gpu", max_batch=16).bf16_experts
    monkeypatch.setattr(ops, "_tc_swap", ops._swap_formats("q8_0"))  # WORKER_TC_SWAP=q8_0: MXFP4 unswapped
    assert worker.load(path, device="cpu", backend="gpu", max_batch=16).bf16_experts
    # Without determinism the steps of more than 8 rows take the grouped kernel, which reads the copy; at most 8
    # rows, or on the per-row kernels, no step does.
    assert worker.load(path, device="cpu", backend="gpu", max_batch=16, deterministic=False).bf16_experts
    assert not worker.load(path, device="cpu", backend="gpu", max_batch=8, deterministic=False).bf16_experts
    assert not worker.load(path, device="cpu", backend="gpu", max_batch=8).bf16_experts
    stored = open_gguf(path).tensor_bytes

    def tight(need, device, model_path):  # a device with room for the stored weights and little more
        if need.weights > 2 * stored:
            raise WorkerError(ErrorCode.INSUFFICIENT_VRAM, "too big")

    monkeypatch.setattr(devices, "check_fits", tight)
    assert not worker.load(path, device="cpu", backend="gpu", max_batch=16).bf16_experts
    with pytest.raises(WorkerError) as err:
        worker.load(path, device="cpu", backend="gpu", max_batch=16, bf16_experts=True)
    assert err.value.code == ErrorCode.INSUFFICIENT_VRAM


def test_the_swap_is_chosen_by_each_weights_format(monkeypatch):
    """WORKER_TC_SWAP: "1" (the default) every format, "0" none, else the formats it names, in any case; a name
    that is not a GGML format is refused with the variable's name. A decode call on the tensor cores swaps where its
    weight's format is among them, so a row's kernel is the same whatever the batch."""
    assert ops._swap_formats("1") == frozenset(QT) and ops._swap_formats("0") == frozenset()
    assert ops._swap_formats("q8_0, MXFP4,") == {QT.Q8_0, QT.MXFP4}
    with pytest.raises(ValueError, match="WORKER_TC_SWAP: 'Q9_0' is not 0, 1 or"):
        ops._swap_formats("q8_0,q9_0")
    seen = []
    real = qmv.qmatvec
    monkeypatch.setattr(qmv, "qmatvec", lambda x, w, **k: (seen.append((w.qtype, k.get("swap"))), real(x, w, **k))[1])
    monkeypatch.setattr(ops, "_tc_swap", ops._swap_formats("q8_0"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 256)), jnp.float32)
    with ops.decode_kernels("tensor-cores"):
        for seed, qtype in enumerate((QT.Q8_0, QT.Q4_K)):
            ops.qmatmul(x, random_weight(qtype, (32, 256), seed)[0], backend="interpret")
    assert seen == [(QT.Q8_0, True), (QT.Q4_K, False)]


def test_an_integer_setting_is_refused_with_its_name_unless_an_integer_at_least_its_minimum(monkeypatch):
    """ops.env_int (WORKER_MOE_DECODE_SPLITS, WORKER_MOE_SORTED_PAIRS, WORKER_PREFILL_GROUP_TOKENS): unset or empty
    is the default; a word, a sign or a number below the minimum is refused naming the variable, not int()'s message."""
    monkeypatch.delenv("WORKER_TEST_N", raising=False)
    assert ops.env_int("WORKER_TEST_N", 2, minimum=1) == 2
    monkeypatch.setenv("WORKER_TEST_N", " ")
    assert ops.env_int("WORKER_TEST_N", 2, minimum=1) == 2
    monkeypatch.setenv("WORKER_TEST_N", "4")
    assert ops.env_int("WORKER_TEST_N", 2, minimum=1) == 4
    for bad in ("abc", "0", "-1", "2.5"):
        monkeypatch.setenv("WORKER_TEST_N", bad)
        with pytest.raises(ValueError, match=rf"^WORKER_TEST_N='{re.escape(bad)}': must be an integer, at least 1$"):
            ops.env_int("WORKER_TEST_N", 2, minimum=1)


def test_the_swapped_dots_pipeline_depth_is_chosen_by_its_row_tile(monkeypatch):
    """WORKER_SWAP_STAGES: "TILE:STAGES,..." (a malformed item refused with the variable's name); a swapped call
    takes its row tile's depth (qmatvec.swap_row_tile: 2 rows -> 16, 40 -> 64), the tile's default where not named,
    and an unswapped call never one."""
    assert ops._stages_by_tile("") == {} and ops._stages_by_tile("16:3, 32:2,") == {16: 3, 32: 2}
    for bad in ("16", "16:0", "a:3", "16:3:1"):
        with pytest.raises(ValueError, match="WORKER_SWAP_STAGES: .* is not ROW_TILE:STAGES"):
            ops._stages_by_tile(bad)
    seen = []
    real = qmv.qmatvec
    monkeypatch.setattr(qmv, "qmatvec", lambda x, w, **k: (seen.append((k.get("swap"), k.get("num_stages"))),
                                                            real(x, w, **k))[1])  # fmt: skip
    monkeypatch.setattr(ops, "_swap_stages", ops._stages_by_tile("16:3"))
    w = random_weight(QT.Q8_0, (32, 256), 0)[0]
    with ops.decode_kernels("tensor-cores"):
        for swap, rows in ((True, 2), (True, 40), (False, 2)):
            monkeypatch.setattr(ops, "_tc_swap", ops._swap_formats("1" if swap else "0"))
            ops.qmatmul(jnp.ones((rows, 256), jnp.float32), w, backend="interpret")
    assert seen == [(True, 3), (True, None), (False, None)]
    assert [qmv.swap_row_tile(r) for r in (1, 2, 16, 17, 40, 64, 1024)] == [16, 16, 16, 32, 64, 64, 64]
