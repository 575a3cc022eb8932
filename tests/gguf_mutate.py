"""Rewrite a GGUF file's metadata while keeping its tensors: for fuzzing what a file may say about its model.

`Template` reads a file once (gguf-py's reader finds the fields, independent of worker/gguf.py) and keeps every
metadata entry's raw bytes, the tensor-info block and the data. `build` writes the header anew with some entries
replaced, removed or added (encoded here from the GGUF spec) and the data after it at the alignment, so the
tensor offsets, which are relative to the data, stay valid.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader
from gguf import GGUFValueType as V
from gguf_factory import layout

SCALAR_FORMATS = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<?",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}


@dataclass(frozen=True)
class Entry:
    """A metadata value to write: its GGUF type, and the item type of an array."""

    vtype: V
    value: Any
    item: V | None = None


def _string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: V, value: Any) -> bytes:
    if vtype == V.STRING:
        return _string(value)
    return struct.pack(SCALAR_FORMATS[vtype], value)


def encode(key: str, entry: Entry) -> bytes:
    out = _string(key) + struct.pack("<I", entry.vtype)
    if entry.vtype != V.ARRAY:
        return out + _value(entry.vtype, entry.value)
    out += struct.pack("<IQ", entry.item, len(entry.value))
    return out + b"".join(_value(entry.item, v) for v in entry.value)


class Template:
    """One GGUF file, ready to be rebuilt with other metadata."""

    def __init__(self, path: Path):
        raw = path.read_bytes()
        lay = layout(path)
        reader = GGUFReader(path)
        self.version = struct.unpack_from("<I", raw, 4)[0]
        self.n_tensors = len(lay.tensors)
        self.entries: dict[str, bytes] = {}  # key -> its raw bytes, in file order
        self.values: dict[str, Entry] = {}
        for key, k in lay.keys.items():
            end = max(s.offset + s.size for s in [k.vtype, *k.value])
            self.entries[key] = raw[k.key_len.offset : end]
            f = reader.fields[key]
            item = V(f.types[1]) if f.types[0] == V.ARRAY else None
            self.values[key] = Entry(V(f.types[0]), f.contents(), item)
        info_start = min(t.name_len.offset for t in lay.tensors.values())
        info_end = max(t.offset.offset + t.offset.size for t in lay.tensors.values())
        self.tensor_infos = raw[info_start:info_end]
        self.data = raw[lay.data_offset :]
        self.architecture = self.values["general.architecture"].value

    def build(self, changes: dict[str, Entry | None], alignment: int = 32) -> bytes:
        """The file with `changes` applied: key -> new entry (replacing in place, or appended), or None (removed)."""
        kv = [encode(k, changes[k]) if k in changes else raw for k, raw in self.entries.items() if changes.get(k, 1)]
        kv += [encode(k, e) for k, e in changes.items() if k not in self.entries and e is not None]
        head = b"GGUF" + struct.pack("<IQQ", self.version, self.n_tensors, len(kv)) + b"".join(kv) + self.tensor_infos
        return head + b"\0" * (-len(head) % alignment) + self.data
