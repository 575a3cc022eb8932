"""Where a decode step's time goes on the CPU: jitted pieces of a model, each timed on its own, with the process's
user and system CPU time and minor page faults per call (getrusage) and XLA's temp allocation per call, so the
shares hold even on a shared, noisy machine where wall times do not.

    python -m bench.cpu_step [--model FILE] [--reps 7] [--prefill 512]

Pieces: one decode dispatch (one greedy step), the output projection (norm + output matrix) on one hidden state,
the layers on one token, and, for the first layer, each weight's matmul alone; then sampling (greedy and
drawn) and a prefill of --prefill tokens. docs/PERFORMANCE.md ("CPU") has the readings.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

import worker
from bench.dispatch import single_row
from worker import ops
from worker.kv_cache import pages_for
from worker.quant import Int8Blocks, QuantArray
from worker.runner import RowInputs
from worker.sampling import SamplingParams


def measure(name: str, fn: Callable[[], object], reps: int, temp_bytes: int | None = None) -> None:
    jax.block_until_ready(fn())  # compile and warm
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    times.sort()
    user, system = (after.ru_utime - before.ru_utime) / reps, (after.ru_stime - before.ru_stime) / reps
    faults = (after.ru_minflt - before.ru_minflt) / reps
    temp = "" if temp_bytes is None else f"  temp {temp_bytes / 2**20:7.1f} MiB"
    print(
        f"{name:44s} min {1e3 * times[0]:8.2f} ms  median {1e3 * times[reps // 2]:8.2f} ms  "
        f"user {1e3 * user:7.1f} ms  sys {1e3 * system:6.1f} ms  faults {faults:8.0f}{temp}",
        flush=True,
    )


def temp_of(jitted, *args) -> int:
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu_step", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF file (default: the embedded Gemma 3 270M)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the timed prefill (0: none)")
    args = ap.parse_args(argv)
    m = worker.load(args.model or worker.default_model_path(), device="cpu")
    r, w, cfg, adapter = m.runner, m.runner.weights, m.runner.cfg, m.runner.adapter
    print(f"{m.path.name}: weights {m.weight_bytes() / 2**20:.0f} MiB in device memory; {args.reps} calls each")

    ids = m.tokenizer.encode("The capital of France is")
    greedy = SamplingParams()
    measure("decode dispatch (1 greedy step)", partial(single_row(m, ids, greedy), 1), args.reps)
    hidden = jnp.zeros((1, 1, cfg.d_model), jnp.float32)
    project = jax.jit(lambda w, h: adapter.logits(w, cfg, h))
    measure("output projection (1 token)", lambda: project(w, hidden), args.reps, temp_of(project, w, hidden))
    forward = jax.jit(lambda w, t, p, c, tb: adapter.forward(w, cfg, t, p, c, tb), donate_argnums=(3,))
    tok, pos = jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), len(ids), jnp.int32)
    n_pages = pages_for(max(args.prefill, 256), r.page_size)
    pages = jnp.arange(1, n_pages + 1, dtype=jnp.int32)[None]
    state = {"cache": r.new_cache(n_pages + 1)}
    temp = temp_of(forward, w, tok, pos, state["cache"], pages)

    def layers():
        h, state["cache"] = forward(w, tok, pos, state["cache"], pages)
        return h

    measure(f"{cfg.n_layers} layers (1 token)", layers, args.reps, temp)
    for name, weight in jax.tree_util.tree_leaves_with_path(
        w["layers"][0], is_leaf=lambda x: isinstance(x, QuantArray | Int8Blocks)
    ):
        if isinstance(weight, QuantArray | Int8Blocks) and len(weight.shape) == 2:
            x = jnp.ones((1, 1, weight.shape[-1]), jnp.float32)
            label = f"  layer 0 {jax.tree_util.keystr(name)} {weight.qtype.name} {weight.shape}"
            measure(label, lambda x=x, weight=weight: jax.jit(ops.qmatmul)(x, weight), args.reps)
    row = jnp.zeros((1, cfg.vocab_size), jnp.float32)
    for label, params in (("sample (greedy)", greedy), ("sample (temperature 1)", SamplingParams(temperature=1.0))):
        inputs = RowInputs.neutral(1, 1)
        inputs.temperature[0] = params.temperature
        sample = partial(r.first_tokens, row, inputs, [(0, ids)], params.plan())
        measure(label, sample, args.reps)
    if args.prefill:
        prompt = list(range(1000, 1000 + args.prefill))

        def prefill():
            out, state["cache"] = r.prefill(prompt, list(range(1, n_pages + 1)), state["cache"])
            return out

        measure(f"prefill ({args.prefill} tokens)", prefill, max(1, args.reps // 2))


if __name__ == "__main__":
    main()
