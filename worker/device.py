"""Device policy (M0-SYS-2.2.1, M0-W-1011, 1012, 1020): which device, how many bytes are in use, whether the model
fits before anything is copied, and whether every weight is still resident.

VRAM-only: on a GPU every array is placed on that device with memory kind "device"; there is no host offload and
no fallback to the CPU. XLA_PYTHON_CLIENT_PREALLOCATE=false is set in worker/__init__.py before JAX starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from worker.errors import ErrorCode, WorkerError
from worker.gguf import GGUFFile
from worker.kv_cache import bytes_per_slot, dtype_for
from worker.quant import cpu_layout_nbytes

# Device bytes a format's planes take per GGUF byte (quant.py keeps sub-block scales unpacked: <= 3.7%, Q3_K's).
PLANE_OVERHEAD = 1.04


def pick_device(kind: str, index: int = 0) -> jax.Device:
    """The device for `kind` ("cpu" | "gpu" | "auto"); a GPU request never falls back to the CPU."""
    if kind == "auto":
        kind = "gpu" if gpu_count() else "cpu"
    if kind == "cpu":
        return jax.devices("cpu")[0]
    if kind != "gpu":
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"unknown device {kind!r} (cpu, gpu or auto)")
    n = gpu_count()
    if n == 0:
        raise WorkerError(ErrorCode.CUDA_ERROR, "no GPU is visible to JAX (use --device cpu to run on the CPU)")
    if not 0 <= index < n:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"--gpu-device {index} is out of range (this machine has {n})")
    return jax.devices("gpu")[index]


def gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


def host_memory_available() -> int | None:
    """Bytes of host memory the OS can give without swapping (psutil: Linux's MemAvailable, macOS's free and
    inactive pages, Windows' available), or None where psutil cannot tell."""
    try:
        import psutil  # only the CPU path asks: the GPU machine's environment need not have it

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


# glibc's mallopt parameter for the size from which an allocation is its own mapping (malloc.h).
M_MMAP_THRESHOLD = -3
LOAD_MMAP_THRESHOLD = 128 << 10  # glibc's default
SERVE_MMAP_THRESHOLD = 32 << 20  # the most glibc's own adaptive threshold reaches on 64-bit hosts


@contextlib.contextmanager
def host_memory_returned() -> Iterator[None]:
    """Around a model's load: the host memory its conversion frees goes back to the OS. Why by hand: glibc raises
    its mmap threshold each time a large block is freed (up to 32 MiB), so a load's later temporaries (a tensor's
    planes, codes being packed) come from the heap, whose freed pages it keeps. Measured on phi3-mini Q4_K_M's CPU
    load (3.57 GB of weights, a 2.4 GB file): 5.07 GB anonymous after the load and a 7.7 GB peak, against 3.33 and
    5.95 with the threshold held at its default for the load (docs/PERFORMANCE.md, CPU). After the load the
    threshold is held at the ceiling glibc would have reached, so that the steps' buffers come from the heap as
    before. Elsewhere (macOS, musl): nothing."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD)


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def memory_stats(device: jax.Device) -> dict[str, int]:
    """bytes_in_use, peak_bytes_in_use, bytes_limit (GPU); empty on the CPU, which reports none."""
    try:
        stats = device.memory_stats() or {}
    except Exception:
        return {}
    return {k: int(v) for k, v in stats.items() if isinstance(v, int | float)}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working


def estimate(gf: GGUFFile, cfg: Any, kv_tokens: int, device_kind: str, chunk: int = 512) -> MemoryEstimate:
    """What loading needs: the planes (on the CPU its layout: quant.cpu_layout_nbytes), a KV pool of `kv_tokens`
    positions and the largest transient of a prefill chunk (the biggest weight dequantized to float32 for the XLA
    dot, the logits of a chunk, and activations)."""
    weights = math.ceil(gf.tensor_bytes * PLANE_OVERHEAD) if device_kind != "cpu" else cpu_bytes(gf)
    kv = kv_tokens * bytes_per_slot(cfg, dtype_for(device_kind))
    largest = max((t.n_elements for t in gf.tensors.values() if len(t.shape) >= 2), default=0)
    working = largest * 4 + chunk * cfg.vocab_size * 4 + 64 * chunk * 16 * 1024 + (256 << 20)
    return MemoryEstimate(weights, kv, working)


def cpu_bytes(gf: GGUFFile) -> int:
    """The file's weights in host memory on the CPU backend: its matrices in the CPU layout, the rest as planes
    (vectors as float32)."""
    total = 0
    for t in gf.tensors.values():
        held = cpu_layout_nbytes(t.qtype, tuple(int(d) for d in t.shape))
        total += held if held is not None else (t.n_elements * 4 if len(t.shape) == 1 else t.nbytes * PLANE_OVERHEAD)
    return math.ceil(total)


def kv_pool_tokens(need: MemoryEstimate, per_token: int, want: int, device: jax.Device, fraction: float,
                   host: int | None = None, devices: int = 1) -> int:  # fmt: skip
    """Positions of the KV pool: `fraction` of the device memory left after the weights and the working
    transient (`need`'s KV part is ignored), at most `want`. On the CPU the memory is `host` bytes (what the OS can
    give: `host_memory_available`; None: `want`), which the `devices` host devices of a mesh share, each with
    `need` and a pool of `per_token` a position: a pool sized for the whole context of every --max-batch sequence
    took 12.9 GB for phi3-mini (float32, 4 x 4,096 positions), more than a 16 GB laptop has beside the weights."""
    stats = memory_stats(device)
    if "bytes_limit" in stats:
        left, share = stats["bytes_limit"] - stats.get("bytes_in_use", 0) - need.weights - need.working, 1
    elif device.platform == "cpu" and host is not None:
        left, share = host - devices * (need.weights + need.working), devices
    else:
        return want
    return max(0, min(want, int(fraction * left) // (per_token * share)))


def check_fits(need: MemoryEstimate, device: jax.Device, model_path: str) -> None:
    """M0-W-1020: refuse before copying weights when the device has too little free memory."""
    stats = memory_stats(device)
    if "bytes_limit" not in stats:
        return  # the CPU: host memory is not policed here
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if need.total > free:
        raise WorkerError(
            ErrorCode.INSUFFICIENT_VRAM,
            f"model {model_path} needs {need.total:,} bytes on device {device.id} (weights {need.weights:,}, "
            f"KV cache {need.kv_cache:,}, working {need.working:,}); {free:,} bytes are free",
        )


def resident(tree: Any, devices: jax.Device | set[jax.Device], shard: bool = False) -> bool:
    """M0-W-1012: every array of `tree` is alive and placed on `devices` (a device, or a tensor-parallel mesh's
    set) in device memory; `shard`: each array has a shard on each of `devices` (one device of a mesh)."""
    want = devices if isinstance(devices, set) else {devices}
    for leaf in jax.tree_util.tree_leaves(tree):
        if not isinstance(leaf, jax.Array) or leaf.is_deleted():
            return False
        if not (want <= leaf.devices() if shard else leaf.devices() == want):
            return False
        kind = getattr(leaf.sharding, "memory_kind", None)
        if kind not in (None, "device"):
            return False
    return True


def tree_bytes(tree: Any, device: jax.Device | None = None) -> int:
    """Bytes of the arrays of `tree`; with `device`, of their shards on that device, where a shard that is a view of
    another device's buffer (held_once) counts on that device only."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        if device is None:
            total += leaf.nbytes
            continue
        shards = leaf.addressable_shards
        if len(shards) > 1 and leaf.sharding.is_fully_replicated and device.platform == "cpu":
            owner: dict[int, jax.Device] = {}
            for s in shards:
                owner.setdefault(s.data.unsafe_buffer_pointer(), s.device)
            shards = [s for s in shards if owner[s.data.unsafe_buffer_pointer()] == s.device]
        total += sum(s.data.nbytes for s in shards if s.device == device)
    return total


def device_info(device: jax.Device) -> dict[str, Any]:
    """sm (compute capability) and the CUDA runtime version, for /health; None on the CPU."""
    info: dict[str, Any] = {"device": device.platform, "device_name": getattr(device, "device_kind", device.platform)}
    cc = getattr(device, "compute_capability", None)
    info["sm"] = f"sm_{str(cc).replace('.', '')}" if cc else None
    info["cuda_runtime_version"] = None
    if device.platform == "gpu":
        try:
            from jax._src.lib import cuda_versions  # the runtime JAX was built against and runs with

            info["cuda_runtime_version"] = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
        except Exception:
            info["cuda_runtime_version"] = None
    return info


def held_once(tree: Any) -> Any:
    """`tree` with every array replicated over several host devices held once: each device's shard a view of the
    first device's buffer. XLA:CPU gives each host device a copy, yet they are one memory; a weight is never
    written (nothing donates it), so the views stay equal. Arrays on one device or split over devices are kept."""

    def once(a: Any) -> Any:
        if not isinstance(a, jax.Array) or len(a.sharding.device_set) < 2 or not a.sharding.is_fully_replicated:
            return a
        if any(d.platform != "cpu" for d in a.sharding.device_set):
            return a
        host = np.asarray(a.addressable_shards[0].data)  # a view of the buffer (read-only)
        views = [jax.device_put(host, s.device, may_alias=True) for s in a.addressable_shards]
        return jax.make_array_from_single_device_arrays(a.shape, a.sharding, views)

    return jax.tree_util.tree_map(once, tree)
