"""Decode attention (one query position per row) over a paged KV cache, batch invariant: a row's output is the same
bits whatever the batch size, the table width or the other rows. Flash-decoding over splits of a FIXED number of
pages, a second kernel folding the row's splits in order. Design and rules: docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from worker.kv_cache import NULL_PAGE
from worker.pallas_kernels.tiling import (
    NEG,
    TritonParams,
    kernel_entry,
    masked_load,
    padded_dim,
    pow2_at_least,
)

# Keys per split: the unit of work of one program, fixed so that a row's splits (and so its summation order)
# depend on its own position only. Smaller gives batch 1 more programs at short contexts; larger writes fewer
# partials at large batch (partials cost 2 G / SPLIT_KEYS of the k/v bytes: 12% at G = 8).
SPLIT_KEYS = 128
# Values per k (and v) tile: 128 keys at D = 64, 32 at D = 256, gathered over as many pages (a load each, a pair
# of tensor-core products; bigger tiles keep more bytes in flight a program).
TILE_VALUES = 8192
MAX_GROUP = 16  # query heads per kv head: the rows of the split kernel's block (zero-padded), a vector lane in the fold


def _tile_keys(split_keys: int, dp: int) -> int:
    """Keys per tile: TILE_VALUES / dp (16 KB of float16 k), a power of two dividing the split's keys, at least 16
    (the tensor cores' smallest product)."""
    bs = max(16, TILE_VALUES // dp)
    while split_keys % bs:
        bs //= 2
    return bs


def fits(q_shape: tuple[int, ...], pages_shape: tuple[int, ...]) -> bool:
    """Whether the kernel handles these shapes: q [B, 1, H, D], pages [L, P, page_size, K, D] with a page size
    that is a power of two >= 16, G = H / K <= 16 and D <= 256."""
    _b, t, h, d = q_shape
    _l, _p, page_size, kh, d_cache = pages_shape
    return (
        t == 1
        and d == d_cache
        and h % kh == 0
        and h // kh <= MAX_GROUP
        and d <= 256
        and page_size >= 16
        and page_size & (page_size - 1) == 0
    )


def _visible_tiles(p: jax.Array, bs: int, window: int | None, n_tiles: int) -> tuple[jax.Array, jax.Array]:
    """[lo, hi): the logical tiles of `bs` slots holding a key visible from position p (none when p < 0)."""
    lo = jnp.int32(0) if window is None else jnp.maximum(p - window + 1, 0) // bs
    hi = jnp.where(p >= 0, jnp.minimum(p // bs + 1, n_tiles), 0)
    return lo, hi


def _exact_dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:
    """a (float32) · b (the cache's dtype) in float32 on the tensor cores: a as a sum of terms in b's dtype (2 for
    float16: 22 of float32's 24 bits; 3 for bfloat16), one matrix product each. The products of two float16 (or
    bfloat16) values are exact in float32, so this is float32 math up to the dropped bits, where an IEEE float32
    product (Triton's FMA loop, 10x slower here: docs/PERFORMANCE.md, eleventh session) gains nothing. A float32
    cache (the CPU's) takes the IEEE product. Assumes |a| < 65504 for float16 (q is scaled first; k itself is
    float16)."""
    if b.dtype == jnp.float32:
        return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    out, rest = None, a
    for _ in range(2 if b.dtype == jnp.float16 else 3):
        term = rest.astype(b.dtype)
        part = jax.lax.dot_general(term, b, dims, preferred_element_type=jnp.float32)
        out = part if out is None else out + part
        rest = rest - term.astype(jnp.float32)
    return out


def _rotation(d: int, dp: int, neox: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RoPE's pairs as lanes of a head's [dp] vector: each lane's partner, its frequency's index, and whether it
    subtracts (its partner times sin): NEOX pairs (i, i + d/2), NORM (2i, 2i + 1). Lanes past d point inside it."""
    lane, half = jnp.arange(dp), d // 2
    if neox:
        partner, freq, minus = jnp.where(lane < half, lane + half, lane - half), lane % half, lane < half
    else:
        partner, freq, minus = lane ^ 1, lane // 2, lane % 2 == 0
    return jnp.clip(partner, 0, d - 1), jnp.minimum(freq, half - 1), minus


def _rotated(x: jax.Array, partner: jax.Array, cos: jax.Array, sin: jax.Array, minus: jax.Array) -> jax.Array:
    """x * cos + partner * (-sin or sin), lane by lane: ops.rope's x1 * cos - x2 * sin and x2 * cos + x1 * sin, the
    same products and sums (a - b is a + -b, and -b's product is -(x2 * sin) exactly)."""
    return x * cos + partner * jnp.where(minus, -sin, sin)


def _split_kernel(pos_ref, layer_ref, table_ref, q_ref, k_ref, v_ref, *refs, d, dp, bs, page_size, tiles_per_split,
                  n_tiles, n_pages, pages, scale, window, writes, rope=None):  # fmt: skip
    """Program (b, kh, split): the online softmax of row b's G query heads of kv head kh over the visible tiles of
    its split, in logical order, the heads as one [MAX_GROUP, dp] block (rows past G are zeros, never read by the
    fold): a tile's scores and weighted values are matrix products on the tensor cores (`_exact_dot`). A row's
    bits do not depend on the others: the block holds one batch row's heads only. A split holding no visible key
    writes nothing (the fold never reads it). Why a block: the G heads unrolled, each a vector product with
    cross-lane reductions a tile, took 18.6 ms of a 49.9 ms gpt-oss-20b step at 512 rows and 256 keys (tenth
    session); this form 4.8x less (docs/PERFORMANCE.md, eleventh session).
    `writes`: refs holds the row's new key and value first (k_new, v_new [B, K, D] float32) and the pages' aliases
    last: the program whose split holds position p stores kv head kh's new key and value at p (none past the table
    or on the null page: nothing reads them there), and every tile holding p takes them from registers, rounded to
    the cache's dtype as the store rounds them: the bits of a write before the call.
    `rope` ("neox" or "norm", with `writes`): refs then holds each row's cos and sin [B, D / 2] after the new key
    and value, and the kernel rotates q and the new key itself (`_rotated`), where XLA took two launches a layer."""
    cos_ref = sin_ref = None
    if writes and rope is not None:
        k_new_ref, v_new_ref, cos_ref, sin_ref, acc_ref, m_ref, l_ref, k_out_ref, v_out_ref = refs
    elif writes:
        k_new_ref, v_new_ref, acc_ref, m_ref, l_ref, k_out_ref, v_out_ref = refs
    else:
        acc_ref, m_ref, l_ref = refs
    b, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    p, layer = pos_ref[b], layer_ref[0]
    lo, hi = _visible_tiles(p, bs, window, n_tiles)
    first = split * tiles_per_split
    lo, hi = jnp.maximum(lo, first), jnp.minimum(hi, first + tiles_per_split)
    d_ok = jnp.arange(dp) < d if dp != d else None  # None: no lane mask, so the loads stay vectorized
    if rope is not None:  # this row's cos and sin on each lane of a head, and each lane's partner
        partner, freq, minus = _rotation(d, dp, rope == "neox")
        cos, sin = plgpu.load(cos_ref.at[b, freq]), plgpu.load(sin_ref.at[b, freq])
    if writes:
        new_k, new_v = (masked_load(ref.at[b, kh, pl.ds(0, dp)], d_ok) for ref in (k_new_ref, v_new_ref))
        if rope is not None:
            new_k = _rotated(new_k, masked_load(k_new_ref.at[b, kh, partner], d_ok), cos, sin, minus)
        new_k, new_v = new_k.astype(k_ref.dtype), new_v.astype(k_ref.dtype)
        own = (p >= 0) & (p // (bs * tiles_per_split) == split)
        page_at = jnp.minimum(jnp.maximum(p, 0) // page_size, n_pages - 1)
        page = table_ref[b, page_at]
        slot = jnp.maximum(p, 0) % page_size

        @pl.when(own & (p // page_size < n_pages) & (page != NULL_PAGE))
        def _():
            for ref, new in ((k_out_ref, new_k), (v_out_ref, new_v)):
                at = ref.at[layer, jnp.clip(page, 0, pages - 1), slot, kh, pl.ds(0, dp)]
                plgpu.store(at, new, mask=d_ok)

    def read(tile):
        """Logical tile `tile` (keys tile * bs ...) of row b's keys of kv head kh: k, v [bs, dp] in the cache's
        dtype and visible [bs]. Gathered key by key (its page from the table, its slot in the page), so a tile
        spans pages."""
        j = tile * bs + jnp.arange(bs)
        visible = j <= p
        if window is not None:
            visible &= p - j < window
        # An entry past the table or outside the pool must not read out of bounds (the null page 0 is always there).
        page = jnp.clip(table_ref[b, jnp.minimum(j // page_size, n_pages - 1)], 0, pages - 1)
        # Masked loads: the slots past p (stale data of this page's earlier owner, maybe not finite) are never
        # read, so no NaN can reach acc through a zero weight.
        mask = jax.lax.broadcast_in_dim(visible, (bs, dp), (0,))
        if d_ok is not None:
            mask &= jax.lax.broadcast_in_dim(d_ok, (bs, dp), (1,))
        # All indices as arrays broadcasting to [bs, dp] (a gather; interpret mode takes no slice beside them).
        index = (layer, page[:, None], (j % page_size)[:, None], kh, jnp.arange(dp)[None, :])
        k, v = plgpu.load(k_ref.at[index], mask=mask, other=0), plgpu.load(v_ref.at[index], mask=mask, other=0)
        if writes:  # position p's key and value from registers (its slot in memory is the old one)
            at_p = jax.lax.broadcast_in_dim(j == p, (bs, dp), (0,))
            k = jnp.where(at_p, jax.lax.broadcast_in_dim(new_k, (bs, dp), (1,)), k)
            v = jnp.where(at_p, jax.lax.broadcast_in_dim(new_v, (bs, dp), (1,)), v)
        return k, v, visible

    @pl.when(lo < hi)
    def _():
        # q [B, K, G, D] unpadded: rows past G and lanes past D load as zeros (an XLA pad before the call was a
        # launch a layer)
        q_ok = jax.lax.broadcast_in_dim(jnp.arange(MAX_GROUP) < q_ref.shape[2], (MAX_GROUP, dp), (0,))
        if d_ok is not None:
            q_ok &= jax.lax.broadcast_in_dim(d_ok, (MAX_GROUP, dp), (1,))
        q = masked_load(q_ref.at[b, kh, pl.ds(0, MAX_GROUP), pl.ds(0, dp)], q_ok)
        if rope is not None:  # the heads' partner lanes, gathered
            pairs = masked_load(q_ref.at[b, kh, jnp.arange(MAX_GROUP)[:, None], partner[None, :]], q_ok)
            q = _rotated(q, pairs, cos[None, :], sin[None, :], minus[None, :])
        q = q * jnp.float32(scale)

        def step(tile, carry):
            m, l_, acc = carry  # [MAX_GROUP], [MAX_GROUP], [MAX_GROUP, dp]
            k, v, visible = read(tile)
            s = _exact_dot(q, k, (((1,), (1,)), ((), ())))  # [MAX_GROUP, bs]
            s = jnp.where(jax.lax.broadcast_in_dim(visible, (MAX_GROUP, bs), (1,)), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = jnp.exp(m - m_new)
            w = jnp.exp(s - jax.lax.expand_dims(m_new, (1,)))
            pv = _exact_dot(w, v, (((1,), (0,)), ((), ())))  # [MAX_GROUP, dp]
            return m_new, l_ * alpha + jnp.sum(w, axis=1), acc * jax.lax.expand_dims(alpha, (1,)) + pv

        init = (jnp.full((MAX_GROUP,), NEG, jnp.float32), jnp.zeros((MAX_GROUP,), jnp.float32),
                jnp.zeros((MAX_GROUP, dp), jnp.float32))  # fmt: skip
        m, l_, acc = jax.lax.fori_loop(lo, hi, step, init)
        acc_ref[b, kh, split, pl.ds(0, MAX_GROUP), pl.ds(0, dp)] = acc
        m_ref[b, kh, split, pl.ds(0, MAX_GROUP)] = m
        l_ref[b, kh, split, pl.ds(0, MAX_GROUP)] = l_


def _fold_kernel(pos_ref, *refs, g_n, d, dp, bs, tiles_per_split, n_tiles, window, has_sinks):
    """Program (b, kh): merge row b's splits that hold a visible key, in split order, and the sinks. Two passes
    (the max, then the rescaled sums) keep the loop-carried chain to one add per split."""
    if has_sinks:
        sink_ref, acc_ref, m_ref, l_ref, o_ref = refs
    else:
        acc_ref, m_ref, l_ref, o_ref = refs
    b, kh = pl.program_id(0), pl.program_id(1)
    p = pos_ref[b]
    lo, hi = _visible_tiles(p, bs, window, n_tiles)
    s_lo = lo // tiles_per_split
    s_hi = jnp.where(lo < hi, (hi - 1) // tiles_per_split + 1, s_lo)
    g_ok = jnp.arange(MAX_GROUP) < g_n
    top = jax.lax.fori_loop(
        s_lo, s_hi, lambda s, t: jnp.maximum(t, m_ref[b, kh, s, pl.ds(0, MAX_GROUP)]),
        jnp.full((MAX_GROUP,), NEG, jnp.float32),
    )  # fmt: skip
    if has_sinks:  # sinks [K, G] unpadded: the rows past G load as NEG
        sink = plgpu.load(sink_ref.at[kh, pl.ds(0, MAX_GROUP)], mask=g_ok, other=NEG)
        top = jnp.maximum(top, sink)
    tile_mask = jax.lax.broadcast_in_dim(g_ok, (MAX_GROUP, dp), (0,))
    if dp != d:
        tile_mask &= jax.lax.broadcast_in_dim(jnp.arange(dp) < d, (MAX_GROUP, dp), (1,))

    def add(s, carry):
        l_, acc = carry
        w = jnp.exp(m_ref[b, kh, s, pl.ds(0, MAX_GROUP)] - top)
        part = plgpu.load(acc_ref.at[b, kh, s, pl.ds(0, MAX_GROUP), pl.ds(0, dp)], mask=tile_mask, other=0)
        return l_ + l_ref[b, kh, s, pl.ds(0, MAX_GROUP)] * w, acc + part * jax.lax.expand_dims(w, (1,))

    zeros = (jnp.zeros((MAX_GROUP,), jnp.float32), jnp.zeros((MAX_GROUP, dp), jnp.float32))
    l_, acc = jax.lax.fori_loop(s_lo, s_hi, add, zeros)
    if has_sinks:
        l_ = l_ + jnp.exp(sink - top)
    out = acc / jax.lax.expand_dims(jnp.where(l_ > 0, l_, 1), (1,))  # a row that sees no key: 0, not 0/0
    plgpu.store(o_ref.at[b, kh, pl.ds(0, MAX_GROUP), pl.ds(0, dp)], out, mask=tile_mask)


def _check(q, k_pages, v_pages, page_table, positions) -> None:
    if k_pages.shape != v_pages.shape or k_pages.ndim != 5 or not fits(q.shape, k_pages.shape):
        raise ValueError(f"paged_decode_attention: unsupported shapes q {q.shape}, pages {k_pages.shape} / "
                         f"{v_pages.shape} (q [B, 1, H, D], pages [L, P, page_size >= 16 a power of two, K, D], "
                         f"H / K <= {MAX_GROUP}, D <= 256)")  # fmt: skip
    b = q.shape[0]
    if page_table.ndim != 2 or page_table.shape[0] != b or positions.size != b:
        raise ValueError(f"paged_decode_attention: page_table {page_table.shape} and positions {positions.shape} "
                         f"must be [B, n_pages] and [B] for B = {b}")  # fmt: skip


@kernel_entry("scale", "window", "interpret", "pages_per_split", "num_warps", "num_stages", "neox")
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    layer: int | jax.Array,
    scale: float,
    window: int | None = None,
    sinks: jax.Array | None = None,
    *,
    interpret: bool = False,
    pages_per_split: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    new_kv: tuple[jax.Array, jax.Array] | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    neox: bool = True,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of q [B, 1, H, D] (H = K * G) over layer `layer` of the paged cache k/v_pages [L, P, page_size,
    K, D] -> float32 [B, 1, H, D]. Row b's key j lives at page page_table[b, j // page_size], slot j % page_size;
    keys j <= positions[b] are visible (and positions[b] - j < window on sliding layers); `sinks` [H]: a logit
    per head joining the softmax denominator only. A row at a negative position (padding) gives zeros.
    `pages_per_split` overrides SPLIT_KEYS / page_size (tests, sweeps); a row's bits depend on it.
    `new_kv` (k, v [B, 1, K, D]): each row's key and value at its position, written into the pages by the kernel
    that reads them (kv_cache.write_layer's scatters were two XLA launches a layer): returns (out, k_pages,
    v_pages), the pages updated in place where the caller donates them.
    `rope` (cos, sin [B, D / 2]; with `new_kv`): q and the new key are given before their rotation, which the kernel
    does (ops.rope's products and sums, so the same values; its cos and sin, mscale included), in `neox` pairs or
    adjacent ones."""
    _check(q, k_pages, v_pages, page_table, positions)
    b, _, h, d = q.shape
    _, pages, page_size, kh, _ = k_pages.shape
    n_pages = page_table.shape[1]
    g_n, dp = h // kh, padded_dim(d)
    split_keys = (pages_per_split or max(1, SPLIT_KEYS // page_size)) * page_size
    bs = _tile_keys(split_keys, dp)
    tiles_per_split = split_keys // bs
    n_tiles = pl.cdiv(n_pages * page_size, bs)
    n_splits = pl.cdiv(n_tiles, tiles_per_split)
    pos = positions.reshape(b).astype(jnp.int32)
    table = page_table.astype(jnp.int32)
    qg = q.reshape(b, kh, g_n, d).astype(jnp.float32)  # the split kernel loads its [MAX_GROUP, dp] block masked
    params = TritonParams(num_warps=num_warps, num_stages=num_stages)
    split_kernel = functools.partial(
        _split_kernel, d=d, dp=dp, bs=bs, page_size=page_size,
        tiles_per_split=tiles_per_split, n_tiles=n_tiles, n_pages=n_pages, pages=pages, scale=float(scale),
        window=window, writes=new_kv is not None, rope=None if rope is None else ("neox" if neox else "norm"),
    )  # fmt: skip
    if rope is not None and (new_kv is None or 2 * rope[0].shape[-1] != d):
        raise ValueError("the kernel's rotation takes the new key and value (new_kv) and a whole head's rotary dims")
    out_shape = [
        jax.ShapeDtypeStruct((b, kh, n_splits, MAX_GROUP, dp), jnp.float32),
        jax.ShapeDtypeStruct((b, kh, n_splits, MAX_GROUP), jnp.float32),
        jax.ShapeDtypeStruct((b, kh, n_splits, MAX_GROUP), jnp.float32),
    ]
    args = [pos, jnp.asarray(layer, jnp.int32).reshape(1), table, qg, k_pages, v_pages]
    aliases = {}
    if new_kv is not None:
        args += [a.reshape(b, kh, d).astype(jnp.float32) for a in new_kv]
        if rope is not None:
            args += [a.reshape(b, d // 2).astype(jnp.float32) for a in rope]
        out_shape += [jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)] * 2
        aliases = {4: 3, 5: 4}  # the pages in, the pages out
    acc, m, l_, *pages_out = pl.pallas_call(
        split_kernel,
        out_shape=tuple(out_shape),
        grid=(b, kh, n_splits),
        compiler_params=params,
        input_output_aliases=aliases,
        interpret=interpret,
        name="paged_decode_attention",
    )(*args)
    has_sinks = sinks is not None
    sink_args = []
    if has_sinks:
        sink_args = [sinks.astype(jnp.float32).reshape(kh, g_n)]
    fold_kernel = functools.partial(
        _fold_kernel, g_n=g_n, d=d, dp=dp, bs=bs, tiles_per_split=tiles_per_split, n_tiles=n_tiles, window=window,
        has_sinks=has_sinks,
    )  # fmt: skip
    out = pl.pallas_call(
        fold_kernel,
        out_shape=jax.ShapeDtypeStruct((b, kh, g_n, d), jnp.float32),
        grid=(b, kh),
        compiler_params=TritonParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention_fold",
    )(pos, *sink_args, acc, m, l_)
    out = out.reshape(b, 1, h, d)
    return out if new_kv is None else (out, *pages_out)


def _halving_sum(x: jax.Array, axis: int) -> jax.Array:
    """The sum over `axis` as halving elementwise adds (zero-padded to a power of two): an order fixed by the axis
    length alone. Why: XLA:CPU's reduce sums the same row in another order when the other axes change size."""
    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pow2_at_least(n) - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def paged_decode_attention_twin(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    layer: int | jax.Array,
    scale: float,
    window: int | None = None,
    sinks: jax.Array | None = None,
    *,
    interpret: bool = False,
    **_tiles,
) -> jax.Array:
    """The jax.numpy twin of `paged_decode_attention` (the CPU path), batch invariant as well: an online softmax
    over the table's pages in logical order, one page column of all rows a step, with elementwise products and
    halving sums. Why not one masked softmax over the gathered cache: XLA:CPU's dots and reductions sum in an
    order that depends on the batch and on the table width (measured: no row kept its bits)."""
    del interpret
    _check(q, k_pages, v_pages, page_table, positions)
    b, _, h, d = q.shape
    _, _, page_size, kh, _ = k_pages.shape
    g_n = h // kh
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    layer = jnp.asarray(layer, jnp.int32)
    qg = q.reshape(b, kh, g_n, 1, d).astype(jnp.float32)
    p = positions.reshape(b, 1).astype(jnp.int32)

    table = jnp.asarray(page_table, jnp.int32)

    def page_step(i, carry):
        m, l_, acc = carry  # [B, K, G], [B, K, G], [B, K, G, D]
        pages = jax.lax.dynamic_index_in_dim(table, i, axis=1, keepdims=False)
        j = i * page_size + jnp.arange(page_size)
        visible = j <= p  # [B, page_size]
        if window is not None:
            visible &= p - j < window
        k = jnp.swapaxes(k_pages[layer, pages].astype(jnp.float32), 1, 2)[:, :, None]  # [B, K, 1, page_size, D]
        v = jnp.swapaxes(v_pages[layer, pages].astype(jnp.float32), 1, 2)[:, :, None]
        v = jnp.where(visible[:, None, None, :, None], v, 0)  # hidden slots may hold anything, NaN included
        s = jnp.where(visible[:, None, None], _halving_sum(qg * k, -1) * jnp.float32(scale), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        w = jnp.exp(s - m_new[..., None])  # [B, K, G, page_size]
        acc = acc * alpha[..., None] + _halving_sum(w[..., None] * v, -2)
        return m_new, l_ * alpha + _halving_sum(w, -1), acc

    init = (jnp.full((b, kh, g_n), NEG, jnp.float32), jnp.zeros((b, kh, g_n), jnp.float32),
            jnp.zeros((b, kh, g_n, d), jnp.float32))  # fmt: skip
    # Only the columns some row can see: past every row's position a page changes no row's bits (its keys are all
    # hidden: the running max stays, its scale is exp(0) = 1, its weights 0), so the walk stops there, where the
    # table's bucket is wider (16 pages at least: a short sequence's decode walked 16-32 pages for 1-5 live ones;
    # Gemma 3 270M on 2 cores, ~7 us a page a layer).
    live = jnp.minimum(table.shape[1], jnp.max(p) // page_size + 1)
    m, l_, acc = jax.lax.fori_loop(0, live, page_step, init)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(kh, g_n)
        top = jnp.maximum(m, sink)
        rescale = jnp.exp(m - top)
        l_, acc = l_ * rescale + jnp.exp(sink - top), acc * rescale[..., None]
    out = acc / jnp.where(l_ > 0, l_, 1)[..., None]  # a row that sees no key: 0
    return out.reshape(b, 1, h, d)
