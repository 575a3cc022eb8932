"""Tensor parallelism on XLA's SPMD partitioner: the device mesh, every weight's sharding described once by logical
axis names, the rules that map those names to mesh axes, the load-time checks (heads, vocabulary, quantized
blocks), and the placement of each weight shard by shard from the file's mmap. XLA inserts the collectives.

Megatron's split, in GGUF's [Out, In] matrices: q/k/v and gate/up by output rows (a device computes its heads and
its slice of the FFN), attention-output and down by input columns (each device's partial sums meet in one
all-reduce); the embedding and the output projection by vocabulary rows; gpt-oss's experts by expert (expert
parallel: a whole expert per device, so an MXFP4 expert is never cut); the KV cache by kv heads (axis 3 of k and
v, as the attention reads it).

Fewer kv heads than devices: each kv head is replicated over N / K devices (vLLM's rule), which is why the mesh has
two axes: MODEL (K' = min(N, K) groups, one slice of kv heads each) times KV_REPEAT (N / K' devices that share it).
Query heads, FFN columns, vocabulary and experts split over both axes (N ways); kv heads over MODEL only. With
K >= N, KV_REPEAT has size 1 and this is the plain one-axis split.

The CPU spreads a model over a host device a core (`cpu_mesh`, docs/tensor-parallel.md "The CPU's layouts"): a
CPU decode step computes its small products on one core (XLA:CPU's threads do not split them), so one device
leaves the other cores idle. Tensor parallelism where the model takes it; else head parallelism
(`worker.load(head_parallel=N)`): a one-axis mesh (HEAD) on which only the vocabulary splits (HEAD_RULES), every
other weight whole on each device and held once in host memory (device.held_once), a prefill chunk's tokens split
over the devices (models/base.run_layers); N devices take 1/N of the head each and compute the layers side by
side, with no collective but the logits' gather (and the embedding's lookup).

Why not flax's logical partitioning (`flax.linen.logical_to_mesh_sharding` and its rules): what we would use of
it is the lookup of a tuple of names in a rules table, which is RULES and `spec` below. flax would bring optax,
orbax, tensorstore, msgpack and its module system into a worker that has no flax modules, for those lines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf.quants
import jax
import numpy as np
from gguf import GGML_QUANT_SIZES
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from worker.device import MemoryEstimate
from worker.errors import ErrorCode, WorkerError
from worker.gguf import GGUFFile, TensorInfo
from worker.quant import PLAIN_TYPES, Int8Blocks, QuantArray, cpu_split, pack, to_int8_blocks

MODEL, KV_REPEAT, HEAD = "model", "kv_repeat", "head"

# Logical axis -> mesh axes it is split over (None: replicated).
RULES: dict[str, tuple[str, ...] | None] = {
    "embed": None,
    "heads": (MODEL, KV_REPEAT),
    "kv_heads": (MODEL,),
    "mlp": (MODEL, KV_REPEAT),
    "vocab": (MODEL, KV_REPEAT),
    "experts": (MODEL, KV_REPEAT),
}

# Head parallelism's rules: the vocabulary over HEAD, the rest replicated.
HEAD_RULES: dict[str, tuple[str, ...] | None] = {name: None for name in RULES} | {"vocab": (HEAD,)}


def rules(mesh: Mesh) -> dict[str, tuple[str, ...] | None]:
    """The rules of `mesh`'s layout: head parallelism's on a HEAD mesh, else tensor parallelism's."""
    return HEAD_RULES if HEAD in mesh.axis_names else RULES


_NORM = ("embed",)
# Every weight's axes by logical name, in numpy order ([Out, In] matrices, [E, Out, In] experts), keyed by the field
# of the weights pytree (models/base.py: a GGUF name inside its block, `.bias` -> `_b`). A field missing here fails
# the load: a new tensor must say how it splits.
WEIGHT_AXES: dict[str, tuple[str | None, ...]] = {
    "token_embd": ("vocab", "embed"),
    "output": ("vocab", "embed"),
    "position_embd": (None, "embed"),
    "output_norm": _NORM,
    "output_norm_b": _NORM,
    "attn_norm": _NORM,
    "attn_norm_b": _NORM,
    "ffn_norm": _NORM,
    "ffn_norm_b": _NORM,
    "post_attention_norm": _NORM,
    "post_ffw_norm": _NORM,
    "attn_q": ("heads", "embed"),
    "attn_q_b": ("heads",),
    "attn_k": ("kv_heads", "embed"),
    "attn_k_b": ("kv_heads",),
    "attn_v": ("kv_heads", "embed"),
    "attn_v_b": ("kv_heads",),
    "attn_q_norm": (None,),  # one weight per head dimension, shared by the heads
    "attn_k_norm": (None,),
    "attn_sinks": ("heads",),
    "attn_output": ("embed", "heads"),
    "attn_output_b": _NORM,
    "ffn_gate": ("mlp", "embed"),
    "ffn_up": ("mlp", "embed"),
    "ffn_up_b": ("mlp",),
    "ffn_down": ("embed", "mlp"),
    "ffn_down_b": _NORM,
    "ffn_gate_inp": (None, "embed"),  # the router: tiny, and every device needs all of its logits
    "ffn_gate_inp_b": (None,),
    "ffn_gate_exps": ("experts", None, "embed"),
    "ffn_gate_exps_b": ("experts", None),
    "ffn_up_exps": ("experts", None, "embed"),
    "ffn_up_exps_b": ("experts", None),
    "ffn_gate_up_exps": ("experts", None, "embed"),
    "ffn_gate_up_exps_b": ("experts", None),
    "ffn_down_exps": ("experts", "embed", None),
    "ffn_down_exps_b": ("experts", None),
}

# Fused matrices (phi3's attn_qkv = [q | k | v] and ffn_up = [gate | up], gpt2's attn_qkv): a contiguous row split
# of the fused rows would hand a device q heads of one group and k heads of another. Under tensor parallelism each
# part is loaded as its own weight (the forward already computes separate q/k/v and gate/up when those are present).
FUSED_PARTS = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_up": ("ffn_gate", "ffn_up")}


def refuse(message: str) -> WorkerError:
    return WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"tensor parallelism: {message}")


def make_mesh(n_kv_heads: int, devices: list[jax.Device]) -> Mesh:
    """The MODEL x KV_REPEAT mesh over `devices` for a model with `n_kv_heads` (check_model has passed)."""
    n = len(devices)
    groups = min(n, n_kv_heads)
    return Mesh(np.asarray(devices).reshape(groups, n // groups), (MODEL, KV_REPEAT))


def pick_devices(platform: str, n: int, first: int = 0, flag: str = "--tensor-parallel") -> list[jax.Device]:
    """Devices first .. first + n - 1 of the platform; a clear error (naming the option `flag`) when there are
    fewer."""
    try:
        devs = jax.devices(platform)
    except RuntimeError:
        devs = []
    if first + n > len(devs):
        hint = " (XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)" if platform == "cpu" else ""
        raise WorkerError(
            ErrorCode.INVALID_REQUEST,
            f"{flag} {n} from device {first} needs {first + n} {platform} devices; JAX sees {len(devs)}" + hint,
        )
    return devs[first : first + n]


def spec(logical: tuple[str | None, ...], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of a weight described by logical axis names, through the mesh's rules."""
    table = rules(mesh)
    return PartitionSpec(*(table[name] if name is not None else None for name in logical))


def axes_of(field: str) -> tuple[str | None, ...]:
    if field not in WEIGHT_AXES:
        raise refuse(f"no sharding rule for weight {field!r} (add it to worker/sharding.py WEIGHT_AXES)")
    return WEIGHT_AXES[field]


def cache_sharding(mesh: Mesh, ndim: int = 5) -> NamedSharding:
    """k and v of the KV cache ([L, B, S, K, D], or a paged [L, P, page, K, D]): kv heads (axis 3) over MODEL (whole
    on each device under head parallelism)."""
    parts = [None] * ndim
    parts[3] = rules(mesh)["kv_heads"]
    return NamedSharding(mesh, PartitionSpec(*parts))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_devices(mesh: Mesh) -> list[jax.Device]:
    return list(mesh.devices.flat)


@dataclass(frozen=True)
class _Part:
    """Rows [start, stop) of a tensor (axis -2 of a matrix, axis 0 of a vector): a fused matrix's part; the whole
    tensor when start is None."""

    name: str
    t: TensorInfo
    start: int | None = None
    stop: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.start is None:
            return self.t.shape
        axis = len(self.t.shape) - 2 if len(self.t.shape) >= 2 else 0
        return (*self.t.shape[:axis], self.stop - self.start, *self.t.shape[axis + 1 :])

    def data(self) -> np.ndarray:
        d = self.t.data
        if self.start is None:
            return d
        return d[..., self.start : self.stop, :] if len(self.t.shape) >= 2 else d[self.start : self.stop]


def _shards(name: str | None, mesh: Mesh) -> int:
    """How many ways a logical axis splits on this mesh."""
    return math.prod(mesh.shape[a] for a in (rules(mesh)[name] or ())) if name is not None else 1


def _check_split(part: _Part, logical: tuple[str | None, ...], mesh: Mesh, cpu: bool) -> None:
    """Every split axis divides evenly, and a split of the blocked (last) axis of a quantized matrix falls on block
    boundaries: the file's blocks, or on the CPU backend (`cpu`) the CPU layout's, which a matrix is converted to
    whole before it is split (`_placed_whole`)."""
    for axis, (size, name) in enumerate(zip(part.shape, logical, strict=True)):
        if size % _shards(name, mesh):
            raise refuse(f"{part.name}: axis {axis} ({name}, {size}) does not split over {_shards(name, mesh)} devices")
    block = _cpu_block(part) if cpu else GGML_QUANT_SIZES[part.t.qtype][0]
    n, k = _shards(logical[-1], mesh), part.shape[-1]
    if len(part.shape) >= 2 and n > 1 and (k // n) % block:
        raise refuse(
            f"{part.name}: splitting its {k} input columns ({logical[-1]}) over {n} devices gives {k // n} per "
            f"device, which cuts {part.t.qtype.name}'s {block}-value blocks (a split must fall on block boundaries: "
            "use fewer devices or a format with smaller blocks)"
        )


def _cpu_block(part: _Part) -> int:
    """The block a CPU-layout matrix may be split at (a 2-D block-format matrix: its CPU layout's blocks and nibble
    groups, quant.cpu_split; else the file's)."""
    qtype = part.t.qtype
    converted = len(part.shape) == 2 and qtype not in PLAIN_TYPES
    return cpu_split(qtype) if converted else GGML_QUANT_SIZES[qtype][0]


def _placed_whole(part: _Part, sharding: NamedSharding) -> Int8Blocks:
    """A block-format matrix whose column split would cut the file's blocks, on the CPU backend: converted whole to
    the CPU layout on the first device, then split at the layout's smaller blocks (Qwen2.5-0.5B's K-quant ffn_down,
    4,864 columns: 2,432 a device is 76 of its 32-value sub-blocks, not whole 256-value super-blocks)."""
    first = next(iter(sharding.device_set))
    raw = part.data()
    q = QuantArray({k: jax.device_put(v, first) for k, v in pack(raw, part.t.qtype, part.shape).items()},
                   part.t.qtype, part.shape)  # fmt: skip
    whole = to_int8_blocks(q)
    spread = jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), whole)
    return dataclasses.replace(spread, sharding=sharding)


def _place(part: _Part, logical: tuple[str | None, ...], mesh: Mesh, cpu: bool) -> QuantArray | Int8Blocks | jax.Array:
    """One weight as a global array whose shards are packed from the matching bytes of the mmap and copied to their
    devices one by one; a shard replicated over several devices is packed once. On the CPU backend (`cpu`) a matrix
    whose column split would cut the file's blocks is converted whole first (`_placed_whole`)."""
    sharding = NamedSharding(mesh, spec(logical, mesh))  # the split was checked by check_splits
    matrix = len(part.t.shape) >= 2
    qtype, data, shape = part.t.qtype, part.data(), part.shape
    block, type_size = GGML_QUANT_SIZES[qtype]
    if cpu and len(shape) == 2 and qtype not in PLAIN_TYPES and (shape[-1] // _shards(logical[-1], mesh)) % block:
        return _placed_whole(part, sharding)
    if not matrix:  # vectors (norms, biases, sinks) are float32 on the device
        data = np.asarray(gguf.quants.dequantize(data, qtype), np.float32).reshape(shape)
    packed: dict[tuple, dict[str, np.ndarray]] = {}
    per_device: list[tuple[jax.Device, tuple]] = []
    for device, index in sharding.devices_indices_map(shape).items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
        per_device.append((device, bounds))
        if bounds in packed:
            continue
        lead = tuple(slice(a, b) for a, b in bounds[:-1])
        a, b = bounds[-1]
        if not matrix:
            packed[bounds] = {"w": np.ascontiguousarray(data[(*lead, slice(a, b))])}
        elif qtype in PLAIN_TYPES:
            packed[bounds] = pack(data[(*lead, slice(a, b))], qtype, tuple(y - x for x, y in bounds))
        else:  # raw blocks: [..., rows, row_bytes]; the column range is whole blocks (checked above)
            raw = data[(*lead, slice(a // block * type_size, b // block * type_size))]
            packed[bounds] = pack(raw, qtype, tuple(y - x for x, y in bounds))
    planes = {}
    for plane in next(iter(packed.values())):
        # Host devices share one host memory: a replicated shard's bytes are packed once and aliased by each.
        pieces = [jax.device_put(packed[bounds][plane], device, may_alias=device.platform == "cpu")
                  for device, bounds in per_device]  # fmt: skip
        global_shape = (*shape[:-1], pieces[0].shape[-1] * _shards(logical[-1], mesh))
        planes[plane] = jax.make_array_from_single_device_arrays(global_shape, sharding, pieces)
    if not matrix:
        return planes["w"]
    parts = _shards(logical[0], mesh) if len(shape) == 3 else 1
    return QuantArray(planes, qtype, shape, parts=parts, sharding=sharding)


def placer(cfg: Any, mesh: Mesh) -> Callable[[TensorInfo, str], dict[str, Any]]:
    """models.base.load_weights' `place` hook: the fields one tensor becomes, each placed shard by shard."""

    def place(t: TensorInfo, field: str) -> dict[str, Any]:
        return {name: _place(part, axes_of(name), mesh, cfg.backend == "cpu") for name, part in _fields(t, field, cfg)}

    return place


def check_splits(gf: GGUFFile, table: dict[str, tuple[tuple, bool]], cfg: Any, mesh: Mesh) -> None:
    """Every tensor's split (divisible axes, whole quantized blocks), before the first byte is copied."""
    for name, t in gf.tensors.items():
        for field, part in _fields(t, table[name][0][-1], cfg):
            _check_split(part, axes_of(field), mesh, cfg.backend == "cpu")


def _fields(t: TensorInfo, field: str, cfg: Any) -> list[tuple[str, _Part]]:
    """The weights a tensor becomes: itself, or a fused matrix's parts (FUSED_PARTS), each its rows of the file."""
    stem, bias = field.removesuffix("_b"), "_b" if field.endswith("_b") else ""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = t.shape[-2] if len(t.shape) >= 2 else t.shape[0]
    if stem == "attn_qkv":
        bounds = (0, q, q + kv, q + 2 * kv)
    elif stem == "ffn_up" and getattr(getattr(cfg, "traits", None), "fused", False):  # phi3: [gate | up]
        bounds = (0, rows // 2, rows)
    else:
        return [(field, _Part(t.name, t))]
    return [
        (name + bias, _Part(f"{t.name} ({name} rows {a}..{b})", t, a, b))
        for name, a, b in zip(FUSED_PARTS[stem], bounds[:-1], bounds[1:], strict=True)
    ]


def check_model(cfg: Any, n: int) -> None:
    """The whole-model rules, before any byte is copied: heads, kv heads, vocabulary and experts divide over the
    devices (the tensors' own splits: check_splits)."""
    if cfg.n_heads % n:
        raise refuse(f"{cfg.n_heads} query heads do not split over {n} devices (the heads must be a multiple of N)")
    if cfg.n_kv_heads % n and n % cfg.n_kv_heads:
        raise refuse(
            f"{cfg.n_kv_heads} kv heads and {n} devices: the kv heads must be a multiple of N (split) or divide N "
            "(each kv head then replicated on N / kv heads devices)"
        )
    if cfg.vocab_size % n:
        raise refuse(f"the vocabulary ({cfg.vocab_size} rows) is not a multiple of {n} devices")
    experts = getattr(cfg, "n_experts", None)
    if experts is not None and experts % n:
        raise refuse(f"{experts} experts do not split over {n} devices (expert parallel: whole experts per device)")


def weight_bytes_per_device(gf: GGUFFile, table: dict[str, tuple[tuple, bool]], mesh: Mesh) -> int:
    """Bytes of the file's tensors one device holds: each tensor's bytes over the ways it splits (a fused matrix
    counted at its least split part's rate)."""
    total = 0
    for name, t in gf.tensors.items():
        field = table[name][0][-1]
        stem, bias = field.removesuffix("_b"), "_b" if field.endswith("_b") else ""
        fields = [p + bias for p in FUSED_PARTS[stem]] if stem in FUSED_PARTS else [field]
        shards = min(math.prod(_shards(a, mesh) for a in WEIGHT_AXES.get(f, ())) for f in fields)
        total += math.ceil(t.nbytes / shards)
    return total


def kv_split(mesh: Mesh) -> int:
    """The ways the KV cache's kv heads are split (each device holds 1 / kv_split of the cache)."""
    return _shards("kv_heads", mesh)


def per_device(need: MemoryEstimate, gf: GGUFFile, table: dict[str, tuple[tuple, bool]], mesh: Mesh) -> MemoryEstimate:
    """What one device of the mesh holds: its shards of the weights (at `need`'s bytes a file byte: the planes', or
    the CPU layout's) and of the KV cache, and (kept whole, to stay on the safe side) the working memory of one
    device's chunk."""
    weights = math.ceil(weight_bytes_per_device(gf, table, mesh) * need.weights / max(1, gf.tensor_bytes))
    return MemoryEstimate(weights, math.ceil(need.kv_cache / kv_split(mesh)), need.working)


def mesh_for(cfg: Any, platform: str, n: int, first: int = 0) -> Mesh:
    """The mesh of a model loaded with tensor_parallel=n: n devices of the platform from `first` on (the GPU index;
    CPU devices from 0), after the whole-model rules (heads, kv heads, vocabulary, experts)."""
    if n < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"--tensor-parallel {n}: must be at least 1")
    check_model(cfg, n)
    return make_mesh(cfg.n_kv_heads, pick_devices(platform, n, first if platform != "cpu" else 0))


def head_mesh(cfg: Any, n: int) -> Mesh:
    """The HEAD mesh of a model loaded with head_parallel=n: n host devices, the vocabulary split n ways."""
    if n < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"head parallelism over {n} devices: must be at least 1")
    if cfg.vocab_size % n:
        raise refuse(f"the vocabulary ({cfg.vocab_size} rows) is not a multiple of {n} devices")
    return Mesh(np.asarray(pick_devices("cpu", n, flag="--cpu-devices")), (HEAD,))


def head_ways(vocab: int, most: int) -> int:
    """The most devices, up to `most`, that the vocabulary's rows divide over."""
    return next(n for n in range(most, 0, -1) if vocab % n == 0)


def cpu_mesh(gf: GGUFFile, table: dict[str, tuple[tuple, bool]], cfg: Any, n: int) -> Mesh | None:
    """The CPU's layout over up to n host devices (worker.load's cpu_devices): tensor parallelism where the model
    takes it (each device computes its share of every layer: Gemma 3 270M decodes 1.5x one device's rate on 2
    cores, head parallelism 1.2x; docs/PERFORMANCE.md, "CPU"), else head parallelism over as many as divide the
    vocabulary; None: one device."""
    if n > 1:
        try:
            mesh = mesh_for(cfg, "cpu", n)
            check_splits(gf, table, cfg, mesh)
            return mesh
        except WorkerError:  # heads, kv heads, vocabulary, experts or a quantized block the split would cut
            pass
    ways = head_ways(cfg.vocab_size, n)
    return head_mesh(cfg, ways) if ways > 1 else None


def tokens_split(mesh: Mesh | None) -> int:
    """The ways a prefill chunk's tokens split over `mesh` (head parallelism's devices; else 1)."""
    return mesh.shape[HEAD] if mesh is not None and HEAD in mesh.axis_names else 1
