"""Pallas kernels behind worker.ops (GPU hot path). Each has a jax.numpy twin with the same signature and an
`interpret` switch; tests compare the two (CPU: interpret mode; GPU: compiled). Design notes: docs/kernels.md.

qmatvec: quantized matvec for decode (dense and expert-gathered, up to 64 rows, batch invariant). paged_attention:
batch-invariant decode attention over the paged KV cache (what the models run); decode_attention: the earlier
dense-cache decode kernel, kept only as bench/paged_attention.py's batch-1 comparison until the paged kernel's
batch-1 speed is settled (docs/PERFORMANCE.md). prefill_attention: flash attention for prompt chunks. moe_matmul:
grouped matmul for MoE prefill. tiling: the tiling rules they share.
"""
