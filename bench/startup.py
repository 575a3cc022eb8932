"""First and second start of the server: `python -m server.cli` to its `ready` log event, twice, on one fresh
compilation-cache folder (the first start compiles and fills it, the second reads it), then once with the cache
off. Prints one line per start with the time of each phase, and a JSON summary with --json.

    python -m bench.startup --device cpu                      # the embedded Gemma 3 270M
    python -m bench.startup --device gpu --model a.gguf --model b.gguf --json out.json
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PHASES = ("model_load_start", "model_load_complete", "ready")


def start_once(model: str | None, device: str, port: int, cache_args: list[str], timeout: float) -> dict[str, float]:
    """Seconds from launch to each phase's event, and of the warm-up's compiles (`ready`'s warm_up: their wall time,
    and the time until every program was lowered); the server is then stopped with SIGTERM."""
    args = [sys.executable, "-m", "server.cli", "--device", device, "--gpu-device", "0", "--port", str(port)]
    args += ["--worker-id", str(uuid.uuid4()), *cache_args, *(["--model", model] if model else [])]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[str, float] = {}
    try:
        for line in proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            event = record.get("event") if isinstance(record, dict) else None
            if event in PHASES:
                seen[event] = round(time.monotonic() - t0, 2)
            if event == "ready" and (warm := record.get("warm_up")):
                seen["compiles"], seen["lowered"] = warm["compile_ms"] / 1000, warm["lowering_ms"] / 1000
            if event in ("ready", "error") or time.monotonic() - t0 > timeout:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if "ready" not in seen:
        raise RuntimeError(f"the server did not reach ready ({seen})")
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--model", action="append", help="GGUF file (repeat; default: the embedded Gemma 3 270M)")
    ap.add_argument("--port", type=int, default=18650)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a start may take")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    results = []
    for model in args.model or [None]:
        with tempfile.TemporaryDirectory(prefix="worker-compile-cache-") as cache:
            runs = [
                ("first (empty cache)", ["--compile-cache", cache]),
                ("second (cache from the first)", ["--compile-cache", cache]),
                ("no cache", ["--no-compile-cache"]),
            ]
            for label, cache_args in runs:
                seen = start_once(model, args.device, args.port, cache_args, args.timeout)
                name = Path(model).name if model else "embedded gemma-3-270m-q4_k_m"
                results.append({"model": name, "device": args.device, "start": label, **seen})
                phases = ", ".join(f"{k} {v:.1f} s" for k, v in seen.items())
                print(f"{name} on {args.device}, {label}: {phases}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
