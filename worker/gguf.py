"""GGUF files: open through mmap, validate before anything is loaded (M0-W-1200, 1210, 1211, 1221), and
expose the metadata and the tensor table.

Every failure is a `WorkerError(MODEL_LOAD_FAILED)` with a one-line reason that names the file.

The header is parsed here rather than by gguf-py's `GGUFReader`, for two measured reasons: `GGUFReader`
takes 16 s to open the Gemma 3 270M file (a numpy slice per vocabulary string, 3 x 262,144 of them) where this
parser takes well under a second, and it trusts the counts it reads, so a hostile header with a huge key count
or array length makes it loop for hours. Here every count is checked against the bytes that remain before it
is used. gguf-py still supplies the type enums and block sizes.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType
from gguf import GGMLQuantizationType as QT

from worker.errors import ErrorCode, WorkerError
from worker.models import ARCHITECTURES

SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 10_000  # M0-W-1210: tensor count < 10,000
MAX_KV = 100_000
MAX_DIMS = 4
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# The formats the worker holds in device memory and computes with (quant.py); others are refused at open.
SUPPORTED_TENSOR_TYPES = frozenset(
    {
        QT.F32,
        QT.F16,
        QT.BF16,
        QT.Q4_0,
        QT.Q4_1,
        QT.Q5_0,
        QT.Q5_1,
        QT.Q8_0,
        QT.Q4_K,
        QT.Q5_K,
        QT.Q6_K,
        QT.Q2_K,
        QT.Q3_K,
        QT.IQ4_NL,
        QT.IQ4_XS,
        QT.MXFP4,
    }
)

# Metadata every model file must carry; the architecture's own keys are checked by its adapter.
REQUIRED_KEYS = ("general.architecture",)

# The value types the GGUF spec gives the general and tokenizer keys the worker reads: a file that stores one
# with another type is refused here, so that inspect, the tokenizer and the adapters never meet it.
# (type, item type of an array or None); GGUF arrays hold one item type, so the first item speaks for all.
_STR, _INT, _BOOL = (str, None), (int, None), (bool, None)
_KEY_TYPES: dict[str, tuple[type, type | None]] = {
    "general.architecture": _STR,
    "general.name": _STR,
    "general.alignment": _INT,
    "general.file_type": _INT,
    "general.quantization_version": _INT,
    "tokenizer.ggml.model": _STR,
    "tokenizer.ggml.pre": _STR,
    "tokenizer.chat_template": _STR,
    "tokenizer.ggml.tokens": (list, str),
    "tokenizer.ggml.merges": (list, str),
    "tokenizer.ggml.scores": (list, float),
    "tokenizer.ggml.token_type": (list, int),
    "tokenizer.ggml.bos_token_id": _INT,
    "tokenizer.ggml.eos_token_id": _INT,
    "tokenizer.ggml.unknown_token_id": _INT,
    "tokenizer.ggml.padding_token_id": _INT,
    "tokenizer.ggml.add_bos_token": _BOOL,
    "tokenizer.ggml.add_eos_token": _BOOL,
}

# value type -> (little-endian struct/numpy format, size)
_SCALARS = {
    GGUFValueType.UINT8: ("<u1", 1),
    GGUFValueType.INT8: ("<i1", 1),
    GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT16: ("<u2", 2),
    GGUFValueType.INT16: ("<i2", 2),
    GGUFValueType.UINT32: ("<u4", 4),
    GGUFValueType.INT32: ("<i4", 4),
    GGUFValueType.FLOAT32: ("<f4", 4),
    GGUFValueType.UINT64: ("<u8", 8),
    GGUFValueType.INT64: ("<i8", 8),
    GGUFValueType.FLOAT64: ("<f8", 8),
}
_STRUCT = {
    "u1": "B",
    "i1": "b",
    "?": "?",
    "u2": "H",
    "i2": "h",
    "u4": "I",
    "i4": "i",
    "f4": "f",
    "u8": "Q",
    "i8": "q",
    "f8": "d",
}
_PLAIN_DTYPES = {QT.F32: np.float32, QT.F16: np.float16}


def _fail(path: Path | str, reason: str) -> WorkerError:
    return WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"{path}: {reason}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: QT
    shape: tuple[int, ...]  # numpy order: GGUF's ne reversed, so the last axis is the blocked one (ne0)
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    data: np.ndarray  # read-only mmap view: typed for F32/F16, raw uint8 blocks otherwise

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> value) and `tensors` (name -> TensorInfo, file order)."""

    def __init__(
        self,
        path: Path,
        version: int,
        metadata: dict[str, Any],
        tensors: dict[str, TensorInfo],
        alignment: int,
        data_offset: int,
        mm: mmap.mmap | None,
    ):
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self._mmap = mm  # kept open: the tensors' data arrays are views into it

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """`<architecture>.<suffix>`, e.g. arch_key("block_count")."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise _fail(self.path, f"missing required metadata key {key!r}")
        return self.metadata[key]

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes one batch-1 decode step reads: every tensor once, except the token embedding (one row is
        gathered, unless it doubles as the output matrix) and a mixture of experts' `_exps` tensors (only the
        `expert_used_count` of `expert_count` experts the router picks)."""
        n_experts = int(self.arch_key("expert_count", 0) or 0)
        n_used = int(self.arch_key("expert_used_count", 0) or 0)
        total = 0
        for name, t in self.tensors.items():
            if name == "token_embd.weight" and "output.weight" in self.tensors:
                total += t.nbytes // t.shape[0]
            elif "_exps." in name and n_experts:
                total += t.nbytes * n_used // n_experts  # [n_experts, ...]: the chosen experts' slices
            else:
                total += t.nbytes
        return total


def open_gguf(path: str | os.PathLike[str], *, require_tensors: bool = True) -> GGUFFile:
    """Open and validate a GGUF file. `require_tensors=False` accepts vocab-only files (tokenizers)."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found")
    if not path.is_file():
        raise _fail(path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise _fail(path, "file is not readable (permission denied)")
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 4 or fh.read(4) != GGUF_MAGIC:
                fh.seek(0)
                raise _fail(path, f"bad magic {fh.read(4)!r}: not a GGUF file (expected b'GGUF')")
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise _fail(path, f"cannot read file: {e.strerror or e}") from None
    try:
        gf = _Parser(path, mm).parse()
        _validate(gf, size, require_tensors)
        return gf
    except WorkerError as e:
        failure = WorkerError(e.code, e.message)
    # A caller that keeps the error (to report it later) must not keep the file mapped and its descriptor open:
    # the error is raised afresh outside the handler, so its traceback holds no parser frame, and without `mm`.
    del mm
    raise failure


class _Parser:
    """Bounds-checked little-endian reads of the header; builds the metadata and the tensor table."""

    def __init__(self, path: Path, mm: mmap.mmap):
        self.path, self.mm, self.buf, self.size, self.pos = path, mm, memoryview(mm), len(mm), 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise _fail(self.path, f"truncated file: {what} at byte {self.pos} needs {n} bytes, file has {self.size}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, n: int, what: str):
        if self.pos + n > self.size:
            raise _fail(self.path, f"truncated file: {what} at byte {self.pos} needs {n} bytes, file has {self.size}")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        raw = self.take(self.unpack("<Q", 8, f"{what} length"), what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, f"{what} is not valid UTF-8") from None

    def parse(self) -> GGUFFile:
        self.pos = 4
        version = self.unpack("<I", 4, "version")
        if version not in SUPPORTED_VERSIONS:
            raise _fail(self.path, f"unsupported GGUF version {version} (supported: 2, 3)")
        tensor_count = self.unpack("<Q", 8, "tensor count")
        kv_count = self.unpack("<Q", 8, "metadata count")
        if tensor_count >= MAX_TENSORS:
            raise _fail(self.path, f"tensor count {tensor_count} exceeds the limit of {MAX_TENSORS - 1}")
        if kv_count >= MAX_KV:
            raise _fail(self.path, f"metadata key count {kv_count} exceeds the limit of {MAX_KV - 1}")
        metadata: dict[str, Any] = {}
        for i in range(kv_count):
            key = self.string(f"metadata key #{i}")
            if key in metadata:
                raise _fail(self.path, f"duplicate metadata key {key!r}")
            metadata[key] = self.value(self.unpack("<I", 4, f"type of {key!r}"), key, nested=False)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _fail(self.path, f"general.alignment {alignment!r} is not a positive power of two")
        infos = [self.tensor_info(i) for i in range(tensor_count)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, rel in infos:
            if name in tensors:
                raise _fail(self.path, f"duplicate tensor name {name!r}")
            tensors[name] = self.tensor(name, shape, qtype, rel, data_offset, alignment)
        return GGUFFile(self.path, version, metadata, tensors, alignment, data_offset, self.mm)

    def value(self, vtype: int, key: str, nested: bool) -> Any:
        if vtype in _SCALARS:
            fmt, n = _SCALARS[vtype]
            v = self.unpack("<" + _STRUCT[fmt[1:]], n, f"value of {key!r}")
            return bool(v) if vtype == GGUFValueType.BOOL else v
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key!r}")
        if vtype != GGUFValueType.ARRAY:
            raise _fail(self.path, f"metadata {key!r} has unknown value type {vtype}")
        if nested:
            raise _fail(self.path, f"metadata {key!r}: nested arrays are not supported")
        itype = self.unpack("<I", 4, f"array type of {key!r}")
        count = self.unpack("<Q", 8, f"array length of {key!r}")
        item = _SCALARS[itype][1] if itype in _SCALARS else 8  # a string needs at least its 8-byte length
        if count * item > self.size - self.pos:
            raise _fail(self.path, f"metadata {key!r}: array of {count} items overruns the file")
        if itype == GGUFValueType.BOOL:  # any nonzero byte is true, as for a scalar
            return (np.frombuffer(self.take(count, f"array {key!r}"), np.uint8) != 0).tolist()
        if itype in _SCALARS:
            raw = self.take(count * item, f"array {key!r}")
            return np.frombuffer(raw, dtype=_SCALARS[itype][0]).tolist()
        return [self.value(itype, key, nested=True) for _ in range(count)]

    def tensor_info(self, i: int) -> tuple[str, tuple[int, ...], QT, int]:
        name = self.string(f"tensor #{i} name")
        n_dims = self.unpack("<I", 4, f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _fail(self.path, f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = [self.unpack("<Q", 8, f"tensor {name!r} dims") for _ in range(n_dims)]
        raw_type = self.unpack("<I", 4, f"tensor {name!r} type")
        try:
            qtype = QT(raw_type)
        except ValueError:
            raise _fail(self.path, f"tensor {name!r} has unknown tensor type {raw_type}") from None
        if qtype not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))
            raise _fail(self.path, f"tensor {name!r} has unsupported type {qtype.name} (supported: {supported})")
        if any(d == 0 for d in dims) or np.prod([float(d) for d in dims]) > 2**48:
            raise _fail(self.path, f"tensor {name!r} has invalid shape {dims}")
        block, _ = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise _fail(
                self.path,
                f"tensor {name!r}: row length {dims[0]} is not a multiple of {qtype.name}'s block {block}",
            )
        rel = self.unpack("<Q", 8, f"tensor {name!r} offset")
        return name, tuple(reversed(dims)), qtype, rel

    def tensor(
        self, name: str, shape: tuple[int, ...], qtype: QT, rel: int, data_offset: int, alignment: int
    ) -> TensorInfo:
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(shape, dtype=np.int64))
        nbytes = n_elements // block * type_size
        if rel % alignment:
            raise _fail(self.path, f"tensor {name!r}: data offset {rel} is not aligned to {alignment} bytes")
        start = data_offset + rel
        if start + nbytes > self.size:
            raise _fail(
                self.path,
                f"truncated file: tensor {name!r} needs bytes {start}..{start + nbytes}, file has {self.size}",
            )
        if qtype in _PLAIN_DTYPES:
            data = np.frombuffer(self.mm, _PLAIN_DTYPES[qtype], n_elements, start).reshape(shape)
        else:
            row_bytes = shape[-1] // block * type_size
            data = np.frombuffer(self.mm, np.uint8, nbytes, start).reshape(*shape[:-1], row_bytes)
        return TensorInfo(name, qtype, shape, start, nbytes, data)


def _type_name(v: Any) -> str:
    return f"array of {type(v[0]).__name__}" if isinstance(v, list) and v else type(v).__name__


def _has_type(v: Any, kind: type) -> bool:
    return isinstance(v, kind) and (kind is bool or not isinstance(v, bool))  # bool is an int to Python


def _validate(gf: GGUFFile, size: int, require_tensors: bool) -> None:
    path = gf.path
    for key, (kind, item) in _KEY_TYPES.items():
        v = gf.metadata.get(key)
        if v is not None and not (_has_type(v, kind) and (item is None or not v or _has_type(v[0], item))):
            want = f"array of {item.__name__}" if item else kind.__name__
            raise _fail(path, f"metadata {key!r} has the wrong type ({_type_name(v)}; expected {want})")
    if require_tensors:
        for key in REQUIRED_KEYS:
            gf.require(key)
        arch = gf.metadata["general.architecture"]
        if arch not in ARCHITECTURES:
            supported = ", ".join(ARCHITECTURES)
            raise _fail(path, f"unknown architecture {arch!r} (supported: {supported})")
        if not gf.tensors:
            raise _fail(path, "the file holds no tensors (a vocab-only file cannot be served)")
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in gf.tensors.values())
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise _fail(path, f"tensors {a!r} and {b!r} overlap in the file")
