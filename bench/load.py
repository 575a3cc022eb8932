"""Many users at once: `python -m bench.load --model FILE --device cpu|gpu [--llamacpp DIR]` (or `just bench load ...`).

Per concurrency level N (default 1, 8, 32, 64, and 128 for a model of at most 1B parameters) and per prompt set
(`fixed`: every prompt 128 tokens; `mixed`: 32..1024 tokens), N clients send one greedy request each at once and
read its SSE stream; per round: aggregate output tok/s (output tokens of every stream over the round's wall time),
TTFT p50/p99 (send to the first token) and inter-token latency p50/p99 (gaps between a stream's tokens, all
streams pooled). Before each level a short warm-up round of N streams (8 output tokens) runs untimed, so compiles
of that batch shape and prompt lengths and a cold server stay out of the figures.

Engines, each on its own, one after the other (--engines): `llama-batched-bench` (its own timing, no HTTP: it has
no TTFT or inter-token figures), llama.cpp's `llama-server -np N --cont-batching` (one server per level, POST
/completion with `stream: true`) and the worker (`python -m server.cli`, one server for every level, POST /execute),
the last two driven by the same client. Writes load-<label>-<device>.json and .md under --out (also when stopped).

The client runs in --client-procs processes (each its own asyncio loop over a share of the N streams, all
starting at one instant) so that the client's own per-token parsing does not cap what a fast engine can show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import llamacpp
from bench.ttft import start_server, stop
from worker.cores import usable_cores
from worker.pallas_kernels.qmatvec import MAX_BATCH

FIXED_PROMPT_TOKENS = 128
# The mixed set: stream i gets MIXED_PROMPT_TOKENS[i % 6] prompt tokens (short and long interleaved, so every N
# >= 6 holds each length).
MIXED_PROMPT_TOKENS = (32, 1024, 64, 512, 128, 256)
WARMUP_TOKENS = 8
SMALL_MODEL_PARAMS = 1_000_000_000  # models up to this many parameters also run N = 128

# A neutral English paragraph, repeated to reach the prompt length; each stream starts at another word, so no two
# prompts share a prefix (a prefix cache would otherwise skip prefill work the bench means to measure).
PARAGRAPH = (
    "The river runs past the old mill and under the stone bridge, where the town keeps its market on Saturdays. "
    "Farmers bring apples, cheese and bread, and the children watch the boats go by. "
)


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


# --- prompts ---------------------------------------------------------------------------------------------------


def prompts(model: str, lengths: list[int]) -> list[str]:
    """One prompt per entry of `lengths`, each that many tokens by the model's own tokenizer (BOS included where the
    file adds one), each starting at a different word of the paragraph. Both engines tokenize the same file, so
    they see the same token counts; the rows report the count the engine itself saw."""
    from worker.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    words = PARAGRAPH.split()
    out = []
    for i, n in enumerate(lengths):
        text = " ".join(words[(i + k) % len(words)] for k in range(2 * n + 8))  # well over one word per token
        ids = tok.encode(text, add_bos=False)[: n - (1 if tok.add_bos else 0)]
        out.append(tok.decode(ids))
    return out


# --- the client: one parser per protocol, fed line by line --------------------------------------------------------


@dataclass
class StreamResult:
    """What one stream saw: token arrival times, the engine's own counts, and its error if any."""

    sent: float
    stamps: list[float] = field(default_factory=list)
    tokens_out: int | None = None  # the engine's count of generated tokens (worker: `end`; llama-server: final chunk)
    prompt_tokens: int | None = None
    error: str | None = None

    def summary(self) -> dict:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        ttft = self.stamps[0] - self.sent if self.stamps else None
        tokens = self.tokens_out if self.tokens_out is not None else len(self.stamps)
        decode = self.stamps[-1] - self.stamps[0] if len(self.stamps) > 1 else 0.0
        return {
            "ttft_s": ttft,
            "gaps_s": gaps,
            # The tokens after the first over the time from the first to the last: what batch-1 decode tok/s
            # measures (bench/README.md), so that one stream's rate compares with it, its prefill left out.
            "decode_tok_s": (tokens - 1) / decode if decode > 0 and not self.error else None,
            "tokens_out": tokens,
            "token_events": len(self.stamps),
            "prompt_tokens": self.prompt_tokens,
            "error": self.error,
            "end": self.stamps[-1] if self.stamps else None,
        }


class WorkerSSE:
    """The worker's POST /execute stream: `event: token` per generated token, then `metrics` (prompt_tokens) and
    `end` (tokens_out), or `error` (code)."""

    def __init__(self, result: StreamResult):
        self.r, self.event = result, None

    def feed(self, line: str, now: float) -> None:
        if line.startswith("event:"):
            self.event = line.split(":", 1)[1].strip()
            if self.event == "token":
                self.r.stamps.append(now)
        elif line.startswith("data:") and self.event in ("metrics", "end", "error"):
            data = json.loads(line[5:])
            if self.event == "metrics":
                self.r.prompt_tokens = data.get("prompt_tokens")
            elif self.event == "end":
                self.r.tokens_out = data.get("tokens_out")
            else:
                self.r.error = str(data.get("code", "error"))


class LlamaServerSSE:
    """llama-server's POST /completion stream (`stream: true`): one `data: {...}` chunk per generated token with
    `"stop": false` and its ids in `tokens` (content may be empty: an incomplete UTF-8 character), then a final
    chunk with `"stop": true` and `timings` (prompt_n, predicted_n); an error after the stream began comes as
    `data: {"error": {...}}` (server-context.cpp), and some endpoints end with `data: [DONE]`."""

    def __init__(self, result: StreamResult):
        self.r = result

    def feed(self, line: str, now: float) -> None:
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            return
        data = json.loads(line[5:])
        if "error" in data:
            err = data["error"]
            self.r.error = str(err.get("type") or err.get("code") or err) if isinstance(err, dict) else str(err)
        elif not data.get("stop"):
            self.r.stamps.extend([now] * len(data.get("tokens", [None])))  # one chunk may carry several ids
        else:
            timings = data.get("timings") or {}
            self.r.tokens_out = timings.get("predicted_n", data.get("tokens_predicted"))
            self.r.prompt_tokens = timings.get("prompt_n", data.get("tokens_evaluated"))


def request(protocol: str, prompt: str, max_tokens: int, seed: int) -> tuple[str, dict]:
    """(path, JSON body) of one greedy request. llama-server ignores EOS (every stream makes max_tokens, the work
    its batched-bench does); the worker has no such switch, so its rows count the tokens it actually made."""
    if protocol == "worker":
        return "/execute", {
            "job_id": f"load-{uuid.uuid4()}",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "seed": seed,
            "temperature": 0.0,
        }
    return "/completion", {
        "prompt": prompt,
        "n_predict": max_tokens,
        "stream": True,
        "cache_prompt": False,
        "temperature": 0.0,
        "seed": seed,
        "ignore_eos": True,
    }


async def one_stream(client: httpx.AsyncClient, url: str, protocol: str, job: tuple[str, int, int], limit: float):
    prompt, max_tokens, seed = job
    path, body = request(protocol, prompt, max_tokens, seed)
    r = StreamResult(sent=time.perf_counter())
    parser = WorkerSSE(r) if protocol == "worker" else LlamaServerSSE(r)
    try:
        async with asyncio.timeout(limit), client.stream("POST", url + path, json=body) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200].decode(errors='replace')}"
                return r.summary()
            async for line in resp.aiter_lines():
                parser.feed(line, time.perf_counter())
    except TimeoutError:
        r.error = f"unfinished after {limit:.0f} s"
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    return r.summary()


async def _streams(url: str, protocol: str, jobs: list[tuple[str, int, int]], start_at: float, limit: float):
    timeout = httpx.Timeout(None, connect=30)
    limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        return await asyncio.gather(*(one_stream(client, url, protocol, job, limit) for job in jobs))


def client_share(url: str, protocol: str, jobs: list[tuple[str, int, int]], start_at: float, limit: float):
    """One client process's streams (runs in a pool process; perf_counter is system-wide on Linux)."""
    return asyncio.run(_streams(url, protocol, jobs, start_at, limit))


def _ready(_: int) -> None:
    time.sleep(0.2)  # long enough that each warm-up task takes a process of its own


def client_pool(procs: int) -> ProcessPoolExecutor:
    """`procs` client processes, started before the first round. Spawned, not forked: this process runs JAX's
    threads (the worker's, in a test), and a fork of a multithreaded process can deadlock in the child (Python
    warned so in CI). A spawned process imports this module first (~2 s), so the processes are started and waited
    for here, not inside a round's 0.3 s start margin."""
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(_ready, range(procs)))
    return pool


def round_of(pool, procs: int, url: str, protocol: str, texts: list[str], max_tokens: int, limit: float) -> dict:
    """len(texts) streams at once, dealt round-robin over `procs` client processes, each stream given at most
    `limit` seconds; the round's figures."""
    jobs = [(t, max_tokens, i) for i, t in enumerate(texts)]
    start_at = time.perf_counter() + 0.3  # time for every process to have its client ready
    shares = [jobs[k::procs] for k in range(min(procs, len(jobs)))]
    futures = [pool.submit(client_share, url, protocol, share, start_at, limit) for share in shares]
    return figures([r for f in futures for r in f.result()], start_at)


def figures(runs: list[dict], start: float) -> dict:
    ends = [r["end"] for r in runs if r["end"] is not None]
    wall = (max(ends) - start) if ends else None
    tokens = sum(r["tokens_out"] for r in runs if not r["error"])
    ttfts = [r["ttft_s"] for r in runs if r["ttft_s"] is not None]
    gaps = [g for r in runs for g in r["gaps_s"]]
    decode = [r["decode_tok_s"] for r in runs if r.get("decode_tok_s")]
    prompt_tokens = sorted(r["prompt_tokens"] for r in runs if r["prompt_tokens"])
    return {
        "streams": len(runs),
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall if wall else None,
        "tokens_per_stream_min": min((r["tokens_out"] for r in runs), default=None),
        "prompt_tokens_min": prompt_tokens[0] if prompt_tokens else None,
        "prompt_tokens_max": prompt_tokens[-1] if prompt_tokens else None,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p99_s": percentile(gaps, 0.99),
        "stream_decode_tok_s_p50": percentile(decode, 0.5),
        "errors": sorted({r["error"] for r in runs if r["error"]}),
    }


# --- the engines -------------------------------------------------------------------------------------------------


def worker_flags() -> set[str]:
    """The options this checkout's `worker-orcd` takes (from --help), to pass --max-batch only where it exists."""
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True, text=True, timeout=120)
    return {w.strip(",[]") for w in out.stdout.split() if w.startswith("--")}


def worker_server_args(levels: list[int], max_batch: str, flags: set[str]) -> list[str]:
    """--max-queue so that no level's stream is refused; --max-batch (the largest level, at most the MAX_BATCH rows
    the batch-invariant kernels take, or the given number) when the worker has it ("auto"), never with "none" (the
    M0 worker runs one job and queues the rest)."""
    args = ["--max-queue", str(max(levels))]
    if max_batch != "none" and (max_batch != "auto" or "--max-batch" in flags):
        args += ["--max-batch", str(min(max(levels), MAX_BATCH)) if max_batch == "auto" else max_batch]
    return args


@dataclass
class Plan:
    levels: list[int]
    sets: dict[str, list[int]]  # prompt set name -> prompt tokens of stream i (cycled)
    max_tokens: int
    procs: int
    deadline: float

    def limit(self) -> float:
        """A stream's time limit: the time left (at least a minute), so that a hung engine ends the round."""
        return max(60.0, min(3600.0, self.deadline - time.monotonic()))

    def texts(self, model: str) -> dict[str, list[str]]:
        """The prompts of every set for the largest level (a level of N uses the first N)."""
        n = max(self.levels)
        return {name: prompts(model, [lens[i % len(lens)] for i in range(n)]) for name, lens in self.sets.items()}


def warmups(texts: dict[str, list[str]], n: int) -> list[list[str]]:
    """The untimed rounds before a level: its N streams of the first set (the batch shape), then one stream of each
    distinct prompt of the other sets' first 6 (their prompt lengths: an engine that compiles per length does it
    here, not in the timed round)."""
    sets = list(texts.values())
    return [sets[0][:n]] + [s[: len(MIXED_PROMPT_TOKENS)] for s in sets[1:]]


def run_levels(pool, plan: Plan, texts: dict[str, list[str]], url_at, protocol: str, engine: str,
               probe: Callable[[str], dict[str, float]] | None = None,
               ahead: Callable[[], tuple[int, int]] | None = None) -> list[dict]:  # fmt: skip
    """For each level: `url_at(n)` gives a ready server (a context manager), the warm-up rounds, then one timed round
    per prompt set. A level that would start past the deadline is recorded as skipped. `probe(url)`: counters read
    before and after each timed round (the worker's CPU seconds by thread), reported per output token. `ahead()`:
    the worker's compiles ahead begun and ended so far (`compile_ahead_counts`), recorded where one ran during a
    timed round: a stream beside it is slower (docs/PERFORMANCE.md, GPU, thirty-eighth entry)."""
    rows = []
    for n in plan.levels:
        if time.monotonic() > plan.deadline:
            rows += [{"engine": engine, "set": s, "streams": n, "errors": ["skipped: budget"]} for s in plan.sets]
            continue
        try:
            with url_at(n) as url:
                for warm in warmups(texts, n):
                    round_of(pool, plan.procs, url, protocol, warm, WARMUP_TOKENS, plan.limit())
                for name in plan.sets:
                    before, begun = probe(url) if probe else {}, ahead() if ahead else None
                    row = round_of(pool, plan.procs, url, protocol, texts[name][:n], plan.max_tokens, plan.limit())
                    if before and row.get("output_tokens"):
                        after = probe(url)
                        row["host_us_per_token"] = {k: round((after[k] - v) * 1e6 / row["output_tokens"], 1)
                                                    for k, v in before.items() if k in after}  # fmt: skip
                    if begun is not None:
                        (started, ended), now = begun, ahead()
                        if started > ended or now[0] > started:  # one under way at the start, or begun during it
                            row["compiles_ahead"] = {"under_way": started - ended, "begun": now[0] - started,
                                                     "ended": now[1] - ended}  # fmt: skip
                    rows.append({"engine": engine, "set": name} | row)
                    print(f"[load] {engine} {name} N={n}: {fmt_row(rows[-1])}", file=sys.stderr, flush=True)
        except Exception as e:  # recorded; the next level (a fresh llama-server) may still run
            rows.append({"engine": engine, "set": "-", "streams": n, "errors": [f"{type(e).__name__}: {e}"]})
    return rows


def default_levels(model: str) -> list[int]:
    from worker.gguf import open_gguf

    small = open_gguf(model, require_tensors=False).n_params <= SMALL_MODEL_PARAMS
    return [1, 8, 32, 64] + ([128] if small else [])


def worker_part(args, plan: Plan, texts, pool, log: Path, result: dict) -> list[dict]:
    """The worker: one server (started here, or --url) for every level."""
    if args.url:
        return run_levels(pool, plan, texts, lambda n: contextlib.nullcontext(args.url), "worker", "worker",
                          thread_cpu)  # fmt: skip
    extra = worker_server_args(plan.levels, args.max_batch, worker_flags())
    if args.tensor_parallel > 1:
        extra += ["--tensor-parallel", str(args.tensor_parallel)]
    extra += [a for pair in args.worker_arg for a in pair.split(None, 1)]
    result["worker_args"] = extra
    proc, url, result["worker_ready_s"] = start_server(args.model, args.device, log, extra)
    try:
        result["worker_health"] = worker_settings(url)
        return run_levels(pool, plan, texts, lambda n: contextlib.nullcontext(url), "worker", "worker", thread_cpu,
                          lambda: compile_ahead_counts(log))  # fmt: skip
    finally:
        stop(proc, url)


# What the worker chose at start (docs/http.md): the steps of a decode dispatch, the MoE experts' bf16 copy, the pool.
HEALTH_KEYS = ("max_batch", "decode_steps", "bf16_experts", "deterministic", "kv_pages_total", "vram_bytes_used")


def thread_cpu(url: str) -> dict[str, float]:
    """The worker's CPU seconds by thread (engine, event_loop) from /metrics (worker_thread_cpu_seconds); empty for a
    worker without them."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    return {
        s.labels["thread"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "worker_thread_cpu_seconds"
    }


def compile_ahead_counts(log: Path) -> tuple[int, int]:
    """The compiles ahead the worker's log (narration lines) says have begun and ended (compiled, or failed) so far."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0, 0
    ended = text.count('"message": "compiled ahead: ') + text.count('"message": "a compile ahead failed')
    return text.count('"message": "compiling ahead: '), ended


def worker_settings(url: str) -> dict:
    """HEALTH_KEYS from the worker's /health, for the result (those it reports; none from a worker that does not
    answer, which the levels then show)."""
    try:
        h = httpx.get(f"{url}/health", timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {k: h[k] for k in HEALTH_KEYS if k in h}


def llamacpp_server_part(args, plan: Plan, texts, pool, logs: Path, label: str, threads: int) -> list[dict]:
    # Each slot holds the longest prompt of the sets and its output (and a few tokens for BOS and rounding).
    slot_ctx = max(n for lens in plan.sets.values() for n in lens) + plan.max_tokens + 16

    def at(n: int):
        return llamacpp.LlamaServer(
            args.llamacpp / "llama-server",
            args.model,
            args.device,
            n,
            n * slot_ctx,
            threads,
            logs / f"load-{label}-llama-server-np{n}.log",
        )

    return run_levels(pool, plan, texts, at, "llama", "llama-server")


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{1e3 * s:.1f}"


def fmt_row(r: dict) -> str:
    tps = "-" if r.get("output_tok_s") is None else f"{r['output_tok_s']:.1f}"
    return (
        f"{tps} tok/s, TTFT p50/p99 {_ms(r.get('ttft_p50_s'))}/{_ms(r.get('ttft_p99_s'))} ms, "
        f"ITL p50/p99 {_ms(r.get('itl_p50_s'))}/{_ms(r.get('itl_p99_s'))} ms, errors {r['errors'] or '-'}"
    )


def _host(per_token: dict | None) -> str:
    if not per_token or "engine" not in per_token or "event_loop" not in per_token:
        return "-"
    return f"{per_token['engine']:.0f} / {per_token['event_loop']:.0f}"


def markdown(result: dict) -> str:
    """The result as docs/PERFORMANCE.md takes it: one table of the HTTP rounds (both engines, side by side per set
    and N, with the worker / llama-server ratio of output tok/s) and one of llama-batched-bench."""
    lines = [
        f"### {result['label']} ({result['device']}): {result['max_tokens']} output tokens a stream",
        "",
        "| set | N | engine | out tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
        "a stream's decode tok/s, p50 | min tokens/stream | worker / llama-server | host µs/token (engine / loop) "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    peer = {(r["set"], r["streams"]): r.get("output_tok_s") for r in rows if r["engine"] == "llama-server"}
    for r in sorted(rows, key=lambda r: (r["set"], r["streams"], r["engine"] != "worker")):
        tps, ratio = r.get("output_tok_s"), "-"
        if r["engine"] == "worker" and tps and peer.get((r["set"], r["streams"])):
            ratio = f"{tps / peer[(r['set'], r['streams'])]:.2f}"
        cells = [
            r["set"],
            str(r["streams"]),
            r["engine"],
            "-" if tps is None else f"{tps:.1f}",
            _ms(r.get("ttft_p50_s")),
            _ms(r.get("ttft_p99_s")),
            _ms(r.get("itl_p50_s")),
            _ms(r.get("itl_p99_s")),
            "-" if r.get("stream_decode_tok_s_p50") is None else f"{r['stream_decode_tok_s_p50']:.1f}",
            str(r.get("tokens_per_stream_min", "-")),
            ratio,
            _host(r.get("host_us_per_token")),
            "; ".join(r["errors"]) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    sets = ", ".join(f"{k}: {sorted(set(v))} prompt tokens" for k, v in result["sets"].items())
    note = (
        f"Prompt sets: {sets}. Greedy; llama-server ignores EOS, the worker stops at it (min tokens/stream shows it)."
    )
    if "worker_args" in result:
        note += f" Worker server args: `{' '.join(result['worker_args'])}`."
    if result.get("worker_health"):
        note += " Worker at start: " + ", ".join(f"{k} {v}" for k, v in result["worker_health"].items()) + "."
    ahead = [f"{r['set']} N={r['streams']} ({_ahead(r['compiles_ahead'])})" for r in rows if r.get("compiles_ahead")]
    if ahead:
        note += " Programs compiled ahead during a timed round of the worker (its streams slower meanwhile): "
        note += "; ".join(ahead) + "."
    lines += ["", note]
    bb = result.get("batched_bench")
    if bb:
        lines += [
            "",
            f"llama-batched-bench (`{bb['command']}`):",
            "",
            "| N | PP | TG | prefill tok/s | decode tok/s (S_TG) | total tok/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in bb["rows"]:
            lines.append(f"| {r['pl']} | {r['pp']} | {r['tg']} | {r['s_pp']:.1f} | {r['s_tg']:.1f} | {r['s']:.1f} |")
    for engine, err in result["errors"].items():
        lines.append(f"- {engine}: {err}")
    return "\n".join(lines) + "\n"


def _ahead(c: dict[str, int]) -> str:
    return f"{c['under_way']} under way at its start, {c['begun']} begun, {c['ended']} ended"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded Gemma 3 270M)")
    ap.add_argument("--label", default=None, help="row name (default: the file's stem)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--streams", default=None, help="comma-separated levels (default 1,8,32,64, +128 for <= 1B)")
    ap.add_argument("--peer-streams", default=None, help="llama.cpp's levels, where they differ from --streams "
                    "(e.g. the worker alone at a level past llama-server's slots)")  # fmt: skip
    ap.add_argument("--sets", default="fixed,mixed", help="prompt sets: fixed (128 tokens), mixed (32..1024)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engines", default="batched-bench,llama-server,worker", help="run in this order")
    ap.add_argument("--llamacpp", type=Path, help="folder with llama-server and llama-batched-bench")
    ap.add_argument("--threads", type=int, help="llama.cpp threads on the CPU (default: all cores)")
    ap.add_argument(
        "--max-batch",
        default="auto",
        help="worker --max-batch: auto (the largest level, where the worker has the flag), none, or a number",
    )
    ap.add_argument("--url", default=None, help="a running worker instead of starting one")
    ap.add_argument("--tensor-parallel", type=int, default=1, help="the worker's --tensor-parallel (devices)")
    ap.add_argument("--worker-arg", action="append", default=[], metavar="'--OPTION VALUE'",
                    help="another worker option, repeatable (e.g. '--dispatch-ms 50')")  # fmt: skip
    ap.add_argument("--client-procs", type=int, default=min(8, max(1, usable_cores() // 2)))
    ap.add_argument("--budget", type=float, default=None, help="seconds: levels that would start later are skipped")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers are stopped, not orphaned
    if args.model is None:
        import worker

        args.model = worker.default_model_path()
    known = {"fixed": [FIXED_PROMPT_TOKENS], "mixed": list(MIXED_PROMPT_TOKENS)}
    if unknown := set(args.sets.split(",")) - set(known):
        ap.error(f"unknown prompt sets {sorted(unknown)}")
    engines = args.engines.split(",")
    if unknown := set(engines) - {"worker", "llama-server", "batched-bench"}:
        ap.error(f"unknown engines {sorted(unknown)}")
    if set(engines) & {"llama-server", "batched-bench"} and args.llamacpp is None:
        ap.error("llama-server and batched-bench need --llamacpp DIR (tools/llamacpp-build.sh prints it)")
    label = args.label or Path(args.model).stem
    levels = [int(s) for s in args.streams.split(",")] if args.streams else default_levels(args.model)
    peer_levels = [int(s) for s in args.peer_streams.split(",")] if args.peer_streams else levels
    start = time.monotonic()
    deadline = start + (args.budget or float("inf"))
    every = sorted(set(levels) | set(peer_levels))  # the texts cover the largest level of any engine
    plan = Plan(every, {s: known[s] for s in args.sets.split(",")}, args.max_tokens, args.client_procs, deadline)
    texts = plan.texts(args.model)
    threads = args.threads or usable_cores()
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "label": label,
        "file": str(Path(args.model).resolve()),
        "device": args.device,
        "levels": levels,
        "peer_levels": peer_levels,
        "max_tokens": args.max_tokens,
        "sets": plan.sets,
        "client_procs": args.client_procs,
        "rows": [],
        "batched_bench": None,
        "errors": {},
    }
    pool = client_pool(args.client_procs)
    try:
        for i, engine in enumerate(engines):
            # Each engine gets an equal share of the time left: one that hangs does not starve the next, and
            # what a fast one leaves goes to those after it (so the worker, last by default, gets the most).
            share = (deadline - time.monotonic()) / (len(engines) - i)
            own = levels if engine == "worker" else peer_levels
            part = Plan(own, plan.sets, plan.max_tokens, plan.procs, time.monotonic() + share)
            try:
                if engine == "worker":
                    log = logs / f"load-{label}-worker.log"
                    result["rows"] += worker_part(args, part, texts, pool, log, result)
                elif engine == "llama-server":
                    result["rows"] += llamacpp_server_part(args, part, texts, pool, logs, label, threads)
                else:
                    result["batched_bench"] = llamacpp.batched_bench(
                        args.llamacpp / "llama-batched-bench", args.model, args.device, peer_levels,
                        FIXED_PROMPT_TOKENS, args.max_tokens, threads, logs / f"load-{label}-batched-bench.log",
                        min(1800.0, max(10.0, share)),
                    )  # fmt: skip
            except Exception as e:  # recorded; the next engine still runs
                result["errors"][engine] = f"{type(e).__name__}: {e}"
            print(f"[load] {label} {engine} done at {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    finally:  # also when stopped (SIGTERM from a stage's timeout): what was measured is kept
        (args.out / f"load-{label}-{args.device}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"load-{label}-{args.device}.md").write_text(markdown(result))
        pool.shutdown(wait=False, cancel_futures=True)
    print(markdown(result))
    return 1 if result["errors"] or any(r["errors"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
