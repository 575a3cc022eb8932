"""The host side of serving many streams, alone: the engine (and with --http the HTTP server) at N streams over a
model whose compiled steps cost nothing (`free_steps`), so what is measured is the Python and the dispatches
around the device, not the model.

    python -m bench.host [--model FILE] [--streams 256] [--tokens 128] [--steps 1] [--http] [--rounds 3]

Per round: the engine thread's CPU seconds per output token (and with --http the event loop's), and the tokens a
second the host alone can carry. A GPU step of R rows must cover R times the engine's (plus, sharing Python's
lock, the event loop's) µs a token, or the device waits for the host: at 256 rows and a 22.8 ms step, 89 µs a
token for both together (docs/PERFORMANCE.md). Runs on the CPU; the readings move with the machine's single-core
speed, so compare rows of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import jax
import jax.numpy as jnp

import worker
from worker.engine import End, Engine, ErrorEvent, JobRequest

FIXED_PROMPT_TOKENS = 128


def free_steps(model: worker.Model, low: int, high: int) -> None:
    """Replace the model's compiled prefill and decode with programs of the same signatures that do no model work:
    logits that make `low` the first token for a prefill (still sampled by the real program), and for a decode ids in
    [low, high) from each row's last token and position (never an end-of-generation id when that range holds
    none), so every stream runs to its max_tokens."""
    r = model.runner

    def prefill(weights, tokens, positions, table, last, cache):
        rows = max(tokens.shape[0], r.min_rows)
        return jnp.zeros((rows, r.cfg.vocab_size), jnp.float32).at[:, low].set(1.0), cache

    def decode(weights, tokens, seen, pos, table, index, cache, sp, keys, steps, plan):
        n = pos.shape[0]
        step = jnp.arange(steps, dtype=jnp.int32)[None, :]
        ids = low + (tokens[:n, None] * 31 + pos[:, None] + step) % (high - low)
        return ids, tokens.at[:n].set(ids[:, -1]), seen, cache, None

    r._prefill = jax.jit(prefill, donate_argnums=(5,))
    r._decode = jax.jit(decode, static_argnums=(9, 10), donate_argnums=(2, 6))
    # Prompt chunks grouped as on the GPU (Runner.group_limit reads the backend; the CPU gives each chunk its own
    # dispatch). The programs that read the config were compiled from it already, or are replaced above.
    r.cfg = dataclasses.replace(r.cfg, backend="gpu")


def token_range(model: worker.Model) -> tuple[int, int]:
    """The widest run of ids above the control tokens with no end-of-generation id in it."""
    tok = model.tokenizer
    low = max(tok.eog_ids | {tok.bos_id or 0}) + 1
    return (low, tok.vocab_size) if tok.vocab_size - low > 64 else (256, min(tok.eog_ids))


def prompt_ids(model: worker.Model, n: int, length: int) -> list[tuple[int, ...]]:
    low, high = token_range(model)
    return [tuple(low + (i * 7 + k) % (high - low) for k in range(length)) for i in range(n)]


def engine_round(engine: Engine, prompts: list[tuple[int, ...]], tokens: int) -> dict:
    """N jobs submitted at once, each to its end; the engine thread's CPU seconds a token."""
    done, left, produced = threading.Event(), [len(prompts)], [0]
    lock = threading.Lock()

    def sink(ev) -> None:
        if isinstance(ev, End | ErrorEvent):
            if isinstance(ev, ErrorEvent):
                raise SystemExit(f"job {ev.job_id} failed: {ev.code} {ev.message}")
            with lock:
                produced[0] += ev.tokens_out
                left[0] -= 1
                if not left[0]:
                    done.set()

    cpu0, t0 = engine.cpu_seconds, time.perf_counter()
    for i, ids in enumerate(prompts):
        req = JobRequest(f"host-{i}-{time.monotonic_ns()}", "", max_tokens=tokens, temperature=0.0, prompt_ids=ids)
        engine.submit(req, sink)
    done.wait()
    wall, cpu = time.perf_counter() - t0, engine.cpu_seconds - cpu0
    out = produced[0]
    if out != len(prompts) * tokens:
        raise SystemExit(f"{out} tokens came back, not {len(prompts)} x {tokens}")
    return {"tokens": out, "wall_s": wall, "tok_s": out / wall, "engine_us": cpu / out * 1e6}


def http_rounds(model: worker.Model, engine: Engine, args, path: str) -> None:
    """The real app (uvicorn, as `worker-orcd` configures it) in this process, the load client (bench.load's) in
    --client-procs processes; per round, the engine thread's and the event loop's CPU a token from /metrics."""
    import io
    import multiprocessing
    import socket

    import uvicorn

    from bench import load
    from server.app import create_app
    from server.cli import http_config
    from server.service import WorkerService
    from worker.narration import Narrator

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    service = WorkerService(engine, Narrator("host-bench", path, None, stream=io.StringIO()), worker_id="host-bench")
    server = uvicorn.Server(http_config(create_app(service)))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    texts = load.prompts(path, [FIXED_PROMPT_TOKENS] * args.streams)
    ctx = multiprocessing.get_context("spawn")  # not fork: this process runs JAX's and uvicorn's threads
    with ProcessPoolExecutor(args.client_procs, mp_context=ctx) as pool:
        load.round_of(pool, args.client_procs, url, "worker", texts[:8], 4, 120)  # warm the client and buckets
        for n in range(args.rounds):
            before = load.thread_cpu(url)
            r = load.round_of(pool, args.client_procs, url, "worker", texts, args.tokens, 600)
            after = load.thread_cpu(url)
            if not r["output_tokens"]:
                raise SystemExit(f"no tokens came back: {r['errors']}")
            us = {k: (after[k] - before[k]) / r["output_tokens"] * 1e6 for k in after}
            print(
                f"round {n}: {args.streams} streams x {args.tokens} tokens over HTTP, {args.steps} step(s) a "
                f"dispatch: {r['output_tok_s']:,.0f} tok/s, engine {us['engine']:.1f} / event loop "
                f"{us['event_loop']:.1f} µs/token, TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms, "
                f"errors {r['errors'] or 'none'}",
                flush=True,
            )
    server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GGUF file (default: the oracles' tiny qwen2)")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128, help="output tokens a stream")
    ap.add_argument("--steps", type=int, default=1, help="decode steps a dispatch (the card gives 1 at 256 rows)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--http", action="store_true", help="through the HTTP server and SSE, with bench.load's client")
    ap.add_argument("--client-procs", type=int, default=2, help="client processes (--http)")
    ap.add_argument("--switch-ms", type=float, default=None, help="Python's thread switch interval (default 5 ms): "
                    "how long a thread that wants the lock back waits for the one holding it")  # fmt: skip
    args = ap.parse_args(argv)
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1e3)
    if args.model is None:
        from tests.tiny_worker import model_path

        args.model = model_path()
    path = args.model
    model = worker.load(path, device="cpu", max_batch=args.streams, kv_tokens=args.streams * 512)
    free_steps(model, *token_range(model))
    model.batch.steps = args.steps
    engine = Engine(model, max_queue=args.streams, max_tokens_out=args.tokens)
    engine.start()
    if args.http:
        http_rounds(model, engine, args, path)
        engine.shutdown(2.0)
        return 0
    prompts = prompt_ids(model, args.streams, FIXED_PROMPT_TOKENS)
    engine_round(engine, prompts[:8], 4)  # compile the buckets the round reaches outside its timing
    for n in range(args.rounds):
        r = engine_round(engine, prompts, args.tokens)
        print(
            f"round {n}: {args.streams} streams x {args.tokens} tokens, {args.steps} step(s) a dispatch: "
            f"{r['tok_s']:,.0f} tok/s, engine {r['engine_us']:.1f} µs/token ({r['wall_s']:.2f} s)",
            flush=True,
        )
    engine.shutdown(2.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
