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

from worker import hparams, ops
from worker.gguf import GGUFFile
from worker.kv_cache import KVCache
from worker.models import base
from worker.models.base import LayerWeights, ModelConfig, TensorSpec, meta


@dataclass(frozen=True, kw_only=True)
class GPT2Config(ModelConfig):
    ffn_dim: int  # context_length is also the number of learned positions


def config(gf: GGUFFile) -> GPT2Config:
    hparams.check(gf)  # before anything is sized from the metadata
    d_model = meta(gf, "embedding_length", cast=int)
    n_heads = meta(gf, "attention.head_count", cast=int)
    vocab = base.require_tensor(gf, "token_embd.weight").shape[0]
    return GPT2Config(
        arch=gf.architecture,
        n_layers=meta(gf, "block_count", cast=int),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        ffn_dim=meta(gf, "feed_forward_length", 4 * d_model, cast=int),
        vocab_size=vocab,
        context_length=meta(gf, "context_length", cast=int),
        norm_eps=meta(gf, "attention.layer_norm_epsilon", 1e-5, cast=float),
        attn_scale=1.0 / math.sqrt(d_model // n_heads),
    )


def weight_table(gf: GGUFFile, cfg: GPT2Config) -> dict[str, tuple[tuple, bool]]:
    d, f = cfg.d_model, cfg.ffn_dim
    model: TensorSpec = {
        "token_embd.weight": ((cfg.vocab_size, d), True),
        "position_embd.weight": ((cfg.context_length, d), True),
        "output_norm.weight": ((d,), True),
        "output_norm.bias": ((d,), True),
        "output.weight": ((cfg.vocab_size, d), False),
    }
    # Every GPT-2 weight, norms included, has a bias.
    shapes = {"attn_norm": (d,), "attn_qkv": (3 * d, d), "attn_output": (d, d), "ffn_norm": (d,), "ffn_up": (f, d),
              "ffn_down": (d, f)}  # fmt: skip
    return base.weight_table(gf, cfg.n_layers, model, base.with_biases(shapes))


def ffn_block(lw: LayerWeights, cfg: GPT2Config, x: jax.Array) -> jax.Array:
    h = ops.layer_norm(x, lw["ffn_norm"], lw["ffn_norm_b"], cfg.norm_eps)
    h = ops.gelu_tanh(ops.qmatmul(h, lw["ffn_up"], lw["ffn_up_b"], backend=cfg.backend))
    return ops.qmatmul(h, lw["ffn_down"], lw["ffn_down_b"], backend=cfg.backend, residual=x)


def forward(weights: dict, cfg: GPT2Config, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            table: jax.Array) -> tuple[jax.Array, KVCache]:  # fmt: skip
    # Padding positions lie past the page table (see runner), maybe past the learned position table: clamp the
    # lookup only; those rows are dropped anyway.
    table_pos = jnp.minimum(positions, cfg.context_length - 1)
    x = ops.embed(weights["token_embd"], tokens) + ops.embed(weights["position_embd"], table_pos)  # [B, T, D]
    return base.run_layers(weights, cfg, x, positions, cache, table, ffn_block)


def logits(weights: dict, cfg: GPT2Config, hidden: jax.Array) -> jax.Array:
    return base.logits(weights, cfg, hidden)
