"""Llama-family forward passes (llama, qwen2, phi3, gemma3) against HF transformers in float64 on the exactly
dequantized weights (../shared/oracles/models/<arch>/logits-hf-f64-<variant>-dequant.npy)."""

from __future__ import annotations

import numpy as np
import pytest
from model_oracles import check_logits, manifest, write_f32_copy

import worker

ARCHS = ["llama", "qwen2", "phi3", "gemma3"]
VARIANTS = ["q8_0", "q4_k_m"]
# The gate (oracle README): an engine that dequantizes exactly and computes in float32 lands ~1e-6 from it.
TOL, MARGIN = 1e-3, 0.01


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_hf_f64(oracles, arch, variant):
    d = oracles / "models" / arch
    ids = manifest(d)["input"]["ids"]
    m = worker.load(d / f"model-{variant}.gguf", device="cpu")
    ref = np.load(d / f"logits-hf-f64-{variant}-dequant.npy")
    err, compared = check_logits(m.logits(ids), ref, TOL, MARGIN)
    assert compared > len(ids) // 2


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_copy_matches_q8_0_reference(oracles, arch, tmp_path):
    d = oracles / "models" / arch
    f32 = write_f32_copy(d / "model-q8_0.gguf", tmp_path / "model-f32.gguf")
    m = worker.load(f32, device="cpu")
    assert m.quant_kind == "F32"
    check_logits(m.logits(manifest(d)["input"]["ids"]), np.load(d / "logits-hf-f64-q8_0-dequant.npy"), TOL, MARGIN)


def test_incremental_decode_equals_full_forward(oracles):
    """Prefill + cached decode gives the same greedy path as re-running the full prefix (the cache is right)."""
    d = oracles / "models" / "gemma3"  # sliding window 32 < 48 + 16: the window path is exercised too
    m = worker.load(d / "model-q8_0.gguf", device="cpu")
    ids = manifest(d)["input"]["ids"]
    out = m.generate(ids, max_tokens=20, stop_at_eos=False)
    full = m.logits(ids + out[:-1])
    assert full[len(ids) - 1 :].argmax(-1).tolist() == out


def test_generation_is_deterministic(oracles):
    d = oracles / "models" / "qwen2"
    m = worker.load(d / "model-q4_k_m.gguf", device="cpu")
    ids = manifest(d)["input"]["ids"]
    assert m.generate(ids, max_tokens=12, stop_at_eos=False) == m.generate(ids, max_tokens=12, stop_at_eos=False)
