"""The host side of serving many streams, alone: the engine (and with --http then the HTTP server) at N streams over
a model whose compiled steps cost nothing (`free_steps`), so what is measured is the Python and the dispatches
around the device, not the model. With --real, the model's own steps on its device, loaded as `worker-orcd` loads
it (--worker-arg passes its options): the engine alone against the engine behind the HTTP server, in one process
and one run, is what the HTTP event loop costs the engine.

    python -m bench.host [--model FILE] [--streams 256[,512...]] [--tokens 128] [--steps 1] [--http] [--rounds 3]
                         [--real [--prefill-tokens 4096[,8192...]] [--worker-arg=--OPTION=VALUE ...]]

Per round: the engine thread's CPU seconds per output token (and through HTTP the event loop's), and the tokens a
second the host alone can carry (with --real: the worker's rate, and each job's decode ms a token). Lists of
streams and of prompt tokens a step run every pair in one load; the HTTP rounds run at the most streams.

A GPU step of R rows must cover R times the engine's (plus, sharing Python's lock, the event loop's) µs a token, or
the device waits for the host: at 256 rows and a 22.8 ms step, 89 µs a token for both together
(docs/PERFORMANCE.md). Free steps run on the CPU; the readings move with the machine's single-core speed, so compare
rows of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import jax
import jax.numpy as jnp

import worker
from worker import step_trace
from worker.engine import End, Engine, ErrorEvent, JobRequest
from worker.narration import Narrator

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


def engine_round(engine: Engine, prompts: list[tuple[int, ...]] | list[str], tokens: int, exact: bool = True) -> dict:
    """N jobs (token ids, or texts) submitted at once, each to its end; the engine thread's CPU seconds a token and
    the median of the jobs' decode ms a token. `exact`: every job must make `tokens` (free steps never end a job
    early; a real model's greedy text may reach an end-of-generation token first)."""
    done, left, produced, itl = threading.Event(), [len(prompts)], [0], []
    lock = threading.Lock()

    def sink(ev) -> None:
        if isinstance(ev, End | ErrorEvent):
            if isinstance(ev, ErrorEvent):
                raise SystemExit(f"job {ev.job_id} failed: {ev.code} {ev.message}")
            with lock:
                produced[0] += ev.tokens_out
                if ev.tokens_out > 1:
                    itl.append(ev.decode_time_ms / (ev.tokens_out - 1))
                left[0] -= 1
                if not left[0]:
                    done.set()

    cpu0, t0 = engine.cpu_seconds, time.perf_counter()
    for i, p in enumerate(prompts):
        job_id = f"host-{i}-{time.monotonic_ns()}"
        req = (
            JobRequest(job_id, p, max_tokens=tokens, temperature=0.0, seed=i)
            if isinstance(p, str)
            else JobRequest(job_id, "", max_tokens=tokens, temperature=0.0, prompt_ids=p)
        )
        engine.submit(req, sink)
    done.wait()
    wall, cpu = time.perf_counter() - t0, engine.cpu_seconds - cpu0
    out = produced[0]
    if exact and out != len(prompts) * tokens:
        raise SystemExit(f"{out} tokens came back, not {len(prompts)} x {tokens}")
    decode_ms = statistics.median(itl) if itl else float("nan")
    return {"tokens": out, "wall_s": wall, "tok_s": out / wall, "engine_us": cpu / out * 1e6, "decode_ms": decode_ms}


def http_rounds(engine: Engine, args, path: str, split: bool = False) -> None:
    """The real app (uvicorn, as `worker-orcd` configures it) in this process, or with `split` in a process of its
    own (`worker-orcd --http-process`), the load client (bench.load's) in --client-procs processes; per round, the
    engine thread's and the event loop's CPU a token from /metrics."""
    import multiprocessing
    import socket

    import uvicorn

    from bench import load
    from bench.ttft import wait_ready
    from server.app import create_app
    from server.cli import build_parser, http_config, start_http_process
    from server.service import WorkerService

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ctx = multiprocessing.get_context("spawn")  # not fork: this process runs JAX's and uvicorn's threads
    if split:
        argv = ["--model", path, "--worker-id", "host-bench", "--gpu-device", "0", "--port", "1"]
        host, child = start_http_process(build_parser().parse_args(argv), sock, engine, time.monotonic())
        wait_ready(lambda: child.exitcode, url, time.monotonic() + 300, None)  # its output is this process's
        stop = lambda: (host.stop("bench done"), child.join(60))  # noqa: E731
    else:
        narrator = Narrator("host-bench", path, None, stream=io.StringIO())
        server = uvicorn.Server(http_config(create_app(WorkerService(engine, narrator, worker_id="host-bench"))))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        stop = lambda: setattr(server, "should_exit", True)  # noqa: E731
    texts = load.prompts(path, [FIXED_PROMPT_TOKENS] * args.streams)
    form = "a process of its own" if split else "this process"
    with ProcessPoolExecutor(args.client_procs, mp_context=ctx) as pool:
        load.round_of(pool, args.client_procs, url, "worker", texts[:8], 4, 120)  # warm the client and buckets
        with step_trace.timed_spans() as walls:
            for n in range(args.rounds):
                spans_before = {k: tuple(v) for k, v in walls.items()}
                before = load.thread_cpu(url)
                r = load.round_of(pool, args.client_procs, url, "worker", texts, args.tokens, 600)
                after = load.thread_cpu(url)
                if not r["output_tokens"]:
                    raise SystemExit(f"no tokens came back: {r['errors']}")
                us = {k: (after[k] - before[k]) / r["output_tokens"] * 1e6 for k in after}
                print(
                    f"round {n}: {args.streams} streams x {args.tokens} tokens over HTTP ({form}), {args.steps} "
                    f"step(s) a dispatch: {r['output_tok_s']:,.0f} tok/s, engine {us['engine']:.1f} / event loop "
                    f"{us['event_loop']:.1f} µs/token, TTFT p50 {load._ms(r.get('ttft_p50_s'))} ms, ITL p50 "
                    f"{load._ms(r.get('itl_p50_s'))} ms, "
                    f"errors {r['errors'] or 'none'}\n  {span_walls(walls, spans_before)}",
                    flush=True,
                )
    stop()


def span_walls(walls: dict[str, list], before: dict[str, tuple]) -> str:
    """The engine's host spans since `before`: each one's wall seconds in all and ms per occurrence; the read back
    is where the engine thread waits for the device."""
    out = []
    for name in step_trace.SPANS:
        n0, s0 = before.get(name, (0, 0.0))
        n, s = walls[name][0] - n0, walls[name][1] - s0
        if n:
            out.append(f"{name} {s:.2f} s ({n} x {s / n * 1e3:.1f} ms)")
    return "; ".join(out)


def real_engine(path: str, streams: int, tokens: int, worker_args: list[str]) -> Engine:
    """The engine `worker-orcd --model PATH --max-batch STREAMS` would serve, loaded and warmed up as it does."""
    from server.cli import build_parser, start_engine

    argv = ["--model", path, "--worker-id", "host-bench", "--gpu-device", "0", "--port", "1"]  # no socket is bound
    argv += ["--max-batch", str(streams), "--max-queue", str(streams), "--max-tokens-out", str(tokens)]
    args = build_parser().parse_args([*argv, *worker_args])
    engine = start_engine(args, Narrator("host-bench", path, None, stream=io.StringIO()))[0]
    engine.start()  # start_engine leaves that to its caller (server/cli.py's main: after its signal handling)
    return engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GGUF file (default: the oracles' tiny qwen2)")
    ap.add_argument("--streams", default="256", help="streams a round; a list (256,512) runs each in turn (the "
                    "engine's --max-batch is the largest)")  # fmt: skip
    ap.add_argument("--tokens", type=int, default=128, help="output tokens a stream")
    ap.add_argument("--steps", type=int, default=1, help="decode steps a dispatch (the card gives 1 at 256 rows)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--http", action="store_true", help="then the same rounds through the HTTP server and SSE, with "
                    "bench.load's client")  # fmt: skip
    ap.add_argument("--http-process", action="store_true", help="then the same rounds through the HTTP server in a "
                    "process of its own (worker-orcd --http-process), after --http's")  # fmt: skip
    ap.add_argument("--client-procs", type=int, default=2, help="client processes (--http)")
    ap.add_argument("--switch-ms", type=float, default=None, help="Python's thread switch interval (default 5 ms): "
                    "how long a thread that wants the lock back waits for the one holding it")  # fmt: skip
    ap.add_argument("--real", action="store_true", help="the model's own steps on its default device, loaded as the "
                    "worker loads it (--steps is then the worker's choice)")  # fmt: skip
    ap.add_argument(
        "--prefill-tokens",
        default=None,
        help="(--real) the engine's prompt tokens a step "
        "(worker-orcd --prefill-tokens); a list (4096,8192) runs each level's rounds at each, one load",
    )
    ap.add_argument("--worker-arg", action="append", default=[], metavar="--OPTION=VALUE",
                    help="(--real) a worker-orcd option, e.g. --worker-arg=--dispatch-ms=70; repeatable")  # fmt: skip
    args = ap.parse_args(argv)
    levels = [int(n) for n in args.streams.split(",")]
    budgets = [int(n) for n in args.prefill_tokens.split(",")] if args.prefill_tokens else [None]
    if budgets != [None] and not args.real:
        raise SystemExit("--prefill-tokens needs --real")
    args.streams = max(levels)
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1e3)
    if args.model is None:
        from tests.tiny_worker import model_path

        args.model = model_path()
    path = args.model
    if args.real:
        from bench import load

        engine = real_engine(path, args.streams, args.tokens, args.worker_arg)
        args.steps = engine.model.batch.steps
        prompts = load.prompts(path, [FIXED_PROMPT_TOKENS] * args.streams)
    else:
        model = worker.load(path, device="cpu", max_batch=args.streams, kv_tokens=args.streams * 512)
        free_steps(model, *token_range(model))
        model.batch.steps = args.steps
        engine = Engine(model, max_queue=args.streams, max_tokens_out=args.tokens)
        engine.start()
        prompts = prompt_ids(model, args.streams, FIXED_PROMPT_TOKENS)
    engine_round(engine, prompts[:8], 4, exact=not args.real)  # compile the buckets the round reaches untimed
    batch = engine.model.batch
    with step_trace.timed_spans() as walls:
        for budget in budgets:
            if budget is not None:
                batch.prefill_tokens = budget  # between rounds: the engine is idle
            for level in levels:
                for n in range(args.rounds):
                    before = {k: tuple(v) for k, v in walls.items()}
                    r = engine_round(engine, prompts[:level], args.tokens, exact=not args.real)
                    print(
                        f"round {n}: {level} streams x {args.tokens} tokens, {args.steps} step(s) a dispatch, "
                        f"{batch.prefill_tokens} prompt tokens a step: {r['tok_s']:,.0f} tok/s, engine "
                        f"{r['engine_us']:.1f} µs/token ({r['wall_s']:.2f} s, {r['tokens']:,} tokens, decode "
                        f"{r['decode_ms']:.1f} ms/token p50)\n  {span_walls(walls, before)}",
                        flush=True,
                    )
    if args.http:
        http_rounds(engine, args, path)
    if args.http_process:  # last: its end shuts the engine down
        http_rounds(engine, args, path, split=True)
    engine.shutdown(2.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
