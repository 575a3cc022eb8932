"""The HTTP app in-process on a tiny random model (the oracle's qwen2 Q4_K_M, CPU): for tests that need the real
engine and routes but not a process. The model is loaded once per test session and shared (its compiled steps
too); each caller gets its own engine and service."""

from __future__ import annotations

import functools
import io
import multiprocessing
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from litestar.testing import TestClient

import worker
from server.app import create_app
from server.engine_link import EngineHost, RemoteEngine
from server.service import WorkerService
from tests.conftest import oracles_dir
from worker.engine import Engine
from worker.model import Model
from worker.narration import Narrator

WORKER_ID = "00000000-0000-4000-8000-000000000014"
SLOTS = 512  # the file's context: long jobs run ~500 steps


def model_path() -> str:
    return str(oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf")


@functools.cache
def tiny_model(max_batch: int = 1) -> Model:
    """The tiny qwen2; one job at a time by default (M0's engine, which the contract tests describe)."""
    model = worker.load(model_path(), device="cpu", slots=SLOTS, max_batch=max_batch)
    model.generate("warm-up", max_tokens=2, stop_at_eos=False)  # compile the decode step and the first bucket
    return model


@contextmanager
def tiny_service(*, api_key: str | None = None, max_queue: int = 1, max_tokens_out: int = 2048,
                 max_body_bytes: int = 1 << 20, max_batch: int = 1,
                 link: bool = False) -> Iterator[WorkerService]:  # fmt: skip
    """`link`: the service talks to the engine over server.engine_link's pipe, as `--http-process`'s child does
    (both ends in this process here)."""
    engine = Engine(tiny_model(max_batch), max_queue=max_queue, max_tokens_out=max_tokens_out)
    engine.start()
    with linked(engine) if link else nullcontext(engine) as served:
        narrator = Narrator(WORKER_ID, model_path(), None, stream=io.StringIO())
        service = WorkerService(served, narrator, worker_id=WORKER_ID, api_key=api_key, max_body_bytes=max_body_bytes)
        try:
            yield service
        finally:
            served.shutdown(2.0)
            engine.shutdown(2.0)


@contextmanager
def linked(engine: Engine) -> Iterator[RemoteEngine]:
    """`engine` behind an EngineHost, and the RemoteEngine at the pipe's other end."""
    here, there = multiprocessing.Pipe()
    host = EngineHost(engine, here)
    threading.Thread(target=host.serve, daemon=True).start()
    remote = RemoteEngine(there, engine.facts(), engine.tokenizer)
    remote.start()
    try:
        yield remote
    finally:
        remote.close()


@contextmanager
def tiny_client(**service_options) -> Iterator[TestClient]:
    with tiny_service(**service_options) as service, TestClient(create_app(service)) as client:
        yield client


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
