"""Benchmark results -> markdown: one table row per engine and model, with the worker/llama.cpp ratios and the
fraction of the memory-bandwidth floor. `python -m bench.report DIR` rewrites DIR/summary.md and
DIR/summary.json from every per-model result (*.json but summary.json) in DIR."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HEADER = (
    "| model | engine | decode tok/s | prefill tok/s | decode vs llama.cpp | prefill vs llama.cpp | % of decode floor "
    "| TTFT over HTTP | load to ready | host memory at load | peak memory |\n" + "|---" * 11 + "|"
)


def _num(v, fmt: str = "{:,.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def _bytes(v) -> str:
    return "—" if v is None else f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def ratios(result: dict) -> dict:
    """worker / llama.cpp for decode and prefill (None where either side is missing)."""
    w, p = result.get("worker") or {}, result.get("llamacpp") or {}
    out = {}
    for key in ("decode_tok_s", "prefill_tok_s"):
        out[key.split("_")[0]] = w[key] / p[key] if w.get(key) and p.get(key) else None
    return out


def host_memory(w: dict) -> str:
    """Peak anonymous host RSS while loading (what a host-side copy of the file would fill), then the peak RSS
    with the mapped file's pages."""
    if w.get("load_host_peak_anon_bytes") is None:
        return "—"
    return f"{_bytes(w['load_host_peak_anon_bytes'])} anon ({_bytes(w.get('load_host_peak_rss_bytes'))} with mmap)"


def rows(result: dict) -> list[str]:
    w, p, h = result.get("worker") or {}, result.get("llamacpp") or {}, result.get("http") or {}
    r = ratios(result)
    floor = w.get("floor_decode_tok_s")
    kind = f"{w['quant_kind']}, " if w.get("quant_kind") else ""
    label = f"{result['label']} ({kind}{_bytes(result.get('file_bytes'))})"
    ttft = f"{h['ttft_s'] * 1000:,.0f} ms" if h.get("ttft_s") is not None else "—"
    ready = f"{w['load_s']:.1f} s" if w.get("load_s") is not None else "—"
    if h.get("server_ready_s") is not None:
        ready += f" (server: {h['server_ready_s']:.1f} s"
        if warm := h.get("server_warm_up"):  # the compiles' wall time, and the part until all were lowered
            ready += f"; compiles {warm['compile_ms'] / 1000:.1f} s, lowered by {warm['lowering_ms'] / 1000:.1f} s"
        ready += ")"
    worker_row = (
        f"| {label} | worker | {_num(w.get('decode_tok_s'))} | {_num(w.get('prefill_tok_s'))} "
        f"| {_num(r['decode'], '{:.2f}×')} | {_num(r['prefill'], '{:.2f}×')} "
        f"| {_num(w.get('decode_floor_fraction') and 100 * w['decode_floor_fraction'], '{:.0f}%')} "
        f"| {ttft} | {ready} | {host_memory(w)} | {_bytes(w.get('peak_memory_bytes'))} |"
    )
    peer_floor = p.get("decode_tok_s") / floor if p.get("decode_tok_s") and floor else None
    peer_row = (
        f"| {label} | llama.cpp | {_num(p.get('decode_tok_s'))} | {_num(p.get('prefill_tok_s'))} | 1.00× | 1.00× "
        f"| {_num(peer_floor and 100 * peer_floor, '{:.0f}%')} | — | — | — | — |"
    )
    out = [worker_row]
    if p:
        out.append(peer_row)
    return out


def peer_flags(peer: dict) -> str:
    """llama-bench's command line without the binary's path and the model file."""
    args = peer.get("command", "").split()[1:]
    if "-m" in args:
        i = args.index("-m")
        del args[i : i + 2]
    return " ".join(args)


def steps_lines(results: list[dict]) -> list[str]:
    """The batch-1 decode rate at each steps-a-dispatch count, a table row per model (where the bench swept it)."""
    sweeps = {r["label"]: w["decode_tok_s_by_steps"] for r in results if (w := r.get("worker") or {}).get(
        "decode_tok_s_by_steps")}  # fmt: skip
    if not sweeps:
        return []
    counts = sorted({int(c) for s in sweeps.values() for c in s})
    lines = [
        "",
        "Batch-1 decode tok/s by steps a dispatch (the worker's own count: decode_steps_per_dispatch in summary.json):",
        "",
        "| model | " + " | ".join(f"{c} steps" for c in counts) + " | 8 vs 64 |",
        "|---" * (len(counts) + 2) + "|",
    ]
    for label, s in sweeps.items():
        s = {int(c): v for c, v in s.items()}  # JSON keys are strings
        edge = f"{s[8] / s[64]:.2f}×" if 8 in s and 64 in s else "—"
        lines.append(f"| {label} | " + " | ".join(_num(s.get(c)) for c in counts) + f" | {edge} |")
    return lines


def errors(result: dict) -> list[str]:
    return [f"- {result['label']}: {part}: {msg}" for part, msg in (result.get("errors") or {}).items()]


def device_line(results: list[dict]) -> str:
    for res in results:
        w = res.get("worker") or {}
        if w.get("device"):
            d = w["device"]
            name = d.get("kind") if d.get("platform") != "cpu" else f"{d.get('cpu')} ({d.get('cores')} cores)"
            bw = w.get("copy_bandwidth_bytes_s")
            rate = f"{bw / 1e12:.2f} TB/s" if bw >= 1e12 else f"{bw / 1e9:.1f} GB/s"
            return f"Device: {name}, JAX {d.get('jax')}; measured copy bandwidth {rate} (read + write)."
    return "Device: unknown (no worker result)."


def markdown(results: list[dict]) -> str:
    lines = [device_line(results), "", HEADER]
    for res in results:
        lines += rows(res)
    lines += steps_lines(results)
    peers = {(p["build_commit"], peer_flags(p)) for r in results if (p := r.get("llamacpp"))}
    for commit, flags in sorted(peers):
        lines += ["", f"llama.cpp commit {commit}: `llama-bench {flags}`."]
    errs = [e for res in results for e in errors(res)]
    if errs:
        lines += ["", "Failures:", *errs]
    return "\n".join(lines) + "\n"


def load_results(dirs: list[Path]) -> list[dict]:
    results = []
    for d in dirs:
        for f in sorted(d.glob("*.json")):
            if f.name != "summary.json":
                results.append(json.loads(f.read_text()))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", type=Path, nargs="+", help="folders of per-model result JSON files")
    ap.add_argument("--out", type=Path, help="folder for summary.md / summary.json (default: the first DIR)")
    args = ap.parse_args(argv)
    results = load_results(args.dirs)
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
