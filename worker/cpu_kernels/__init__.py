"""The CPU's own kernel: decode-sized products with a matrix in the CPU layout (quant.Int8Blocks), in C++ through
XLA's FFI (int8_matvec.cc says why by hand).

The source is compiled on first use with the machine's C++ compiler (`$CXX`, else c++, g++ or clang++) for this
machine's instruction set (-march=native) against the installed jaxlib's FFI headers, and the library is kept in
`<user cache dir>/worker-orcd/native`, keyed by the source, the compiler, the flags and the jaxlib version: a second
start loads it (~3 s the first time on 2 cores). Without a compiler, or where the build fails, the worker logs why
once and keeps XLA's tile walk (ops.int8_matmul): slower, the same results within float32 rounding. x86 with AVX2 or
AVX-512 takes the kernel (Int8MatvecFast); ARM's NEON form, whose values are checked under qemu but which has not
been timed on an ARM machine, only with WORKER_CPU_KERNEL=1; the plain form of other machines was slower than the
walk. WORKER_CPU_KERNEL=0 turns the kernel off (an A/B switch)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import platformdirs

from worker.cores import usable_cores
from worker.quant import Int8Blocks

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_matvec.cc")
TARGET = "worker_int8_matvec"  # XLA's name of the kernel; of its form with an offset: TARGET + "_offset"
ALL_THREADS = 1 << 16  # int8_matvec's `threads`: every thread of XLA's intra-op pool (the kernel takes its size)
BLOCKS = (16, 32)  # the CPU layout's blocks the kernel takes (quant.cpu_block: Q2_K's, Q3_K's, Q6_K's 16, else 32)
NIBBLE_KINDS = {None: 0, "u4": 1, "s4": 2}  # Int8Blocks.nibbles -> int8_matvec.cc's CodeKind
_setting = os.environ.get("WORKER_CPU_KERNEL", "")  # "0": off; "1": also a form not yet timed (ARM's NEON)
_registered: dict[str, ctypes.CDLL] = {}  # target -> its library, whose code must outlive every call
_lock = threading.Lock()  # the warm-up traces programs side by side (Model.warm_up): one build, one registration


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


def native_flag() -> str:
    """The compiler's flag for this machine's instruction set (ARM compilers take -mcpu, x86 ones -march)."""
    return "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"


def _flags(extra: tuple[str, ...] = ()) -> list[str]:
    # native: the library runs only where it was built, as the cache key below says. `extra` after it (the tests
    # build the AVX2 and the plain vector forms with -mno-avx512f and -mno-avx).
    return ["-O3", native_flag(), *extra, "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]


def _build(compiler: str, extra: tuple[str, ...] = ()) -> Path:
    """The library for this source, compiler, flags, jaxlib and machine: built once, then found in the cache."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    flags = _flags(extra)
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, version, *flags, jaxlib.__version__, platform.node()]).encode()
    ).hexdigest()[:16]
    folder = Path(platformdirs.user_cache_dir("worker-orcd")) / "native"
    library = folder / f"int8_matvec-{key}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name, then renamed: processes that build side by side never load a half-written file.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        part = Path(tmp) / library.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(part)], capture_output=True, text=True, check=True)
        os.replace(part, library)
    return library


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA (once a process; the reason logged where it is not)."""
    with _lock:
        return _setting != "0" and _load()


def _load() -> bool:
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (c++, g++, clang++ or $CXX): the CPU's int8 products stay on XLA's tile walk")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        tail = detail[-2000:]
        log.warning("the CPU kernel did not build (%s): the CPU's int8 products stay on XLA's tile walk", tail)
        return False
    fast = library.Int8MatvecFast()
    if fast == 0:
        log.info("the CPU kernel has no fast form for this instruction set (%s): XLA's tile walk", platform.machine())
        return False
    if fast == 2 and _setting != "1":
        log.info("the CPU kernel's NEON form is not yet timed against XLA's tile walk: the walk (WORKER_CPU_KERNEL=1 "
                 "takes the kernel)")  # fmt: skip
        return False
    register(library, TARGET)
    return True


def register(library: ctypes.CDLL, target: str) -> None:
    """The library's two handlers as XLA's `target` and `target`_offset (once: XLA keeps a name's first one)."""
    if target not in _registered:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(library.Int8Matvec), platform="cpu")
        jax.ffi.register_ffi_target(target + "_offset", jax.ffi.pycapsule(library.Int8MatvecOffset), platform="cpu")
        _registered[target] = library


def fits(w: Int8Blocks) -> bool:
    return w.block in BLOCKS and w.codes.ndim == 2


def kernel_tasks(devices: int) -> int:
    """The pool threads a kernel call of one of `devices` host devices may take beside its own (int8_matvec's
    `threads`): the process's cores shared between the devices, whose calls run at once on XLA's one intra-op pool.
    Two devices on two cores: none, each device's thread alone (taking the pool there made decode 42.2 -> 34.9 tok/s,
    docs/kernels.md "Threads"); on eight cores three each, where the devices' threads alone would leave six idle."""
    return max(0, usable_cores() // max(1, devices) - 1)


def int8_matvec(x2: jax.Array, w: Int8Blocks, target: str = TARGET, threads: int = ALL_THREADS, tiles: bool = False,
                ) -> jax.Array:  # fmt: skip
    """x2 [M, K] float32 @ w.T -> [M, N] float32, on one device's matrix. Each y value is one fixed sequence of float
    operations whatever M (batch invariance): a block's products with its codes summed in register lanes, scaled once
    (plus the offset times x's block sum), the lanes summed in one tree order (int8_matvec.cc). `threads`: how many
    of XLA's intra-op threads may take chunks of w's rows beside the calling thread (ALL_THREADS: a model on one
    device; a device of several: `kernel_tasks`; 0: the calling thread alone). The chunks change no bits. `tiles`:
    the many-rows form (a prefill's), w's rows widened a tile at a time and dotted with every row of x; its bits are
    another order's than the matvec form's, still each row's own whatever the rows beside it."""
    out = jax.ShapeDtypeStruct((x2.shape[0], w.codes.shape[0]), jnp.float32)
    attrs = dict(threads=np.int32(threads), tiles=np.int32(tiles), nibbles=np.int32(NIBBLE_KINDS[w.nibbles]))
    if w.offset is None:
        return jax.ffi.ffi_call(target, out)(x2, w.codes, w.scale, **attrs)
    return jax.ffi.ffi_call(target + "_offset", out)(x2, w.codes, w.scale, w.offset, **attrs)
