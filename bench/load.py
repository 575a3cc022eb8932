"""Many users at once: `python -m bench.load --model FILE --device cpu|gpu --streams 1,8,32`.

N concurrent clients each stream one POST /execute through the real server (started here, or --url), all sent at
once; per N: aggregate output tok/s (tokens from every `end` event over the wall time of the round), TTFT p50/p99
(send to the first `token` event) and inter-token latency p50/p99 (gaps between a stream's `token` events). The
server gets --max-queue N - 1 so that a worker that runs one job at a time queues the rest instead of answering
503; that is the M0 baseline the batching issue (#17) measures against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx

from bench.ttft import start_server, stop

# A neutral English paragraph, repeated to reach the prompt length (the server reports the token count).
PARAGRAPH = (
    "The river runs past the old mill and under the stone bridge, where the town keeps its market on Saturdays. "
    "Farmers bring apples, cheese and bread, and the children watch the boats go by. "
)


def prompt_of(words: int) -> str:
    text = (PARAGRAPH * (words // len(PARAGRAPH.split()) + 1)).split()
    return " ".join(text[:words])


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, seed: int) -> dict:
    # Greedy: every stream does the same work; an end-of-generation id may still end one before max_tokens.
    body = {"job_id": f"load-{uuid.uuid4()}", "prompt": prompt, "max_tokens": max_tokens, "seed": seed,
            "temperature": 0.0}  # fmt: skip
    sent = time.perf_counter()
    stamps, event, out = [], None, {"error": None, "tokens_out": 0, "prompt_tokens": None}
    async with client.stream("POST", f"{url}/execute", json=body) as r:
        if r.status_code != 200:
            return out | {"error": f"HTTP {r.status_code}", "ttft_s": None, "gaps_s": []}
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
                if event == "token":
                    stamps.append(time.perf_counter())
            elif line.startswith("data:") and event in ("metrics", "end", "error"):
                data = json.loads(line[5:])
                if event == "metrics":  # sent just before `end`
                    out["prompt_tokens"] = data.get("prompt_tokens")
                elif event == "end":
                    out["tokens_out"] = data.get("tokens_out", 0)
                else:
                    out["error"] = data.get("code", "error")
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return out | {"ttft_s": stamps[0] - sent if stamps else None, "gaps_s": gaps}


async def round_of(url: str, streams: int, prompt: str, max_tokens: int) -> dict:
    """`streams` clients at once; the round's figures."""
    timeout = httpx.Timeout(None, connect=10)
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(client, url, prompt, max_tokens, seed=i) for i in range(streams)))
        wall = time.perf_counter() - start
    ttfts = [r["ttft_s"] for r in runs if r["ttft_s"] is not None]
    gaps = [g for r in runs for g in r["gaps_s"]]
    tokens = sum(r["tokens_out"] for r in runs)
    return {
        "streams": streams,
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "prompt_tokens": statistics.median([r["prompt_tokens"] for r in runs if r["prompt_tokens"]] or [0]),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "itl_p50_s": percentile(gaps, 0.5),
        "itl_p99_s": percentile(gaps, 0.99),
        "errors": sorted(r["error"] for r in runs if r["error"]),
    }


def run(model: str | None, device: str, streams: list[int], prompt_words: int, max_tokens: int, url: str | None,
        log: Path, tensor_parallel: int = 1) -> list[dict]:  # fmt: skip
    prompt = prompt_of(prompt_words)
    proc = None
    if url is None:
        queue = ["--max-queue", str(max(streams) - 1 or 1), "--tensor-parallel", str(tensor_parallel)]
        proc, url, _ = start_server(model, device, log, queue)
    try:
        asyncio.run(round_of(url, 1, prompt, max_tokens))  # warm-up: the first request may compile
        return [asyncio.run(round_of(url, n, prompt, max_tokens)) for n in streams]
    finally:
        if proc is not None:
            stop(proc, url)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the server's embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--url", default=None, help="a running worker instead of starting one")
    ap.add_argument("--streams", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--prompt-words", type=int, default=96, help="prompt length in words (~128 tokens)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--log", default="bench-load-server.log")
    ap.add_argument("--tensor-parallel", type=int, default=1, help="the server's --tensor-parallel (devices)")
    args = ap.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    rows = run(args.model, args.device, streams, args.prompt_words, args.max_tokens, args.url, Path(args.log),
               args.tensor_parallel)  # fmt: skip
    print("streams  out tok/s  TTFT p50/p99 (s)  ITL p50/p99 (ms)  errors")
    for r in rows:
        ttft = f"{r['ttft_p50_s'] or 0:.3f}/{r['ttft_p99_s'] or 0:.3f}"
        itl = f"{1e3 * (r['itl_p50_s'] or 0):.1f}/{1e3 * (r['itl_p99_s'] or 0):.1f}"
        print(f"{r['streams']:>7}  {r['output_tok_s']:>9.1f}  {ttft:>16}  {itl:>16}  {r['errors'] or '-'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
