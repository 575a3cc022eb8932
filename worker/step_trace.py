"""A profiler trace of the engine under load, for finding where a dispatch's time goes between the device and the
host: `WORKER_TRACE_DIR=DIR` starts `jax.profiler` when the running batch comes to hold `WORKER_TRACE_ROWS` rows
(default: its --max-batch) for the `WORKER_TRACE_ROUND`-th time (default 1; bench load's untimed warm-up round of a
level comes before its timed one: 2), `WORKER_TRACE_AFTER` engine steps after that (default 0; a round of many
streams first prefills them between decode dispatches: a delay puts the trace in its decode phase), and stops it
`WORKER_TRACE_STEPS` engine steps later (default 24). The trace holds the device's kernels and the host's spans
named below (`span`), so the gaps where the device waits for the host show; `python -m bench.trace FILE` sums
both. Why an environment switch and not a flag: it is a diagnostic for the benchmarks (bench load starts the
worker with the caller's environment), not a serving option.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator

import jax

log = logging.getLogger(__name__)

# The host spans (jax.profiler.TraceAnnotation names): an engine step, and within it the parts of worker/batch.py.
STEP, PREFILL, DECODE, READ_BACK, EVENTS = "engine step", "prefill", "decode dispatch", "read back", "engine events"
SPANS = (STEP, PREFILL, DECODE, READ_BACK, EVENTS)


# span name -> [count, wall seconds], inside `timed_spans` (bench.host --real reads it): the host's wall time in
# each part of an engine step without a profiler, which slows the host it measures.
_walls: defaultdict[str, list] | None = None


def span(name: str) -> jax.profiler.TraceAnnotation | _TimedSpan:
    """A named host span in the trace (nearly free while no trace runs), also timed inside `timed_spans`."""
    return jax.profiler.TraceAnnotation(name) if _walls is None else _TimedSpan(name, _walls[name])


@contextlib.contextmanager
def timed_spans() -> Iterator[defaultdict[str, list]]:
    """Time the spans while inside: yields name -> [count, wall seconds], filled as spans end."""
    global _walls
    _walls = defaultdict(lambda: [0, 0.0])
    try:
        yield _walls
    finally:
        _walls = None


class _TimedSpan:
    def __init__(self, name: str, into: list):
        self.annotation, self.into = jax.profiler.TraceAnnotation(name), into

    def __enter__(self) -> None:
        self.annotation.__enter__()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.into[0] += 1
        self.into[1] += time.perf_counter() - self.t0
        self.annotation.__exit__(*exc)


class StepTracer:
    """Starts the profiler `after` steps past the step where the running rows reach `rows` for the `nth` time
    (from fewer) and stops it `steps` steps later; then never again. Inactive without a folder."""

    def __init__(self, folder: str | None, rows: int, steps: int, nth: int = 1, after: int = 0):
        self.folder, self.rows, self.steps, self.nth, self.after = folder, rows, steps, nth, after
        self._left: int | None = None  # steps still to trace, once started
        self._delay: int | None = None  # steps still to wait, once the mark is reached
        self._reached, self._above = 0, False

    @classmethod
    def from_env(cls, max_batch: int) -> StepTracer:
        env = os.environ  # an empty variable is an unset one
        return cls(env.get("WORKER_TRACE_DIR") or None, int(env.get("WORKER_TRACE_ROWS") or max_batch),
                   int(env.get("WORKER_TRACE_STEPS") or 24), int(env.get("WORKER_TRACE_ROUND") or 1),
                   int(env.get("WORKER_TRACE_AFTER") or 0))  # fmt: skip

    def before_step(self, running: int) -> None:
        if self.folder is None or self._left is not None:
            return
        if self._delay is None:
            above, was_above = running >= self.rows, self._above
            self._above = above
            if not above or was_above:
                return  # the rows did not just reach the mark
            self._reached += 1
            if self._reached < self.nth:
                return
            self._delay = self.after
        if self._delay > 0:
            self._delay -= 1
            return
        try:
            jax.profiler.start_trace(self.folder)
        except Exception:  # a trace that cannot start must not stop the engine
            log.exception("profiler trace into %s could not start", self.folder)
            self.folder = None
            return
        log.info("profiler trace into %s: %d steps from %d running rows", self.folder, self.steps, running)
        self._left = self.steps

    def after_step(self) -> None:
        if self._left is None or self.folder is None:
            return
        self._left -= 1
        if self._left <= 0:
            jax.profiler.stop_trace()
            self.folder = None  # done: once per process
            log.info("profiler trace written")
