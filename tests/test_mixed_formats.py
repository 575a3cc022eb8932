"""A gpt-oss file as llama.cpp's Q4_K_M writes one when expert rows are not a multiple of 256 (Q5_0 and Q8_0
experts beside Q4_K / Q6_K tensors; tests/data/mixed_gpt_oss) against HF transformers in float64 on its exactly
dequantized weights: the prefill path (all positions in one call) and the decode path (one token per call,
teacher-forced, so every position's prediction goes through the decode matvecs, the routed-expert matvec and the
decode attention). On the CPU at the oracle gate; `gpu`-marked on the GPU at the GPU gate."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from model_oracles import check_logits, rel_err, teacher_forced_decode

import worker

DATA = Path(__file__).parent / "data" / "mixed_gpt_oss"
VARIANTS = ("ff128", "d128")  # expert rows of 128; every row 128 long (d_model 128, head_dim 32)
# The CPU path is exact dequantization and float32 math (oracle README gate); the GPU's bf16 prefill operands and
# f16 cache put it near 1e-2, so there the gate is argmax where the reference's top-2 margin exceeds 0.05 and every
# layer's routing is clear: where the router's k-th and (k+1)-th logits are nearly tied (d128: 0.003 at position
# 13 of layer 0), rounding upstream picks the other expert and that position's logits move by ~1x (measured on
# an H200: 1.8e-1 relative over the whole d128 prefill, from 3 such positions; ~1e-2 at the others).
CPU_TOL, CPU_MARGIN, GPU_MARGIN, ROUTER_GAP = 1e-3, 0.01, 0.05, 0.01


def oracle(variant: str) -> tuple[Path, list[int], np.ndarray]:
    d = DATA / variant
    return (
        d / "model-q4_k_m-mixed.gguf",
        json.loads((d / "manifest.json").read_text())["input"]["ids"],
        np.load(d / "logits-hf-f64.npy"),
    )


def clear_positions(ref: np.ndarray, margin: float) -> np.ndarray:
    top2 = np.sort(ref, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > margin


def test_files_have_the_mixed_layouts():
    from worker.gguf import open_gguf

    ff128 = {n: t.qtype.name for n, t in open_gguf(oracle("ff128")[0]).tensors.items()}
    assert ff128["blk.0.ffn_down_exps.weight"] == "Q5_0" and ff128["blk.1.ffn_down_exps.weight"] == "Q8_0"
    assert ff128["blk.0.ffn_gate_exps.weight"] == "Q4_K" and ff128["output.weight"] == "Q6_K"
    d128 = {t.qtype.name for t in open_gguf(oracle("d128")[0]).tensors.values()}
    assert d128 == {"F32", "Q5_0", "Q8_0"}  # no row is a multiple of 256: every K-quant fell back


@pytest.mark.parametrize("variant", VARIANTS)
def test_cpu_prefill_and_decode_match_hf_f64(variant):
    path, ids, ref = oracle(variant)
    m = worker.load(path, device="cpu")
    check_logits(m.logits(ids), ref, CPU_TOL, CPU_MARGIN)
    clear = clear_positions(ref, CPU_MARGIN)
    assert (teacher_forced_decode(m, ids) == ref.argmax(-1))[clear].all()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_prefill_and_decode_match_hf_f64(variant):
    if jax.default_backend() != "gpu":
        pytest.fail("gpu-marked tests need a GPU visible to JAX (run them with `just test-gpu`)")
    path, ids, ref = oracle(variant)
    m = worker.load(path, device="gpu")
    ours = m.logits(ids)
    routed = np.load(DATA / variant / "router-gaps-hf-f64.npy").min(axis=0) > ROUTER_GAP
    clear = clear_positions(ref, GPU_MARGIN) & routed
    print(f"mixed gpt-oss {variant} on GPU: prefill relative error {rel_err(ours, ref):.2e}, {clear.sum()} clear")
    assert np.isfinite(ours).all() and clear.sum() > len(ids) // 2
    assert np.nonzero(clear & (ours.argmax(-1) != ref.argmax(-1)))[0].tolist() == []
    decoded = teacher_forced_decode(m, ids)
    assert np.nonzero(clear & (decoded != ref.argmax(-1)))[0].tolist() == []


# The low-bit formats of llama.cpp's Q2_K, Q3_K_* and IQ4_XS files (Q2_K, Q3_K, IQ4_XS, IQ4_NL) in a tiny qwen2
# (tests/data/mixed_low_bit): no oracle model holds them, so random blocks and HF transformers in float64 on their
# exact dequantization. On the CPU both backends: XLA's (the CPU layout) and the Pallas kernels in interpret mode
# (the GPU's kernels, computed on the CPU).
LOW_BIT = Path(__file__).parent / "data" / "mixed_low_bit"


def low_bit_oracle() -> tuple[Path, list[int], np.ndarray]:
    manifest = json.loads((LOW_BIT / "manifest.json").read_text())
    return LOW_BIT / "model-q3_k_m-mixed.gguf", manifest["input"]["ids"], np.load(LOW_BIT / "logits-hf-f64.npy")


def test_low_bit_file_has_every_new_format_fused_and_alone():
    from worker.gguf import open_gguf

    types = {n: t.qtype.name for n, t in open_gguf(low_bit_oracle()[0]).tensors.items()}
    assert {types[f"blk.0.attn_{p}.weight"] for p in "qkv"} == {"Q3_K"}  # one format: fused into q|k|v
    assert {types[f"blk.1.attn_{p}.weight"] for p in "qkv"} == {"IQ4_XS", "Q2_K", "IQ4_NL"}
    assert types["token_embd.weight"] == "IQ4_XS" and "output.weight" not in types  # tied: the head too
    assert {"Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"} <= set(types.values())


@pytest.mark.parametrize("backend", ["cpu", "interpret"])
def test_low_bit_formats_on_the_cpu_match_hf_f64(backend):
    path, ids, ref = low_bit_oracle()
    m = worker.load(path, device="cpu", backend=backend)
    check_logits(m.logits(ids), ref, CPU_TOL, CPU_MARGIN)
    clear = clear_positions(ref, CPU_MARGIN)
    assert (teacher_forced_decode(m, ids) == ref.argmax(-1))[clear].all()


@pytest.mark.gpu
def test_low_bit_formats_on_the_gpu_match_hf_f64():
    if jax.default_backend() != "gpu":
        pytest.fail("gpu-marked tests need a GPU visible to JAX (run them with `just test-gpu`)")
    path, ids, ref = low_bit_oracle()
    m = worker.load(path, device="gpu")
    ours = m.logits(ids)
    clear = clear_positions(ref, GPU_MARGIN)
    print(f"low-bit qwen2 on GPU: prefill relative error {rel_err(ours, ref):.2e}, {clear.sum()} clear")
    assert np.isfinite(ours).all() and clear.sum() > len(ids) // 2
    assert np.nonzero(clear & (ours.argmax(-1) != ref.argmax(-1)))[0].tolist() == []
    decoded = teacher_forced_decode(m, ids)
    assert np.nonzero(clear & (decoded != ref.argmax(-1)))[0].tolist() == []
