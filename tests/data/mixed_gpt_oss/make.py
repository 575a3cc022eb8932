"""Make the mixed-format gpt-oss oracle: a tiny gpt-oss whose expert rows are 128 values long, so that llama.cpp's
Q4_K_M rules fall back from K-quants to 32-value formats (ffn_down_exps: Q5_0 in layer 0, Q8_0 in layer 1) beside
Q4_K / Q6_K tensors, as in the real gpt-oss-20b Q4_K_M file; and its reference logits from HF transformers in
float64 on the exactly dequantized weights (the recipe of ../shared/oracles/models).

    python tests/data/mixed_gpt_oss/make.py --variant ff128|d128 [--oracles ../shared/oracles]  # torch, transformers

Metadata, tokenizer and input ids are the oracle gpt-oss's (../shared/oracles/models/gpt-oss); its HF config
changed by the variant: "ff128" (expert width 128), "d128" (d_model and expert width 128, head_dim 32). Weights
are random GGUF blocks (random codes; scales set so each tensor has the oracle's init std), so the reference
needs no quantizer: gguf-py's dequantization of the written blocks is the model. Outputs in the variant's
folder: model-q4_k_m-mixed.gguf, logits-hf-f64.npy, router-gaps-hf-f64.npy [layers, positions], manifest.json.
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
# Variants: the oracle's shapes with 128-wide experts, and everything 128 wide (d_model and experts; head_dim 32).
VARIANTS = {
    "ff128": {"intermediate_size": 128},
    "d128": {"intermediate_size": 128, "hidden_size": 128, "head_dim": 32},
}
SEED = 1515
# llama.cpp 0c1e570 Q4_K_M for this 2-layer model: attn_v and ffn_down get Q6_K in layer 1 (use_more_bits), Q4_K
# elsewhere; a row length that is not a multiple of 256 falls back to Q5_0 (for Q4_K) or Q8_0 (for Q6_K);
# output.weight is Q6_K; norms, biases, sinks and the router stay F32.
FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}
# Byte offsets of the float16 scale fields of one block (ggml-common.h): d (and dmin).
SCALE_FIELDS = {QT.Q4_K: (0, 2), QT.Q6_K: (208,), QT.Q5_0: (0,), QT.Q8_0: (0,)}
# The oracle's HF init (its manifest's weight_init): std per tensor kind; norms are 1 + N(0, 0.1).
STD = {"attn_q": 0.1, "attn_k": 0.1, "attn_v": 0.05, "attn_output": 0.05, "ffn_gate_exps": 0.2,
       "ffn_up_exps": 0.2, "ffn_down_exps": 0.05, "ffn_gate_inp": 0.05, "token_embd": 0.05, "output": 0.05,
       "attn_sinks": 1.0, "bias": 0.05}  # fmt: skip


def q4_k_m_type(name: str, row: int) -> QT:
    if name.endswith(".bias") or "norm" in name or "sinks" in name or "ffn_gate_inp" in name:
        return QT.F32
    layer1 = name.startswith("blk.1.")
    qtype = QT.Q6_K if name == "output.weight" or (layer1 and ("attn_v" in name or "ffn_down" in name)) else QT.Q4_K
    return FALLBACK[qtype] if row % 256 else qtype


def shape_of(name: str, cfg: dict) -> tuple[int, ...]:
    """numpy-order shape of a gpt-oss GGUF tensor under the HF config `cfg`."""
    d, f, e, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    part = name.removeprefix("blk.").split(".", 1)[-1] if name.startswith("blk.") else name
    table = {
        "token_embd.weight": (v, d), "output.weight": (v, d), "output_norm.weight": (d,),
        "attn_norm.weight": (d,), "post_attention_norm.weight": (d,),
        "attn_q.weight": (q, d), "attn_q.bias": (q,), "attn_k.weight": (kv, d), "attn_k.bias": (kv,),
        "attn_v.weight": (kv, d), "attn_v.bias": (kv,), "attn_output.weight": (d, q), "attn_output.bias": (d,),
        "attn_sinks.weight": (cfg["num_attention_heads"],), "ffn_gate_inp.weight": (e, d), "ffn_gate_inp.bias": (e,),
        "ffn_gate_exps.weight": (e, f, d), "ffn_gate_exps.bias": (e, f), "ffn_up_exps.weight": (e, f, d),
        "ffn_up_exps.bias": (e, f), "ffn_down_exps.weight": (e, d, f), "ffn_down_exps.bias": (e, d),
    }  # fmt: skip
    return table[part]


def kind(name: str) -> str:
    if name.endswith(".bias"):
        return "bias"
    return name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]


def random_tensor(name: str, shape: tuple[int, ...], qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """F32 values, or GGUF blocks with random codes and scales giving the tensor kind's std."""
    if qtype == QT.F32:
        base = 1.0 if "norm" in name else 0.0
        return (base + rng.standard_normal(shape) * (0.1 if "norm" in name else STD[kind(name)])).astype(np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        raw[:, off : off + 2] = rng.uniform(0.5, 1.0, n_blocks).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == QT.Q6_K:  # int8 sub-scales of both signs
        raw[:, 192:208] = rng.integers(-32, 32, (n_blocks, 16), dtype=np.int8).view(np.uint8)
    std = gguf.quants.dequantize(raw, qtype).std()
    for off in SCALE_FIELDS[qtype]:  # rescale d (and dmin alike): the weights scale with them
        d = raw[:, off : off + 2].copy().view(np.float16).astype(np.float32) * (STD[kind(name)] / std)
        raw[:, off : off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(*shape[:-1], -1)


def hf_state(tensors: dict[str, np.ndarray], n_layers: int) -> dict[str, np.ndarray]:
    """GGUF tensors (dequantized, numpy order) -> HF GptOssForCausalLM parameters (the converter's inverse:
    gate/up are the even/odd columns of gate_up_proj, and HF's expert matrices are [In, Out])."""
    sd = {"model.embed_tokens.weight": tensors["token_embd.weight"], "lm_head.weight": tensors["output.weight"],
          "model.norm.weight": tensors["output_norm.weight"]}  # fmt: skip
    for i in range(n_layers):
        g, p = f"blk.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = tensors[g + "attn_norm.weight"]
        sd[p + "post_attention_layernorm.weight"] = tensors[g + "post_attention_norm.weight"]
        for ours, theirs in (
            ("attn_q", "q_proj"),
            ("attn_k", "k_proj"),
            ("attn_v", "v_proj"),
            ("attn_output", "o_proj"),
        ):
            sd[p + f"self_attn.{theirs}.weight"] = tensors[g + ours + ".weight"]
            sd[p + f"self_attn.{theirs}.bias"] = tensors[g + ours + ".bias"]
        sd[p + "self_attn.sinks"] = tensors[g + "attn_sinks.weight"]
        sd[p + "mlp.router.weight"] = tensors[g + "ffn_gate_inp.weight"]
        sd[p + "mlp.router.bias"] = tensors[g + "ffn_gate_inp.bias"]
        gate, up = tensors[g + "ffn_gate_exps.weight"], tensors[g + "ffn_up_exps.weight"]  # [E, F, D]
        gate_up = np.empty((gate.shape[0], gate.shape[2], 2 * gate.shape[1]))
        gate_up[..., 0::2], gate_up[..., 1::2] = gate.transpose(0, 2, 1), up.transpose(0, 2, 1)
        bias = np.empty((gate.shape[0], 2 * gate.shape[1]))
        bias[:, 0::2], bias[:, 1::2] = tensors[g + "ffn_gate_exps.bias"], tensors[g + "ffn_up_exps.bias"]
        sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.gate_up_proj_bias"] = gate_up, bias
        sd[p + "mlp.experts.down_proj"] = tensors[g + "ffn_down_exps.weight"].transpose(0, 2, 1)
        sd[p + "mlp.experts.down_proj_bias"] = tensors[g + "ffn_down_exps.bias"]
    return sd


def main() -> None:
    import torch
    import transformers

    sys.path.insert(0, str(HERE.parents[1]))  # tests/: the oracle helpers
    from model_oracles import copy_metadata, write_manifest, write_tensors

    from worker.gguf import open_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oracles", default=str(HERE.parents[2].parent / "shared" / "oracles"))
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="ff128")
    args = ap.parse_args()
    src_dir = Path(args.oracles) / "models" / "gpt-oss"
    src_manifest = json.loads((src_dir / "manifest.json").read_text())
    src = open_gguf(src_dir / "model-q8_0.gguf")
    rng = np.random.default_rng(SEED)

    cfg = dict(src_manifest["hf_config"], **VARIANTS[args.variant])
    out = HERE / args.variant
    out.mkdir(exist_ok=True)
    overrides = {
        "general.file_type": 15,  # MOSTLY_Q4_K_M
        "gpt-oss.expert_feed_forward_length": cfg["intermediate_size"],
        "gpt-oss.embedding_length": cfg["hidden_size"],
        "gpt-oss.attention.key_length": cfg["head_dim"],
        "gpt-oss.attention.value_length": cfg["head_dim"],
    }
    writer = gguf.GGUFWriter(str(out / "model-q4_k_m-mixed.gguf"), "gpt-oss")
    copy_metadata(writer, src, overrides)

    def tensors():
        for name in src.tensors:
            shape = shape_of(name, cfg)
            qtype = q4_k_m_type(name, shape[-1])
            yield name, shape, qtype, random_tensor(name, shape, qtype, rng)

    values, types = write_tensors(writer, tensors())

    config = transformers.GptOssConfig(
        **{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}
    )
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # the oracle manifest's hf_settings; grouped_mm has no float64
    model = transformers.GptOssForCausalLM(config).double().eval()
    state = {
        k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_state(values, config.num_hidden_layers).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ids = src_manifest["input"]["ids"]
    with torch.no_grad():
        result = model(torch.tensor([ids]), use_cache=False, output_router_logits=True)
    np.save(out / "logits-hf-f64.npy", result.logits[0].numpy())
    # Per layer and position: the router's k-th minus (k+1)-th logit. Where it is tiny, any rounding upstream may
    # pick the other expert, so reduced-precision paths are compared only where every layer's routing is clear.
    k = config.num_experts_per_tok
    top = [np.sort(r.numpy().reshape(len(ids), -1), axis=-1)[:, ::-1] for r in result.router_logits]
    np.save(out / "router-gaps-hf-f64.npy", np.stack([t[:, k - 1] - t[:, k] for t in top]))
    write_manifest(
        out / "manifest.json",
        __doc__.splitlines()[0],
        "../shared/oracles/models/gpt-oss (metadata, tokenizer, input ids, hf_config) with "
        f"the HF config changed by {VARIANTS[args.variant]}; random blocks with numpy seed {SEED}",
        "logits-hf-f64.npy: HF transformers GptOssForCausalLM, float64, eager attention, one forward "
        "pass over input.ids, on gguf.quants.dequantize of every tensor of model-q4_k_m-mixed.gguf; "
        "router-gaps-hf-f64.npy: the same pass's router logits, k-th minus (k+1)-th largest, [layer, position]",
        ids,
        types,
    )


if __name__ == "__main__":
    main()
