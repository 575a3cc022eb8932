"""The paged decode attention kernel (worker/pallas_kernels/paged_attention.py) on real-model shapes: time per call
(split kernel + fold) at batch 1, 8 and 64 and several context lengths, the k/v bytes the rows' visible keys hold per
second, and, at batch 1, the dense decode_attention on the same keys for comparison.

    python -m bench.paged_attention [--batch 1,8,64] [--context 256,2048,8192] [--sweep] [--smoke]

Every row has the same length (the context), its pages shuffled over a float16 pool. `--sweep` also times other
fixed split sizes (pages_per_split) to tune SPLIT_KEYS; `--smoke` runs one tiny case in interpret mode (CPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.kernels import timed
from worker.pallas_kernels import decode_attention as da
from worker.pallas_kernels import paged_attention as pa

# (label, heads, kv heads, head dim, window, sinks)
MODELS = [
    ("qwen2.5-0.5b", 14, 2, 64, None, False),
    ("phi3-mini", 32, 32, 96, None, False),
    ("gemma3-270m local", 4, 1, 256, 512, False),
    ("gpt-oss-20b full", 64, 8, 64, None, True),
    ("gpt-oss-20b sliding", 64, 8, 64, 128, True),
]
PAGE_SIZE = 16


def case(model, batch: int, context: int, args) -> None:
    label, h, kh, d, window, sinks = model
    rng = np.random.default_rng(0)
    width = -(-context // PAGE_SIZE)
    pages = batch * width + 1
    shape = (1, pages, PAGE_SIZE, kh, d)
    k_pages = jax.random.normal(jax.random.key(0), shape, jnp.float16)
    v_pages = jax.random.normal(jax.random.key(1), shape, jnp.float16)
    table = jnp.asarray((rng.permutation(pages - 1)[: batch * width] + 1).reshape(batch, width), jnp.int32)
    pos = jnp.full((batch,), context - 1, jnp.int32)
    q = jax.random.normal(jax.random.key(2), (batch, 1, h, d), jnp.float32)
    sink = jax.random.normal(jax.random.key(3), (h,), jnp.float32) if sinks else None
    interp = dict(interpret=True) if args.smoke else {}
    visible = min(context, window or context)
    read = 2 * batch * visible * kh * d * 2  # k and v, float16

    def run(**tiles) -> float:
        f = jax.jit(lambda q, kp, vp, t, p: pa.paged_decode_attention(q, kp, vp, t, p, 0, d**-0.5, window, sink,
                                                                       **interp, **tiles))  # fmt: skip
        return timed(f, q, k_pages, v_pages, table, pos, repeat=args.repeat)

    t = run()
    line = f"{label:20s} B={batch:<3d} ctx={context:<6d} paged {t * 1e6:8.1f} us {read / t / 1e9:7.1f} GB/s"
    if batch == 1 and not args.smoke:
        dense = jax.jit(lambda q, k, v, p: da.decode_attention(q, k, v, p, d**-0.5, window, sink))
        k = k_pages[0, table[0]].reshape(1, width * PAGE_SIZE, kh, d)
        v = v_pages[0, table[0]].reshape(1, width * PAGE_SIZE, kh, d)
        t_dense = timed(dense, q, k, v, pos.reshape(1, 1), repeat=args.repeat)
        line += f"   dense decode_attention {t_dense * 1e6:8.1f} us"
    print(line, flush=True)
    if args.sweep:
        for per_split in (1, 2, 4, 8, 16, 32):
            print(f"    pages_per_split={per_split:<3d} {run(pages_per_split=per_split) * 1e6:8.1f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--context", default="256,2048,8192")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time other split sizes")
    ap.add_argument("--smoke", action="store_true", help="one tiny case in interpret mode (CPU)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    models = MODELS
    if args.smoke:
        models, batches, contexts, args.repeat = MODELS[-1:], [2], [40], 1
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), JAX {jax.__version__}, page size {PAGE_SIZE}")
    for model in models:
        for batch in batches:
            for context in contexts:
                case(model, batch, context, args)


if __name__ == "__main__":
    main()
