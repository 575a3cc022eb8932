"""The per-row matvec on an int8 x (worker/pallas_kernels/qmatvec_int8.py, qmatvec's `int8_x`), in interpret mode
against float64: x rounded here by llama.cpp's rule for its q8_1 blocks (written out in numpy below), the weight by
gguf-py's dequantizer. The integer sums are exact, so the kernel must equal that to float32 rounding; and against
the exact x, it must stay within the rounding's own bound. Then a model loaded with int8_x (ops' "per-row-int8"
decode kernels): its decode against the float64 HF oracle, and a job's ids whoever shares its batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from model_oracles import log_softmax, manifest, teacher_forced_decode
from test_batching import OTHERS, run_batch
from test_pallas_qmatvec import EDGE_TILES, TOL, _abs_mxfp4, _bound, _gpu, _on_device, assert_close, random_weight

import worker
from worker import ops
from worker.errors import ErrorCode, WorkerError
from worker.pallas_kernels import qmatvec as qmv
from worker.pallas_kernels import qmatvec_int8 as q8
from worker.quant import quant_array
from worker.sampling import SamplingParams

TYPES = sorted(q8.INT8_TYPES, key=lambda t: t.name)
# Each test builds its own weights and compiles its own kernels: spread one by one over the gpu suite's processes
# (conftest.py; ~19 s a test on the card)
SPREAD_TESTS = True


def llama_cpp_q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, scale per 32) as ggml's quantize_q8_1 makes them: d = amax / 127, q = roundf(x / d)."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = blocks * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # roundf: halves away from zero
    return q.astype(np.int8).reshape(x.shape), d[..., 0]


def rounded_x(x: np.ndarray) -> np.ndarray:
    q, d = llama_cpp_q8(x)
    return (q.reshape(*d.shape, 32).astype(np.float64) * d[..., None]).reshape(x.shape)


def test_quantize_x_rounds_as_llama_cpp_does_and_packs_bytes_in_order():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    x[1, :32] = 0  # a zero block: scale 0, codes 0
    x[2, 32:64] = np.concatenate([[127.0], np.arange(31) % 8 - 3.5])  # amax 127: step 1, values on midpoints
    words, dx, sums = jax.jit(q8.quantize_x, static_argnames="interpret")(x, interpret=True)
    q, d = llama_cpp_q8(x)
    np.testing.assert_array_equal(q[2, 33:41], [-4, -3, -2, -1, 1, 2, 3, 4])  # halves away from zero (roundf)
    np.testing.assert_array_equal(np.asarray(dx), d)
    np.testing.assert_array_equal(np.asarray(words).view(np.int8).reshape(q.shape), q)  # little-endian bytes
    np.testing.assert_array_equal(np.asarray(sums), q.reshape(3, -1, 16).astype(np.int32).sum(-1))
    assert np.asarray(dx)[1, 0] == 0 and not np.asarray(words)[1, :8].any()


# MXFP4's (a transpose of a block's five binary digits: moved inside the kernel), and one that is no transpose
# (an XLA gather first)
SHUFFLED = tuple(int(v) for v in np.random.default_rng(5).permutation(32))
ORDERS = {"mxfp4": q8.MXFP4_ORDER, "shuffled": SHUFFLED}


def test_mxfp4s_order_is_a_transpose_and_a_shuffle_is_not():
    assert q8._digit_axes(q8.MXFP4_ORDER) == (3, 1, 2, 4, 0)  # (a, w1, w0, h, c) -> (h, w1, w0, c, a)
    assert q8._digit_axes(SHUFFLED) is None


@pytest.mark.parametrize("order", ORDERS, ids=ORDERS)
@pytest.mark.parametrize("k", [64, 896, 2880, 8192])
def test_quantize_x_in_other_orders_and_sum_blocks(k, order):
    """A row of k values (k / 32 blocks: odd, even, a power of two), a block's values in another order and sums
    of 32: the same codes, moved, and the sums of their runs."""
    x = np.random.default_rng(k).standard_normal((2, k)).astype(np.float32) * np.float32(3)
    order = ORDERS[order]
    quantize = jax.jit(q8.quantize_x, static_argnums=(1, 2), static_argnames="interpret")
    words, dx, sums = quantize(x, order, 32, interpret=True)
    q, d = llama_cpp_q8(x)
    moved = q.reshape(2, -1, 32)[..., list(order)]
    np.testing.assert_array_equal(np.asarray(dx), d)
    np.testing.assert_array_equal(np.asarray(words).view(np.int8).reshape(moved.shape), moved)
    np.testing.assert_array_equal(np.asarray(sums), moved.astype(np.int32).sum(-1))


@pytest.mark.parametrize("signed", [False, True], ids=["u8", "s8"])
def test_dp4a_by_shifts_is_the_integer_sum_of_byte_products(signed):
    """Interpret mode's dp4a: every byte value on both sides (the extremes included), against numpy's int64."""
    rng = np.random.default_rng(2)
    a_bytes = np.concatenate([np.arange(256), rng.integers(0, 256, 1024)]).astype(np.uint8)
    b_bytes = np.concatenate([np.arange(256)[::-1], rng.integers(0, 256, 1024)]).astype(np.uint8)
    a, b = a_bytes.view(np.int32), b_bytes.view(np.int32)
    got = np.asarray(jax.jit(lambda a, b: q8.dp4a(a, b, signed, compiled=False))(a, b))
    av = (a_bytes.view(np.int8) if signed else a_bytes).astype(np.int64).reshape(-1, 4)
    want = (av * b_bytes.view(np.int8).astype(np.int64).reshape(-1, 4)).sum(-1)
    np.testing.assert_array_equal(got, want)


def test_prmt_by_shifts_selects_bytes_as_ptx_says():
    """Interpret mode's prmt against PTX's definition written out per byte: output byte i is byte (s & 7) of a's four
    then b's four, s being c's nibble i, or that byte's top bit replicated where s has bit 3 (every selector and
    sign bit reached)."""
    rng = np.random.default_rng(5)
    a, b, c = (rng.integers(0, 2**32, 256, dtype=np.uint64).astype(np.uint32).view(np.int32) for _ in range(3))
    got = np.asarray(jax.jit(lambda a, b, c: q8.prmt(a, b, c, compiled=False))(a, b, c)).view(np.uint32)
    table = np.concatenate([a.view(np.uint8).reshape(-1, 4), b.view(np.uint8).reshape(-1, 4)], axis=1)
    want = np.zeros(len(c), np.uint32)
    for j, sel_word in enumerate(c.view(np.uint32)):
        for i in range(4):
            sel = (int(sel_word) >> (4 * i)) & 0xF
            byte = int(table[j, sel & 7])
            want[j] |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * i)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_int8_x_matvec_at_tile_edges_equals_float64_on_the_rounded_x(qtype):
    """Every tile edge (a K loop of several steps in several splits, rows and super-blocks masked), 3 rows: the
    float64 product of the rounded x to float32's rounding; the exact x's within the rounding's bound (each x
    value moves at most half a step, amax / 254 of its block); a row's bits the same alone."""
    sb = qmv.FORMATS[qtype].sb
    blocks, tiles = EDGE_TILES[sb]
    n, k = 40, blocks * sb
    w, w64 = random_weight(qtype, (n, k), seed=11)
    x = np.random.default_rng(12).standard_normal((3, k)).astype(np.float32)
    call = jax.jit(lambda x, w: qmv.qmatvec(x, w, interpret=True, tensor_cores=False, int8_x=True, **tiles))
    y = call(x, w)
    xr = rounded_x(x)
    assert_close(y, xr @ w64.T, np.abs(xr) @ np.abs(w64).T, f"{qtype.name} vs float64 on the rounded x", TOL)
    _, d = llama_cpp_q8(x)
    exact = x.astype(np.float64) @ w64.T
    step_bound = np.repeat(d / 2, 32, axis=-1) @ np.abs(w64).T + TOL * (np.abs(x) @ np.abs(w64).T)
    assert (np.abs(np.asarray(y, np.float64) - exact) <= step_bound).all(), "outside the rounding's bound"
    assert np.array_equal(np.asarray(call(x[1:2], w))[0], np.asarray(y)[1]), "row 1 alone: other bits"
    dot = jax.jit(lambda x, w: qmv.qmatvec(x, w, interpret=True, tensor_cores=True, int8_x=True, **tiles))
    assert np.array_equal(np.asarray(dot(x, w)), np.asarray(y)), "the int8-x dot: other bits than the per-row kernel"


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.MXFP4], ids=lambda t: t.name)
def test_the_int8_x_dot_gives_a_row_the_per_row_kernels_bits_in_any_row_tile(qtype):
    """19 rows (the dot's row tiles of 16 and 64 past x's rows, masked) against the per-row kernel's groups of
    8: the same bits in every row, as the two sum each group exactly and add the groups in one order (ops switches
    between them by a call's rows, so a job's ids must not depend on the switch)."""
    sb = qmv.FORMATS[qtype].sb
    blocks, tiles = EDGE_TILES[sb]
    w, _ = random_weight(qtype, (40, blocks * sb), seed=15)
    x = np.random.default_rng(16).standard_normal((19, blocks * sb)).astype(np.float32)
    call = jax.jit(lambda x, w, tc, rt: qmv.qmatvec(x, w, interpret=True, tensor_cores=tc, row_tile=rt, int8_x=True,
                                                    **tiles), static_argnums=(2, 3))  # fmt: skip
    per_row = np.asarray(call(x, w, False, None))
    for tile in (16, 64):
        assert np.array_equal(np.asarray(call(x, w, True, tile)), per_row), f"row tile {tile}: other bits"


def _dots(jaxpr):
    """Every dot_general of a jaxpr, the kernels' bodies and loops inside it included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dots(inner)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_the_int8_x_dot_takes_at_least_32_values_a_product(qtype):
    """Triton's front end takes 8-bit dots of K >= 32 only on NVIDIA (min_dot_size); Pallas builds them below that
    check, and the card computed a K = 16 dot wrong (Q6_K, an H100, 2026-12-05) while interpret mode, which has no
    such limit, gave the right sums. So the kernel's every int8 dot is checked here, where no card is."""
    sb = qmv.FORMATS[qtype].sb
    w, _ = random_weight(qtype, (32, sb), seed=0)
    x = jnp.ones((16, sb), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda x, w: qmv.qmatvec(x, w, interpret=True, tensor_cores=True, int8_x=True))(x, w)
    dots = list(_dots(jaxpr.jaxpr))
    assert dots, "no dot found: the walk no longer reaches the kernel's body"
    for eqn in dots:
        lhs, (contracting, _) = eqn.invars[0].aval, eqn.params["dimension_numbers"][0]
        assert lhs.dtype == jnp.int8 and lhs.shape[contracting[0]] >= q8.MIN_INT8_DOT_K, (lhs, contracting)


def test_the_k_loop_written_out_gives_the_loops_bits():
    """`Plan.unroll` (the K steps one after the other, no loop; Q4_K: two pieces a group) across two steps, two splits
    and rows masked past the tile: the per-row kernel and the dot the loop's bits."""
    blocks, tiles = EDGE_TILES[256]
    assert qmv.plan(QT.Q4_K, 40, blocks * 256, **tiles).steps > 1, "a loop of one step would test nothing"
    w, _ = random_weight(QT.Q4_K, (40, blocks * 256), seed=17)
    x = np.random.default_rng(19).standard_normal((3, blocks * 256)).astype(np.float32)
    call = jax.jit(lambda x, w, tc, unroll: qmv.qmatvec(x, w, interpret=True, tensor_cores=tc, int8_x=True,
                                                        unroll=unroll, **tiles), static_argnums=(2, 3))  # fmt: skip
    for tc in (False, True):
        written_out, loop = (np.asarray(call(x, w, tc, u)) for u in (True, False))
        assert np.array_equal(written_out, loop), f"{'the dot' if tc else 'per-row'}: other bits than the loop's"


@pytest.mark.parametrize("programs", [1, 2])
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
def test_fewer_programs_than_column_tiles_give_each_row_the_same_bits(qtype, programs):
    """`Plan.programs` (a program takes the column tiles `programs` apart, one after another): 40 output columns in
    tiles of 16, the last one masked, over several K splits and steps; dense and gathered, a row or token dead:
    the bits of a program a tile."""
    sb = qmv.FORMATS[qtype].sb
    blocks, tiles = EDGE_TILES[sb]
    n, k = 40, blocks * sb
    assert -(-n // tiles["block_n"]) > programs, "as many programs as tiles would test nothing"
    rng = np.random.default_rng(31)
    x = rng.standard_normal((3, k)).astype(np.float32)
    live = jnp.array([True, False, True])
    dense, _ = random_weight(qtype, (n, k), seed=29)
    call = jax.jit(lambda x, w, p: qmv.qmatvec(x, w, interpret=True, tensor_cores=False, int8_x=True, live=live,
                                               programs=p, **tiles), static_argnums=2)  # fmt: skip
    one_each, taking_turns = (np.asarray(call(x, dense, p)) for p in (0, programs))
    assert np.array_equal(taking_turns, one_each), "dense: other bits"
    experts, _ = random_weight(qtype, (3, n, k), seed=30)
    ids = np.array([[2, 0], [0, 1], [1, 2]], np.int32)
    gathered = jax.jit(lambda x, w, i, p: qmv.moe_matvec(x, w, i, interpret=True, int8_x=True, live=live, programs=p,
                                                         **tiles), static_argnums=3)  # fmt: skip
    one_each, taking_turns = (np.asarray(gathered(x, experts, ids, p)) for p in (0, programs))
    assert np.array_equal(taking_turns, one_each), "gathered: other bits"
    assert not taking_turns[1].any() and taking_turns[[0, 2]].all(), "the dead token's pairs: zeros, the others not"


def test_programs_are_the_int8_x_kernels_and_come_from_the_environment(monkeypatch):
    with pytest.raises(ValueError, match="programs is the int8-x per-row kernel's"):
        qmv.plan(QT.Q4_K, 64, 256, programs=2)
    assert qmv.plan(QT.Q4_K, 64, 256).programs == 0 and qmv.plan(QT.Q4_K, 64, 256, int8_x=True).programs > 0
    assert qmv.plan(QT.Q4_K, 64, 256, int8_x=True, programs=0).programs == 0  # "programs=0": a program a tile
    monkeypatch.setenv("WORKER_INT8_TILES", "programs=264,chunk=8")
    assert ops._tiles_from_env("WORKER_INT8_TILES") == {"programs": 264, "chunk": 8}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_int8_x_moe_matvec_gathers_the_selected_experts(qtype):
    """The gathered kernel (a program per (token, selection), its expert's planes): each selection's product with
    the token's rounded x, at every tile edge, and a token's bits the same alone as among others."""
    sb = qmv.FORMATS[qtype].sb
    blocks, tiles = EDGE_TILES[sb]
    n, k = 40, blocks * sb
    w, w64 = random_weight(qtype, (3, n, k), seed=13)
    x = np.random.default_rng(14).standard_normal((3, k)).astype(np.float32)
    ids = np.array([[2, 0], [0, 1], [2, 2]], np.int32)
    call = jax.jit(lambda x, w, i: qmv.moe_matvec(x, w, i, interpret=True, int8_x=True, **tiles))
    y = call(x, w, ids)
    xr, picked = rounded_x(x), w64[ids]  # [M, k, N, K]
    ref = np.einsum("mi,mkoi->mko", xr, picked)
    assert_close(y, ref, np.einsum("mi,mkoi->mko", np.abs(xr), np.abs(picked)), f"{qtype.name} gathered", TOL)
    assert np.array_equal(np.asarray(call(x[2:], w, ids[2:]))[0], np.asarray(y)[2]), "token 2 alone: other bits"


def test_int8_x_is_refused_where_it_has_no_kernel():
    w = quant_array(np.ones((16, 64), np.float16), QT.F16, (16, 64))
    x = jnp.ones((1, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match="int8-x matvec kernel for F16.*Q5_K"):
        qmv.qmatvec(x, w, interpret=True, tensor_cores=False, int8_x=True)
    q4k, _ = random_weight(QT.Q4_K, (16, 256), seed=0)
    with pytest.raises(ValueError, match="dense"):  # the dot has no gathered (MoE) form
        q8.call(jnp.ones((1, 256), jnp.float32), q4k, jnp.zeros((1,), jnp.int32), 1, 16, qmv.plan(QT.Q4_K, 16, 256),
                True, 1, row_tile=16)  # fmt: skip
    with pytest.raises(ValueError, match="unroll is the int8-x kernels'"):  # not silently ignored by the float ones
        qmv.qmatvec(jnp.ones((1, 256), jnp.float32), q4k, interpret=True, tensor_cores=False, unroll=True)


def test_the_int8_x_tiles_of_the_environment_are_plan_arguments_or_refused(monkeypatch):
    """WORKER_INT8_TILES (ops: a step's A/B of an int8-x tiling on the card): plan's tile arguments as integers;
    anything else is refused by name, not ignored."""
    monkeypatch.setenv("WORKER_INT8_TILES", "block_n=128,num_warps=4")
    assert ops._tiles_from_env("WORKER_INT8_TILES") == {"block_n": 128, "num_warps": 4}
    for bad in ("block_n=12a", "unroll=1", "block_n"):
        monkeypatch.setenv("WORKER_INT8_TILES", bad)
        with pytest.raises(ValueError, match=f"WORKER_INT8_TILES: '{bad}'"):
            ops._tiles_from_env("WORKER_INT8_TILES")


def test_the_expert_tiles_reach_the_routed_experts_only(oracles, monkeypatch):
    """WORKER_INT8_EXPERT_TILES (ops._int8_expert_tiles): the tiny gpt-oss's routed-expert int8-x calls take them, its
    dense int8-x calls do not."""
    seen: dict[str, set] = {"dense": set(), "routed": set()}
    dense, routed = qmv.qmatvec, qmv.moe_matvec

    def spy_dense(x, w, **kw):
        seen["dense"].add(kw.get("block_n")) if kw.get("int8_x") else None
        return dense(x, w, **kw)

    def spy_routed(x, w, ids, **kw):
        seen["routed"].add(kw.get("block_n")) if kw.get("int8_x") else None
        return routed(x, w, ids, **kw)

    monkeypatch.setattr(qmv, "qmatvec", spy_dense)
    monkeypatch.setattr(qmv, "moe_matvec", spy_routed)
    monkeypatch.setattr(ops, "_int8_expert_tiles", {"block_n": 16})
    d = oracles / "models" / "gpt-oss"
    m = worker.load(d / "model-mxfp4_moe.gguf", device="cpu", backend="interpret", slots=256, max_batch=2, int8_x=True)
    m.generate(manifest(d)["input"]["ids"][:4], max_tokens=2)
    assert seen == {"dense": {None}, "routed": {16}}, seen


# Oracle models with weights in int8-x formats: qwen2's Q8_0, llama's Q4_K_M (Q4_K, Q6_K), gpt-oss's MXFP4 experts.
MODELS = [("qwen2", "model-q8_0.gguf", "logits-hf-f64-q8_0-dequant.npy"),
          ("llama", "model-q4_k_m.gguf", "logits-hf-f64-q4_k_m-dequant.npy"),
          ("gpt-oss", "model-mxfp4_moe.gguf", "logits-hf-f64-mxfp4_moe-dequant.npy")]  # fmt: skip


# What int8 x costs these models: their decode's log-probabilities moved by up to 0.049 (qwen2) and 0.050 (llama)
# from the float path's (measured in interpret mode; the float path's own: < 1e-4). The mode's contract here: 0.1.
# Not for gpt-oss: where its router's top experts nearly tie, int8 x can flip a choice, and a probe's 12 sampled
# steps moved by 0.03-0.09 but one by 1.48 (the float path's: 0.0085); its greedy ids are still checked.
INT8_LOGIT_TOL = 0.1


@pytest.mark.parametrize(("arch", "file", "logits"), MODELS, ids=[m[0] for m in MODELS])
def test_a_model_loaded_with_int8_x_decodes_on_it_and_follows_the_oracle(oracles, monkeypatch, arch, file, logits):
    """Every decode call on a weight of an int8-x format, dense or routed experts, takes the int8-x kernel, other
    calls the float kernels; the teacher-forced greedy decode agrees with the float64 HF oracle wherever its margin
    is clear of int8's error; a dense model's sampled decode
    has log-probabilities within that error of the full forward's (prefill, float)."""
    calls = []
    dense, routed = qmv.qmatvec, qmv.moe_matvec

    def spy(*args, **kwargs):
        calls.append((args[1].qtype, args[0].shape[-2] if args[0].ndim > 2 else 1, bool(kwargs.get("int8_x"))))
        return dense(*args, **kwargs)

    def spy_routed(*args, **kwargs):
        calls.append((args[1].qtype, 1, bool(kwargs.get("int8_x"))))  # decode's routed experts (prefill: grouped)
        return routed(*args, **kwargs)

    monkeypatch.setattr(qmv, "qmatvec", spy)
    monkeypatch.setattr(qmv, "moe_matvec", spy_routed)
    d = oracles / "models" / arch
    m = worker.load(d / file, device="cpu", backend="interpret", slots=256, max_batch=2, int8_x=True)
    assert m.cfg.decode_kernels == "per-row-int8"
    ids = manifest(d)["input"]["ids"]
    ref = np.load(d / logits)
    decoded = teacher_forced_decode(m, ids)
    decode_calls = {(qtype, on) for qtype, positions, on in calls if positions == 1}
    assert decode_calls and all(on == (qtype in q8.INT8_TYPES) for qtype, on in decode_calls), decode_calls
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * INT8_LOGIT_TOL
    assert clear.sum() >= len(ids) // 4
    assert (decoded == ref.argmax(-1))[clear].all()
    if arch == "gpt-oss":
        return  # routing flips (above)
    prompt, got = m.tokenizer.encode("The quick brown fox"), []
    out = list(m.generate_ids(prompt, 8, SamplingParams(temperature=0.8), seed=7, stop_at_eos=False, logprobs=got))
    full = log_softmax(np.asarray(m.logits(prompt + out[:-1])))[len(prompt) - 1 :]
    err = max(abs(lp - full[n, tok]) for n, tp in enumerate(got) for tok, lp in tp.top)
    assert err <= INT8_LOGIT_TOL, f"log-probabilities {err:.3g} from the full forward's"


@pytest.mark.parametrize("max_batch", [8, 16])
def test_with_int8_x_a_seeded_job_gives_the_same_ids_whoever_shares_its_batch(oracles, max_batch):
    """Alone (a bucket of 2 rows: the per-row kernel) and among others; at max_batch 16, 11 jobs take a bucket of 16
    rows, past a per-row program's 8, so their matvecs take the int8-x dot (ops.qmatmul)."""
    m = worker.load(oracles / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", backend="interpret", slots=512,
                    max_batch=max_batch, int8_x=True)  # fmt: skip
    prompt = list(range(3, 24))
    target = (prompt, SamplingParams(temperature=0.8, top_p=0.9), 1234, 12)
    alone = run_batch(m, [target], [0])[0]
    n = 5 if max_batch == 8 else 10
    others = [(list(range(5, 5 + 3 * i)), OTHERS[i % len(OTHERS)], 77 + i, 4 + 2 * i) for i in range(1, n + 1)]
    arrivals = [2, 0, 1, 0, 3, 1] if max_batch == 8 else [0] * (n + 1)
    assert run_batch(m, [target, *others], arrivals)[0] == alone


def test_int8_x_decodes_up_to_the_per_row_kernels_rows_by_default(oracles):
    """int8_x's default max_batch is qmatvec.MAX_ROWS (the per-row kernel's rows, timed on the card; beyond them its
    calls take the int8-x dot, untimed)."""
    path = oracles / "models" / "qwen2" / "model-q8_0.gguf"
    assert worker.load(path, device="cpu", backend="interpret", slots=64, int8_x=True).runner.max_batch == qmv.MAX_ROWS
    assert (
        worker.load(path, device="cpu", backend="interpret", slots=64, max_batch=3, int8_x=True).runner.max_batch == 3
    )


def test_int8_x_is_refused_on_the_cpu_backend(oracles):
    with pytest.raises(WorkerError) as e:
        worker.load(oracles / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", int8_x=True)
    assert e.value.code == ErrorCode.INVALID_REQUEST and "int8_x (--int8-x) needs a kernel backend" in e.value.message


def card_rounded_x(x: jax.Array, qtype: QT) -> jax.Array:
    """x as the card's quantize_x rounds it for `qtype` (its words put back in the values' order), after checking
    that it is llama.cpp's rounding but where the card's float32 division lands a value on the other side of a
    half step."""
    order = q8.INT8_FORMATS[qtype].x_order
    words, dx, _ = jax.jit(q8.quantize_x, static_argnums=1)(x, order)  # compiled: the card's own kernel
    codes = np.asarray(words).view(np.int8).reshape(*dx.shape, 32)
    if order is not None:
        codes = codes[..., np.argsort(order)]
    want, _ = llama_cpp_q8(np.asarray(x))
    moved = np.abs(codes.reshape(x.shape).astype(np.int32) - want)
    assert moved.max() <= 1 and moved.sum() <= 8, "the card's int8 x is not llama.cpp's"
    return jnp.asarray((codes * np.asarray(dx)[..., None]).reshape(x.shape))


GPU_DENSE = [(QT.Q4_K, (16384, 3072)), (QT.Q6_K, (3072, 8192)), (QT.Q8_0, (896, 896)), (QT.Q5_0, (4864, 896)),
             (QT.Q4_0, (151936, 896)), (QT.MXFP4, (2880, 2880)), (QT.Q5_K, (3072, 8192)), (QT.Q4_1, (4096, 2880)),
             (QT.Q5_1, (4096, 2880))]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("qtype", "shape"), GPU_DENSE,
                         ids=lambda v: v.name if isinstance(v, QT) else "x".join(map(str, v)))  # fmt: skip
def test_int8_x_compiled_on_real_shapes(qtype, shape):
    """Compiled (PTX dp4a, prmt): the same integer sums as interpret mode, so within float32's rounding of the
    float64 product on the x the card rounded; a row's bits the same alone as among 3."""
    _gpu()
    w = _on_device(qtype, shape, seed=6)
    x = jax.random.normal(jax.random.key(7), (3, shape[1]), jnp.float32)
    call = jax.jit(lambda x, w: qmv.qmatvec(x, w, tensor_cores=False, int8_x=True))
    y = call(x, w)
    xr = card_rounded_x(x, qtype)
    ref = jax.jit(qmv.qmatvec_twin)(xr, w)
    assert_close(y, np.asarray(ref, np.float64), _bound(xr, w) + 1e-30, f"{qtype.name} {shape} int8_x")
    assert np.array_equal(np.asarray(call(x[1:2], w))[0], np.asarray(y)[1]), "row 1 alone: other bits"


DOT_CASES = [(*c, 9) for c in GPU_DENSE] + [(*c, 64) for c in GPU_DENSE[:6]]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("qtype", "shape", "rows"), DOT_CASES, ids=[f"{q.name}-{n}x{k}-{r}" for q, (n, k), r in DOT_CASES]
)
def test_the_int8_x_dot_compiled_gives_the_per_row_kernels_bits(qtype, shape, rows):
    """On the card (IMMA, PTX fma.rn in both): within float32's rounding of the twin on the x the card rounded, and
    every row the per-row kernel's bits, every format at 9 rows (both kinds of part: 16 values, widened to the
    dot's 32, and 32), six at 64 (python -m bench.int8_bits says where they part)."""
    _gpu()
    w = _on_device(qtype, shape, seed=8)
    x = jax.random.normal(jax.random.key(rows), (rows, shape[1]), jnp.float32)
    call = jax.jit(lambda x, w, tc: qmv.qmatvec(x, w, tensor_cores=tc, int8_x=True), static_argnums=2)
    dot = call(x, w, True)
    xr = card_rounded_x(x, qtype)
    twin = np.asarray(jax.jit(qmv.qmatvec_twin)(xr, w), np.float64)
    assert_close(dot, twin, _bound(xr, w) + 1e-30, f"{qtype.name} {shape} the int8-x dot at {rows} rows")
    assert np.array_equal(np.asarray(dot), np.asarray(call(x, w, False))), "the dot: other bits"


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [2, 16])
@pytest.mark.parametrize(("qtype", "shape"), GPU_DENSE[:6], ids=lambda v: v.name if isinstance(v, QT) else
                         "x".join(map(str, v)))  # fmt: skip
def test_the_k_loop_written_out_compiled_gives_the_loops_bits(qtype, shape, rows):
    """On the card: `Plan.unroll` (the K steps written out) the loop's bits, the per-row kernel at 2 rows and the
    dot at 16."""
    _gpu()
    w = _on_device(qtype, shape, seed=9)
    x = jax.random.normal(jax.random.key(rows), (rows, shape[1]), jnp.float32)
    call = jax.jit(lambda x, w, u: qmv.qmatvec(x, w, tensor_cores=rows > 8, int8_x=True, unroll=u), static_argnums=2)
    assert np.array_equal(np.asarray(call(x, w, True)), np.asarray(call(x, w, False))), "written out: other bits"


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("n", [5760, 2880], ids=["gate_up", "down"])
def test_int8_x_moe_matvec_compiled_on_gpt_oss_experts(n, rows):
    """gpt-oss-20b's 32 MXFP4 experts, top-4 a token, gathered on the card's int8 x: within float32's rounding of
    the twin on that x, and the first token's bits the same alone."""
    _gpu()
    experts = _on_device(QT.MXFP4, (32, n, 2880), seed=n)
    ids = jax.random.permutation(jax.random.key(rows), 32)[: rows * 4].reshape(rows, 4)
    x = jax.random.normal(jax.random.key(0), (rows, 2880), jnp.float32)
    call = jax.jit(lambda x, w, i: qmv.moe_matvec(x, w, i, int8_x=True))
    y = call(x, experts, ids)
    xr = card_rounded_x(x, QT.MXFP4)
    twin = jax.jit(qmv.moe_matvec_twin)(xr, experts, ids)
    bound = np.asarray(jax.jit(qmv.moe_matvec_twin)(jnp.abs(xr), _abs_mxfp4(experts), ids)) + 1e-30
    assert_close(y, np.asarray(twin, np.float64), bound, f"experts [32, {n}, 2880] M={rows} int8_x")
    assert np.array_equal(np.asarray(call(x[:1], experts, ids[:1]))[0], np.asarray(y)[0]), "token 0 alone"


@pytest.mark.gpu
def test_fewer_programs_than_column_tiles_compiled_give_the_same_bits():
    """On the card: gpt-oss-20b's Q8_0 head (201,088 rows: 1,571 column tiles, more than qmatvec.INT8_PROGRAMS) on
    the default plan, on 264 programs and on a program a tile; and its experts gathered on 8 programs (23 tiles) and
    on a program a tile: the same bits."""
    _gpu()
    assert qmv.plan(QT.Q8_0, 201088, 2880, int8_x=True).programs == qmv.INT8_PROGRAMS < 201088 // qmv.INT8_BLOCK_N
    head = _on_device(QT.Q8_0, (201088, 2880), seed=10)
    x = jax.random.normal(jax.random.key(10), (2, 2880), jnp.float32)
    call = jax.jit(lambda x, w, p: qmv.qmatvec(x, w, tensor_cores=False, int8_x=True, programs=p), static_argnums=2)
    default, fewer, one_each = (np.asarray(call(x, head, p)) for p in (None, 264, 0))
    assert np.array_equal(default, one_each) and np.array_equal(fewer, one_each), "the head: other bits"
    experts = _on_device(QT.MXFP4, (32, 2880, 2880), seed=11)
    ids = jax.random.permutation(jax.random.key(11), 32)[:8].reshape(2, 4)
    gathered = jax.jit(lambda x, w, i, p: qmv.moe_matvec(x, w, i, int8_x=True, programs=p), static_argnums=3)
    taking_turns, one_each = (np.asarray(gathered(x, experts, ids, p)) for p in (8, 0))
    assert np.array_equal(taking_turns, one_each), "the experts: other bits"


# ---- RMSNorm in the rounding kernel (qmatvec_int8.quantize_x's `norm`; WORKER_NORM_ROUNDING=1) ----

NORMED = [(3, 896, None, 16), (2, 2880, q8.MXFP4_ORDER, 32), (2, 640, None, 16), (1, 3072, None, 16)]


def rounded_after_norm(x: np.ndarray, w: np.ndarray, order, sum_block: int, interpret: bool):
    """(fused: quantize_x with the norm; apart: the norm kernel, then quantize_x) for x [T, K]."""
    from worker.pallas_kernels import rms_norm

    fused = q8.quantize_x(jnp.asarray(x), order, sum_block, interpret, norm=(jnp.asarray(w), 1e-6))
    h = rms_norm.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6, interpret=interpret)
    return [np.asarray(a) for a in fused], [np.asarray(a) for a in q8.quantize_x(h, order, sum_block, interpret)]


def normed_case(t: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k + t)
    x = (rng.standard_normal((t, k)) * rng.uniform(0.1, 30, (t, 1))).astype(np.float32)
    return x, rng.standard_normal(k).astype(np.float32)


@pytest.mark.parametrize(("t", "k", "order", "sum_block"), NORMED, ids=lambda v: str(v) if isinstance(v, int) else "")
def test_quantize_x_after_a_norm_rounds_what_the_norm_kernel_gives(t, k, order, sum_block):
    """In interpret mode the norm's sum of squares runs over one row here and 32 in the norm kernel (XLA's order
    differs with the shape), so a block scale may move by an ulp, and a code by one step at a half; on the card
    the two are one block shape (`test_..._compiled_gives_the_norm_kernels_bits`)."""
    x, w = normed_case(t, k)
    (words, dx, sums), (words0, dx0, sums0) = rounded_after_norm(x, w, order, sum_block, interpret=True)
    np.testing.assert_allclose(dx, dx0, rtol=1e-6)
    moved = np.abs(words.view(np.int8).astype(np.int32) - words0.view(np.int8))
    assert moved.max() <= 1 and moved.sum() <= 2
    assert np.abs(sums - sums0).max() <= 2


@pytest.mark.gpu
@pytest.mark.parametrize(("t", "k", "order", "sum_block"), NORMED, ids=lambda v: str(v) if isinstance(v, int) else "")
def test_quantize_x_after_a_norm_compiled_gives_the_norm_kernels_bits(t, k, order, sum_block):
    _gpu()
    fused, apart = rounded_after_norm(*normed_case(t, k), order, sum_block, interpret=False)
    for a, b in zip(fused, apart, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_norm_first_takes_no_order_that_is_a_gather():
    with pytest.raises(ValueError, match="transpose"):
        q8.quantize_x(jnp.zeros((1, 64)), tuple(range(31, -1, -1)), norm=(jnp.ones(64), 1e-6), interpret=True)


@pytest.mark.parametrize(("arch", "file", "logits"), MODELS[:2], ids=[m[0] for m in MODELS[:2]])
def test_with_the_norm_in_the_rounding_kernel_a_model_follows_its_oracle(oracles, monkeypatch, arch, file, logits):
    """WORKER_NORM_ROUNDING=1 with int8 x: the norms before one product (qwen2's fused q|k|v and gate|up, llama's
    gate|up) are done by the kernel that rounds x, and the teacher-forced greedy decode still agrees with the
    float64 HF oracle wherever its margin is clear of int8's error."""
    monkeypatch.setattr(ops, "_norm_rounding", {"gpu": True, "interpret": True})
    calls, real = [], q8.quantize_x
    monkeypatch.setattr(q8, "quantize_x", lambda *a, **k: calls.append(k.get("norm") is not None) or real(*a, **k))
    d = oracles / "models" / arch
    m = worker.load(d / file, device="cpu", backend="interpret", slots=256, max_batch=2, int8_x=True)
    ids, ref = manifest(d)["input"]["ids"], np.load(d / logits)
    decoded = teacher_forced_decode(m, ids)
    fused = sum(calls)
    assert fused >= m.cfg.n_layers, calls  # traced once a decode program: a norm or two a layer
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * INT8_LOGIT_TOL
    assert clear.sum() >= len(ids) // 4 and (decoded == ref.argmax(-1))[clear].all()


def test_with_the_norm_in_the_rounding_kernel_a_seeded_job_gives_the_same_ids_whoever_shares_its_batch(
    oracles, monkeypatch
):
    """Alone (the per-row kernel) and among 10 others (a bucket of 16 rows: the int8-x dot), both normalizing x as
    they round it."""
    monkeypatch.setattr(ops, "_norm_rounding", {"gpu": True, "interpret": True})
    m = worker.load(oracles / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", backend="interpret", slots=512,
                    max_batch=16, int8_x=True)  # fmt: skip
    target = (list(range(3, 24)), SamplingParams(temperature=0.8, top_p=0.9), 1234, 12)
    alone = run_batch(m, [target], [0])[0]
    others = [(list(range(5, 5 + 3 * i)), OTHERS[i % len(OTHERS)], 77 + i, 4 + 2 * i) for i in range(1, 11)]
    assert run_batch(m, [target, *others], [0] * 11)[0] == alone


def epilogue_case(qtype: QT, n: int, k: int, rows: int, seed: int, put=np.asarray):
    rng = np.random.default_rng(seed)
    x, residual = (put(rng.standard_normal(s).astype(np.float32)) for s in ((rows, k), (rows, n)))
    return x, put(rng.standard_normal(n).astype(np.float32)), residual


def check_epilogue(x, w, bias, residual, interpret: bool, **tiles) -> None:
    """qmatvec's epilogue in the kernel (qmatvec_int8.Epilogue) against XLA's fold and adds after it: the same bits,
    with a bias or none, and the counts zeros after each of two calls that hand them on."""
    common = dict(interpret=interpret, tensor_cores=False, int8_x=True, **tiles)
    after = jax.jit(lambda x, w, b, r: r + (qmv.qmatvec(x, w, **common) + (0 if b is None else b)))
    kernel = jax.jit(lambda x, w, b, r, c: qmv.qmatvec(x, w, epilogue=(b, r, c), **common))
    counts = jnp.zeros((1024,), jnp.int32)
    for b in (bias, None):
        want = np.asarray(after(x, w, b, residual))
        for _ in range(2):  # the second call takes the first one's counts
            y, counts = kernel(x, w, b, residual, counts)
            assert np.array_equal(np.asarray(y), want), "other bits than XLA's fold and adds"
            assert not np.asarray(counts).any(), "the counts are not zeros again"


# (format, splits, rows): a 32-value and both 256-value formats (Q6_K's 16-value groups), one split and three, a
# program of 1-3 rows (each interpreted case takes 8-20 s on CI's cores).
EPILOGUE_CASES = [(QT.Q8_0, 3, 2), (QT.Q8_0, 1, 3), (QT.Q4_K, 3, 1), (QT.Q6_K, 3, 3)]


@pytest.mark.parametrize(("qtype", "splits", "rows"), EPILOGUE_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_the_epilogue_folds_and_adds_as_xla_does(qtype, splits, rows):
    """40 output columns in tiles of 16 (the last one masked), K in 1 or 3 splits, 1-3 rows of x."""
    sb = qmv.FORMATS[qtype].sb
    blocks, tiles = EDGE_TILES[sb]
    n, k = 40, blocks * sb
    w, _ = random_weight(qtype, (n, k), seed=41)
    tiles = tiles | {"splits": splits}
    assert qmv.plan(qtype, n, k, int8_x=True, **tiles).splits == splits
    x, bias, residual = epilogue_case(qtype, n, k, rows, seed=rows)
    check_epilogue(x, w, bias, residual, interpret=True, **tiles)


def test_the_epilogue_is_the_dense_per_row_kernels():
    w, _ = random_weight(QT.Q8_0, (2, 16, 64), seed=1)
    with pytest.raises(ValueError, match="the epilogue is the dense per-row kernel's"):
        q8.call(jnp.ones((1, 64)), w, jnp.zeros((1,), jnp.int32), 2, 16, qmv.plan(QT.Q8_0, 16, 64, int8_x=True), True,
                1, epilogue=(None, None, None))  # fmt: skip


def short_decode(path, where: dict) -> tuple[list[int], list]:
    """The model loaded on int8 x (`where`: its device and backend): its greedy ids for 6 tokens after "The quick
    brown fox", and their log-probabilities."""
    m = worker.load(path, **where, slots=256, max_batch=2, int8_x=True)
    logprobs: list = []
    ids = m.tokenizer.encode("The quick brown fox")
    out = list(m.generate_ids(ids, 6, SamplingParams(logprobs=True), stop_at_eos=False, logprobs=logprobs))
    return out, logprobs


def check_epilogue_model(path, monkeypatch, where: dict) -> None:
    """A model's decode with the epilogue (its output and down projections' residual adds in their kernel) and
    without: the same ids and log-probabilities, bit for bit; every decode step's o/down calls took it."""

    def generate(on: bool) -> tuple[list[int], list]:
        monkeypatch.setattr(ops, "_fold_epilogue", {"gpu": on, "interpret": on})
        calls, real = [], qmv.qmatvec
        spy = lambda *a, **k: calls.append(k.get("epilogue") is not None) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(qmv, "qmatvec", spy)
        decoded = short_decode(path, where)
        assert any(calls) == on, calls
        return decoded

    assert generate(True) == generate(False)


def test_a_model_with_the_epilogue_decodes_the_same_bits(oracles, monkeypatch):
    check_epilogue_model(oracles / "models" / "qwen2" / "model-q8_0.gguf", monkeypatch,
                         dict(device="cpu", backend="interpret"))  # fmt: skip


# Real decode shapes (N, K): qwen2.5-0.5b's o (Q8_0, 14 splits) and down (Q4_K here), phi3-mini's down (Q6_K),
# gpt-oss-20b's o (Q8_0, K 4096).
# At one stream's 2 rows, and 8 (a program's most) on one; each case compiles four kernels (~15-110 s on the card).
GPU_EPILOGUE = [(QT.Q8_0, 896, 896, 2), (QT.Q8_0, 896, 896, 8), (QT.Q4_K, 896, 4864, 2), (QT.Q6_K, 3072, 8192, 2),
                (QT.Q8_0, 2880, 4096, 2)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("qtype", "n", "k", "rows"), GPU_EPILOGUE, ids=lambda v: getattr(v, "name", str(v)))
def test_gpu_the_epilogue_folds_and_adds_as_xla_does(qtype, n, k, rows):
    """Compiled: the programs meet through their counts in memory (an atomic after a barrier, then reads of the
    others' partial sums from L2). Passed on an H100 (2026-12-06) at 1, 2 and 8 rows with volatile reads."""
    _gpu()
    w = _on_device(qtype, (n, k), seed=n + k)
    assert qmv.plan(qtype, n, k, int8_x=True).splits > 1
    x, bias, residual = epilogue_case(qtype, n, k, rows, seed=rows, put=jax.device_put)
    check_epilogue(x, w, bias, residual, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2", "gpt-oss"])
def test_gpu_a_model_with_the_epilogue_decodes_the_same_bits(oracles, monkeypatch, arch):
    _gpu()
    file = "model-mxfp4_moe.gguf" if arch == "gpt-oss" else "model-q8_0.gguf"
    check_epilogue_model(oracles / "models" / arch / file, monkeypatch, dict(device="gpu"))


# ---- A gated unit's act(gate) * up in the rounding kernel (quantize_x's `glu`; WORKER_GLU_ROUNDING=1) ----

# (rows, K, x order, sum block, activation): qwen2.5-0.5b's down (K 4,864) and gemma3-270m's (2,048, GeGLU), an MXFP4
# order (a transpose in the kernel), and a block count that is not a power of two (K 96: 3 blocks a program).
GATED = [(2, 4864, None, 16, "silu"), (1, 2048, None, 32, "gelu_tanh"), (3, 2880, q8.MXFP4_ORDER, 16, "silu"),
         (2, 96, None, 16, "gelu_tanh")]  # fmt: skip


def rounded_gated(t: int, k: int, order, sum_block: int, glu: str, interpret: bool):
    """(fused: quantize_x with `glu` on [gate | up]; apart: XLA's act(gate) * up, then quantize_x)."""
    rng = np.random.default_rng(k + t)
    x = jnp.asarray((rng.standard_normal((t, 2 * k)) * 4).astype(np.float32))
    fused = jax.jit(lambda x: q8.quantize_x(x, order, sum_block, interpret, glu=glu))(x)
    apart = jax.jit(lambda x: q8.quantize_x(q8.glu_product(x, glu), order, sum_block, interpret))(x)
    return [np.asarray(a) for a in fused], [np.asarray(a) for a in apart]


@pytest.mark.parametrize(("t", "k", "order", "sum_block", "glu"), GATED, ids=lambda v: str(v) if v else "")
def test_quantize_x_of_a_gated_unit_rounds_what_xla_computes(t, k, order, sum_block, glu):
    """Interpret mode runs the activation's jax.nn operations in the kernel: the same bits."""
    for a, b in zip(*rounded_gated(t, k, order, sum_block, glu, interpret=True), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize(("t", "k", "order", "sum_block", "glu"), GATED, ids=lambda v: str(v) if v else "")
def test_gpu_quantize_x_of_a_gated_unit_rounds_what_xla_computes(t, k, order, sum_block, glu):
    """Compiled, Triton's exp and XLA's may round apart: a block's scale within float32's step, a code moved by one
    step where a value sat at a half, rarely."""
    _gpu()
    (words, dx, sums), (words0, dx0, sums0) = rounded_gated(t, k, order, sum_block, glu, interpret=False)
    np.testing.assert_allclose(dx, dx0, rtol=2e-7)
    moved = np.abs(words.view(np.int8).astype(np.int32) - words0.view(np.int8))
    assert moved.max() <= 1 and moved.sum() <= max(2, words.size // 1000)
    assert np.abs(sums - sums0).max() <= 2


def test_a_gated_unit_with_a_norm_or_a_gathered_order_is_computed_first():
    """quantize_x takes a norm or a gathered order with `glu` by computing act(gate) * up before: the same bits."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 128)).astype(np.float32))
    reverse = tuple(range(31, -1, -1))
    want = q8.quantize_x(q8.glu_product(x, "silu"), reverse, interpret=True)
    for a, b in zip(q8.quantize_x(x, reverse, interpret=True, glu="silu"), want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def gated_decode(path, monkeypatch, where: dict, glu: str, on: bool) -> tuple[list[int], list]:
    """`short_decode` with the gated units in the rounding kernel or not; with, its decode program's down projection
    took it (`glu`: the model's activation)."""
    monkeypatch.setattr(ops, "_glu_rounding", {"gpu": on, "interpret": on})
    calls, real = [], q8.quantize_x
    monkeypatch.setattr(q8, "quantize_x", lambda *a, **k: calls.append(k.get("glu")) or real(*a, **k))
    decoded = short_decode(path, where)
    assert (glu in calls) == on, calls  # the decode program's layer (traced once, in the layers' loop)
    return decoded


def check_gated_model(path, monkeypatch, where: dict, glu: str) -> tuple:
    """A model's decode (ids, log-probabilities) with its gated units in the rounding kernel and without."""
    return gated_decode(path, monkeypatch, where, glu, True), gated_decode(path, monkeypatch, where, glu, False)


GATED_MODELS = [("qwen2", "model-q8_0.gguf", "silu"), ("gemma3", "model-q4_k_m.gguf", "gelu_tanh")]


# gemma3's case (GeGLU, a norm after the down projection) takes 18 s of CI's cores: on the card only (its GeGLU
# kernel runs here in test_quantize_x_of_a_gated_unit_rounds_what_xla_computes).
@pytest.mark.parametrize(("arch", "file", "glu"), GATED_MODELS[:1], ids=[m[0] for m in GATED_MODELS[:1]])
def test_a_model_with_its_gated_units_in_the_rounding_kernel_decodes_the_same_bits(oracles, monkeypatch, arch, file,
                                                                                     glu):  # fmt: skip
    """qwen2 (SwiGLU, its down projection with the residual): interpret mode, the same bits."""
    where = dict(device="cpu", backend="interpret")
    on, off = check_gated_model(oracles / "models" / arch / file, monkeypatch, where, glu)
    assert on == off


@pytest.mark.gpu
@pytest.mark.parametrize(("arch", "file", "glu"), GATED_MODELS, ids=[m[0] for m in GATED_MODELS])
def test_gpu_a_model_with_its_gated_units_in_the_rounding_kernel_follows_its_decode(oracles, monkeypatch, arch, file,
                                                                                      glu):  # fmt: skip
    """Compiled, the activation's rounding may move a code by a step: the same greedy ids, log-probabilities within
    int8's error of x."""
    _gpu()
    (ids, lp), (ids0, lp0) = check_gated_model(oracles / "models" / arch / file, monkeypatch, dict(device="gpu"), glu)
    assert ids == ids0
    np.testing.assert_allclose([t.logprob for t in lp], [t.logprob for t in lp0], atol=INT8_LOGIT_TOL / 10)


def test_a_gated_unit_in_the_rounding_kernel_with_the_fold_epilogue_decodes_the_same_bits(oracles, monkeypatch):
    """Both on at once (the down projection's x from [gate | up], its residual added in its kernel): qwen2's decode
    the same bits as with neither."""
    path, where = oracles / "models/qwen2/model-q8_0.gguf", dict(device="cpu", backend="interpret")
    monkeypatch.setattr(ops, "_fold_epilogue", {"gpu": True, "interpret": True})
    both = gated_decode(path, monkeypatch, where, "silu", on=True)
    monkeypatch.setattr(ops, "_fold_epilogue", {"gpu": False, "interpret": False})
    assert both == gated_decode(path, monkeypatch, where, "silu", on=False)
