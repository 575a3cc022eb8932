"""On-device sampling (worker.sampling) on crafted logits: exact where the math is exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worker.batch import key_data
from worker.sampling import (
    ALL_STAGES,
    SamplingArrays,
    SamplingParams,
    SamplingPlan,
    _prefix,
    draw,
    filter_logits,
    penalize,
    sample,
    seed_key,
    token_logprobs,
)

V = 8
LOGITS = jnp.asarray([2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 2.5, -2.0], jnp.float32)
NO_SEEN = jnp.zeros(V, bool)


def kept(params: SamplingParams, logits=LOGITS) -> set[int]:
    out = np.asarray(filter_logits(logits, params.arrays()))
    return set(np.nonzero(np.isfinite(out))[0].tolist())


def test_greedy_is_argmax():
    tok = sample(LOGITS, SamplingParams(temperature=0.0).arrays(), seed_key(1), jnp.int32(0), NO_SEEN)
    assert int(tok) == 3


def test_top_k_1_equals_argmax_at_any_temperature():
    p = SamplingParams(temperature=1.5, top_k=1).arrays()
    draws = [int(sample(LOGITS, p, seed_key(s), jnp.int32(i), NO_SEEN)) for s in range(5) for i in range(10)]
    assert set(draws) == {3}


def test_top_k_keeps_exactly_k():
    assert kept(SamplingParams(temperature=1.0, top_k=3)) == {3, 6, 0}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.asarray(jax.nn.softmax(LOGITS))
    order = np.argsort(-probs)
    for p in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        cum = np.cumsum(probs[order])
        n = int(np.searchsorted(cum, p) + 1)  # smallest prefix with mass >= p
        assert kept(SamplingParams(temperature=1.0, top_p=p)) == set(order[:n].tolist()), p


def test_top_p_always_keeps_one():
    assert kept(SamplingParams(temperature=1.0, top_p=0.0)) == {3}


def test_min_p_relative_to_top_probability():
    probs = np.asarray(jax.nn.softmax(LOGITS))
    for m in (0.05, 0.2, 0.5, 0.9):
        expected = set(np.nonzero(probs >= m * probs.max())[0].tolist())
        assert kept(SamplingParams(temperature=1.0, min_p=m)) == expected


def test_repetition_penalty_changes_exactly_the_penalised_logits():
    seen = jnp.zeros(V, bool).at[jnp.asarray([0, 4, 5])].set(True)
    out = np.asarray(penalize(LOGITS, seen, jnp.float32(1.3)))
    ref = np.asarray(LOGITS).copy()
    ref[0] = 2.0 / 1.3  # positive: divided
    ref[4] = -1.0 * 1.3  # negative: multiplied
    ref[5] = 0.0  # zero stays zero
    np.testing.assert_array_equal(out, ref.astype(np.float32))


def test_repetition_penalty_steers_greedy():
    seen = jnp.zeros(V, bool).at[3].set(True)
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0).arrays()
    assert int(sample(LOGITS, p, seed_key(0), jnp.int32(0), seen)) == 6  # 3.0 / 2 = 1.5 < 2.5


def test_draws_match_softmax_chi_square():
    """20,000 draws at temperature 1 against softmax: Pearson chi-square at significance 0.001 (fixed seed, so
    the outcome is reproducible; the threshold is the 99.9% quantile of chi2 with V-1 = 7 dof, 24.32)."""
    p = SamplingParams(temperature=1.0).arrays()
    key = seed_key(20251126)
    draws = jax.jit(jax.vmap(lambda i: sample(LOGITS, p, key, i, NO_SEEN)))(jnp.arange(20_000))
    counts = np.bincount(np.asarray(draws), minlength=V)
    expected = np.asarray(jax.nn.softmax(LOGITS), np.float64) * 20_000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, (chi2, counts.tolist())


# Four ids across the draw's blocks (the first, a block's last and the next's first, the last of a partial block) in
# a vocabulary of Gemma 3's size, every other id at -inf (a filter's leftovers)
SPREAD_IDS, SPREAD_P = [5, 511, 512, 262_143], [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("vocab", [262_144, 1_300], ids=["gemma3", "partial-block"])
def test_draws_across_blocks_match_their_probabilities_and_never_take_a_masked_id(vocab):
    """The two-level draw (worker/sampling.py `draw`): 20,000 draws of four ids in different blocks (the last in a
    partial block where the vocabulary ends mid-block) follow their probabilities (Pearson chi-square, 3 dof, 99.9%
    quantile 16.27), and no -inf id is ever drawn."""
    ids = [i % vocab for i in SPREAD_IDS[:3]] + [vocab - 1]
    logits = jnp.full(vocab, -jnp.inf).at[jnp.asarray(ids)].set(jnp.log(jnp.asarray(SPREAD_P)))
    key = seed_key(99)
    draws = np.asarray(jax.jit(jax.vmap(lambda i: draw(jax.random.fold_in(key, i), logits)))(jnp.arange(20_000)))
    assert set(np.unique(draws)) <= set(ids), np.unique(draws)
    counts = np.array([(draws == i).sum() for i in ids])
    expected = np.asarray(SPREAD_P) * 20_000
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.27, counts.tolist()


def test_the_draws_prefix_sums_are_cumulative_sums():
    x = np.random.default_rng(3).uniform(0, 1, 777).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_prefix(jnp.asarray(x))), np.cumsum(x.astype(np.float64)), rtol=1e-5)


def test_temperature_sharpens_distribution():
    key = seed_key(7)
    cold = SamplingParams(temperature=0.2).arrays()
    draws = np.asarray(jax.vmap(lambda i: sample(LOGITS, cold, key, i, NO_SEEN))(jnp.arange(2000)))
    assert (draws == 3).mean() > 0.9


def test_seed_derivation_covers_uint64():
    k1, k2 = seed_key(2**64 - 1), seed_key(2**32 - 1)
    assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
    with pytest.raises(ValueError):
        seed_key(2**64)


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 0xDEADBEEFCAFEBABE])
def test_host_key_data_is_the_eager_keys_bits(seed):
    # The engine derives each job's key in one jitted program on the CPU device (batch.key_data); its bits must be
    # those of JAX's own eager key derivation from the seed's two words (JAX's threefry, not ours).
    eager = jax.random.fold_in(jax.random.key(seed >> 32), seed & 0xFFFFFFFF)
    np.testing.assert_array_equal(key_data(seed), np.asarray(jax.random.key_data(eager)))
    assert key_data(seed).dtype == np.uint32


def test_host_key_data_refuses_what_is_not_a_uint64():
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            key_data(bad)


def test_changing_parameters_does_not_recompile():
    f = jax.jit(sample)
    f(LOGITS, SamplingParams(0.7, 5, 0.9, 0.05, 1.1).arrays(), seed_key(1), jnp.int32(0), NO_SEEN)
    n = f._cache_size()
    f(LOGITS, SamplingParams(1.3, 2, 0.5, 0.0, 1.0).arrays(), seed_key(2), jnp.int32(1), NO_SEEN)
    assert f._cache_size() == n


def test_plan_includes_exactly_the_stages_the_parameters_switch_on():
    greedy = SamplingPlan(penalty=False, filtering=False, draw=False)
    assert SamplingParams(temperature=0.0, top_k=5, top_p=0.5).plan() == greedy
    assert SamplingParams(temperature=0.7).plan() == SamplingPlan(penalty=False, filtering=False)
    assert SamplingParams(temperature=0.7, top_k=5).plan() == SamplingPlan(penalty=False, filtering=True)
    assert SamplingParams(temperature=0.7, top_p=0.9).plan() == SamplingPlan(penalty=False, filtering=True)
    assert SamplingParams(temperature=0.7, min_p=0.1).plan() == SamplingPlan(penalty=False, filtering=True)
    assert SamplingParams(repetition_penalty=1.2).plan() == SamplingPlan(penalty=True, filtering=False, draw=False)


def test_stages_left_out_of_the_plan_are_no_ops():
    """The compiled variant without a stage draws exactly the ids that the all-stages variant draws."""
    seen = jnp.zeros(V, bool).at[jnp.asarray([1, 3])].set(True)
    cases = [SamplingParams(0.0), SamplingParams(0.9), SamplingParams(1.1, top_k=3), SamplingParams(0, 0, 1, 0, 1.5),
             SamplingParams(1.3, 0, 0.8, 0.0, 1.0), SamplingParams(0.8, 0, 1.0, 0.1, 1.2)]  # fmt: skip

    def draws(params, plan):
        sp, key = params.arrays(), seed_key(9)
        return np.asarray(jax.vmap(lambda i: sample(LOGITS, sp, key, i, seen, plan))(jnp.arange(300)))

    for params in cases:
        full, planned = draws(params, ALL_STAGES), draws(params, params.plan())
        np.testing.assert_array_equal(np.asarray(planned), np.asarray(full), err_msg=str(params))


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_a_rows_filter_and_logprobs_do_not_depend_on_the_rows_sampled_with_it(device):
    """The top-p/min-p filter and the log-probabilities of a row (sums in fixed orders), alone and among 8 rows of a
    151,936-id vocabulary: the same bits."""
    dev = jax.devices(device)[0]
    rng = np.random.default_rng(5)
    logits = jax.device_put((3 * rng.standard_normal((8, 151_936))).astype(np.float32), dev)
    values = ((0.8, np.float32), (40, np.int32), (0.9, np.float32), (0.02, np.float32), (1.0, np.float32))
    sp = SamplingArrays(*(jax.device_put(np.full(8, v, dt), dev) for v, dt in values))
    filt = jax.jit(jax.vmap(filter_logits))
    logp = jax.jit(lambda x: token_logprobs(x, jnp.zeros(x.shape[0], jnp.int32)))
    together = np.asarray(filt(logits, sp)), [np.asarray(a) for a in logp(logits)]
    for r in (0, 5):
        one = jax.tree_util.tree_map(lambda a, r=r: a[r : r + 1], sp)
        assert np.array_equal(np.asarray(filt(logits[r : r + 1], one))[0], together[0][r])
        for a, b in zip(logp(logits[r : r + 1]), together[1], strict=True):
            assert np.array_equal(np.asarray(a)[0], b[r])
