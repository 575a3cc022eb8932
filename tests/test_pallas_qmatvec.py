"""worker/pallas_kernels/qmatvec.py: the quantized matvec kernels against float64 products of gguf-py's
dequantized weights (an independent reference) and against their jax.numpy twins. On the CPU in Pallas interpret
mode, on small shapes that hit every tile edge (rows past N, super-blocks past K, several K splits, a loop over
K); `gpu`-marked variants compile them with Triton on real-model shapes (`just test-gpu`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as QT
from model_oracles import manifest, teacher_forced_decode
from test_quant import F16_FIELDS

import worker
from worker import ops
from worker.pallas_kernels import qmatvec as qmv
from worker.pallas_kernels.tiling import ALL, TARGET_PROGRAMS
from worker.quant import QuantArray, dequantize, quant_array

TYPES = sorted(qmv.KERNEL_TYPES, key=lambda t: t.name)
# Float32 accumulation in another order than the reference: the error stays a few ulps of sum(|x| * |w|).
TOL = 1e-5
# The GPU's dense calls are float16 tensor-core dots (qmatvec.ROW_TILE): x (scaled by a power of two) and the
# weight each rounded to a 10-bit mantissa (2^-11 relative each), so at most ~2^-10 of sum |x| |w|, plus float16's
# subnormal spacing (2^-24 absolute, of x / scale and of a weight below 2^-14); interpret mode computes in float32.
DOT_TOL = 2.0**-10


def dense_tol(interpret: bool) -> float:
    return TOL if interpret else DOT_TOL


def random_raw(qtype: QT, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """GGUF bytes of a random weight: every code; scales of both signs, |d| <= 0.05; MXFP4 exponents near 2^0."""
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = math.prod(shape) // block
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        d = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    if qtype == QT.MXFP4:
        blocks[:, 0] = rng.integers(120, 128, n_blocks)
    return blocks.reshape(*shape[:-1], -1)


def random_weight(qtype: QT, shape: tuple[int, ...], seed: int) -> tuple[QuantArray, np.ndarray]:
    """A random weight as planes, and its values from gguf-py's dequantizer in float64."""
    raw = random_raw(qtype, shape, seed)
    return quant_array(raw, qtype, shape), quants.dequantize(raw, qtype).reshape(shape).astype(np.float64)


def assert_close(y: jax.Array, ref: np.ndarray, bound: np.ndarray, what: str, tol: float = TOL) -> float:
    """|y - ref| <= tol * bound elementwise, where bound = sum |x| * |w| (the scale of the rounding error)."""
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert np.isfinite(y).all(), what
    err = float(np.max(np.abs(y - ref) / bound))
    assert err <= tol, f"{what}: max error {err:.3g} of sum|x||w| (tolerance {tol:.3g})"
    return err


def test_mxfp4_factors_are_the_files_values_for_every_code_and_exponent():
    """The float kernels' MXFP4 values (a code's bits as a float16 times the block's 2^(e - 113), `qmatvec._mxfp4`)
    are gguf-py's exactly for all 16 codes of both nibbles at every exponent byte up to 240 (from 2 on the CPU,
    whose XLA flushes a subnormal product); above 240 (|w| >= 2^113) the exponent is clamped to 240."""
    low = 2 if jax.default_backend() == "cpu" else 0
    exps = np.arange(low, 256, dtype=np.uint8)
    qs = (np.arange(16) | (15 - np.arange(16)) << 4).astype(np.uint8)  # low nibbles 0..15, high 15..0
    raw = np.concatenate([exps[:, None], np.broadcast_to(qs, (exps.size, 16))], axis=1)  # [blocks, 17]
    planes = {"e": jnp.asarray(exps)[:, None], "qs": jnp.asarray(raw[:, 1:])[:, None, :]}  # [BN, C=1, ...]
    parts = qmv.FORMATS[QT.MXFP4].parts(lambda name, *index: planes[name][(ALL, ALL, *index)])
    got = np.concatenate([np.asarray(v).reshape(exps.size, 16) for v, _ in parts], axis=1)  # low then high
    clamped = raw.copy()
    clamped[:, 0] = np.minimum(exps, 240)
    want = quants.dequantize(clamped, QT.MXFP4).reshape(exps.size, 32)
    np.testing.assert_array_equal(got, want.astype(np.float32))  # bits, but code 8's -0 (gguf-py's +0: any sum's)
    with np.errstate(over="ignore"):  # e = 255 unclamped overflows: no real file's
        assert np.isinf(quants.dequantize(raw[-1:], QT.MXFP4)).any()


# Per super-block size: K in super-blocks and the forced tiles. N = 40 with block_n 16 leaves 8 masked rows;
# the splits times steps times chunk overshoot K, so the last split's last step is partly masked.
EDGE_TILES = {32: (11, dict(block_n=16, chunk=2, splits=3)), 256: (3, dict(block_n=16, chunk=1, splits=2))}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_qmatvec_at_tile_edges(qtype):
    rows = 3
    sb = qmv.FORMATS[qtype].sb
    blocks, tiles = EDGE_TILES[sb]
    n, k = 40, blocks * sb
    p = qmv.plan(qtype, n, k, **tiles)
    assert p.splits > 1 and p.steps > 1  # a K loop in each of several splits
    assert p.splits * p.steps * p.chunk > blocks and n % p.block_n  # both masks are live
    w, w64 = random_weight(qtype, (n, k), seed=rows)
    x = np.random.default_rng(7).standard_normal((rows, k)).astype(np.float32)
    y = jax.jit(lambda x, w: qmv.qmatvec(x, w, interpret=True, **tiles))(x, w)
    x64 = x.astype(np.float64)
    bound = np.abs(x64) @ np.abs(w64).T
    assert_close(y, x64 @ w64.T, bound, "kernel vs float64")
    assert_close(y, np.asarray(qmv.qmatvec_twin(x, w), np.float64), bound, "kernel vs twin")


# The per-row kernel's arithmetic variants (qmatvec.Plan): the scales factored out of the inner loop, the next
# step's planes loaded ahead, fused multiply-adds. Every format factored; the others on a format of each layout.
PER_ROW_VARIANTS = (
    [(t, dict(factored=True)) for t in TYPES]
    + [(t, dict(prefetch=True, factored=f)) for t in (QT.Q5_1, QT.Q4_K, QT.Q6_K) for f in (False, True)]
    + [(QT.Q4_K, dict(fma=True)), (QT.Q5_1, dict(fma=True, factored=True))]  # interpret mode: the unfused path
)


@pytest.mark.parametrize(("qtype", "variant"), PER_ROW_VARIANTS, ids=lambda v: v.name if isinstance(v, QT) else
                         "-".join(k for k, on in v.items() if on))  # fmt: skip
def test_per_row_kernel_variants_at_tile_edges_and_alone(qtype, variant):
    """Against float64's products at every tile edge (a K loop of several steps in several splits, rows and
    super-blocks masked), dense and expert-gathered, and a row's bits the same alone as among others."""
    sb = qmv.FORMATS[qtype].sb
    blocks, tiles = EDGE_TILES[sb]
    n, k = 40, blocks * sb
    w, w64 = random_weight(qtype, (2, n, k), seed=5)
    x = np.random.default_rng(9).standard_normal((3, k)).astype(np.float32)
    x64 = x.astype(np.float64)
    dense = jax.jit(lambda x, w: qmv.qmatvec(x, w, interpret=True, tensor_cores=False, **variant, **tiles))
    one = QuantArray({name: plane[1] for name, plane in w.planes.items()}, w.qtype, (n, k))
    y = dense(x, one)
    assert_close(y, x64 @ w64[1].T, np.abs(x64) @ np.abs(w64[1]).T, f"dense, {variant}, vs float64")
    assert np.array_equal(np.asarray(dense(x[1:2], one))[0], np.asarray(y)[1]), "row 1 alone: other bits"
    ids = np.array([[1], [0], [1]], np.int32)
    g = jax.jit(lambda x, w, i: qmv.moe_matvec(x, w, i, interpret=True, **variant, **tiles))(x, w, ids)
    picked = w64[ids[:, 0]]  # [M, N, K]
    ref = np.einsum("mi,moi->mo", x64, picked)[:, None]
    assert_close(g, ref, np.einsum("mi,moi->mo", np.abs(x64), np.abs(picked))[:, None], f"gathered, {variant}")


LIVE_CASES = [(2, [True, False]), (2, [False, True]), (2, [False, False]), (1, [True]), (3, [False, True, False]),
              (3, [False, False, False])]  # fmt: skip


@pytest.mark.parametrize("int8_x", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize(("t", "live"), LIVE_CASES, ids=lambda v: "".join("LD"[not a] for a in v) if isinstance(v, list)
                         else f"T{v}")  # fmt: skip
def test_live_rows_have_their_bits_and_dead_groups_are_zeros(t, live, int8_x):
    """`live` (a decode step's rows with a sequence): a live row's bits are those it has without the mask; a
    program whose rows are all dead writes zeros (up to 2 rows, each its own program; 3 rows share one, which a
    live row keeps computing)."""
    sb = qmv.FORMATS[QT.Q4_K].sb
    blocks, tiles = EDGE_TILES[sb]
    w, _ = random_weight(QT.Q4_K, (40, blocks * sb), seed=21)
    x = np.random.default_rng(t).standard_normal((t, blocks * sb)).astype(np.float32)
    call = jax.jit(lambda x, w, live: qmv.qmatvec(x, w, interpret=True, tensor_cores=False, int8_x=int8_x,
                                                  live=live, **tiles))  # fmt: skip
    y = np.asarray(call(x, w, jnp.asarray(live)))
    full = np.asarray(call(x, w, None))
    group = qmv.row_group(t, True)
    for r in range(t):
        if any(live[r - r % group : r - r % group + group]):
            assert np.array_equal(y[r], full[r]), f"row {r}: other bits with the mask"
        else:
            assert not y[r].any(), f"row {r}: a dead group's row is not zeros"
    with pytest.raises(ValueError, match="live rows"):
        qmv.qmatvec(x, w, interpret=True, live=jnp.asarray(live))  # the tensor-core kernel has no live rows


@pytest.mark.parametrize("int8_x", [False, True], ids=["float", "int8"])
def test_a_decode_steps_dense_per_row_calls_skip_its_dead_rows(oracles, monkeypatch, int8_x):
    """A one-stream decode step (a bucket of 2 rows, runner.MIN_ROWS) on the per-row kernels: each dense float call
    gets the step's live rows (ops.live_rows), so the padding row's programs compute nothing; int8-x calls keep
    their two-row programs (measured faster on the card). The greedy ids still follow the float64 HF oracle where
    its margin is clear."""
    seen = []
    dense = qmv.qmatvec

    def spy(x, w, **kwargs):
        if x.ndim > 2 and x.shape[-2] == 1:  # decode-shaped: [B, 1, D]
            seen.append(None if kwargs.get("live") is None else kwargs["live"].shape)
        return dense(x, w, **kwargs)

    monkeypatch.setattr(qmv, "qmatvec", spy)
    d = oracles / "models" / "qwen2"
    m = worker.load(d / "model-q8_0.gguf", device="cpu", backend="interpret", slots=256, max_batch=2, int8_x=int8_x)
    assert m.cfg.decode_kernels == ("per-row-int8" if int8_x else "per-row") and m.runner.min_rows == 2
    ids = manifest(d)["input"]["ids"][:8]
    decoded = teacher_forced_decode(m, ids)
    skipped = None if int8_x else (2,)
    assert seen and all(shape == skipped for shape in seen), seen
    ref = np.load(d / "logits-hf-f64-q8_0-dequant.npy")[: len(ids)]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3
    assert clear.any() and (decoded == ref.argmax(-1))[clear].all()


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.MXFP4], ids=lambda t: t.name)
def test_qmatvec_default_plan_without_masks(qtype):
    """The default tiles on a shape they divide: the unmasked code path, leading dims of x kept."""
    sb = qmv.FORMATS[qtype].sb
    n, k = 64, 8 * sb
    p = qmv.plan(qtype, n, k)
    assert n % p.block_n == 0 and p.splits * p.steps * p.chunk == k // sb
    w, w64 = random_weight(qtype, (n, k), seed=3)
    x = np.random.default_rng(8).standard_normal((2, 1, k)).astype(np.float32)
    y = jax.jit(lambda x, w: qmv.qmatvec(x, w, interpret=True))(x, w)
    x64 = x.astype(np.float64)
    assert_close(y, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, "kernel vs float64")


@pytest.mark.parametrize(("qtype", "shared"), [(QT.MXFP4, True), (QT.Q4_K, False)], ids=["MXFP4-shared-x", "Q4_K"])
def test_moe_matvec_gathers_the_selected_experts(qtype, shared):
    e, n, k = 5, 40, 2 * qmv.FORMATS[qtype].sb
    experts, w64 = random_weight(qtype, (e, n, k), seed=11)
    ids = np.array([[4, 0, 2], [1, 4, 4]], np.int32)  # repeats and the last expert
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, k) if shared else (2, 3, k)).astype(np.float32)
    y = jax.jit(lambda x, w, i: qmv.moe_matvec(x, w, i, interpret=True, block_n=16, splits=2))(x, experts, ids)
    xs = np.broadcast_to(x[:, None], (2, 3, k)) if shared else x
    picked = w64[ids]  # [M, k, N, K]
    ref = np.einsum("mki,mkoi->mko", xs.astype(np.float64), picked)
    bound = np.einsum("mki,mkoi->mko", np.abs(xs.astype(np.float64)), np.abs(picked))
    assert_close(y, ref, bound, "kernel vs float64")
    assert_close(y, np.asarray(qmv.moe_matvec_twin(x, experts, ids), np.float64), bound, "kernel vs twin")


@pytest.mark.parametrize("int8_x", [False, True], ids=["float", "int8"])
def test_moe_matvec_clamps_expert_ids_to_the_experts(int8_x):
    """An id out of range reads the nearest expert's planes, never out of bounds (the kernels clamp it)."""
    e, n, k = 5, 40, 2 * qmv.FORMATS[QT.Q4_K].sb
    experts, _ = random_weight(QT.Q4_K, (e, n, k), seed=33)
    x = np.random.default_rng(34).standard_normal((2, k)).astype(np.float32)
    call = jax.jit(lambda i: qmv.moe_matvec(x, experts, i, interpret=True, block_n=16, splits=2, int8_x=int8_x))
    y = np.asarray(call(np.array([[-3, 9], [5, 2]], np.int32)))
    np.testing.assert_array_equal(y, np.asarray(call(np.array([[0, 4], [4, 2]], np.int32))))


LIVE = [[True], [False], [True, False], [False, True], [False, True, False]]
# the pairs in the tokens' order (a shared x read in place) on both kernels; sorted by expert (x broadcast to the
# pairs first) where there are several tokens, on one
LIVE_CASES = [(live, int8_x, qmv.SORTED_PAIRS) for live in LIVE for int8_x in (False, True)]
LIVE_CASES += [(live, True, 1) for live in LIVE if len(live) > 1]


LIVE_IDS = ["".join("LD"[not a] for a in live) + ("-int8" if i8 else "-float") + ("-sorted" if sp == 1 else "")
            for live, i8, sp in LIVE_CASES]  # fmt: skip


@pytest.mark.parametrize(("live", "int8_x", "sorted_pairs"), LIVE_CASES, ids=LIVE_IDS)
def test_moe_matvec_live_tokens_have_their_bits_and_dead_ones_are_zeros(live, int8_x, sorted_pairs):
    """`live` on the routed matvec (one stream's padding row, worker.ops.moe_matmul): a live token's k pairs have
    the bits they have without the mask, a dead token's are zeros, with the pairs in the tokens' order (fewer than
    SORTED_PAIRS) and sorted by expert (their liveness with them)."""
    e, n, k = 5, 40, 2 * qmv.FORMATS[QT.Q4_K].sb
    experts, _ = random_weight(QT.Q4_K, (e, n, k), seed=31)
    m = len(live)
    ids = np.array([[4, 0, 2], [1, 4, 4], [0, 3, 1]], np.int32)[:m]  # repeats: pairs of one expert sort together
    x = np.random.default_rng(32).standard_normal((m, k)).astype(np.float32)
    call = jax.jit(lambda x, w, i, live: qmv.moe_matvec(x, w, i, interpret=True, live=live, block_n=16, splits=2,
                                                        int8_x=int8_x, sorted_pairs=sorted_pairs))  # fmt: skip
    full = np.asarray(call(x, experts, ids, None))
    y = np.asarray(call(x, experts, ids, jnp.asarray(live)))
    for t, alive in enumerate(live):
        if alive:
            assert np.array_equal(y[t], full[t]), f"token {t}: other bits with the mask"
        else:
            assert not y[t].any(), f"token {t}: a dead token's pairs are not zeros"


@pytest.mark.parametrize("int8_x", [False, True], ids=["float", "int8"])
def test_a_decode_steps_routed_experts_skip_its_dead_rows(oracles, monkeypatch, int8_x):
    """A one-stream decode step of the tiny gpt-oss on the per-row kernels: its routed-expert calls get the step's
    live tokens, so the padding row's experts are not computed (float and int8 x), and the greedy ids still follow
    the float64 HF oracle where its margin is clear."""
    seen = []
    routed = qmv.moe_matvec

    def spy(x, w, ids, **kwargs):
        if ids.shape[0] == 2:  # a decode step's two rows (prefill's calls take the grouped kernel)
            seen.append(None if kwargs.get("live") is None else kwargs["live"].shape)
        return routed(x, w, ids, **kwargs)

    monkeypatch.setattr(qmv, "moe_matvec", spy)
    d = oracles / "models" / "gpt-oss"
    m = worker.load(d / "model-mxfp4_moe.gguf", device="cpu", backend="interpret", slots=256, max_batch=2,
                    int8_x=int8_x)  # fmt: skip
    assert m.cfg.decode_kernels == ("per-row-int8" if int8_x else "per-row") and m.runner.min_rows == 2
    ids = manifest(d)["input"]["ids"][:6]
    decoded = teacher_forced_decode(m, ids)
    assert seen and all(shape == (2,) for shape in seen), seen
    ref = np.load(d / "logits-hf-f64-mxfp4_moe-dequant.npy")[: len(ids)]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3
    assert clear.any() and (decoded == ref.argmax(-1))[clear].all()


REAL_SHAPES = [(896, 896), (151936, 896), (896, 4864), (16384, 3072), (3072, 8192), (262144, 640), (2880, 2880)]


@pytest.mark.parametrize("selections", [1, 4])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_plan_covers_k_exactly_once(qtype, selections):
    """On real shapes: power-of-two tiles, every super-block in some split, no split left empty, and enough
    programs for the SMs where N alone is too narrow."""
    sb = qmv.FORMATS[qtype].sb
    for n, k in REAL_SHAPES:
        if k % sb:
            continue
        p = qmv.plan(qtype, n, k, selections)
        blocks = k // sb
        assert p.block_n & (p.block_n - 1) == 0 and p.chunk & (p.chunk - 1) == 0
        assert p.splits * p.steps * p.chunk >= blocks > (p.splits - 1) * p.steps * p.chunk
        n_blocks = -(-n // p.block_n)
        # Splits are rounded so that none is empty: at worst half the programs asked for.
        assert 2 * n_blocks * selections * p.splits >= min(TARGET_PROGRAMS, n_blocks * -(-blocks // p.chunk))


def test_tiles_must_be_powers_of_two_and_the_format_known():
    w, _ = random_weight(QT.Q8_0, (32, 64), seed=0)
    with pytest.raises(ValueError, match="power of two"):
        qmv.plan(QT.Q8_0, 32, 64, block_n=24)
    with pytest.raises(ValueError, match="at least one row"):
        qmv.qmatvec(jnp.zeros((0, 64)), w, interpret=True)
    with pytest.raises(NotImplementedError):
        qmv.qmatvec(jnp.zeros((1, 64)), QuantArray({"qs": jnp.zeros((32, 21), jnp.uint8)}, QT.IQ2_XXS, (32, 64)))


def test_ops_dispatch_routes_by_each_sequences_positions_not_by_the_rows_of_the_call():
    w, _ = random_weight(QT.Q4_K, (48, 256), seed=5)
    bias = jnp.arange(48, dtype=jnp.float32)

    def kernels(x, backend: str) -> int:
        return str(jax.make_jaxpr(lambda x: ops.qmatmul(x, w, bias, backend=backend))(x)).count("pallas_call")

    decode, long_chunk = jnp.ones((1, 1, 256)), jnp.ones((1, ops.PREFILL_KERNEL_ROWS + 1, 256))
    assert kernels(decode, "cpu") == 0
    assert kernels(decode, "interpret") == 1 and kernels(long_chunk, "interpret") == 0
    # Any number of sequences of at most PREFILL_KERNEL_ROWS positions (decode: one): the kernel, in one call; so
    # whether a chunk takes it never depends on who shares its dispatch.
    assert kernels(jnp.ones((qmv.MAX_BATCH + 1, 1, 256)), "interpret") == 1
    assert kernels(jnp.ones((5, ops.PREFILL_KERNEL_ROWS, 256)), "interpret") == 1
    # A prefill chunk's product runs on the weight dequantized once (float32 in interpret mode, float16 on a GPU),
    # decode's on the quantized planes.
    jaxpr = lambda x: str(jax.make_jaxpr(lambda x: ops.qmatmul(x, w, backend="interpret"))(x))  # noqa: E731
    assert "qmatvec_f32" in jaxpr(jnp.ones((2, 16, 256))) and "qmatvec_q4_k" not in jaxpr(jnp.ones((2, 16, 256)))
    assert "qmatvec_q4_k" in jaxpr(decode)
    y = ops.qmatmul(decode, w, bias, backend="interpret")
    np.testing.assert_allclose(y, ops.qmatmul(decode, w, bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown ops backend"):
        ops.check_backend("tpu")


@pytest.mark.parametrize("backend", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q8_0])
def test_rows_in_several_kernel_calls_have_the_bits_they_have_alone(backend, qtype):
    """A prefill dispatch of several sequences (640 rows), each row's bits those of its sequence computed alone
    (interpret mode: the tensor-core kernel's tiles, float32)."""
    w, _ = random_weight(qtype, (96, 256), seed=6)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, ops.PREFILL_KERNEL_ROWS, 256)), jnp.float32)
    together = np.asarray(ops.qmatmul(x, w, backend=backend))
    for g in range(5):
        alone = np.asarray(ops.qmatmul(x[g : g + 1], w, backend=backend))
        assert np.array_equal(together[g], alone[0]), f"sequence {g}: {np.abs(together[g] - alone[0]).max()}"
    wf = np.asarray(dequantize(w, jnp.float32), np.float64)
    bound = DOT_TOL * (np.abs(np.asarray(x, np.float64)) @ np.abs(wf).T)
    assert np.all(np.abs(together - np.asarray(x, np.float64) @ wf.T) <= bound)


@pytest.mark.parametrize("backend", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_a_decode_step_of_max_batch_rows_gives_each_row_its_bits_in_the_smallest_bucket(backend):
    """--max-batch's most rows (qmv.MAX_BATCH) in one decode-shaped call on the tensor-core kernels: each row's
    bits are those it gets in a 2-row call (runner.MIN_ROWS), the smallest decode bucket."""
    w, _ = random_weight(QT.Q8_0, (96, 256), seed=9)
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((qmv.MAX_BATCH, 1, 256)), jnp.float32)
    with ops.decode_kernels("tensor-cores"):
        together = np.asarray(ops.qmatmul(x, w, backend=backend))
        for r in (0, 255, 256, qmv.MAX_BATCH - 1):
            pair = np.asarray(ops.qmatmul(x[jnp.array([r, 0])], w, backend=backend))
            assert np.array_equal(together[r], pair[0]), f"row {r}: {np.abs(together[r] - pair[0]).max()}"


@pytest.mark.parametrize("backend", ["interpret", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("qtype", sorted(qmv.PLAIN_TYPES, key=lambda t: t.name))
@pytest.mark.parametrize("exact", [False, True])
def test_unquantized_matrices_take_the_kernels_within_tolerance_and_row_by_row(backend, qtype, exact):
    """F32 / F16 / BF16 matrices (a tiny model's projections, an f16 head, the router's f32 weights) through the
    kernels: within DOT_TOL of float64 on the tensor cores, within a few ulps of float32 on the per-row kernel
    (`exact`), and each sequence's rows the bits they are alone."""
    rng = np.random.default_rng(8)
    values = rng.standard_normal((96, 256)).astype(np.float32)
    raw = values.astype({QT.F32: np.float32, QT.F16: np.float16, QT.BF16: np.float32}[qtype])
    w = quant_array(raw if qtype != QT.BF16 else (raw.view(np.uint32) >> 16).astype(np.uint16), qtype, (96, 256))
    wf = np.asarray(dequantize(w, jnp.float32), np.float64)
    x = jnp.asarray(rng.standard_normal((3, 40, 256)), jnp.float32)
    got = np.asarray(ops.qmatmul(x, w, backend=backend, exact=exact))
    bound = (2**-20 if exact else DOT_TOL) * (np.abs(np.asarray(x, np.float64)) @ np.abs(wf).T)
    assert np.all(np.abs(got - np.asarray(x, np.float64) @ wf.T) <= bound)
    for g in range(3):
        assert np.array_equal(got[g], np.asarray(ops.qmatmul(x[g : g + 1], w, backend=backend, exact=exact))[0])


@pytest.mark.slow
def test_gpt_oss_decode_through_the_kernels_follows_the_full_forward(oracles, monkeypatch):
    """Decode (M = 1: Q8_0 projections and the MXFP4 experts through the kernels, in interpret mode) picks the
    argmax of the full forward over the same tokens (prefill, the path checked against HF float64)."""
    calls = {"qmatvec": 0, "moe_matvec": 0}

    def counted(name):
        real = getattr(qmv, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    for name in calls:
        monkeypatch.setattr(qmv, name, counted(name))
    d = oracles / "models" / "gpt-oss"
    ids = manifest(d)["input"]["ids"]
    m = worker.load(d / "model-mxfp4_moe.gguf", device="cpu", backend="interpret")
    out = m.generate(ids, max_tokens=5, stop_at_eos=False)
    assert calls["qmatvec"] > 0 and calls["moe_matvec"] > 0, calls
    full = m.logits(ids + out[:-1])[len(ids) - 1 :]
    top2 = np.sort(full, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3
    assert clear.sum() >= 3
    assert (full.argmax(-1) == out)[clear].all(), (full.argmax(-1).tolist(), out)


def _gpu() -> None:
    if jax.default_backend() != "gpu":
        pytest.skip("no GPU visible to JAX")


# Real-model shapes (N, K): qwen2.5-0.5b (d 896, ffn 4864, vocab 151936), phi3-mini (3072, 8192, 32064),
# gemma3-270m (640, 2048, 262144), gpt-oss-20b attention and router (2880; q 4096, kv 512, 32 experts).
# K-quants need K % 256 == 0, so the 896-, 640- and 2880-wide inputs use 32-value formats, as llama.cpp does.
GPU_SHAPES_32 = [(896, 896), (128, 896), (4864, 896), (896, 4864), (1024, 640), (4096, 2880), (32, 2880)]
GPU_SHAPES_256 = [(9216, 3072), (16384, 3072), (3072, 8192), (32064, 3072), (896, 4864), (640, 2048)]
GPU_OUTPUTS = [(QT.Q8_0, (151936, 896)), (QT.Q8_0, (262144, 640)), (QT.Q4_0, (151936, 896))]
GPU_CASES = (
    [(t, shape, 1) for t in TYPES for shape in (GPU_SHAPES_32 if qmv.FORMATS[t].sb == 32 else GPU_SHAPES_256)]
    + [(t, (896, 4864) if qmv.FORMATS[t].sb == 32 else (3072, 8192), 8) for t in TYPES]
    + [(t, shape, 1) for t, shape in GPU_OUTPUTS]
)


def _on_device(qtype: QT, shape: tuple[int, ...], seed: int) -> QuantArray:
    return quant_array(random_raw(qtype, shape, seed), qtype, shape, put=jax.device_put)


def _bound(x: jax.Array, w: QuantArray) -> np.ndarray:
    wf = jnp.abs(dequantize(w, jnp.float32))
    return np.asarray(jnp.einsum("mi,oi->mo", jnp.abs(x), wf, precision=jax.lax.Precision.HIGHEST))


@pytest.mark.gpu
@pytest.mark.parametrize(("qtype", "shape", "rows"), GPU_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_qmatvec_compiled_on_real_shapes(qtype, shape, rows):
    _gpu()
    w = _on_device(qtype, shape, seed=rows)
    x = jax.random.normal(jax.random.key(rows), (rows, shape[1]), jnp.float32)
    y = jax.jit(qmv.qmatvec)(x, w)
    twin = jax.jit(qmv.qmatvec_twin)(x, w)
    bound = _bound(x, w) + 1e-30
    assert_close(y, np.asarray(twin, np.float64), bound, f"{qtype.name} {shape} M={rows}", DOT_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("n", [5760, 2880], ids=["gate_up", "down"])
def test_moe_matvec_compiled_on_gpt_oss_experts(n, rows):
    """gpt-oss-20b: 32 MXFP4 experts of [Out, 2880], top-4 per token."""
    _gpu()
    experts = _on_device(QT.MXFP4, (32, n, 2880), seed=n)
    ids = jax.random.permutation(jax.random.key(rows), 32)[: rows * 4].reshape(rows, 4)
    x = jax.random.normal(jax.random.key(0), (rows, 2880), jnp.float32)
    y = jax.jit(qmv.moe_matvec)(x, experts, ids)
    twin = jax.jit(qmv.moe_matvec_twin)(x, experts, ids)
    bound = np.asarray(jax.jit(qmv.moe_matvec_twin)(jnp.abs(x), _abs_mxfp4(experts), ids)) + 1e-30
    assert_close(y, np.asarray(twin, np.float64), bound, f"experts [32, {n}, 2880] M={rows}")


@pytest.mark.gpu
@pytest.mark.parametrize("int8_x", [False, True], ids=["float", "int8"])
def test_moe_matvec_live_tokens_compiled_on_gpt_oss_experts(int8_x):
    """One stream's decode bucket on gpt-oss-20b's gate_up experts (2 tokens, the second dead), compiled: the live
    token's four pairs have their bits without the mask, the dead token's are zeros; both live, both tokens' bits."""
    _gpu()
    experts = _on_device(QT.MXFP4, (32, 5760, 2880), seed=7)
    ids = jnp.asarray([[3, 17, 30, 8], [3, 5, 22, 31]], jnp.int32)  # a shared expert: the pairs sort together
    x = jax.random.normal(jax.random.key(8), (2, 2880), jnp.float32)
    call = jax.jit(lambda x, w, i, live: qmv.moe_matvec(x, w, i, int8_x=int8_x, live=live))
    full = np.asarray(call(x, experts, ids, None))
    y = np.asarray(call(x, experts, ids, jnp.asarray([True, False])))
    assert np.array_equal(y[0], full[0]) and not y[1].any()
    assert np.array_equal(np.asarray(call(x, experts, ids, jnp.asarray([True, True]))), full)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [dict(factored=True), dict(prefetch=True), dict(factored=True, prefetch=True),
                                     dict(fma=True), dict(fma=True, factored=True)],
                         ids=lambda v: "-".join(v))  # fmt: skip
@pytest.mark.parametrize(("qtype", "shape"), [(QT.Q4_K, (16384, 3072)), (QT.Q6_K, (3072, 8192)),
                                              (QT.Q5_0, (4864, 896)), (QT.Q8_0, (896, 896))],
                         ids=lambda v: v.name if isinstance(v, QT) else "x".join(map(str, v)))  # fmt: skip
def test_per_row_variants_compiled_on_real_shapes(qtype, shape, variant):
    """The per-row kernel's untimed variants (qmatvec.Plan.factored, .prefetch, .fma), compiled: float32 sums of float32
    products in another order than the twin's, so within the per-row kernel's tolerance of it, at 1 and 3 rows,
    and a row's bits the same alone."""
    _gpu()
    w = _on_device(qtype, shape, seed=2)
    x = jax.random.normal(jax.random.key(3), (3, shape[1]), jnp.float32)
    call = jax.jit(lambda x, w: qmv.qmatvec(x, w, tensor_cores=False, **variant))
    y = call(x, w)
    twin = jax.jit(qmv.qmatvec_twin)(x, w)
    assert_close(y, np.asarray(twin, np.float64), _bound(x, w) + 1e-30, f"{qtype.name} {shape} {variant}")
    assert np.array_equal(np.asarray(call(x[1:2], w))[0], np.asarray(y)[1]), "row 1 alone: other bits"


@pytest.mark.gpu
@pytest.mark.parametrize(("qtype", "shape"), [(QT.Q4_K, (16384, 3072)), (QT.Q8_0, (896, 896))], ids=["Q4_K", "Q8_0"])
def test_tensor_core_fma_compiled_on_real_shapes(qtype, shape):
    """The tensor-core kernel dequantizing with fused multiply-adds (qmatvec.Plan.fma): within the dot's tolerance
    of the twin, and a row's bits the same alone as among 3."""
    _gpu()
    w = _on_device(qtype, shape, seed=4)
    x = jax.random.normal(jax.random.key(5), (3, shape[1]), jnp.float32)
    call = jax.jit(lambda x, w: qmv.qmatvec(x, w, fma=True))
    y = call(x, w)
    twin = jax.jit(qmv.qmatvec_twin)(x, w)
    assert_close(y, np.asarray(twin, np.float64), _bound(x, w) + 1e-30, f"{qtype.name} {shape} fma", DOT_TOL)
    assert np.array_equal(np.asarray(call(x[1:2], w))[0], np.asarray(y)[1]), "row 1 alone: other bits"


def _abs_mxfp4(w):
    """The same experts with every value's sign cleared (E2M1 sign bit 3 of each nibble)."""
    return QuantArray({**w.planes, "qs": w.planes["qs"] & 0x77}, w.qtype, w.shape)


def test_row_scale_is_each_rows_power_of_two_above_its_largest_value():
    """The GPU dot's float16 x is x / row_scale(x): exact (a power of two), inside [-1, 1], and a row's scale
    depends on that row alone (batch invariance)."""
    x = np.array([[0.0, 0.0], [1.0, -0.5], [3.0, 2.0], [-1e5, 1.0], [1e-30, 0.0], [0.75, 0.1]], np.float32)
    scale = np.asarray(qmv.row_scale(jnp.asarray(x)))[:, 0]
    np.testing.assert_array_equal(scale, [1.0, 2.0, 4.0, 2.0**17, 2.0**-99, 1.0])
    assert np.all(np.abs(x / scale[:, None]) < 1)
    np.testing.assert_array_equal(np.asarray(qmv.row_scale(jnp.asarray(x[3:4])))[:, 0], scale[3:4])


@pytest.mark.gpu
@pytest.mark.parametrize("int8_x", [False, True], ids=["float", "int8"])
def test_live_rows_compiled_on_a_real_shape(int8_x):
    """One stream's decode bucket (2 rows, the second dead) on phi3-mini's gate_up, compiled: the live row's bits
    as without the mask, the dead row zeros; both live, both rows' bits."""
    _gpu()
    w = _on_device(QT.Q4_K, (16384, 3072), seed=4)
    x = jax.random.normal(jax.random.key(5), (2, 3072), jnp.float32)
    call = jax.jit(lambda x, w, live: qmv.qmatvec(x, w, tensor_cores=False, int8_x=int8_x, live=live))
    full = np.asarray(call(x, w, None))
    y = np.asarray(call(x, w, jnp.asarray([True, False])))
    assert np.array_equal(y[0], full[0]) and not y[1].any()
    assert np.array_equal(np.asarray(call(x, w, jnp.asarray([True, True]))), full)


def test_nibbles_by_ptx_round_each_value_once():
    """qmatvec's nibbles to float16 (Plan.ptx): the asm's instructions interpreted (tests/ptx.py) on all 256 code
    bytes, both nibbles, alone and with two high bits from another byte at each of Q6_K's shifts (Q5_K's and Q5_0's
    one high bit comes at shift 0), each of a pack's
    four values with a scale and offset of its own, as Triton packs them:
    scale * nibble + offset rounded once to float16, against float64; the float32 twin (interpret mode's) the
    same but where float32's sum rounded first (then a float16 ulp apart at most)."""
    from ptx import packed_bytes, packed_halves, run_ptx, unpacked_halves

    rng = np.random.default_rng(17)
    codes = np.tile(np.arange(256, dtype=np.uint8), 64)  # [16384]
    scale = (rng.uniform(-0.05, 0.05, codes.size) * 2.0 ** rng.integers(-12, 3, codes.size)).astype(np.float16)
    offset = (rng.uniform(-1, 1, codes.size) * 2.0 ** rng.integers(-14, 4, codes.size)).astype(np.float16)
    packed = packed_bytes(codes)
    high = rng.integers(0, 256, codes.size, dtype=np.uint8)  # Q6_K's: two more bits of each code
    high_packed = packed_bytes(high)
    s_pairs, o_pairs = packed_halves(scale.view(np.uint16)), packed_halves(offset.view(np.uint16))
    for part, shift in [(0, None), (1, None)] + [(p, s) for p in (0, 1) for s in (0, 2, 4, 6)]:
        code = (codes >> (4 * part)) & 0xF
        regs = {2: packed}
        if shift is not None:
            code = code | ((high >> shift) & 3) << 4
            regs[3] = high_packed
        at = len(regs) + 2
        regs |= {at: s_pairs[0], at + 1: s_pairs[1], at + 2: o_pairs[0], at + 3: o_pairs[1]}
        want = (code.astype(np.float64) * scale.astype(np.float64) + offset.astype(np.float64)).astype(np.float16)
        out = run_ptx(qmv._nibbles_f16_asm(part, shift), regs)
        got = unpacked_halves(out)
        what = f"part {part}, high bits at {shift}"
        np.testing.assert_array_equal(got.astype(np.uint16).view(np.float16), want, err_msg=f"asm, {what}")
        twin = np.asarray(qmv.nibbles_f16(jnp.asarray(codes), part, jnp.asarray(scale, jnp.float32),
                                          jnp.asarray(offset, jnp.float32), False,
                                          None if shift is None else jnp.asarray(high), shift or 0))  # fmt: skip
        ulps = np.abs(twin.view(np.int16).astype(np.int32) - want.view(np.int16).astype(np.int32))
        assert ulps.max() <= 1 and (ulps == 0).mean() > 0.99, f"twin, {what}: {(ulps != 0).sum()} differ"


def test_plans_take_ptx_tiles_on_the_nibble_formats_of_the_float_tensor_core_kernel_only():
    assert {QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K} == qmv.PTX_TYPES
    assert qmv.plan(QT.Q4_K, 64, 256, ptx=True).ptx
    with pytest.raises(ValueError, match="tensor-core kernel's, on Q4_0, .*, Q8_0; got Q3_K"):
        qmv.plan(QT.Q3_K, 64, 256, ptx=True)
    with pytest.raises(ValueError, match="got Q4_K"):
        qmv.plan(QT.Q4_K, 64, 256, ptx=True, int8_x=True)


def test_decode_takes_ptx_tiles_where_the_setting_asks_on_a_gpu(monkeypatch):
    """WORKER_DENSE_PTX=1: decode's tensor-core products on the GPU make their tiles by inline PTX, for the formats
    that have it; off by default, and never in interpret mode (the twin is for tests) or on the CPU."""
    assert not ops._dense_ptx
    monkeypatch.setattr(ops, "_dense_ptx", True)
    monkeypatch.setattr(qmv, "ptx_runs", lambda: True)  # an NVIDIA GPU
    assert ops.dense_ptx(QT.Q4_K, "gpu") and ops.dense_ptx(QT.Q4_0, "gpu")
    assert not ops.dense_ptx(QT.Q3_K, "gpu") and not ops.dense_ptx(QT.Q4_K, "interpret")
    assert not ops.dense_ptx(QT.Q4_K, "cpu")
    assert ops._float_tiles(True, 1, True) == {"swap": True, "ptx": True}
    monkeypatch.setattr(qmv, "ptx_runs", lambda: False)  # another vendor's GPU
    assert not ops.dense_ptx(QT.Q4_K, "gpu")


def test_signed_bytes_by_ptx_are_the_float_paths_values():
    """Q8_0's codes to float16 (Plan.ptx, qmatvec.bytes_f16): the asm interpreted on all 256 signed bytes, each of a
    pack's four with a scale of its own: scale * code rounded once, which is the float path's value (a float16
    scale times an int8 code is exact in float32); the twin gives the same bits."""
    from ptx import packed_bytes, packed_halves, run_ptx, unpacked_halves

    rng = np.random.default_rng(19)
    codes = np.tile(np.arange(-128, 128, dtype=np.int8), 64)
    scale = (rng.uniform(-0.05, 0.05, codes.size) * 2.0 ** rng.integers(-12, 3, codes.size)).astype(np.float16)
    pairs = packed_halves(scale.view(np.uint16))
    got = unpacked_halves(run_ptx(qmv._bytes_f16_asm(), {2: packed_bytes(codes), 3: pairs[0], 4: pairs[1]}))
    want = (codes.astype(np.float32) * scale.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(got.astype(np.uint16).view(np.float16), want)
    twin = qmv.bytes_f16(jnp.asarray(codes), jnp.asarray(scale, jnp.float32), asm=False)
    np.testing.assert_array_equal(np.asarray(twin), want)
