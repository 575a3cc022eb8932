"""Programs compiled ahead on background threads (Runner._soon): a decode's next page-table width while a running
sequence's budget reaches it, a long prompt's later chunks, and (once the batch is idle) what a start leaves out.
Each test checks on which thread a program was compiled: JAX logs each compile it does from the thread doing it,
and a call that needs a program another thread is compiling waits for it instead of compiling it again."""

from __future__ import annotations

import logging
import threading
import time

import jax
import pytest
from conftest import oracles_dir

import worker
from worker.model import GREEDY
from worker.runner import COVERED, NEEDED, WHEN_IDLE
from worker.sampling import SamplingParams


@pytest.fixture
def compiles(caplog):
    """(thread name, message) of each XLA compile from here on."""
    caplog.set_level(logging.WARNING, logger="jax._src.dispatch")
    was = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # for every thread (`jax.log_compiles` is the calling thread's)
    try:
        yield lambda: [(r.threadName, r.getMessage()) for r in caplog.records if "XLA compilation" in r.getMessage()]
    finally:
        jax.config.update("jax_log_compiles", was)


def load(max_batch: int = 2):
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=max_batch)
    m.runner.compile_ahead = True  # whatever WORKER_COMPILE_AHEAD says
    return m


def wait_for_compiles() -> None:
    for t in threading.enumerate():
        if t.name.startswith("compile-"):
            t.join(timeout=120)


def main_thread(compiles: list[tuple[str, str]], program: str) -> list[str]:
    return [msg for thread, msg in compiles if thread == "MainThread" and f"jit({program})" in msg]


def ids_alone(prompt: list[int], max_tokens: int) -> list[int]:
    """`prompt`'s greedy ids on a model of its own with nothing compiled ahead."""
    m = load()
    m.runner.compile_ahead = False
    return m.generate(prompt, max_tokens=max_tokens, stop_at_eos=False)


def hold(r) -> threading.Event:
    """Keep `r`'s compile-ahead thread busy (on a job of its own, once it has taken it) until the event is set."""
    release = threading.Event()
    r._soon(("held",), lambda: release.wait(60) and None)
    while ("held",) in r._ahead:
        time.sleep(0.01)
    return release


def started(m) -> None:
    """As the server starts (16-id chunks, the first row bucket), then the other row buckets, asked for then, compiled
    (and nothing else: what is asked for when idle waits from here on)."""
    r, plan = m.runner, SamplingParams(temperature=1.0).plan()
    r.idle = lambda: False
    m.warm_up(SamplingParams(temperature=1.0), all_rows=True)
    later = [(n, r.table_width(1), m.decode_steps, plan) for n in r.row_buckets()[1:]]
    for key in later:
        r.decode_soon(*key, when=NEEDED)
    while not all(k in r._decodes for k in later):
        time.sleep(0.05)


def test_a_decode_reaching_a_wider_table_finds_it_compiled(compiles):
    """A 240-id prompt with 60 tokens to go: its first dispatch is at 16 pages (256 positions); the 32-page decode
    is asked for then, and compiled on another thread before the sequence gets there."""
    m = load()
    r, batch = m.runner, m.batch
    seq = m.sequence(list(range(3, 243)), 60, GREEDY, 0)
    batch.add(seq)
    while not seq.decoding:
        batch.step()
    batch.step()  # the first decode dispatch
    assert ("decode", r.row_bucket(seq.row + 1), 32, batch.steps, GREEDY.plan()) in r._asked
    wait_for_compiles()
    before = len(main_thread(compiles(), "_decode"))
    while batch.busy:
        batch.step()
    assert seq.finished == "max_tokens" and seq.dispatched >= 60
    assert len(main_thread(compiles(), "_decode")) == before, "the wider decode compiled on the engine's thread"
    assert [msg for thread, msg in compiles() if thread == "compile-ahead" and "jit(_decode)" in msg]


@pytest.mark.parametrize("steps", [1, 4])
def test_a_decode_whose_last_dispatch_ends_at_a_tables_end_asks_for_no_wider_one(steps):
    """A 200-id prompt with 56 tokens to go: its last dispatch ends at position 256, the 16-page table's end, so no
    32-page program is asked for (one was, by a reach of the budget plus a dispatch's steps), and none runs."""
    m = load()
    r, batch = m.runner, m.batch
    batch.steps = steps
    seq = m.sequence(list(range(3, 203)), 56, GREEDY, 0)
    batch.add(seq)
    while batch.busy:
        batch.step()
    assert seq.finished == "max_tokens" and seq.dispatched >= 56
    assert not [k for k in r._asked if k[0] == "decode" and k[2] > 16], r._asked
    assert {width for _rows, width, *_ in r._decodes} == {16}  # every dispatch's table, and nothing compiled ahead


def test_the_ids_are_those_of_a_run_without_compiling_ahead():
    ids = list(range(3, 243))
    on = load().generate(ids, max_tokens=40, stop_at_eos=False)
    m = load()
    m.runner.compile_ahead = False
    assert m.generate(ids, max_tokens=40, stop_at_eos=False) == on
    assert not m.runner._asked


def test_a_long_prompts_later_chunks_are_compiled_beside_its_first(compiles):
    m = load()
    m.runner.chunk = m.batch.prefill_tokens = 64  # chunks of 64 ids, one a step
    seq = m.sequence(list(range(3, 303)), 4, GREEDY, 0)  # chunks at 0, 64, .., 256: tables of 16 and 32 pages
    m.batch.add(seq)
    m.batch.step()
    assert {k for k in m.runner._asked if k[0] == "prefill"} == {("prefill", 1, 64, 16), ("prefill", 1, 64, 32)}
    wait_for_compiles()
    before = len(main_thread(compiles(), "_prefill"))
    while m.batch.busy:
        m.batch.step()
    assert len(main_thread(compiles(), "_prefill")) == before


def test_a_prompt_waits_for_its_compile_off_the_engines_thread_while_others_decode(compiles):
    """A stream decodes; a prompt arrives whose chunk bucket is not compiled: the stream keeps its dispatches while
    the prompt's program compiles on the background thread (held busy here to make the wait visible), then the
    prompt runs and gives the ids it gives alone."""
    prompt = list(range(3, 200))
    want = ids_alone(prompt, 8)

    m = load()
    r = m.runner
    stream = m.sequence(list(range(3, 20)), 400, GREEDY, 0)  # decodes until the prompt is done
    m.batch.add(stream)
    while not stream.decoding:
        m.batch.step()
    release = hold(r)  # the background thread busy until released
    before = len(main_thread(compiles(), "_prefill"))
    late, asked_before = m.sequence(prompt, 8, GREEDY, 0), set(r._asked)
    m.batch.add(late)
    streamed = [t for _ in range(3) for d in m.batch.step() if d.seq is stream for t in d.tokens]
    assert late.prefilled == 0 and len(streamed) >= 2 * m.batch.steps
    asked = {("decode", 2, 16, m.batch.steps, GREEDY.plan()), ("prefill", *r.prefill_shape([(prompt, [], 0)]))}
    assert r._asked - asked_before == asked and asked <= set(r._ahead)  # its chunk's and the 2-row decode it joins
    release.set()
    wait_for_compiles()  # (the stream would run on meanwhile, and might end before the prompt joins it)
    got = []
    while late.finished is None:
        got += [t for d in m.batch.step() if d.seq is late for t in d.tokens]
    assert stream.finished is None and got == want
    assert len(main_thread(compiles(), "_prefill")) == before, "the prompt's program compiled on the engine's thread"
    m.batch.release(stream)
    wait_for_compiles()


def test_a_prompt_whose_programs_are_compiled_does_not_wait_behind_one_whose_program_compiles():
    """Nothing decodes yet: a long prompt's chunk bucket is not compiled, a short one's is. The short one runs and
    streams while the long one's compiles on the background thread, then the long one gives its ids alone."""
    prompt = list(range(3, 200))
    want = ids_alone(prompt, 8)

    m = load()
    r = m.runner
    started(m)
    release = hold(r)  # the background thread busy until released
    long, short = m.sequence(prompt, 8, GREEDY, 0), m.sequence(list(range(3, 15)), 200, GREEDY, 0)
    m.batch.add(long)
    m.batch.add(short)
    streamed = [t for _ in range(3) for d in m.batch.step() if d.seq is short for t in d.tokens]
    assert long.prefilled == 0 and len(streamed) >= 2 * m.batch.steps
    release.set()
    got = []
    while long.finished is None:
        got += [t for d in m.batch.step() if d.seq is long for t in d.tokens]
    assert short.finished is None and got == want
    assert r.stop_compiling_ahead(wait_s=60) is False  # what waits for an idle batch is dropped


def test_the_most_wanted_compiles_first_and_what_only_may_come_waits_for_an_idle_batch(caplog):
    m = load()
    r = m.runner
    busy = threading.Event()
    busy.set()
    r.idle = lambda: not busy.is_set()
    release = hold(r)  # the thread's first job: held until released
    r.prefill_soon(32, 16, WHEN_IDLE)
    r.prefill_soon(64, 16, COVERED)
    r.prefill_soon(128, 16, NEEDED)
    r.prefill_soon(256, 16, WHEN_IDLE)
    r.prefill_soon(256, 16, NEEDED)  # asked again, more urgently: it moves up
    r.prefill_soon(64, 16, WHEN_IDLE)  # less urgently: it stays

    def compiled() -> list[str]:
        return [rec.getMessage().split(" tokens")[0].split()[-1] for rec in caplog.records
                if rec.getMessage().startswith("compiled ahead: prefill")]  # fmt: skip

    with caplog.at_level(logging.INFO, logger="worker.runner"):
        release.set()
        deadline = time.monotonic() + 120
        while len(compiled()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # the thread now waits for an idle batch
        assert compiled() == ["128", "256", "64"]
        assert list(r._ahead) == [("prefill", 1, 32, 16)]
        busy.clear()
        wait_for_compiles()
    assert compiled() == ["128", "256", "64", "32"] and not r._ahead
    r.prefill_soon(32, 16, NEEDED)  # asked once: nothing more
    assert not [t for t in threading.enumerate() if t.name == "compile-ahead"]


def test_what_running_streams_need_compiles_before_what_a_waiting_prompt_needs(caplog):
    """A missing decode stalls every running stream; a missing prefill holds back only its own prompt."""
    m = load()
    r = m.runner
    release = hold(r)
    r.prefill_soon(128, 16)  # PROMPT
    r.decode_soon(1, 32, m.batch.steps, GREEDY.plan())  # NEEDED: a decode's next width
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        release.set()
        wait_for_compiles()
    done = [rec.getMessage().split()[2] for rec in caplog.records if rec.getMessage().startswith("compiled ahead")]
    assert done == ["decode", "prefill"]
    # each compile's start is in the log before its end, and before the next one's start
    lines = [rec.getMessage().split(":")[0] + " " + rec.getMessage().split()[2] for rec in caplog.records
             if rec.getMessage().startswith(("compiling ahead", "compiled ahead"))]  # fmt: skip
    assert lines == [f"{when} ahead {what}" for what in ("decode", "prefill") for when in ("compiling", "compiled")]


def test_a_decode_asked_for_takes_the_place_of_those_waiting_that_it_covers_and_are_wanted_no_sooner():
    m = load()
    r, steps, greedy = m.runner, m.batch.steps, GREEDY.plan()
    release = hold(r)
    r.prefill_soon(128, 16, NEEDED)
    r.decode_soon(1, 32, steps, greedy, COVERED)  # a 1-row batch's next width
    r.decode_soon(2, 16, steps, greedy, NEEDED)  # narrower: covers nothing waiting
    sampled = SamplingParams(temperature=1.0).plan()
    r.decode_soon(4, 32, steps, sampled, NEEDED)  # the batch grew to 4 rows
    assert list(r._ahead) == [("prefill", 1, 128, 16), ("decode", 4, 32, steps, sampled)]
    assert [place[:2] for place in r._ahead.values()] == [[NEEDED, 1], [NEEDED, 2]]  # the places it took
    assert ("decode", 1, 32, steps, greedy) not in r._asked
    r.decode_soon(4, 64, steps, sampled, WHEN_IDLE)  # covers one wanted sooner: it waits its own turn
    assert list(r._ahead)[1:] == [("decode", 4, 32, steps, sampled), ("decode", 4, 64, steps, sampled)]
    release.set()
    assert r.stop_compiling_ahead(wait_s=60) is False


def test_a_failed_compile_ahead_is_logged_and_the_call_still_works(caplog, monkeypatch):
    m = load()
    broken = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no lowering"))  # noqa: E731
    monkeypatch.setattr(m.runner, "_prefill_job", broken)
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        m.runner.prefill_soon(32, 16)
        wait_for_compiles()
    assert any("compile ahead failed" in r.getMessage() for r in caplog.records)
    assert len(m.generate(list(range(3, 30)), max_tokens=3, stop_at_eos=False)) == 3


def test_compiling_ahead_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("WORKER_COMPILE_AHEAD", "0")
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=2)
    assert not m.runner.compile_ahead
    m.runner.prefill_soon(32, 16)
    assert not m.runner._asked


def test_a_shutdown_drops_what_may_come_and_says_whether_a_compile_still_runs():
    m = load()
    r = m.runner
    r.idle = lambda: False  # a batch that stays busy: what only may come waits
    r.prefill_soon(32, 16, WHEN_IDLE)
    assert r.stop_compiling_ahead() is False  # dropped, and its thread ended
    assert not r.compile_ahead and not r._ahead

    m = load()
    release = hold(m.runner)  # a compile that takes until released
    assert m.runner.stop_compiling_ahead(wait_s=0.2) is True
    release.set()
    assert m.runner.stop_compiling_ahead() is False


def test_at_exit_what_waits_is_dropped_and_a_compile_under_way_finishes():
    from worker import runner

    m = load()
    r = m.runner
    r.idle = lambda: False
    r.prefill_soon(32, 16, WHEN_IDLE)  # waits for an idle batch that never comes
    finished = threading.Event()
    r._soon(("held",), lambda: time.sleep(0.3) or finished.set())  # a compile under way
    while ("held",) in r._ahead:
        time.sleep(0.01)
    runner._stop_compiling_at_exit()
    assert finished.is_set() and not r._ahead
    assert not [t for t in threading.enumerate() if t.name == "compile-ahead"]


def test_a_cpu_start_leaves_the_chunk_buckets_and_the_larger_row_buckets_for_an_idle_batch():
    m = load()
    r = m.runner
    r.idle = lambda: False
    m.warm_up(SamplingParams(temperature=1.0), all_rows=True)
    buckets, (first, *rows) = r.chunk_buckets()[1:], r.row_buckets()
    plan, width = SamplingParams(temperature=1.0).plan(), r.table_width(1)
    assert rows and (first, width, m.decode_steps, plan) in r._decodes  # compiled before `ready`
    # in this order: the chunk buckets, smallest first, then the row buckets, largest first (it covers the others)
    want = [("prefill", 1, b, r.table_width(b)) for b in buckets]
    want += [("decode", n, width, m.decode_steps, plan) for n in reversed(rows)]
    assert sorted(r._ahead, key=lambda k: r._ahead[k][:2]) == want  # all of them waiting
    assert all(r._ahead[k][0] == WHEN_IDLE for k in want)
    assert r.stop_compiling_ahead() is False


def spy_dispatches(monkeypatch, m) -> list[tuple[int, int, object]]:
    """(rows, table width, plan) of each decode dispatch of `m` from here on."""
    seen, decode = [], m.runner.decode

    def spy(rows, cache, inputs, steps, plan):
        seen.append((len(inputs.positions), inputs.tables.shape[1], plan))
        return decode(rows, cache, inputs, steps, plan)

    monkeypatch.setattr(m.runner, "decode", spy)
    return seen


def run(m, *seqs) -> None:
    for seq in seqs:
        m.batch.add(seq)
    while m.batch.busy:
        m.batch.step()


def test_a_batch_that_shrinks_decodes_on_the_wider_program_it_has_while_its_own_compiles(compiles, monkeypatch):
    """Two sequences decode on 2 rows; the one on row 1 ends first; the other needs 1 row, a program never compiled:
    it runs on the 2-row one (a row's bits do not depend on the rows beside it) and gives its ids alone."""
    prompt = list(range(3, 40))
    want = ids_alone(prompt, 30)

    m = load()
    r = m.runner
    # As a start would: both prompts' chunk buckets and the 2-row decode compiled, not the 1-row one.
    r.compile_first_steps(m.batch.row_inputs([], 1, 1), (GREEDY.plan(),), m.batch.steps, (2,), lone=(64,))
    before = len(main_thread(compiles(), "_decode"))
    dispatches = spy_dispatches(monkeypatch, m)
    long, short = m.sequence(prompt, 30, GREEDY, 0), m.sequence(list(range(5, 20)), 4, GREEDY, 0)
    release = hold(m.runner)  # the background thread busy until the end: the 1-row program is not compiled
    m.batch.add(long)
    m.batch.add(short)
    got = [t for d in m.batch.step() if d.seq is long for t in d.tokens]
    assert (long.row, short.row) == (0, 1)
    while m.batch.busy:
        got += [t for d in m.batch.step() if d.seq is long for t in d.tokens]
    release.set()
    assert got == want
    assert {rows for rows, _, _ in dispatches} == {2}, dispatches  # never the 1-row program
    assert ("decode", 1, 16, m.batch.steps, GREEDY.plan()) in m.runner._asked
    wait_for_compiles()
    assert len(main_thread(compiles(), "_decode")) == before, "a decode program compiled on the engine's thread"


def test_a_greedy_job_decodes_on_the_sampled_program_while_its_own_compiles(compiles, monkeypatch):
    prompt = list(range(3, 40))
    want = ids_alone(prompt, 12)

    m = load()
    run(m, m.sequence(prompt, 3, SamplingParams(temperature=1.0), 7))  # the sampled program, compiled by its use
    dispatches = spy_dispatches(monkeypatch, m)
    seq, got = m.sequence(prompt, 12, GREEDY, 0), []
    m.batch.add(seq)
    while m.batch.busy:
        got += [t for d in m.batch.step() for t in d.tokens]
    assert got == want
    assert dispatches[0][2] == SamplingParams(temperature=1.0).plan() != GREEDY.plan()
    assert ("decode", 1, 16, m.batch.steps, GREEDY.plan()) in m.runner._asked


def test_what_only_may_come_waits_until_the_batch_has_been_idle_a_while(monkeypatch):
    from worker import batch

    m = load()
    m.generate(list(range(3, 20)), max_tokens=2, stop_at_eos=False)
    assert not m.runner.idle()  # idle, but only just: a request right after another finds the cores to itself
    monkeypatch.setattr(batch, "IDLE_BEFORE_COMPILE_S", 0.0)
    assert m.runner.idle()
    m.batch.add(m.sequence([5, 9], 2, GREEDY, 0))
    assert not m.runner.idle()


def test_a_compile_ahead_shortens_pythons_switch_interval_while_it_runs_and_restores_it():
    """The engine's thread takes the GIL back sooner beside a lowering (runner._engine_first)."""
    import sys

    from worker.runner import COMPILING_SWITCH_S

    r = load().runner
    before, seen = sys.getswitchinterval(), []
    r._soon(("probe",), lambda: ("probe", lambda: seen.append(sys.getswitchinterval()) or _Lowered()))
    wait_for_compiles()
    assert seen == [pytest.approx(COMPILING_SWITCH_S)] and before > 10 * COMPILING_SWITCH_S
    assert sys.getswitchinterval() == before


class _Lowered:
    """A lowered program's stand-in: compiles to nothing."""

    def compile(self):
        return None
