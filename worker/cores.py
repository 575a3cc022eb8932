"""The cores this process may run on, for the CPU path's layout (server/cli.py's --cpu-devices) and its kernel's
threads (worker/cpu_kernels). Its own module, free of JAX: the CLI asks before JAX starts."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The process's CPU affinity where the OS keeps one (Linux), else the machine's cores (macOS and Windows, whose
    os module has no sched_getaffinity)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
