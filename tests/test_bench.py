"""bench/: the bandwidth floor's byte counts (against gguf-py's reader), llama-bench's JSON, the SSE time to first
token, the markdown report, and a short worker run on a tiny oracle model."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from conftest import oracles_dir
from gguf import GGUFReader

from bench import ab, floor, goldens, llamacpp, load, report, ttft
from worker.gguf import open_gguf
from worker.sampling import TokenLogprobs


def model(arch: str, variant: str):
    return oracles_dir() / "models" / arch / f"model-{variant}.gguf"


def gguf_py_bytes(path) -> dict[str, int]:
    return {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}


def test_dense_tied_model_reads_every_weight_once():
    # qwen2 oracle: no output.weight, so the embedding is the output matrix and is read whole.
    path = model("qwen2", "q4_k_m")
    weights, experts = floor.weight_bytes_per_token(open_gguf(path))
    assert experts == ""
    assert weights == sum(gguf_py_bytes(path).values())


def test_untied_model_gathers_one_embedding_row():
    path = model("phi3", "q4_k_m")
    sizes = gguf_py_bytes(path)
    weights, _ = floor.weight_bytes_per_token(open_gguf(path))
    embd_rows = 1024  # the oracle's vocabulary
    assert weights == sum(sizes.values()) - sizes["token_embd.weight"] + sizes["token_embd.weight"] // embd_rows


def test_moe_model_reads_only_the_active_experts():
    path = model("gpt-oss", "mxfp4_moe")
    sizes = gguf_py_bytes(path)
    weights, experts = floor.weight_bytes_per_token(open_gguf(path))
    assert experts == "2/4"  # the oracle's expert_used_count / expert_count
    expert_bytes = sum(v for k, v in sizes.items() if "_exps." in k)
    dense = sum(v for k, v in sizes.items() if "_exps." not in k)
    # output.weight exists, so token_embd contributes one of its 1024 rows
    assert weights == dense - sizes["token_embd.weight"] + sizes["token_embd.weight"] // 1024 + expert_bytes // 2


def test_kv_bytes_respect_sliding_windows():
    # gemma3 oracle: 2 layers, pattern [sliding, global], window 32, 2 kv heads of 64 (k and v), f16.
    gf = open_gguf(model("gemma3", "q4_k_m"))
    per_position = 2 * (64 + 64) * 2
    assert floor.kv_bytes_per_token(gf, 40, 1) == (32 + 40) * per_position
    assert floor.kv_bytes_per_token(gf, 10, 1) == (10 + 10) * per_position
    # mean over contexts 31, 32, 33: the window caps the sliding layer from 32 on
    assert floor.kv_bytes_per_token(gf, 31, 3) == pytest.approx((31 + 32 + 32 + 31 + 32 + 33) / 3 * per_position)


def test_decode_bytes_counts_the_prompt_and_each_new_token():
    gf = open_gguf(model("qwen2", "q4_k_m"))  # no window: 2 layers x 2 kv heads x (64 + 64) x 2 bytes
    got = floor.decode_bytes(gf, prompt_tokens=10, decode_tokens=4)
    assert got.kv_cache == pytest.approx((11 + 12 + 13 + 14) / 4 * 2 * 2 * 128 * 2)
    assert got.total == got.weights + got.kv_cache


# llama-bench -o json records (fields as llama.cpp 0c1e57098 writes them; numbers shortened)
LLAMA_BENCH_JSON = [
    {"build_commit": "0c1e57098", "build_number": 0, "backends": "CPU", "cpu_info": "Xeon", "gpu_info": "",
     "model_type": "gemma3 270M Q4_K - Medium", "model_size": 241410624, "n_threads": 2, "n_gpu_layers": 0,
     "flash_attn": True, "type_k": "f16", "n_prompt": 512, "n_gen": 0, "avg_ts": 654.3, "stddev_ts": 5.2,
     "samples_ts": [650.0, 660.0]},
    {"build_commit": "0c1e57098", "build_number": 0, "backends": "CPU", "cpu_info": "Xeon", "gpu_info": "",
     "model_type": "gemma3 270M Q4_K - Medium", "model_size": 241410624, "n_threads": 2, "n_gpu_layers": 0,
     "flash_attn": True, "type_k": "f16", "n_prompt": 0, "n_gen": 128, "avg_ts": 71.5, "stddev_ts": 0.4,
     "samples_ts": [71.0, 72.0, 71.5]},
]  # fmt: skip


def test_llama_bench_records_give_prefill_and_decode():
    got = llamacpp.parse(LLAMA_BENCH_JSON, 512, 128)
    assert (got["prefill_tok_s"], got["decode_tok_s"]) == (654.3, 71.5)
    assert got["build_commit"] == "0c1e57098" and got["repetitions"] == 3


def test_llama_bench_output_without_the_decode_test_is_an_error():
    with pytest.raises(ValueError, match="n_gen=128"):
        llamacpp.parse(LLAMA_BENCH_JSON[:1], 512, 128)


def test_llama_bench_command_matches_the_peer_numbers():
    cmd = llamacpp.command("llama-bench", "m.gguf", "gpu", 512, 128, None)
    assert cmd == ["llama-bench", "-m", "m.gguf", "-p", "512", "-n", "128", "-fa", "1", "-o", "json", "-ngl", "99"]
    assert llamacpp.command("b", "m", "cpu", 512, 128, 2)[-4:] == ["-ngl", "0", "-t", "2"]


def sse_client(frames: list[bytes], status: int = 200) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["max_tokens"] == 4
        return httpx.Response(status, content=b"".join(frames), headers={"content-type": "text/event-stream"})

    return httpx.Client(transport=httpx.MockTransport(handler))


def frame(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def test_first_token_reads_the_stream_to_its_end():
    frames = [frame("started", {"job_id": "j"}), frame("token", {"t": "a", "i": 0}), frame("token", {"t": "b", "i": 1})]
    frames.append(frame("end", {"tokens_out": 2, "decode_time_ms": 1, "stop_reason": "max_tokens"}))
    seconds, last = ttft.first_token(sse_client(frames), "http://w", "j", 4)
    assert seconds > 0 and last == "end"


def test_a_stream_without_tokens_is_an_error():
    frames = [frame("started", {}), frame("error", {"code": "VRAM_OOM", "message": "m", "retriable": True})]
    with pytest.raises(RuntimeError, match="last event: error"):
        ttft.first_token(sse_client(frames), "http://w", "j", 4)
    with pytest.raises(RuntimeError, match="503"):
        ttft.first_token(sse_client([], status=503), "http://w", "j", 4)


def result(decode: float, prefill: float, peer: tuple[float, float] | None) -> dict:
    res = {
        "label": "m",
        "file_bytes": 2**30,
        "worker": {"decode_tok_s": decode, "prefill_tok_s": prefill, "floor_decode_tok_s": 400.0,
                   "decode_floor_fraction": decode / 400.0, "load_s": 1.0, "quant_kind": "Q4_K_M",
                   "peak_memory_bytes": 3 * 2**30, "load_host_peak_anon_bytes": 300 * 2**20,
                   "load_host_peak_rss_bytes": 2**31},
        "http": {"ttft_s": 0.0123, "server_ready_s": 9.0},
        "errors": {},
    }  # fmt: skip
    if peer:
        res["llamacpp"] = {
            "decode_tok_s": peer[0],
            "prefill_tok_s": peer[1],
            "build_commit": "0c1e57098",
            "command": "/x/llama-bench -m /m.gguf -p 512 -n 128 -fa 1 -o json -ngl 99",
        }
    return res


def test_report_gives_ratios_and_floor_fractions():
    res = result(200.0, 3000.0, (100.0, 6000.0))
    assert report.ratios(res) == {"decode": 2.0, "prefill": 0.5}
    text = report.markdown([res])
    worker_row, peer_row = (line for line in text.splitlines() if line.startswith("| m "))
    assert "| 2.00× | 0.50× | 50% | 12 ms | 1.0 s (server: 9.0 s) | 300 MiB anon (2.00 GiB with mmap) | 3.00 GiB |" in (
        worker_row
    )
    assert "| llama.cpp | 100.0 | 6,000.0 | 1.00× | 1.00× | 25% |" in peer_row
    assert "llama.cpp commit 0c1e57098: `llama-bench -p 512 -n 128 -fa 1 -o json -ngl 99`." in text


def test_report_says_where_the_servers_start_went():
    res = result(200.0, 3000.0, None)
    res["http"]["server_warm_up"] = {"compile_ms": 7400.0, "lowering_ms": 5250.0}
    assert "| 1.0 s (server: 9.0 s; compiles 7.4 s, lowered by 5.2 s) |" in report.markdown([res])


def test_the_warm_up_is_read_from_the_servers_ready_event(tmp_path):
    log = tmp_path / "server.log"
    assert ttft.warm_up_of(log) is None  # no log
    log.write_text('not json\n{"event": "startup"}\n{"event": "ready", "warm_up": {"programs": 5}}\n')
    assert ttft.warm_up_of(log) == {"programs": 5}


def test_report_tables_the_steps_sweep_from_its_json_keys():
    res = result(200.0, 3000.0, None)
    res["worker"]["decode_tok_s_by_steps"] = {"8": 180.0, "16": 190.0, "64": 200.0}  # as read back from JSON
    lines = report.markdown([res]).splitlines()
    assert "| model | 8 steps | 16 steps | 64 steps | 8 vs 64 |" in lines
    assert "| m | 180.0 | 190.0 | 200.0 | 0.90× |" in lines
    assert not report.steps_lines([result(200.0, 3000.0, None)])  # no sweep, no table


def test_report_without_the_peer_lists_the_failure():
    res = result(200.0, 3000.0, None) | {"errors": {"llamacpp": "FileNotFoundError: llama-bench"}}
    assert report.ratios(res) == {"decode": None, "prefill": None}
    text = report.markdown([res])
    assert "- m: llamacpp: FileNotFoundError: llama-bench" in text
    assert "| llama.cpp |" not in text


def test_prefill_is_timed_over_its_repeats_then_until_its_seconds(monkeypatch):
    """A prefill of 10 ms: 3 repeats at least, then more until 0.095 s in all, at most PREFILL_MAX_RUNS."""
    from bench import worker_bench

    clock = [0.0]
    monkeypatch.setattr(worker_bench.time, "perf_counter", lambda: clock[0])

    class Model:
        def generate_ids(self, ids, max_tokens, stop_at_eos):
            clock[0] += 0.01
            yield 7

    assert len(worker_bench.time_prefill(Model(), [1, 2], repeats=3)) == 3
    assert len(worker_bench.time_prefill(Model(), [1, 2], repeats=3, seconds=0.095)) == 10
    monkeypatch.setattr(worker_bench, "PREFILL_MAX_RUNS", 5)
    assert len(worker_bench.time_prefill(Model(), [1, 2], repeats=3, seconds=0.1)) == 5
    assert len(worker_bench.time_prefill(Model(), [1, 2], repeats=8, seconds=0.1)) == 8


@pytest.mark.slow
def test_worker_bench_on_a_tiny_model():
    from bench import worker_bench

    got = worker_bench.run(str(model("qwen2", "q4_k_m")), "cpu", prompt_tokens=32, decode_tokens=8, repeats=2,
                           sweep=[1, 2])  # fmt: skip
    assert len(got["decode_s"]) == 2 and min(got["decode_s"]) > 0
    assert set(got["decode_tok_s_by_steps"]) == {1, 2} and min(got["decode_tok_s_by_steps"].values()) > 0
    assert got["decode_steps_per_dispatch"] == 1  # the CPU's own count, restored after the sweep
    assert got["decode_tok_s"] == pytest.approx(8 / statistics.median(got["decode_s"]))
    assert got["prefill_tok_s"] > 0 and len(got["prefill_s"]) >= 2
    assert got["peak_memory_bytes"] >= got["weight_bytes"] > 0
    assert got["load_progress_events"] == len(open_gguf(model("qwen2", "q4_k_m")).tensors) + 1  # 0 and one a tensor
    assert 0 < got["load_host_peak_anon_bytes"] <= got["load_host_peak_rss_bytes"]
    assert got["copy_bandwidth_bytes_s"] > 1e8  # any machine copies faster than 100 MB/s
    assert got["floor_decode_tok_s"] == pytest.approx(got["copy_bandwidth_bytes_s"] / got["bytes_per_token"]["total"])


@pytest.mark.slow
def test_time_to_first_token_through_the_real_server(tmp_path):
    got = ttft.measure(str(model("qwen2", "q4_k_m")), "cpu", tmp_path / "server.log", requests=2, ready_timeout=300)
    assert got["server_exit_code"] == 0  # shut down through POST /shutdown
    assert got["terminal_events"] == ["end"]
    assert 0 < got["ttft_first_s"] < 300 and got["ttft_s"] == got["ttft_runs_s"][1]
    assert got["server_ready_s"] > 0
    warm = got["server_warm_up"]  # the ready event's, from the server's log
    assert warm["programs"] >= 3 and 0 < warm["lowering_ms"] < warm["compile_ms"], warm


def test_percentiles_interpolate():
    assert load.percentile([], 0.5) is None
    assert load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert load.percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)


def test_batched_bench_reports_every_count(capsys):
    from bench import batched

    model = oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf"
    batched.main(["--model", str(model), "--seqs", "1,3", "--prompt", "5", "--tokens", "4"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["seqs"] for r in out["results"]] == [1, 3] and all(r["tok_s"] > 0 for r in out["results"])


def test_queued_dispatches_time_each_part_and_advance_the_rows():
    """bench.dispatch's engine-pattern timing on the tiny qwen2: every part is timed and the weights' leaves are
    counted."""
    import worker
    from bench import dispatch

    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=2)
    ids = m.tokenizer.encode(dispatch.PROMPT)
    out = dispatch.queued_dispatches(m, ids, 2, repeats=2)
    assert {"put", "call", "wait", "iteration", "call_preput"} <= out.keys()
    assert all(out[k] >= 0 for k in ("put", "call", "wait", "call_preput")) and out["iteration"] > 0
    assert out["weight_leaves"] == len(jax.tree_util.tree_leaves(m.runner.weights)) > 10


def test_cpu_step_times_every_piece_of_a_tiny_model(capsys):
    """bench.cpu_step end to end on the tiny qwen2 (one call each): every piece it names is timed."""
    from bench import cpu_step

    cpu_step.main(["--model", str(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf"), "--reps", "1",
                   "--prefill", "16"])  # fmt: skip
    out = capsys.readouterr().out
    for piece in ("decode dispatch", "output projection", "layers (1 token)", "sample (greedy)",
                  "sample (temperature 1)", "prefill (16 tokens)"):  # fmt: skip
        assert piece in out, out


def test_trace_summary_counts_only_the_gpu_kernels():
    """bench.trace on a perfetto-shaped trace: the GPU process's complete events by name, the host's left out."""
    from bench import trace

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "name": "PjitFunction", "dur": 900.0},
        {"ph": "X", "pid": 2, "name": "moe_matmul_mxfp4", "dur": 300.0},
        {"ph": "X", "pid": 2, "name": "moe_matmul_mxfp4", "dur": 100.0},
        {"ph": "X", "pid": 2, "name": "fusion_3", "dur": 100.0},
    ]
    kernels = trace.device_kernels({"traceEvents": events})
    assert kernels == {"moe_matmul_mxfp4": [300.0, 100.0], "fusion_3": [100.0]}
    lines = trace.summary(kernels, top=5)
    assert lines[0] == "all kernels: 0.50 ms in 3 launches"
    assert lines[1].split()[:4] == ["0.400", "ms", "80.0%", "2x"] and lines[1].endswith("moe_matmul_mxfp4")


def test_trace_names_where_each_xla_fusion_came_from():
    """bench.trace --hlo: an optimized HLO module's text (the stack-frame tables of XLA's dumps, and an older dump's
    source_file / source_line) gives each fusion's kernel (its name with '.' as '_') the op and the Python line."""
    from bench import trace

    hlo = "\n".join([
        "HloModule jit__decode, is_scheduled=true", "", "FileNames", '1 "/work/main/worker/ops.py"', "",
        "FunctionNames", '1 "rms_norm"', "", "FileLocations",
        "1 {file_name_id=1 function_name_id=1 line=42 end_line=42 column=5 end_column=9}", "", "StackFrames",
        "1 {file_location_id=1 parent_frame_id=1}", "",
        "%fused_computation.96 (p: f32[2,8]) -> f32[2,8] {",
        '  ROOT %add.3 = f32[2,8]{1,0} add(%p, %p), metadata={op_name="jit(_decode)/while/body/add"}', "}", "",
        "ENTRY %main (x: f32[2,8]) -> f32[2,8] {",
        "  %loop_add_fusion.96 = f32[2,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation.96, "
        'metadata={op_name="jit(_decode)/while/body/rms_norm/add" stack_frame_id=1}',
        "  ROOT %input-scatter-fusion.2 = f32[2,8]{1,0} fusion(%x), kind=kInput, "
        'metadata={op_name="jit(_decode)/scatter" source_file="/w/worker/kv_cache.py" source_line=77}', "}",
    ])  # fmt: skip
    sources = trace.hlo_sources(hlo)
    assert sources["loop_add_fusion_96"] == ("rms_norm/add", "ops.py:42 rms_norm")
    assert sources["input_scatter_fusion_2"] == ("jit(_decode)/scatter", "kv_cache.py:77")
    assert sources["add_3"] == ("body/add", None)
    lines = trace.summary({"loop_add_fusion_96": [30.0], "qmatvec_q8_0": [70.0]}, 5, sources)
    assert lines[1].endswith("qmatvec_q8_0")
    assert lines[2].endswith("loop_add_fusion_96  <- rms_norm/add (ops.py:42 rms_norm)")
    kernels = {"loop_add_fusion_96": [30.0, 30.0], "add_3": [5.0], "input_scatter_fusion_2": [1.0], "qmatvec": [9.0]}
    lines = trace.by_source(kernels, sources, 5)
    assert lines[0] == "XLA's kernels by line: 0.07 ms in 4 launches"
    assert lines[1].split() == ["0.060", "ms", "2x", "ops.py:42", "rms_norm"]
    assert lines[2].split() == ["0.005", "ms", "1x", "body/add"] and lines[3].endswith("1x  kv_cache.py:77")


def test_trace_busy_share_and_host_spans():
    """bench.trace: the device's busy time is the union of its events (overlaps once, gaps out), over the window
    from the first kernel to the last; the host's engine spans are summed by name."""
    from bench import trace

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 2, "name": "a", "ts": 0.0, "dur": 100.0},
        {"ph": "X", "pid": 2, "name": "b", "ts": 50.0, "dur": 100.0},  # overlaps a: 0..150 busy
        {"ph": "X", "pid": 2, "name": "c", "ts": 350.0, "dur": 50.0},  # a 200 us gap before it
        {"ph": "X", "pid": 1, "name": "engine step", "ts": 0.0, "dur": 180.0},
        {"ph": "X", "pid": 1, "name": "engine step", "ts": 200.0, "dur": 220.0},
        {"ph": "X", "pid": 1, "name": "read back", "ts": 10.0, "dur": 40.0},
        {"ph": "X", "pid": 2, "name": "engine step", "ts": 0.0, "dur": 999.0},  # a device event: not a host span
    ]
    t = {"traceEvents": events}
    assert trace.device_busy(t) == (999.0, 999.0)  # the device's "engine step" event spans all
    t = {"traceEvents": events[:-1]}
    assert trace.device_busy(t) == (400.0, 200.0)
    spans = trace.host_spans(t, ("engine step", "read back", "prefill"))
    assert spans == {"engine step": [180.0, 220.0], "read back": [40.0]}
    assert trace.device_gaps(t) == {("b", "c"): [200.0]}  # a and b overlap: no gap between them
    assert trace.gaps_summary(trace.device_gaps(t), 5)[1].endswith("b -> c")


def test_trace_of_the_cpu_sums_each_xla_thread_and_its_waits():
    """bench.trace on a CPU trace: XLA:CPU's program threads (a host device's client thread, a pool thread), each
    event summed by name, the waits at collectives (Rendezvous, which holds `Wait: pending_threads`) and for the
    pool; other threads (the Python thread) left out."""
    from bench import trace

    def thread(tid, name):
        return {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}}

    def event(tid, name, ts, dur):
        return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}

    events = [
        thread(1, "python"), thread(2, "tf_XLAPjRtCpuClient/123"), thread(3, "tf_XLAEigen/456"),
        event(1, "decode dispatch", 0.0, 5000.0),
        event(2, "ffi_call.7", 0.0, 3000.0), event(2, "Rendezvous", 3000.0, 800.0),
        event(2, "Wait: pending_threads=1/2", 3100.0, 600.0), event(2, "Rendezvous", 4000.0, 200.0),
        event(2, "ThunkExecutor::Execute (wait for completion)", 4300.0, 500.0),
        event(3, "ffi_call.8", 0.0, 900.0),
    ]  # fmt: skip
    threads = trace.cpu_threads({"traceEvents": events})
    assert set(threads) == {"tf_XLAPjRtCpuClient/123", "tf_XLAEigen/456"}
    assert threads["tf_XLAPjRtCpuClient/123"]["Rendezvous"] == [800.0, 200.0]
    lines = trace.cpu_summary(threads, top=2)
    assert lines[0].startswith("tf_XLAPjRtCpuClient/123: waits 1.50 ms")  # 0.8 + 0.2 + 0.5, the nested wait once
    assert lines[1].split()[:3] == ["3.000", "ms", "1x"] and len(lines) == 5
    assert lines[3].startswith("tf_XLAEigen/456: waits 0.00 ms")


def test_host_bench_runs_every_stream_to_its_tokens_over_free_steps(capsys):
    # bench.host replaces the model's steps with free ones: every stream must still get exactly its tokens (the
    # bench exits with an error otherwise) and the engine's CPU a token is reported.
    import sys

    from bench import host

    path = str(oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf")
    before = sys.getswitchinterval()
    try:
        assert host.main(["--model", path, "--streams", "4", "--tokens", "6", "--rounds", "1", "--switch-ms", "2"]) == 0
        assert sys.getswitchinterval() == pytest.approx(0.002)  # --switch-ms sets Python's thread switch interval
    finally:
        sys.setswitchinterval(before)
    out = capsys.readouterr().out
    assert "4 streams x 6 tokens" in out and "µs/token" in out


def test_host_bench_real_engine_reports_the_workers_rate_and_decode_ms(capsys):
    # --real: the engine worker-orcd would serve (its option parser and warm-up, --worker-arg passed on) over the
    # model's own steps; a real model's greedy text may end early, so the round counts what came back.
    from bench import host

    path = str(oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf")
    argv = ["--model", path, "--streams", "2", "--tokens", "4", "--rounds", "1", "--real"]
    assert host.main([*argv, "--worker-arg=--device=cpu", "--worker-arg=--dispatch-ms=40"]) == 0
    out = capsys.readouterr().out
    assert "2 streams x 4 tokens" in out and "ms/token p50" in out


class _FakeGemma:
    """A model whose logits at step s are `table[s]` (a [V] row), whatever the prefix: enough for bench.goldens,
    which compares a decode's and a teacher-forced prefill's top-five gaps with the oracle's."""

    def __init__(self, table, decode_shift=0.0):
        self.table, self.decode_shift = np.asarray(table, np.float32), decode_shift

    def generate_ids(self, ids, steps, params, seed, stop_at_eos, logprobs):
        for s in range(steps):
            row = self.table[s] + self.decode_shift * (np.arange(self.table.shape[1]) == 1)
            lp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
            order = np.argsort(-lp)
            logprobs.append(TokenLogprobs(float(lp[order[0]]), tuple((int(i), float(lp[i])) for i in order)))
            yield int(order[0])

    def logits(self, ids):
        n = len(ids)
        return np.concatenate([np.zeros((n - goldens.STEPS, self.table.shape[1]), np.float32), self.table])


def _oracle_prompt(table, margins):
    """exact_math.json's shape: greedy ids, margins and the top five of each step."""
    top = [np.argsort(-row)[:5] for row in table]
    return {"name": "p", "greedy_exact": {"ids": [int(t[0]) for t in top], "margins": margins,
            "per_step_top5": [{"ids": [int(i) for i in t], "values": [float(row[i]) for i in t]}
                              for t, row in zip(top, table, strict=True)]}}  # fmt: skip


def test_goldens_finds_where_the_decode_leaves_exact_math():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(goldens.STEPS, 16)).astype(np.float32) * 4
    table[:, 0] += 20  # id 0 leads every step by a clear margin...
    table[7, 1] = table[7, 0] + 0.01  # ...but at step 7, where id 1 leads by 0.01
    margins = [1.0] * goldens.STEPS
    margins[7] = 0.01
    prompt, gold = _oracle_prompt(table, margins), {"p": {"ids": [3, 4]}}
    exact = goldens.check(_FakeGemma(table), prompt, gold, margin=0.005)
    assert exact["diverged_at"] is None and exact["compared_steps"] == goldens.STEPS
    assert exact["decode_gap_err_max"] < 1e-4 and exact["prefill_gap_err_max"] < 1e-4
    assert exact["prefill_argmax_differs_at"] == []
    # id 1 raised by 0.05 in the decode: its gaps are 0.05 off, and at step 7 the decode no longer picks id 1...
    off = goldens.check(_FakeGemma(table, decode_shift=-0.05), prompt, gold, margin=0.005)
    assert off["diverged_at"] == 7 and off["at_divergence"]["ours"] == 0 and off["at_divergence"]["exact"] == 1
    assert off["decode_gap_err_max"] == pytest.approx(0.05, abs=1e-4) and off["prefill_gap_err_max"] < 1e-4
    # ...which is not compared when the margin there is below the threshold; the decode's gaps stop there all the
    # same (past it, the oracle's top five are another sequence's)
    low = goldens.check(_FakeGemma(table, -0.05), prompt, gold, margin=0.05)
    assert low["diverged_at"] is None and low["compared_steps"] == 7 and len(low["decode_gap_err"]) == 7
    assert len(low["prefill_gap_err"]) == goldens.STEPS


def test_kernel_bench_times_at_least_min_matvecs_a_call_and_a_twin_once(monkeypatch):
    # bench.kernels.per_call: enough matvecs a call that the device's work, not the host's argument handling,
    # sets the time; each pass on its own x (XLA would otherwise compute one product once); the twin in one pass.
    from bench import kernels

    calls = []

    def op(x, w):
        calls.append(x)  # traced once a call site: the count is the call's matvecs
        return x @ w

    monkeypatch.setattr(kernels, "timed", lambda fn, *args, repeat: (fn(*args), 1.0)[1])
    x, ws = np.ones((1, 4), np.float32), [np.eye(4, dtype=np.float32)] * 3
    assert kernels.per_call(op, ws, x, None, repeat=1) == 1.0 / (3 * -(-kernels.MIN_MATVECS // 3))
    assert len(calls) == 3 * -(-kernels.MIN_MATVECS // 3) >= kernels.MIN_MATVECS
    calls.clear()
    assert kernels.per_call(op, ws, x, None, repeat=1, passes=1) == 1.0 / 3
    assert len(calls) == 3


def test_kernel_bench_at_two_rows_times_one_live_row_on_both_per_row_kernels(monkeypatch, capsys):
    # one stream's bucket (2 rows, runner.MIN_ROWS) with its padding row dead: the skip's own column, float and
    # int8 x (interpret mode: a check that each call runs, not a time)
    from bench import kernels

    seen = []
    real = kernels.per_call
    monkeypatch.setattr(kernels, "per_call", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    monkeypatch.setattr("sys.argv", ["bench.kernels", "--smoke", "--rows", "2", "--prefill", "0"])
    kernels.main()
    out = capsys.readouterr().out
    assert "one live row: per-row" in out and "(unrolled" in out  # the int8-x kernel with its K loop written out
    assert any(k.get("unroll") and k.get("int8_x") for k in seen)
    live = [k for k in seen if k.get("live") is not None]
    assert [bool(k.get("int8_x")) for k in live] == [False, True]
    assert all(k["live"].tolist() == [True, False] and k["tensor_cores"] is False for k in live)
    assert "swapped" in out and any(k.get("swap") for k in seen)  # the swapped tensor-core dot's column


def test_kernels_no_int8_keeps_the_float_kernels_and_drops_every_int8_compile(capsys, monkeypatch):
    from bench import kernels

    seen = []
    real = kernels.per_call
    monkeypatch.setattr(kernels, "per_call", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    monkeypatch.setattr("sys.argv", ["bench.kernels", "--smoke", "--rows", "2", "--prefill", "0", "--no-int8"])
    kernels.main()
    out = capsys.readouterr().out
    assert "swapped" in out and "per-row" in out and "int8" not in out and "one live row" not in out
    assert seen and not any(k.get("int8_x") or k.get("live") is not None for k in seen)
    assert any(k.get("swap") for k in seen) and any(k.get("tensor_cores") is False for k in seen)


def test_kernels_decode_moe_smoke_times_the_swapped_grouped_matmul(capsys, monkeypatch):
    # with --sweep-kernel swapped: the stored experts' launch settings (the same bits in interpret mode, which ignores
    # them), then two and four K splits
    from bench import kernels

    monkeypatch.setattr(kernels, "SWEEP_SWAPPED", [dict(num_stages=2)])
    monkeypatch.setattr("sys.argv", ["bench.kernels", "--smoke", "--decode-moe", "--rows", "2", "--prefill", "0",
                                     "--sweep", "--sweep-kernel", "swapped"])  # fmt: skip
    kernels.main()
    out = capsys.readouterr().out
    assert "swapped: in registers" in out and "(block_m 16)" in out
    lines = [line for line in out.splitlines() if line.startswith("    swapped, in registers")]
    assert len(lines) == 3 and "{'num_stages': 2} (same bits)" in lines[0]
    assert "{'splits': 2}" in lines[1] and "{'splits': 4}" in lines[2]  # K splits: their bits may differ


def test_kernels_swapped_sweep_times_each_launch_setting_and_says_whether_it_keeps_the_bits(capsys, monkeypatch):
    # --sweep-kernel swapped: warps and stages only, dense and the grouped matmul's stored experts; interpret mode
    # ignores both settings, so every line must say its bits are the default's (two of the settings: each compiles)
    from bench import kernels

    monkeypatch.setattr(kernels, "SWEEP_SWAPPED", [dict(num_stages=3), dict(num_warps=8)])

    argv = ["bench.kernels", "--smoke", "--rows", "2", "--prefill", "0", "--no-int8", "--sweep", "--sweep-kernel",
            "swapped"]  # fmt: skip
    monkeypatch.setattr("sys.argv", [*argv, "--only", "Q4_K"])  # the dense case alone
    kernels.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    swapped ")]
    assert len(lines) == len(kernels.SWEEP_SWAPPED) and all("(same bits)" in line for line in lines)
    assert "{'num_stages': 3}" in lines[0] and "{'num_warps': 8}" in lines[1]


def test_kernel_profile_names_one_case_and_reads_the_programs_top_level():
    from bench import kernel_profile

    hlo = (
        "HloModule m\n\n%fused (p: f32[4]) -> f32[4] {\n  %a = f32[4] add(p, p)\n}\n\n"
        "ENTRY %main (x: f32[4]) -> f32[4] {\n  %x = f32[4] parameter(0)\n  %c = f32[4] custom-call(%x)\n"
        "  ROOT %f = f32[4] fusion(%c), calls=%fused\n}\n"
    )
    top = kernel_profile.entry_computation(hlo)
    assert "custom-call(" in top and "fusion(" in top and "add(" not in top
    with pytest.raises(SystemExit, match="2 cases"):
        kernel_profile.selected_cases("qwen2.5-0.5b down")
    assert [c[1].name for c in kernel_profile.selected_cases("qwen2.5-0.5b down:Q6_K, phi3 qkv")] == ["Q6_K", "Q4_K"]


def test_kernel_profiles_expert_variant_is_the_grouped_call_decode_makes(monkeypatch):
    """bench.kernel_profile --experts profiles first what a decode step calls: the grouped matmul with ops.moe_matmul's
    decode tiles (seen by a spy on a small MXFP4 call); a --cases label of none of bench.kernels.MOE is refused."""
    import jax.numpy as jnp
    from gguf import GGMLQuantizationType as QT
    from test_pallas_qmatvec import random_weight

    from bench import kernel_profile
    from worker import ops
    from worker.pallas_kernels import moe_matmul as mm

    kernel, tiles = next(iter(kernel_profile.expert_variants(QT.MXFP4, 2, 4).values()))
    seen = []
    real = mm.moe_matmul
    monkeypatch.setattr(mm, "moe_matmul", lambda x, w, *a, **k: (seen.append(k), real(x, w, *a, **k))[1])
    experts = random_weight(QT.MXFP4, (4, 32, 64), 0)[0]
    with ops.decode_kernels("tensor-cores"):
        ops.moe_matmul(jnp.ones((1, 64)), experts, jnp.asarray([[0, 2]]), backend="interpret", per_token=True)
    assert kernel is real and {k: v for k, v in seen[0].items() if k != "interpret"} == tiles
    with pytest.raises(SystemExit, match="none of bench.kernels.MOE"):
        kernel_profile.expert_calls("gpt-oss qkv", 1, interpret=True)


def test_kernel_profiles_layered_trace_calls_each_kernel_on_one_array_then_on_several(tmp_path, capsys, monkeypatch):
    """bench.kernel_profile --experts --trace (layered_traces): each kernel called `layers` times in one program, on
    one expert array with one routing, then on as many arrays each with its own routing (a small MXFP4 case in
    interpret mode; the CPU's trace has no GPU kernels to name)."""
    from gguf import GGMLQuantizationType as QT

    from bench import kernel_profile

    timed = []  # each way's (arrays, routings) as the program is timed
    real = kernel_profile.timed
    monkeypatch.setattr(kernel_profile, "timed", lambda fn, ws, x, ids, **k: (timed.append((ws, ids)),
                                                                            real(fn, ws, x, ids, **k))[1])  # fmt: skip
    kernel_profile.layered_traces([("tiny", QT.MXFP4, 4, 32, 64, 2)], 1, str(tmp_path), interpret=True, layers=3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0].split(" tokens=1 ")[1] for line in lines] == [
        f"{kernel}, {way}" for kernel in ("grouped, decode's", "routed matvec")
        for way in ("one array, one routing", "3 arrays, 3 routings")
    ]  # fmt: skip

    def buffers(ws):
        return {next(iter(w.planes.values())).unsafe_buffer_pointer() for w in ws}

    def routings(ids):
        return {tuple(map(tuple, r.tolist())) for r in ids}

    (one, one_ids), (several, several_ids) = timed[:2]
    assert len(one) == len(several) == 3
    assert len(buffers(one)) == 1 and len(routings(one_ids)) == 1
    assert len(buffers(several)) == 3 and len(routings(several_ids)) > 1


@pytest.fixture
def sass(monkeypatch):
    """tools/kernel_sass.py, a script, imported as a module."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "kernel_sass.py"
    spec = importlib.util.spec_from_file_location("kernel_sass", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kernel_sass", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_kernel_sass_finds_the_main_loop_of_a_disassembly(sass):
    # tools/kernel_sass.py reads cuobjdump's SASS: the predicate guard is not the opcode, the trailing NOPs are
    # dropped, and the main loop is the innermost backward branch's range
    text = "\n".join(
        f"        /*{a:04x}*/                   {ins} ;   /* 0x0 */"
        for a, ins in [
            (0x00, "MOV R1, c[0x0][0x28]"),
            (0x10, "LDG.E R2, desc[UR4][R4.64]"),  # the loop starts here
            (0x20, "FMUL R3, R2, R2"),
            (0x30, "@!P0 FADD R5, R5, R3"),
            (0x40, "@P1 BRA `(.L_x_1)"),  # forward: not a loop
            (0x50, "@P0 BRA 0x10"),  # backward, to 0x10
            (0x60, "EXIT"),
            (0x70, "NOP"),
        ]
    )
    ins = sass.instructions(text)
    assert [op for _, op, _ in ins] == ["MOV", "LDG", "FMUL", "FADD", "BRA", "BRA", "EXIT"]
    (first, last), loops = sass.main_loop(ins)
    assert (first, last, loops) == (1, 5, 1)


def test_the_swapped_dots_lower_to_triton_for_cuda_with_the_weight_on_the_left(sass):
    """Plan.swap's kernels (qmatvec, and the grouped MoE matmul on decode's bf16 copy) as the card gets them, lowered
    for CUDA with no GPU (tools/kernel_sass.py's capture of Pallas' Triton IR): the dot takes the dequantized weight
    tile [64, K] on its left and x's row tile [K, 16] on its right (the sums [64 columns, 16 rows]).
    (Compiled to SASS with a pip triton on 2026-12-07: HGMMA.64x16x16 with its left operand in registers at one row,
    64x64x16 at 64; the unswapped dot's 16-row tile was HMMA.16816, another instruction.)"""
    dense = "qmatvec Q8_0 256x256 tensor_cores=True swap=True"
    grouped = "moe_matmul BF16 4x128x256 rows=2 k=2 chunk=2 swap=True block_m=16 block_n=64"
    for expr, row_tile in ((f"{dense} rows=1", 16), (f"{dense} rows=40", 64), (grouped, 16)):
        (kernel,), plan, _ = sass.qmatvec_call(expr)
        assert plan.swap and plan.block_n == 64, expr
        # the unswapped dot's sums are [64 rows, 32 columns] whatever the rows
        dots = re.findall(r"tt\.dot [^\n]*", kernel.ttir)
        assert dots and all(f"-> tensor<64x{row_tile}xf32>" in d for d in dots), (expr, dots)


def test_the_ptx_tiles_lower_to_triton_for_cuda_with_their_asm(sass):
    """Plan.ptx's kernels (WORKER_DENSE_PTX) for every format that has them, lowered for CUDA with no GPU (the asm's
    Python side, which interpret mode does not run): each part's tile made by its inline asm, four values an
    invocation. (Compiled to SASS with a pip triton on 2026-12-08: docs/kernels.md's table.)"""
    from gguf import GGMLQuantizationType as QT

    from worker.pallas_kernels import qmatvec as qmv

    for qtype in sorted(qmv.PTX_TYPES, key=lambda t: t.name):
        k = 2 * qmv.FORMATS[qtype].sb
        (kernel,), plan, _ = sass.qmatvec_call(
            f"qmatvec {qtype.name} 128x{k} rows=1 tensor_cores=True swap=True ptx=True"
        )
        assert plan.ptx, qtype
        asms = re.findall(r"tt\.elementwise_inline_asm [^\n]*", kernel.ttir)
        parts = len(qmv.parts_layout(qtype)[0])
        assert len(asms) == parts and all("packed_element = 4" in a for a in asms), (qtype.name, asms[:1])
        want = "mul.rn.f16x2" if qtype == QT.Q8_0 else "fma.rn.f16x2"
        assert all(want in a for a in asms), qtype.name


def test_int8_x_reaches_the_worker_and_its_server(tmp_path):
    """`python -m bench --int8-x`: both worker parts run with it; on the CPU each records the worker's refusal."""
    from bench.__main__ import main

    assert main(["--device", "cpu", "--int8-x", "--model", str(model("qwen2", "q8_0")), "--label", "tiny",
                 "--out", str(tmp_path), "--requests", "1", "--timeout", "120"]) == 0  # fmt: skip
    errors = json.loads((tmp_path / "tiny-cpu.json").read_text())["errors"]
    assert "--int8-x" in errors["worker"] and "--int8-x" in errors["http"], errors


def test_ab_table_takes_each_variants_runs_in_round_order(tmp_path):
    def run(variant: int, rnd: int, tok_s: float, model: str = "m"):
        result = {"device": {"kind": "H100"}, "decode_tok_s": tok_s, "prefill_tok_s": 10 * tok_s,
                  "decode_s": [1.0, 1.1, 1.05]}  # fmt: skip
        (tmp_path / f"{model}-v{variant}-r{rnd}.json").write_text(json.dumps(result))

    run(0, 1, 100.0), run(1, 1, 90.0), run(1, 2, 110.0), run(0, 2, 104.0), run(0, 10, 102.0)
    run(0, 1, 5.0, model="other")  # another model's run, and a variant past the list, are not read
    run(2, 1, 5.0)
    runs = ab.collect(tmp_path, "m", 2)
    assert [[r["decode_tok_s"] for r in v] for v in runs] == [[100.0, 104.0, 102.0], [90.0, 110.0]]
    text, rows = ab.table("m", ["A=1", "A=0"], runs)
    assert [r["decode_median"] for r in rows] == [102.0, 100.0]
    assert rows[1]["vs_first"] == pytest.approx(100.0 / 102.0)
    assert "| A=0 | 90.0 (1.100), 110.0 (1.100) | 100.0 | 1000.0 | 0.980× |" in text
    assert "(H100)" in text


def test_an_ab_tree_of_a_commit_is_the_code_a_worker_tree_run_imports(tmp_path):
    """tools/ab-tree.sh REV copies REV's code under .ab/REV; tools/gpu-env.sh with WORKER_TREE (and PYTHONSAFEPATH)
    imports the worker from there, not from the checkout (an A/B of code against its base in one GPU call)."""
    repo = Path(__file__).resolve().parent.parent
    made = subprocess.run(["bash", "tools/ab-tree.sh", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    tree = repo / ".ab" / "HEAD"
    try:
        assert str(tree) in made.stdout and (tree / "worker" / "ops.py").is_file()
        env = os.environ | {"WORKER_TREE": str(tree), "PYTHONSAFEPATH": "1", "WORKER_WHEELS": "none"}
        show = [sys.executable, "-c", "import worker; print(worker.__file__)"]
        where = subprocess.run(["bash", "tools/gpu-env.sh", *show], cwd=repo, env=env, capture_output=True, text=True,
                               check=True)  # fmt: skip
        assert where.stdout.strip() == str(tree / "worker" / "__init__.py")
    finally:
        shutil.rmtree(tree)
