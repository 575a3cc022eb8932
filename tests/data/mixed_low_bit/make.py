"""Make the low-bit mixed-format oracle: a tiny qwen2 whose matrices are in the block formats of llama.cpp's Q2_K,
Q3_K_* and IQ4_XS files (Q2_K, Q3_K, IQ4_XS, and IQ4_NL, the fallback of the 256-value IQ formats), one or more per
path: a fused q|k|v and gate|up of one format, separate projections of four, the tied embedding/output head in
IQ4_XS; and its reference logits from HF transformers in float64 on the exactly dequantized weights.

    python tests/data/mixed_low_bit/make.py [--oracles ../shared/oracles]  # torch, transformers

Metadata, tokenizer, HF config and input ids are the oracle qwen2's (../shared/oracles/models/qwen2). Weights are
random GGUF blocks (random codes and sub-scales; the float16 scales set so that each tensor has the oracle's init
std), so the reference needs no quantizer: gguf-py's dequantization of the written blocks is the model. Outputs
here: model-q3_k_m-mixed.gguf, logits-hf-f64.npy, manifest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

HERE = Path(__file__).resolve().parent
SEED = 2718
# Per tensor: layer 0 keeps q/k/v (and gate/up) in one format each, so the worker fuses them; layer 1 mixes four.
TYPES = {
    "token_embd.weight": QT.IQ4_XS,  # tied: the output head too
    "blk.0.attn_q.weight": QT.Q3_K, "blk.0.attn_k.weight": QT.Q3_K, "blk.0.attn_v.weight": QT.Q3_K,
    "blk.0.attn_output.weight": QT.IQ4_NL, "blk.0.ffn_gate.weight": QT.Q2_K, "blk.0.ffn_up.weight": QT.Q2_K,
    "blk.0.ffn_down.weight": QT.IQ4_XS,
    "blk.1.attn_q.weight": QT.IQ4_XS, "blk.1.attn_k.weight": QT.Q2_K, "blk.1.attn_v.weight": QT.IQ4_NL,
    "blk.1.attn_output.weight": QT.Q3_K, "blk.1.ffn_gate.weight": QT.IQ4_NL, "blk.1.ffn_up.weight": QT.Q3_K,
    "blk.1.ffn_down.weight": QT.Q2_K,
}  # fmt: skip
# Byte offsets of the float16 scale fields of one block (ggml-common.h: block_q2_K, block_q3_K, block_iq4_*).
SCALE_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.IQ4_NL: (0,), QT.IQ4_XS: (0,)}
FILE_TYPE = 12  # LLAMA_FTYPE_MOSTLY_Q3_K_M


def init_std(manifest: dict, name: str) -> float:
    """The oracle's init std of the HF parameter that GGUF tensor `name` becomes (its manifest's weight_init)."""
    hf = hf_name(name)
    return float(manifest["weight_init"][hf].split(",")[1].rstrip(")"))


def hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    layer, part = name.removeprefix("blk.").split(".", 1)
    stem, kind = part.rsplit(".", 1)
    theirs = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}[stem]  # fmt: skip
    return f"model.layers.{layer}.{theirs}.{kind}"


def random_blocks(shape: tuple[int, ...], qtype: QT, std: float, rng: np.random.Generator) -> np.ndarray:
    """GGUF blocks with random codes and sub-scales, the float16 scales rescaled to give the tensor `std`."""
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    fields = SCALE_FIELDS[qtype]
    for i, off in enumerate(fields):  # Q2_K's dmin 1.5x its d: the minimum roughly cancels the codes' mean
        scale = rng.uniform(0.5, 1.0, n_blocks) * (1.5 if i else 1.0)
        raw[:, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    got = gguf.quants.dequantize(raw, qtype).std()
    for off in fields:  # every scale field alike: the weights scale with them
        d = raw[:, off : off + 2].copy().view(np.float16).astype(np.float32) * (std / got)
        raw[:, off : off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], -1)


def main() -> None:
    import torch
    import transformers

    sys.path.insert(0, str(HERE.parents[1]))  # tests/: the oracle helpers
    from model_oracles import copy_metadata, write_manifest, write_tensors

    from worker.gguf import open_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oracles", default=str(HERE.parents[2].parent / "shared" / "oracles"))
    args = ap.parse_args()
    src_dir = Path(args.oracles) / "models" / "qwen2"
    src_manifest = json.loads((src_dir / "manifest.json").read_text())
    src = open_gguf(src_dir / "model-q8_0.gguf")
    rng = np.random.default_rng(SEED)

    writer = gguf.GGUFWriter(str(HERE / "model-q3_k_m-mixed.gguf"), "qwen2")
    copy_metadata(writer, src, {"general.file_type": FILE_TYPE})

    def tensors():
        for name, t in src.tensors.items():
            shape = tuple(int(d) for d in t.shape)
            qtype = TYPES.get(name, QT.F32)
            if qtype == QT.F32:  # norms (1 + N(0, 0.1)) and biases (N(0, 0.05)), as the oracle's init
                base = 1.0 if "norm" in name else 0.0
                data = (base + rng.standard_normal(shape) * init_std_or_norm(src_manifest, name)).astype(np.float32)
            else:
                data = random_blocks(shape, qtype, init_std(src_manifest, name), rng)
            yield name, shape, qtype, data

    values, types = write_tensors(writer, tensors())

    cfg = {k: v for k, v in src_manifest["hf_config"].items() if k not in ("architectures", "transformers_version")}
    config = transformers.Qwen2Config(**cfg)
    config._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(config).double().eval()
    state = {hf_name(n): torch.from_numpy(np.ascontiguousarray(v)) for n, v in values.items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ids = src_manifest["input"]["ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0].numpy()
    np.save(HERE / "logits-hf-f64.npy", logits)
    write_manifest(
        HERE / "manifest.json",
        __doc__.splitlines()[0],
        "../shared/oracles/models/qwen2 (metadata, tokenizer, input ids, hf_config); random blocks with "
        f"numpy seed {SEED}",
        "logits-hf-f64.npy: HF transformers Qwen2ForCausalLM, float64, eager attention, one forward "
        "pass over input.ids, on gguf.quants.dequantize of every tensor of model-q3_k_m-mixed.gguf",
        ids,
        types,
    )


def init_std_or_norm(manifest: dict, name: str) -> float:
    """A float tensor's std: the norms' N(0, 0.1) around 1, else the oracle's init std."""
    return 0.1 if "norm" in name else init_std(manifest, name)


if __name__ == "__main__":
    main()
