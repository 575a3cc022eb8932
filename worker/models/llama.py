"""The llama family: llama, qwen2, qwen3, phi3, gemma3. The shared layer loop (models/base.py) with a gated FFN; what
differs per architecture and is not in the GGUF metadata is one `Traits` row in ARCHITECTURES.

Conventions llama.cpp's converter bakes into the file (checked against the oracles):
- llama: q/k rows permuted per head, so RoPE rotates adjacent pairs (NORM); the others rotate halves (NEOX).
- phi3: attn_qkv rows = [q | k | v]; ffn_up rows = [gate | up].
- gemma3: norm weights already include Gemma's +1; embeddings scaled by sqrt(d_model) on input only (the tied
  output uses the unscaled table); post-attention and post-FFN norms; sliding layers use rope.freq_base_swa
  (default 10000), global layers rope.freq_base.
- gemma3, qwen3: q/k RMS-normed per head before RoPE (`attn_q_norm`, `attn_k_norm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from worker import hparams, ops
from worker.gguf import GGUFFile
from worker.kv_cache import KVCache
from worker.models import base
from worker.models.base import LayerWeights, ModelConfig, Rope, TensorSpec, meta


@dataclass(frozen=True)
class Traits:
    """An architecture's conventions that the file's metadata does not state."""

    rope_neox: bool = True
    qkv_bias: bool = False  # q/k/v biases required (qwen2)
    qk_norm: bool = False  # per-head RMS norms of q and k
    post_norms: bool = False  # norms on the attention and FFN outputs (gemma3)
    fused: bool = False  # attn_qkv and ffn_up = [gate | up] (phi3)
    geglu: bool = False  # GELU (tanh) gate instead of SiLU
    scaled_embeddings: bool = False  # input embeddings times sqrt(d_model)
    gemma_windows: bool = False  # llama.cpp's Gemma 3 defaults: every 6th layer global, rope base 1e4 when sliding


ARCHITECTURES: dict[str, Traits] = {
    "llama": Traits(rope_neox=False),
    "qwen2": Traits(qkv_bias=True),
    "qwen3": Traits(qk_norm=True),
    "phi3": Traits(fused=True),
    "gemma3": Traits(qk_norm=True, post_norms=True, geglu=True, scaled_embeddings=True, gemma_windows=True),
}


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    traits: Traits
    ffn_dim: int
    rope_dim: int
    rope_base: float
    rope_base_swa: float  # the base on sliding layers
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]
    embed_scale: float | None
    logit_softcap: float | None

    def rope(self, layer: int) -> Rope:
        base_freq = self.rope_base_swa if self.window(layer) else self.rope_base
        return Rope(ops.rope_inv_freq(self.rope_dim, base_freq), self.traits.rope_neox)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.sliding_window is not None and self.sliding_layers[layer] else None


def config(gf: GGUFFile) -> LlamaConfig:
    hparams.check(gf)  # before anything is sized from the metadata
    arch = gf.architecture
    traits = ARCHITECTURES[arch]
    n_layers = meta(gf, "block_count", cast=int)
    d_model = meta(gf, "embedding_length", cast=int)
    n_heads = meta(gf, "attention.head_count", cast=int)
    n_kv = meta(gf, "attention.head_count_kv", n_heads, cast=int)
    head_dim = meta(gf, "attention.key_length", d_model // n_heads, cast=int)
    vocab = len(gf.metadata.get("tokenizer.ggml.tokens", ())) or base.require_tensor(gf, "token_embd.weight").shape[0]
    if traits.gemma_windows:
        pattern = meta(gf, "attention.sliding_window_pattern", None)
        if pattern is None:  # llama.cpp's default for Gemma 3: every 6th layer is global
            sliding = tuple(i % 6 < 5 for i in range(n_layers))
        else:
            sliding = tuple(bool(pattern[i % len(pattern)]) for i in range(n_layers))
    else:
        sliding = (True,) * n_layers  # phi3's window (when non-zero) applies to every layer
    rope_base = meta(gf, "rope.freq_base", 10000.0, cast=float)
    return LlamaConfig(
        arch=arch,
        traits=traits,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=meta(gf, "feed_forward_length", cast=int),
        vocab_size=gf.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in gf.tensors else vocab,
        context_length=meta(gf, "context_length", cast=int),
        norm_eps=meta(gf, "attention.layer_norm_rms_epsilon", 1e-5, cast=float),
        attn_scale=1.0 / math.sqrt(head_dim),
        post_norms=traits.post_norms,
        rope_dim=meta(gf, "rope.dimension_count", head_dim, cast=int),
        rope_base=rope_base,
        rope_base_swa=meta(gf, "rope.freq_base_swa", 10000.0 if traits.gemma_windows else rope_base, cast=float),
        sliding_window=meta(gf, "attention.sliding_window", 0, cast=int) or None,
        sliding_layers=sliding,
        embed_scale=math.sqrt(d_model) if traits.scaled_embeddings else None,
        logit_softcap=meta(gf, "final_logit_softcapping", None, cast=float),
    )


def weight_table(gf: GGUFFile, cfg: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    tr, hd = cfg.traits, cfg.head_dim
    h, k, d, f = cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.d_model, cfg.ffn_dim
    model: TensorSpec = {
        "token_embd.weight": ((cfg.vocab_size, d), True),
        "output_norm.weight": ((d,), True),
        "output.weight": ((cfg.vocab_size, d), False),
    }
    layer: TensorSpec = {
        "attn_norm.weight": ((d,), True),
        "ffn_norm.weight": ((d,), True),
        "attn_output.weight": ((d, h), True),
        "ffn_down.weight": ((d, f), True),
    }
    if tr.fused:
        layer |= {"attn_qkv.weight": ((h + 2 * k, d), True), "ffn_up.weight": ((2 * f, d), True)}
    else:
        layer |= {
            "attn_q.weight": ((h, d), True),
            "attn_k.weight": ((k, d), True),
            "attn_v.weight": ((k, d), True),
            "ffn_gate.weight": ((f, d), True),
            "ffn_up.weight": ((f, d), True),
        }
    # q/k/v biases: qwen2 has them; accepted elsewhere (a converter may write them for any llama-like model).
    layer |= {f"attn_{p}.bias": ((n,), tr.qkv_bias) for p, n in (("q", h), ("k", k), ("v", k))}
    if tr.qk_norm:
        layer |= {"attn_q_norm.weight": ((hd,), True), "attn_k_norm.weight": ((hd,), True)}
    if tr.post_norms:
        layer |= {"post_attention_norm.weight": ((d,), True), "post_ffw_norm.weight": ((d,), True)}
    return base.weight_table(gf, cfg.n_layers, model, layer)


def ffn_block(lw: LayerWeights, cfg: LlamaConfig, x: jax.Array) -> jax.Array:
    be = cfg.backend
    if "ffn_gate" in lw:
        h = base.rms_norm(x, lw["ffn_norm"], cfg)
        gate, up = ops.qmatmul(h, lw["ffn_gate"], backend=be), ops.qmatmul(h, lw["ffn_up"], backend=be)
        gate_up = jnp.concatenate([gate, up], axis=-1)
    else:  # ffn_up is [gate | up] (phi3's file, or fused at load): one product after the norm
        gate_up = base.normed_matmul(x, lw["ffn_norm"], None, lw["ffn_up"], None, cfg)
    # act(gate) * up is the down projection's input, computed by the kernel that rounds it where it can (`glu`)
    glu = "gelu_tanh" if cfg.traits.geglu else "silu"
    if not cfg.post_norms:  # the residual add with the product (ops.qmatmul's `residual`)
        return ops.qmatmul(gate_up, lw["ffn_down"], backend=be, residual=x, glu=glu)
    return x + base.rms_norm(ops.qmatmul(gate_up, lw["ffn_down"], backend=be, glu=glu), lw["post_ffw_norm"], cfg)


def forward(weights: dict, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            table: jax.Array) -> tuple[jax.Array, KVCache]:  # fmt: skip
    x = ops.embed(weights["token_embd"], tokens)  # [B, T, D]
    if cfg.embed_scale is not None:
        x = x * jnp.float32(cfg.embed_scale)
    return base.run_layers(weights, cfg, x, positions, cache, table, ffn_block)


def logits(weights: dict, cfg: LlamaConfig, hidden: jax.Array) -> jax.Array:
    return base.logits(weights, cfg, hidden, cfg.logit_softcap)
