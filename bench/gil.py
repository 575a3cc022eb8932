"""What a thread lowering programs costs the engine's thread through the GIL, at Python's default switch interval and
at the compile-ahead's (worker.runner.COMPILING_SWITCH_S). The engine's thread is modelled as a small jitted call
followed by 20 reads back (each releases the GIL and takes it again, as a launch and the reads of a dispatch do);
the other thread traces and lowers programs (Python under the GIL, no XLA compile), as a compile ahead does for ~1 s a
program on an H100's host. The ratio of a dispatch's time beside it to alone is the slowdown a running stream sees.

    python -m bench.gil [--dispatches 200]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from worker.runner import COMPILING_SWITCH_S


def _dispatches(step, x, n: int) -> float:
    """ms a dispatch: the call, then 20 reads back."""
    t = time.perf_counter()
    for _ in range(n):
        y = step(x)
        for _ in range(20):
            np.asarray(y[:1, :1])
    return (time.perf_counter() - t) / n * 1e3


def _lowering(stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        f = jax.jit(lambda a, i=i: sum(jnp.sin(a * k + i) for k in range(200)))
        f.lower(jnp.ones((8,)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dispatches", type=int, default=200)
    args = ap.parse_args()
    step = jax.jit(lambda x: jnp.tanh(x @ x.T)[:, :64] @ jnp.ones((64, 64)))
    x = jnp.ones((64, 64))
    step(x).block_until_ready()
    default = sys.getswitchinterval()
    print(f"device {jax.devices()[0].platform}; ms a dispatch (a call and 20 reads back)")
    for interval in (default, COMPILING_SWITCH_S):
        sys.setswitchinterval(interval)
        alone = _dispatches(step, x, args.dispatches)
        stop = threading.Event()
        other = threading.Thread(target=_lowering, args=(stop,))
        other.start()
        time.sleep(0.5)
        beside = _dispatches(step, x, args.dispatches)
        stop.set()
        other.join()
        print(f"switch interval {interval * 1e3:.1f} ms: alone {alone:.2f}, beside a lowering thread {beside:.2f} "
              f"({beside / alone:.1f}x)")  # fmt: skip
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
