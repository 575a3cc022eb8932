"""worker/step_trace.py: the engine's profiler trace under load starts at the first step with enough running rows,
stops the given number of steps later, once per process, and holds the engine's host spans (bench.trace sums them)."""

from __future__ import annotations

import gzip
import json
import time

import jax.numpy as jnp

from bench import trace
from worker.step_trace import DECODE, READ_BACK, STEP, StepTracer, span, timed_spans


def test_the_trace_starts_at_enough_rows_stops_after_its_steps_and_holds_the_spans(tmp_path):
    tracer = StepTracer(str(tmp_path), rows=3, steps=2, nth=2)
    for running in (2, 3, 4, 1):  # too few rows, then the first round (a warm-up's), then fewer again: nothing
        tracer.before_step(running)
        tracer.after_step()
    assert not list(tmp_path.rglob("*.trace.json.gz"))
    for _ in range(2):
        tracer.before_step(3)
        with span(STEP):
            with span(DECODE):
                (jnp.arange(8) + 1).block_until_ready()
            with span(READ_BACK):
                pass
        tracer.after_step()
    tracer.before_step(5)  # once per process: no second trace
    tracer.after_step()
    files = list(tmp_path.rglob("*.trace.json.gz"))
    assert len(files) == 1
    with gzip.open(files[0], "rt") as f:
        spans = trace.host_spans(json.load(f), (STEP, DECODE, READ_BACK))
    assert len(spans[STEP]) == 2 and len(spans[DECODE]) == 2 and len(spans[READ_BACK]) == 2


def test_without_a_folder_the_tracer_does_nothing(monkeypatch):
    monkeypatch.setenv("WORKER_TRACE_DIR", "")  # gpu-session.sh passes the variables empty when not tracing
    monkeypatch.setenv("WORKER_TRACE_ROWS", "")
    tracer = StepTracer.from_env(max_batch=4)
    assert tracer.folder is None and tracer.rows == 4 and tracer.nth == 1
    tracer.before_step(100)
    tracer.after_step()


def test_a_delay_starts_the_trace_that_many_steps_after_the_mark(tmp_path):
    tracer = StepTracer(str(tmp_path), rows=2, steps=1, after=3)
    for running in (2, 1, 1):  # the mark, then fewer rows: the delay runs on (a round's streams end meanwhile)
        tracer.before_step(running)
        tracer.after_step()
        assert tracer._left is None
    tracer.before_step(1)
    assert tracer._left == 1  # started at the third step after the mark
    tracer.after_step()
    assert len(list(tmp_path.rglob("*.trace.json.gz"))) == 1


def test_spans_are_timed_only_inside_timed_spans():
    with timed_spans() as walls:
        for _ in range(2):
            with span(READ_BACK):
                time.sleep(0.01)
    assert walls[READ_BACK][0] == 2 and walls[READ_BACK][1] >= 0.02
    with span(READ_BACK):  # outside: a profiler annotation only, counted nowhere
        pass
    assert walls[READ_BACK][0] == 2 and set(walls) == {READ_BACK}
