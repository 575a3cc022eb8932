"""The batched decode kernels and their batch invariance: a row's result is the same bits alone or among other rows,
wherever it sits and whatever the others hold (docs/kernels.md, "Batch invariance").

qmatvec / moe_matvec against float64 products of gguf-py's dequantized weights (independent of our planes and
kernels) for 1..64 rows; paged_decode_attention against a dense reference built independently: each row's pages
gathered by numpy into a contiguous cache and ops.attention on the CPU backend. On the CPU in Pallas interpret mode
on small shapes; `gpu`-marked twins compile them on real-model shapes (`just test-gpu tests/test_batched_kernels.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from model_oracles import manifest
from test_pallas_qmatvec import TOL, dense_tol, random_weight

import worker
from worker import ops
from worker.kv_cache import KVCache, write_layer
from worker.pallas_kernels import paged_attention as pa
from worker.pallas_kernels import qmatvec as qmv
from worker.sampling import SamplingParams

ROWS = (1, 3, 8, 9, 64)
DENSE_ROWS = (*ROWS, 70)  # 70: two of the tensor-core kernel's 64-row tiles
TOKENS = 64  # the MoE cases' tokens


def relative_error(y, ref: np.ndarray, bound: np.ndarray) -> float:
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape and np.isfinite(y).all()
    return float(np.max(np.abs(y - ref) / (bound + 1e-30)))


def dense_case(qtype: QT, n: int, k: int, seed: int):
    w, w64 = random_weight(qtype, (n, k), seed)
    x = np.random.default_rng(seed).standard_normal((max(DENSE_ROWS), k)).astype(np.float32)
    return w, w64, x


def dense_call(interpret: bool, **tiles):
    return jax.jit(lambda x, w: qmv.qmatvec(x, w, interpret=interpret, **tiles))


def check_dense(qtype: QT, n: int, k: int, interpret: bool, tiles: dict) -> None:
    """Every row count of ROWS against float64, then each row of the larger calls against the same row alone."""
    w, w64, x = dense_case(qtype, n, k, seed=n + k)
    call = dense_call(interpret, **tiles)
    x64 = x.astype(np.float64)
    ref, bound = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T  # rows are independent: slices serve every call
    alone = {r: np.asarray(call(x[r : r + 1], w))[0] for r in (0, 2, 8, 63, 69)}
    for rows in DENSE_ROWS:
        y = np.asarray(call(x[:rows], w))
        err = relative_error(y, ref[:rows], bound[:rows])
        # the per-row kernel: float32; the tensor-core one: float16 operands on the GPU, or where `f16` asks
        tol = dense_tol(interpret and not tiles.get("f16")) if tiles.get("tensor_cores", True) else TOL
        assert err <= tol, f"{qtype.name} [{n}, {k}] M={rows}: error {err:.3g} of sum|x||w|"
        for r, want in alone.items():
            if r < rows:
                np.testing.assert_array_equal(y[r], want, err_msg=f"row {r} of {rows} differs from the row alone")


def check_dense_neighbours(qtype: QT, n: int, k: int, interpret: bool, tiles: dict) -> None:
    """One row at several places among rows of different content: the same bits each time."""
    w, _, x = dense_case(qtype, n, k, seed=3)
    call = dense_call(interpret, **tiles)
    want = np.asarray(call(x[:1], w))[0]
    rng = np.random.default_rng(4)
    for rows, at in ((2, 1), (9, 8), (17, 5), (64, 40)):
        batch = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 100)).astype(np.float32)
        batch[at] = x[0]
        np.testing.assert_array_equal(np.asarray(call(batch, w))[at], want, err_msg=f"at {at} of {rows}")


def check_moe(qtype: QT, e: int, n: int, k: int, sel: int, interpret: bool, tiles: dict) -> None:
    """Tokens x `sel` selected experts against float64, and each token's rows against the token alone."""
    experts, w64 = random_weight(qtype, (e, n, k), seed=n)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((TOKENS, k)).astype(np.float32)
    ids = np.stack([rng.permutation(e)[:sel] for _ in range(TOKENS)]).astype(np.int32)
    x64 = x.astype(np.float64)
    # Per expert, not w64[ids] (gpt-oss: 256 copies of a [2880, 2880] float64 expert).
    ref, bound = np.zeros((TOKENS, sel, n)), np.zeros((TOKENS, sel, n))
    for expert in np.unique(ids):
        m, s = np.nonzero(ids == expert)
        ref[m, s] = x64[m] @ w64[expert].T
        bound[m, s] = np.abs(x64[m]) @ np.abs(w64[expert]).T
    call = jax.jit(lambda x, w, i: qmv.moe_matvec(x, w, i, interpret=interpret, **tiles))
    alone = {t: np.asarray(call(x[t : t + 1], experts, ids[t : t + 1]))[0] for t in (0, 8, 63)}
    for tokens in ROWS:
        y = np.asarray(call(x[:tokens], experts, ids[:tokens]))
        err = relative_error(y, ref[:tokens], bound[:tokens])
        assert err <= TOL, f"{qtype.name} experts [{e}, {n}, {k}] M={tokens}: error {err:.3g} of sum|x||w|"
        for t, want in alone.items():
            if t < tokens:
                np.testing.assert_array_equal(y[t], want, err_msg=f"token {t} of {tokens} differs from it alone")


# The dense kernels: the tensor-core dot, the same swapped (qmatvec.Plan.swap), and the per-row kernel. On the CPU
# the swapped dot keeps one row tile of 16 (several tiles, the last partly masked): its tile follows the rows by
# default, and interpret mode's dot (XLA's on the CPU) sums a [BN, K] @ [K, 16] in another order than a [K, 64], so a
# row alone would not have its bits among 64 there. Whether the card's wgmma does is for the gpu test, which takes
# the default.
SWAPPED = {"tensor_cores": True, "swap": True}
KERNELS = pytest.mark.parametrize(
    "kind",
    [{"tensor_cores": True}, SWAPPED | {"row_tile": 16}, {"tensor_cores": False}],
    ids=["tensor-cores", "swapped", "per-row"],
)
GPU_KERNELS = pytest.mark.parametrize(
    "kind", [{"tensor_cores": True}, SWAPPED, {"tensor_cores": False}], ids=["tensor-cores", "swapped", "per-row"]
)


# The GPU's tensor-core arithmetic (each row over its power of two, float16 operands, float32 sums) in interpret
# mode, so that the CPU tests the branch the GPU runs: row lengths of the real files, Gemma 3's 640 (Q5_0, 20
# blocks: a masked K tail) and gpt-oss's 2880 (MXFP4), and a K-quant.
F16_CASES = [(QT.Q5_0, 48, 640), (QT.MXFP4, 48, 2880), (QT.Q4_K, 48, 1024)]


@pytest.mark.parametrize(("qtype", "n", "k"), F16_CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("kind", [{}, SWAPPED | {"row_tile": 16}], ids=["dot", "swapped"])
def test_qmatvec_gpu_arithmetic_against_float64_and_alone(qtype, n, k, kind):
    check_dense(qtype, n, k, True, {"tensor_cores": True, "f16": True} | kind)
    check_dense_neighbours(qtype, n, k, True, {"tensor_cores": True, "f16": True} | kind)


# The tensor-core kernel's tiles made as its inline PTX makes them (qmatvec.Plan.ptx; interpret mode runs the asm's
# float32 twin): the K-quants (their scales rounded to float16 first), and the 32-value formats with a masked K tail
# (20 and 11 blocks).
PTX_CASES = [(QT.Q4_K, 48, 1024), (QT.Q5_K, 40, 768), (QT.Q6_K, 40, 768), (QT.Q4_0, 48, 640), (QT.Q4_1, 40, 352),
             (QT.Q5_0, 48, 640), (QT.Q5_1, 40, 352), (QT.Q8_0, 40, 352)]  # fmt: skip


@pytest.mark.parametrize(("qtype", "n", "k"), PTX_CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("kind", [{}, SWAPPED | {"row_tile": 16}], ids=["dot", "swapped"])
def test_qmatvec_ptx_tiles_against_float64_and_alone(qtype, n, k, kind):
    check_dense(qtype, n, k, True, {"tensor_cores": True, "f16": True, "ptx": True} | kind)
    check_dense_neighbours(qtype, n, k, True, {"tensor_cores": True, "f16": True, "ptx": True} | kind)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q5_0], ids=lambda t: t.name)
def test_ptx_tiles_give_the_float_paths_bits_where_the_files_halves_are_the_scales(qtype):
    """Q8_0, Q4_0 and Q5_0 by the PTX build's arithmetic (interpret mode: its twin, whose values the asm's equal,
    tests/test_pallas_qmatvec.py): d * (q - c) rounded once, the float path's value, so the same products."""
    w, _, x = dense_case(qtype, 40, 352, seed=7)
    tiles = {"tensor_cores": True, "f16": True}
    ptx, plain = (np.asarray(dense_call(True, **tiles, ptx=p)(x[:9], w)) for p in (True, False))
    np.testing.assert_array_equal(ptx, plain)


@pytest.mark.parametrize("ptx", [False, True], ids=["float", "ptx"])
def test_q4k_swapped_dot_loading_its_scales_whole_gives_the_same_bits(monkeypatch, ptx):
    """Q4_K's swapped dot loads its scales and mins whole and picks a part by a select and a sum with zero
    (qmatvec._k_scale_min's `whole`): the same values, so the same bits as a part at a time."""
    w, _, x = dense_case(QT.Q4_K, 48, 1024, seed=9)
    tiles = {"tensor_cores": True, "f16": True, "swap": True, "row_tile": 16, "ptx": ptx}
    whole = np.asarray(dense_call(True, **tiles)(x[:5], w))
    fmt = qmv.FORMATS[QT.Q4_K]
    assert fmt.swapped_factors is not None and fmt.swapped_ptx is not None
    monkeypatch.setitem(qmv.FORMATS, QT.Q4_K, dataclasses.replace(fmt, swapped_factors=None, swapped_ptx=None))
    jax.clear_caches()  # the kernel entries are jitted: trace them again with the format as patched
    np.testing.assert_array_equal(np.asarray(dense_call(True, **tiles)(x[:5], w)), whole)
    jax.clear_caches()


# Forced tiles: 3 row blocks with masked rows past N = 40, 3 K splits of 2 steps each, the last partly masked.
SPLIT_TILES = {32: dict(block_n=16, chunk=2, splits=3), 256: dict(block_n=16, chunk=1, splits=2)}


@KERNELS
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_qmatvec_rows_1_to_70_against_float64_and_alone(qtype, kind):
    sb = qmv.FORMATS[qtype].sb
    check_dense(qtype, 40, 11 * sb if sb == 32 else 3 * sb, True, SPLIT_TILES[sb] | kind)


@KERNELS
def test_qmatvec_row_bits_do_not_depend_on_neighbours_or_place(kind):
    """The default plan (2 K splits on this shape), as the model runs it."""
    assert qmv.plan(QT.Q4_0, 48, 512).splits == 2
    check_dense_neighbours(QT.Q4_0, 48, 512, True, kind)


def test_qmatvec_plan_ignores_the_batch():
    """The default plan is the batch-1 one (docs/kernels.md) and has no row-count input."""
    p = qmv.plan(QT.Q8_0, 896, 896)
    assert (p.block_n, p.chunk, p.splits) == (32, 8, 4)


def test_the_swapped_dot_is_the_float_tensor_cores_option():
    """Plan.swap: the float tensor-core kernel's; the per-row kernels and the int8-x dot refuse it."""
    w, _, x = dense_case(QT.Q8_0, 48, 64, seed=1)
    with pytest.raises(ValueError, match="swap"):
        qmv.qmatvec(x[:1], w, interpret=True, tensor_cores=False, swap=True)
    with pytest.raises(ValueError, match="swap"):
        qmv.plan(QT.Q8_0, 896, 896, int8_x=True, swap=True)


def test_moe_matvec_any_number_of_pairs_against_float64_and_alone():
    check_moe(QT.MXFP4, 4, 40, 128, 2, True, dict(block_n=16, chunk=1, splits=2))


# ---- paged decode attention ----


def pool(rng, layers, pages, page_size, kv_heads, d, dtype=np.float32):
    """A page pool whose null page 0 and unused slots hold NaN: a read of them would show in the output."""
    shape = (layers, pages, page_size, kv_heads, d)
    k = rng.standard_normal(shape, np.float32).astype(dtype)
    v = rng.standard_normal(shape, np.float32).astype(dtype)
    k[:, 0], v[:, 0] = np.nan, np.nan
    return k, v


def assign_pages(rng, positions, page_size, pages, width, k_pages, v_pages):
    """Each row's pages: distinct, shuffled over the pool (never page 0); table entries past a row's last page 0.
    Slots past a row's position on its last page are set to NaN (stale data of an earlier owner)."""
    needed = [p // page_size + 1 for p in positions]
    free = rng.permutation(np.arange(1, pages))[: sum(needed)]
    table = np.zeros((len(positions), width), np.int32)
    at = 0
    for b, (p, n) in enumerate(zip(positions, needed, strict=True)):
        table[b, :n] = free[at : at + n]
        at += n
        last = table[b, n - 1]
        k_pages[:, last, p % page_size + 1 :] = np.nan
        v_pages[:, last, p % page_size + 1 :] = np.nan
    return table


def dense_reference(q, k_pages, v_pages, table, positions, layer, scale, window, sinks) -> np.ndarray:
    """Each row alone: its visible pages copied (numpy) into a contiguous [1, S, K, D] cache, then ops.attention
    on the CPU backend (the model's attention)."""
    page_size = k_pages.shape[2]
    out = []
    for b, p in enumerate(positions):
        n = p // page_size + 1
        kc = np.concatenate([k_pages[layer, table[b, i]] for i in range(n)])[None, : p + 1]
        vc = np.concatenate([v_pages[layer, table[b, i]] for i in range(n)])[None, : p + 1]
        pos = np.array([[p]], np.int32)
        out.append(ops.attention(q[b : b + 1], kc, vc, pos, scale, window, sinks, backend="cpu"))
    return np.concatenate([np.asarray(o) for o in out])


# (heads, kv heads, head dim, page size, positions, window, sinks, pages per split)
PAGED_CASES = [
    (4, 1, 32, 16, [0, 15, 16, 47, 100], None, False, 1),  # 1 token, page boundaries (last, first slot), G = 4
    (8, 2, 64, 16, [31, 200, 5], 40, True, 2),  # window across splits, sinks, G = 4
    (2, 2, 96, 32, [63, 64, 9], None, True, None),  # D = 96 padded to 128, 32-slot pages in 16-slot tiles
    (7, 1, 64, 32, [90, 0], 50, False, 1),  # G = 7 (qwen2.5), a window starting inside a page
]


@pytest.mark.parametrize(("h", "kh", "d", "page_size", "positions", "window", "sinks", "per_split"), PAGED_CASES)
def test_paged_attention_against_dense_reference(h, kh, d, page_size, positions, window, sinks, per_split):
    rng = np.random.default_rng(h * d + page_size)
    b, pages, layer = len(positions), 40, 1
    k_pages, v_pages = pool(rng, 2, pages, page_size, kh, d)
    width = max(p // page_size + 1 for p in positions) + 2  # wider than the longest row: unused entries are 0
    table = assign_pages(rng, positions, page_size, pages, width, k_pages, v_pages)
    q = rng.standard_normal((b, 1, h, d)).astype(np.float32)
    sink = rng.standard_normal(h).astype(np.float32) * 2 if sinks else None
    pos, scale = np.array(positions, np.int32), d**-0.5
    ref = dense_reference(q, k_pages, v_pages, table, positions, layer, scale, window, sink)
    run = jax.jit(
        lambda q, kp, vp, t, p, layer: pa.paged_decode_attention(
            q, kp, vp, t, p, layer, scale, window, None if sink is None else jnp.asarray(sink),
            interpret=True, pages_per_split=per_split,
        )
    )  # fmt: skip
    y = np.asarray(run(q, k_pages, v_pages, table, pos, jnp.int32(layer)))  # the layer traced, as in a scan
    assert y.shape == (b, 1, h, d) and y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    twin = pa.paged_decode_attention_twin(q, k_pages, v_pages, table, pos, layer, scale, window, sink)
    np.testing.assert_allclose(np.asarray(twin), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", [PAGED_CASES[1], PAGED_CASES[3]], ids=["G4-window-sinks", "G7"])
def test_paged_attention_on_a_half_precision_pool_matches_float32(case, dtype):
    """The split kernel's tensor-core products (q and the weights as sums of half-precision terms) against the dense
    float32 reference on the same half-precision keys and values, as tight as the float32 pool's test."""
    h, kh, d, page_size, positions, window, sinks, per_split = case
    rng = np.random.default_rng(d + page_size)
    b, pages, layer = len(positions), 40, 1
    k_pages, v_pages = pool(rng, 2, pages, page_size, kh, d, dtype)
    table = assign_pages(rng, positions, page_size, pages, max(p // page_size + 1 for p in positions), k_pages,
                         v_pages)  # fmt: skip
    q = (rng.standard_normal((b, 1, h, d)) * 3).astype(np.float32)
    sink = rng.standard_normal(h).astype(np.float32) if sinks else None
    pos, scale = np.array(positions, np.int32), d**-0.5
    ref = dense_reference(q, k_pages.astype(np.float32), v_pages.astype(np.float32), table, positions, layer, scale,
                          window, sink)  # fmt: skip
    y = pa.paged_decode_attention(q, k_pages, v_pages, table, pos, layer, scale, window,
                                  None if sink is None else jnp.asarray(sink), interpret=True,
                                  pages_per_split=per_split)  # fmt: skip
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", PAGED_CASES)
def test_paged_attention_writing_the_new_key_gives_the_bits_of_a_write_first(case, dtype):
    check_writing(*case, dtype, interpret=True)


def check_writing(h, kh, d, page_size, positions, window, sinks, per_split, dtype, interpret: bool,
                  neox: bool | None = None) -> None:  # fmt: skip
    """`new_kv`: the kernel stores each row's new key and value at its position and attends with them, against
    kv_cache.write_layer's scatter then the kernel: the same pages (the null page aside: nothing reads it) and the
    same bits of every live row, the slot at a row's position holding stale NaN before (the kernel must not read
    it), beside a row without pages (all null) and a padding row (position -1). `neox` (True/False): the kernel
    also rotates q and the new key (`rope`), against ops.rope before the scatter (YaRN's mscale on cos and sin)."""
    rng = np.random.default_rng(h * d + page_size + 1)
    pages, layer = 40, 1
    k_pages, v_pages = pool(rng, 2, pages, page_size, kh, d, dtype)
    width = max(p // page_size + 1 for p in positions) + 2
    table = assign_pages(rng, positions, page_size, pages, width, k_pages, v_pages)
    for b, p in enumerate(positions):  # the slot the new key goes to: stale, not finite
        k_pages[:, table[b, p // page_size], p % page_size] = np.nan
        v_pages[:, table[b, p // page_size], p % page_size] = np.nan
    table = np.concatenate([table, np.zeros((2, width), np.int32)])  # a row without pages, a padding row
    pos = np.array([*positions, 5, -1], np.int32)
    b = len(pos)
    q = rng.standard_normal((b, 1, h, d)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((b, 1, kh, d)).astype(np.float32) for _ in range(2))
    sink = jnp.asarray(rng.standard_normal(h).astype(np.float32)) if sinks else None
    scale, tiles = d**-0.5, dict(interpret=interpret, pages_per_split=per_split)
    cache = KVCache(jnp.asarray(k_pages), jnp.asarray(v_pages))
    rotation = {}
    q_in, k_in = jnp.asarray(q), jnp.asarray(k_new)
    if neox is not None:
        inv_freq, mscale, at = ops.rope_inv_freq(d, 10000.0), 1.25, jnp.asarray(pos[:, None])
        rotation = dict(rope=tuple(a[:, 0] for a in ops.rope_tables(at, inv_freq, mscale)), neox=neox)
        q_in, k_in = (ops.rope(a, at, inv_freq, neox, mscale) for a in (q_in, k_in))
    written = write_layer(cache, layer, k_in, jnp.asarray(v_new), jnp.asarray(table), jnp.asarray(pos[:, None]))
    want = pa.paged_decode_attention(q_in, written.k, written.v, table, pos, layer, scale, window, sink, **tiles)
    got, k_out, v_out = jax.jit(
        lambda kp, vp: pa.paged_decode_attention(q, kp, vp, table, pos, jnp.int32(layer), scale, window, sink,
                                                 new_kv=(k_new, v_new), **tiles, **rotation),
        donate_argnums=(0, 1),
    )(jnp.asarray(k_pages), jnp.asarray(v_pages))  # fmt: skip
    live = len(positions)
    assert np.isfinite(np.asarray(got)[:live]).all()
    if neox is None:
        np.testing.assert_array_equal(np.asarray(got)[:live], np.asarray(want)[:live])
        for out, ref in ((k_out, written.k), (v_out, written.v)):
            np.testing.assert_array_equal(np.asarray(out)[:, 1:], np.asarray(ref)[:, 1:])  # page 0: the null page
        return
    # The rotation's products and sums are ops.rope's, but a compiler may fuse a product with its sum (one rounding
    # less) in one and not the other: float32's rounding apart, and the stored keys one step of the cache's dtype.
    np.testing.assert_allclose(np.asarray(got)[:live], np.asarray(want)[:live], rtol=1e-5, atol=1e-5)
    step = float(np.finfo(dtype).eps)
    for out, ref in ((k_out, written.k), (v_out, written.v)):
        np.testing.assert_allclose(np.asarray(out, np.float32)[:, 1:], np.asarray(ref, np.float32)[:, 1:],
                                   rtol=step, atol=step)  # fmt: skip


STORING = [("qwen2", "model-q8_0.gguf"), ("gpt-oss", "model-mxfp4_moe.gguf"), ("gemma3", "model-q8_0.gguf")]


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "norm"])
@pytest.mark.parametrize("case", PAGED_CASES[:3])
def test_paged_attention_rotating_q_and_the_new_key_follows_ropes(case, neox):
    check_writing(*case, np.float16, interpret=True, neox=neox)


@pytest.mark.parametrize(("arch", "file"), STORING)
def test_a_model_storing_its_keys_in_the_attention_kernel_decodes_the_same_bits(oracles, monkeypatch, arch, file):
    """The keys stored by the attention kernel (WORKER_KV_WRITE_KERNEL=1 on the interpret backend): a greedy
    generation's ids and log-probabilities, every decode step's cache writes in the attention kernel, are those of the
    scatters (sinks and sliding windows: gpt-oss; sliding windows and a head dim of 256: gemma3)."""
    check_storing_model(oracles / "models" / arch, file, monkeypatch, dict(device="cpu", backend="interpret"))


ROTATING = [("qwen2", "model-q8_0.gguf"), ("llama", "model-q8_0.gguf"), ("gpt-oss", "model-mxfp4_moe.gguf"),
            ("gemma3", "model-q8_0.gguf")]  # fmt: skip


@pytest.mark.parametrize(("arch", "file"), ROTATING)
def test_a_model_rotating_in_the_attention_kernel_follows_ropes(oracles, monkeypatch, arch, file):
    """RoPE in the attention kernel (WORKER_ROPE_KERNEL=1 on the interpret backend): a greedy generation gives the
    same ids as ops.rope before it, its log-probabilities within float32's rounding, every decode step's layers
    rotating in the kernel (NEOX pairs: qwen2, gpt-oss with YaRN's mscale, gemma3 after its q/k norms; adjacent
    pairs: llama)."""
    check_rotating_model(oracles / "models" / arch, file, monkeypatch, dict(device="cpu", backend="interpret"))


def check_rotating_model(d, file: str, monkeypatch, where: dict) -> None:
    ids = manifest(d)["input"]["ids"]
    monkeypatch.setattr(ops, "_kv_write_kernel", {"gpu": True, "interpret": True})

    def generate(on: bool) -> tuple[list[int], list]:
        monkeypatch.setattr(ops, "_rope_kernel", {"gpu": on, "interpret": on})
        calls, real = [], pa.paged_decode_attention
        monkeypatch.setattr(pa, "paged_decode_attention", lambda *a, **k: calls.append(k.get("rope") is not None)
                            or real(*a, **k))  # fmt: skip
        m = worker.load(d / file, **where, slots=256, max_batch=2)
        logprobs: list = []
        out = list(m.generate_ids(ids, 6, SamplingParams(logprobs=True), stop_at_eos=False, logprobs=logprobs))
        assert calls and all(c == on for c in calls), calls
        return out, [lp for step in logprobs for _, lp in step.top]

    (ids_on, lp_on), (ids_off, lp_off) = generate(True), generate(False)
    assert ids_on == ids_off
    np.testing.assert_allclose(lp_on, lp_off, rtol=1e-4, atol=1e-4)


def check_storing_model(d, file: str, monkeypatch, where: dict) -> None:
    ids = manifest(d)["input"]["ids"]

    def generate(on: bool) -> tuple[list[int], list]:
        monkeypatch.setattr(ops, "_kv_write_kernel", {"gpu": on, "interpret": on})
        calls, real = [], pa.paged_decode_attention
        monkeypatch.setattr(pa, "paged_decode_attention", lambda *a, **k: calls.append("new_kv" in k) or real(*a, **k))
        # On the GPU a pool of 65,536 positions (tens of MB): far more than any program's own temporaries (a
        # prefill's logits and activations, 0.6-2.3 MB on these models: more than the 540 KB of 512 positions), so
        # a program that copied the pool would show it in warm_up's most extra bytes.
        gpu = where["device"] == "gpu"
        m = worker.load(d / file, **where, slots=256, max_batch=2, **(dict(kv_tokens=1 << 16) if gpu else {}))
        if on and gpu:  # the pool updated in place by the kernels: no program copies it
            warmed = m.warm_up().fields()["most_extra_bytes"]
            assert max(warmed.values()) < m.runner.cache_bytes() // 4, warmed
        logprobs: list = []
        out = list(m.generate_ids(ids, 6, SamplingParams(logprobs=True), stop_at_eos=False, logprobs=logprobs))
        assert calls and all(c == on for c in calls), calls  # every decode step's layers took the route asked
        return out, logprobs

    assert generate(True) == generate(False)


def invariance_case(rng, d=32, page_size=16):
    h, kh, pages = 4, 2, 64
    k_pages, v_pages = pool(rng, 1, pages, page_size, kh, d)
    positions = [70, 3, 16, 130, 47, 0]
    table = assign_pages(rng, positions, page_size, pages, 16, k_pages, v_pages)
    q = rng.standard_normal((len(positions), 1, h, d)).astype(np.float32)
    sinks = rng.standard_normal(h).astype(np.float32)
    return q, k_pages, v_pages, table, np.array(positions, np.int32), sinks


def check_paged_invariance(attend) -> None:
    """`attend(q, k_pages, v_pages, table, positions, sinks)`: each row alone (its table cut to its own pages) and
    at other places of batches of other widths gives the same bits."""
    rng = np.random.default_rng(0)
    q, k_pages, v_pages, table, pos, sinks = invariance_case(rng)
    full = np.asarray(attend(q, k_pages, v_pages, table, pos, sinks))
    assert np.isfinite(full).all()
    for b in (0, 2, 5):  # 70 tokens, a page boundary, 1 token
        own = pos[b] // k_pages.shape[2] + 1
        alone = np.asarray(attend(q[b : b + 1], k_pages, v_pages, table[b : b + 1, :own], pos[b : b + 1], sinks))
        np.testing.assert_array_equal(full[b], alone[0], err_msg=f"row {b} alone vs among {len(pos)}")
    # Reversed rows, a wider table, other rows' q scaled up: row b's bits do not move.
    wide = np.pad(table[::-1], ((0, 0), (0, 9)))
    other = np.asarray(attend(q[::-1] * np.where(np.arange(len(pos)) == 2, 1, 50)[:, None, None, None].astype(
        np.float32), k_pages, v_pages, wide, pos[::-1].copy(), sinks))  # fmt: skip
    np.testing.assert_array_equal(other[2], full[len(pos) - 3])


def test_paged_attention_row_bits_do_not_depend_on_the_batch():
    def attend(q, kp, vp, t, p, s):
        return pa.paged_decode_attention(q, kp, vp, t, p, 0, 0.25, 64, s, interpret=True, pages_per_split=2)

    check_paged_invariance(jax.jit(attend))


def test_paged_attention_twin_row_bits_do_not_depend_on_the_batch():
    """The CPU path: the jnp twin is batch invariant too (XLA:CPU on these shapes)."""
    check_paged_invariance(jax.jit(lambda q, kp, vp, t, p, s: pa.paged_decode_attention_twin(q, kp, vp, t, p, 0, 0.25,
                                                                                             64, s)))  # fmt: skip


def test_paged_attention_padding_rows_and_shapes():
    """A row at position -1 (batch padding) gives zeros; shapes the kernel does not take are refused clearly."""
    rng = np.random.default_rng(1)
    q, k_pages, v_pages, table, pos, _ = invariance_case(rng)
    pos[1] = -1
    y = np.asarray(pa.paged_decode_attention(q, k_pages, v_pages, table, pos, 0, 0.25, interpret=True))
    assert np.isfinite(y).all() and not y[1].any() and y[0].any()
    assert pa.fits((64, 1, 64, 64), (24, 4096, 16, 8, 64)) and pa.fits((1, 1, 4, 256), (18, 99, 32, 1, 256))
    assert not pa.fits((1, 2, 4, 64), (1, 8, 16, 1, 64))  # prefill
    assert not pa.fits((1, 1, 34, 64), (1, 8, 16, 2, 64))  # G = 17
    assert not pa.fits((1, 1, 4, 64), (1, 8, 8, 1, 64))  # pages of 8 slots
    with pytest.raises(ValueError, match="page_table"):
        pa.paged_decode_attention(q, k_pages, v_pages, table[:2], pos, 0, 0.25, interpret=True)


# ---- compiled on the GPU ----


@pytest.fixture
def gpu_backend():
    if jax.default_backend() != "gpu":
        pytest.fail("gpu-marked tests need a GPU visible to JAX (run them with `just test-gpu`)")


@pytest.mark.gpu
@pytest.mark.parametrize("case", PAGED_CASES)
def test_gpu_paged_attention_writing_the_new_key_gives_the_bits_of_a_write_first(gpu_backend, case):
    check_writing(*case, np.float16, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "norm"])
@pytest.mark.parametrize("case", PAGED_CASES)
def test_gpu_paged_attention_rotating_q_and_the_new_key_follows_ropes(gpu_backend, case, neox):
    check_writing(*case, np.float16, interpret=False, neox=neox)


@pytest.mark.gpu
@pytest.mark.parametrize(("arch", "file"), ROTATING[:3])
def test_gpu_a_model_rotating_in_the_attention_kernel_follows_ropes(gpu_backend, oracles, monkeypatch, arch, file):
    check_rotating_model(oracles / "models" / arch, file, monkeypatch, dict(device="gpu"))


@pytest.mark.gpu
@pytest.mark.parametrize(("arch", "file"), STORING)
def test_gpu_model_storing_its_keys_in_the_attention_kernel_decodes_the_same_bits(
    gpu_backend, oracles, monkeypatch, arch, file
):
    check_storing_model(oracles / "models" / arch, file, monkeypatch, dict(device="gpu"))


# Real decode shapes: qwen2.5-0.5b q/o, phi3 down (K-quant), gpt-oss q (Q8_0, K = 2880: masked K tail).
GPU_DENSE = [(QT.Q8_0, 896, 896), (QT.Q6_K, 3072, 8192), (QT.Q8_0, 4096, 2880), (QT.Q4_K, 896, 4864)]


@pytest.mark.gpu
@GPU_KERNELS
@pytest.mark.parametrize(("qtype", "n", "k"), GPU_DENSE, ids=lambda v: getattr(v, "name", str(v)))
def test_gpu_qmatvec_batched_against_float64_and_alone(gpu_backend, qtype, n, k, kind):
    check_dense(qtype, n, k, False, kind)
    check_dense_neighbours(qtype, n, k, False, kind)


# Real decode shapes of the formats Plan.ptx takes: phi3-mini's qkv (Q4_K and Q5_K) and Q6_K down, qwen2.5-0.5b's
# Q4_K down, the 32-value formats at qwen2.5's 896 (28 blocks), and gpt-oss's Q8_0 q (K = 2880: a masked K tail).
GPU_PTX = [(QT.Q4_K, 9216, 3072), (QT.Q5_K, 9216, 3072), (QT.Q6_K, 3072, 8192), (QT.Q4_K, 896, 4864),
           (QT.Q4_0, 4864, 896), (QT.Q4_1, 896, 896), (QT.Q5_0, 4864, 896), (QT.Q5_1, 896, 896),
           (QT.Q8_0, 4096, 2880)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [{"tensor_cores": True}, SWAPPED], ids=["tensor-cores", "swapped"])
@pytest.mark.parametrize(("qtype", "n", "k"), GPU_PTX, ids=lambda v: getattr(v, "name", str(v)))
def test_gpu_qmatvec_ptx_tiles_against_float64_and_alone(gpu_backend, qtype, n, k, kind):
    """The inline PTX on the card (WORKER_DENSE_PTX): within the float16 operands' tolerance of float64 (a value
    paired with another's scale by Triton's packing would be far off), and a row's bits alone and among others."""
    check_dense(qtype, n, k, False, kind | {"ptx": True})
    check_dense_neighbours(qtype, n, k, False, kind | {"ptx": True})


@pytest.mark.gpu
def test_gpu_moe_matvec_gpt_oss_experts_batched(gpu_backend):
    """gpt-oss-20b's down experts [32, 2880, 2880] MXFP4, top-4, up to 64 tokens (256 pairs)."""
    check_moe(QT.MXFP4, 32, 2880, 2880, 4, False, {})


# (heads, kv heads, head dim, window, sinks): qwen2.5-0.5b, phi3-mini, gemma3-270m (sliding), gpt-oss-20b (both).
GPU_PAGED = [(14, 2, 64, None, False), (32, 32, 96, None, False), (4, 1, 256, 512, False), (64, 8, 64, 128, True),
             (64, 8, 64, None, True)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize(("h", "kh", "d", "window", "sinks"), GPU_PAGED)
def test_gpu_paged_attention_batch_64(gpu_backend, h, kh, d, window, sinks, page_size):
    """64 rows of 1..1500 tokens over a float16 pool: against the dense reference and the twin, and a few rows alone
    (their own table width) and 8 rows as a batch of 8, bitwise."""
    rng = np.random.default_rng(h + d + page_size)
    positions = [0, page_size - 1, page_size, 1499, *rng.integers(1, 1500, 60)]
    pages = sum(p // page_size + 1 for p in positions) + 8
    k_pages, v_pages = pool(rng, 2, pages, page_size, kh, d, np.float16)
    width = 1500 // page_size + 1
    table = assign_pages(rng, positions, page_size, pages, width, k_pages, v_pages)
    q = rng.standard_normal((64, 1, h, d)).astype(np.float32)
    sink = jnp.asarray(rng.standard_normal(h).astype(np.float32)) if sinks else None
    pos, scale = np.array(positions, np.int32), d**-0.5
    kp, vp = jax.device_put(k_pages), jax.device_put(v_pages)
    attend = jax.jit(lambda q, kp, vp, t, p, layer: pa.paged_decode_attention(q, kp, vp, t, p, layer, scale, window,
                                                                              sink))  # fmt: skip

    def run(q, t, p, layer):
        return attend(q, kp, vp, t, p, layer)

    y = np.asarray(run(q, table, pos, jnp.int32(1)))
    assert np.isfinite(y).all()
    some = [0, 1, 2, 3, 10]
    ref = dense_reference(q[some], k_pages.astype(np.float32), v_pages.astype(np.float32), table[some], pos[some],
                          1, scale, window, None if sink is None else np.asarray(sink))  # fmt: skip
    np.testing.assert_allclose(y[some], ref, rtol=1e-4, atol=1e-4)
    twin = jax.jit(lambda q, kp, vp, t, p: pa.paged_decode_attention_twin(q, kp, vp, t, p, 1, scale, window, sink))
    np.testing.assert_allclose(y, np.asarray(twin(q, kp, vp, table, pos)), rtol=1e-4, atol=1e-4)
    for b in some:
        own = pos[b] // page_size + 1
        alone = np.asarray(run(q[b : b + 1], table[b : b + 1, :own], pos[b : b + 1], jnp.int32(1)))
        np.testing.assert_array_equal(y[b], alone[0], err_msg=f"row {b} alone vs among 64")
    few = np.asarray(run(q[3:11], table[3:11], pos[3:11], jnp.int32(1)))
    np.testing.assert_array_equal(few, y[3:11])
