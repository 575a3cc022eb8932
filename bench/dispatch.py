"""Where a decode dispatch's time goes: `python -m bench.dispatch --model FILE [--device gpu] [--trace DIR]`.

For each steps-per-dispatch count, the time of one synchronized decode dispatch (median of several), the fit
time = fixed + steps * per_step, the cost of launching a jitted call that takes the whole weights pytree, and the
pipelined generation the worker really runs (Model.generate_ids). `--rows 1,8,64` instead times one dispatch of
that many rows decoding together (the continuous batch's step), after timing the compile of the largest row bucket
(tracing and lowering apart from XLA's compile), the host's side of queued one-step dispatches of the most rows
(`queued_dispatches`), and the prefill of 1, 8 and the most 128-token prompts in one dispatch against one dispatch
each. --trace writes a JAX profiler trace (perfetto
JSON) of three 8-step dispatches, to read where the fixed part goes (with --rows: of the most rows' dispatch, and
in DIR-prefill of the largest prefill group); `python -m bench.trace` sums one by kernel. docs/PERFORMANCE.md has
the readings.
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
from worker.pallas_kernels import moe_matmul, qmatvec
from worker.runner import RowInputs
from worker.sampling import SamplingParams

STEPS = (1, 8, 16, 32, 64)
PREFILL_TOKENS = 128  # the load bench's prompts
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
    return rows_dispatch(m, ids, 1, params)


def rows_dispatch(m: worker.Model, ids: list[int], n: int, params: SamplingParams = GREEDY):
    """`single_row` for n rows: each row its own sequence (its own pages); row 0 holds `ids`, row i > 0 `ids` with
    each id shifted by 7919 * i (distinct prompts, so an MoE's rows route to different experts, as streams do);
    one dispatch decodes all n together (at the row bucket of n)."""
    r, plan, most = m.runner, params.plan(), max(STEPS)
    per_row = pages_for(len(ids) + most, r.page_size)
    cache, rows = r.new_cache(n * per_row + 1), r.new_rows()
    inputs = RowInputs.neutral(r.row_bucket(n), r.table_width(len(ids) + most))
    for row in range(n):
        pages = list(range(1 + row * per_row, 1 + (row + 1) * per_row))
        prompt = [(t + 7919 * row) % m.cfg.vocab_size for t in ids]
        logits, cache = r.prefill(prompt, pages, cache)
        token, seen, _ = r.first_tokens(logits, RowInputs.neutral(logits.shape[0], 1), [(0, prompt)], plan)
        rows = r.join(rows, [(0, row)], token, seen)
        inputs.positions[row], inputs.index[row] = len(ids), 1
        inputs.tables[row] = table_row(pages, inputs.tables.shape[1])
    state = {"rows": rows, "cache": cache}

    def dispatch(steps: int) -> jax.Array:
        out, state["rows"], state["cache"], _ = r.decode(state["rows"], state["cache"], inputs, steps, plan)
        return out

    dispatch.state, dispatch.inputs = state, inputs  # for queued_dispatches, which times the parts of a dispatch
    return dispatch


def rows_sweep(m: worker.Model, ids: list[int], counts: list[int], steps: int, repeats: int,
               trace: str | None) -> dict:  # fmt: skip
    """Per row count: one synchronized `steps`-step dispatch of that many rows (median), the time a step and the
    decode tok/s it gives (rows * steps / time); --trace: a profiler trace of the largest count."""
    out = {}
    for n in counts:
        decode = rows_dispatch(m, ids, n)
        t = _median_time(lambda decode=decode: decode(steps).block_until_ready(), repeats)
        out[n] = {"dispatch_s": t, "step_ms": 1e3 * t / steps, "tok_s": n * steps / t}
        print(f"{n} rows: {1e3 * t / steps:.3f} ms a step, {n * steps / t:.0f} tok/s", flush=True)
        if trace and n == max(counts):
            jax.profiler.start_trace(trace, create_perfetto_trace=True)
            for _ in range(2):
                decode(steps).block_until_ready()
            jax.profiler.stop_trace()
    return out


def queued_dispatches(m: worker.Model, ids: list[int], n: int, repeats: int) -> dict:
    """The engine's pattern at n rows, one step a dispatch: dispatch k+1 while k runs, then read k's ids back. Host
    milliseconds of each part, medians: `put` (the rows' inputs to the device), `call` (the jitted decode's
    launch), `wait` (k's ids on the host), and the whole iteration. A launch that takes as long as a step means
    the host waited for the device there, and a dispatch no longer overlaps the previous one's host work. Then the
    same with the inputs put once (`call_preput`): whether the transfer or the launch waits."""
    r, plan = m.runner, GREEDY.plan()
    decode = rows_dispatch(m, ids, n)
    decode(1).block_until_ready()  # compiles
    st, inputs = decode.state, decode.inputs  # the rows, cache and row inputs, driven below part by part
    times: dict[str, list[float]] = {"put": [], "call": [], "wait": [], "iteration": [], "call_preput": []}
    pending = None
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        sp, keys, index, pos, table = r._row_arrays(inputs, "positions", "tables")
        t1 = time.perf_counter()
        out, tokens, seen, st["cache"], _ = r._decode(r.weights, st["rows"].tokens, st["rows"].seen, pos, table,
                                                       index, st["cache"], sp, keys, 1, plan)  # fmt: skip
        st["rows"] = type(st["rows"])(tokens, seen)
        out.copy_to_host_async()
        t2 = time.perf_counter()
        if pending is not None:
            np.asarray(pending)
        t3 = time.perf_counter()
        pending = out
        if i >= 2:
            for k, v in (("put", t1 - t0), ("call", t2 - t1), ("wait", t3 - t2), ("iteration", t3 - t0)):
                times[k].append(v)
    np.asarray(pending)
    arrays, pending = r._row_arrays(inputs, "positions", "tables"), None
    for i in range(repeats + 2):
        sp, keys, index, pos, table = arrays
        t1 = time.perf_counter()
        out, tokens, seen, st["cache"], _ = r._decode(r.weights, st["rows"].tokens, st["rows"].seen, pos, table,
                                                       index, st["cache"], sp, keys, 1, plan)  # fmt: skip
        st["rows"] = type(st["rows"])(tokens, seen)
        t2 = time.perf_counter()
        if pending is not None:
            np.asarray(pending)
        pending = out
        if i >= 2:
            times["call_preput"].append(t2 - t1)
    np.asarray(pending)
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out["weight_leaves"] = len(jax.tree_util.tree_leaves(r.weights))
    print(f"{n} rows queued, host ms (median): " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
    return out


def prefill_sweep(m: worker.Model, counts: list[int], tokens: int, repeats: int, trace: str | None = None) -> dict:
    """Per count G: the prompts of G sequences (`tokens` ids each, distinct) prefilled in one dispatch
    (Runner.prefill_group, synchronized; median) against one dispatch each, back to back as a queue of
    dispatches; prompt tok/s = G * tokens / time. `trace`: a profiler trace of two dispatches of the largest G."""
    r, out = m.runner, {}
    per = pages_for(tokens, r.page_size)
    for g in counts:
        if g > r.group_limit(tokens):
            print(f"prefill of {g} x {tokens}: more than one dispatch takes ({r.group_limit(tokens)})", flush=True)
            continue
        chunks = [([(7 + 7919 * i + t) % m.cfg.vocab_size for t in range(tokens)], list(range(1 + i * per,
                   1 + (i + 1) * per)), 0) for i in range(g)]  # fmt: skip
        state = {"cache": r.new_cache(g * per + 1)}

        def dispatches(groups: list[list], state: dict = state) -> None:
            for group in groups:
                logits, state["cache"] = r.prefill_group(group, state["cache"])
            logits.block_until_ready()

        t1 = _median_time(lambda c=chunks: dispatches([c]), repeats)
        t2 = _median_time(lambda c=chunks: dispatches([[one] for one in c]), repeats)
        out[g] = {"group_s": t1, "apart_s": t2, "group_tok_s": g * tokens / t1, "apart_tok_s": g * tokens / t2}
        if trace and g == max(counts):
            jax.profiler.start_trace(trace, create_perfetto_trace=True)
            dispatches([chunks, chunks])
            jax.profiler.stop_trace()
        print(f"prefill of {g} x {tokens}: one dispatch {1e3 * t1:.2f} ms ({g * tokens / t1:.0f} tok/s), one a "
              f"sequence {1e3 * t2:.2f} ms ({g * tokens / t2:.0f} tok/s)", flush=True)  # fmt: skip
    return out


def compile_times(m: worker.Model, rows: int, steps: int) -> dict:
    """Seconds to trace + lower, and to compile, the decode dispatch at one row bucket (not yet compiled)."""
    r = m.runner
    inputs = RowInputs.neutral(rows, r.table_width(1))
    sp, keys, index = r._row_arrays(inputs)
    state, cache = r.new_rows(), r.new_cache(2)
    pos, table = r._put(inputs.positions), r._put(inputs.tables)
    start = time.perf_counter()
    lowered = r._decode.lower(r.weights, state.tokens, state.seen, pos, table, index, cache, sp, keys, steps,
                              GREEDY.plan())  # fmt: skip
    mid = time.perf_counter()
    lowered.compile()
    return {"rows": rows, "lower_s": mid - start, "compile_s": time.perf_counter() - mid}


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


def context_ids(m: worker.Model, context: int | None) -> list[int]:
    """The rows' prompt: PROMPT's ids, repeated to `context` ids when given (a step's attention reads every row's
    keys, so its time grows with the rows' context: a load's rows decode at 128-256 positions)."""
    ids = m.tokenizer.encode(PROMPT)
    return ids if context is None else (ids * (context // len(ids) + 1))[:context]


def run_rows(path: str, device: str, counts: list[int], steps: int, repeats: int, trace: str | None,
             groups: list[int] | None = None, contexts: list[int] | None = None, max_batch: int | None = None,
             sweep_only: bool = False, int8_x: bool = False) -> dict:  # fmt: skip
    """--rows: the compile of the largest row bucket (lowering and XLA's compile apart), then the sweep (at each of
    `contexts` if given: the first one's is `rows`, the others' `rows_at_context`), the queued dispatches, and the
    prefill groups; `sweep_only`: the sweep alone. `max_batch` (default the most rows) picks the decode kernels, as
    the server's --max-batch does: per-row up to qmatvec.MAX_ROWS, tensor cores above; `int8_x`: the int8-x
    kernels, x rounded to int8 (worker.load's int8_x: per-row up to MAX_ROWS rows, the int8-x dot above)."""
    t0 = time.perf_counter()
    m = worker.load(path, device=device, max_batch=max_batch or max(counts), int8_x=int8_x)
    result: dict = {"model": path, "device": str(m.device), "load_s": time.perf_counter() - t0, "steps": steps,
                    "decode_kernels": m.cfg.decode_kernels,
                    "row_tile": qmatvec.ROW_TILE, "prefill_tiles": qmatvec.PREFILL_TILES,
                    "moe_prefill_tiles": moe_matmul.PREFILL_TILES}  # fmt: skip
    print(f"{result['decode_kernels']} kernels", flush=True)
    if not sweep_only:
        result["compile"] = compile_times(m, m.runner.row_bucket(max(counts)), steps)
        print(json.dumps(result["compile"]), flush=True)
    contexts = contexts or [None]
    ids = context_ids(m, contexts[0])
    print(f"context {len(ids)}", flush=True)
    result["rows"] = rows_sweep(m, ids, counts, steps, repeats, trace)
    if sweep_only:
        return result
    result["rows_at_context"] = {}
    for c in contexts[1:]:
        print(f"context {c}", flush=True)
        result["rows_at_context"][c] = rows_sweep(
            m, context_ids(m, c), counts, steps, repeats, trace and f"{trace}-{c}"
        )
    result["queued"] = queued_dispatches(m, ids, max(counts), repeats)
    groups = groups or sorted({1, 8, m.runner.group_limit()})
    result["prefill"] = prefill_sweep(m, groups, PREFILL_TOKENS, max(3, repeats // 3), trace and f"{trace}-prefill")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--trace", default=None, help="folder for a JAX profiler trace (of three 8-step dispatches; "
                    "with --rows, of two dispatches of the most rows)")  # fmt: skip
    ap.add_argument("--rows", default=None, help="comma-separated row counts: time a dispatch of each instead")
    ap.add_argument("--steps", type=int, default=8, help="steps a dispatch with --rows")
    ap.add_argument("--prefill-groups", default=None, help="with --rows: the prefill group sizes to time "
                    "(comma-separated; default 1, 8 and the largest)")  # fmt: skip
    ap.add_argument("--context", default=None, help="with --rows: comma-separated prompt lengths of the rows (default: "
                    "a short prompt's); each gets its sweep")  # fmt: skip
    ap.add_argument("--row-tile", type=int, default=None, help="rows of x per dense matvec program (a sweep)")
    ap.add_argument("--max-batch", type=int, default=None, help="with --rows: the load's max_batch, which picks the "
                    "decode kernels (default: the most rows)")  # fmt: skip
    ap.add_argument("--sweep-only", action="store_true", help="with --rows: the rows' dispatches alone (no compile "
                    "timing, queued dispatches or prefill groups)")  # fmt: skip
    ap.add_argument("--int8-x", action="store_true", help="with --rows: decode's matvecs on x rounded to int8 "
                    "(worker.load's int8_x)")  # fmt: skip
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = args.model or str(worker.default_model_path())
    if args.row_tile:
        qmatvec.ROW_TILE = args.row_tile  # before anything is traced
    if args.rows:
        counts = [int(n) for n in args.rows.split(",")]
        groups = [int(g) for g in args.prefill_groups.split(",")] if args.prefill_groups else None
        contexts = [int(c) for c in args.context.split(",")] if args.context else None
        result = run_rows(path, args.device, counts, args.steps, args.repeats, args.trace, groups, contexts,
                          args.max_batch, args.sweep_only, args.int8_x)  # fmt: skip
    else:
        result = run(path, args.device, args.repeats, args.trace)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
