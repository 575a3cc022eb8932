"""Small GGUF files for the validation tests.

`write_model` writes a valid llama-like model with gguf-py's GGUFWriter; `layout` finds the byte offset of
every header field with gguf-py's own GGUFReader (independent of worker/gguf.py), so the tests patch fields
by name instead of by hard-coded offsets; `patch` and `truncate` mutate the file in place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

EMBD = 64
VOCAB = 16
_WIDTH_FORMAT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


@dataclass(frozen=True)
class Span:
    """A field of the file: absolute byte offset and width."""

    offset: int
    size: int


@dataclass
class KeyLayout:
    key_len: Span
    key: Span
    vtype: Span
    value: list[Span]  # scalar: [value]; string: [len, bytes]; array: [item type, count, items...]
    types: list[GGUFValueType]  # [value type] or [ARRAY, item type]


@dataclass
class TensorLayout:
    name_len: Span
    name: Span
    n_dims: Span
    dims: list[Span]
    qtype: Span
    offset: Span  # relative to data_offset
    rel: int  # the offset's value as written
    data: Span  # where the data lies in the file


@dataclass
class Layout:
    size: int
    version: Span
    tensor_count: Span
    kv_count: Span
    data_offset: int
    keys: dict[str, KeyLayout] = field(default_factory=dict)
    tensors: dict[str, TensorLayout] = field(default_factory=dict)

    def int_fields(self) -> list[Span]:
        """Every count, length, type, dimension and offset field: what a hostile header would lie about."""
        out = [self.version, self.tensor_count, self.kv_count]
        for k in self.keys.values():
            out += [k.key_len, k.vtype]
            if k.types[0] == GGUFValueType.STRING:
                out.append(k.value[0])
            elif k.types[0] == GGUFValueType.ARRAY:
                out += k.value[:2]
                if k.types[1] == GGUFValueType.STRING:
                    out += k.value[2::2]
        for t in self.tensors.values():
            out += [t.name_len, t.n_dims, *t.dims, t.qtype, t.offset]
        return out

    def boundaries(self) -> list[int]:
        """Where every field and every tensor's data begins and ends: where a cut or a flip hurts most."""
        spans = [*self.int_fields(), *(t.data for t in self.tensors.values())]
        return sorted({p for s in spans for p in (s.offset, s.offset + s.size)} | {self.data_offset, self.size})


def _spans(start: int, parts: list[np.ndarray]) -> list[Span]:
    out, pos = [], start
    for p in parts:
        out.append(Span(pos, int(p.nbytes)))
        pos += int(p.nbytes)
    return out


def layout(path: Path) -> Layout:
    reader = GGUFReader(path)
    f = reader.fields
    lay = Layout(
        size=path.stat().st_size,
        version=Span(f["GGUF.version"].offset, 4),
        tensor_count=Span(f["GGUF.tensor_count"].offset, 8),
        kv_count=Span(f["GGUF.kv_count"].offset, 8),
        data_offset=reader.data_offset,
    )
    for name, rf in f.items():
        if name.startswith("GGUF."):
            continue
        s = _spans(rf.offset, rf.parts)
        lay.keys[name] = KeyLayout(s[0], s[1], s[2], s[3:], list(rf.types))
    for t in reader.tensors:
        s = _spans(t.field.offset, t.field.parts)
        n_dims = int(t.field.parts[2][0])
        dims = [Span(s[3].offset + 8 * i, 8) for i in range(n_dims)]
        data = Span(int(t.data_offset), int(t.n_bytes))
        lay.tensors[t.name] = TensorLayout(s[0], s[1], s[2], dims, s[4], s[5], int(t.field.parts[5][0]), data)
    return lay


def write_model(path: Path, *, arch: str = "llama", alignment: int | None = None, with_tensors: bool = True,
                n_small_tensors: int = 0, kv: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] | None = None,
                loadable: bool = False) -> Path:  # fmt: skip
    """A valid model-like file: Q8_0, F16 and F32 tensors, scalar, string and array metadata.

    `general.name`/`general.type` and `blk.0.attn_q`/`blk.0.attn_k` have equal lengths so that a test can turn
    one into the other in place. `n_small_tensors` adds that many 8-element F32 tensors (tensor-count limit).
    `kv` adds or replaces metadata: key -> (value, value type, array item type or None). `loadable` adds what the
    llama adapter needs beyond that (the other tensors of the block, feed_forward_length), after the others.
    """
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, arch)
    w.add_name("tiny")
    w.add_type("model")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(EMBD)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(7)  # LLAMA_FTYPE_MOSTLY_Q8_0
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(VOCAB)])
    w.add_token_scores([float(-i) for i in range(VOCAB)])
    w.add_add_bos_token(True)
    if loadable:
        w.add_feed_forward_length(EMBD)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, item_type) in (kv or {}).items():
        w.kv_data[0].pop(key, None)  # replacing is intended here: skip the writer's duplicate-key warning
        w.add_key_value(key, value, vtype, item_type)
    if with_tensors:
        for name, rows in (("token_embd.weight", VOCAB), ("blk.0.attn_q.weight", EMBD), ("blk.0.attn_k.weight", EMBD)):
            w.add_tensor(name, quantize(rng.standard_normal((rows, EMBD), np.float32), QT.Q8_0), raw_dtype=QT.Q8_0)
        w.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((EMBD, EMBD)).astype(np.float16))
        w.add_tensor("blk.0.attn_norm.weight", np.ones(EMBD, np.float32))
        w.add_tensor("output_norm.weight", rng.standard_normal(EMBD).astype(np.float32))
        if loadable:
            for name in (
                "blk.0.attn_v.weight",
                "blk.0.attn_output.weight",
                "blk.0.ffn_gate.weight",
                "blk.0.ffn_down.weight",
            ):
                w.add_tensor(name, rng.standard_normal((EMBD, EMBD)).astype(np.float16))
            w.add_tensor("blk.0.ffn_norm.weight", np.ones(EMBD, np.float32))
        for i in range(n_small_tensors):
            w.add_tensor(f"extra.{i}", np.full(8, i, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def patch(path: Path, span: Span, value: int) -> None:
    """Overwrite an integer field (little-endian, the field's width)."""
    with path.open("r+b") as fh:
        fh.seek(span.offset)
        fh.write(struct.pack(_WIDTH_FORMAT[span.size], value))


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as fh:
        fh.truncate(size)
