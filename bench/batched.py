"""The continuous batch without HTTP: `python -m bench.batched --model FILE [--device gpu] [--seqs 1,8,64]`.

For each count N, N sequences of --prompt random tokens (distinct prompts) join `Model.batch` at once and each
generates --tokens greedy ids (no end-of-generation stop); the aggregate output tok/s from the first step to the
last id, run twice: the first round pays the compiles of the row buckets it reaches (and says so), the second is
the steady state. It isolates the engine from the HTTP server and client that `bench.load` includes; the readings
are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import time

import worker
from worker.sampling import SamplingParams


def run_round(m: worker.Model, prompts: list[list[int]], tokens: int) -> dict:
    """One round: aggregate tok/s, the seconds until every sequence had its first id, and the decode dispatches'
    count and mean sequences (how full the batch ran)."""
    batch, produced, done, started, dispatched = m.batch, 0, 0, set(), []
    batch.on_decode = dispatched.append
    for i, ids in enumerate(prompts):
        batch.add(m.sequence(ids, tokens, SamplingParams(), i, stop_at_eos=False, owner=i))
    start, all_started = time.perf_counter(), None
    while done < len(prompts):
        for d in batch.step():
            produced += len(d.tokens)
            done += d.finished is not None
            if d.tokens:
                started.add(d.seq.owner)
        if all_started is None and len(started) == len(prompts):
            all_started = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return {"tok_s": produced / elapsed, "all_started_s": all_started, "dispatches": len(dispatched),
            "mean_rows": sum(dispatched) / max(len(dispatched), 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.batched", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the embedded Gemma 3 270M)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--seqs", default="1,8,64", help="comma-separated sequence counts")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per sequence")
    ap.add_argument("--kv-tokens", type=int, help="KV pool positions (default: the worker's sizing)")
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.seqs.split(",")]
    t0 = time.perf_counter()
    m = worker.load(args.model or worker.default_model_path(), device=args.device, max_batch=max(counts),
                    kv_tokens=args.kv_tokens)  # fmt: skip
    print(f"loaded in {time.perf_counter() - t0:.1f} s; {m.decode_steps} steps a dispatch", flush=True)
    vocab = m.cfg.vocab_size
    prompts = [[(7 * i + 13 * j) % (vocab - 300) + 256 for j in range(args.prompt)] for i in range(max(counts))]
    results = []
    for n in counts:
        first, steady = (run_round(m, prompts[:n], args.tokens) for _ in range(2))
        results.append({"seqs": n, "first_round_tok_s": first["tok_s"], **steady})
        print(
            f"{n} sequences: {steady['tok_s']:.1f} tok/s aggregate (first round, with its compiles: "
            f"{first['tok_s']:.1f}); all started after {steady['all_started_s']:.3f} s; {steady['dispatches']} "
            f"decode dispatches of {steady['mean_rows']:.1f} sequences on average",
            flush=True,
        )
    print(json.dumps({"model": m.path.name, "device": str(m.device), "results": results}))


if __name__ == "__main__":
    main()
