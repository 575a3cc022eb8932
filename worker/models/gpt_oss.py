"""The gpt-oss adapter, as the real gpt-oss-20b GGUF is laid out: RMSNorm pre-norm blocks; grouped-query
attention with q/k/v/o biases, per-head attention sinks, NeoX RoPE with YaRN scaling, and a sliding window on
every other layer; a mixture-of-experts FFN whose router picks the top-k experts, with the clamped SwiGLU.

Conventions (checked against the oracles, ../shared/oracles/models/gpt-oss):
- Layers alternate sliding / full attention starting with sliding: llama.cpp hard-codes this, no GGUF key.
- YaRN without rounding the correction range (HF's `truncate=False`, the real model's config); llama.cpp
  rounds it.
- Router: logits = W x + b, softmax over the top-k logits only; the output is the weighted sum of those
  experts.
- Experts: `ffn_gate_exps` / `ffn_up_exps` are the even / odd columns of HF's interleaved gate_up_proj; a
  fused `ffn_gate_up_exps` (llama.cpp's merged layout) holds [gate | up] rows per expert.
- Expert weights stay in their stored format (MXFP4 in the real file); ops.moe_matmul dequantizes only what a
  step needs. On a GPU decoding many rows, a bf16 copy made at load serves the decode steps
  (`decode_experts`, worker/model.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from worker import hparams, ops
from worker.gguf import GGUFFile
from worker.kv_cache import KVCache
from worker.models import base
from worker.models.base import LayerWeights, ModelConfig, Rope, TensorSpec, meta

# The clamped SwiGLU's constants: fixed by the model (HF swiglu_limit / swiglu_alpha), not in GGUF metadata.
SWIGLU_LIMIT = 7.0
SWIGLU_ALPHA = 1.702


@dataclass(frozen=True, kw_only=True)
class GptOssConfig(ModelConfig):
    rope_base: float
    yarn_factor: float  # 1.0: plain RoPE
    yarn_original_context: int
    yarn_beta_fast: float
    yarn_beta_slow: float
    sliding_window: int | None
    n_experts: int
    n_experts_used: int
    expert_ffn_dim: int
    fused_gate_up: bool  # the file's own merged ffn_gate_up_exps (else the parts, which may fuse at load: base.FUSIONS)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if layer % 2 == 0 else None

    def rope(self, layer: int) -> Rope:
        inv_freq, mscale = ops.yarn_inv_freq(self.head_dim, self.rope_base, self.yarn_factor,
                                             self.yarn_original_context, self.yarn_beta_fast, self.yarn_beta_slow,
                                             truncate=False)  # fmt: skip
        return Rope(inv_freq, neox=True, mscale=mscale)


def config(gf: GGUFFile) -> GptOssConfig:
    hparams.check(gf)  # before anything is sized from the metadata
    n_heads = meta(gf, "attention.head_count", cast=int)
    n_kv = meta(gf, "attention.head_count_kv", n_heads, cast=int)
    vocab = base.require_tensor(gf, "token_embd.weight").shape[0]
    head_dim = meta(gf, "attention.key_length", cast=int)
    context = meta(gf, "context_length", cast=int)
    yarn = meta(gf, "rope.scaling.type", "none", cast=str) == "yarn"
    n_experts = meta(gf, "expert_count", cast=int)
    n_used = meta(gf, "expert_used_count", cast=int)
    return GptOssConfig(
        arch=gf.architecture,
        n_layers=meta(gf, "block_count", cast=int),
        d_model=meta(gf, "embedding_length", cast=int),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        context_length=context,
        norm_eps=meta(gf, "attention.layer_norm_rms_epsilon", 1e-5, cast=float),
        attn_scale=1.0 / math.sqrt(head_dim),
        rope_base=meta(gf, "rope.freq_base", 10000.0, cast=float),
        yarn_factor=meta(gf, "rope.scaling.factor", cast=float) if yarn else 1.0,
        yarn_original_context=meta(gf, "rope.scaling.original_context_length", context, cast=int),
        yarn_beta_fast=meta(gf, "rope.scaling.yarn_beta_fast", 32.0, cast=float),
        yarn_beta_slow=meta(gf, "rope.scaling.yarn_beta_slow", 1.0, cast=float),
        sliding_window=meta(gf, "attention.sliding_window", 0, cast=int) or None,
        n_experts=n_experts,
        n_experts_used=n_used,
        expert_ffn_dim=meta(gf, "expert_feed_forward_length", cast=int),
        fused_gate_up="blk.0.ffn_gate_up_exps.weight" in gf.tensors,
    )


def weight_table(gf: GGUFFile, cfg: GptOssConfig) -> dict[str, tuple[tuple, bool]]:
    d, e, f = cfg.d_model, cfg.n_experts, cfg.expert_ffn_dim
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    model: TensorSpec = {
        "token_embd.weight": ((cfg.vocab_size, d), True),
        "output_norm.weight": ((d,), True),
        "output.weight": ((cfg.vocab_size, d), True),
    }
    shapes = {
        "attn_norm": (d,),
        "post_attention_norm": (d,),
        "attn_sinks": (cfg.n_heads,),
        "attn_q": (q, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, q),
        "ffn_gate_inp": (e, d),
        "ffn_down_exps": (e, d, f),
    }
    if cfg.fused_gate_up:
        shapes["ffn_gate_up_exps"] = (e, 2 * f, d)
    else:
        shapes |= {"ffn_gate_exps": (e, f, d), "ffn_up_exps": (e, f, d)}
    biased = set(shapes) - {"attn_norm", "post_attention_norm", "attn_sinks"}
    return base.weight_table(gf, cfg.n_layers, model, base.with_biases(shapes, biased))


def clamped_swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    gate = jnp.minimum(gate, SWIGLU_LIMIT)
    up = jnp.clip(up, -SWIGLU_LIMIT, SWIGLU_LIMIT)
    return (up + 1.0) * gate * jax.nn.sigmoid(SWIGLU_ALPHA * gate)


def _experts(lw: LayerWeights, cfg: GptOssConfig, name: str, x: jax.Array, expert_ids: jax.Array, per_token: bool,
             live: jax.Array | None) -> jax.Array:  # fmt: skip
    """The selected experts' projection with its bias: [M, k, Out]."""
    bias = jnp.take(ops.as_f32(lw[f"{name}_b"]), expert_ids, axis=0)
    copy = lw.get("decode_experts", {}).get(name)
    return ops.moe_matmul(x, lw[name], expert_ids, backend=cfg.backend, per_token=per_token, live=live,
                          decode_copy=copy) + bias  # fmt: skip


def moe_block(lw: LayerWeights, cfg: GptOssConfig, x: jax.Array, live: jax.Array | None = None) -> jax.Array:
    """The routed experts with the residual. `live` [B, T]: the tokens whose output is used (`base.live_tokens`);
    the grouped kernel skips the others' experts."""
    b, t, d = x.shape
    h = base.rms_norm(x, lw["post_attention_norm"], cfg)
    # On [B, T, D]: the router's kernel route then follows each sequence's T, not the tokens of the whole dispatch.
    router = ops.qmatmul(h, lw["ffn_gate_inp"], lw["ffn_gate_inp_b"], backend=cfg.backend, exact=True)
    h, router = h.reshape(b * t, d), router.reshape(b * t, -1)  # [M, D], [M, E]
    top, expert_ids = ops.top_k(router, cfg.n_experts_used, cfg.backend, cfg.mesh)  # [M, k], largest first
    # softmax over the k selected, its sum in a fixed order (ops.row_sum: batch invariance)
    expert_weights = jnp.exp(top - top[:, :1])
    expert_weights = expert_weights / ops.row_sum(expert_weights)
    # A decode step's tokens (one per sequence) take the per-token path whatever their number (batch invariance).
    flat_live = None if live is None else live.reshape(b * t)
    experts = partial(_experts, lw, cfg, expert_ids=expert_ids, per_token=t == 1, live=flat_live)
    if "ffn_gate_up_exps" in lw:  # the file's merged layout, or the parts fused at load (base.FUSIONS)
        gate, up = jnp.split(experts("ffn_gate_up_exps", h), 2, axis=-1)
    else:
        gate, up = experts("ffn_gate_exps", h), experts("ffn_up_exps", h)
    out = experts("ffn_down_exps", clamped_swiglu(gate, up))  # [M, k, D]
    # The weighted sum of the k experts' outputs as a chain of elementwise products and adds: one order per token
    # whatever the dispatch's tokens (an einsum is a dot, whose order XLA picks from the whole shape).
    out = sum(
        (expert_weights[:, j, None] * out[:, j] for j in range(1, out.shape[1])), expert_weights[:, 0, None] * out[:, 0]
    )
    return x + out.reshape(b, t, d)


def forward(weights: dict, cfg: GptOssConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache,
            table: jax.Array) -> tuple[jax.Array, KVCache]:  # fmt: skip
    x = ops.embed(weights["token_embd"], tokens)  # [B, T, D]
    live = base.live_tokens(cache, table, positions)
    return base.run_layers(weights, cfg, x, positions, cache, table, partial(moe_block, live=live))


def logits(weights: dict, cfg: GptOssConfig, hidden: jax.Array) -> jax.Array:
    return base.logits(weights, cfg, hidden)
