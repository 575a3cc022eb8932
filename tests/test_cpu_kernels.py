"""The CPU's own kernel (worker/cpu_kernels): its product against a float64 product of gguf-py's reference values in
the block formats of the CPU layout (with and without an offset, Q6_K's 16-value blocks), row lengths that are and
are not multiples of its 4-row groups, each row's bits whatever the number of x rows beside it (batch invariance),
bad shapes refused with the kernel's message, the fallbacks to XLA's tile walk (no compiler, a failed build, no fast
form, ARM's NEON form unless asked for), and the products checked without JAX (tests/cpu_kernel_check.cc: the host's
form, and ARM's under qemu-user where a cross compiler is installed)."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import platform
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from test_quant import random_raw, reference

from worker import cpu_kernels, ops
from worker.quant import quant_array, to_int8_blocks

pytestmark = pytest.mark.skipif(
    cpu_kernels._compiler() is None, reason="no C++ compiler on this machine: the CPU kernel cannot be built"
)


def matrix(qtype: QT, n: int, k: int, seed: int):
    raw = random_raw(qtype, (n, k), seed)
    return to_int8_blocks(quant_array(raw, qtype, (n, k))), reference(raw, qtype).reshape(n, k).astype(np.float64)


@pytest.mark.parametrize(
    ("qtype", "n", "k"),
    [
        (QT.Q8_0, 37, 64),  # 37 rows: 9 groups of 4 and one row alone
        (QT.Q4_1, 130, 2880),  # an offset; gpt-oss's 2,880-long rows
        (QT.Q4_K, 5, 512),  # an offset from the K-quants' sub-blocks
        (QT.Q6_K, 6, 256),  # 16-value blocks
        (QT.Q2_K, 5, 512),  # 16-value blocks with an offset
        (QT.IQ4_XS, 3, 256),  # a non-linear grid's codes
        (QT.Q5_0, 4, 96),  # rows not a multiple of 64
        (QT.MXFP4, 9, 128),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, ops.CPU_DECODE_ROWS])
@pytest.mark.parametrize("tiles", [False, True], ids=["rows", "tiles"])
def test_kernel_matches_float64(qtype: QT, n: int, k: int, rows: int, tiles: bool):
    """Both forms: the matvec's (decode) and the tiles' (prefill: 4 x rows by 4 w rows a step, the edges of both)."""
    assert cpu_kernels.available()
    w, ref_w = matrix(qtype, n, k, seed=n + k + rows)
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    ours = np.asarray(cpu_kernels.int8_matvec(jnp.asarray(x), w, tiles=tiles), np.float64)
    ref = x.astype(np.float64) @ ref_w.T
    assert ours.shape == (rows, n)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()  # float32 accumulation over k values


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("tiles", [False, True], ids=["rows", "tiles"])
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(qtype: QT, tiles: bool):
    w, _ = matrix(qtype, 23, 768, seed=3)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((ops.CPU_DECODE_ROWS, 768)).astype(np.float32))
    together = np.asarray(cpu_kernels.int8_matvec(x, w, tiles=tiles))
    for r in range(ops.CPU_DECODE_ROWS):
        alone = np.asarray(cpu_kernels.int8_matvec(x[r : r + 1], w, tiles=tiles))
        assert np.array_equal(alone[0], together[r]), r


def test_decode_calls_take_the_matvec_form_and_longer_calls_the_tiles_or_the_walk():
    """On one device: decode's rows the matvec form, more rows the tiles' form; a matrix of several devices (its
    `_split_int8` shards, `threads` off) keeps XLA's tile walk for more rows."""
    w, _ = matrix(QT.Q8_0, 8, 64, seed=1)

    def form(rows: int, threads: int = cpu_kernels.ALL_THREADS) -> str | None:
        x = jnp.zeros((rows, 64))
        text = ops.int8_matmul.lower(x, w, ops._cpu_kernel_form(x, w, threads), threads).as_text()
        if cpu_kernels.TARGET not in text:
            return None
        return "tiles" if "tiles = 1" in text else "rows"

    assert form(1) == form(ops.CPU_KERNEL_ROWS) == "rows"
    assert form(ops.CPU_KERNEL_ROWS + 1) == form(ops.CPU_KERNEL_ROWS + 1, threads=1) == "tiles"
    assert form(ops.CPU_KERNEL_ROWS + 1, threads=0) is None  # a device's own thread alone: XLA's walk
    assert "tiles = 1" in jax.jit(ops.qmatmul).lower(jnp.zeros((9, 64)), w).as_text()  # a one-device model's call
    with ops.cpu_rows_kernel():  # a deterministic decode step's rows together: the matvec form whatever their number
        assert form(32) == form(32, threads=0) == "rows"


def test_bad_shapes_get_the_kernels_message():
    w, _ = matrix(QT.Q8_0, 8, 64, seed=1)
    with pytest.raises(Exception, match="int8_matvec: shapes do not fit"):
        jax.ffi.ffi_call(cpu_kernels.TARGET, jax.ShapeDtypeStruct((1, 8), jnp.float32))(
            jnp.zeros((1, 32)), w.codes, w.scale, threads=np.int32(1), tiles=np.int32(0), nibbles=np.int32(0)
        ).block_until_ready()
    with pytest.raises(Exception, match="nibbles must be 0"):
        jax.ffi.ffi_call(cpu_kernels.TARGET, jax.ShapeDtypeStruct((1, 8), jnp.float32))(
            jnp.zeros((1, 64)), w.codes, w.scale, threads=np.int32(1), tiles=np.int32(0), nibbles=np.int32(3)
        ).block_until_ready()


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q4_0, QT.Q2_K, QT.Q3_K, QT.Q4_1], ids=lambda t: t.name)
def test_nibble_codes_give_the_int8_codes_bits(qtype: QT):
    """Codes two a byte (unsigned with an offset, signed without; 32- and 16-value blocks) against the same matrix
    with one int8 a code: both forms, the same bits, since each value is widened to the same float in the same order;
    and float64's values."""
    w, ref_w = matrix(qtype, 37, 512, seed=3)
    assert w.nibbles is not None and w.codes.shape == (37, 256)
    as_int8 = dataclasses.replace(w, codes=w.int8_codes(), nibbles=None)
    x = np.random.default_rng(3).standard_normal((5, 512)).astype(np.float32)
    ref = x.astype(np.float64) @ ref_w.T
    for tiles in (False, True):
        ours = np.asarray(cpu_kernels.int8_matvec(jnp.asarray(x), w, tiles=tiles))
        assert np.array_equal(ours, np.asarray(cpu_kernels.int8_matvec(jnp.asarray(x), as_int8, tiles=tiles)))
        assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("rows", [1, 5])
def test_rows_of_w_in_chunks_over_xlas_threads_give_the_calling_threads_bits(rows: int):
    """2,053 rows of 768 values (1.6 MB of codes): chunks of rows over XLA's intra-op threads (all of them, or one
    beside the caller: a device's share), the last chunk shorter; the same bits as the calling thread alone, and
    float64's values."""
    w, ref_w = matrix(QT.Q4_K, 2053, 768, seed=rows)
    x = np.random.default_rng(rows).standard_normal((rows, 768)).astype(np.float32)
    ref = x.astype(np.float64) @ ref_w.T
    for tiles in (False, True):
        alone = np.asarray(cpu_kernels.int8_matvec(jnp.asarray(x), w, threads=0, tiles=tiles))
        for threads in (1, cpu_kernels.ALL_THREADS):
            chunked = np.asarray(cpu_kernels.int8_matvec(jnp.asarray(x), w, threads=threads, tiles=tiles))
            assert np.array_equal(chunked, alone), (tiles, threads)
        assert np.abs(alone - ref).max() <= 1e-5 * np.abs(ref).max(), tiles


@pytest.mark.parametrize(("cores", "devices", "tasks"), [(2, 2, 0), (2, 1, 1), (1, 2, 0), (8, 2, 3), (16, 2, 7)])
def test_a_devices_kernel_takes_its_share_of_the_cores(monkeypatch, cores: int, devices: int, tasks: int):
    """Several host devices share XLA's one pool: each device's call takes the pool threads of its share of the cores
    beside its own (two devices on two cores, as measured best there: none)."""
    monkeypatch.setattr(cpu_kernels, "usable_cores", lambda: cores)
    assert cpu_kernels.kernel_tasks(devices) == ops._device_kernel_tasks(devices) == tasks
    monkeypatch.setattr(ops, "_cpu_kernel_tasks", 0)  # WORKER_CPU_KERNEL_TASKS=0: each device's thread alone
    assert ops._device_kernel_tasks(devices) == 0


def assert_tile_walk_stays(caplog, level: int, why: str) -> None:
    """available() (asked afresh) says no, and the log line says `why`."""
    cpu_kernels.available.cache_clear()
    try:
        with caplog.at_level(level, logger="worker.cpu_kernels"):
            assert not cpu_kernels.available()
        assert why in caplog.text
    finally:
        cpu_kernels.available.cache_clear()


def test_without_a_compiler_the_tile_walk_stays(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert_tile_walk_stays(caplog, logging.WARNING, "no C++ compiler")


def test_a_failed_build_is_logged_and_the_tile_walk_stays(monkeypatch, caplog, tmp_path):
    broken = tmp_path / "int8_matvec.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setattr(cpu_kernels.platformdirs, "user_cache_dir", lambda name: str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: shutil.which("c++") or shutil.which("g++"))
    assert_tile_walk_stays(caplog, logging.WARNING, "did not build")
    assert "this is not C++" in caplog.text


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f and -mno-avx are x86 flags")
@pytest.mark.parametrize("extra", [("-mno-avx512f",), ("-mno-avx",)], ids=["avx2-8-lanes", "plain-vectors-4-lanes"])
def test_the_other_instruction_sets_forms_match_float64(extra: tuple[str, ...]):
    """The source's AVX2 form (8 lanes: most laptops) and its plain vector-extension form (4 lanes: what ARM and
    older x86 compile), built here by turning AVX-512 or AVX off: the same results within float32 rounding, and a
    row's bits whatever the rows beside it."""
    target = f"{cpu_kernels.TARGET}_{extra[0].removeprefix('-mno-').replace('-', '_')}"
    library = ctypes.cdll.LoadLibrary(str(cpu_kernels._build(cpu_kernels._compiler(), extra)))
    cpu_kernels.register(library, target)
    for qtype, n, k in ((QT.Q8_0, 37, 640), (QT.Q4_K, 9, 512), (QT.Q6_K, 5, 256)):
        w, ref_w = matrix(qtype, n, k, seed=n)
        x = np.random.default_rng(n).standard_normal((7, k)).astype(np.float32)
        ours = np.asarray(cpu_kernels.int8_matvec(jnp.asarray(x), w, target))
        ref = x.astype(np.float64) @ ref_w.T
        assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max(), qtype
        alone = np.asarray(cpu_kernels.int8_matvec(jnp.asarray(x[3:4]), w, target))
        assert np.array_equal(alone[0], ours[3]), qtype


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx is an x86 flag")
def test_a_build_without_a_fast_form_leaves_the_tile_walk(monkeypatch, caplog):
    """Where the source compiles only to its plain vector form (x86 without AVX2), the worker keeps XLA's tile walk:
    that form was slower than the walk (docs/kernels.md)."""
    build = cpu_kernels._build
    monkeypatch.setattr(cpu_kernels, "_build", lambda compiler: build(compiler, ("-mno-avx",)))
    assert_tile_walk_stays(caplog, logging.INFO, "no fast form")


class _NeonLibrary:
    """A built library as ARM's would be: its form not yet timed (Int8MatvecFast 2), its handlers the host's."""

    def __init__(self, host: ctypes.CDLL):
        self.Int8Matvec, self.Int8MatvecOffset = host.Int8Matvec, host.Int8MatvecOffset

    @staticmethod
    def Int8MatvecFast() -> int:  # noqa: N802 (the C symbol's name)
        return 2


@pytest.mark.parametrize("setting", ["", "1"], ids=["by-default", "asked-for"])
def test_arms_form_is_taken_only_when_asked_for(monkeypatch, caplog, setting):
    """ARM's NEON form is checked for its values (below) but not timed against the tile walk on an ARM machine: by
    default the walk stays; WORKER_CPU_KERNEL=1 takes the kernel."""
    host = ctypes.cdll.LoadLibrary(str(cpu_kernels._build(cpu_kernels._compiler())))
    monkeypatch.setattr(cpu_kernels.ctypes.cdll, "LoadLibrary", lambda path: _NeonLibrary(host))
    monkeypatch.setattr(cpu_kernels, "_setting", setting)
    registered = []
    monkeypatch.setattr(cpu_kernels, "register", lambda library, target: registered.append(target))
    if setting == "1":
        cpu_kernels.available.cache_clear()
        try:
            assert cpu_kernels.available() and registered == [cpu_kernels.TARGET]
        finally:
            cpu_kernels.available.cache_clear()
    else:
        assert_tile_walk_stays(caplog, logging.INFO, "NEON form is not yet timed")
        assert not registered


CHECK = Path(__file__).with_name("cpu_kernel_check.cc")
ARM = (shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64"))


@pytest.mark.parametrize("target", ["host", "arm-neon"])
def test_the_kernels_products_without_jax_on_the_host_and_on_arm_under_qemu(tmp_path, target):
    """tests/cpu_kernel_check.cc: the kernel's products against double precision, and a row alone against it in a
    group, built for this machine (its own form) and for ARM (the NEON form, with a cross compiler, run under
    qemu-user), where the suite cannot run JAX."""
    flags = ["-O3", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", str(CHECK), "-o", str(tmp_path / "check")]
    if target == "host":
        build, run, form = [cpu_kernels._compiler(), cpu_kernels.native_flag()], [], None
    else:
        if not all(ARM):
            pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu qemu-user)")
        build, run, form = [ARM[0], "-march=armv8-a", "-static"], [ARM[1]], "form 2"
    subprocess.run([*build, *flags], check=True, capture_output=True, text=True)
    out = subprocess.run([*run, str(tmp_path / "check")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "misses 0" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert form is None or out.stdout.startswith(form), out.stdout
