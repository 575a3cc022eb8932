"""Where the real Gemma 3 leaves llama.cpp's exact-math greedy: `python -m bench.goldens [--device gpu]`.

The oracle (shared/oracles/gemma3-270m/exact_math.json) holds, for each prompt, the 32 free-running greedy ids of
exact (float64) math and, at each step, the exact logits of that step's top five ids. For each kernel variant
(`--variants`: the decode kernels by --max-batch, the attention kernels on or off) this prints, per prompt:
- decode: the first step whose greedy id differs from the exact one before the first step whose exact margin is
  below --margin (what tests/test_gpu.py's goldens test asserts), and, at every step, how far the decode's gaps
  between the top-five ids (their log-probabilities' differences are the logits' differences) are from exact;
- prefill: the same gaps from one teacher-forced prefill of the prompt and the exact ids (Model.logits), which
  runs the prefill kernels and no decode step.
A decode far off where the prefill is close says the decode step is at fault; the variants then say which part.
Why a tool and not a test: the test says that the ids differ, this says where the error grows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import worker
from bench.synth import oracles_dir
from worker import ops
from worker.model import GREEDY
from worker.sampling import TokenLogprobs

STEPS = 32


def _gap_error(value_of, exact: dict) -> float:
    """The largest |(ours[i] - ours[best]) - (exact[i] - exact[best])| over the exact top five; `value_of[id]` is
    our value of an id (a logit or log-probability: gaps are the same)."""
    ids, vals = exact["ids"], exact["values"]
    ours = [value_of[i] for i in ids]
    return float(max(abs((ours[k] - ours[0]) - (vals[k] - vals[0])) for k in range(1, len(ids))))


def check(model, prompt: dict, goldens: dict, margin: float) -> dict:
    """One prompt's decode and teacher-forced prefill against exact math."""
    ref = prompt["greedy_exact"]
    ids = goldens[prompt["name"]]["ids"]
    upto = next((i for i, m in enumerate(ref["margins"]) if m < margin), STEPS)
    logprobs: list[TokenLogprobs] = []
    ours = list(model.generate_ids(ids, STEPS, GREEDY, 0, stop_at_eos=False, logprobs=logprobs))
    diverged = next((i for i in range(upto) if ours[i] != ref["ids"][i]), None)
    # The decode is compared while its prefix is the exact one: past a step where it picked another id (a compared
    # one, or one of margin below `margin`), the oracle's top five belong to another sequence.
    same = next((i for i, t in enumerate(ours) if t != ref["ids"][i]), len(ours))
    decode_err = []
    for step in range(same):
        top = dict(logprobs[step].top)
        exact = ref["per_step_top5"][step]
        decode_err.append(_gap_error(top, exact) if all(i in top for i in exact["ids"]) else float("inf"))
    forced = model.logits(ids + ref["ids"][: STEPS - 1])[len(ids) - 1 :]
    prefill_err = [_gap_error(forced[s], ref["per_step_top5"][s]) for s in range(STEPS)]
    prefill_argmax = [s for s in range(upto) if int(np.argmax(forced[s])) != ref["ids"][s]]
    out = {
        "prompt": prompt["name"],
        "compared_steps": upto,
        "diverged_at": diverged,
        "decode_gap_err_max": max(decode_err, default=0.0),
        "decode_gap_err": [round(e, 4) for e in decode_err],
        "prefill_gap_err_max": max(prefill_err),
        "prefill_gap_err": [round(e, 4) for e in prefill_err],
        "prefill_argmax_differs_at": prefill_argmax,
    }
    if diverged is not None:
        s = diverged
        out["at_divergence"] = {
            "ours": ours[s],
            "exact": ref["ids"][s],
            "exact_margin": ref["margins"][s],
            "exact_top5": ref["per_step_top5"][s],
            "our_top": logprobs[s].top,
            "prefill_top5": [(int(i), float(forced[s][i])) for i in np.argsort(-forced[s])[:5]],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--backend", choices=("cpu", "gpu", "interpret"),
                    help="the ops backend (default: the device's); interpret runs the GPU's kernels on the CPU "
                    "(int8-x variants need a kernel backend)")  # fmt: skip
    ap.add_argument("--oracles", help="the oracles folder (gemma3-270m/ inside; default: as bench.synth finds it)")
    ap.add_argument("--variants", default="64,2",
                    help="comma-separated --max-batch values; a 'j' after one keeps attention on jax.numpy, an 'i' "
                    "rounds decode's matvec x to int8 (int8_x), ':N' decodes N steps a dispatch (e.g. 64j:1, "
                    "2i)")  # fmt: skip
    ap.add_argument("--margin", type=float, default=0.05, help="compare the steps before the first margin below this")
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    folder = oracles_dir(args.oracles, "gemma3-270m") / "gemma3-270m"
    data = json.loads((folder / "exact_math.json").read_text())
    goldens = {p["name"]: p for p in json.loads((folder / "goldens.json").read_text())["prompts"]}
    results = []
    for variant in args.variants.split(","):
        batch, _, steps = variant.partition(":")
        jnp_attention, int8_x = "j" in batch, "i" in batch
        ops._attention_kernel = not jnp_attention  # read when a step is traced: this model's steps
        t0 = time.perf_counter()
        model = worker.load(worker.default_model_path(), device=args.device, slots=args.slots,
                            max_batch=int(batch.rstrip("ji")), int8_x=int8_x, backend=args.backend)  # fmt: skip
        if steps:
            model.batch.steps = int(steps)
        print(f"== {variant}: max_batch {batch.rstrip('ji')}, decode kernels {model.cfg.decode_kernels}, attention "
              f"{'jax.numpy' if jnp_attention else 'kernels'}, {model.decode_steps} steps a dispatch")  # fmt: skip
        for p in data["prompts"]:
            r = {"variant": variant, **check(model, p, goldens, args.margin)}
            results.append(r)
            print(f"  {r['prompt']}: diverged at {r['diverged_at']} of {r['compared_steps']} compared; gap error "
                  f"decode max {r['decode_gap_err_max']:.3g}, prefill max {r['prefill_gap_err_max']:.3g}; prefill "
                  f"argmax differs at {r['prefill_argmax_differs_at']}")  # fmt: skip
            print(f"    decode gap errors {r['decode_gap_err']}")
            print(f"    prefill gap errors {r['prefill_gap_err']}")
            if "at_divergence" in r:
                print(f"    at divergence: {r['at_divergence']}")
        print(f"  ({time.perf_counter() - t0:.0f} s)")
        del model
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
