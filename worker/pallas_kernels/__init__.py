"""Pallas kernels behind worker.ops (GPU hot path). Each has a jax.numpy twin with the same signature and an
`interpret` switch; tests compare the two (CPU: interpret mode; GPU: compiled).

qmatvec: quantized matvec for decode (dense and expert-gathered).
"""
