"""Projections of one input fused at load where their formats agree (worker/models/base.py `fuse_projections`):
the kernel backends' layers hold them as one weight, and `projections` gives each part what its own weight gives,
against float64 on the dequantized weights (an independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

import worker
from tests.conftest import oracles_dir
from worker.models.base import Fused, fuse_projections, projections
from worker.quant import QuantArray, quant_array

K = 256


def weight(rng: np.random.Generator, rows: int, qtype: QT) -> tuple[QuantArray, np.ndarray]:
    raw = quantize(rng.standard_normal((rows, K)).astype(np.float32), qtype)
    return quant_array(raw, qtype, (rows, K)), dequantize(raw, qtype).astype(np.float64)


def test_parts_of_one_format_are_fused_and_each_gets_its_own_product():
    """Gemma 3 270M's layer 0 has q and k in Q5_0, v in Q8_0: q|k fuse, v stays; gate|up fuse; biases stay apart."""
    rng = np.random.default_rng(7)
    formats = {"attn_q": (64, QT.Q5_0), "attn_k": (32, QT.Q5_0), "attn_v": (32, QT.Q8_0), "ffn_gate": (96, QT.Q4_0),
               "ffn_up": (96, QT.Q4_0), "attn_output": (K, QT.Q5_0)}  # fmt: skip
    layer, exact = {}, {}
    for name, (rows, qtype) in formats.items():
        layer[name], exact[name] = weight(rng, rows, qtype)
    layer["attn_k_b"] = bias = rng.standard_normal(32).astype(np.float32)
    parts = [layer["attn_q"], layer["attn_k"]]
    fused = fuse_projections({"layers": [layer]})["layers"][0]
    assert sorted(fused) == ["attn_k_b", "attn_output", "attn_q+attn_k", "attn_v", "ffn_gate+ffn_up"]
    qk = fused["attn_q+attn_k"]
    assert isinstance(qk, Fused) and (qk.names, qk.sizes) == (("attn_q", "attn_k"), (64, 32))
    assert qk.weight.qtype == QT.Q5_0 and qk.weight.shape == (96, K)
    assert all(p.is_deleted() for w in parts for p in w.planes.values())  # the parts' memory is given back
    h = rng.standard_normal((3, 1, K)).astype(np.float32)
    names = ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")
    for name, y in zip(names, projections(h, fused, names, "interpret"), strict=True):
        want = h.astype(np.float64) @ exact[name].T + (bias if name == "attn_k" else 0)
        err = np.abs(np.asarray(y) - want).max() / (np.abs(h) @ np.abs(exact[name]).T).max()
        assert y.shape == (3, 1, formats[name][0]) and err < 1e-6, (name, err)


def test_a_lone_format_stays_as_it_is():
    rng = np.random.default_rng(8)
    layer = {name: weight(rng, 32, qtype)[0] for name, qtype in (("attn_q", QT.Q8_0), ("attn_k", QT.Q5_0))}
    assert sorted(fuse_projections({"layers": [dict(layer)]})["layers"][0]) == ["attn_k", "attn_q"]


@pytest.mark.parametrize(("backend", "fused"), [("interpret", True), ("cpu", False)])
def test_the_kernel_backends_load_fused_and_the_cpu_does_not(backend, fused):
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", backend=backend)
    keys = set(m.runner.weights["layers"][0])
    assert ({"attn_q+attn_k+attn_v", "ffn_gate+ffn_up"} <= keys) is fused
    assert ("attn_q" in keys) is not fused
