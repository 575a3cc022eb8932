"""Structured log events (REQUIREMENTS §9, M0-W-1900): one JSON object a line on stderr, each carrying worker_id,
model_ref, gpu_device, event and, when there is one, job_id.

The event vocabulary is closed (EVENTS); other Python log records (uvicorn, Litestar, engine exceptions) go out in
the same shape with event "error" (level ERROR and above) or "log", so stderr stays one JSON object a line.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

EVENTS = frozenset(
    {
        "startup",
        "model_load_start",
        "model_load_progress",
        "model_load_complete",
        "ready",
        "execute_start",
        "execute_end",
        "error",
        "shutdown",
    }
)
PROGRESS_STEPS = (0, 25, 50, 75, 100)  # M0-W-1621


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Narrator:
    """Writes the worker's log events. Thread-safe: the engine thread and the HTTP loop both narrate."""

    def __init__(self, worker_id: str, model_ref: str | None, gpu_device: int | None, stream: TextIO | None = None):
        self.worker_id = worker_id
        self.model_ref = model_ref
        self.gpu_device = gpu_device
        self._stream = stream
        self._lock = threading.Lock()
        self._ended: dict[str, None] = {}  # recent ended job ids, insertion-ordered, bounded

    def emit(self, event: str, job_id: str | None = None, level: str = "info", **fields: Any) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown log event {event!r}; §9 allows {sorted(EVENTS)}")
        if event == "execute_end" and job_id is not None:
            # A job ended by shutdown while the engine was stuck (in a compile, say) is narrated then; the engine's
            # own late execute_end for it must not make a second one.
            with self._lock:
                if job_id in self._ended:
                    return
                self._ended[job_id] = None
                if len(self._ended) > 1024:
                    del self._ended[next(iter(self._ended))]
        self._write(event, job_id, level, fields)

    def _write(self, event: str, job_id: str | None, level: str, fields: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "ts": _now(),
            "level": level,
            "event": event,
            "worker_id": self.worker_id,
            "model_ref": self.model_ref,
            "gpu_device": self.gpu_device,
        }
        if job_id is not None:
            record["job_id"] = job_id
        record.update((k, v) for k, v in fields.items() if k not in record)
        line = json.dumps(record, ensure_ascii=False, default=str)
        stream = self._stream or sys.stderr  # looked up late so that pytest's capsys sees it
        with self._lock:
            stream.write(line + "\n")
            stream.flush()

    def load_progress(self) -> Callable[[int, int], None]:
        """An on_progress(done_bytes, total_bytes) callback that emits model_load_progress once at each of
        0, 25, 50, 75 and 100 percent, however the loader's steps fall."""
        pending = list(PROGRESS_STEPS)

        def on_progress(done: int, total: int) -> None:
            percent = 100.0 if total <= 0 else 100.0 * done / total
            while pending and percent >= pending[0]:
                step = pending.pop(0)
                self.emit("model_load_progress", percent=step, bytes_done=done, bytes_total=total)

        return on_progress

    def log_handler(self) -> logging.Handler:
        """A logging handler that writes Python log records as events of this narrator."""
        return _NarrationHandler(self)


class _NarrationHandler(logging.Handler):
    def __init__(self, narrator: Narrator):
        super().__init__()
        self.narrator = narrator

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                fields["exception"] = logging.Formatter().formatException(record.exc_info)
            event = "error" if record.levelno >= logging.ERROR else "log"
            self.narrator._write(event, None, record.levelname.lower(), fields)
        except Exception:
            self.handleError(record)
