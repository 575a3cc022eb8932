"""Where a profiled dispatch's device time goes: `python -m bench.trace FILE.trace.json.gz [--top 25]`.

Reads the perfetto JSON that `jax.profiler` writes (bench.dispatch --trace; gpu-session.sh's rows:M keeps it in the
call's logs tarball) and prints, for the GPU's streams only, each kernel name's total time, its count and its share
of all kernel time, largest first: the Pallas kernels carry their names (qmatvec_q8_0, moe_matmul_mxfp4, ...), XLA's
fusions theirs. Why not perfetto's UI: the numbers have to go into docs/PERFORMANCE.md, and the device machine
has no browser.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def device_kernels(trace: dict) -> dict[str, list[float]]:
    """Kernel name -> durations (us) of the complete events on the GPU's processes."""
    gpu = {
        e["pid"]
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "M" and e.get("name") == "process_name" and "GPU" in str(e.get("args", {}).get("name", ""))
    }
    out: dict[str, list[float]] = defaultdict(list)
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            out[e["name"]].append(float(e["dur"]))
    return out


def summary(kernels: dict[str, list[float]], top: int) -> list[str]:
    total = sum(sum(d) for d in kernels.values()) or 1.0
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    lines = [f"all kernels: {total / 1e3:.2f} ms in {sum(len(d) for d in kernels.values())} launches"]
    for name, d in rows[:top]:
        lines.append(f"{sum(d) / 1e3:9.3f} ms {100 * sum(d) / total:5.1f}% {len(d):6d}x  {name[:100]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        trace = json.load(f)
    kernels = device_kernels(trace)
    if not kernels:
        names = sorted({str(e.get("args", {}).get("name")) for e in trace.get("traceEvents", []) if e.get("ph") == "M"})
        raise SystemExit(f"{args.trace}: no GPU process among {', '.join(names[:20])}")
    print("\n".join(summary(kernels, args.top)))


if __name__ == "__main__":
    main()
