"""Projections fused at load on the kernel backends (models/base.py FUSIONS): q|k|v into attn_qkv (else q|k into
attn_qk), gate|up into ffn_up and a mixture's experts' gate|up into ffn_gate_up_exps where a layer's parts share one
format, each part's rows exactly the file's, and the forward on either layout at the float64 oracle's gate (the
interpret backend: the kernels, run on this CPU); the experts' fused layout gives their parts' bits."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
from model_oracles import check_logits, manifest, teacher_forced_decode
from test_mixed_formats import oracle as mixed_oracle

import worker
from worker.gguf import open_gguf
from worker.models import base, gpt_oss, llama
from worker.quant import QuantArray, dequantize

TOL, MARGIN = 1e-3, 0.01  # test_models_llama.py's gate, which the interpret backend meets (test_backends.py)


def on_kernels(path):
    return worker.load(path, device="cpu", backend="interpret")


def layers(m) -> list[dict]:
    return m.runner.weights["layers"]


def test_a_layer_of_one_format_holds_the_fused_projections(oracles):
    d = oracles / "models" / "qwen2"
    cfg = llama.config(open_gguf(d / "model-q8_0.gguf"))
    q, kv, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    for lw in layers(on_kernels(d / "model-q8_0.gguf")):
        assert not {"attn_q", "attn_k", "attn_v", "attn_q_b", "ffn_gate"} & set(lw)
        assert lw["attn_qkv"].shape == (q + 2 * kv, cfg.d_model) and lw["attn_qkv_b"].shape == (q + 2 * kv,)
        assert lw["ffn_up"].shape == (2 * f, cfg.d_model)


@pytest.mark.parametrize("path", ["qwen2 q4_k_m", "mixed_gpt_oss d128"])
def test_a_layer_of_mixed_formats_fuses_what_agrees(oracles, path):
    """Layer 1 of both files has a v of another format than q and k (Q6_K beside Q4_K; Q8_0 beside Q5_0): q|k fuse
    (with their biases), v keeps its own."""
    name, variant = path.split()
    file = mixed_oracle(variant)[0] if name == "mixed_gpt_oss" else oracles / "models" / name / f"model-{variant}.gguf"
    first, second = layers(on_kernels(file))
    assert "attn_qkv" in first and "attn_qkv_b" in first and not {"attn_q", "attn_qk"} & set(first)
    assert {"attn_qk", "attn_qk_b", "attn_v", "attn_v_b"} <= set(second)
    assert not {"attn_qkv", "attn_q", "attn_k", "attn_q_b", "attn_k_b"} & set(second)
    assert second["attn_qk"].qtype != second["attn_v"].qtype


@pytest.mark.parametrize("arch,variant", [("qwen2", "q4_k_m"), ("gemma3", "q8_0"), ("gpt-oss", "mxfp4_moe")])
def test_fused_rows_are_the_files_parts(oracles, arch, variant):
    """Each fused matrix, dequantized, is its parts as gguf-py dequantizes them from the file, row for row."""
    gf = open_gguf(oracles / "models" / arch / f"model-{variant}.gguf")
    adapter = gpt_oss if arch == "gpt-oss" else llama
    table = adapter.weight_table(gf, adapter.config(gf))
    weights = base.load_weights(gf, table, np.asarray, fuse=True)
    checked = 0
    for i, lw in enumerate(weights["layers"]):
        taken: set[str] = set()  # first parts already fused: a later fusion of the same part is not tried
        for fused, parts in base.FUSIONS.items():
            if f"blk.{i}.{parts[0]}.weight" not in gf.tensors:
                continue
            one_format = len({gf.tensors[f"blk.{i}.{p}.weight"].qtype for p in parts}) == 1
            expected = one_format and parts[0] not in taken
            taken |= {parts[0]} if expected else set()
            for suffix, field in (("weight", fused), ("bias", f"{fused}_b")):
                ts = [gf.tensors.get(f"blk.{i}.{p}.{suffix}") for p in parts]
                if ts[0] is None:
                    continue
                assert (field in lw) == expected, (i, field)
                if not expected:
                    continue
                # rows: a matrix's first axis, an expert's (axis 1 of [E, F, D]); a bias's last
                axis = -2 if suffix == "weight" else -1
                want = np.concatenate([gguf.quants.dequantize(t.data, t.qtype).reshape(t.shape) for t in ts], axis)
                got = np.asarray(dequantize(lw[field]) if isinstance(lw[field], QuantArray) else lw[field])
                np.testing.assert_array_equal(got, want)
                checked += 1
    assert checked >= 2  # a weight and a bias, or two fusions, at least
    if arch == "gpt-oss":  # its experts' gate|up, [E, 2F, D], and their biases [E, 2F]
        assert all("ffn_gate_up_exps" in lw and "ffn_gate_up_exps_b" in lw for lw in weights["layers"])


def test_gpt_oss_experts_fused_give_the_bits_of_their_parts(oracles, monkeypatch):
    """gpt-oss's experts' gate|up (MXFP4, as the real file's) fused at load, one grouped matmul a layer where two
    ran, against the parts, on the kernels (interpret, --max-batch 16: decode on the tensor-core path): the same
    logits and greedy ids to the bit, since a column's sum is the same whichever matrix holds its row."""
    d = oracles / "models" / "gpt-oss"
    file, ids = d / "model-mxfp4_moe.gguf", manifest(d)["input"]["ids"]
    gf = open_gguf(file)
    agree = [gf.tensors[f"blk.{i}.ffn_gate_exps.weight"].qtype == gf.tensors[f"blk.{i}.ffn_up_exps.weight"].qtype
             for i in range(gpt_oss.config(gf).n_layers)]  # fmt: skip
    assert any(agree)
    got = {}
    for fuse in (True, False):  # the dense projections fused either way: only the experts' layout differs
        monkeypatch.setattr(base, "_fusions", base.fusions_named("1" if fuse else "attn_qkv,attn_qk,ffn_up"))
        m = worker.load(file, device="cpu", backend="interpret", max_batch=16)
        assert [("ffn_gate_up_exps" in lw) for lw in layers(m)] == [fuse and a for a in agree]
        got[fuse] = (m.logits(ids), teacher_forced_decode(m, ids[:6]))
    np.testing.assert_array_equal(got[True][0], got[False][0])
    np.testing.assert_array_equal(got[True][1], got[False][1])


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "parts"])
def test_prefill_and_decode_match_hf_f64_on_either_layout(oracles, monkeypatch, fuse):
    """qwen2's Q4_K_M: layer 0 fused, layer 1 q|k fused beside its v (Q6_K); WORKER_FUSE_PROJECTIONS=0 (the A/B's
    other side) all in parts. Decode teacher-forced, so every position goes through the decode matvecs."""
    monkeypatch.setattr(base, "_fusions", base.fusions_named("1" if fuse else "0"))
    d = oracles / "models" / "qwen2"
    m = on_kernels(d / "model-q4_k_m.gguf")
    assert ("attn_qkv" in layers(m)[0]) == fuse and ("ffn_gate" in layers(m)[0]) != fuse
    assert ("attn_qk" in layers(m)[1]) == fuse and ("attn_q" in layers(m)[1]) != fuse
    ids, ref = manifest(d)["input"]["ids"], np.load(d / "logits-hf-f64-q4_k_m-dequant.npy")
    check_logits(m.logits(ids), ref, TOL, MARGIN)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > MARGIN
    assert (teacher_forced_decode(m, ids) == ref.argmax(-1))[clear].all()


def test_the_fusions_setting_names_them_or_all_or_none():
    """WORKER_FUSE_PROJECTIONS: "1" every fusion, "0" none, else the named ones in FUSIONS' order; a name that is
    not one is refused with the variable's name and the names it takes."""
    assert base.fusions_named("1") == base.FUSIONS and base.fusions_named("0") == {}
    assert list(base.fusions_named("ffn_up, attn_qkv,")) == ["attn_qkv", "ffn_up"]
    with pytest.raises(ValueError, match="WORKER_FUSE_PROJECTIONS: 'ffn_gate_up' is not 0, 1 or .* ffn_gate_up_exps$"):
        base.fusions_named("attn_qkv,ffn_gate_up")


def test_the_cpu_backend_and_tensor_parallelism_keep_the_parts(oracles):
    """XLA's CPU dots measured faster on the parts; tensor parallelism shards each part on its own."""
    d = oracles / "models" / "qwen2"
    assert "attn_q" in layers(worker.load(d / "model-q8_0.gguf", device="cpu"))[0]
    gf = open_gguf(d / "model-q8_0.gguf")
    with pytest.raises(ValueError, match="one-device layout"):
        base.load_weights(gf, llama.weight_table(gf, llama.config(gf)), np.asarray, place=lambda t, f: {}, fuse=True)


def test_load_progress_counts_every_byte_once(oracles):
    d = oracles / "models" / "qwen2"
    seen: list[tuple[int, int]] = []
    on_progress = lambda done, total: seen.append((done, total))  # noqa: E731
    worker.load(d / "model-q4_k_m.gguf", device="cpu", backend="interpret", on_progress=on_progress)
    done, total = seen[-1]
    assert done == total == open_gguf(d / "model-q4_k_m.gguf").tensor_bytes
