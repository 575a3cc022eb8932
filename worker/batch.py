"""Continuous batching over one runner: sequences join the running batch at a dispatch boundary, their prompts
are prefilled chunk by chunk between decode dispatches, they decode together, and each leaves when it ends.

One `step()` is one engine iteration: admit what fits (worker/scheduler.py), queue prefill chunks (up to
`prefill_tokens` prompt tokens, so a long prompt neither stalls the running streams for long nor waits long
itself), queue one decode dispatch for every decoding row, then read back what the device finished earlier. The
dispatch just queued is read in the next step, so the device never waits for the host; only int32 ids (and
asked-for log-probabilities) cross to the host.

A sequence's end is decided here, in one place: an end-of-generation id (not handed out), its token budget
("max_tokens", or "context" where the context ended first). Stop strings are text, the engine's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

import jax
import numpy as np

from worker.runner import COVERED, PROMPT, RowInputs, Runner, Scores
from worker.sampling import SamplingParams, SamplingPlan, TokenLogprobs, seed_key_words, seed_words
from worker.scheduler import Scheduler, Sequence
from worker.step_trace import DECODE, PREFILL, READ_BACK, span
from worker.tokenizer import Tokenizer

# Seconds the batch must have been idle before the runner compiles what only may come (Runner._soon, WHEN_IDLE).
IDLE_BEFORE_COMPILE_S = 5.0


def key_data(seed: int) -> np.ndarray:
    """The uint32 [2] key data of a uint64 seed's PRNG key (worker.sampling.seed_key's bits), on the host's CPU
    device in one jitted program. Why: eager ops on the default device, a GPU, would queue behind the decode
    dispatch in flight, and reading their result would stall the engine thread (and with it the pipeline) for the
    rest of that dispatch at every admission; eager on the CPU it also took ~0.5 ms a job."""
    hi, lo = seed_words(seed)
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(_key_data(np.uint32(hi), np.uint32(lo)), np.uint32)


@jax.jit
def _key_data(hi: jax.Array, lo: jax.Array) -> jax.Array:
    return jax.random.key_data(seed_key_words(hi, lo))


@dataclass(frozen=True)
class Delivery:
    """What a step produced for one sequence: tokens in order, their log-probabilities (when its params ask),
    and, when it has ended, why (`finished`) or the error that ended it."""

    seq: Sequence
    tokens: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finished: str | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class _Pending:
    ids: jax.Array  # [R, steps]
    scores: Scores
    rows: list[tuple[int, Sequence]]  # (row of ids, sequence)


def union_plan(plans: Collection[SamplingPlan]) -> SamplingPlan:
    """One plan for a batch: each stage a row's parameters switch off is an exact no-op for that row (division
    and multiplication by 1.0, a filter that keeps everything, argmax where the temperature is 0), so every row
    samples what it would alone."""
    return SamplingPlan(*(any(getattr(p, f) for p in plans) for f in SamplingPlan.__dataclass_fields__))


class Batch:
    """The running batch of one model: its sequences, the KV pool and rows' state on the device, the dispatches
    in flight. Driven by one thread (the engine's, or generate_ids' caller)."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, steps: int, prefill_tokens: int | None = None):
        self.runner, self.tokenizer, self.steps = runner, tokenizer, steps
        self.prefill_tokens = prefill_tokens or runner.chunk  # prompt tokens prefilled a step (at least one chunk)
        self.scheduler = Scheduler(runner.max_batch, runner.pages, runner.page_size)
        self._cache = self._rows = None  # allocated at first use
        # Every batch row's decode inputs, kept between dispatches: a row's table, parameters and key are written
        # when its sequence starts decoding and cleared when it leaves; a dispatch advances positions and draw
        # indices in place. Rebuilding them each dispatch was a Python loop over the rows (bench.host).
        self._inputs: RowInputs | None = None
        self.on_decode: Callable[[int], None] = lambda rows: None  # told each dispatch's sequence count (metrics)
        self._pending: deque[_Pending] = deque()
        self._ended: list[Delivery] = []  # sequences that end before running (no room for a single token)
        # The runner compiles what may come (Runner._soon) only once the batch has been idle IDLE_BEFORE_COMPILE_S:
        # a request just after `ready`, or just after another, then finds the cores to itself.
        self._idle_since: float | None = time.monotonic()
        runner.idle = self._idle_a_while

    def _idle_a_while(self) -> bool:
        since = self._idle_since
        return since is not None and not self.busy and time.monotonic() - since >= IDLE_BEFORE_COMPILE_S

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._pending or self._ended)

    def add(self, seq: Sequence) -> None:
        self._idle_since = None
        seq.params = seq.params or SamplingParams()
        seq.plan = seq.params.plan()
        if seq.budget <= 0:
            seq.finished = "max_tokens" if seq.max_tokens <= 0 else "context"
            self._ended.append(Delivery(seq, [], [] if seq.params.logprobs else None, seq.finished))
            return
        self.scheduler.add(seq)

    def device_state(self) -> tuple:
        """The KV pool and the rows' state (None before the first step)."""
        return self._cache, self._rows

    def release(self, seq: Sequence) -> None:
        """End `seq` now (cancel, stop string, disconnect): its row and pages are free for the next step. Results
        still in flight for it are dropped when they arrive."""
        if seq.finished is None:
            seq.finished = "released"
        self._leave(seq)

    def _leave(self, seq: Sequence) -> None:
        """Free `seq`'s row and pages; its row's inputs become a row without a sequence's (the null page table):
        a later dispatch computes that row too, and must not write into pages that another sequence then holds."""
        if seq.row is not None and self._inputs is not None and self.scheduler.rows[seq.row] is seq:
            self._inputs.clear(seq.row)
        self.scheduler.release(seq)
        self._note_idle()  # a batch emptied by a release may see no further step

    def step(self) -> list[Delivery]:
        """One iteration (module docstring); returns what the device finished for each sequence, in order."""
        out, self._ended = self._ended, []
        self.scheduler.admit()
        self._ensure_state()
        with span(PREFILL):
            out.extend(self._prefill())
        queued = False
        decoding = self.scheduler.decoding()
        if decoding:
            try:
                with span(DECODE):
                    self._decode(decoding)
                queued = True
            except Exception as e:  # the dispatch's rows fail; the others (still prefilling) may go on
                out.extend(self._fail(seq, e) for seq in decoding)
                out.extend(self._check_state())
        with span(READ_BACK):
            while len(self._pending) > int(queued):
                out.extend(self._deliver(self._pending.popleft()))
        self._note_idle()
        return out

    def _note_idle(self) -> None:
        if not self.busy and self._idle_since is None:
            self._idle_since = time.monotonic()

    def time_decode(self, rows: int, plan: SamplingPlan, repeats: int = 3) -> float:
        """Seconds one decode dispatch of `rows` rows takes at the current steps (the least of `repeats`, after one
        untimed): rows without a sequence, from position 0, each given the pool's first pages (so that they count
        as live tokens and do a row's whole work, MoE experts included: base.live_tokens), each from a token of its
        own (identical rows would all route to one token's experts: a MoE step would take a fraction of its time
        with distinct streams). For sizing the steps of a dispatch; only while no sequence runs (it writes into free
        pages and idle rows)."""
        if self.busy:
            raise RuntimeError("time_decode needs an idle batch")
        self._ensure_state()
        r, best = self.runner, float("inf")
        self._rows = r.new_rows(distinct=True)  # idle rows: a sequence that joins sets its own
        width = r.table_width(1)
        inputs = RowInputs.neutral(r.row_bucket(rows), width)
        inputs.tables[:] = 1 + np.arange(width) % max(1, r.pages - 1)  # any pages but the null one
        for i in range(repeats + 1):
            start = time.perf_counter()
            ids, self._rows, self._cache, _ = r.decode(self._rows, self._cache, inputs, self.steps, plan)
            ids.block_until_ready()
            if i:
                best = min(best, time.perf_counter() - start)
        return best

    # -- device work --------------------------------------------------------------------------------------------

    def _ensure_state(self) -> None:
        if self._cache is None:
            self._cache, self._rows = self.runner.new_cache(), self.runner.new_rows()
        if self._inputs is None:
            self._inputs = RowInputs.neutral(self.runner.row_buckets()[-1], self.runner.max_pages)

    def _prefill(self) -> list[Delivery]:
        """The step's prompt chunks, up to its budget of ids, oldest admission first. With compile ahead, a chunk
        whose programs are not compiled waits for them to compile on the runner's background thread while the batch
        has other work (a stream to decode, a chunk that is ready), and takes none of the budget: a compile on this
        thread stalled every running stream (one on a cold 2-core start waited 11.6 s while three others' prompt
        buckets compiled), and held back short prompts behind a long one's."""
        budget, r = self.prefill_tokens, self.runner
        decoding = self.scheduler.decoding() if r.compile_ahead else []
        chunks, every, joiners = [], [], []  # every: the step's chunks as if all were ready
        for seq in self.scheduler.prefilling():
            if budget <= 0:
                break
            chunk = (seq, seq.prefilled, min(r.chunk, len(seq.ids) - seq.prefilled))
            every.append(chunk)
            if r.compile_ahead:
                ready = self._chunk_ready(chunk, [*decoding, *joiners])
                if seq.prefilled == 0:
                    self._prompt_soon(seq)  # asked for after this chunk's: what it needs later, in order
                if not ready:
                    continue
                if seq.prefilled + chunk[2] == len(seq.ids):
                    joiners.append(seq)
            chunks.append(chunk)
            budget -= chunk[2]
        groups = _groups(chunks, r.group_limit)
        if r.compile_ahead:
            groups = [g for g in groups if r.prefill_ready(_chunk_ids(g))]
            if not groups and not decoding:  # nothing else to do: they compile here (or wait for it), as they would
                groups = _groups(_within(every, self.prefill_tokens), r.group_limit)
        return [d for group in groups for d in self._prefill_group(group)]

    def _chunk_ready(self, chunk: tuple[Sequence, int, int], others: list[Sequence]) -> bool:
        """Whether a prompt chunk's programs are compiled (those that are not are asked for): alone in its dispatch,
        its prefill (else its group's, checked once grouped); as its prompt's last, the decode dispatch it then
        joins with `others`."""
        seq, start, n = chunk
        ready = self.runner.group_limit(n) > 1 or self.runner.prefill_ready(_chunk_ids([chunk]))
        if start + n == len(seq.ids):
            ready = self._join_ready([*others, seq]) and ready
        return ready

    def _prefill_group(self, group: list[tuple[Sequence, int, int]]) -> list[Delivery]:
        """One prefill dispatch; where it fails, each of its sequences is tried again alone (so an error, device
        memory included, ends only the job it belongs to), unless the failure took the KV pool with it."""
        try:
            live = [(s, a, n) for s, a, n in group if s.finished is None]
            if not live:
                return []
            logits, self._cache = self.runner.prefill_group(_chunk_ids(live), self._cache)
            done = []
            for i, (s, a, n) in enumerate(live):
                s.prefilled = a + n
                if s.prefilled == len(s.ids):
                    done.append((i, s))
            if done:
                self._first_tokens(logits, done)
            return []
        except Exception as e:
            if len(group) > 1 and not self._state_lost():
                return [d for one in group for d in self._prefill_group([one])]
            return [self._fail(s, e) for s, _, _ in group if s.finished is None] + self._check_state()

    def _first_tokens(self, logits: jax.Array, done: list[tuple[int, Sequence]]) -> None:
        """Sample the first token of each sequence whose prompt is in (row i of `logits`) and join it to the decode
        rows; it is delivered like a decode dispatch's."""
        r = self.runner
        inputs = self.row_inputs(done, logits.shape[0], 1)
        plan = union_plan({s.plan for _, s in done})
        tokens, seen, scores = r.first_tokens(logits, inputs, [(i, s.ids) for i, s in done], plan)
        self._rows = r.join(self._rows, [(i, s.row) for i, s in done], tokens, seen)
        for _, s in done:
            s.dispatched = 1
            self._inputs.place(s.row, s, self.runner.max_pages)
        self._pending.append(_Pending(tokens[:, None], _lift(scores), done))

    def _decode(self, decoding: list[Sequence]) -> None:
        r, steps, kept = self.runner, self.steps, self._inputs
        placed = [(s.row, s) for s in decoding]
        live = np.fromiter((row for row, _ in placed), np.intp, len(placed))
        rows = r.row_bucket(int(live.max()) + 1)
        width = r.table_width(int(kept.positions[live].max()) + steps)
        plan = union_plan({s.plan for s in decoding})
        run = (rows, width, plan)
        if r.compile_ahead and not r.has_decode(rows, width, steps, plan):
            # Not compiled yet: a compiled program that computes the same runs this dispatch while it compiles.
            run = r.decode_cover(rows, width, steps, plan) or run
            if run != (rows, width, plan):
                r.decode_soon(rows, width, steps, plan, COVERED)
        ids, self._rows, self._cache, scores = r.decode(self._rows, self._cache, kept.head(*run[:2]), steps, run[2])
        for a in (ids, *(scores or ())):
            a.copy_to_host_async()
        kept.positions[live] += steps
        kept.index[live] += steps
        for s in decoding:
            s.dispatched += steps
        if r.compile_ahead:
            self._wider_soon(rows, width, plan, decoding)
        self._pending.append(_Pending(ids, scores, placed))
        self.on_decode(len(decoding))

    def _prompt_soon(self, seq: Sequence) -> None:
        """At a prompt's first chunk, have compiled ahead what it needs that no sequence before it may have needed:
        its later chunks (each a wider page table) and the decode dispatch it joins after its last (`_join_ready`),
        with the rows and sampling stages of every running sequence: that one then covers (Runner.decode_cover) the
        dispatch it joins while others still prefill. (Their prompts' lengths are theirs to reckon with.)"""
        self.runner.prompt_soon(len(seq.ids))
        self._join_ready([*self.scheduler.decoding(), seq], self.scheduler.running)

    def _join_ready(self, seqs: list[Sequence], rows_of: list[Sequence] = ()) -> bool:
        """Whether a decode dispatch of `seqs` (those decoding at their positions, the others just past their
        prompts), with the rows and plan of `rows_of` as well, need not wait for a compile (Runner.decode_ready);
        if it must, it is asked for."""
        r, steps, kept, every = self.runner, self.steps, self._inputs, [*seqs, *rows_of]
        rows = r.row_bucket(max(s.row for s in every) + 1)
        reach = max(int(kept.positions[s.row]) if s.decoding else len(s.ids) for s in seqs)
        width, plan = r.table_width(reach + steps), union_plan({s.plan for s in every})
        if r.decode_ready(rows, width, steps, plan):
            return True
        r.decode_soon(rows, width, steps, plan, PROMPT)
        return False

    def _wider_soon(self, rows: int, width: int, plan: SamplingPlan, decoding: list[Sequence]) -> None:
        """Have the next page-table width compiled ahead (Runner.decode_soon) while a decoding sequence's budget
        reaches past this one: it then has the tokens up to this width's end to compile in (at least 128 at 16
        pages, 256 positions), and the streams do not stall for it when the first sequence gets there."""
        r = self.runner
        if width >= r.max_pages:
            return
        reach = max(self._last_reach(s) for s in decoding)
        if r.table_width(reach) > width:
            r.decode_soon(rows, r.table_width(width * r.page_size + 1), self.steps, plan)

    def _last_reach(self, seq: Sequence) -> int:
        """The positions (a page table's) that `seq`'s last decode dispatch needs: it starts where the dispatches
        left to its budget begin, and runs `steps` steps. (Reckoned as the budget plus a dispatch's steps, a 128-id
        prompt with 128 tokens to go asked for a 32-page program its 16-page dispatches never needed, and its lowering
        held the GIL from the stream's dispatches: docs/PERFORMANCE.md, GPU, thirty-eighth entry.)"""
        left = -(-max(0, seq.budget - seq.dispatched) // self.steps)  # dispatches to go
        return int(self._inputs.positions[seq.row]) + left * self.steps

    def row_inputs(self, placed: list[tuple[int, Sequence]], rows: int, width: int) -> RowInputs:
        """Per-row inputs; rows without a sequence get the null page table and neutral parameters."""
        a = RowInputs.neutral(rows, width)
        for row, s in placed:
            a.place(row, s, width)
        return a

    def _check_state(self) -> list[Delivery]:
        """After a failed device call (its own sequences already failed): if the call consumed a donated buffer,
        the KV pool is gone and with it every running sequence; fail them and rebuild at the next step."""
        if not self._state_lost():
            return []
        self._cache = self._rows = self._inputs = None
        self._pending.clear()
        lost = RuntimeError("the KV cache was lost when another job's step failed on the device")
        return [self._fail(seq, lost) for seq in self.scheduler.running]

    def _state_lost(self) -> bool:
        """Whether a failed device call consumed a donated buffer of the KV pool or the rows' state."""
        return any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves((self._cache, self._rows)))

    # -- host side ---------------------------------------------------------------------------------------------

    def _fail(self, seq: Sequence, err: Exception) -> Delivery:
        self.release(seq)
        seq.finished = "error"
        return Delivery(seq, [], None, "error", err)

    def _deliver(self, p: _Pending) -> list[Delivery]:
        ids = np.asarray(p.ids)  # whole, then indexed: a device-side slice would queue behind the newer dispatch
        scores = tuple(np.asarray(a) for a in p.scores) if p.scores is not None else None
        out, eog = [], self.tokenizer.eog_ids
        for row, seq in p.rows:
            if seq.finished is not None:
                continue  # released while this was in flight
            tokens, lps = [], [] if seq.params.logprobs else None
            for n, t in enumerate(ids[row].tolist()):
                if seq.produced >= seq.budget:
                    break
                if seq.stop_at_eos and t in eog:
                    seq.finished = "eos"
                    break
                tokens.append(t)
                if lps is not None:
                    lps.append(_token_logprobs(scores, row, n))
                seq.produced += 1
            if seq.finished is None and seq.produced >= seq.budget:
                seq.finished = "max_tokens" if seq.produced >= seq.max_tokens else "context"
            if seq.finished is not None:
                self._leave(seq)
            out.append(Delivery(seq, tokens, lps, seq.finished))
        return out


def _within(chunks: list[tuple[Sequence, int, int]], budget: int) -> list[tuple[Sequence, int, int]]:
    """The first of `chunks` while `budget` ids are left before each (Batch._prefill's rule)."""
    out = []
    for chunk in chunks:
        if budget <= 0:
            break
        out.append(chunk)
        budget -= chunk[2]
    return out


def _chunk_ids(group: list[tuple[Sequence, int, int]]) -> list[tuple[list[int], list[int], int]]:
    """(ids, pages, start) of each (sequence, start, number of ids) of a prefill dispatch (Runner.prefill_group)."""
    return [(s.ids[a : a + n], s.pages, a) for s, a, n in group]


def _groups(chunks: list[tuple[Sequence, int, int]], limit: Callable[[int], int]) -> list[list]:
    """Prefill dispatches for chunks (sequence, start, number of ids), in order: consecutive chunks share one while
    each allows that many (`limit(number)`: Runner.group_limit); any other chunk has one of its own."""
    out: list[list] = []
    for chunk in chunks:
        cap = limit(chunk[2])
        if out and cap > 1 and len(out[-1]) < cap and limit(out[-1][0][2]) > 1:
            out[-1].append(chunk)
        else:
            out.append([chunk])
    return out


def _lift(scores: Scores) -> Scores:
    """A first token's scores ([1, ...]) shaped like a dispatch's ([1, 1, ...])."""
    return None if scores is None else tuple(a[:, None] for a in scores)


def _token_logprobs(scores, row: int, n: int) -> TokenLogprobs:
    chosen, top_ids, top_lp = scores
    return TokenLogprobs(float(chosen[row, n]), tuple(zip(top_ids[row, n].tolist(), top_lp[row, n].tolist(),
                                                          strict=True)))  # fmt: skip
