"""Token sampling on the device, inside the compiled step (M0-W-1421 order): temperature, repetition penalty,
top-k, top-p, min-p, then argmax (temperature 0) or a categorical draw.

Per-request parameters are arrays (`SamplingArrays`), never static arguments, so changing them does not
recompile. Which stages run at all is static (`SamplingPlan`: the repetition penalty, the top-k/top-p/min-p
filter, the draw, and the log-probabilities below), so each combination compiles once: a stage whose parameters
switch it off is skipped, not branched around with a `lax.cond`. On the GPU a `cond` inside the decode loop makes
the host wait for the device to read its predicate, every step, which stalls the host's launching of the next
step's kernels (measured: ~1.2 ms a step in the profile of a qwen2.5-0.5b decode).

Seeds: a request's uint64 seed gives `jax.random.key(seed)` (threefry2x32 over the seed's high and low 32-bit
words); the draw for generated token i uses `fold_in(key, i)`, so the ids depend only on the seed and the token
index, not on how many decode steps run per dispatch.

Log-probabilities (the OpenAI API's logprobs/top_logprobs) are computed in the same compiled step, from the
model's raw logits (log-softmax before temperature, penalty and filters, as vLLM reports them by default): the
chosen token's and the TOP_LOGPROBS most likely. Whether they are computed at all is static (`SamplingPlan.logprobs`),
so a request that does not ask for them runs the step without them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from worker.ops import row_sum

MAX_SEED = 2**64 - 1
TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    logprobs: bool = False  # also compute each generated token's log-probability and the top alternatives

    def plan(self) -> SamplingPlan:
        return SamplingPlan(
            penalty=self.repetition_penalty != 1.0,
            filtering=self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0),
            logprobs=self.logprobs,
            draw=self.temperature > 0,
        )

    def arrays(self) -> SamplingArrays:
        return SamplingArrays(
            temperature=jnp.float32(self.temperature),
            top_k=jnp.int32(self.top_k),
            top_p=jnp.float32(self.top_p),
            min_p=jnp.float32(self.min_p),
            repetition_penalty=jnp.float32(self.repetition_penalty),
        )


@dataclass(frozen=True)
class SamplingPlan:
    """The stages a compiled step includes (static). A stage left out must be a no-op for the request's
    parameters; the default includes every stage, which is exact for any parameters. `logprobs` adds an output,
    not a stage."""

    penalty: bool = True
    filtering: bool = True
    logprobs: bool = False
    # The categorical draw (`draw`): ~1 ms a token on a 2-core CPU for Gemma 3's 262,144 ids (the exponentials and
    # sums), wasted on greedy requests.
    draw: bool = True


ALL_STAGES = SamplingPlan()


@jax.tree_util.register_dataclass
@dataclass
class SamplingArrays:
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log-probability and the TOP_LOGPROBS most likely (id, log-probability), best first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


def log_softmax(logits: jax.Array) -> jax.Array:
    """Over the last axis, its sum in a fixed order (ops.row_sum): a row's values do not depend on the rows it is
    computed with (batch invariance; XLA picks a reduction's order from the whole shape)."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)  # a max is exact in any order
    return shifted - jnp.log(row_sum(jnp.exp(shifted)))


def token_logprobs(logits: jax.Array, token: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, V] (raw), token [B] -> the token's log-probability [B], the top ids [B, K] and theirs [B, K]."""
    lp = log_softmax(logits.astype(jnp.float32))
    top_lp, top_ids = jax.lax.top_k(lp, min(TOP_LOGPROBS, lp.shape[-1]))
    return jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp


def new_seed() -> int:
    return secrets.randbits(64)


def seed_key(seed: int) -> jax.Array:
    return seed_key_words(*seed_words(seed))


def seed_words(seed: int) -> tuple[int, int]:
    """A uint64 seed's (high, low) 32-bit words; ValueError for anything else."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} is not a uint64")
    return seed >> 32, seed & 0xFFFFFFFF


def seed_key_words(hi, lo) -> jax.Array:
    """The key of the uint64 seed hi * 2**32 + lo (each word a Python int or a uint32, traced or not): two words,
    so every uint64 seed maps to its own key without needing jax_enable_x64."""
    return jax.random.fold_in(jax.random.key(hi), lo)


def penalize(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """CTRL / llama.cpp repetition penalty on the ids in `seen`: divide positive logits, multiply negative."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, sp: SamplingArrays) -> jax.Array:
    """Top-k, then top-p over the renormalised survivors, then min-p; removed ids get -inf. logits [V]."""
    order = jnp.argsort(-logits, stable=True)  # ties: lower id first
    ranked = logits[order]
    rank = jnp.arange(logits.shape[-1])
    keep = (sp.top_k <= 0) | (rank < sp.top_k)
    ranked = jnp.where(keep, ranked, -jnp.inf)
    # Sums in fixed orders (batch invariance: a row's filter must not depend on the rows sampled with it): the
    # softmax's by ops.row_sum, the running mass by an associative scan, a fixed tree of elementwise adds.
    probs = jnp.exp(ranked - ranked[0])  # ranked[0] is the largest
    probs = probs / row_sum(probs)
    mass_before = jax.lax.associative_scan(jnp.add, probs) - probs
    keep &= (sp.top_p >= 1.0) | (mass_before < sp.top_p)  # the smallest prefix whose mass reaches top_p
    keep &= probs >= sp.min_p * probs[0]
    keep = keep.at[0].set(True)  # always at least the most likely token
    return jnp.full_like(logits, -jnp.inf).at[order].set(jnp.where(keep, ranked, -jnp.inf))


def sample(
    logits: jax.Array,
    sp: SamplingArrays,
    key: jax.Array,
    index: jax.Array,
    seen: jax.Array,
    plan: SamplingPlan = ALL_STAGES,
) -> jax.Array:
    """One token id from logits [V] (float32); `seen` [V] bool marks prompt and generated ids."""
    logits = logits.astype(jnp.float32)
    greedy = sp.temperature <= 0.0
    logits = jnp.where(greedy, logits, logits / jnp.where(greedy, 1.0, sp.temperature))
    if plan.penalty:
        logits = penalize(logits, seen, sp.repetition_penalty)
    if not plan.draw:
        return jnp.argmax(logits).astype(jnp.int32)
    filtered = filter_logits(logits, sp) if plan.filtering else logits
    drawn = draw(jax.random.fold_in(key, index), filtered)
    return jnp.where(greedy, jnp.argmax(logits), drawn).astype(jnp.int32)


DRAW_BLOCK = 512  # ids a block of the two-level draw


def draw(key: jax.Array, logits: jax.Array) -> jax.Array:
    """An id drawn from softmax(logits [V]) (-inf: never) by inverse transform in two levels, with two uniform
    numbers: a block of DRAW_BLOCK ids by the blocks' masses, then an id in it by the ids' weights. Why not
    jax.random.categorical: its Gumbel noise is a random number an id, ~8 ms a token on a 2-core CPU for Gemma 3's
    262,144 ids (threefry, one core), here ~1 ms. Batch invariant: every sum is a fixed order of elementwise adds
    (ops.row_sum, `_prefix`), so a row's id depends on its logits and key alone."""
    v = logits.shape[-1]
    weights = jnp.exp(logits - jnp.max(logits))
    blocks = -(-v // DRAW_BLOCK)
    weights = jnp.pad(weights, (0, blocks * DRAW_BLOCK - v)).reshape(blocks, DRAW_BLOCK)
    u = jax.random.uniform(key, (2,))
    block = _first_above(_prefix(row_sum(weights)[:, 0]), u[0])
    return block * DRAW_BLOCK + _first_above(_prefix(weights[block]), u[1])


def _prefix(x: jax.Array) -> jax.Array:
    """Inclusive prefix sums of x [N] as log2(N) rounds of elementwise adds (Hillis-Steele): each sum's order is
    fixed by N alone, where XLA's cumsum picks its algorithm from the whole shape."""
    shift = 1
    while shift < x.shape[-1]:
        x = x + jnp.pad(x[:-shift], (shift, 0))
        shift *= 2
    return x


def _first_above(cumulative: jax.Array, u: jax.Array) -> jax.Array:
    """The first index whose cumulative mass exceeds u (in [0, 1)) of the total: one past those at or below it.
    Zero-mass entries are never chosen (their sums equal the one before)."""
    below = jnp.sum(cumulative <= u * cumulative[-1], dtype=jnp.int32)
    return jnp.minimum(below, cumulative.shape[-1] - 1)
