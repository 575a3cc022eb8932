"""The CPU weight layout (quant.Int8Blocks) and its matmul (ops.int8_matmul): the layout's values equal gguf-py's
reference dequantizer bit for bit in every block format, and the tiled matmul equals a float64 product of the
reference values, for decode and prefill row counts and for row counts that split into tiles badly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_quant import QUANTIZED, assert_bit_equal, random_raw, reference

from worker import cpu_kernels, ops
from worker.quant import Int8Blocks, QuantArray, cpu_layout, dequantize, quant_array, to_int8_blocks


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_layout_values_bit_exact(qtype: QT):
    shape = (7, 512)
    raw = random_raw(qtype, shape, seed=int(qtype) * 7)
    w = to_int8_blocks(quant_array(raw, qtype, shape))
    assert isinstance(w, Int8Blocks) and w.scale.dtype == jnp.float32
    nibbles = qtype in (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q2_K, QT.Q3_K)  # codes of 4 bits at most: two a byte
    assert (w.codes.dtype, w.codes.shape) == (jnp.int8, (7, 256) if nibbles else shape)
    assert w.block == (16 if qtype in (QT.Q2_K, QT.Q3_K, QT.Q6_K) else 32) and w.shape == shape
    assert (w.offset is not None) == (qtype in (QT.Q4_1, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q2_K))
    assert_bit_equal(jax.jit(dequantize)(w), reference(raw, qtype).reshape(shape))
    ids = jnp.asarray([[6, 0, 3]])
    assert_bit_equal(ops.embed(w, ids)[0], reference(raw, qtype).reshape(shape)[[6, 0, 3]])


@pytest.fixture
def tile_walk(monkeypatch):
    """ops.int8_matmul on XLA's tile walk for every row count (decode-sized calls take the CPU kernel where it
    builds: tests/test_cpu_kernels.py)."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    ops.int8_matmul.clear_cache()
    yield
    ops.int8_matmul.clear_cache()


def products(rows: int, n: int, k: int, qtype: QT, seed: int) -> tuple[jax.Array, np.ndarray]:
    """(the tiled matmul's result, the float64 product of the reference values) for x [rows, k], w [n, k]."""
    raw = random_raw(qtype, (n, k), seed)
    x = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    ours = ops.qmatmul(jnp.asarray(x), to_int8_blocks(quant_array(raw, qtype, (n, k))))
    return ours, x.astype(np.float64) @ reference(raw, qtype).reshape(n, k).astype(np.float64).T


@pytest.mark.parametrize(
    ("rows", "n", "k", "qtype"),
    [
        (1, 4096, 256, QT.Q8_0),  # decode: many tiles
        (1, 2 * 2099, 256, QT.Q4_K),  # 2099 is prime: the largest tile that divides is tiny, so a remainder tile
        (33, 300, 512, QT.Q6_K),  # a prefill-sized row count
        (1, 3, 64, QT.Q5_0),  # fewer rows than two tiles' worth
    ],
)
def test_tiled_matmul_matches_float64(rows: int, n: int, k: int, qtype: QT, monkeypatch, tile_walk):
    for limit in ("CPU_TILE_BYTES", "CPU_DECODE_TILE_BYTES"):  # at most 64 rows a tile: every path at small size
        monkeypatch.setattr(ops, limit, 64 * 4 * k)
    ops.int8_matmul.clear_cache()  # the tile bytes are read while tracing
    try:
        ours, ref = products(rows, n, k, qtype, seed=n + k)
    finally:
        ops.int8_matmul.clear_cache()
    assert ours.shape == (rows, n)
    err = np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 1e-5, err  # float32 accumulation


def test_few_rows_take_the_smaller_tile_and_the_tile_changes_no_bits(monkeypatch, tile_walk):
    """Decode-sized calls (up to CPU_DECODE_ROWS rows of x) walk tiles of CPU_DECODE_TILE_BYTES, prefill-sized ones
    the larger CPU_TILE_BYTES; a tile splits w's rows, never the sum over K, so either gives a row the same bits."""
    n, k = 4096, 640
    small, large = (ops._tile_rows(n, k, r) for r in (1, ops.CPU_DECODE_ROWS + 1))
    assert small * 4 * k <= ops.CPU_DECODE_TILE_BYTES < large * 4 * k <= ops.CPU_TILE_BYTES
    raw = random_raw(QT.Q8_0, (n, k), seed=5)
    w = to_int8_blocks(quant_array(raw, QT.Q8_0, (n, k)))
    x = jnp.asarray(np.random.default_rng(6).standard_normal((4, k)).astype(np.float32))
    outs = []
    for rows_limit in (0, 8):  # 4 rows: the large tile, then the small one
        monkeypatch.setattr(ops, "CPU_DECODE_ROWS", rows_limit)
        ops.int8_matmul.clear_cache()
        outs.append(np.asarray(ops.int8_matmul(x, w)))
    ops.int8_matmul.clear_cache()
    assert np.array_equal(outs[0], outs[1])


def test_cpu_layout_converts_matrices_only():
    raw = random_raw(QT.Q4_0, (4, 64), seed=1)
    experts = quant_array(random_raw(QT.Q4_0, (2, 4, 64), seed=2), QT.Q4_0, (2, 4, 64))
    matrix = quant_array(raw, QT.Q4_0, (4, 64))
    vector = jnp.ones(64, jnp.float32)
    out = cpu_layout({"m": matrix, "tied": [matrix], "experts": experts, "norm": vector})
    assert isinstance(out["m"], Int8Blocks) and out["tied"][0] is out["m"]  # one conversion for a shared matrix
    assert isinstance(out["experts"], QuantArray) and out["norm"] is vector  # ops.moe_matmul gathers expert planes
    assert all(p.is_deleted() for p in matrix.planes.values())  # the block planes are freed


def test_the_estimate_of_the_cpu_layout_is_what_loading_holds(oracles):
    """device.cpu_bytes (the CPU's KV pool is sized from it) against the loaded model's weights: Q4_K and Q6_K
    matrices in the layout (nibbles, 16-value blocks), the rest as planes."""
    import worker
    from worker import device as devices

    path = oracles / "models" / "qwen2" / "model-q4_k_m.gguf"
    m = worker.load(path, device="cpu", cpu_devices=1)
    assert devices.cpu_bytes(m.gguf) == pytest.approx(m.weight_bytes(), rel=0.01)


@pytest.mark.parametrize("available_gb", [None, 64.0, 0.002])
def test_the_cpu_kv_pool_takes_a_share_of_the_memory_the_host_can_give(oracles, monkeypatch, caplog, available_gb):
    """The pool holds --max-batch whole contexts where the host has room (or psutil cannot tell), else kv_memory of
    what the weights leave, but always one whole context; where the weights and that context do not fit, a warning
    says so."""
    import worker
    from worker import device as devices

    available = None if available_gb is None else int(available_gb * 1e9)
    monkeypatch.setattr(devices, "host_memory_available", lambda: available)
    path = oracles / "models" / "qwen2" / "model-q4_k_m.gguf"
    m = worker.load(path, device="cpu", cpu_devices=1, slots=256, max_batch=4)
    positions = m.runner.pages * m.runner.page_size
    tight = available_gb == 0.002  # 2 MB: less than the weights and one context's cache
    assert (256 <= positions < 2 * 256) if tight else positions >= 4 * 256
    assert ("host memory is tight" in caplog.text) == tight


def test_a_load_hands_the_host_memory_it_freed_back_to_the_os(oracles, monkeypatch):
    """device.host_memory_returned around worker.load: glibc's mmap threshold held at its default while the
    weights are converted (their freed temporaries then go back to the OS), then the heap trimmed and the threshold
    set to glibc's own ceiling for serving; also when the load fails. Elsewhere than glibc: nothing."""
    import platform

    import worker
    from worker import device as devices

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))
            return 1

    monkeypatch.setattr(devices, "_glibc", Libc)
    worker.load(oracles / "models" / "qwen2" / "model-q4_k_m.gguf", device="cpu", cpu_devices=1)
    want = [("mallopt", -3, 128 << 10), ("malloc_trim", 0), ("mallopt", -3, 32 << 20)]
    assert calls == want
    calls.clear()
    with pytest.raises(RuntimeError), devices.host_memory_returned():
        raise RuntimeError("a load that fails")
    assert calls == want
    monkeypatch.undo()
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert (devices._glibc() is not None) == on_glibc
