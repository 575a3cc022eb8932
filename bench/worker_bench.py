"""The worker's own numbers for one GGUF file on one device, measured in this process through the Python API:
load time, batch-1 decode and prefill tokens/s, peak device memory, and the device's copy bandwidth with the
fraction of the memory-bandwidth floor (bench/floor.py) that decode reaches.

Run as `python -m bench.worker_bench --model FILE --device gpu --json OUT` (bench/__main__.py does, in a child
process, so that each model starts with an empty device and its peak memory is its own).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

import worker  # sets XLA_PYTHON_CLIENT_PREALLOCATE, read when JAX's backend starts (first use, not import)
from bench.floor import decode_bytes
from server import cli
from worker import device as devices
from worker.cores import usable_cores

SHORT_PROMPT = "Write a haiku about GPU computing"
# Plain English: every tokenizer encodes it without unknown pieces; repeated to reach the prefill length.
LONG_TEXT = (
    "The worker loads one model file, places its quantized weights on the device and answers requests one at a "
    "time. Each request is tokenized, fed through the model in a single prefill pass, and then extended one token "
    "per step until it reaches its budget or an end-of-turn token. "
)


def prompt_of(tokenizer, n: int) -> list[int]:
    """Exactly `n` ids of real text (BOS first where the file asks for one)."""
    ids = tokenizer.encode(LONG_TEXT)
    while len(ids) < n:
        ids += tokenizer.encode(LONG_TEXT, add_bos=False)
    return ids[:n]


# Prefill runs at least this long in all (and `repeats` runs at least): a 512-token prompt takes 7-20 ms on a GPU,
# where the median of three runs moved by 1.4x between calls (qwen2.5-0.5b on an H100, 2026-12-06: runs of 20.2,
# 7.3 and 10.3 ms); llama-bench averages five.
PREFILL_SECONDS = 1.0
PREFILL_MAX_RUNS = 100


def time_prefill(m, ids: list[int], repeats: int, seconds: float = 0.0) -> list[float]:
    """Seconds per prefill of `ids` until its first sampled id is on the host, `repeats` runs and then more until
    `seconds` in all (at most PREFILL_MAX_RUNS). Through `generate_ids`, so the model's own KV cache is used: a
    second cache would inflate the peak memory reported."""
    times: list[float] = []
    while len(times) < repeats or (sum(times) < seconds and len(times) < PREFILL_MAX_RUNS):
        start = time.perf_counter()
        produced = list(m.generate_ids(ids, max_tokens=1, stop_at_eos=False))
        times.append(time.perf_counter() - start)
        if len(produced) != 1:
            raise RuntimeError(f"a prefill produced {len(produced)} ids, not 1")
    return times


def time_decode(m, ids: list[int], n_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the `n_tokens` after it) of one greedy generation. Each id is read
    back to the host as it is produced, as a client would receive it."""
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in m.generate_ids(ids, max_tokens=n_tokens + 1, stop_at_eos=False)]
    if len(stamps) != n_tokens + 1:
        raise RuntimeError(f"generation stopped after {len(stamps)} tokens, not {n_tokens + 1}")
    return stamps[0] - start, stamps[-1] - stamps[0]


def steps_sweep(m, ids: list[int], n_tokens: int, counts: list[int], repeats: int) -> dict[int, float]:
    """Batch-1 decode tok/s at each steps-a-dispatch count (issue 15: the count should barely matter, so that
    cancel stays well inside its bound without costing speed); the model's own count is restored after."""
    own, out = m.batch.steps, {}
    try:
        for steps in counts:
            m.batch.steps = steps
            time_decode(m, ids, n_tokens)  # compiles this count's dispatch
            out[steps] = n_tokens / statistics.median(time_decode(m, ids, n_tokens)[1] for _ in range(repeats))
    finally:
        m.batch.steps = own
    return out


def copy_bandwidth(device: jax.Device, nbytes: int, repeats: int = 10, inner: int = 10) -> float:
    """Bytes per second (read + written) of an elementwise pass over a float32 buffer of `nbytes` on `device`:
    the practical ceiling for any memory-bound kernel there. Two buffers alternate and each timing covers
    `inner` queued passes, so neither a cache nor the host's dispatch cost shapes the figure."""
    step = jax.jit(lambda x: x + 1.0)
    xs = [jax.device_put(np.random.default_rng(i).random(nbytes // 4, np.float32), device) for i in range(2)]
    step(xs[0]).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(inner):
            y = step(xs[i % 2])
        y.block_until_ready()
        times.append((time.perf_counter() - start) / inner)
    return 2 * (nbytes // 4 * 4) / statistics.median(times)


def host_copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Bytes per second (read + written) of numpy's copy on the host. On the CPU, XLA's elementwise pass reaches
    a quarter of what the memory gives (one thread), and llama.cpp decodes faster than that figure would allow;
    the floor there takes the faster of the two."""
    x = np.random.default_rng(0).random(nbytes // 4, np.float32)
    y = np.empty_like(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(y, x)
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)


def device_info(dev: jax.Device) -> dict:
    info = {"platform": dev.platform, "kind": dev.device_kind, "jax": jax.__version__}
    if dev.platform == "cpu":
        info["cpu"] = cpu_model()
        info["cores"] = usable_cores()
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def peak_memory(m) -> tuple[int, str]:
    stats = devices.memory_stats(m.device)
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def host_rss() -> dict[str, int]:
    """This process's resident host memory now, in bytes: `anon` (heap, staging copies: what loading must not fill
    with the file) and `file` (mapped file pages, such as the GGUF's mmap, which the kernel can drop at will)."""
    fields = {"RssAnon:": "anon", "RssFile:": "file"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, *rest = line.split()
        if key in fields:
            out[fields[key]] = int(rest[0]) * 1024  # kB
    return out


class LoadMemory:
    """The load's progress callback: keeps the highest anonymous and file-backed RSS seen after each tensor."""

    def __init__(self):
        self.peak_anon = self.peak_file = 0
        self.events = 0

    def __call__(self, done: int, total: int) -> None:
        rss = host_rss()
        self.peak_anon = max(self.peak_anon, rss.get("anon", 0))
        self.peak_file = max(self.peak_file, rss.get("file", 0))
        self.events += 1


def run(model: str, device: str, prompt_tokens: int, decode_tokens: int, repeats: int, tensor_parallel: int = 1,
        cpu_devices: int | None = 1, sweep: list[int] = (), max_batch: int | None = None,
        int8_x: bool = False) -> dict:  # fmt: skip
    """`max_batch` (default the server's) picks the decode kernels as --max-batch does; `cpu_devices`, `int8_x`:
    worker.load's."""
    start = time.perf_counter()
    memory = LoadMemory()
    m = worker.load(model, device=device, on_progress=memory, tensor_parallel=tensor_parallel,
                    cpu_devices=cpu_devices, int8_x=int8_x, max_batch=max_batch)  # fmt: skip
    jax.block_until_ready(m.runner.weights)
    load_s = time.perf_counter() - start
    memory(0, 0)  # after the last copy has finished
    load_peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loaded_bytes = m.device_bytes_used()  # what /health reports as vram_bytes_used (all the model's devices)
    per_device = m.device_report()
    short = m.tokenizer.encode(SHORT_PROMPT)
    long = prompt_of(m.tokenizer, prompt_tokens)

    start = time.perf_counter()  # compile every shape the timed runs use
    time_prefill(m, long, 1)
    time_decode(m, short, decode_tokens)
    warmup_s = time.perf_counter() - start

    prefill = time_prefill(m, long, repeats, PREFILL_SECONDS)
    decode = [time_decode(m, short, decode_tokens) for _ in range(repeats)]
    peak, peak_kind = peak_memory(m)  # before the sweep's compiles
    by_steps = steps_sweep(m, short, decode_tokens, sweep, repeats)
    on_cpu = m.device.platform == "cpu"
    bandwidths = {"jax_elementwise": copy_bandwidth(m.device, (256 << 20) if on_cpu else (1 << 30))}
    if on_cpu:
        bandwidths["numpy_copy"] = host_copy_bandwidth(256 << 20)
    bandwidth = max(bandwidths.values())
    floor = decode_bytes(m.gguf, len(short), decode_tokens)
    decode_tok_s = decode_tokens / statistics.median(d for _, d in decode)
    floor_tok_s = bandwidth / floor.total
    return {
        "engine": "worker",
        "model": str(Path(model).resolve()),
        "architecture": m.architecture,
        "quant_kind": m.quant_kind,
        "file_bytes": Path(model).stat().st_size,
        "device": device_info(m.device),
        "load_s": load_s,
        "load_host_peak_rss_bytes": load_peak_rss,
        "load_host_peak_anon_bytes": memory.peak_anon,
        "load_host_peak_file_bytes": memory.peak_file,
        "load_progress_events": memory.events - 1,
        "loaded_device_bytes": loaded_bytes,
        "tensor_parallel": tensor_parallel,
        "devices": len(m.devices),
        "layout": m.layout,
        "cpu_kernel": m.cpu_kernel,
        "max_batch": m.runner.max_batch,
        "decode_kernels": m.cfg.decode_kernels,
        "loaded_bytes_per_device": [d["bytes_in_use"] for d in per_device],
        "warmup_compile_s": warmup_s,
        "prompt_tokens": prompt_tokens,
        "short_prompt_tokens": len(short),
        "decode_tokens": decode_tokens,
        "prefill_s": prefill,
        "prefill_tok_s": prompt_tokens / statistics.median(prefill),
        "first_token_s": [f for f, _ in decode],
        "decode_s": [d for _, d in decode],
        "decode_tok_s": decode_tok_s,
        "decode_steps_per_dispatch": m.decode_steps,
        "decode_tok_s_by_steps": by_steps,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "weight_bytes": m.weight_bytes(),
        "kv_cache_bytes": m.runner.cache_bytes(),
        "kv_pool_positions": m.runner.pages * m.runner.page_size,
        "context_length": m.context_length,
        "copy_bandwidth_bytes_s": bandwidth,
        "copy_bandwidths_bytes_s": bandwidths,
        "bytes_per_token": floor.as_dict(),
        "floor_decode_tok_s": floor_tok_s,
        "decode_floor_fraction": decode_tok_s / floor_tok_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--json", type=Path, required=True, help="where to write the result")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tensor-parallel", type=int, default=1, help="split the model over this many devices")
    ap.add_argument("--cpu-devices", type=int, default=None, help="on the CPU, the model over N host devices "
                    "(default: the server's, worker-orcd --cpu-devices)")  # fmt: skip
    ap.add_argument("--max-batch", type=int, default=None, help="the load's max_batch, which picks the decode "
                    "kernels (default: the server's; 8 or fewer: the per-row kernels)")  # fmt: skip
    ap.add_argument("--int8-x", action="store_true", help="decode's matvecs on x rounded to int8 (worker.load's "
                    "int8_x; another precision, docs/kernels.md)")  # fmt: skip
    ap.add_argument("--steps-sweep", default=None, help="comma-separated steps-a-dispatch counts to time decode at "
                    "as well (default on a GPU 8,16,32,64; none on the CPU, whose dispatch is one step)")  # fmt: skip
    args = ap.parse_args(argv)
    sweep = args.steps_sweep if args.steps_sweep is not None else "8,16,32,64" if args.device == "gpu" else ""
    counts = [int(s) for s in sweep.split(",") if s]
    spread = 1
    if args.device == "cpu":  # the server's host devices, made before JAX's backend starts (at its first use)
        cli.host_devices(args.tensor_parallel if args.tensor_parallel > 1 else args.cpu_devices or
                         cli.default_cpu_devices())  # fmt: skip
        spread = None if args.tensor_parallel == 1 else 1
    result = run(args.model, args.device, args.prompt_tokens, args.decode_tokens, args.repeats, args.tensor_parallel,
                 spread, counts, args.max_batch, args.int8_x)  # fmt: skip
    args.json.write_text(json.dumps(result, indent=1))
    print(
        f"worker {Path(args.model).name} on {result['device']['kind']} ({result['decode_kernels']} decode kernels): "
        f"decode {result['decode_tok_s']:.1f} tok/s, "
        f"prefill {result['prefill_tok_s']:.1f} tok/s, load {result['load_s']:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
