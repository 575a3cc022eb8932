"""Many SSE streams at once through the app (in process, the tiny qwen2 on the CPU, --max-batch 4): each ends
with its own `end`, a cancel ends only its stream, and /health and /metrics show the batch and the KV pages."""

from __future__ import annotations

import threading

import pytest
from litestar.testing import TestClient

from server.app import create_app
from tests.tiny_worker import tiny_service, wait_until


def events_of(text: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("event:")]


@pytest.mark.parametrize("link", [False, True], ids=["in-process", "engine-link"])
def test_concurrent_streams_end_on_their_own_and_a_cancel_ends_only_its_own(link):
    with tiny_service(max_batch=4, max_queue=8, link=link) as service, TestClient(create_app(service)) as client:
        engine, results = service.engine, {}

        def post(job_id: str, max_tokens: int) -> None:
            body = {"job_id": job_id, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.0}
            results[job_id] = client.post("/execute", json=body).text

        jobs = {f"s{i}": (1000 if i == 0 else 8 + i) for i in range(6)}
        threads = [threading.Thread(target=post, args=item) for item in jobs.items()]
        for t in threads:
            t.start()
        wait_until(lambda: "s0" in engine.running)
        health = client.get("/health").json()
        assert health["max_batch"] == 4 and 1 <= health["running_jobs"] <= 4
        assert health["kv_pages_used"] > 0 and health["kv_pages_used"] + health["kv_pages_free"] == health[
            "kv_pages_total"]  # fmt: skip
        assert client.post("/cancel", json={"job_id": "s0"}).json()["cancelled"] is True
        for t in threads:
            t.join(120)
        assert events_of(results["s0"])[-1] == "error" and "CANCELLED" in results["s0"]
        for job_id in jobs:
            if job_id != "s0":
                assert events_of(results[job_id])[0] == "started" and events_of(results[job_id])[-1] == "end", job_id
        wait_until(lambda: not engine.busy)
        health = client.get("/health").json()
        assert (health["running_jobs"], health["queue_depth"], health["kv_pages_used"]) == (0, 0, 0)
        metrics = client.get("/metrics").text
        count = next(x for x in metrics.splitlines() if x.startswith("worker_batch_size_count"))
        assert float(count.split()[-1]) > 0
        assert 'worker_kv_pages{quant_kind="Q4_K_M",state="free"}' in metrics and "worker_running_jobs" in metrics
