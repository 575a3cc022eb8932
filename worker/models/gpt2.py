"""The gpt2 adapter: learned absolute position embeddings added to the token embeddings, pre-LayerNorm blocks
(with bias), fused q|k|v projection with bias, multi-head attention, a GELU (tanh approximation) MLP, and the
output tied to the token embeddings unless the file has its own `output.weight`.

Conventions llama.cpp's converter bakes into the file (checked against the oracles): HF's Conv1D weights are
transposed to [out, in]; `attn_qkv` rows are [q | k | v]; `ffn_norm` is HF's ln_2.
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

ARCHITECTURES = ("gpt2",)


@dataclass(frozen=True)
class GPT2Config:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int  # also the number of learned positions
    norm_eps: float

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


def config(gf: GGUFFile) -> GPT2Config:
    d_model = meta(gf, "embedding_length", cast=int)
    n_heads = meta(gf, "attention.head_count", cast=int)
    if "token_embd.weight" not in gf.tensors:
        raise load_error(gf, "missing tensor 'token_embd.weight'")
    if d_model % n_heads:
        raise load_error(gf, f"embedding_length {d_model} is not a multiple of head_count {n_heads}")
    return GPT2Config(
        n_layers=meta(gf, "block_count", cast=int),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        ffn_dim=meta(gf, "feed_forward_length", 4 * d_model, cast=int),
        vocab_size=gf.tensors["token_embd.weight"].shape[0],
        context_length=meta(gf, "context_length", cast=int),
        norm_eps=meta(gf, "attention.layer_norm_epsilon", 1e-5, cast=float),
    )


def weight_table(gf: GGUFFile, cfg: GPT2Config) -> dict[str, tuple[tuple, bool]]:
    d, f = cfg.d_model, cfg.ffn_dim
    check_shape(gf, "token_embd.weight", (cfg.vocab_size, d))
    check_shape(gf, "position_embd.weight", (cfg.context_length, d))
    table: dict[str, tuple[tuple, bool]] = {
        "token_embd.weight": (("token_embd",), True),
        "position_embd.weight": (("position_embd",), True),
        "output_norm.weight": (("output_norm",), True),
        "output_norm.bias": (("output_norm_b",), True),
        "output.weight": (("output",), False),
    }
    shapes = {
        "attn_qkv.weight": (3 * d, d),
        "attn_qkv.bias": (3 * d,),
        "attn_output.weight": (d, d),
        "attn_output.bias": (d,),
        "ffn_up.weight": (f, d),
        "ffn_up.bias": (f,),
        "ffn_down.weight": (d, f),
        "ffn_down.bias": (d,),
        "attn_norm.weight": (d,),
        "attn_norm.bias": (d,),
        "ffn_norm.weight": (d,),
        "ffn_norm.bias": (d,),
    }
    for i in range(cfg.n_layers):
        for name, shape in shapes.items():
            field = name.replace(".weight", "").replace(".bias", "_b")
            table[f"blk.{i}.{name}"] = (("layers", i, field), True)
            check_shape(gf, f"blk.{i}.{name}", shape)
    return table


def attention_block(lw: dict, cfg: GPT2Config, layer: int, x: jax.Array, positions: jax.Array, cache: KVCache
                    ) -> tuple[jax.Array, KVCache]:  # fmt: skip
    b, t, _ = x.shape
    nh, hd = cfg.n_heads, cfg.head_dim
    h = ops.layer_norm(x, lw["attn_norm"], lw["attn_norm_b"], cfg.norm_eps)
    q, k, v = jnp.split(ops.qmatmul(h, lw["attn_qkv"], lw["attn_qkv_b"]), 3, axis=-1)
    q, k, v = (a.reshape(b, t, nh, hd) for a in (q, k, v))
    cache = write_layer(cache, layer, k, v, positions)
    att = ops.cache_attention(q, cache, layer, positions, cfg.attn_scale)  # [B, T, H, D]
    return x + ops.qmatmul(att.reshape(b, t, nh * hd), lw["attn_output"], lw["attn_output_b"]), cache


def ffn_block(lw: dict, cfg: GPT2Config, x: jax.Array) -> jax.Array:
    h = ops.layer_norm(x, lw["ffn_norm"], lw["ffn_norm_b"], cfg.norm_eps)
    h = ops.gelu_tanh(ops.qmatmul(h, lw["ffn_up"], lw["ffn_up_b"]))
    return x + ops.qmatmul(h, lw["ffn_down"], lw["ffn_down_b"])


def forward(weights: dict, cfg: GPT2Config, tokens: jax.Array, positions: jax.Array, cache: KVCache
            ) -> tuple[jax.Array, KVCache]:  # fmt: skip
    # Padding positions carry the slot index S (see runner), which may be past the learned table: clamp the
    # lookup only; those rows are dropped anyway.
    table_pos = jnp.minimum(positions, cfg.context_length - 1)
    x = ops.embed(weights["token_embd"], tokens) + ops.embed(weights["position_embd"], table_pos)  # [B, T, D]
    for i, lw in enumerate(weights["layers"]):
        x, cache = attention_block(lw, cfg, i, x, positions, cache)
        x = ffn_block(lw, cfg, x)
    return x, cache


def logits(weights: dict, cfg: GPT2Config, hidden: jax.Array) -> jax.Array:
    h = ops.layer_norm(hidden, weights["output_norm"], weights["output_norm_b"], cfg.norm_eps)
    return ops.qmatmul(h, weights.get("output", weights["token_embd"]))
