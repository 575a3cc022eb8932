"""End-to-end tests on the real Gemma 3 270M (the embedded default model: the worker starts without --model), on
the CPU: the haiku test (same seed twice, same stream), UTF-8 prompts, /health of the real model, POST /shutdown.
"""

from __future__ import annotations

import time

import pytest

from server.cli import default_cpu_devices
from tests.worker_process import PAYLOAD_KEYS, WorkerProcess, assert_log_sequence

pytestmark = pytest.mark.slow

KV_CACHE_MB = 16
HAIKU = "Write a haiku about GPU computing"


@pytest.fixture(scope="module")
def server():
    w = WorkerProcess(None, "--kv-cache-size-mb", str(KV_CACHE_MB))
    try:
        yield w.wait_ready()
    finally:
        w.stop()


def expected_context() -> int:
    """--kv-cache-size-mb over the bytes one token takes in the CPU's float32 K and V caches. Gemma 3 270M has 18
    layers, 1 KV head and head_dim 256 (google/gemma-3-270m config.json); its context, 32768, is not the limit."""
    per_token = 2 * 18 * 1 * 256 * 4
    return KV_CACHE_MB * (1 << 20) // per_token


def test_health_of_the_embedded_model(server):
    h = server.client.get("/health").json()
    assert h["model"] == "gemma-3-270m-q4_k_m.gguf"
    assert (h["status"], h["resident"], h["device"]) == ("healthy", True, "cpu")
    assert (h["quant_kind"], h["tokenizer_kind"], h["vocab_size"]) == ("Q4_K_M", "gguf-bpe", 262144)
    assert h["context_length"] == expected_context()
    assert h["vram_bytes_used"] > 200_000_000  # ~250 MB of Q4_K_M planes plus the cache
    # The CPU's default head parallelism: a host device a core (at most 2), the vocabulary split over them.
    assert len(h["devices"]) == default_cpu_devices() and all(d["resident"] for d in h["devices"])


def test_haiku_same_seed_twice_gives_the_same_stream(server):
    runs = []
    for n in range(2):
        status, events = server.execute(job_id=f"haiku-{n}", prompt=HAIKU, max_tokens=12, seed=42)
        assert status == 200
        runs.append(events)
    for events in runs:
        names = [name for name, _ in events]
        assert names[0] == "started" and names[-1] == "end" and set(names[1:-1]) <= {"token", "metrics"}
        for name, data in events:
            if name in PAYLOAD_KEYS:
                assert set(data) == PAYLOAD_KEYS[name]
        assert events[0][1]["seed"] == 42 and events[0][1]["model"] == "gemma-3-270m-q4_k_m.gguf"
    tokens = [[d for name, d in events if name == "token"] for events in runs]
    assert tokens[0] == tokens[1] and len(tokens[0]) > 3
    assert runs[0][-1][1]["tokens_out"] == runs[1][-1][1]["tokens_out"]
    text = "".join(d["t"] for d in tokens[0])
    assert text.strip() and "\ufffd" not in text


@pytest.mark.parametrize(
    "prompt",
    [
        "用中文写一首关于图形处理器的短诗：",
        "Describe this: 🚀🔥🎉 and 👩‍💻",
        "Mixed: Привет, 世界, مرحبا, こんにちは — ",
    ],
    ids=["chinese", "emoji", "mixed"],
)
def test_utf8_prompts_stream_valid_text(server, prompt):
    status, events = server.execute(job_id=f"utf8-{time.monotonic_ns()}", prompt=prompt, max_tokens=8, seed=7)
    assert status == 200 and events[-1][0] == "end"
    pieces = [d["t"] for name, d in events if name == "token"]
    assert all(pieces)
    assert "".join(pieces) and "\ufffd" not in "".join(pieces)


def test_shutdown_endpoint_exits_0(server):
    r = server.client.post("/shutdown")
    assert r.status_code == 202 and r.json()["status"] == "shutting_down"
    assert server.proc.wait(60) == 0
    server._reader.join(5)
    assert_log_sequence(server, "haiku-0", "POST /shutdown")
