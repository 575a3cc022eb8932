"""`python -m bench` (`just bench`): the worker against llama.cpp on the same GGUF file and device.

For each --model: llama-bench's tg/pp numbers when --llamacpp is given (bench/llamacpp.py), the worker's numbers
in a child process (bench/worker_bench.py), and time to first token through the real HTTP server (bench/ttft.py).
Each part runs on its own, so one failing part is recorded and the others still run. Writes, under --out,
<label>-<device>.json per model, summary.md / summary.json over every result in that folder, and logs/.
This process never starts JAX: each measured engine has the device to itself.

`python -m bench load ...` (`just bench load ...`) is the load mode instead: N concurrent streams through the
real HTTP server against llama-server and llama-batched-bench (bench/load.py; `python -m bench load --help`).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench import llamacpp, report, ttft
from worker.cores import usable_cores


def worker_part(args, model: str, label: str, logs: Path, timeout: float) -> dict:
    out = logs / f"{label}-worker.json"
    cmd = [sys.executable, "-m", "bench.worker_bench", "--model", model, "--device", args.device, "--json", str(out)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens)]
    cmd += ["--repeats", str(args.repeats), *worker_flags(args)]
    with (logs / f"{label}-worker.log").open("wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        text = (logs / f"{label}-worker.log").read_text(errors="replace")
        raise RuntimeError(f"worker bench exited with {proc.returncode}: {text[-800:]}")
    return json.loads(out.read_text())


def worker_flags(args) -> list[str]:
    """The worker's own options, the same for its engine (bench.worker_bench) and its server (bench.ttft)."""
    cpu = ["--cpu-devices", str(args.cpu_devices)] if args.cpu_devices else []
    return (["--int8-x"] if args.int8_x else []) + cpu


def bench_model(args, model: str, label: str, logs: Path, deadline: float) -> dict:
    result: dict = {"label": label, "file": str(Path(model).resolve()), "device": args.device, "errors": {}}
    if not Path(model).is_file():
        result["errors"]["file"] = f"{model}: no such file"
        return result | {"ratios": report.ratios(result)}
    result["file_bytes"] = Path(model).stat().st_size
    # (name, run(timeout), share): llama-bench first (seconds, and independent of the worker); a part may take
    # `share` of the time left, so a worker run that hangs still leaves time for the HTTP measurement.
    parts = []
    if args.llamacpp:
        threads = args.threads or (usable_cores() if args.device == "cpu" else None)
        log = logs / f"{label}-llama-bench.log"
        peer = lambda t: llamacpp.run(  # noqa: E731
            args.llamacpp, model, args.device, log, args.prompt_tokens, args.decode_tokens, threads, t
        )
        parts.append(("llamacpp", peer, 0.5))
    parts.append(("worker", lambda t: worker_part(args, model, label, logs, t), 0.7 if not args.skip_http else 1.0))
    if not args.skip_http:
        server_log = logs / f"{label}-server.log"
        http = lambda t: ttft.measure(model, args.device, server_log, args.requests, t, worker_flags(args))  # noqa: E731
        parts.append(("http", http, 1.0))
    for name, part, share in parts:
        start = time.monotonic()
        timeout = min(args.timeout, (deadline - start) * share)
        if timeout < 10:
            result["errors"][name] = "skipped: the time budget (--budget) ran out"
            continue
        try:
            result[name] = part(timeout)
        except Exception as e:  # recorded, and the next part still runs
            result["errors"][name] = f"{type(e).__name__}: {e}"
        print(f"[bench] {label} {name}: {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    result["ratios"] = report.ratios(result)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        from bench import load

        return load.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="GGUF file (repeatable; default: the embedded Gemma 3 270M)")
    ap.add_argument("--label", action="append", help="row name for each --model (default: the file's stem)")
    ap.add_argument("--device", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--llamacpp", help="path to llama-bench (tools/llamacpp-build.sh makes it)")
    ap.add_argument("--threads", type=int, help="llama-bench threads (default: all cores on the CPU)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each worker measurement")
    ap.add_argument("--requests", type=int, default=5, help="HTTP requests for time to first token")
    ap.add_argument("--skip-http", action="store_true", help="leave out time to first token through HTTP")
    ap.add_argument("--cpu-devices", type=int, help="the worker with --cpu-devices N (the CPU's layout over N host "
                    "devices; default: the server's)")  # fmt: skip
    ap.add_argument("--int8-x", action="store_true", help="the worker with --int8-x (decode on x rounded to int8, "
                    "as llama.cpp does; GPU only; --max-batch then 8)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each part (engine or HTTP run) may take")
    ap.add_argument("--budget", type=float, help="seconds for the whole run: parts that would start later are skipped")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + (args.budget or float("inf"))
    # A SIGTERM (e.g. from `timeout`) unwinds normally, so a running server child is shut down, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.model:
        import worker

        args.model = [worker.default_model_path()]
    labels = args.label or []
    if len(labels) > len(args.model):
        ap.error("more --label than --model")
    labels += [Path(m).stem for m in args.model[len(labels) :]]
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for model, label in zip(args.model, labels, strict=True):
        result = bench_model(args, model, label, logs, deadline)
        (args.out / f"{label}-{args.device}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"{label}-{args.device}.md").write_text(report.markdown([result]))
    results = report.load_results([args.out])
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    (args.out / "summary.md").write_text(report.markdown(results))
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
