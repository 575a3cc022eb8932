"""Generate the tiny random qwen3 oracle in this folder (see README.md): a Qwen3ForCausalLM with random weights
written as GGUF (Q8_0 and Q4_0 matrices, F32 norms) with gguf-py's GGUFWriter, and the float64 HF transformers
logits on the exactly dequantized weights of each file, after the 48 ids of manifest.json.

Not run by the tests (they read the outputs). Needs torch, transformers and gguf-py, in a venv of its own:
    python3 -m venv /tmp/q3 && /tmp/q3/bin/pip install torch==2.13.0 transformers gguf numpy
    /tmp/q3/bin/python tests/data/qwen3/make_oracle.py ../shared/oracles/models/qwen2/model-q8_0.gguf
The argument is any GGUF whose tokenizer.* metadata (a 1024-token qwen2 BPE) the tiny model borrows: the oracle
checks arithmetic, the tokenizer never matters, but the worker needs one to load the file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as QT

HERE = Path(__file__).resolve().parent
SEED = 1234
N_IDS = 48
VARIANTS = {"q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    attention_bias=False,
    bos_token_id=0,
    eos_token_id=2,
)
# HF parameter suffix -> GGUF tensor name inside a block (llama.cpp's convert_hf_to_gguf names; qwen3 is not
# permuted: NEOX RoPE on q/k as HF has them).
BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{BLOCK[rest]}"


def random_model() -> transformers.Qwen3ForCausalLM:
    """Weights as the shipped oracles draw them: norms 1 + N(0, 0.1), q/k N(0, 0.1), everything else N(0, 0.05)."""
    torch.manual_seed(SEED)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**CONFIG, attn_implementation="eager"))
    torch.manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def write_gguf(path: Path, model, qtype: QT, file_type: int, tokenizer_src: Path) -> dict[str, np.ndarray]:
    """The GGUF; returns its tensors dequantized exactly (gguf.quants.dequantize), by GGUF name."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_name("tiny-random-qwen3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    src = gguf.GGUFReader(tokenizer_src)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    exact = {}
    for hf, p in model.state_dict().items():
        if hf == "lm_head.weight":
            continue  # tied to token_embd
        name, data = gguf_name(hf), p.detach().to(torch.float32).numpy()
        if data.ndim == 2:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            exact[name] = gguf.quants.dequantize(q, qtype).reshape(data.shape)
        else:
            w.add_tensor(name, data, raw_dtype=QT.F32)
            exact[name] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return exact


def hf_logits(model, exact: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """float64 logits [len(ids), vocab] of the model carrying the file's dequantized weights (eager, no cache)."""
    model = model.to(torch.float64)
    names = {gguf_name(hf): hf for hf in model.state_dict() if hf != "lm_head.weight"}
    state = {names[n]: torch.from_numpy(a.astype(np.float64)) for n, a in exact.items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=False).logits[0]
    return out.numpy().astype(np.float64)


def main(tokenizer_src: str) -> None:
    ids = [int(i) for i in np.random.default_rng(SEED).integers(3, CONFIG["vocab_size"], size=N_IDS)]
    manifest = {
        "what": "tiny random qwen3 (q/k RMS norms), HF transformers float64 logits on the exactly dequantized "
        "weights of each GGUF (the gate, as ../shared/oracles/models)",
        "generator": "tests/data/qwen3/make_oracle.py",
        "seed": SEED,
        "hf_config": CONFIG,
        "tokenizer_metadata_from": Path(tokenizer_src).name + " (the qwen2 oracle's)",
        "input": {"ids": ids, "length": N_IDS, "bos_prepended": False, "rule": "default_rng(seed).integers(3, vocab)"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "gguf": gguf.__version__}
        if hasattr(gguf, "__version__")
        else {"torch": torch.__version__, "transformers": transformers.__version__},
        "files": {},
    }
    for variant, (qtype, file_type) in VARIANTS.items():
        path = HERE / f"model-{variant}.gguf"
        exact = write_gguf(path, random_model(), qtype, file_type, Path(tokenizer_src))
        logits = hf_logits(random_model(), exact, ids)
        np.save(HERE / f"logits-hf-f64-{variant}-dequant.npy", logits)
    for f in sorted(HERE.glob("*.gguf")) + sorted(HERE.glob("*.npy")):
        manifest["files"][f.name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
