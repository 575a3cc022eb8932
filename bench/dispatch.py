"""Where a decode dispatch's time goes: `python -m bench.dispatch --model FILE [--device gpu] [--trace DIR]`.

For each steps-per-dispatch count, the time of one synchronized decode dispatch (median of several), the fit
time = fixed + steps * per_step, the cost of launching a jitted call that takes the whole weights pytree, and the
pipelined generation the worker really runs (Model.generate_ids). --trace writes a JAX profiler trace (perfetto
JSON) of three 8-step dispatches, to read where the fixed part goes. docs/PERFORMANCE.md has the readings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

import worker
from worker.kv_cache import pages_for, table_row
from worker.model import GREEDY
from worker.runner import RowInputs
from worker.sampling import SamplingParams

STEPS = (1, 8, 16, 32, 64)
PROMPT = "Write a haiku about GPU computing"


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def single_row(m: worker.Model, ids: list[int], params: SamplingParams = GREEDY):
    """`ids` prefilled on pages of a cache of its own, its first token in row 0: returns dispatch(steps), one
    decode dispatch of that row (at the smallest row bucket) from the same position each time, left on the
    device."""
    r, plan, most = m.runner, params.plan(), max(STEPS)
    pages = list(range(1, pages_for(len(ids) + most, r.page_size) + 1))
    logits, cache = r.prefill(ids, pages, r.new_cache(len(pages) + 1))
    token, seen, _ = r.first_token(logits, RowInputs.neutral(1, 1), ids, plan)
    inputs = RowInputs.neutral(r.min_rows, r.table_width(len(ids) + most))
    inputs.positions[0], inputs.index[0] = len(ids), 1
    inputs.tables[0] = table_row(pages, inputs.tables.shape[1])
    state = {"rows": r.join(r.new_rows(), 0, token, seen), "cache": cache}

    def dispatch(steps: int) -> jax.Array:
        out, state["rows"], state["cache"], _ = r.decode(state["rows"], state["cache"], inputs, steps, plan)
        return out

    return dispatch


def run(path: str, device: str, repeats: int, trace: str | None) -> dict:
    m = worker.load(path, device=device)
    r, ids = m.runner, m.tokenizer.encode(PROMPT)
    decode = single_row(m, ids)

    def dispatch(steps: int):
        decode(steps).block_until_ready()

    result: dict = {"model": path, "device": str(m.device), "leaves": len(jax.tree_util.tree_leaves(r.weights))}
    result["dispatch_s"] = {s: _median_time(lambda s=s: dispatch(s), repeats) for s in STEPS}
    xs = np.array(STEPS[1:], float)
    ys = np.array([result["dispatch_s"][s] for s in STEPS[1:]])
    per_step, fixed = np.polyfit(xs, ys, 1)
    result["fit"] = {"fixed_s": float(fixed), "per_step_s": float(per_step)}

    touch = jax.jit(lambda w, x: x + 1)
    x0 = jax.device_put(np.float32(0), m.device)
    result["weights_call_s"] = _median_time(lambda: touch(r.weights, x0).block_until_ready(), repeats)
    result["empty_call_s"] = _median_time(lambda: touch({}, x0).block_until_ready(), repeats)

    def generate(steps: int) -> float:
        m.batch.steps = steps
        start = time.perf_counter()
        n = sum(1 for _ in m.generate_ids(ids, max_tokens=129, stop_at_eos=False))
        assert n == 129, n
        return time.perf_counter() - start

    result["generate_129_s"] = {s: _median_time(lambda s=s: generate(s), 3) for s in STEPS[1:]}
    if trace:
        dispatch(8)
        jax.profiler.start_trace(trace, create_perfetto_trace=True)
        for _ in range(3):
            dispatch(8)
        jax.profiler.stop_trace()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--trace", default=None, help="folder for a JAX profiler trace of three 8-step dispatches")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = run(args.model or str(worker.default_model_path()), args.device, args.repeats, args.trace)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
