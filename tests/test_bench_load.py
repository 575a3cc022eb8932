"""bench/load.py and its llama.cpp peers: the parsers of llama-batched-bench's table, llama-server's and the worker's
SSE streams (on text recorded from the real binaries, tests/data/bench_load/README.md says how), the round figures,
the server arguments; and (slow) a load run through the real worker on the tiny qwen2."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import oracles_dir

from bench import llamacpp, load

DATA = Path(__file__).parent / "data" / "bench_load"


def feed(parser_cls, text: str) -> load.StreamResult:
    """The recorded stream through a parser, line i arriving at i/10 s."""
    r = load.StreamResult(sent=0.0)
    parser = parser_cls(r)
    for i, line in enumerate(text.splitlines()):
        parser.feed(line, i / 10)
    return r


# --- llama-batched-bench -------------------------------------------------------------------------------------------


def test_batched_bench_table_gives_one_row_per_level():
    rows = llamacpp.parse_batched_bench((DATA / "batched-bench-cpu.txt").read_text())
    assert [r["pl"] for r in rows] == [1, 4]
    assert all(r["pp"] == 128 and r["tg"] == 32 for r in rows)
    # The recorded table's own numbers (see the file): N_KV = B * (PP + TG), and each rate is its tokens over its time.
    for r in rows:
        assert r["n_kv"] == r["pl"] * (r["pp"] + r["tg"])
        assert r["s_pp"] == pytest.approx(r["pl"] * r["pp"] / r["t_pp"], rel=0.01)
        assert r["s_tg"] == pytest.approx(r["pl"] * r["tg"] / r["t_tg"], rel=0.01)
        assert r["s"] == pytest.approx(r["n_kv"] / r["t"], rel=0.01)
    assert rows[0] == {"pp": 128, "tg": 32, "pl": 1, "n_kv": 160, "t_pp": 2.542, "s_pp": 50.35, "t_tg": 22.44,
                       "s_tg": 1.43, "t": 24.982, "s": 6.40}  # fmt: skip


def test_batched_bench_with_another_header_is_an_error():
    text = "| PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s |\n|---|---|---|---|---|---|---|---|---|"
    with pytest.raises(ValueError, match="header"):
        llamacpp.parse_batched_bench(text)


def test_batched_bench_without_a_table_is_an_error():
    with pytest.raises(ValueError, match="no llama-batched-bench table"):
        llamacpp.parse_batched_bench("main: n_kv_max = 1024\nllama_model_load: error loading model\n")


def test_batched_bench_command_holds_the_largest_level():
    cmd = llamacpp.batched_bench_command("bb", "m.gguf", "gpu", [1, 8, 32, 64], 128, 128, 16)
    assert cmd[cmd.index("-c") + 1] == str(64 * 256) and cmd[cmd.index("-npl") + 1] == "1,8,32,64"
    assert cmd[cmd.index("-fa") + 1] == "on" and cmd[-2:] == ["-ngl", "99"] and "-pps" not in cmd
    assert llamacpp.batched_bench_command("bb", "m.gguf", "cpu", [1], 128, 128, 2)[-4:] == ["-ngl", "0", "-t", "2"]


# --- llama-server ----------------------------------------------------------------------------------------------------


def test_llama_server_stream_counts_one_token_a_chunk():
    r = feed(load.LlamaServerSSE, (DATA / "llama-server-completion.sse").read_text())
    assert r.error is None
    assert len(r.stamps) == 16 and r.tokens_out == 16  # n_predict 16 with ignore_eos
    assert r.prompt_tokens == 9  # the recording's timings.prompt_n: <bos> and 8 tokens of text
    summary = r.summary()
    assert summary["tokens_out"] == 16 and len(summary["gaps_s"]) == 15 and summary["ttft_s"] == r.stamps[0]


def test_llama_server_error_after_the_stream_began():
    # The form server-context.cpp sends (format_oai_sse of {"error": <error json>}); not provoked in the recording.
    text = 'data: {"index":0,"content":" a","tokens":[64],"stop":false}\n\n' + (
        'data: {"error":{"code":500,"message":"m","type":"server_error"}}\n\ndata: [DONE]\n'
    )
    r = feed(load.LlamaServerSSE, text)
    assert r.error == "server_error" and len(r.stamps) == 1 and r.tokens_out is None


def test_a_refused_request_is_the_streams_error():
    # The recorded answer of llama-server to a prompt longer than a slot: HTTP 400, a JSON body, no stream.
    body = (DATA / "llama-server-exceed-context.json").read_bytes()

    async def go():
        transport = httpx.MockTransport(lambda req: httpx.Response(400, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await load.one_stream(client, "http://x", "llama", ("p", 16, 0), 10.0)

    got = asyncio.run(go())
    assert got["error"].startswith("HTTP 400: ") and "exceed_context_size_error" in got["error"]
    assert got["tokens_out"] == 0 and got["ttft_s"] is None


def test_llama_server_command_has_slots_and_their_context():
    cmd = llamacpp.server_command("llama-server", "m.gguf", "gpu", 9000, 64, 64 * 1168, 16)
    assert cmd[cmd.index("-np") + 1] == "64" and cmd[cmd.index("-c") + 1] == str(64 * 1168)
    assert "--cont-batching" in cmd and cmd[cmd.index("-fa") + 1] == "on" and cmd[-2:] == ["-ngl", "99"]


def test_requests_are_greedy_and_uncached():
    path, body = load.request("llama", "p", 128, 3)
    assert path == "/completion"
    assert body["stream"] is True and body["cache_prompt"] is False and body["n_predict"] == 128
    assert body["temperature"] == 0.0 and body["ignore_eos"] is True
    path, body = load.request("worker", "p", 128, 3)
    assert path == "/execute" and body["max_tokens"] == 128 and body["temperature"] == 0.0 and body["seed"] == 3


# --- the worker --------------------------------------------------------------------------------------------------


def test_worker_stream_reads_tokens_metrics_and_end():
    r = feed(load.WorkerSSE, (DATA / "worker-execute.sse").read_text())
    assert r.error is None and len(r.stamps) == 6 and r.tokens_out == 6 and r.prompt_tokens == 9
    assert r.stamps[0] == pytest.approx(0.3)  # `event: token` is the recording's 4th line


def test_worker_error_event_is_the_streams_error():
    text = 'event: token\ndata: {"t":"a","i":0}\n\nevent: error\ndata: {"code":"TIMEOUT","message":"m","retriable":1}'
    r = feed(load.WorkerSSE, text)
    assert r.error == "TIMEOUT" and len(r.stamps) == 1 and r.tokens_out is None


def test_worker_gets_max_batch_only_where_it_has_the_flag():
    assert load.worker_server_args([1, 8, 64], "auto", {"--max-queue"}) == ["--max-queue", "64"]
    with_flag = {"--max-queue", "--max-batch"}
    assert load.worker_server_args([1, 8, 64], "auto", with_flag) == ["--max-queue", "64", "--max-batch", "64"]
    assert load.worker_server_args([1, 128], "none", with_flag) == ["--max-queue", "128"]
    assert load.worker_server_args([1, 128], "auto", with_flag) == ["--max-queue", "128", "--max-batch", "128"]
    beyond = 2 * load.MAX_BATCH  # more streams than the invariant kernels take rows: the batch is capped there
    capped = ["--max-queue", str(beyond), "--max-batch", str(load.MAX_BATCH)]
    assert load.worker_server_args([1, beyond], "auto", with_flag) == capped
    assert load.worker_server_args([1, 128], "32", {"--max-queue"}) == ["--max-queue", "128", "--max-batch", "32"]


def test_this_worker_lists_its_flags():
    assert {"--max-queue", "--port", "--device"} <= load.worker_flags()


# --- the figures ---------------------------------------------------------------------------------------------------


def test_round_figures_from_token_times():
    a = load.StreamResult(sent=0.0, stamps=[1.0, 2.0, 3.0], tokens_out=3, prompt_tokens=128).summary()
    b = load.StreamResult(sent=0.0, stamps=[2.0, 4.0], tokens_out=2, prompt_tokens=128).summary()
    got = load.figures([a, b], start=0.0)
    assert got["wall_s"] == 4.0 and got["output_tokens"] == 5 and got["output_tok_s"] == 1.25
    assert got["ttft_p50_s"] == 1.5 and got["ttft_p99_s"] == pytest.approx(1.99)
    assert got["itl_p50_s"] == 1.0 and got["itl_p99_s"] == pytest.approx(1.98)  # gaps 1, 1, 2
    assert got["tokens_per_stream_min"] == 2 and got["errors"] == []
    assert got["stream_decode_tok_s_p50"] == 0.75  # a: 2 tokens after its first in 2 s; b: 1 in 2 s


def test_a_failed_stream_counts_no_tokens_and_is_listed():
    ok = load.StreamResult(sent=0.0, stamps=[1.0, 2.0], tokens_out=2).summary()
    bad = load.StreamResult(sent=0.0, stamps=[1.5], error="HTTP 503: queue full").summary()
    got = load.figures([ok, bad], start=0.0)
    assert got["output_tokens"] == 2 and got["errors"] == ["HTTP 503: queue full"]


def test_warmups_cover_the_batch_and_every_prompt_length():
    texts = {"fixed": [f"f{i}" for i in range(64)], "mixed": [f"m{i}" for i in range(64)]}
    assert load.warmups(texts, 8) == [texts["fixed"][:8], texts["mixed"][:6]]


def test_prompts_have_the_asked_token_counts():
    from worker.tokenizer import load_tokenizer

    path = oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf"
    tok = load_tokenizer(path)
    texts = load.prompts(str(path), [32, 128, 128])
    assert [len(tok.encode(t)) for t in texts] == [32, 128, 128]
    assert texts[1] != texts[2]  # no shared prompt between streams


def test_small_models_also_run_128_streams(monkeypatch):
    path = str(oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf")  # 1.4 M parameters
    assert load.default_levels(path) == [1, 8, 32, 64, 128]
    monkeypatch.setattr(load, "SMALL_MODEL_PARAMS", 1_000_000)
    assert load.default_levels(path) == [1, 8, 32, 64]


def test_markdown_puts_the_engines_side_by_side():
    row = {"set": "fixed", "streams": 64, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "itl_p50_s": 0.01, "itl_p99_s": 0.02,
           "stream_decode_tok_s_p50": 95.25}  # fmt: skip
    result = {
        "label": "m", "device": "gpu", "max_tokens": 128, "sets": {"fixed": [128]}, "worker_args": ["--max-queue", "9"],
        "rows": [row | {"engine": "worker", "output_tok_s": 300.0, "tokens_per_stream_min": 128, "errors": [],
                        "host_us_per_token": {"engine": 41.26, "event_loop": 130.0}},
                 row | {"engine": "llama-server", "output_tok_s": 150.0, "tokens_per_stream_min": 128, "errors": []}],
        "batched_bench": {"command": "llama-batched-bench -npl 64", "rows": [
            {"pl": 64, "pp": 128, "tg": 128, "s_pp": 9000.0, "s_tg": 4000.0, "s": 5000.0}]},
        "errors": {"x": "boom"},
    }  # fmt: skip
    text = load.markdown(result)
    assert "| fixed | 64 | worker | 300.0 | 100.0 | 200.0 | 10.0 | 20.0 | 95.2 | 128 | 2.00 | 41 / 130 | - |" in text
    assert "| fixed | 64 | llama-server | 150.0 |" in text and "| 128 | - | - | - |" in text
    assert "| 64 | 128 | 128 | 9000.0 | 4000.0 | 5000.0 |" in text and "- x: boom" in text


def test_compiles_ahead_are_counted_from_the_workers_log(tmp_path):
    log = tmp_path / "worker.log"
    lines = [{"event": "log", "message": "compiling ahead: decode 2 rows 16 steps greedy 32 pages"},
             {"event": "log", "message": "compiled ahead: decode 2 rows 16 steps greedy 32 pages in 9.1 s"},
             {"event": "log", "message": "compiling ahead: prefill 64 tokens"},
        {"event": "log", "message": "compiling ahead: prefill 128 tokens"},
        {"event": "log", "message": "a compile ahead failed", "exception": "Traceback ..."},
             {"event": "execute_start", "prompt": "compiling ahead: not a log line"}]  # fmt: skip
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert load.compile_ahead_counts(log) == (3, 2)  # a failed one has ended too
    assert load.compile_ahead_counts(tmp_path / "none.log") == (0, 0)


def test_a_timed_round_beside_a_compile_ahead_says_so(monkeypatch):
    """Where a compile ahead was under way at a timed round's start, or began during it, the row records it and the
    table's note names the level; a round with none records nothing."""
    counts = iter([(1, 0), (1, 1), (1, 1), (1, 1)])  # level 1: one under way; level 2: none
    monkeypatch.setattr(load, "round_of", lambda *a: {"streams": len(a[4]), "output_tokens": 8, "errors": []})
    plan = load.Plan(levels=[1, 2], sets={"fixed": [128]}, max_tokens=8, procs=1, deadline=time.monotonic() + 60)
    rows = load.run_levels(None, plan, {"fixed": ["a", "b"]}, lambda n: contextlib.nullcontext("u"), "worker",
                           "worker", ahead=lambda: next(counts))  # fmt: skip
    assert rows[0]["compiles_ahead"] == {"under_way": 1, "begun": 0, "ended": 1} and "compiles_ahead" not in rows[1]
    result = {"label": "m", "device": "gpu", "max_tokens": 8, "sets": {"fixed": [128]}, "errors": {},
              "rows": [r | {"output_tok_s": 1.0, "ttft_p50_s": 0.1} for r in rows]}  # fmt: skip
    assert (
        "during a timed round of the worker (its streams slower meanwhile): fixed N=1 (1 under way at its start, "
        "0 begun, 1 ended)." in load.markdown(result)
    )


# --- through the real server -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_rounds_through_the_real_server(tmp_path):
    """Two levels (1 and 3 concurrent streams) on the tiny qwen2, worker only: every stream ends with its own tokens,
    none is refused, and the worker got --max-batch (this checkout's worker has the flag) and the --worker-arg."""
    path = oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf"
    argv = ["--model", str(path), "--label", "q", "--engines", "worker", "--streams", "1,3", "--sets", "fixed",
            "--max-tokens", "8", "--client-procs", "2", "--out", str(tmp_path),
            "--worker-arg", "--dispatch-ms 50"]  # fmt: skip
    assert load.main(argv) == 0
    got = json.loads((tmp_path / "load-q-cpu.json").read_text())
    assert [r["streams"] for r in got["rows"]] == [1, 3] and got["errors"] == {}
    assert got["worker_args"] == ["--max-queue", "3", "--max-batch", "3", "--dispatch-ms", "50"]
    assert got["worker_health"]["max_batch"] == 3 and got["worker_health"]["decode_steps"] == 1  # the CPU's
    for r in got["rows"]:  # the worker's host CPU a token, by thread, from its /metrics
        assert set(r["host_us_per_token"]) == {"engine", "event_loop"}
        assert r["host_us_per_token"]["engine"] > 0 and r["host_us_per_token"]["event_loop"] > 0
    for r in got["rows"]:
        assert r["errors"] == [] and 0 < r["output_tokens"] <= 8 * r["streams"] and r["output_tok_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] and r["prompt_tokens_min"] == r["prompt_tokens_max"] == 128
    assert got["rows"][1]["itl_p50_s"] is not None
    assert "| fixed | 3 | worker |" in (tmp_path / "load-q-cpu.md").read_text()
