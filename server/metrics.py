"""Prometheus metrics of one worker (REQUIREMENTS §6, M0-W-1350), in a registry of its own.

Every series carries quant_kind; request outcomes are counted once per request, whether it was refused before it
started (invalid, queue_full, shutting_down) or ended with its terminal SSE event.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.errors import ErrorCode

OUTCOMES = ("ok", "cancelled", "timeout", "oom", "error", "invalid", "queue_full", "shutting_down")
# A job on the CPU can take minutes; on a GPU a short one takes tens of milliseconds.
DURATION_BUCKETS_MS = (10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def outcome_of(code: ErrorCode | None) -> str:
    """The outcome label of a terminal event: None for `end`, else the `error` event's code."""
    if code is None:
        return "ok"
    return {
        ErrorCode.CANCELLED: "cancelled",
        ErrorCode.INFERENCE_TIMEOUT: "timeout",
        ErrorCode.VRAM_OOM: "oom",
        ErrorCode.INVALID_REQUEST: "invalid",
        ErrorCode.QUEUE_FULL: "queue_full",
        ErrorCode.SHUTTING_DOWN: "shutting_down",
    }.get(code, "error")


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    def __init__(
        self,
        quant_kind: str,
        device: str,
        vram_bytes: Callable[[], float],
        uptime_seconds: Callable[[], float],
        queue_depth: Callable[[], float],
        running_jobs: Callable[[], float],
        kv_pages_used: Callable[[], float],
        kv_pages_total: int,
        engine_cpu_seconds: Callable[[], float] = lambda: 0.0,
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        r, q = self.registry, {"quant_kind": quant_kind}
        self._requests = Counter(
            "worker_requests", "Requests to /execute by outcome", ["outcome", "quant_kind"], registry=r
        )
        for outcome in OUTCOMES:  # every outcome is visible (as 0) from the first scrape
            self._requests.labels(outcome=outcome, **q)
        self._tokens = Counter("worker_tokens_generated", "Tokens generated", ["quant_kind"], registry=r).labels(**q)
        self._duration = Histogram(
            "worker_inference_duration_ms",
            "Time from a job's start to its terminal event, in milliseconds",
            ["quant_kind"],
            buckets=DURATION_BUCKETS_MS,
            registry=r,
        ).labels(**q)
        self._ttft = Histogram(
            "worker_time_to_first_token_ms",
            "Time from a job's start to its first generated token, in milliseconds",
            ["quant_kind"],
            buckets=DURATION_BUCKETS_MS,
            registry=r,
        ).labels(**q)
        self._disconnects = Counter(
            "worker_client_disconnects",
            "Streams whose client went away before the job ended",
            ["quant_kind"],
            registry=r,
        ).labels(**q)
        Gauge("worker_vram_bytes", "Device bytes in use", ["quant_kind", "device"], registry=r).labels(
            device=device, **q
        ).set_function(vram_bytes)
        Gauge("worker_uptime_seconds", "Seconds since the worker started", ["quant_kind"], registry=r).labels(
            **q
        ).set_function(uptime_seconds)
        Gauge("worker_queue_depth", "Jobs waiting to run", ["quant_kind"], registry=r).labels(**q).set_function(
            queue_depth
        )
        Gauge("worker_running_jobs", "Jobs in the running batch", ["quant_kind"], registry=r).labels(**q).set_function(
            running_jobs
        )
        pages = Gauge("worker_kv_pages", "KV cache pages by state", ["quant_kind", "state"], registry=r)
        pages.labels(state="used", **q).set_function(kv_pages_used)
        pages.labels(state="free", **q).set_function(lambda: kv_pages_total - kv_pages_used())
        self._batch = Histogram(
            "worker_batch_size",
            "Jobs decoded together in a decode dispatch",
            ["quant_kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        ).labels(**q)
        # The host side of serving, per thread: with hundreds of streams a token's host work (its delivery, its SSE
        # event, the socket write) can bound the rate. The event loop's thread is measured by the /metrics handler,
        # which runs on it (`render`).
        cpu = Gauge("worker_thread_cpu_seconds", "CPU seconds used by the engine thread and the HTTP event loop's",
                    ["quant_kind", "thread"], registry=r)  # fmt: skip
        cpu.labels(thread="engine", **q).set_function(engine_cpu_seconds)
        self._loop_cpu = cpu.labels(thread="event_loop", **q)
        self._q = q

    def request(self, outcome: str) -> None:
        self._requests.labels(outcome=outcome, **self._q).inc()

    def job_finished(self, outcome: str, tokens: int, duration_ms: float, ttft_ms: float | None) -> None:
        self.request(outcome)
        self._tokens.inc(tokens)
        self._duration.observe(duration_ms)
        if ttft_ms is not None:
            self._ttft.observe(ttft_ms)

    def batch_size(self, jobs: int) -> None:
        self._batch.observe(jobs)

    def client_disconnected(self) -> None:
        self._disconnects.inc()

    def render(self, loop_cpu_seconds: float | None = None) -> bytes:
        """The exposition; `loop_cpu_seconds`: the event loop thread's CPU time, from a caller on that thread."""
        if loop_cpu_seconds is not None:
            self._loop_cpu.set(loop_cpu_seconds)
        return generate_latest(self.registry)
