"""gpt2 and gpt-oss forward passes against HF transformers in float64 on the exactly dequantized weights
(../shared/oracles/models/{gpt2,gpt-oss}/logits-hf-f64-<variant>-dequant.npy). The 48 input ids are longer
than gpt-oss's 16-token window, so the sliding layers are exercised."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from model_oracles import check_logits, manifest, rel_err

import worker
from worker.quant import QuantArray

CASES = [
    ("gpt2", "q8_0"),
    ("gpt2", "q4_k_m"),
    ("gpt-oss", "q8_0"),
    ("gpt-oss", "q4_k_m"),
    ("gpt-oss", "mxfp4_moe"),
]
# The gate (oracle README): exact dequantization and float32 arithmetic land ~1e-6 from it.
TOL, MARGIN = 1e-3, 0.01


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_logits_match_hf_f64(oracles, arch, variant):
    d = oracles / "models" / arch
    ids = manifest(d)["input"]["ids"]
    m = worker.load(d / f"model-{variant}.gguf", device="cpu")
    ref = np.load(d / f"logits-hf-f64-{variant}-dequant.npy")
    _, compared = check_logits(m.logits(ids), ref, TOL, MARGIN)
    assert compared > len(ids) // 2


@pytest.mark.parametrize(("arch", "variant"), [("gpt2", "q8_0"), ("gpt-oss", "q8_0")])
def test_conventions_are_hf_not_llamacpp(oracles, arch, variant):
    """llama.cpp's conventions (fp16 GELU table; YaRN correction range rounded) move the logits by 4e-4 (gpt2)
    and 2e-3 (gpt-oss) on the same weights: we must be much closer to HF than llama.cpp is."""
    d = oracles / "models" / arch
    m = worker.load(d / f"model-{variant}.gguf", device="cpu")
    hf = np.load(d / f"logits-hf-f64-{variant}-dequant.npy")
    llamacpp = np.load(d / f"logits-llamacpp-{variant}-dequant-f32.npy")
    ours = m.logits(manifest(d)["input"]["ids"])
    assert rel_err(ours, hf) < rel_err(llamacpp, hf) / 20


def test_mxfp4_experts_stay_mxfp4(oracles):
    m = worker.load(oracles / "models" / "gpt-oss" / "model-mxfp4_moe.gguf", device="cpu")
    assert m.quant_kind == "MXFP4"
    for layer in m.runner.weights["layers"]:
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            w = layer[name]
            assert isinstance(w, QuantArray) and w.qtype == QT.MXFP4
            assert {p.dtype for p in w.planes.values()} == {np.dtype(np.uint8)}


DECODE_CASES = [("gpt-oss", "mxfp4_moe"), ("gpt-oss", "q4_k_m"), ("gpt2", "q8_0")]


@pytest.mark.parametrize(("arch", "variant"), DECODE_CASES)
def test_incremental_decode_equals_full_forward(oracles, arch, variant):
    """Prefill + cached one-token decode (gpt-oss: sinks, the 16-token window, the few-experts MoE path) gives
    the greedy path of re-running the whole prefix."""
    d = oracles / "models" / arch
    m = worker.load(d / f"model-{variant}.gguf", device="cpu")
    ids = manifest(d)["input"]["ids"]
    out = m.generate(ids, max_tokens=16, stop_at_eos=False)
    assert len(out) == 16
    full = m.logits(ids + out[:-1])
    assert full[len(ids) - 1 :].argmax(-1).tolist() == out


def test_fused_gate_up_experts_match_the_reference(oracles, tmp_path):
    """The same model with each layer's gate and up experts fused into llama.cpp's merged ffn_gate_up_exps
    ([gate | up] rows per expert) loads and gives the reference logits."""
    d = oracles / "models" / "gpt-oss"
    fused = _fuse_gate_up(d / "model-mxfp4_moe.gguf", tmp_path / "fused.gguf")
    m = worker.load(fused, device="cpu")
    assert m.cfg.fused_gate_up
    assert m.runner.weights["layers"][0]["ffn_gate_up_exps"].qtype == QT.MXFP4
    ref = np.load(d / "logits-hf-f64-mxfp4_moe-dequant.npy")
    check_logits(m.logits(manifest(d)["input"]["ids"]), ref, TOL, MARGIN)


def test_config_exposes_what_the_cache_needs(oracles):
    m = worker.load(oracles / "models" / "gpt-oss" / "model-q8_0.gguf", device="cpu")
    c = m.cfg
    assert (c.n_layers, c.n_kv_heads, c.head_dim, c.vocab_size, c.context_length) == (2, 2, 64, 1024, 512)
    assert (c.n_experts, c.n_experts_used, c.sliding_window) == (4, 2, 16)
    assert [c.window(i) for i in range(2)] == [16, None]  # sliding, then full (llama.cpp's fixed alternation)


def _fuse_gate_up(src: Path, dst: Path) -> Path:
    """A copy of `src` with blk.N.ffn_gate_exps / ffn_up_exps (weights and biases) replaced by
    ffn_gate_up_exps: raw blocks concatenated along the output rows, so no value changes."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.alignment"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    tensors = {t.name: t for t in reader.tensors}
    for name, t in tensors.items():
        if ".ffn_up_exps." in name:
            continue
        if ".ffn_gate_exps." in name:
            up = tensors[name.replace("ffn_gate_exps", "ffn_up_exps")]
            data = np.concatenate([np.asarray(t.data), np.asarray(up.data)], axis=1)
            fused = name.replace("ffn_gate_exps", "ffn_gate_up_exps")
            writer.add_tensor(fused, data, raw_dtype=t.tensor_type)
        else:
            writer.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
