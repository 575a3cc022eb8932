"""The llama family: llama, qwen2, phi3, gemma3. One forward pass with a few switches (biases, fused projections,
norm placement, activation, sliding windows, RoPE layout), configured from GGUF metadata.

Conventions llama.cpp's converter bakes into the file (checked against the oracles):
- llama: q/k rows permuted per head, so RoPE rotates adjacent pairs (NORM); qwen2/phi3/gemma3 rotate halves (NEOX).
- phi3: attn_qkv rows = [q | k | v]; ffn_up rows = [gate | up].
- gemma3: norm weights already include Gemma's +1; embeddings scaled by sqrt(d_model) on input only (the tied
  output uses the unscaled table); q/k RMS-normed per head before RoPE; post-attention and post-FFN norms;
  sliding layers use rope.freq_base_swa (default 10000), global layers rope.freq_base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from worker import ops
from worker.gguf import GGUFFile
from worker.kv_cache import KVCache, write_layer
from worker.models.base import check_shape, load_error, meta

ARCHITECTURES = ("llama", "qwen2", "phi3", "gemma3")


@dataclass(frozen=True)
class LlamaConfig:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_dim: int
    rope_neox: bool
    rope_base: float
    rope_base_swa: float
    sliding_window: int | None
    sliding_layers: tuple[bool, ...]
    embed_scale: float | None
    attn_scale: float
    gelu: bool  # GEGLU (gemma3) instead of SwiGLU
    gemma_norms: bool  # q/k norms and post-attention / post-FFN norms
    logit_softcap: float | None

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.sliding_layers[layer]


def config(gf: GGUFFile) -> LlamaConfig:
    arch = gf.architecture
    n_layers = meta(gf, "block_count", cast=int)
    d_model = meta(gf, "embedding_length", cast=int)
    n_heads = meta(gf, "attention.head_count", cast=int)
    n_kv = meta(gf, "attention.head_count_kv", n_heads, cast=int)
    head_dim = meta(gf, "attention.key_length", d_model // n_heads, cast=int)
    if n_heads % n_kv:
        raise load_error(gf, f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    vocab = len(gf.metadata.get("tokenizer.ggml.tokens", ())) or gf.tensors["token_embd.weight"].shape[0]
    window = meta(gf, "attention.sliding_window", 0, cast=int) or None
    if arch == "gemma3":
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
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=meta(gf, "feed_forward_length", cast=int),
        vocab_size=gf.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in gf.tensors else vocab,
        context_length=meta(gf, "context_length", cast=int),
        norm_eps=meta(gf, "attention.layer_norm_rms_epsilon", 1e-5, cast=float),
        rope_dim=meta(gf, "rope.dimension_count", head_dim, cast=int),
        rope_neox=arch != "llama",
        rope_base=rope_base,
        rope_base_swa=meta(gf, "rope.freq_base_swa", 10000.0 if arch == "gemma3" else rope_base, cast=float),
        sliding_window=window,
        sliding_layers=sliding,
        embed_scale=math.sqrt(d_model) if arch == "gemma3" else None,
        attn_scale=1.0 / math.sqrt(head_dim),
        gelu=arch == "gemma3",
        gemma_norms=arch == "gemma3",
        logit_softcap=meta(gf, "final_logit_softcapping", None, cast=float),
    )


def weight_table(gf: GGUFFile, cfg: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    tied = "output.weight" not in gf.tensors
    table: dict[str, tuple[tuple, bool]] = {
        "token_embd.weight": (("token_embd",), True),
        "output_norm.weight": (("output_norm",), True),
        "output.weight": (("output",), not tied),
    }
    h, k, d = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_model
    for i in range(cfg.n_layers):
        L = ("layers", i)

        def add(name, field, required=True, shape=None, i=i, L=L):
            table[f"blk.{i}.{name}"] = ((*L, field), required)
            if shape is not None:
                check_shape(gf, f"blk.{i}.{name}", shape)

        add("attn_norm.weight", "attn_norm")
        add("ffn_norm.weight", "ffn_norm")
        add("attn_output.weight", "wo", shape=(d, h))
        add("ffn_down.weight", "w_down", shape=(d, cfg.ffn_dim))
        if cfg.arch == "phi3":
            add("attn_qkv.weight", "wqkv", shape=(h + 2 * k, d))
            add("ffn_up.weight", "w_gate_up", shape=(2 * cfg.ffn_dim, d))
        else:
            add("attn_q.weight", "wq", shape=(h, d))
            add("attn_k.weight", "wk", shape=(k, d))
            add("attn_v.weight", "wv", shape=(k, d))
            add("ffn_gate.weight", "w_gate", shape=(cfg.ffn_dim, d))
            add("ffn_up.weight", "w_up", shape=(cfg.ffn_dim, d))
        for b in ("q", "k", "v"):  # qwen2 has them; harmless to accept elsewhere
            add(f"attn_{b}.bias", f"b{b}", required=cfg.arch == "qwen2")
        if cfg.gemma_norms:
            add("attn_q_norm.weight", "q_norm")
            add("attn_k_norm.weight", "k_norm")
            add("post_attention_norm.weight", "post_attn_norm")
            add("post_ffw_norm.weight", "post_ffn_norm")
    return table


def attention_block(
    lw: dict, cfg: LlamaConfig, layer: int, x: jax.Array, positions: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    b, t, _ = x.shape
    hd, nh, nk = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    h = ops.rms_norm(x, lw["attn_norm"], cfg.norm_eps)
    if "wqkv" in lw:
        qkv = ops.qmatmul(h, lw["wqkv"])
        q, k, v = jnp.split(qkv, [nh * hd, (nh + nk) * hd], axis=-1)
    else:
        q = ops.qmatmul(h, lw["wq"], lw.get("bq"))
        k = ops.qmatmul(h, lw["wk"], lw.get("bk"))
        v = ops.qmatmul(h, lw["wv"], lw.get("bv"))
    q, k, v = q.reshape(b, t, nh, hd), k.reshape(b, t, nk, hd), v.reshape(b, t, nk, hd)
    if cfg.gemma_norms:
        q = ops.rms_norm(q, lw["q_norm"], cfg.norm_eps)
        k = ops.rms_norm(k, lw["k_norm"], cfg.norm_eps)
    sliding = cfg.is_sliding(layer)
    base = cfg.rope_base_swa if sliding and cfg.gemma_norms else cfg.rope_base
    inv_freq = ops.rope_inv_freq(cfg.rope_dim, base)
    q = ops.rope(q, positions, inv_freq, cfg.rope_neox)
    k = ops.rope(k, positions, inv_freq, cfg.rope_neox)
    cache = write_layer(cache, layer, k, v, positions)
    window = cfg.sliding_window if sliding else None
    att = ops.cache_attention(q, cache, layer, positions, cfg.attn_scale, window)  # [B, T, H, D]
    out = ops.qmatmul(att.reshape(b, t, nh * hd), lw["wo"])
    if cfg.gemma_norms:
        out = ops.rms_norm(out, lw["post_attn_norm"], cfg.norm_eps)
    return x + out, cache


def ffn_block(lw: dict, cfg: LlamaConfig, x: jax.Array) -> jax.Array:
    h = ops.rms_norm(x, lw["ffn_norm"], cfg.norm_eps)
    if "w_gate_up" in lw:
        gate, up = jnp.split(ops.qmatmul(h, lw["w_gate_up"]), 2, axis=-1)
    else:
        gate, up = ops.qmatmul(h, lw["w_gate"]), ops.qmatmul(h, lw["w_up"])
    act = ops.gelu_tanh(gate) if cfg.gelu else jax.nn.silu(gate)
    out = ops.qmatmul(act * up, lw["w_down"])
    if cfg.gemma_norms:
        out = ops.rms_norm(out, lw["post_ffn_norm"], cfg.norm_eps)
    return x + out


def forward(
    weights: dict, cfg: LlamaConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    x = ops.embed(weights["token_embd"], tokens)  # [B, T, D]
    if cfg.embed_scale is not None:
        x = x * jnp.float32(cfg.embed_scale)
    for i, lw in enumerate(weights["layers"]):
        x, cache = attention_block(lw, cfg, i, x, positions, cache)
        x = ffn_block(lw, cfg, x)
    return x, cache


def logits(weights: dict, cfg: LlamaConfig, hidden: jax.Array) -> jax.Array:
    h = ops.rms_norm(hidden, weights["output_norm"], cfg.norm_eps)
    out = ops.qmatmul(h, weights.get("output", weights["token_embd"]))
    if cfg.logit_softcap:
        out = jnp.tanh(out / cfg.logit_softcap) * cfg.logit_softcap
    return out
