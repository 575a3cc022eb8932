"""What every model adapter shares: the config fields the runner, cache and engine read, metadata readers, the typed
description of a layer's weights, the one walk from GGUF tensor names to the weights pytree, and the per-layer loop
(attention block + the family's FFN) that every family runs.

A layer's weights are a dict keyed by the GGUF tensor name inside the block: `blk.3.attn_q.weight` is
`layers[3]["attn_q"]`, `blk.3.attn_q.bias` is `layers[3]["attn_q_b"]`. The same tensor has the same name in every
family; which optional tensors a layer holds (biases, fused q|k|v, q/k norms, sinks) is what the shared attention
block switches on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from worker import ops, sharding
from worker.errors import ErrorCode, WorkerError
from worker.gguf import GGUFFile, TensorInfo
from worker.kv_cache import NULL_PAGE, KVCache, slots_of
from worker.ops import Weight
from worker.quant import QuantArray, quant_array

Put = Callable[[np.ndarray], jax.Array]
Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The fields every family has. Frozen and hashable: a config is static under jit, so `backend` (which ops
    implementation the model's steps trace to, ops.BACKENDS) is part of the compiled program, not process state."""

    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    attn_scale: float
    post_norms: bool = False  # gemma3: RMS norms on the attention and FFN outputs before the residual add
    backend: str = "cpu"
    decode_kernels: str = "by-rows"  # the kernel backends' decode-sized products (ops.DECODE_KERNELS)
    # Tensor parallelism's device mesh (worker/sharding.py), for the ops that wrap a Pallas kernel in shard_map;
    # None: one device. Hashable, so it is part of the compiled program like `backend`.
    mesh: Mesh | None = None

    def rope(self, layer: int) -> Rope | None:
        """The rotary embedding of `layer`; None: the family has no RoPE (gpt2)."""
        return None

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (keys within `window` positions of the query); None: full attention."""
        return None


@dataclass(frozen=True)
class Rope:
    inv_freq: Any  # [rotated dims / 2] float32 (jax.Array; built while tracing)
    neox: bool  # rotate halves (i, i + d/2), else adjacent pairs (2i, 2i + 1)
    mscale: float = 1.0  # YaRN's attention factor on cos/sin


class LayerWeights(TypedDict, total=False):
    """One layer's tensors, named as in the GGUF block (`.bias` -> `_b`); each family holds a subset."""

    attn_norm: jax.Array
    attn_norm_b: jax.Array
    attn_q: Weight
    attn_q_b: jax.Array
    attn_k: Weight
    attn_k_b: jax.Array
    attn_v: Weight
    attn_v_b: jax.Array
    attn_qkv: Weight  # fused rows [q | k | v] (phi3, gpt2; FUSIONS)
    attn_qkv_b: jax.Array
    attn_qk: Weight  # fused rows [q | k] beside a v of another format (FUSIONS)
    attn_qk_b: jax.Array
    attn_q_norm: jax.Array  # per-head RMS norms of q and k before RoPE (gemma3, qwen3)
    attn_k_norm: jax.Array
    attn_output: Weight
    attn_output_b: jax.Array
    attn_sinks: jax.Array  # one logit per head in the softmax denominator (gpt-oss)
    post_attention_norm: jax.Array  # gemma3: on the attention output; gpt-oss: the FFN's pre-norm
    ffn_norm: jax.Array
    ffn_norm_b: jax.Array
    ffn_gate: Weight
    ffn_up: Weight  # phi3: fused rows [gate | up]
    ffn_up_b: jax.Array
    ffn_down: Weight
    ffn_down_b: jax.Array
    post_ffw_norm: jax.Array
    ffn_gate_inp: Weight  # the MoE router
    ffn_gate_inp_b: jax.Array
    ffn_gate_exps: QuantArray
    ffn_gate_exps_b: jax.Array
    ffn_up_exps: QuantArray
    ffn_up_exps_b: jax.Array
    ffn_gate_up_exps: QuantArray
    ffn_gate_up_exps_b: jax.Array
    ffn_down_exps: QuantArray
    ffn_down_exps_b: jax.Array
    # The expert matrices widened to bf16 at load, keyed by their names above: what a decode step's grouped MoE
    # matmul reads on a GPU (worker/model.py, `bf16_experts`).
    decode_experts: dict[str, QuantArray]


# An adapter's tensor list: GGUF name -> (expected shape or None, required). Names without a `blk.` prefix are
# the model's own (token_embd, output_norm, output); per-layer names are given once, without the prefix.
TensorSpec = dict[str, tuple[Shape | None, bool]]


def load_error(gf: GGUFFile, reason: str) -> WorkerError:
    return WorkerError(ErrorCode.MODEL_LOAD_FAILED, f"{gf.path}: {reason}")


def meta(gf: GGUFFile, suffix: str, default: Any = ..., cast: Callable = lambda v: v) -> Any:
    """`<arch>.<suffix>` from the metadata; a missing key with no default is a load error naming the key."""
    key = f"{gf.architecture}.{suffix}"
    if key in gf.metadata:
        return cast(gf.metadata[key])
    if default is ...:
        raise load_error(gf, f"missing required metadata key {key!r}")
    return default


def require_tensor(gf: GGUFFile, name: str) -> TensorInfo:
    if name not in gf.tensors:
        raise load_error(gf, f"missing tensor {name!r}")
    return gf.tensors[name]


def with_biases(shapes: dict[str, Shape], biased: set[str] | None = None) -> TensorSpec:
    """Required `<name>.weight` of each shape and, for the `biased` names (default: all), `<name>.bias` of the
    weight's output shape (a matrix's leading dims; a norm's own)."""
    spec: TensorSpec = {f"{name}.weight": (shape, True) for name, shape in shapes.items()}
    for name, shape in shapes.items():
        if biased is None or name in biased:
            spec[f"{name}.bias"] = (shape[:-1] if len(shape) > 1 else shape, True)
    return spec


def weight_table(gf: GGUFFile, n_layers: int, model: TensorSpec, layer: TensorSpec) -> dict[str, tuple[tuple, bool]]:
    """GGUF name -> (path in the weights pytree, required), checking every present tensor's shape."""
    table: dict[str, tuple[tuple, bool]] = {}

    def add(name: str, path: tuple, shape: Shape | None, required: bool) -> None:
        table[name] = (path, required)
        t = gf.tensors.get(name)
        if shape is not None and t is not None and t.shape != shape:
            raise load_error(gf, f"tensor {name!r} has shape {t.shape}, expected {shape} from the metadata")

    for name, (shape, required) in model.items():
        add(name, (field_name(name),), shape, required)
    for i in range(n_layers):
        for name, (shape, required) in layer.items():
            add(f"blk.{i}.{name}", ("layers", i, field_name(name)), shape, required)
    return table


def field_name(tensor: str) -> str:
    """`attn_q.weight` -> `attn_q`, `attn_q.bias` -> `attn_q_b`."""
    return tensor.removesuffix(".weight").replace(".bias", "_b")


def to_weight(t: TensorInfo, put: Put, matrix: bool) -> QuantArray | jax.Array:
    """Matrices stay in their stored format (QuantArray); vectors (norms, biases, sinks) become float32."""
    if matrix:
        return quant_array(t.data, t.qtype, t.shape, put=put)
    return put(np.asarray(gguf.quants.dequantize(t.data, t.qtype), np.float32).reshape(t.shape))


# Projections that read the same input, fused at load into one matrix of their rows where their formats agree, on
# the kernel backends: the forward's fused paths (phi3's file has them so) then take one matvec launch, one rounding
# of x (int8 x) and one split-K fold where two or three took theirs. A small model's one-stream decode step is
# bound by its number of small kernels: one stream on int8 x measured 7.2% faster fused on qwen2.5-0.5b, 2.3% on
# gpt-oss-20b (an H100, 2026-12-06; docs/PERFORMANCE.md). Not on the CPU, where XLA's dots of the parts measured
# faster (docs/kernels.md, "Fused projections"). The fused name's rows are the parts' in this order. Where a layer's
# q, k and v do not share a format (llama-quantize gives v more bits in some layers: qwen2.5-0.5b's Q4_K_M has a
# Q8_0 v beside Q5_0 q and k in half its layers), q|k fuse and v stays apart: the first fusion of a part that fits.
FUSIONS = {
    "attn_qkv": ("attn_q", "attn_k", "attn_v"),
    "attn_qk": ("attn_q", "attn_k"),
    "ffn_up": ("ffn_gate", "ffn_up"),
    # A mixture's experts [E, F, D] too, each expert's rows [gate | up] (llama.cpp's merged layout, which gpt_oss
    # reads): one grouped matmul a layer where two ran. At one token each had only its 4 experts' column tiles, 360
    # programs on gpt-oss-20b, which read at 0.39 TB/s (docs/PERFORMANCE.md, forty-third session); fused, 720.
    "ffn_gate_up_exps": ("ffn_gate_exps", "ffn_up_exps"),
}


def fusions_named(value: str) -> dict[str, tuple[str, ...]]:
    """WORKER_FUSE_PROJECTIONS's FUSIONS: every one for "1", none for "0", else those named (e.g. attn_qkv,ffn_up)."""
    if value in ("0", "1"):
        return dict(FUSIONS) if value == "1" else {}
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in FUSIONS]
    if unknown:
        raise ValueError(f"WORKER_FUSE_PROJECTIONS: {unknown[0]!r} is not 0, 1 or a comma-separated list of "
                         f"{', '.join(FUSIONS)}")  # fmt: skip
    return {name: FUSIONS[name] for name in FUSIONS if name in names}  # FUSIONS' order: the first that fits wins


# WORKER_FUSE_PROJECTIONS=0 loads the parts as the file has them, a list loads only those fusions (e.g.
# attn_qkv,attn_qk,ffn_up: all but the experts'): the A/Bs for the benchmarks.
_fusions = fusions_named(os.environ.get("WORKER_FUSE_PROJECTIONS", "1"))


def fused_tensors(gf: GGUFFile, table: dict[str, tuple[tuple, bool]]) -> dict[str, tuple[tuple, list[TensorInfo]]]:
    """The FUSIONS this file's layers allow: the name of each fused part's tensor -> (the fused field's path, the
    parts in row order), the parts given under the first part's name only (an empty list under the others). A group
    fuses when every part is a matrix (or a stack of experts' matrices) of one format, one input width and one
    number of experts, and the parts have biases all or none (of one type); otherwise the next fusion of its first
    part is tried (FUSIONS' order), and the parts of none load as they are."""
    out: dict[str, tuple[tuple, list[TensorInfo]]] = {}
    for name, (path, _) in table.items():
        if path[0] != "layers" or not name.endswith(".weight"):
            continue
        prefix = name.rsplit(".", 2)[0]  # blk.N
        for fused, parts in _fusions.items():
            if path[-1] != parts[0]:
                continue
            weights = [gf.tensors.get(f"{prefix}.{p}.weight") for p in parts]
            biases = [gf.tensors.get(f"{prefix}.{p}.bias") for p in parts]
            if any(w is None or len(w.shape) not in (2, 3) for w in weights):
                continue
            if len({(w.qtype, w.shape[:-2], w.shape[-1]) for w in weights}) > 1 or len({b is None for b in biases}) > 1:
                continue
            if biases[0] is not None and len({b.qtype for b in biases}) > 1:
                continue
            groups = [(weights, path[:-1] + (fused,))]
            if biases[0] is not None:
                groups.append((biases, path[:-1] + (f"{fused}_b",)))
            for ts, fused_path in groups:
                out[ts[0].name] = (fused_path, ts)
                out.update({other.name: (fused_path, []) for other in ts[1:]})
            break
    return out


def joined(parts: list[TensorInfo]) -> TensorInfo:
    """One tensor of the parts' rows, in order (a matrix's rows, a bias's values; an expert's each, expert by
    expert): GGUF rows are whole blocks, so within each leading index (an expert, or the one matrix) the bytes are
    the parts' one after another. Made as it is loaded, so that the host holds one fused tensor's copy at a time."""
    first, name = parts[0], "|".join(t.name for t in parts)
    axis = len(first.shape) - (1 if first.name.endswith(".bias") else 2)  # the rows' axis: the parts differ there
    lead = int(np.prod(first.shape[:axis], dtype=np.int64))
    data = np.concatenate([t.data.reshape(lead, -1) for t in parts], axis=1).reshape(-1)
    shape = (*first.shape[:axis], sum(t.shape[axis] for t in parts), *first.shape[axis + 1 :])
    return TensorInfo(name, first.qtype, shape, -1, sum(t.nbytes for t in parts), data)


def load_weights(
    gf: GGUFFile,
    table: dict[str, tuple[tuple, bool]],
    put: Put,
    on_tensor: Callable[[int], None] | None = None,
    place: Callable[[TensorInfo, str], dict[str, Any]] | None = None,
    fuse: bool = False,
) -> dict:
    """Build the nested weights dict from `table`; path elements are dict keys or list indices. `place(tensor,
    field)`: the fields a tensor becomes, instead of {field: to_weight(tensor, put)} (tensor parallelism places
    shards through it: worker/sharding.py; it splits fused matrices into their parts, so `fuse` is refused with it).
    `fuse`: the FUSIONS the file allows (WORKER_FUSE_PROJECTIONS=0 turns them off)."""
    if fuse and place is not None:
        raise ValueError("fused projections are a one-device layout; tensor parallelism places the parts")
    check_names(gf, table)
    fusing = fused_tensors(gf, table) if fuse else {}
    root: dict = {}
    for name, t in gf.tensors.items():
        path, _ = table[name]
        if name in fusing:
            path, parts = fusing[name]
            if not parts:  # a part of a fused tensor, loaded (and counted) under its first part's name
                continue
            t = joined(parts)
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.update(place(t, path[-1]) if place else {path[-1]: to_weight(t, put, matrix=len(t.shape) >= 2)})
        if on_tensor is not None:
            on_tensor(t.nbytes)
    return _lists(root)


def check_names(gf: GGUFFile, table: dict[str, tuple[tuple, bool]]) -> None:
    """Every tensor of the file is in the table, and every required one is in the file."""
    unknown = [n for n in gf.tensors if n not in table]
    if unknown:
        raise load_error(gf, f"unexpected tensor(s) for {gf.architecture}: {', '.join(unknown[:5])}")
    missing = [n for n, (_, required) in table.items() if required and n not in gf.tensors]
    if missing:
        raise load_error(gf, f"missing tensor(s) for {gf.architecture}: {', '.join(missing[:5])}")


def _lists(node):
    """{0: a, 1: b} -> [a, b] (per-layer dicts become lists so the pytree has a fixed order)."""
    if isinstance(node, dict):
        if node and all(isinstance(k, int) for k in node):
            return [_lists(node[i]) for i in range(len(node))]
        return {k: _lists(v) for k, v in node.items()}
    return node


def norm(x: jax.Array, w: jax.Array, b: jax.Array | None, cfg: ModelConfig) -> jax.Array:
    """LayerNorm where the file has a bias for the norm (gpt2), RMSNorm otherwise."""
    return rms_norm(x, w, cfg) if b is None else ops.layer_norm(x, w, b, cfg.norm_eps)


def rms_norm(x: jax.Array, w: jax.Array, cfg: ModelConfig) -> jax.Array:
    """RMSNorm on the model's backend and devices (ops.rms_norm: its kernel on the GPU)."""
    return ops.rms_norm(x, w, cfg.norm_eps, cfg.backend, cfg.mesh)


def normed_matmul(x: jax.Array, norm_w: jax.Array, norm_b: jax.Array | None, w: Weight, b: jax.Array | None,
                  cfg: ModelConfig) -> jax.Array:  # fmt: skip
    """norm(x) @ w.T (+ b), where the normalized x feeds this one product: an RMSNorm on one device is handed to
    ops.qmatmul (`norm`: on the int8-x kernels it may be done by the kernel that rounds x); LayerNorm, or a norm
    over a mesh, is done here first."""
    if norm_b is not None or cfg.mesh is not None:
        return ops.qmatmul(norm(x, norm_w, norm_b, cfg), w, b, backend=cfg.backend)
    return ops.qmatmul(x, w, b, backend=cfg.backend, norm=(norm_w, cfg.norm_eps))


def attention_block(lw: LayerWeights, cfg: ModelConfig, layer: int, x: jax.Array, positions: jax.Array,
                    cache: KVCache, table: jax.Array) -> tuple[jax.Array, KVCache]:  # fmt: skip
    """Pre-norm attention with its residual: x [B, T, D] -> x + attention(norm(x)), writing the layer's k/v at
    positions [B, T] of the sequences whose page tables are the rows of `table` [B, n]."""
    b, t, _ = x.shape
    hd, nh, nk, be = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.backend
    if "attn_qkv" in lw:
        qkv = normed_matmul(x, lw["attn_norm"], lw.get("attn_norm_b"), lw["attn_qkv"], lw.get("attn_qkv_b"), cfg)
        q, k, v = jnp.split(qkv, [nh * hd, (nh + nk) * hd], axis=-1)
    else:
        h = norm(x, lw["attn_norm"], lw.get("attn_norm_b"), cfg)
        if "attn_qk" in lw:
            q, k = jnp.split(ops.qmatmul(h, lw["attn_qk"], lw.get("attn_qk_b"), backend=be), [nh * hd], axis=-1)
            v = ops.qmatmul(h, lw["attn_v"], lw.get("attn_v_b"), backend=be)
        else:
            q = ops.qmatmul(h, lw["attn_q"], lw.get("attn_q_b"), backend=be)
            k = ops.qmatmul(h, lw["attn_k"], lw.get("attn_k_b"), backend=be)
            v = ops.qmatmul(h, lw["attn_v"], lw.get("attn_v_b"), backend=be)
    q, k, v = q.reshape(b, t, nh, hd), k.reshape(b, t, nk, hd), v.reshape(b, t, nk, hd)
    if "attn_q_norm" in lw:
        q = rms_norm(q, lw["attn_q_norm"], cfg)
        k = rms_norm(k, lw["attn_k_norm"], cfg)
    rope = cfg.rope(layer)
    rotary = None if rope is None else (rope.inv_freq, rope.neox, rope.mscale)  # q and k rotated there
    att, cache = ops.write_and_attend(q, k, v, cache, layer, table, positions, cfg.attn_scale, cfg.window(layer),
                                      lw.get("attn_sinks"), backend=be, mesh=cfg.mesh, rotary=rotary)  # fmt: skip
    att = att.reshape(b, t, nh * hd)
    if not cfg.post_norms:  # the residual add with the product (its kernel may do it: ops.qmatmul's `residual`)
        return ops.qmatmul(att, lw["attn_output"], lw.get("attn_output_b"), backend=be, residual=x), cache
    out = ops.qmatmul(att, lw["attn_output"], lw.get("attn_output_b"), backend=be)
    return x + rms_norm(out, lw["post_attention_norm"], cfg), cache


FFN = Callable[[LayerWeights, Any, jax.Array], jax.Array]


def live_tokens(cache: KVCache, table: jax.Array, positions: jax.Array) -> jax.Array:
    """[B, T] bool: whether each token's position has a page of its own in its row's table. False for a decode
    bucket's empty rows (a table of null pages) and a prefill chunk's padding (positions past the table): tokens
    whose results nobody reads. A sequence holds pages for every position it feeds (scheduler.Sequence)."""
    return slots_of(cache, table, positions)[0] != NULL_PAGE


def run_layers(weights: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array, cache: KVCache,
               table: jax.Array, ffn: FFN) -> tuple[jax.Array, KVCache]:  # fmt: skip
    """The per-layer loop every family shares: attention block, then the family's FFN block (with its residual).
    Under head parallelism a chunk's tokens split over the devices (each computes its share's products, the keys
    and values gathered for attention), where they divide evenly."""
    split = sharding.tokens_split(cfg.mesh)
    if split > 1 and x.shape[1] > 1 and x.shape[1] % split == 0:
        tokens = NamedSharding(cfg.mesh, PartitionSpec(None, sharding.HEAD, None))
        x = jax.lax.with_sharding_constraint(x, tokens)
    else:
        tokens = None
    with ops.decode_kernels(cfg.decode_kernels), ops.fold_counts():
        for i, lw in enumerate(weights["layers"]):
            x, cache = attention_block(lw, cfg, i, x, positions, cache, table)
            x = ffn(lw, cfg, x)
            if tokens is not None:  # kept split layer after layer, not left to XLA's propagation
                x = jax.lax.with_sharding_constraint(x, tokens)
    return x, cache


def logits(weights: dict, cfg: ModelConfig, hidden: jax.Array, softcap: float | None = None) -> jax.Array:
    """Output norm + projection (the token embeddings when the file has no `output`): [B, T, D] -> [B, T, V]."""
    head = weights.get("output", weights["token_embd"])
    with ops.decode_kernels(cfg.decode_kernels):
        out = normed_matmul(hidden, weights["output_norm"], weights.get("output_norm_b"), head, None, cfg)
    if softcap:
        out = jnp.tanh(out / softcap) * softcap
    if sharding.tokens_split(cfg.mesh) > 1:  # every device samples from all the logits: the one-device bits
        out = jax.lax.with_sharding_constraint(out, NamedSharding(cfg.mesh, PartitionSpec()))
    return out
