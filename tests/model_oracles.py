"""Helpers for comparing our logits with the oracle models' references (../shared/oracles/models)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax
import numpy as np
from gguf import GGMLQuantizationType as QT

from worker.gguf import open_gguf
from worker.kv_cache import pages_for, table_row
from worker.runner import RowInputs
from worker.sampling import SamplingParams


def manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours.astype(np.float64) - ref) / np.linalg.norm(ref))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def check_logits(ours: np.ndarray, ref: np.ndarray, tol: float, margin: float) -> tuple[float, int]:
    """Relative Frobenius error <= tol, and equal argmax wherever the reference's top-2 margin exceeds `margin`.
    Returns (error, positions compared)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all()
    err = rel_err(ours, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > margin
    mismatch = np.nonzero(clear & (ours.argmax(-1) != ref.argmax(-1)))[0]
    assert mismatch.size == 0, f"argmax differs at clear positions {mismatch.tolist()}"
    return err, int(clear.sum())


def teacher_forced_decode(m, ids: list[int]) -> np.ndarray:
    """The greedy next id after each prefix ids[: p + 1], each from a one-step decode dispatch at position p (row 0
    of the smallest row bucket, on pages 1..n of a cache of its own)."""
    r, plan = m.runner, SamplingParams().plan()
    pages = list(range(1, pages_for(len(ids), r.page_size) + 1))
    cache, rows, out = r.new_cache(len(pages) + 1), r.new_rows(), []
    for p, tok in enumerate(ids):
        rows = r.join(rows, [(0, 0)], jax.device_put(np.asarray([tok], np.int32), m.device), rows.seen[:1])
        inputs = RowInputs.neutral(r.min_rows, r.table_width(p + 1))
        inputs.positions[0], inputs.tables[0] = p, table_row(pages, inputs.tables.shape[1])
        nxt, rows, cache, _ = r.decode(rows, cache, inputs, 1, plan)
        out.append(int(np.asarray(nxt)[0, 0]))
    return np.asarray(out)


def write_f32_copy(src: Path, dst: Path) -> Path:
    """An all-F32 copy of a GGUF (every tensor through gguf.quants.dequantize, same metadata and order): the
    README's recipe for an F32 bring-up; its reference is the source variant's -dequant logits."""
    gf = open_gguf(src)
    writer = gguf.GGUFWriter(str(dst), gf.architecture)
    for key, value in gf.metadata.items():
        if key in ("general.architecture", "general.alignment") or key.startswith("GGUF."):
            continue
        vtype = value_type(value)
        if key == "general.file_type":
            value = 0  # ALL_F32
        writer.add_key_value(key, value, vtype, sub_type=value_type(value[0]) if isinstance(value, list) else None)
    for name, t in gf.tensors.items():
        data = gguf.quants.dequantize(np.asarray(t.data), t.qtype).astype(np.float32).reshape(t.shape)
        writer.add_tensor(name, data, raw_dtype=QT.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def value_type(v) -> gguf.GGUFValueType:
    if isinstance(v, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(v, int):
        return gguf.GGUFValueType.INT32 if -(2**31) <= v < 2**31 else gguf.GGUFValueType.INT64
    if isinstance(v, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(v, str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.ARRAY


def copy_metadata(writer: gguf.GGUFWriter, src, overrides: dict) -> None:
    """An oracle file's metadata into `writer` (tests/data/*/make.py), with `overrides` by key; the architecture and
    alignment are the writer's own."""
    for key, value in src.metadata.items():
        if key in ("general.architecture", "general.alignment") or key.startswith("GGUF."):
            continue
        value = overrides.get(key, value)
        sub = value_type(value[0]) if isinstance(value, list) else None
        writer.add_key_value(key, value, value_type(value), sub_type=sub)


def write_manifest(path: Path, what: str, source: str, reference: str, ids: list[int], types: dict) -> None:
    """A generated oracle's manifest.json (tests/data/*/make.py): what, from what, the reference, its input, the
    tensors' types and the generating libraries' versions."""
    import torch
    import transformers

    manifest = {
        "what": what,
        "source": source,
        "reference": reference,
        "input": {"ids": ids},
        "tensor_types": types,
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": "gguf-py " + getattr(gguf, "__version__", "?"),
            "numpy": np.__version__,
        },  # fmt: skip
        "licence": "generated by this project (MIT); tokenizer metadata from the oracle file",
    }
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def write_tensors(writer: gguf.GGUFWriter, tensors) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(name, shape, qtype, data) tensors into `writer`, then the file closed; returns each tensor's values (gguf-py's
    dequantization, float64) and its manifest entry (type, shape). `data`: float32 values, or a quantized tensor's
    blocks as [..., bytes per row]."""
    values, types = {}, {}
    for name, shape, qtype, data in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
        values[name] = gguf.quants.dequantize(data, qtype).reshape(shape).astype(np.float64)
        types[name] = {"type": qtype.name, "shape": list(shape)}
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values, types
