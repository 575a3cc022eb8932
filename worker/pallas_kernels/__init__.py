"""Pallas kernels behind worker.ops (GPU hot path). Each has a jax.numpy twin with the same signature and an
`interpret` switch; tests compare the two (CPU: interpret mode; GPU: compiled). Design notes: docs/kernels.md.

qmatvec: quantized matvec for decode (dense and expert-gathered, up to 64 rows, batch invariant). decode_attention
/ prefill_attention: attention over the KV cache; paged_attention: batch-invariant decode attention over a paged
KV cache. moe_matmul: grouped matmul for MoE prefill. tiling: the tiling rules they share.
"""
