"""JAX's persistent compilation cache for the worker: compiled steps are kept on disk, so a second start of the
same model on the same machine (and JAX version) loads them instead of compiling again.

The default folder is `<user cache dir>/worker-orcd/jax` (platformdirs: ~/.cache/... on Linux); the CLI's
`--compile-cache DIR` moves it and `--no-compile-cache` turns it off, and `worker.load(..., compile_cache=...)`
does the same from Python. JAX keys each entry by the program, the compile options and the device, so a stale or
foreign entry is never used; the folder is bounded (least recently used entries go first).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import platformdirs

# Bound on the folder (JAX evicts the least recently used entries beyond it). The embedded Gemma 3 on the CPU
# takes ~20 MB; a GPU model a few MB more per prompt bucket. A bounded folder has one lock file that every read
# and write takes, and each write lists the folder under it: with the warm-up's compiles side by side
# (Model.warm_up), a thread can wait past JAX's 10 s and then compiles without the cache (an H100, 2026-12-06:
# one entry, `jit__sample_rows`, in each of two GPU server starts; 16 threads reading and writing a full 1 GB
# folder on this 2-core machine waited up to 5 s an entry). Left so: without a bound there is no lock, but the
# folder grows without end and JAX's writes are not atomic between processes.
MAX_BYTES = 1 << 30


def default_dir() -> Path:
    return Path(platformdirs.user_cache_dir("worker-orcd")) / "jax"


def enable(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn the cache on in `directory` (default: `default_dir()`), unless it is already on (then the folder in
    use wins: a process that configured JAX itself keeps its choice). Returns the folder in use, or None when the
    folder cannot be created (the worker then starts without the cache: slower, not broken)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = Path(directory) if directory is not None else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Every compile is cached: on a 2-core CPU the many sub-second compiles (weight layout, sampling, prompt
    # buckets) add up to most of a start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
