"""A tiny client of the worker's HTTP API: `python -m worker.client "prompt"` streams the completion to stdout as
the tokens come.

    python -m worker.client "The three primary colors are" --seed 42 --max-tokens 64
    python -m worker.client --health

At most DEFAULT_MAX_TOKENS tokens unless --max-tokens says otherwise (the server's own default is its limit,
2048: minutes on a CPU). A one-line summary (tokens, decode speed, time to the first token, stop reason, seed)
goes to stderr at the end; --events prints every SSE event as a JSON line instead of the text. Ctrl-C cancels
the job on the worker (POST /cancel). Exit 0 on `end`, 1 on an `error` event or an HTTP/connection error (one
line on stderr), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import httpx

DEFAULT_URL = f"http://127.0.0.1:{os.environ.get('WORKER_PORT', '8600')}"
DEFAULT_MAX_TOKENS = 256


def iter_sse(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) for each SSE event in `lines` (comments and keep-alives are skipped)."""
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
    if data:
        yield name, json.loads("\n".join(data))


def stream(
    prompt: str, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 600.0, **params: Any
) -> Iterator[tuple[str, dict[str, Any]]]:
    """POST /execute and yield its events. `params`: job_id, max_tokens, temperature, top_p, top_k, min_p,
    repetition_penalty, stop, seed (None values are left out). A refused request raises httpx.HTTPStatusError."""
    body = {"job_id": params.pop("job_id", None) or str(uuid.uuid4()), "prompt": prompt}
    body.update({k: v for k, v in params.items() if v is not None})
    with (
        httpx.Client(base_url=url, headers=_auth(api_key), timeout=httpx.Timeout(timeout, connect=10.0)) as client,
        client.stream("POST", "/execute", json=body) as response,
    ):
        if response.status_code != 200:
            response.read()
            response.raise_for_status()
        yield from iter_sse(response.iter_lines())


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.client", description="Stream a completion from a worker.")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the worker (default {DEFAULT_URL}, or $WORKER_PORT)")
    p.add_argument("--api-key", default=os.environ.get("WORKER_API_KEY"), help="bearer token (env WORKER_API_KEY)")
    p.add_argument("--job-id")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help=f"default {DEFAULT_MAX_TOKENS}")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="a stop string (repeat for more)")
    p.add_argument("--seed", type=int)
    p.add_argument("--events", action="store_true", help="print each SSE event as a JSON line")
    p.add_argument("--health", action="store_true", help="print GET /health and exit")
    args = p.parse_args(argv)
    if args.health:
        return _health(args)
    if not args.prompt:
        p.error("a prompt is required (or --health)")
    job_id = args.job_id or str(uuid.uuid4())
    params = {
        "job_id": job_id,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
        "seed": args.seed,
    }
    try:
        return _print_stream(stream(args.prompt, args.url, args.api_key, **params), args.events)
    except KeyboardInterrupt:
        _cancel(args.url, args.api_key, job_id)
        print("\ncancelled", file=sys.stderr)
        return 130
    except httpx.HTTPStatusError as e:
        print(f"error: HTTP {e.response.status_code}: {_error_text(e.response)}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"error: {args.url}: {e}", file=sys.stderr)
        return 1


def _print_stream(events: Iterator[tuple[str, dict[str, Any]]], as_events: bool) -> int:
    seed, sent, first = None, time.monotonic(), None
    for name, data in events:
        if name == "token" and first is None:
            first = time.monotonic() - sent
        if as_events:
            print(json.dumps({"event": name, "data": data}, ensure_ascii=False), flush=True)
        elif name == "token":
            sys.stdout.write(data["t"])
            sys.stdout.flush()
        if name == "started":
            seed = data["seed"]
        elif name == "end":
            if not as_events:
                sys.stdout.write("\n")
            print(summary(data, seed, first), file=sys.stderr)
            return 0
        elif name == "error":
            print(f"\nerror: {data['code']}: {data['message']}", file=sys.stderr)
            return 1
    print("\nerror: the stream ended without an end or error event", file=sys.stderr)
    return 1


def summary(end: dict[str, Any], seed: int | None, first_token_s: float | None = None) -> str:
    """One line from the `end` event: tokens, decode tok/s (the worker's: the tokens after the first over its
    time after the first), the time to the first token as the client saw it, the stop reason and the seed."""
    n, decode_s = end["tokens_out"], end["decode_time_ms"] / 1000.0
    speed = f"{(n - 1) / decode_s:.1f} tok/s" if n > 1 and decode_s > 0 else "- tok/s"
    first = "" if first_token_s is None else f", first token after {first_token_s:.2f} s"
    return f"[{n} tokens, {speed}{first}, stop {end['stop_reason']}, seed {seed}]"


def _health(args: argparse.Namespace) -> int:
    try:
        r = httpx.get(f"{args.url}/health", headers=_auth(args.api_key), timeout=10.0)
        r.raise_for_status()
    except httpx.HTTPError as e:
        print(f"error: {args.url}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r.json(), indent=2))
    return 0


def _cancel(url: str, api_key: str | None, job_id: str) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the worker also cancels when the connection drops
        httpx.post(f"{url}/cancel", json={"job_id": job_id}, headers=_auth(api_key), timeout=5.0)


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('code')}: {body.get('message')}"
    except ValueError:
        return response.text[:200]


if __name__ == "__main__":
    sys.exit(main())
