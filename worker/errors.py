"""The worker's error type: a stable code (REQUIREMENTS §6, M0-W-1500) and a message a person can act on."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    INVALID_REQUEST = "INVALID_REQUEST"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    INSUFFICIENT_VRAM = "INSUFFICIENT_VRAM"
    VRAM_OOM = "VRAM_OOM"
    CUDA_ERROR = "CUDA_ERROR"
    INFERENCE_TIMEOUT = "INFERENCE_TIMEOUT"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    # Admission codes of the HTTP layer (not in the original list): the request was not started.
    QUEUE_FULL = "QUEUE_FULL"
    SHUTTING_DOWN = "SHUTTING_DOWN"


# Errors a client may retry as is (the same request can succeed later).
RETRIABLE = frozenset({ErrorCode.VRAM_OOM, ErrorCode.INFERENCE_TIMEOUT, ErrorCode.CUDA_ERROR, ErrorCode.QUEUE_FULL})


class WorkerError(Exception):
    """An error with a stable code. `str(err)` is the one-line form: `CODE: message`. `field` names the request
    field an INVALID_REQUEST is about (the HTTP layer reports it as is), where there is one."""

    def __init__(self, code: ErrorCode, message: str, field: str | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.field = field

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
