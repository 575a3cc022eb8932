"""worker/pallas_kernels/moe_matmul.py: the grouped MoE matmul against float64 products of gguf-py's dequantized
experts (an independent reference) and against its jax.numpy twin. On the CPU in Pallas interpret mode, on small
shapes with empty, skewed and uneven groups, several row tiles per group and a masked K tail; through ops on the
tiny gpt-oss model; `gpu`-marked variants compile it with Triton on gpt-oss-20b's expert shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants
from model_oracles import manifest, rel_err
from ptx import bf16_round, packed_bytes, packed_halves, run_ptx, unpacked_halves
from test_pallas_qmatvec import random_raw, random_weight

import worker
from worker import ops
from worker.pallas_kernels import moe_matmul as mm
from worker.pallas_kernels import qmatvec as qmv
from worker.pallas_kernels.tiling import ALL
from worker.quant import QuantArray, quant_array, widened

# bf16 x (and, but for MXFP4, bf16 weights): each product is off by at most ~2^-8 relative, so the sum by at
# most 2^-8 of sum |x| * |w|. Kernel and twin round the same operands: only the float32 order differs (on the GPU
# also the tensor cores' accumulation against cuBLAS's, over K = 2880: a looser gate, still far below any
# misplaced row or tile).
TOL_F64, TOL_TWIN, TOL_TWIN_GPU = 2.0**-8, 1e-5, 1e-4


def assert_close(y, ref, bound, tol: float, what: str) -> None:
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert np.isfinite(y).all(), what
    err = float(np.max(np.abs(y - ref) / (bound + 1e-30)))
    assert err <= tol, f"{what}: max error {err:.3g} of sum|x||w| (tolerance {tol:.3g})"


def routed(m: int, k_sel: int, e: int, seed: int, skew: str) -> np.ndarray:
    """expert_ids [m, k_sel], distinct per token: "uniform", "subset" (only experts 1, 2, e-2 and e-1: the rest empty),
    "one" (every token's first pick is expert 0: one group of m pairs, the others uneven)."""
    rng = np.random.default_rng(seed)
    if skew == "subset":
        rows = [rng.permutation([1, 2, e - 2, e - 1])[:k_sel] for _ in range(m)]
    elif skew == "one":
        rows = [[0, *rng.permutation(np.arange(1, e))[: k_sel - 1]] for _ in range(m)]
    else:
        rows = [rng.permutation(e)[:k_sel] for _ in range(m)]
    return np.array(rows, np.int32)


# (format, E, k, M, In, Out, shared x, routing, tile overrides): In = 3 MXFP4 blocks under a 4-block chunk and
# 5 blocks under 2-block chunks mask a K tail; block_m 16 gives groups of several tiles; Out 96 -> 3 column tiles.
CASES = [
    (QT.MXFP4, 8, 4, 13, 96, 64, True, "uniform", dict(block_m=16)),
    (QT.MXFP4, 4, 4, 7, 160, 96, False, "one", dict(block_m=16, chunk=2)),
    (QT.MXFP4, 6, 2, 40, 64, 32, True, "subset", {}),
    (QT.Q8_0, 5, 2, 9, 128, 64, False, "uniform", dict(block_m=16)),
    (QT.Q4_K, 4, 2, 5, 256, 32, True, "one", {}),
    # the swapped dot (moe_matmul.Plan.swap): 16-row tiles of pairs as the MMA's N, 64-column expert tiles as its M
    (QT.MXFP4, 8, 4, 13, 96, 128, True, "uniform", dict(block_m=16, swap=True)),
    (QT.Q8_0, 5, 2, 9, 128, 64, False, "one", dict(block_m=16, swap=True)),
    # K in two splits (moe_matmul.Plan.splits): 5 two-block chunks of MXFP4 as 3 + 2 steps (the second split masks a
    # step past K); 3 Q4_K super-blocks as 2 + 1
    (QT.MXFP4, 8, 4, 13, 320, 64, True, "uniform", dict(block_m=16, swap=True, chunk=2, splits=2)),
    (QT.Q4_K, 4, 2, 5, 768, 32, False, "one", dict(splits=2)),
    # K's 10 one-block chunks in 4 leaves of 3 steps (the last masks 2), 2 leaves a split (moe_matmul.Plan.leaves)
    (QT.MXFP4, 8, 4, 13, 320, 64, True, "uniform", dict(block_m=16, swap=True, chunk=1, splits=2, leaves=4)),
]


@pytest.mark.parametrize(("qtype", "e", "k_sel", "m", "k", "n", "shared", "skew", "tiles"), CASES,
                         ids=lambda v: getattr(v, "name", None))  # fmt: skip
def test_kernel_matches_float64_and_twin(qtype, e, k_sel, m, k, n, shared, skew, tiles):
    experts, w64 = random_weight(qtype, (e, n, k), seed=m)
    ids = routed(m, k_sel, e, seed=n, skew=skew)
    rng = np.random.default_rng(k)
    x = rng.standard_normal((m, k) if shared else (m, k_sel, k)).astype(np.float32)
    p = mm.plan(qtype, n, k, **tiles)
    assert n % p.block_n == 0 and p.leaves * p.steps * p.chunk * qmv.FORMATS[qtype].sb >= k
    assert p.splits == tiles.get("splits", 1) and p.leaves == tiles.get("leaves", p.splits)
    y = jax.jit(lambda x, w, i: mm.moe_matmul(x, w, i, interpret=True, **tiles))(x, experts, ids)
    xs = np.broadcast_to(x[:, None], (m, k_sel, k)) if shared else x
    picked = w64[ids]  # [M, k, Out, In]
    ref = np.einsum("mki,mkoi->mko", xs.astype(np.float64), picked)
    bound = np.einsum("mki,mkoi->mko", np.abs(xs.astype(np.float64)), np.abs(picked))
    assert_close(y, ref, bound, TOL_F64, "kernel vs float64")
    twin = np.asarray(mm.moe_matmul_twin(x, experts, ids), np.float64)
    assert_close(y, twin, bound, TOL_TWIN, "kernel vs twin")


def test_k_leaves_give_a_pair_the_same_bits_in_any_number_of_splits():
    """moe_matmul.Plan.leaves: K's 4 leaves in 1, 2 and 4 programs are the same sums added in the same tree, so the
    same bits (what lets a decode step of few pairs split K more than one of many: ops.moe_decode_tiles); K in 4
    leaves is another order than in 2 (a check that the leaves are taken at all)."""
    e, k_sel, m, k, n = 8, 4, 3, 2880, 64  # gpt-oss's K: 45 two-block chunks, leaves of 12 (the last 9)
    experts, _ = random_weight(QT.MXFP4, (e, n, k), seed=21)
    ids = routed(m, k_sel, e, seed=22, skew="uniform")
    x = np.random.default_rng(23).standard_normal((m, k)).astype(np.float32) * 10.0

    def run(**tiles) -> np.ndarray:
        tiles = dict(block_m=16, swap=True, chunk=2) | tiles
        return np.asarray(jax.jit(lambda x, w, i: mm.moe_matmul(x, w, i, interpret=True, **tiles))(x, experts, ids))

    four = run(splits=4, leaves=4)
    for splits in (1, 2):
        np.testing.assert_array_equal(run(splits=splits, leaves=4), four, err_msg=f"4 leaves in {splits} splits")
    assert not np.array_equal(run(splits=2), four), "2 leaves summed as 4 would be"


def test_tree_sum_adds_as_a_balanced_tree_and_plans_refuse_what_it_cannot_split():
    t = [np.float32(v) for v in (1e8, 1.0, -1e8, 1.0, 3.0, 1e-3, -3.0, 0.5)]
    tree = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))
    assert mm.tree_sum(t) == tree and mm.tree_sum(t) != sum(t[1:], t[0])  # the chain: another order
    halves = jnp.stack([mm.tree_sum(t[:4]), mm.tree_sum(t[4:])])
    assert mm.fold_tree(halves) == tree and mm.tree_sum(t[:1]) == t[0]
    with pytest.raises(ValueError, match="not a power of two"):
        mm.tree_sum(t[:3])
    with pytest.raises(ValueError, match="4 splits of K in 2 leaves"):
        mm.plan(QT.MXFP4, 64, 2880, splits=4, leaves=2)
    with pytest.raises(ValueError, match="splits must be a power of two, got 3"):
        mm.plan(QT.MXFP4, 64, 2880, splits=3)
    assert mm.plan(QT.MXFP4, 64, 96, chunk=1, splits=2, leaves=8).leaves == 2  # 3 chunks: 2 leaves, whatever the splits
    assert mm.plan(QT.MXFP4, 64, 96, chunk=1, splits=1, leaves=8).leaves == 2


@pytest.mark.parametrize(("value", "want"), [("4:2", (4, 2)), ("8", (8, 8)), ("1", (1, 1)), (" 2:8 ", (2, 8))])
def test_decode_splits_setting_takes_few_many_or_one_power_of_two(value, want):
    assert ops._decode_splits(value.strip()) == want
    for bad in ("3", "4:3", "0:2", "a:b", "4:2:1", ""):
        with pytest.raises(ValueError, match="WORKER_MOE_DECODE_SPLITS"):
            ops._decode_splits(bad)


def test_mxfp4_to_bf16_gives_the_files_values_for_every_code_and_exponent_in_both_builds():
    """MXFP4's bf16 values in the grouped kernel, both builds, against gguf-py for all 256 code bytes (both nibbles)
    at every exponent byte, clamped to [2, 252] as documented (|w| < 2^-125 or > 2^125: no real file's):
    - the integer build (`_mxfp4_bf16`, interpret mode's, and cards before sm_90's) run on the CPU;
    - the inline PTX (`_mxfp4_ptx_asm`, sm_90's default), its instructions interpreted (`run_ptx`): four code
      bytes a register, the scale's bf16 pairs beside them, as Triton packs them (element j in byte / half j).
    The card's run of the asm is the gpu test's (tests/test_pallas_moe_matmul.py, ptx)."""
    exps = np.repeat(np.arange(256, dtype=np.uint8), 16)  # [4096] blocks
    qs = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 1))  # every byte at every exponent
    clamped = np.clip(exps, 2, 252)
    want = quants.dequantize(np.concatenate([clamped[:, None], qs], axis=1), QT.MXFP4).reshape(-1, 2, 16)
    want_bits = [bf16_round(want[:, part].astype(np.float32)) for part in (0, 1)]  # exact in bf16

    planes = {"e": jnp.asarray(exps)[:, None], "qs": jnp.asarray(qs)[:, None, :]}  # [BN, C=1, ...]
    integer = mm._mxfp4_bf16(lambda name, *index: planes[name][(ALL, ALL, *index)])
    packed = packed_bytes(qs)  # four code bytes a register, byte j = element j
    pairs = packed_halves(np.repeat(clamped.astype(np.uint32) << 7, 16))  # a block's 16 bytes share its scale

    def plus_zero(bits: np.ndarray) -> np.ndarray:
        """Code 8 is -0 in both builds (its sign bit kept) and +0 in gguf-py: the same in any sum."""
        assert (bits == 0x8000).any()
        return np.where(bits == 0x8000, 0, bits)

    for part in (0, 1):
        got = np.asarray(integer[part]).reshape(-1, 16).view(np.uint16).astype(np.uint32)
        np.testing.assert_array_equal(plus_zero(got), want_bits[part], err_msg=f"integer build, part {part}")
        out = run_ptx(mm._mxfp4_ptx_asm(part), {2: packed, 3: pairs[0], 4: pairs[1]})
        halves = unpacked_halves(out).reshape(-1, 16)
        np.testing.assert_array_equal(plus_zero(halves), want_bits[part], err_msg=f"PTX, part {part}")


@pytest.mark.parametrize(("qtype", "shared"), [(QT.MXFP4, True), (QT.Q4_K, False)], ids=lambda v: getattr(v, "name", v))
def test_a_bf16_copy_of_the_experts_gives_what_the_stored_format_gives(qtype, shared):
    """Decode's copy (worker/model.py, with_bf16_experts): the experts widened to bf16 once, through the kernel,
    against float64 products of the same bf16 values and against the stored format dequantized in registers
    (the same bf16 operands for MXFP4; Q4_K's rounded to bf16 either way), which differ only in float32 order."""
    e, k_sel, m, k, n = 6, 2, 19, 256, 64
    experts, _ = random_weight(qtype, (e, n, k), seed=3)
    copy = widened(experts, jnp.bfloat16)
    assert mm.fits(copy) and copy.planes["w"].dtype == jnp.bfloat16
    ids = routed(m, k_sel, e, seed=4, skew="uniform")
    x = np.random.default_rng(5).standard_normal((m, k) if shared else (m, k_sel, k)).astype(np.float32)
    run = jax.jit(lambda x, w, i: mm.moe_matmul(x, w, i, interpret=True))
    y = run(x, copy, ids)
    xs = np.broadcast_to(x[:, None], (m, k_sel, k)) if shared else x
    xs = np.asarray(jnp.asarray(xs).astype(jnp.bfloat16), np.float64)  # the kernel's bf16 x
    picked = np.asarray(copy.planes["w"].astype(jnp.float32), np.float64)[ids]
    ref = np.einsum("mki,mkoi->mko", xs, picked)
    bound = np.einsum("mki,mkoi->mko", np.abs(xs), np.abs(picked))
    assert_close(y, ref, bound, 1e-6, "bf16 copy vs float64 of its values")
    assert_close(y, np.asarray(run(x, experts, ids), np.float64), bound, TOL_TWIN, "bf16 copy vs stored format")


def test_groups_pad_each_expert_to_whole_tiles():
    e, bm = 5, 4
    ids = np.array([[3, 0], [3, 1], [3, 0], [1, 3], [3, 4]], np.int32)  # expert 2 empty, 3 spans two tiles
    g = mm.group(jnp.asarray(ids), e, bm, shared=True)
    rows, src, tile_e = (np.asarray(a) for a in (g.rows, g.src, g.tile_expert))
    assert len(tile_e) == -(-(ids.size + e * (bm - 1)) // bm) and len(src) == len(tile_e) * bm
    assert len(set(rows.tolist())) == ids.size  # each pair its own row
    np.testing.assert_array_equal(tile_e[rows // bm], ids.reshape(-1))  # in a tile of its expert
    np.testing.assert_array_equal(src[rows], np.arange(ids.size) // 2)  # reading its token's x
    used = tile_e[tile_e >= 0]
    assert used.tolist() == [0, 1, 3, 3, 4] and (tile_e[len(used) :] == -1).all()  # sorted, then unused
    assert (np.diff(rows.reshape(-1)[np.argsort(ids.reshape(-1), stable=True)]) > 0).all()  # stable in-group


@pytest.mark.parametrize("m,k_sel,e,bm,shared", [(1, 4, 32, 16, True), (13, 4, 8, 16, False), (64, 4, 32, 16, True),
                                                  (40, 2, 4, 64, True), (128, 4, 32, 16, False)])  # fmt: skip
def test_pairs_ranked_by_comparison_group_as_the_sort_does(monkeypatch, m, k_sel, e, bm, shared):
    """A decode step's few pairs (up to COMPARE_PAIRS) are ranked by comparing every pair with every other, no
    sort and no scatter: the same rows, padded rows' pairs and tiles' experts as the stable sort gives, with dead
    tokens and with experts left empty or crowded."""
    rng = np.random.default_rng(m * 7 + e)
    for skew in ("uniform", "one"):
        ids = routed(m, k_sel, e, seed=int(rng.integers(1 << 16)), skew=skew)
        for live in (None, jnp.asarray(rng.random(m) < 0.7)):
            got = mm.group(jnp.asarray(ids), e, bm, shared, live)
            monkeypatch.setattr(mm, "COMPARE_PAIRS", 0)
            want = mm.group(jnp.asarray(ids), e, bm, shared, live)
            monkeypatch.setattr(mm, "COMPARE_PAIRS", 512)
            for a, b in zip((got.rows, got.src, got.tile_expert), (want.rows, want.src, want.tile_expert), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dead_tokens_pairs_go_to_no_tile_and_read_as_zeros():
    """Tokens marked not live (a decode bucket's empty rows, a prefill chunk's padding) take no expert's tiles;
    their results are zeros, and every live pair's bits are those of the call without the mask."""
    e, k_sel, m, k, n = 8, 4, 13, 96, 64
    experts, _ = random_weight(QT.MXFP4, (e, n, k), seed=2)
    ids = routed(m, k_sel, e, seed=3, skew="uniform")
    x = np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)
    live = np.arange(m) % 3 != 1
    g = mm.group(jnp.asarray(ids), e, 16, shared=True, live=jnp.asarray(live))
    tile_e, rows = np.asarray(g.tile_expert), np.asarray(g.rows).reshape(m, k_sel)
    np.testing.assert_array_equal(tile_e[rows[live] // 16], ids[live])  # live pairs: in a tile of their expert
    assert (tile_e[rows[~live] // 16] == -1).all()  # dead pairs: in tiles nobody computes
    assert sorted(set(tile_e[tile_e >= 0].tolist())) == sorted(set(ids[live].reshape(-1).tolist()))
    call = jax.jit(lambda x, w, i, alive: mm.moe_matmul(x, w, i, alive, interpret=True, block_m=16))
    masked = np.asarray(call(x, experts, ids, live))
    full = np.asarray(jax.jit(lambda x, w, i: mm.moe_matmul(x, w, i, interpret=True, block_m=16))(x, experts, ids))
    np.testing.assert_array_equal(masked[live], full[live])
    assert (masked[~live] == 0).all()


def test_plan_and_fits_on_real_shapes():
    for n in (2880, 5760):
        p = mm.plan(QT.MXFP4, n, 2880)
        assert (p.block_m, p.block_n, p.chunk, p.steps) == (64, 64, 4, 23)  # 90 blocks: a masked tail step
    assert mm.plan(QT.Q4_K, 3072, 3072).chunk == 1
    experts, _ = random_weight(QT.MXFP4, (2, 40, 64), seed=0)
    assert not mm.fits(experts)  # Out 40: no power-of-two tile >= 16 divides it
    assert mm.fits(random_weight(QT.MXFP4, (2, 48, 64), seed=0)[0])
    assert not mm.fits(quant_array(np.zeros((2, 32, 64), np.float32), QT.F32, (2, 32, 64)))
    with pytest.raises(ValueError, match="divide"):
        mm.plan(QT.MXFP4, 48, 64, block_n=32)
    with pytest.raises(ValueError, match="power of two"):
        mm.plan(QT.MXFP4, 48, 64, block_m=24)


def test_swapped_row_tiles_follow_the_pairs_an_expert_gets():
    """gpt-oss-20b's 32 experts, top-4: one stream's bucket of 2 tokens and 64 tokens stage 16-row tiles, 256 tokens
    32, 1,024 tokens 64 (BLOCK_M, the most); the expert tiles are plan's 64 columns (wgmma's M) on both shapes."""
    tiles = [mm.swapped_tiles(tokens * 4, 32) for tokens in (2, 64, 256, 1024)]
    assert [t["block_m"] for t in tiles] == [16, 16, 32, 64]
    plans = [mm.plan(QT.BF16, n, 2880, **t) for n in (5760, 2880) for t in tiles]
    assert all(p.swap and p.block_n == 64 for p in plans)


def test_ops_sends_selections_to_the_kernel_the_decode_kernels_say():
    experts, _ = random_weight(QT.MXFP4, (4, 32, 64), seed=1)

    def kernels(m: int, backend: str, per_token: bool = False) -> list[str]:
        x, ids = jnp.ones((m, 64)), routed(m, 2, 4, 0, "uniform")
        call = lambda x, i: ops.moe_matmul(x, experts, i, backend=backend, per_token=per_token)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(call)(x, ids))
        return [name for name in ("qmatvec_mxfp4", "moe_matmul_mxfp4") if name in jaxpr]

    assert kernels(9, "cpu") == []
    # Prefill (not per_token): the grouped matmul however few its selections, so that the route never depends on
    # how many sequences share a prefill dispatch.
    assert kernels(2, "interpret") == ["moe_matmul_mxfp4"] and kernels(9, "interpret") == ["moe_matmul_mxfp4"]
    # Decode (per_token) follows the decode kernels: by rows, per row, or tensor cores for any count.
    assert kernels(8, "interpret", per_token=True) == ["qmatvec_mxfp4"]
    assert kernels(9, "interpret", per_token=True) == ["moe_matmul_mxfp4"]
    with ops.decode_kernels("tensor-cores"):
        assert kernels(2, "interpret", per_token=True) == ["moe_matmul_mxfp4"]
    with ops.decode_kernels("per-row"):
        assert kernels(9, "interpret", per_token=True) == ["qmatvec_mxfp4"]


def test_decode_reads_the_bf16_copy_and_prefill_the_stored_experts():
    experts, _ = random_weight(QT.MXFP4, (4, 32, 64), seed=1)
    copy = widened(experts, jnp.bfloat16)

    def kernels(m: int, per_token: bool) -> list[str]:
        x, ids = jnp.ones((m, 64)), routed(m, 2, 4, 0, "uniform")
        call = lambda x, i: ops.moe_matmul(x, experts, i, backend="interpret", per_token=per_token,  # noqa: E731
                                           decode_copy=copy)  # fmt: skip
        jaxpr = str(jax.make_jaxpr(call)(x, ids))
        return [name for name in ("qmatvec_mxfp4", "moe_matmul_mxfp4", "moe_matmul_bf16") if name in jaxpr]

    with ops.decode_kernels("tensor-cores"):
        assert kernels(2, per_token=True) == ["moe_matmul_bf16"]
        assert kernels(2, per_token=False) == ["moe_matmul_mxfp4"]
    with ops.decode_kernels("per-row"):  # the routed matvec reads the stored planes (a few experts a token)
        assert kernels(2, per_token=True) == ["qmatvec_mxfp4"]


@pytest.mark.parametrize("swap", [True, False], ids=["swapped", "unswapped"])
@pytest.mark.parametrize("copy", [True, False], ids=["bf16-copy", "stored"])
def test_decode_calls_take_decodes_tiles_on_either_experts_and_prefill_its_own(monkeypatch, swap, copy):
    """ops.moe_matmul's tiles for the grouped kernel: a decode call swapped (ops._tc_swap, the default) takes the
    copy's K step and a row tile by its pairs, on the copy or (--no-bf16-experts) on the stored experts; unswapped,
    the stored experts keep the kernel's own tiles; prefill takes PREFILL_TILES either way."""
    experts, _ = random_weight(QT.MXFP4, (4, 32, 64), seed=1)
    seen = []
    real = mm.moe_matmul
    monkeypatch.setattr(mm, "moe_matmul", lambda x, w, *a, **k: (seen.append((w.qtype, k)), real(x, w, *a, **k))[1])
    monkeypatch.setattr(ops, "_tc_swap", ops._swap_formats("mxfp4" if swap else "0"))
    x, ids = jnp.ones((2, 64)), jnp.asarray(routed(2, 2, 4, 0, "uniform"))
    with ops.decode_kernels("tensor-cores"):
        for per_token in (True, False):
            ops.moe_matmul(x, experts, ids, backend="interpret", per_token=per_token,
                           decode_copy=widened(experts, jnp.bfloat16) if copy else None)  # fmt: skip
    (decode_fmt, decode), (prefill_fmt, prefill) = seen
    assert (decode_fmt, prefill_fmt) == (QT.BF16 if copy else QT.MXFP4, QT.MXFP4)
    tiles = {k: v for k, v in decode.items() if k != "interpret"}
    splits = {"splits": 4, "leaves": 4}  # ops._moe_decode_splits's default at few pairs (here 4): K in 4 splits
    if swap:
        assert tiles == mm.DECODE_COPY_TILES | {"swap": True, "block_m": 16} | splits
    else:
        assert tiles == (mm.DECODE_COPY_TILES if copy else {}) | splits
    assert {k: v for k, v in prefill.items() if k != "interpret"} == mm.PREFILL_TILES
    seen.clear()  # WORKER_MOE_DECODE_SPLITS=1: the kernel's own single split, prefill's tiles as before
    monkeypatch.setattr(ops, "_moe_decode_splits", (1, 1))
    with ops.decode_kernels("tensor-cores"):
        for per_token in (True, False):
            ops.moe_matmul(x, experts, ids, backend="interpret", per_token=per_token)
    assert "splits" not in seen[0][1] and seen[1][1] == {"interpret": True} | mm.PREFILL_TILES


def test_gpt_oss_prefill_through_the_kernel_matches_hf(oracles, monkeypatch):
    """The tiny gpt-oss (MXFP4 experts, E 4, k 2, 48 tokens) with its prefill MoE on the kernel (interpret
    mode): the HF float64 logits at the GPU gate (bf16 x: ~4e-3 relative, vs ~1e-6 on the CPU path)."""
    calls = []
    real = mm.moe_matmul

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mm, "moe_matmul", counted)
    d = oracles / "models" / "gpt-oss"
    ids = manifest(d)["input"]["ids"]
    m = worker.load(d / "model-mxfp4_moe.gguf", device="cpu", backend="interpret")
    ours = m.logits(ids)
    assert len(calls) == 2 * m.cfg.n_layers  # gate|up (fused at load: models/base.py FUSIONS) and down of each layer
    ref = np.load(d / "logits-hf-f64-mxfp4_moe-dequant.npy")
    assert rel_err(ours, ref) < 1e-2
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.sum() > len(ids) // 2
    assert (ours.argmax(-1) == ref.argmax(-1))[clear].all()


def _gpu() -> None:
    if jax.default_backend() != "gpu":
        pytest.skip("no GPU visible to JAX")


def _abs_mxfp4(w: QuantArray) -> QuantArray:
    """The same experts with every value's sign cleared (E2M1 sign bit 3 of each nibble)."""
    return QuantArray({**w.planes, "qs": w.planes["qs"] & 0x77}, w.qtype, w.shape)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n", "shared", "m", "skew"),
    [(5760, True, 512, "uniform"), (2880, True, 512, "uniform"), (2880, False, 512, "uniform"),
     (2880, True, 300, "one"), (2880, False, 37, "subset")],
)  # fmt: skip
def test_moe_matmul_compiled_on_gpt_oss_experts(n, shared, m, skew):
    """gpt-oss-20b: 32 MXFP4 experts of [Out, 2880] (gate/up, llama.cpp's fused gate_up, down), top-4."""
    _gpu()
    e, k_sel, k = 32, 4, 2880
    experts = quant_array(random_raw(QT.MXFP4, (e, n, k), seed=n), QT.MXFP4, (e, n, k), put=jax.device_put)
    ids = jnp.asarray(routed(m, k_sel, e, seed=m, skew=skew))
    x = jax.random.normal(jax.random.key(m), (m, k) if shared else (m, k_sel, k), jnp.float32)
    y = jax.jit(mm.moe_matmul)(x, experts, ids)
    twin = jax.jit(mm.moe_matmul_twin)(x, experts, ids)
    bound = np.asarray(jax.jit(mm.moe_matmul_twin)(jnp.abs(x), _abs_mxfp4(experts), ids), np.float64)
    assert_close(y, np.asarray(twin, np.float64), bound, TOL_TWIN_GPU, f"experts [{e}, {n}, {k}] M={m} {skew}")


@pytest.mark.gpu
def test_dead_tokens_on_the_gpu_read_as_zeros_and_leave_live_bits_alone():
    """gpt-oss-20b's gate_up at a decode bucket of 64 rows with 23 empty: the empty rows' pairs lie in tiles no
    program writes (uninitialized memory on the GPU), and still read as zeros; the live rows' bits are those of
    the unmasked call."""
    _gpu()
    e, k_sel, k, n, m = 32, 4, 2880, 5760, 64
    experts = quant_array(random_raw(QT.MXFP4, (e, n, k), seed=9), QT.MXFP4, (e, n, k), put=jax.device_put)
    ids = jnp.asarray(routed(m, k_sel, e, seed=10, skew="uniform"))
    x = jax.random.normal(jax.random.key(11), (m, k), jnp.float32)
    live = np.arange(m) < 41
    masked = np.asarray(jax.jit(mm.moe_matmul)(x, experts, ids, jnp.asarray(live)))
    full = np.asarray(jax.jit(mm.moe_matmul)(x, experts, ids))
    np.testing.assert_array_equal(masked[live], full[live])
    assert (masked[~live] == 0).all()


def grouped_bits(tiles: dict, *args) -> np.ndarray:
    return np.asarray(jax.jit(lambda x, w, i: mm.moe_matmul(x, w, i, **tiles))(*args))


@pytest.mark.gpu
def test_mxfp4_by_inline_ptx_gives_the_integer_builds_bits_on_the_gpu():
    """WORKER_MXFP4_PTX's build (moe_matmul.Plan.ptx: MXFP4 to bf16 in inline PTX) against the integer build on the
    card: the same bf16 operands, so the same bits, at one stream's decode tiles, at 64 tokens' and at prefill's,
    on gpt-oss-20b's gate|up shape (the asm's values are checked on the CPU by an interpreter of its PTX)."""
    _gpu()
    if not mm.ptx_runs():
        pytest.skip("the inline PTX runs on sm_90 and later; this card takes the integer build for both")
    e, k_sel, k, n = 32, 4, 2880, 5760
    stored = quant_array(random_raw(QT.MXFP4, (e, n, k), seed=31), QT.MXFP4, (e, n, k), put=jax.device_put)
    ids = jnp.asarray(routed(512, k_sel, e, seed=32, skew="uniform"))
    x = jax.random.normal(jax.random.key(33), (512, k), jnp.float32)
    for m, tiles in ((1, mm.DECODE_COPY_TILES | mm.swapped_tiles(4, e) | {"splits": 4, "leaves": 4}),
                     (64, mm.DECODE_COPY_TILES | mm.swapped_tiles(256, e) | {"splits": 2, "leaves": 4}),
                     (512, mm.PREFILL_TILES)):  # fmt: skip
        integer, ptx = (grouped_bits(t, x[:m], stored, ids[:m]) for t in (tiles, tiles | {"ptx": True}))
        np.testing.assert_array_equal(ptx, integer, err_msg=f"{m} tokens, {tiles}")


def test_mxfp4_ptx_runs_on_sm90_and_later_gpus_only(monkeypatch):
    """moe_matmul.ptx_runs: the inline PTX (mul.rn.bf16x2) on a GPU of compute capability 9.0 or later; an older
    card, the CPU, another vendor's GPU, or a device that does not say, take the integer build."""

    class Device:
        def __init__(self, platform, capability=None):
            self.platform = platform
            if capability is not None:
                self.compute_capability = capability

    for device, runs in ((Device("gpu", "9.0"), True), (Device("gpu", "10.0"), True), (Device("gpu", "12.0"), True),
                         (Device("gpu", "8.9"), False), (Device("gpu", "8.0"), False), (Device("gpu"), False),
                         (Device("gpu", "gfx90a"), False),
                         (Device("cpu"), False)):  # fmt: skip
        monkeypatch.setattr(jax, "devices", lambda device=device: [device])
        mm.ptx_runs.cache_clear()
        assert mm.ptx_runs() is runs, vars(device)
    monkeypatch.undo()
    mm.ptx_runs.cache_clear()


def test_mxfp4_ptx_setting_reaches_decode_and_prefill_on_stored_experts(monkeypatch):
    """WORKER_MXFP4_PTX (on unless 0; ops._mxfp4_ptx): ops.moe_matmul asks the grouped kernel for the PTX build on
    the stored MXFP4 experts, at decode and at prefill, where the device runs it (`ptx_runs`, faked here); not on
    the bf16 copy, nor for other formats, nor on a device before sm_90 (interpret mode runs the integer build:
    inline PTX cannot run there)."""
    monkeypatch.setattr(ops, "_mxfp4_ptx", True)
    monkeypatch.setattr(mm, "ptx_runs", lambda: False)
    assert "ptx" not in ops.moe_decode_tiles(QT.MXFP4, 4, 32, copy=False)
    monkeypatch.setattr(mm, "ptx_runs", lambda: True)
    assert ops.moe_decode_tiles(QT.MXFP4, 4, 32, copy=False)["ptx"] is True
    assert "ptx" not in ops.moe_decode_tiles(QT.MXFP4, 4, 32, copy=True)
    assert "ptx" not in ops.moe_decode_tiles(QT.Q4_K, 4, 32, copy=False)
    experts, _ = random_weight(QT.MXFP4, (4, 32, 64), seed=1)
    seen = []
    real = mm.moe_matmul
    monkeypatch.setattr(mm, "moe_matmul", lambda x, w, *a, **k: (seen.append(k), real(x, w, *a, **k))[1])
    x, ids = jnp.ones((2, 64)), jnp.asarray(routed(2, 2, 4, 0, "uniform"))
    with ops.decode_kernels("tensor-cores"):
        for per_token in (True, False):
            ops.moe_matmul(x, experts, ids, backend="interpret", per_token=per_token)
    assert [k.get("ptx") for k in seen] == [True, True]
    assert mm.plan(QT.MXFP4, 32, 64, ptx=True).ptx and not mm.plan(QT.Q8_0, 32, 64, ptx=True).ptx


@pytest.mark.gpu
@pytest.mark.parametrize("read", ["bf16-copy", "stored", "stored-decode-splits"])
def test_swapped_decode_tiles_keep_a_tokens_bits_in_every_bucket_on_the_gpu(read):
    """The swapped grouped matmul at decode's tiles (ops.moe_matmul: moe_matmul.swapped_tiles and
    DECODE_COPY_TILES), on the experts' bf16 copy and on the stored MXFP4 dequantized in registers (what
    --no-bf16-experts decodes with): the row tile follows a bucket's pairs (16 rows at 1 and 64 tokens, 32 at 256,
    64 at 1,024), so a token's pairs are MMAs of another N in each. The swap rests on the card summing a row the same
    for every N (wgmma's); this is its check: token 0's bits the same in every bucket, and the largest call against
    the twin. (The two reads differ from each other in float32 order: the stored MXFP4's two nibble halves are two
    dots a step.) `stored-decode-splits`: the stored experts with K in ops' leaves and splits, what decode runs by
    default (ops.moe_decode_tiles: 4 splits at 1 and 2 tokens, 2 beyond, of 4 leaves; `stored` is
    WORKER_MOE_DECODE_SPLITS=1)."""
    _gpu()
    e, k_sel, k, n = 32, 4, 2880, 5760
    stored = quant_array(random_raw(QT.MXFP4, (e, n, k), seed=12), QT.MXFP4, (e, n, k), put=jax.device_put)
    experts = widened(stored, jnp.bfloat16) if read == "bf16-copy" else stored
    ids = jnp.asarray(routed(1024, k_sel, e, seed=13, skew="uniform"))
    x = jax.random.normal(jax.random.key(14), (1024, k), jnp.float32)

    def run(m: int) -> np.ndarray:
        tiles = mm.DECODE_COPY_TILES | mm.swapped_tiles(m * k_sel, e)
        if read == "stored-decode-splits":
            tiles = ops.moe_decode_tiles(QT.MXFP4, m * k_sel, e, copy=False)
            assert tiles["leaves"] == 4 and tiles["splits"] == (4 if m <= 2 else 2)
        return np.asarray(jax.jit(lambda x, w, i: mm.moe_matmul(x, w, i, **tiles))(x[:m], experts, ids[:m]))

    assert [mm.swapped_tiles(m * k_sel, e)["block_m"] for m in (1, 64, 256, 1024)] == [16, 16, 32, 64]
    alone = run(1)[0]
    for m in (2, 64, 256, 1024):
        y = run(m)
        np.testing.assert_array_equal(y[0], alone, err_msg=f"token 0 among {m}")
    twin = np.asarray(jax.jit(mm.moe_matmul_twin)(x, stored, ids), np.float64)
    bound = np.asarray(jax.jit(mm.moe_matmul_twin)(jnp.abs(x), _abs_mxfp4(stored), ids), np.float64)
    assert_close(y, twin, bound, TOL_TWIN_GPU, f"swapped on the {read}, 1,024 tokens")
