"""The compiled steps, the only code that touches the device: prefill (prompt chunks into their sequences' KV
pages, logits of each chunk's last position; on the kernel backends several sequences' short chunks in one
dispatch, `prefill_group`), the first tokens' samples, and the batched decode (several sampled
steps per dispatch for up to max_batch sequences at once, sampling on the device), each with the KV pool donated so
XLA updates it in place.

Every input is a fixed-shape array: per-row token ids, positions, page tables, sampling parameters, seeds and draw
indices, so which sequences share a batch never recompiles anything. What does compile is a bucket: prompt chunks
are padded to powers of two (at least MIN_BUCKET, at most the chunk size), the rows of a decode dispatch to a power
of two (at least min_rows) and page tables to a power-of-two width (at least MIN_TABLE_PAGES), so a short sequence
never reads the whole context.

Batch invariance (docs/batching.md): a row's arithmetic does not depend on the other rows, on the row buckets or
on the table width. Per-row parameters and keys; on a GPU the batch-invariant kernels compute the rows together
(at least MIN_ROWS of them, so that no one-row shape takes another XLA code path); on the CPU the rows are
computed together on the CPU's own kernel where it takes every matrix (_all_rows_on_cpu_kernel), else each on its
own (_one_row_at_a_time).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass
from functools import partial
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from worker import cpu_kernels, ops, sharding
from worker.kv_cache import PAGE_SIZE, KVCache, bytes_per_slot, dtype_for, init_cache, pages_for, table_row
from worker.models.base import live_tokens
from worker.quant import Int8Blocks, QuantArray
from worker.sampling import ALL_STAGES, SamplingArrays, SamplingPlan, sample, token_logprobs

log = logging.getLogger(__name__)

# The runners that may be compiling ahead (Runner._soon), for `_stop_compiling_at_exit`.
_RUNNERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_compiling_at_exit() -> None:
    """At the interpreter's exit, drop what waits to be compiled ahead and let a compile under way finish: one still in
    XLA while the interpreter finalizes aborts the process (exit -6, met by a test process that ended with one under
    way). The server leaves sooner where one is under way (server/cli.py, `os._exit`)."""
    for runner in list(_RUNNERS):
        runner.stop_compiling_ahead(wait_s=300)


# How soon a program compiled ahead is wanted (Runner._soon): without it the running streams will stall for its
# compile; a waiting prompt needs it (its prefill, or the decode it joins: Batch._prefill); a dispatch runs on another
# that computes the same meanwhile (Runner.decode_cover); only while the batch is idle.
NEEDED, PROMPT, COVERED, WHEN_IDLE = 0, 1, 2, 3

# (token log-probability, top ids, top log-probabilities) of sampled rows, on the device; None when not asked for
Scores = tuple[jax.Array, jax.Array, jax.Array] | None

# RowInputs' fields that make a row's SamplingArrays, in that class's order.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
MIN_BUCKET = 16
MIN_ROWS = 2
MIN_TABLE_PAGES = 16
# Prompt tokens (padding included) in one prefill dispatch of several sequences (`prefill_group`): each sequence's
# chunk is padded to ops.PREFILL_KERNEL_ROWS, so at most this / that many sequences share one.
# WORKER_PREFILL_GROUP_TOKENS=0 gives every chunk a dispatch of its own (docs/batching.md).
PREFILL_GROUP_TOKENS = ops.env_int("WORKER_PREFILL_GROUP_TOKENS", 4096)


def pow2_bucket(n: int, low: int, high: int) -> int:
    """The power of two >= n, within [low, high] (high itself when it is not a power of two)."""
    return min(high, max(low, 1 << (max(n, 1) - 1).bit_length()))


def bucket(n: int, chunk: int) -> int:
    return pow2_bucket(n, MIN_BUCKET, chunk)


@jax.tree_util.register_dataclass
@dataclass
class Rows:
    """The device half of the decode rows' state: each row's last token (not yet in the cache) and the ids the
    repetition penalty applies to. Rows without a sequence hold stale values that nothing reads."""

    tokens: jax.Array  # [max_batch] int32
    seen: jax.Array  # [max_batch, vocab] bool


@dataclass(frozen=True)
class RowInputs:
    """The host half, per row of a dispatch (numpy, R rows): positions, page tables [R, n], sampling parameters,
    key data [R, 2] and draw indices."""

    positions: np.ndarray
    tables: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    repetition_penalty: np.ndarray
    keys: np.ndarray
    index: np.ndarray

    @classmethod
    def neutral(cls, rows: int, width: int) -> RowInputs:
        """Inputs for `rows` rows without a sequence: the null page table, position 0, greedy parameters."""
        shapes = {"tables": (rows, width), "keys": (rows, 2)}
        return cls(**{f: np.full(shapes.get(f, rows), value, dtype) for f, (value, dtype) in _NEUTRAL.items()})

    def place(self, row: int, seq: Any, width: int) -> None:
        """Row `row` decodes `seq` (worker.scheduler.Sequence) from its first decode position (after the prompt
        ids in the cache) and its draw index, with its params."""
        p = seq.params
        self.positions[row], self.index[row], self.keys[row] = seq.prefilled, seq.dispatched, seq.key
        self.tables[row] = table_row(seq.pages, width)
        self.temperature[row], self.top_k[row], self.top_p[row] = p.temperature, p.top_k, p.top_p
        self.min_p[row], self.repetition_penalty[row] = p.min_p, p.repetition_penalty

    def clear(self, row: int) -> None:
        """Row `row` has no sequence any more: neutral again."""
        for f, (value, _) in _NEUTRAL.items():
            getattr(self, f)[row] = value

    def head(self, rows: int, width: int) -> RowInputs:
        """A copy of the first `rows` rows, page tables cut to `width` entries (a dispatch's own arrays: those kept
        between dispatches change while it is in flight, and a CPU device may not copy what it is given)."""
        head = {f: getattr(self, f)[:rows].copy() for f in RowInputs.__dataclass_fields__ if f != "tables"}
        return RowInputs(tables=self.tables[:rows, :width].copy(), **head)


# A row without a sequence, field by field (RowInputs' order): (value, dtype). The null page table, position 0,
# greedy parameters.
_NEUTRAL = {"positions": (0, np.int32), "tables": (0, np.int32), "temperature": (0.0, np.float32),
            "top_k": (0, np.int32), "top_p": (1.0, np.float32), "min_p": (0.0, np.float32),
            "repetition_penalty": (1.0, np.float32), "keys": (0, np.uint32), "index": (0, np.int32)}  # fmt: skip


class Runner:
    """Owns the compiled entry points of one model on one device, over a KV pool of `pages` pages."""

    def __init__(
        self,
        adapter: ModuleType,
        cfg: Any,
        weights: Any,
        device: jax.Device,
        context: int,
        pages: int,
        max_batch: int,
        chunk: int = 512,
        page_size: int = PAGE_SIZE,
        deterministic: bool = True,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """`mesh`: tensor parallelism (worker/sharding.py): inputs replicated over it, the KV pool split by kv
        heads; `device` is then its first device."""
        self.adapter, self.cfg, self.weights, self.device = adapter, cfg, weights, device
        self.mesh = mesh
        one = jax.sharding.SingleDeviceSharding(device)
        self.input_sharding = sharding.replicated(mesh) if mesh else one
        self.cache_sharding = sharding.cache_sharding(mesh) if mesh else one
        self.kv_split = sharding.kv_split(mesh) if mesh else 1  # devices the pool's kv heads are split over
        self.context, self.pages, self.page_size = context, pages, page_size
        self.max_batch = max_batch  # sequences at once; the row arrays have at least min_rows rows
        # `deterministic`: batch invariant (docs/batching.md). The CPU then computes the rows together on its own
        # kernel (_all_rows_on_cpu_kernel) or, where a matrix is not the kernel's, each row on its own
        # (_one_row_at_a_time), so one row is a bucket there; without it, rows share XLA:CPU's matrix products
        # (bits that change with the batch).
        self.deterministic = deterministic
        self.min_rows = MIN_ROWS if deterministic and cfg.backend != "cpu" else 1
        self._rows = max(max_batch, self.min_rows)
        self.max_pages = pages_for(context, page_size)  # a sequence's page table
        self.chunk, self.cache_dtype = min(chunk, context), dtype_for(device.platform)
        self._prefill = jax.jit(partial(_prefill, adapter, cfg, self.min_rows), donate_argnums=(5,))
        step = _all_rows_at_once
        if deterministic and cfg.backend == "cpu":
            step = _all_rows_on_cpu_kernel if _rows_invariant_on_cpu(weights) else _one_row_at_a_time
        decode = partial(_decode, adapter, cfg, step)
        self._decode = jax.jit(decode, static_argnums=(9, 10), donate_argnums=(2, 6))
        self._first = jax.jit(_sample_rows, static_argnums=(5,))
        self._join = jax.jit(_join, donate_argnums=(0,))
        self._all_logits = jax.jit(partial(_all_logits, adapter, cfg), donate_argnums=(4,))
        # Programs compiled ahead on a background thread (`_soon`): on by default, WORKER_COMPILE_AHEAD=0 off.
        self.compile_ahead = os.environ.get("WORKER_COMPILE_AHEAD", "") != "0"
        self._asked: set[tuple] = set()  # every program asked for
        self._ahead: dict[tuple, list] = {}  # those waiting: [when, order asked, job]
        self._ahead_lock, self._ahead_thread, self._order = threading.Lock(), None, itertools.count()
        # The decode programs known compiled, (rows, width, steps, plan): where the one a dispatch needs is not, a
        # dispatch may take one of these that computes the same (`decode_cover`) while it compiles.
        self._decodes: set[tuple[int, int, int, SamplingPlan]] = set()
        # The prefill shapes known compiled, (group size, chunk bucket, width): `prefill_shape`.
        self._prefills: set[tuple[int, int, int]] = set()
        self._failed: set[tuple] = set()  # the programs whose compile ahead failed
        self.idle: Callable[[], bool] = lambda: True  # whether no sequence runs (the batch sets it)
        _RUNNERS.add(self)

    # -- memory ---------------------------------------------------------------------------------------------

    def cache_bytes(self) -> int:
        return self.pages * self.page_size * bytes_per_slot(self.cfg, self.cache_dtype)

    def new_cache(self, pages: int | None = None) -> KVCache:
        c = self.cfg
        return init_cache(c.n_layers, pages or self.pages, c.n_kv_heads, c.head_dim, self.cache_dtype, self.device,
                          self.page_size, self.cache_sharding)  # fmt: skip

    def new_rows(self, distinct: bool = False) -> Rows:
        """The rows' state: each row's last token (0, or with `distinct` a different one per row) and seen mask."""
        put, rows = self._put, np.arange(self._rows, dtype=np.int32) % self.cfg.vocab_size
        tokens = rows if distinct else np.zeros(self._rows, np.int32)
        return Rows(put(tokens), put(np.zeros((self._rows, self.cfg.vocab_size), bool)))

    def _put(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(a, self.input_sharding)

    def table_width(self, positions: int) -> int:
        """The page-table bucket that covers `positions` positions."""
        return pow2_bucket(pages_for(positions, self.page_size), MIN_TABLE_PAGES, self.max_pages)

    def row_bucket(self, rows: int) -> int:
        return pow2_bucket(rows, self.min_rows, self._rows)

    # -- prefill --------------------------------------------------------------------------------------------

    def _chunks(self, ids: list[int], pages: list[int], start: int):
        """(tokens [1, Tb], positions [1, Tb], table [1, n], n_valid) per chunk of one sequence."""
        for off in range(0, len(ids), self.chunk):
            part = ids[off : off + self.chunk]
            a = self._group_arrays([(part, pages, start + off)])
            yield *(self._put(x) for x in a[:3]), len(part)

    def _group_arrays(self, chunks: list[tuple[list[int], list[int], int]]) -> tuple[np.ndarray, ...]:
        """tokens [G, Tb], positions [G, Tb], tables [G, n] and each chunk's last index [G] for chunks (ids, pages,
        start), G a power-of-two bucket of their number. Tb is one chunk's bucket, or ops.PREFILL_KERNEL_ROWS for
        several (fewer shapes to compile). A padding position lies past the table (its k/v go to the null page);
        a padding row has the null table."""
        g, tb, width = self.prefill_shape(chunks)
        tokens, tables, last = np.zeros((g, tb), np.int32), np.zeros((g, width), np.int32), np.zeros(g, np.int32)
        positions = np.full((g, tb), width * self.page_size, np.int32)
        for i, (ids, pages, start) in enumerate(chunks):
            if not 1 <= len(ids) <= tb:
                raise ValueError(f"a prefill chunk of {len(ids)} ids in a group of {tb}-position chunks")
            tokens[i, : len(ids)] = ids
            positions[i, : len(ids)] = np.arange(start, start + len(ids))
            tables[i], last[i] = table_row(pages, width), len(ids) - 1
        return tokens, positions, tables, last

    def prefill_shape(self, chunks: list[tuple[list[int], list[int], int]]) -> tuple[int, int, int]:
        """(G, Tb, table width) of the prefill dispatch of chunks (ids, pages, start): its compiled program's shape."""
        g = self.group_bucket(len(chunks))
        tb = bucket(len(chunks[0][0]), self.chunk) if len(chunks) == 1 else ops.PREFILL_KERNEL_ROWS
        return g, tb, max(self.table_width(start + len(ids)) for ids, _, start in chunks)

    def prefill_ready(self, chunks: list[tuple[list[int], list[int], int]]) -> bool:
        """Whether the prefill dispatch of chunks (ids, pages, start) need not wait for a compile ahead: its program
        is compiled, or its compile ahead failed (the dispatch then compiles it and meets the error itself). If it
        must wait, its program is asked for (`prefill_soon`)."""
        shape = self.prefill_shape(chunks)
        if shape in self._prefills or ("prefill", *shape) in self._failed:
            return True
        g, b, width = shape
        self.prefill_soon(b, width, PROMPT, g)
        return False

    def group_limit(self, n: int | None = None) -> int:
        """The most sequences whose prompt chunks (of `n` ids; None: any that qualifies) share one prefill
        dispatch. Several only on the kernel backends and for chunks of at most ops.PREFILL_KERNEL_ROWS ids:
        their products stay on the row-independent kernels (ops._on_kernels), so a sequence's bits do not depend on
        the others in its dispatch. The CPU backend computes each sequence on its own (`_one_row_at_a_time`)."""
        if self.cfg.backend == "cpu" or (n is not None and bucket(n, self.chunk) > ops.PREFILL_KERNEL_ROWS):
            return 1
        return max(1, min(self.max_batch, PREFILL_GROUP_TOKENS // ops.PREFILL_KERNEL_ROWS))

    def prefill(self, ids: list[int], pages: list[int], cache: KVCache, start: int = 0) -> tuple[jax.Array, KVCache]:
        """Feed `ids` at positions start.. of the sequence holding `pages`; returns the logits [1, vocab] after the
        last id. Each chunk is its own dispatch: the engine interleaves them with decode dispatches."""
        logits = None
        for off in range(0, len(ids), self.chunk):
            logits, cache = self.prefill_group([(ids[off : off + self.chunk], pages, start + off)], cache)
        return logits, cache

    def prefill_group(self, chunks: list[tuple[list[int], list[int], int]], cache: KVCache
                      ) -> tuple[jax.Array, KVCache]:  # fmt: skip
        """One dispatch of prompt chunks (ids, pages, start) of different sequences, each at most `chunk` ids (and
        several only within `group_limit`): the logits [G, vocab] after each chunk's last id (row i: chunks[i];
        rows past them are padding; G at least min_rows)."""
        if len(chunks) > self.group_limit(max(len(ids) for ids, _, _ in chunks)):
            raise ValueError(f"{len(chunks)} prompt chunks exceed one prefill dispatch's limit")
        tokens, positions, tables, last = (self._put(a) for a in self._group_arrays(chunks))
        out = self._prefill(self.weights, tokens, positions, tables, last, cache)
        self._prefills.add((*tokens.shape, tables.shape[1]))
        return out

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: logits after each prefix (a cache of its own; for tests and scoring)."""
        need = pages_for(len(ids), self.page_size)
        cache, pages, rows = self.new_cache(need + 1), list(range(1, need + 1)), []
        for tokens, positions, table, n in self._chunks(ids, pages, 0):
            out, cache = self._all_logits(self.weights, tokens, positions, table, cache)
            rows.append(np.asarray(out[0, :n]))
        return np.concatenate(rows)

    # -- sampling and decode ----------------------------------------------------------------------------------

    def first_tokens(self, logits: jax.Array, inputs: RowInputs, prompts: list[tuple[int, list[int]]],
                     plan: SamplingPlan = ALL_STAGES) -> tuple[jax.Array, jax.Array, Scores]:  # fmt: skip
        """The tokens after a prefill, from its logits [G, vocab] and G rows of inputs: ids [G], the seen masks
        [G, vocab] (row i: the ids of its prompt in `prompts` (row, ids), and its token) and the tokens'
        log-probabilities (None unless plan.logprobs). Rows without a prompt are sampled too; nobody reads them."""
        mask = np.zeros(logits.shape, bool)
        for i, prompt in prompts:
            mask[i, [t for t in prompt if 0 <= t < self.cfg.vocab_size]] = True
        sp, keys, index = self._row_arrays(inputs)
        return self._first(logits, sp, keys, index, self._put(mask), plan)

    def join(self, rows: Rows, placed: list[tuple[int, int]], tokens: jax.Array, seen: jax.Array) -> Rows:
        """`rows` with new sequences' first tokens [G] and seen masks [G, vocab]: `placed` (i, row) puts entry i
        into batch row `row`; the entries not placed are dropped."""
        where = np.full(tokens.shape[0], self._rows, np.int32)  # past the rows: dropped
        for i, row in placed:
            where[i] = row
        return self._join(rows, self._put(where), tokens, seen)

    def _row_arrays(self, inputs: RowInputs, *extra: str) -> tuple:
        """(SamplingArrays, key data, draw indices) of `inputs` on the device, then its `extra` fields, in one
        batched transfer (one call rather than one an array: bench.host)."""
        fields = (*SAMPLING_FIELDS, "keys", "index", *extra)
        arrays = jax.device_put([getattr(inputs, f) for f in fields], self.input_sharding)
        n = len(SAMPLING_FIELDS)
        return SamplingArrays(*arrays[:n]), *arrays[n:]

    def decode(self, rows: Rows, cache: KVCache, inputs: RowInputs, steps: int, plan: SamplingPlan = ALL_STAGES
               ) -> tuple[jax.Array, Rows, KVCache, Scores]:  # fmt: skip
        """`steps` steps for the first R rows (R = len(inputs.positions), a row bucket); row r's generated token i
        uses draw index inputs.index[r] + i. Returns ids [R, steps] (left on the device), the rows, the cache and
        the log-probabilities (each [R, steps, ...]; None unless plan.logprobs). `plan`: the sampling stages
        compiled in; a stage is an exact no-op for a row whose parameters switch it off, so one plan serves a
        batch of mixed requests (the union of theirs)."""
        sp, keys, index, pos, table = self._row_arrays(inputs, "positions", "tables")
        ids, tokens, seen, cache, scores = self._decode(
            self.weights, rows.tokens, rows.seen, pos, table, index, cache, sp, keys, steps, plan
        )
        self._decodes.add((len(inputs.positions), inputs.tables.shape[1], steps, plan))
        return ids, Rows(tokens, seen), cache, scores

    def has_decode(self, rows: int, width: int, steps: int, plan: SamplingPlan) -> bool:
        """Whether that decode program is compiled (run, compiled at the start, or compiled ahead)."""
        return (rows, width, steps, plan) in self._decodes

    def decode_ready(self, rows: int, width: int, steps: int, plan: SamplingPlan) -> bool:
        """Whether that decode dispatch need not wait for a compile ahead: it or a cover (`decode_cover`) is
        compiled, or its compile ahead failed (the dispatch then compiles it and meets the error itself)."""
        return (self.has_decode(rows, width, steps, plan) or ("decode", rows, width, steps, plan) in self._failed
                or self.decode_cover(rows, width, steps, plan) is not None)  # fmt: skip

    def decode_cover(self, rows: int, width: int, steps: int, plan: SamplingPlan
                     ) -> tuple[int, int, SamplingPlan] | None:  # fmt: skip
        """A compiled decode program (rows, width, plan) that gives what the one asked for would, bit for bit, or
        None: at least as many rows, as wide a table and a plan of at least its stages (the same log-probability
        output), the one of fewest rows, then the narrowest. Why it is exact: a row's arithmetic depends on none of
        the three (docs/batching.md, "Batch invariance"; tests/test_batching.py)."""
        known = list(self._decodes)  # a copy, taken at once: the compile-ahead thread adds to the set
        fits = [(r, w, p) for r, w, s, p in known if _decode_covers((r, w, s, p), (rows, width, steps, plan))]
        return min(fits, key=lambda f: (f[0], f[1], sum(map(bool, astuple(f[2])))), default=None)

    def row_buckets(self) -> list[int]:
        """Every decode row bucket, smallest first."""
        out = [self.min_rows]
        while out[-1] < self._rows:
            out.append(self.row_bucket(out[-1] + 1))
        return out

    def chunk_buckets(self) -> list[int]:
        """Every bucket a prompt chunk is padded to (`bucket`), smallest first."""
        out = [bucket(1, self.chunk)]
        while out[-1] < self.chunk:
            out.append(bucket(out[-1] + 1, self.chunk))
        return out

    def group_buckets(self) -> list[int]:
        """The sizes of a prefill dispatch of several sequences (`prefill_group`), smallest first (none on the
        CPU): powers of four, then the limit. Each is a whole-model compile at start (gpt-oss-20b: ~15 s); a group's
        padding rows cost the dense products their share and the MoE nothing (base.live_tokens)."""
        limit, out = self.group_limit(), []
        size = 4
        while size < limit:
            out.append(size)
            size *= 4
        return out + [limit] if limit > 1 else []

    def group_bucket(self, n: int) -> int:
        """The group size that `n` chunks are padded to."""
        return 1 if n <= 1 else next(g for g in self.group_buckets() if g >= n)

    # -- compiling -------------------------------------------------------------------------------------------

    def _spec(self, shape: tuple[int, ...], dtype, on: jax.sharding.Sharding | None = None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=on or self.input_sharding)

    def _cache_spec(self) -> KVCache:
        c = self.cfg
        kv = self._spec((c.n_layers, self.pages, self.page_size, c.n_kv_heads, c.head_dim), self.cache_dtype,
                        self.cache_sharding)  # fmt: skip
        return KVCache(kv, kv)

    def _decode_job(self, inputs: RowInputs, width: int, steps: int, plan: SamplingPlan) -> tuple[str, Callable]:
        """(name, lowering) of a decode dispatch of `steps` steps for the rows of `inputs` over `width`-page
        tables; lowered from shapes only (no KV pool or row state is allocated)."""
        spec, r, v = self._spec, len(inputs.positions), self.cfg.vocab_size
        sp, keys, index = self._row_arrays(inputs)
        pos, table = spec((r,), jnp.int32), spec((r, width), jnp.int32)
        state = Rows(spec((self._rows,), jnp.int32), spec((self._rows, v), jnp.bool_))
        args = (self.weights, state.tokens, state.seen, pos, table, index, self._cache_spec(), sp, keys, steps, plan)
        wide = f" {width} pages" if width > MIN_TABLE_PAGES else ""
        return f"decode {r} rows {steps} steps {_plan_name(plan)}{wide}", lambda: self._decode.lower(*args)

    def _prefill_job(self, g: int, b: int, width: int) -> tuple[str, Callable]:
        """(name, lowering) of a prefill dispatch of `g` prompt chunks (1: a sequence's chunk alone), each padded to
        `b` ids, over `width`-page tables."""
        spec = self._spec
        tokens, table, last = spec((g, b), jnp.int32), spec((g, width), jnp.int32), spec((g,), jnp.int32)
        name = f"prefill {g} chunks" if g > 1 else f"prefill {b} tokens"
        name += f" {width} pages" if width > self.table_width(b) else ""
        return name, lambda: self._prefill.lower(self.weights, tokens, tokens, table, last, self._cache_spec())

    def compile_first_steps(
        self,
        inputs: RowInputs,
        plans: tuple[SamplingPlan, ...],
        steps: int,
        rows: tuple[int, ...],
        prefill: bool = True,
        groups: tuple[int, ...] = (),
        lone: tuple[int, ...] = (),
    ) -> list[Compile]:
        """Compile, side by side, what a request with a prompt of at most MIN_BUCKET tokens runs first: the
        prefill and the first sample (unless `prefill` is False: compiled already), a decode dispatch of `steps`
        steps with each of `plans` at each of the row buckets `rows`, and the prefill and first samples of several
        sequences' chunks (of at most ops.PREFILL_KERNEL_ROWS ids, at the start of a prompt) at each of the group
        sizes `groups`; the samples with each of `plans`; and the prefill of a prompt's first chunk alone in its
        dispatch at each of the chunk buckets `lone` (under load a prompt can arrive alone between groups: its
        bucket's compile, ~13 s for gpt-oss-20b on an H200, stalled every running stream). Each is a whole-model
        XLA compile (~15 s on a 2-core CPU for Gemma 3 270M) that releases the GIL, so threads overlap them.
        Lowered from shapes only: no KV cache or input is allocated. Returns what each took (`Compile`)."""
        c, n = self.cfg, min(MIN_BUCKET, self.chunk)
        spec, width = self._spec, self.table_width(1)
        one = self.min_rows  # a one-sequence prefill's logits rows (`_prefill`)
        sp1, keys1, index1 = self._row_arrays(_take(inputs, one))
        logits, seen1 = spec((one, c.vocab_size), jnp.float32), spec((one, c.vocab_size), jnp.bool_)

        def first(label: str, args: tuple) -> list:
            return [(f"{label} first sample {_plan_name(p)}", lambda p=p: self._first.lower(*args, p)) for p in plans]

        def group(g: int):
            sp, keys, gindex = self._row_arrays(_take(inputs, g))
            sample = (spec((g, c.vocab_size), jnp.float32), sp, keys, gindex, spec((g, c.vocab_size), jnp.bool_))
            return [self._prefill_job(*shape_of(g))] + first(f"prefill {g} chunks", sample)

        def shape_of(g: int, b: int = ops.PREFILL_KERNEL_ROWS) -> tuple[int, int, int]:
            return g, b, self.table_width(b)

        jobs = [self._decode_job(_take(inputs, r), width, steps, p) for p in plans for r in rows]
        jobs += [job for g in groups for job in group(g)]
        alone = [shape_of(1, b) for b in ((n,) if prefill else ()) + lone]
        jobs += [self._prefill_job(*shape) for shape in alone]
        if prefill:
            jobs += first("prefill", (logits, sp1, keys1, index1, seen1))
        if not jobs:
            return []

        with ThreadPoolExecutor(len(jobs)) as pool:
            done = [done.result() for done in [pool.submit(_timed_compile, job) for job in jobs]]
        self._decodes.update((r, width, steps, p) for p in plans for r in rows)
        self._prefills.update([*alone, *map(shape_of, groups)])
        return done

    def decode_soon(self, rows: int, width: int, steps: int, plan: SamplingPlan, when: int = NEEDED) -> None:
        """Compile ahead (`_soon`) a decode dispatch of `rows` rows over `width`-page tables."""
        job = lambda: self._decode_job(RowInputs.neutral(rows, width), width, steps, plan)  # noqa: E731
        program = (rows, width, steps, plan)
        covers = lambda k: k[0] == "decode" and _decode_covers(program, k[1:])  # noqa: E731 - a waiting one it covers
        self._soon(("decode", *program), job, when, covers)

    def prefill_soon(self, b: int, width: int, when: int = PROMPT, g: int = 1) -> None:
        """Compile ahead (`_soon`) a prefill dispatch of `g` prompt chunks (1: one alone), each padded to `b` ids,
        over `width`-page tables."""
        self._soon(("prefill", g, b, width), lambda: self._prefill_job(g, b, width), when)

    def prompt_soon(self, n: int) -> None:
        """Compile ahead (`_soon`) the chunks of an `n`-id prompt after its first: each its own shape (a wider page
        table), compiled while the chunks before it run."""
        for start in range(self.chunk, n, self.chunk):
            ids = min(self.chunk, n - start)
            self.prefill_soon(bucket(ids, self.chunk), self.table_width(start + ids))

    def _soon(self, key: tuple, job: Callable[[], tuple[str, Callable]], when: int = NEEDED,
              covers: Callable[[tuple], bool] = lambda key: False) -> None:  # fmt: skip
        """Compile a program in the background, once (`compile_ahead`: off, nothing), for a shape the batch will
        soon reach: a dispatch that then needs it finds it compiled, or waits for the rest of its compile (JAX
        compiles one program once: a call waits for the thread compiling it). Why: a shape first met mid-stream
        stalled every running stream for its compile (a decode crossing 256 positions onto a 32-page table: 4.5 s
        on a 2-core CPU for Gemma 3 270M). One thread compiles them, one at a time, the most wanted first (`when`:
        NEEDED, PROMPT, COVERED, WHEN_IDLE; asked again more urgently, a waiting one moves up). One at a time: with a
        thread for each, four streams arriving at once on a cold 2-core start had six compiles side by side, each
        3-4x slower, and their streams waited longer than with no compile ahead at all. A program that `covers`
        one still waiting, and is wanted as soon, takes its place in the line, and that one is dropped (it may be
        asked for again): a batch growing from 1 to 4 rows asked for a 1-row, a 2-row and a 4-row program in turn,
        and the first two were 14 s of a 2-core CPU for nothing. A failure is logged; the call that needs the
        program then compiles it (and meets the error) itself."""
        if not self.compile_ahead:
            return
        with self._ahead_lock:
            if key in self._asked:
                waiting = self._ahead.get(key)
                if waiting is not None and when < waiting[0]:
                    waiting[0] = when
                return
            place = [when, next(self._order), job]
            for k in [k for k in self._ahead if covers(k) and self._ahead[k][0] >= when]:
                place[1] = min(place[1], self._ahead.pop(k)[1])
                self._asked.discard(k)
            self._asked.add(key)
            self._ahead[key] = place
            if self._ahead_thread is None:
                self._ahead_thread = threading.Thread(target=self._compile_ahead, name="compile-ahead", daemon=True)
                self._ahead_thread.start()

    def _compile_ahead(self) -> None:
        """The compile-ahead thread (`_soon`), until none is left waiting (so that a runner nobody uses any more is
        not kept alive): the most wanted first (`_soon`), then first asked first; WHEN_IDLE ones only while the
        batch is idle (on 2 cores a compile beside a stream made its tokens 1.8x slower)."""
        while True:
            idle = self.idle()
            with self._ahead_lock:
                if not self._ahead:
                    self._ahead_thread = None
                    return
                key = min(self._ahead, key=lambda k: self._ahead[k][:2])
                job = self._ahead.pop(key)[2] if idle or self._ahead[key][0] < WHEN_IDLE else None
            if job is None:
                time.sleep(0.25)
                continue
            known = {"decode": self._decodes, "prefill": self._prefills}.get(key[0], set())
            if key[1:] in known:  # compiled since it was asked for, by the call that needed it
                continue
            try:
                named = job()
                # Its start too: a compile still under way when a stream slowed is in the log then (the thirty-eighth
                # session's one stream at 0.18x on the card had no line: its compile never ended before the stop).
                log.info("compiling ahead: %s", named[0])
                with _engine_first():
                    done = _timed_compile(named)
                known.add(key[1:])
                if self.compile_ahead:  # else a shutdown began: its line is the last
                    log.info("compiled ahead: %s in %.1f s", done.name, done.done - done.start)
            except Exception:  # noqa: BLE001 - an optimisation: the call that needs the program reports its error
                self._failed.add(key)
                if self.compile_ahead:
                    log.warning("a compile ahead failed", exc_info=True)

    def stop_compiling_ahead(self, wait_s: float = 0.5) -> bool:
        """Ask for nothing more and drop what waits (a shutdown); returns whether a program is still being compiled
        ahead after up to `wait_s` seconds: the process must then not tear its interpreter down under that thread
        (XLA aborts it: exit -6, seen in the test suite's servers stopped soon after their start)."""
        with self._ahead_lock:
            self.compile_ahead = False
            self._ahead.clear()
            thread = self._ahead_thread
        if thread is not None:
            thread.join(wait_s)
        return thread is not None and thread.is_alive()


# Python's switch interval while a program is compiled ahead (`_engine_first`), against its default 5 ms.
COMPILING_SWITCH_S = 1e-4
_switching = threading.Lock()
_compiling, _interval_before = 0, 0.005


@contextlib.contextmanager
def _engine_first():
    """Python's switch interval at COMPILING_SWITCH_S while a program is compiled ahead. Lowering a program is Python
    under the GIL (~1 s of it on an H100's host), and the engine's thread waits for the GIL after each of its calls
    that release it (a launch, a read back) up to one switch interval: qwen2.5-0.5b's one stream ran at 183 tok/s
    against 1,037 while a program was lowered ahead (docs/PERFORMANCE.md, GPU, thirty-eighth entry). A dispatch of
    20 such waits beside a lowering thread took 0.9 -> 63 ms at 5 ms, 2.9 ms at 0.1 ms (bench/gil.py, a 2-core CPU)."""
    global _compiling, _interval_before
    with _switching:  # one setting for every runner's thread in the process: the first sets it, the last restores it
        _compiling += 1
        if _compiling == 1:
            _interval_before = sys.getswitchinterval()
            sys.setswitchinterval(COMPILING_SWITCH_S)
    try:
        yield
    finally:
        with _switching:
            _compiling -= 1
            if _compiling == 0:
                sys.setswitchinterval(_interval_before)


def _decode_covers(have: tuple[int, int, int, SamplingPlan], want: tuple[int, int, int, SamplingPlan]) -> bool:
    """Whether decode program `have` (rows, width, steps, plan) serves as `want`'s cover (Runner.decode_cover): the
    same steps, at least its rows and width, a plan that covers its plan."""
    return have[2] == want[2] and have[0] >= want[0] and have[1] >= want[1] and _plan_covers(have[3], want[3])


def _plan_covers(have: SamplingPlan, want: SamplingPlan) -> bool:
    """Whether a program of plan `have` samples every row as one of `want` would (batch.union_plan: a stage a row's
    parameters switch off is an exact no-op for it): its stages include want's, and the same outputs."""
    stages = ("penalty", "filtering", "draw")
    return have.logprobs == want.logprobs and all(getattr(have, f) >= getattr(want, f) for f in stages)


def _timed_compile(job: tuple[str, Callable]) -> Compile:
    t0 = time.perf_counter()
    lowered = job[1]()  # Python (the GIL): threads take turns
    t1 = time.perf_counter()
    compiled = lowered.compile()  # XLA: side by side
    t2, memory = time.perf_counter(), _memory_of(compiled)
    # what a call allocates beside its arguments: temporaries, and outputs not updated in place
    extra = None
    if memory is not None:
        extra = memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    return Compile(job[0], t0, t1, t2, extra)


def _memory_of(compiled: Any) -> Any:
    """XLA's memory analysis of a compiled program, or None where the backend gives none (a start never fails on a
    figure it only reports)."""
    try:
        return compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - any backend's refusal: the figure is optional
        return None


def _plan_name(plan: SamplingPlan) -> str:
    return "sampled" if plan.draw else "greedy"


@dataclass(frozen=True)
class Compile:
    """One program of a warm-up: its name, when (time.perf_counter) its tracing and lowering began, when it was
    lowered (Python, under the GIL: the warm-up's threads take turns, so a program's own lower_s includes its waits)
    and when compiled (XLA, side by side; a program the persistent cache holds takes well under a second), and the
    device memory a call allocates beside its arguments (XLA's temporaries and the outputs not aliased to a donated
    argument; None where XLA does not say)."""

    name: str
    start: float
    lowered: float
    done: float
    extra_bytes: int | None

    @property
    def lower_s(self) -> float:
        return self.lowered - self.start

    @property
    def compile_s(self) -> float:
        return self.done - self.lowered


def _take(inputs: RowInputs, n: int) -> RowInputs:
    """The first n rows of `inputs`, repeated when it has fewer (shapes for compiling)."""
    pick = np.arange(n) % len(inputs.positions)
    return RowInputs(**{f: getattr(inputs, f)[pick] for f in RowInputs.__dataclass_fields__})


def _prefill(adapter, cfg, min_rows, weights, tokens, positions, table, last, cache):
    """The logits after each row's last id: [max(G, min_rows), V]. The output projection (decode-shaped, one row a
    sequence) takes at least min_rows rows, the rule a decode dispatch follows (MIN_ROWS), so that a one-sequence
    prefill takes no one-row code path that a group of several would not."""
    hidden, cache = adapter.forward(weights, cfg, tokens, positions, cache, table)
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [G, 1, D]
    h_last = jnp.pad(h_last, ((0, max(0, min_rows - h_last.shape[0])), (0, 0), (0, 0)))
    return adapter.logits(weights, cfg, h_last)[:, 0], cache


def _all_logits(adapter, cfg, weights, tokens, positions, table, cache):
    hidden, cache = adapter.forward(weights, cfg, tokens, positions, cache, table)
    return adapter.logits(weights, cfg, hidden), cache


def _sample_rows(logits, sp, keys, index, seen, plan=ALL_STAGES):
    """Row r of logits [R, V] sampled with its own parameters, key data [R, 2] and draw index."""
    keys = jax.random.wrap_key_data(keys)
    ids = jax.vmap(partial(sample, plan=plan))(logits, sp, keys, index, seen)
    scores = token_logprobs(logits, ids) if plan.logprobs else None  # static: off costs nothing
    return ids, seen.at[jnp.arange(ids.shape[0]), ids].set(True), scores


def _join(rows, where, tokens, seen):
    return Rows(rows.tokens.at[where].set(tokens, mode="drop"), rows.seen.at[where].set(seen, mode="drop"))


def _decode(adapter, cfg, rows_step, weights, tokens, seen_all, position, table, index, cache, sp, keys, steps, plan):
    r = position.shape[0]

    def step(carry, i):
        tok, pos, cache, seen = carry
        nxt, cache, seen, scores = rows_step(adapter, cfg, weights, tok, pos, table, cache, seen, sp, keys,
                                             index + i, plan)  # fmt: skip
        return (nxt, pos + 1, cache, seen), (nxt, scores)

    init = (tokens[:r], position, cache, seen_all[:r])
    (last, _, cache, seen), (ids, scores) = jax.lax.scan(step, init, jnp.arange(steps))
    scores = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), scores)
    return ids.T, tokens.at[:r].set(last), seen_all.at[:r].set(seen), cache, scores


def _all_rows_at_once(adapter, cfg, weights, tok, pos, table, cache, seen, sp, keys, index, plan):
    """One decode step of every row in one batched forward pass (the GPU kernels are batch invariant). Rows
    without a sequence are dead (live_tokens); the per-row kernels skip them (ops.live_rows)."""
    with ops.live_rows(live_tokens(cache, table, pos[:, None])[:, 0]):
        hidden, cache = adapter.forward(weights, cfg, tok[:, None], pos[:, None], cache, table)
        logits = adapter.logits(weights, cfg, hidden)[:, 0]
    nxt, seen, scores = _sample_rows(logits, sp, keys, index, seen, plan)
    return nxt, cache, seen, scores


def _all_rows_on_cpu_kernel(*args):
    """`_all_rows_at_once` with every product on the CPU's own kernel (ops.cpu_rows_kernel), each of whose rows is
    computed on its own: batch invariant like `_one_row_at_a_time`, the weights read once a step for all the rows
    (in groups of 4 rows: int8_matvec.cc) instead of once a row."""
    with ops.cpu_rows_kernel():
        return _all_rows_at_once(*args)


def _rows_invariant_on_cpu(weights: Any) -> bool:
    """Whether every matrix of `weights` is in the CPU layout and the CPU's own kernel takes it (built, its
    blocks), so that rows computed together keep their bits (`_all_rows_on_cpu_kernel`). Float matrices and MoE
    experts go through XLA's products, whose order depends on the batch."""
    kinds = (Int8Blocks, QuantArray)
    leaves = jax.tree_util.tree_leaves(weights, is_leaf=lambda x: isinstance(x, kinds))
    matrices = [leaf for leaf in leaves if isinstance(leaf, kinds) or getattr(leaf, "ndim", 0) >= 2]
    fits = all(isinstance(m, Int8Blocks) and cpu_kernels.fits(m) for m in matrices)
    return fits and cpu_kernels.available()


def _one_row_at_a_time(adapter, cfg, weights, tok, pos, table, cache, seen, sp, keys, index, plan):
    """One decode step of each row on its own: `_all_rows_at_once` on a one-row slice, in a loop over the rows.
    Why on the CPU: XLA:CPU picks a product's and a reduction's summation order by shape (a one-row matrix product
    is a GEMV, a many-row one a GEMM that sums otherwise; measured), so rows computed together would change bits
    with the batch; one at a time every row runs the same program. The price is throughput: rows no longer share
    the weights' reads (docs/batching.md; `deterministic=False` computes them together). Rows without a sequence
    are computed too: a `lax.cond` around a row would make XLA copy the whole KV pool into and out of the branch,
    every row and step."""

    def one(cache, row):
        t, p, tb, s, params, key, i = jax.tree_util.tree_map(lambda a: a[None], row)
        nxt, cache, seen_row, scores = _all_rows_at_once(adapter, cfg, weights, t, p, tb, cache, s, params, key, i,
                                                         plan)  # fmt: skip
        return cache, jax.tree_util.tree_map(lambda a: a[0], (nxt, seen_row, scores))

    cache, (nxt, seen, scores) = jax.lax.scan(one, cache, (tok, pos, table, seen, sp, keys, index))
    return nxt, cache, seen, scores
