"""Where a profiled dispatch's device time goes: `python -m bench.trace FILE.trace.json.gz [--top 25]`.

Reads the perfetto JSON that `jax.profiler` writes (bench.dispatch --trace; gpu-session.sh's rows:M keeps it in the
call's logs tarball) and prints, for the GPU's streams only, each kernel name's total time, its count and its share
of all kernel time, largest first: the Pallas kernels carry their names (qmatvec_q8_0, moe_matmul_mxfp4, ...), XLA's
fusions theirs. Then how much of the traced window the device was busy (the union of its kernels' intervals), where
it idled (the largest gaps between kernels, by the pair around them), and the engine's host spans where the trace
has them (worker/step_trace.py: a server under load traced with WORKER_TRACE_DIR): an engine step, its prefill,
decode dispatch and read back, and the events' handling. Why not perfetto's UI: the numbers have to go into
docs/PERFORMANCE.md, and the device machine has no browser.

A trace of the CPU (no GPU process: the worker's host devices, each a thread of XLA's CPU client, and the intra-op
pool's threads that run some of their thunks) prints each such thread's events instead, the largest first, with the
time it spent waiting: for the other devices at a collective (`Rendezvous`) and for its thunks on the pool
(`ThunkExecutor::Execute (wait for completion)`). Events nest (an executor's span holds its
thunks), so a thread's rows overlap. This is how the thirty-second and thirty-third sessions read the 2-device CPU
step (docs/PERFORMANCE.md, "CPU").

`--hlo FILE`: XLA's optimized HLO of the traced program (XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text", the
`*after_optimizations.txt` of its module; gpu-session.sh's kinds:M with KINDS_HLO=1) names where each of XLA's
fusions came from: the op and the innermost line of Python that made it (the trace has only `loop_add_fusion_96`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

from worker.step_trace import SPANS


def _gpu_pids(trace: dict) -> set:
    return {
        e["pid"]
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "M" and e.get("name") == "process_name" and "GPU" in str(e.get("args", {}).get("name", ""))
    }


def _device_events(trace: dict) -> list[dict]:
    """The complete events on the GPU's processes."""
    gpu = _gpu_pids(trace)
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]


def device_kernels(trace: dict) -> dict[str, list[float]]:
    """Kernel name -> durations (us) of the complete events on the GPU's processes."""
    out: dict[str, list[float]] = defaultdict(list)
    for e in _device_events(trace):
        out[e["name"]].append(float(e["dur"]))
    return out


def device_busy(trace: dict) -> tuple[float, float]:
    """(window, busy) in us: from the first kernel's start to the last one's end, and the union of the GPU's
    event intervals within it (overlapping streams counted once)."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in _device_events(trace))
    if not spans:
        return 0.0, 0.0
    busy, (start, end) = 0.0, spans[0]
    first = start
    for a, b in spans[1:]:
        if a > end:
            busy, start, end = busy + end - start, a, b
        else:
            end = max(end, b)
    # the last merged interval ends last: an earlier one reaching past its start would have merged with it
    return end - first, busy + end - start


def device_gaps(trace: dict) -> dict[tuple[str, str], list[float]]:
    """(kernel before, kernel after) -> the device's idle gaps (us) between them: the union of the GPU's events
    walked in time order, each gap charged to the pair around it. Where a step's idle time sits (the thirty-fourth
    session found a decode loop's 85 us between steps this way, where the kernels' sums had not moved)."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]) for e in _device_events(trace))
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    if not spans:
        return out
    end, last = spans[0][1], spans[0][2]
    for a, b, name in spans[1:]:
        if a > end:
            out[(last, name)].append(a - end)
        if b >= end:
            end, last = b, name
    return out


def gaps_summary(gaps: dict[tuple[str, str], list[float]], top: int) -> list[str]:
    total = sum(sum(v) for v in gaps.values())
    lines = [f"idle between kernels: {total / 1e3:.2f} ms in {sum(map(len, gaps.values()))} gaps"]
    for (a, b), d in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"  {sum(d) / 1e3:8.3f} ms {len(d):6d}x {sum(d) / len(d):8.2f} us each  {a} -> {b}")
    return lines


# XLA:CPU's threads that run a program: its client's (a host device each) and its intra-op pool's.
CPU_THREADS = ("tf_XLAPjRtCpuClient", "tf_XLAEigen")
# A thread's waits: at a collective for the other devices (`Wait: pending_threads` falls inside its `Rendezvous`), and
# for its thunks run on the pool.
CPU_WAITS = ("Rendezvous", "ThunkExecutor::Execute (wait for completion)")


def cpu_threads(trace: dict) -> dict[str, dict[str, list[float]]]:
    """Thread name -> event name -> durations (us), for XLA:CPU's program threads (CPU_THREADS)."""
    names = {(e["pid"], e.get("tid")): str(e["args"].get("name", "")) for e in trace.get("traceEvents", [])
             if e.get("ph") == "M" and e.get("name") == "thread_name"}  # fmt: skip
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in trace.get("traceEvents", []):
        thread = names.get((e.get("pid"), e.get("tid")), "")
        if e.get("ph") == "X" and "dur" in e and thread.startswith(CPU_THREADS):
            out[thread][e["name"]].append(float(e["dur"]))
    return out


def cpu_summary(threads: dict[str, dict[str, list[float]]], top: int) -> list[str]:
    """Each thread's `top` events by total time, after a line with its waits (CPU_WAITS) summed."""
    lines = []
    for thread, events in sorted(threads.items(), key=lambda kv: -sum(map(sum, kv[1].values()))):
        waits = sum(sum(d) for name, d in events.items() if name in CPU_WAITS)
        lines.append(f"{thread}: waits {waits / 1e3:.2f} ms (at collectives and for the pool)")
        for name, d in sorted(events.items(), key=lambda kv: -sum(kv[1]))[:top]:
            lines.append(f"{sum(d) / 1e3:9.3f} ms {len(d):6d}x  {name[:100]}")
    return lines


def host_spans(trace: dict, names: tuple[str, ...]) -> dict[str, list[float]]:
    """Span name -> durations (us) of the host's complete events with those names."""
    gpu = _gpu_pids(trace)
    out: dict[str, list[float]] = defaultdict(list)
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("pid") not in gpu and e.get("name") in names and "dur" in e:
            out[e["name"]].append(float(e["dur"]))
    return out


Source = tuple[str, str | None]  # (op, "file:line function" or None): where an XLA kernel came from


def summary(kernels: dict[str, list[float]], top: int, sources: dict[str, Source] | None = None) -> list[str]:
    """The `top` kernels by total time; `sources` (`hlo_sources`) adds where an XLA fusion came from."""
    total = sum(sum(d) for d in kernels.values()) or 1.0
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    lines = [f"all kernels: {total / 1e3:.2f} ms in {sum(len(d) for d in kernels.values())} launches"]
    for name, d in rows[:top]:
        source = (sources or {}).get(name)
        lines.append(f"{sum(d) / 1e3:9.3f} ms {100 * sum(d) / total:5.1f}% {len(d):6d}x  {name[:100]}"
                     + (f"  <- {_said(source)}" if source else ""))  # fmt: skip
    return lines


def _said(source: Source) -> str:
    op, where = source
    return op + (f" ({where})" if where else "")


_TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')  # the module's FileNames .. StackFrames tables
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*\bmetadata=\{([^}]*)\}")


def hlo_sources(text: str) -> dict[str, Source]:
    """Kernel name -> (op, "file:line function" or None) for each instruction of an HLO module's text that has
    metadata: the kernel is the instruction's name with '.' and '-' as '_' (how XLA names a fusion's kernel), the op
    the last two parts of its op_name, the line its stack frame's (XLA's FileNames / FunctionNames / FileLocations /
    StackFrames tables) or its source_file / source_line (older dumps)."""
    tables: dict[str, dict[int, str]] = defaultdict(dict)
    section = ""
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif m := _TABLE_ROW.match(line):
            tables[section][int(m[1])] = m[2] if m[2] is not None else m[3]
        elif line.startswith(("HloModule", "ENTRY", "%", " ")) or not line:
            section = ""

    def field(row: str, key: str) -> str | None:
        m = re.search(rf"\b{key}=(\S+)", row)
        return m[1] if m else None

    def frame(frame_id: str) -> str | None:
        location = tables["FileLocations"].get(int(field(tables["StackFrames"].get(int(frame_id), ""),
                                                             "file_location_id") or 0), "")  # fmt: skip
        if not location:
            return None
        file = tables["FileNames"].get(int(field(location, "file_name_id") or 0), "?")
        function = tables["FunctionNames"].get(int(field(location, "function_name_id") or 0), "?")
        return f"{Path(file).name}:{field(location, 'line')} {function}"

    out = {}
    for line in text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        meta = m[2]
        op = re.search(r'op_name="([^"]*)"', meta)
        where = None
        if stack := re.search(r"stack_frame_id=(\d+)", meta):
            where = frame(stack[1])
        elif (file := re.search(r'source_file="([^"]*)"', meta)) and (at := re.search(r"source_line=(\d+)", meta)):
            where = f"{Path(file[1]).name}:{at[1]}"
        out[re.sub(r"[.\-]", "_", m[1])] = ("/".join(op[1].split("/")[-2:]) if op else "?", where)
    return out


def by_source(kernels: dict[str, list[float]], sources: dict[str, Source], top: int) -> list[str]:
    """The kernels that `sources` knows (XLA's own: fusions, copies, scatters) summed by their line of Python (the
    op where no line is known), the most time first: where the small kernels between the Pallas ones come from,
    launches included."""
    total: dict[str, list[float]] = defaultdict(list)
    for name, d in kernels.items():
        if name in sources:
            op, where = sources[name]
            total[where or op] += d
    rows = sorted(total.items(), key=lambda kv: -sum(kv[1]))
    lines = [f"XLA's kernels by line: {sum(sum(d) for d in total.values()) / 1e3:.2f} ms in "
             f"{sum(len(d) for d in total.values())} launches"]  # fmt: skip
    lines += [f"{sum(d) / 1e3:9.3f} ms {len(d):6d}x  {where}" for where, d in rows[:top]]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--hlo", help="the traced program's optimized HLO text: where each XLA fusion came from")
    args = ap.parse_args()
    sources = hlo_sources(Path(args.hlo).read_text()) if args.hlo else None
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        trace = json.load(f)
    kernels = device_kernels(trace)
    spans = host_spans(trace, SPANS)
    threads = {} if kernels else cpu_threads(trace)
    if not kernels and not spans and not threads:
        names = sorted({str(e.get("args", {}).get("name")) for e in trace.get("traceEvents", []) if e.get("ph") == "M"})
        raise SystemExit(
            f"{args.trace}: no GPU process or XLA:CPU thread among {', '.join(names[:20])}, and no engine spans"
        )
    if kernels:
        print("\n".join(summary(kernels, args.top, sources)))
        if sources:
            print("\n".join(by_source(kernels, sources, args.top)))
        window, busy = device_busy(trace)
        print(f"device busy {busy / 1e3:.2f} of {window / 1e3:.2f} ms ({busy / max(window, 1.0):.1%}: kernel union)")
        print("\n".join(gaps_summary(device_gaps(trace), min(args.top, 10))))
    if threads:
        print("\n".join(cpu_summary(threads, args.top)))
    for name in SPANS:
        if spans.get(name):
            d = spans[name]
            print(f"host {name:16s} {sum(d) / 1e3:9.2f} ms in {len(d):4d}, {sum(d) / len(d) / 1e3:7.2f} ms each")


if __name__ == "__main__":
    main()
