"""The serving state behind the HTTP routes: the engine, cached health (M0-W-1320), the residency check
(M0-W-1012), metrics, narration, admission (accepting or not) and graceful shutdown (M0-W-1340, M0-W-1630).

Nothing here knows HTTP; the Litestar app (server/app.py) reads and drives it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from server.metrics import WorkerMetrics
from worker.chat import ChatTemplate
from worker.engine import Engine
from worker.errors import ErrorCode
from worker.narration import Narrator

# The engine's facts /health reports as they are (Engine.facts)
STATIC_FACTS = (
    "model", "architecture", "quant_kind", "tokenizer_kind", "vocab_size", "context_length", "max_tokens_in",
    "max_tokens_out", "max_queue", "max_batch", "deterministic", "decode_steps", "bf16_experts", "kv_page_size",
    "kv_pages_total", "device", "sm", "cuda_runtime_version",
)  # fmt: skip


class WorkerService:
    """`engine`: the engine in this process (worker.engine.Engine), or its link to the engine's process
    (server.engine_link.RemoteEngine): both answer the same calls."""

    def __init__(
        self,
        engine: Engine,
        narrator: Narrator,
        *,
        worker_id: str,
        started: float | None = None,
        api_key: str | None = None,
        shutdown_deadline_s: float = 5.0,
        residency_check_s: float = 60.0,
        max_body_bytes: int = 1 << 20,
        keepalive_s: float = 15.0,
        chat_template: ChatTemplate | None = None,
    ):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.narrator = narrator
        self.api_key = api_key or None
        self.shutdown_deadline_s = shutdown_deadline_s
        self.residency_check_s = residency_check_s
        self.max_body_bytes = max_body_bytes
        self.keepalive_s = keepalive_s
        self.chat_template = chat_template  # None: the model has none; chat requests get a 400 saying so
        self.started = started if started is not None else time.monotonic()
        self.accepting = True
        self.on_stopped: Callable[[], None] = lambda: None  # the CLI points this at the HTTP server's exit
        self.shutdown_reason: str | None = None
        self._stop = threading.Event()
        self._shutdown_lock = threading.Lock()
        # job_id -> a function that ends that job's stream with a terminal event of the server's own (see drain)
        self.open_streams: dict[str, Callable[[str], None]] = {}
        facts = engine.facts()
        self.model_name: str = facts["model"]
        self._static: dict[str, Any] = {
            "worker_id": worker_id,
            **{k: facts[k] for k in STATIC_FACTS},
        }
        self._dynamic: dict[str, Any] = {}
        self.refresh()
        self.metrics = WorkerMetrics(
            facts["quant_kind"],
            facts["device"],
            vram_bytes=lambda: self._dynamic["vram_bytes_used"],
            uptime_seconds=self.uptime,
            queue_depth=lambda: engine.queue_depth,
            running_jobs=lambda: len(engine.running),
            kv_pages_used=lambda: engine.kv_pages_used,
            kv_pages_total=facts["kv_pages_total"],
            engine_cpu_seconds=lambda: engine.cpu_seconds,
        )
        engine.on_decode(self.metrics.batch_size)

    # -- health --------------------------------------------------------------------------------------------

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def health(self) -> dict[str, Any]:
        """/health body from cached state: no device call, so it answers in well under 10 ms even mid-job."""
        return {
            **self._dynamic,
            **self._static,
            "uptime_seconds": round(self.uptime(), 3),
            "accepting": self.accepting,
            "busy": self.engine.busy,
            "queue_depth": self.engine.queue_depth,
            "running_jobs": len(self.engine.running),
            "kv_pages_used": (used := self.engine.kv_pages_used),
            "kv_pages_free": self._static["kv_pages_total"] - used,
        }

    def refresh(self) -> None:
        """Re-check residency and device bytes. A weight that left the device makes the worker unhealthy, and
        that is logged as a critical error (M0-W-1012)."""
        resident, report = self.engine.device_report()  # per device: bytes in use and limit, residency
        was_resident = self._dynamic.get("resident", True)
        self._dynamic = {
            "status": "healthy" if resident else "unhealthy",
            "resident": resident,
            "vram_bytes_used": sum(d["bytes_in_use"] for d in report),
            "devices": report,
        }
        if was_resident and not resident:
            self.narrator.emit(
                "error",
                level="critical",
                code=str(ErrorCode.CUDA_ERROR),
                message="model weights are no longer resident on the device; the worker reports unhealthy",
            )

    def refresh_bytes(self) -> None:
        """Device bytes only (the allocator's counter on a GPU); run at each job's end, on the engine thread. Not
        device_report: its residency check visits every weight array (the residency monitor's job), a cost on the
        engine thread at every job's end that grew with the model's arrays."""
        used = self.engine.device_bytes()
        report = [{**d, "bytes_in_use": used.get(d["id"], d["bytes_in_use"])} for d in self._dynamic["devices"]]
        self._dynamic = {**self._dynamic, "vram_bytes_used": sum(used.values()), "devices": report}

    def start_monitor(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.residency_check_s):
                self.refresh()

        threading.Thread(target=loop, name="residency-check", daemon=True).start()

    # -- shutdown ------------------------------------------------------------------------------------------

    def begin_shutdown(self, reason: str) -> bool:
        """Stop accepting (new /execute gets 503), let the running job finish or cancel it within the deadline,
        then call on_stopped. Returns immediately; False if a shutdown was already under way."""
        with self._shutdown_lock:
            if self.shutdown_reason is not None:
                return False
            self.shutdown_reason = reason
            self.accepting = False
        self._stop.set()

        threading.Thread(target=self._drain, name="shutdown", daemon=True).start()
        return True

    def _drain(self) -> None:
        try:
            self.engine.shutdown(self.shutdown_deadline_s)
            # A job the engine could not stop in time (e.g. inside an XLA compile, which cannot be interrupted) still
            # gets its one terminal event, so every client sees a complete stream.
            for abort in list(self.open_streams.values()):
                abort("the worker shut down before the job could be stopped")
        finally:
            self.on_stopped()
