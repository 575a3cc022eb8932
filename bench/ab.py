"""The table of an A/B run (tools/gpu-session.sh's `ab:M` stage): bench.worker_bench results of several variants of
environment settings, run interleaved in rounds, one process a run.

    python -m bench.ab RESULTS_DIR --model M --variants "A=1" "A=0" [--json OUT]

Reads RESULTS_DIR/M-v<i>-r<round>.json and prints, for each variant, every run's decode tok/s (each run's own
median of its repeats), the median over its runs, the prefill tok/s likewise, and the ratio of each median to the
first variant's. Each run's spread (its slowest repeat over its fastest) is printed too: a difference between
variants smaller than the runs' spread is not a difference.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path


def collect(results: Path, model: str, n_variants: int) -> list[list[dict]]:
    """Each variant's runs, in round order."""
    runs: list[list[tuple[int, dict]]] = [[] for _ in range(n_variants)]
    pattern = re.compile(rf"{re.escape(model)}-v(\d+)-r(\d+)\.json")
    for path in results.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match[1]) < n_variants:
            runs[int(match[1])].append((int(match[2]), json.loads(path.read_text())))
    return [[r for _, r in sorted(v, key=lambda t: t[0])] for v in runs]


def table(model: str, variants: list[str], runs: list[list[dict]]) -> tuple[str, list[dict]]:
    rows, lines = [], []
    device = next((r["device"]["kind"] for v in runs for r in v), "?")
    lines.append(f"A/B on {model} ({device}): decode tok/s of each run (its spread: slowest / fastest repeat)")
    lines.append("| variant | runs | decode tok/s (median) | prefill tok/s (median) | decode vs first |")
    lines.append("|---|---|---|---|---|")
    base = None
    for name, v in zip(variants, runs, strict=True):
        if not v:
            lines.append(f"| {name} | (none) | | | |")
            continue
        decode = statistics.median(r["decode_tok_s"] for r in v)
        prefill = statistics.median(r["prefill_tok_s"] for r in v)
        base = base or decode
        each = ", ".join(f"{r['decode_tok_s']:.1f} ({max(r['decode_s']) / min(r['decode_s']):.3f})" for r in v)
        lines.append(f"| {name} | {each} | {decode:.1f} | {prefill:.1f} | {decode / base:.3f}× |")
        rows.append({"variant": name, "decode_tok_s": [r["decode_tok_s"] for r in v], "decode_median": decode,
                     "prefill_median": prefill, "vs_first": decode / base})  # fmt: skip
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--variants", nargs="+", required=True, help="as the stage's AB lists them, in order")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    text, rows = table(args.model, args.variants, collect(args.results, args.model, len(args.variants)))
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
