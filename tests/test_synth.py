"""bench.synth: synthetic GGUFs with the real models' layout.

References, none of them produced by this project: llama.cpp's own quantized tiny models (oracle manifests) for
the per-tensor type rules; the real Gemma 3 270M file, whose header the synthetic one must reproduce byte for byte;
llama.cpp's load logs of the real phi3 and gpt-oss files (type counts, tensor bytes, parameter counts) and the
published file sizes (quoted in bench/synth.py); tiktoken / HF token ids from the tokenizer oracles, decoded
through the written vocabulary; gguf-py's GGUFReader and dequantizers to read back what was written.
"""

from __future__ import annotations

import json
import lzma
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import oracles_dir
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from gguf import GGMLQuantizationType as QT
from tokenizers import decoders

from bench import synth
from bench.synth import SPECS, TensorSpec, llama_quant_type, random_tensor, write_synthetic
from worker.gguf import GGUFFile, open_gguf


def _pad(n: int) -> int:
    return -(-n // 32) * 32


# ---- quantization type rules against llama.cpp's output (tiny oracle models, llama.cpp 0c1e570)


@pytest.mark.parametrize(
    ("arch", "variant"),
    [(a, "q4_k_m") for a in ("llama", "qwen2", "phi3", "gemma3", "gpt2", "gpt-oss")] + [("gpt-oss", "mxfp4_moe")],
)
def test_quant_rules_match_llama_cpp(arch: str, variant: str) -> None:
    manifest = json.loads((oracles_dir() / "models" / arch / "manifest.json").read_text())
    source = manifest["tensor_types"]["model-f32.gguf"]["tensors"]
    quantized = manifest["tensor_types"][f"model-{variant}.gguf"]["tensors"]
    tied = "output.weight" not in source
    got = {n: llama_quant_type(n, tuple(t["shape"]), 2, tied, variant).name for n, t in source.items()}
    assert got == {n: t["type"] for n, t in quantized.items()}


def test_quant_rules_fall_back_for_rows_not_a_multiple_of_256() -> None:
    # Gemma 3 270M (d = 640) shows every fallback; the real file is compared in full below.
    assert llama_quant_type("blk.0.attn_q.weight", (640, 1024), 18, True, "q4_k_m") == QT.Q5_0
    assert llama_quant_type("blk.0.attn_v.weight", (640, 256), 18, True, "q4_k_m") == QT.Q8_0
    assert llama_quant_type("blk.2.attn_v.weight", (640, 256), 18, True, "q4_k_m") == QT.Q5_0
    assert llama_quant_type("token_embd.weight", (640, 262144), 18, True, "q4_k_m") == QT.Q8_0
    assert llama_quant_type("blk.0.x.weight", (48, 64), 18, True, "q4_k_m") == QT.F16


def test_q3_k_m_rules_as_llama_cpp_reads() -> None:
    """Q3_K_M's choices as read from llama.cpp 0c1e570's llama-quant.cpp (no oracle file holds a Q3_K_M model): a
    dense 32-layer model's first two attn_v and first two ffn_down Q5_K, the other attn_v, ffn_down, a fused
    attn_qkv and attn_output Q4_K, the rest Q3_K, the output Q6_K; rows not a multiple of 256 fall back."""
    rule = lambda n, ne=(3072, 3072): llama_quant_type(n, ne, 32, False, "q3_k_m")  # noqa: E731
    assert [rule(f"blk.{i}.attn_v.weight") for i in (0, 1, 2)] == [QT.Q5_K, QT.Q5_K, QT.Q4_K]
    assert [rule(f"blk.{i}.ffn_down.weight") for i in (1, 2)] == [QT.Q5_K, QT.Q4_K]
    assert rule("blk.5.attn_qkv.weight") == rule("blk.5.attn_output.weight") == QT.Q4_K
    assert rule("blk.5.attn_q.weight") == rule("blk.5.ffn_up.weight") == rule("token_embd.weight") == QT.Q3_K
    assert rule("output.weight") == QT.Q6_K
    assert rule("blk.5.ffn_gate.weight", (896, 4864)) == QT.Q4_0  # Q3_K's fallback
    spec = SPECS["phi3-mini-q3_k_m"]
    assert spec.metadata["general.file_type"] == 12 and spec.real_file_bytes is None
    assert {t.qtype for t in spec.tensors} == {QT.F32, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}


# ---- the specs against the real files' load logs (quoted where SPECS is built)


@pytest.mark.parametrize(
    ("like", "n_tensors", "types", "params", "tensor_bytes"),
    [
        # Phi-3-mini-4k-instruct-q4.gguf: "model params = 3.82 B", "CPU_Mapped model buffer size = 2281.66 MiB"
        ("phi3-mini", 195, {"F32": 65, "Q4_K": 81, "Q5_K": 32, "Q6_K": 17}, 3.82e9, 2281.66 * 2**20),
        # gpt-oss-20b-mxfp4.gguf: "model params = 20.91 B", "file size = 11.27 GiB" (llama.cpp counts tensor bytes)
        ("gpt-oss-20b", 459, {"F32": 289, "Q8_0": 98, "MXFP4": 72}, 20.91e9, 11.27 * 2**30),
    ],
)
def test_spec_matches_load_log(like: str, n_tensors: int, types: dict, params: float, tensor_bytes: float) -> None:
    spec = SPECS[like]
    assert len(spec.tensors) == n_tensors
    assert Counter(t.qtype.name for t in spec.tensors) == types
    assert spec.n_params == pytest.approx(params, abs=0.005e9)
    assert spec.tensor_bytes == pytest.approx(tensor_bytes, rel=5e-4)


def test_qwen_spec_shapes() -> None:
    # Qwen2.5-0.5B: 494 M parameters, 24 layers of 12 tensors plus token_embd and output_norm (tied output).
    spec = SPECS["qwen2.5-0.5b"]
    t = {x.name: x for x in spec.tensors}
    assert len(t) == 290 and "output.weight" not in t
    assert spec.n_params == pytest.approx(0.494e9, rel=2e-3)
    assert t["token_embd.weight"].ne == (896, 151936) and t["token_embd.weight"].qtype == QT.Q8_0
    assert t["blk.0.attn_q.weight"].ne == (896, 896) and t["blk.0.attn_k.weight"].ne == (896, 128)
    assert t["blk.0.attn_k.bias"].ne == (128,) and t["blk.23.ffn_down.weight"].ne == (4864, 896)
    assert [t[f"blk.{i}.ffn_down.weight"].qtype for i in (0, 3, 5, 23)] == [QT.Q6_K, QT.Q4_K, QT.Q6_K, QT.Q6_K]
    assert [t[f"blk.{i}.attn_v.weight"].qtype for i in (0, 3)] == [QT.Q8_0, QT.Q5_0]


# ---- files written with fill="zero", read back


class ZeroFiles(dict):
    """like -> its fill="zero" file, written on first use."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def __missing__(self, like: str) -> Path:
        self[like] = write_synthetic(like, self.folder / f"{like}.gguf", fill="zero", oracles=oracles_dir())
        return self[like]


@pytest.fixture(scope="module")
def zero_files(tmp_path_factory: pytest.TempPathFactory) -> ZeroFiles:
    return ZeroFiles(tmp_path_factory.mktemp("synth"))


def test_gemma_header_is_the_real_file_header(zero_files: ZeroFiles) -> None:
    real = synth.gemma_real_file()
    spec = SPECS["gemma3-270m"]
    header = real.stat().st_size - sum(_pad(t.nbytes) for t in spec.tensors)
    ours = zero_files["gemma3-270m"]
    assert ours.stat().st_size == real.stat().st_size == spec.real_file_bytes
    with open(ours, "rb") as a, open(real, "rb") as b:
        assert a.read(header) == b.read(header)


def _read_back(path: Path, like: str) -> GGUFReader:
    spec = SPECS[like]
    size = path.stat().st_size
    assert size == pytest.approx(spec.real_file_bytes, rel=0.03)
    assert path.stat().st_blocks * 512 < 16 << 20  # sparse: only the header is on disk
    r = GGUFReader(path)
    assert r.fields["general.architecture"].contents() == spec.arch
    assert [(t.name, tuple(int(n) for n in t.shape), t.tensor_type) for t in r.tensors] == [
        (t.name, t.ne, t.qtype) for t in spec.tensors
    ]
    last = r.tensors[-1]
    assert last.data_offset % 32 == 0 and last.data_offset + last.n_bytes <= size
    return r


def _byte_level_text(tokens: list[str], ids: list[int]) -> str:
    return decoders.ByteLevel().decode([tokens[i] for i in ids])


def test_phi3_file(zero_files: ZeroFiles) -> None:
    r = _read_back(zero_files["phi3-mini"], "phi3-mini")
    assert zero_files["phi3-mini"].stat().st_size == SPECS["phi3-mini"].real_file_bytes  # byte for byte the size
    f = {k: r.fields[k].contents() for k in ("phi3.block_count", "phi3.embedding_length", "phi3.attention.head_count")}
    assert f == {"phi3.block_count": 32, "phi3.embedding_length": 3072, "phi3.attention.head_count": 32}
    assert r.fields["phi3.rope.dimension_count"].contents() == 96
    t = {x.name: x for x in r.tensors}
    assert tuple(t["blk.0.attn_qkv.weight"].shape) == (3072, 9216)
    assert tuple(t["blk.0.ffn_up.weight"].shape) == (3072, 16384)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 32064 and tokens[32000] == "<|endoftext|>" and tokens[32007] == "<|end|>"
    assert sum(1 for x in r.fields["tokenizer.ggml.token_type"].contents() if x == 6) == 256  # <0x00>..<0xFF>


def test_qwen_file(zero_files: ZeroFiles) -> None:
    g = _read_back_own(zero_files["qwen2.5-0.5b"], "qwen2.5-0.5b")
    assert g.get("qwen2.rope.freq_base") == 1e6
    assert g.get("qwen2.attention.head_count_kv") == 2
    tokens, types = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 151936 and len(g.get("tokenizer.ggml.merges")) == 151387
    assert (tokens[151645], types[151645], tokens[151657], types[151657]) == ("<|im_end|>", 3, "<tool_call>", 4)
    assert (tokens[151664], types[151664], tokens[151665], types[151665]) == ("<|file_sep|>", 3, "[PAD151665]", 5)
    assert g.get("tokenizer.ggml.eos_token_id") == 151645
    for v in json.loads((oracles_dir() / "tokenizers" / "qwen2" / "vectors.json").read_text()):
        assert _byte_level_text(tokens, v["ids"]) == v["text"], v["name"]


def _read_back_own(path: Path, like: str) -> GGUFFile:
    """As _read_back, by the worker's own parser (worker/gguf.py) rather than gguf-py's GGUFReader, which wrote
    the file: GGUFReader took 10-15 s on qwen's 151,936 tokens and 20-33 s on gpt-oss's 201,088 tokens and 446,189
    merges (a numpy view per string). The phi3 file keeps GGUFReader."""
    spec = SPECS[like]
    assert path.stat().st_size == pytest.approx(spec.real_file_bytes, rel=0.03)
    assert path.stat().st_blocks * 512 < 16 << 20  # sparse: only the header is on disk
    g = open_gguf(path)
    assert g.architecture == spec.arch
    assert [(t.name, t.shape[::-1], t.qtype) for t in g.tensors.values()] == [
        (t.name, t.ne, t.qtype) for t in spec.tensors
    ]
    last = list(g.tensors.values())[-1]
    assert last.offset % 32 == 0 and last.offset + last.nbytes <= path.stat().st_size
    return g


def test_gpt_oss_file(zero_files: ZeroFiles) -> None:
    g = _read_back_own(zero_files["gpt-oss-20b"], "gpt-oss-20b")
    assert sum(t.n_elements for t in g.tensors.values()) == pytest.approx(20.91e9, abs=0.005e9)
    keys = ("expert_count", "expert_used_count", "attention.sliding_window", "rope.scaling.factor", "rope.freq_base")
    assert [g.get(f"gpt-oss.{k}") for k in keys] == [32, 4, 128, 32.0, 150000.0]
    t = g.tensors
    assert t["blk.0.ffn_gate_exps.weight"].shape == (32, 2880, 2880)
    assert t["blk.0.ffn_down_exps.weight"].qtype == QT.MXFP4 and t["blk.0.attn_sinks.weight"].shape == (64,)
    tokens, types = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.token_type")
    assert len(tokens) == 201088 and len(g.get("tokenizer.ggml.merges")) == 446189
    assert [tokens[i] for i in (199998, 200002, 200012)] == ["<|startoftext|>", "<|return|>", "<|call|>"]
    assert (types[200002], tokens[200019], types[200019], types[1000]) == (3, "[PAD200019]", 5, 1)
    for v in json.loads((oracles_dir() / "tokenizers" / "gpt-oss" / "vectors.json").read_text()):
        ids = v["ids_ordinary"]  # special-token strings as plain text, so every id is a byte-level piece
        assert _byte_level_text(tokens, ids) == v["text"], v["name"]


def test_read_kv_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "phi3.gguf"
    path.write_bytes(lzma.decompress((oracles_dir() / "tokenizers/phi-3/ggml-vocab-phi-3.gguf.xz").read_bytes()))
    r = GGUFReader(path)
    keys = {k for k in r.fields if not k.startswith("GGUF.")}
    got = synth.read_kv(path, keys)
    assert got.keys() == keys
    for k in keys:
        want = r.fields[k].contents()
        assert got[k] == (pytest.approx(want) if isinstance(want, float) else want), k


# ---- random data


@pytest.mark.parametrize(
    "qtype", [QT.F32, QT.F16, QT.Q8_0, QT.Q5_0, QT.Q4_0, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.MXFP4]
)
def test_random_blocks_are_sane(qtype: QT) -> None:
    t = TensorSpec("blk.0.ffn_up.weight", (4096, 64), qtype)
    raw = random_tensor(t, seed=1, index=2)
    assert raw.nbytes == t.nbytes
    x = raw.astype(np.float32) if qtype in (QT.F32, QT.F16) else quants.dequantize(raw, qtype)
    assert np.isfinite(x).all()
    assert 0.015 < x.std() < 0.04 and abs(x.mean()) < 0.003
    if qtype in (QT.Q8_0, QT.Q5_0, QT.Q4_0, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K):  # the f16 block scale d
        at = {QT.Q6_K: 208, QT.Q3_K: 108}.get(qtype, 0)
        d = raw[:, at : at + 2].copy().view(np.float16).astype(np.float32)
        assert np.isfinite(d).all() and (d >= 2.0**-14).all() and (d < 1e-2).all()
    assert np.array_equal(raw, random_tensor(t, seed=1, index=2))
    assert not np.array_equal(raw, random_tensor(t, seed=1, index=3))


def test_random_norm_weights_are_near_one() -> None:
    x = random_tensor(TensorSpec("blk.0.attn_norm.weight", (4096,), QT.F32))
    assert abs(x.mean() - 1.0) < 0.01


def test_random_fill_of_the_first_tensors(tmp_path: Path) -> None:
    # phi3's first 9 tensors hold F32, Q4_K, Q5_K and Q6_K; everything after them stays a hole.
    k, spec = 9, SPECS["phi3-mini"]
    path = write_synthetic("phi3-mini", tmp_path / "phi3.gguf", seed=7, oracles=oracles_dir(), random_tensors=k)
    assert path.stat().st_size == spec.real_file_bytes
    r = GGUFReader(path)
    assert {t.tensor_type for t in r.tensors[:k]} == {QT.F32, QT.Q4_K, QT.Q5_K, QT.Q6_K}
    for i, t in enumerate(r.tensors[: k + 1]):
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        head = np.asarray(t.data).reshape(-1).view(np.uint8)[: 4096 // block * size]
        if i == k:
            assert not head.any()
            continue
        if t.n_bytes < 8 << 20:  # the data is random_tensor's for (seed, index)
            assert np.array_equal(head, random_tensor(spec.tensors[i], 7, i).reshape(-1).view(np.uint8)[: head.size])
        x = head.view(np.float32) if t.tensor_type == QT.F32 else quants.dequantize(head, t.tensor_type)
        assert np.isfinite(x).all() and np.abs(x).max() < 2.0


def test_cli_and_missing_oracles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.gguf"
    assert (
        synth.main(["--like", "phi3-mini", "--fill", "zero", "--oracles", str(oracles_dir()), "--out", str(out)]) == 0
    )
    assert out.stat().st_size == SPECS["phi3-mini"].real_file_bytes
    assert "195 tensors" in capsys.readouterr().out
    missing = tmp_path / "nowhere"
    assert synth.main(["--like", "gpt-oss-20b", "--oracles", str(missing), "--out", str(tmp_path / "g.gguf")]) == 1
    err = capsys.readouterr().err
    assert "oracle data not found" in err and "WORKER_ORACLES" in err and str(missing) in err


def test_inspect_reports_the_gpt_oss_file(zero_files: ZeroFiles) -> None:
    """`python -m worker inspect` on the synthetic gpt-oss-20b (the GPT-family issue's acceptance line)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "worker", "inspect", "--json", str(zero_files["gpt-oss-20b"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["architecture"] == "gpt-oss" and report["quant_kind"] == "MXFP4"
    assert report["block_count"] == 24 and report["expert_count"] == 32
    assert report["parameters"] == pytest.approx(20.9e9, rel=0.01)
