"""Backward of the block-sparse attention: dQ kernels and the CSR-walking dK/dV kernel.

With ``p = 2^(s - lse)`` (base-2 scores and LSE, see ``sparse_attention``), ``delta = sum(o * do)``:
``dp = do . v^T``, ``ds = p * (dp - delta)``, ``dq = scale * ds . k``, ``dk = scale * ds^T . q``,
``dv = p^T . do``.

- **dQ** uses the forward's tiling: a tile phase over the blocks shared within a tile of tokens,
  then a token phase over each token's remaining blocks that adds onto the tile phase's dQ.
- **dK/dV**: one program per (key block, batch row, KV head) loads the block's K and V once and
  walks the tokens that selected it, ``dkv_tokens`` at a time. The token lists form a CSR index
  built on device by sorting ``block * Tp + t``. With a query slice (``q_offset``) the programs
  cover every block of all ``Tk`` keys and the lists hold local query tokens; blocks no local token
  selected get zero gradients. The sum over the G heads of the group happens
  inside the dots (the group's rows are stacked), each program writes its block once: no atomics,
  deterministic. Blocks run longest list first so the init block (selected by every token) does
  not finish last. With ``BlockSizes.mosaic_dkdv`` the same walk runs as a warp-specialised Mosaic
  GPU kernel, and with ``mosaic_dq`` the dQ tile phase (``sparse_attention_mgpu_bwd``).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import dot, pl, triton_params
from pallas_kernels.sparse_attention import (
    block_view,
    dot_precision,
    gather_blocks,
    group_rows,
    pad_keys,
    pad_lists,
    row_validity,
    ungroup_rows,
)
from pallas_kernels.sparse_attention_mgpu import pack_tile_lists
from pallas_kernels.sparse_attention_mgpu_bwd import dkdv_mgpu, dq_tile_mgpu, step_lists
from pallas_kernels.tiling import EMPTY_BLOCK, LOG2E, BlockSizes

__all__ = ["backward", "build_csr"]


def _dq_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    ids_ref,
    cnt_ref,
    *refs,
    tile_tokens,
    n_sub,
    kv_blocks,
    has_bits,
    has_init,
):
    """dQ of ``n_sub`` tiles of ``tile_tokens`` tokens over their block lists (refs as ``_fwd_kernel``:
    off ``[1]`` key position of local token 0; do like q; lse, delta ``[n_sub * tq, Gp]``; optional
    fp32 dq0 to add onto; output dq)."""
    bits_ref = refs[0] if has_bits else None
    dq0_ref = refs[has_bits] if has_init else None
    dq_ref = refs[-1]
    gp, d = q_ref.shape[1], q_ref.shape[2]
    rows = tile_tokens * gp
    precision = dot_precision(q_ref.dtype)
    sm_scale = d**-0.5
    tok_row = lax.broadcasted_iota(jnp.int32, (rows,), 0) // gp
    for s in range(n_sub):
        tokens = pl.ds(s * tile_tokens, tile_tokens)
        t_row = off_ref[0] + (pl.program_id(0) * n_sub + s) * tile_tokens + tok_row
        q = q_ref[tokens].reshape(rows, d)
        do = do_ref[tokens].reshape(rows, d)
        lse = lse_ref[tokens].reshape(rows)
        delta = delta_ref[tokens].reshape(rows)

        count, free = cnt_ref[s, 0], cnt_ref[s, 1]

        def body(j, dq, masked, s=s, q=q, do=do, lse=lse, delta=delta, t_row=t_row, count=count):
            k, v, kpos, bits, col_ok = gather_blocks(
                k_ref, v_ref, ids_ref, bits_ref if masked else None, s, j, count, kv_blocks
            )
            scores = dot(q, k, trans_b=True, precision=precision) * (sm_scale * LOG2E)
            p = jnp.exp2(scores - lse[:, None])
            if masked:
                # A select (not a masked score): rows without any visible key have lse = -inf.
                p = jnp.where(row_validity(kpos, t_row, tok_row, bits, col_ok), p, 0.0)
            dp = dot(do, v, trans_b=True, precision=precision)
            ds = p * (dp - delta[:, None])
            return dq + dot(ds.astype(k.dtype), k, precision=precision)

        n_free, n_steps = lax.div(free, kv_blocks), lax.div(count + kv_blocks - 1, kv_blocks)
        dq = lax.fori_loop(
            0, n_free, functools.partial(body, masked=False), jnp.zeros((rows, d), jnp.float32)
        )
        dq = lax.fori_loop(n_free, n_steps, functools.partial(body, masked=True), dq) * sm_scale
        if has_init:
            dq += dq0_ref[tokens].reshape(rows, d)
        dq_ref[tokens] = dq.reshape(tile_tokens, gp, d).astype(dq_ref.dtype)


def _dq_call(
    off,
    q5,
    k,
    v,
    do5,
    lse,
    delta,
    ids,
    cnt,
    bits,
    dq0,
    *,
    tile_tokens,
    n_sub,
    kv_blocks,
    out_dtype,
    warps,
    stages,
    interpret,
):
    """Launches ``_dq_kernel``; shapes as ``sparse_attention._fwd_call``, returns dq like q5."""
    b, tp, hkv, gp, d = q5.shape
    span = n_sub * tile_tokens
    ids, bits = pad_lists(ids, bits, kv_blocks)
    row_spec = pl.BlockSpec((None, span, None, gp, d), lambda i, j, h: (j, i, h, 0, 0))
    lse_spec = pl.BlockSpec((None, span, None, gp), lambda i, j, h: (j, i, h, 0))
    seq_spec = pl.BlockSpec((None, *k.shape[1:3], None, d), lambda i, j, h: (j, 0, 0, h, 0))
    list_spec = pl.BlockSpec((None, None, n_sub, ids.shape[-1]), lambda i, j, h: (j, h, i, 0))
    cnt_spec = pl.BlockSpec((None, None, n_sub, 2), lambda i, j, h: (j, h, i, 0))
    off_spec = pl.BlockSpec((1,), lambda i, j, h: (0,))
    in_specs = [off_spec, row_spec, seq_spec, seq_spec, row_spec, lse_spec, lse_spec, list_spec, cnt_spec]
    args = [off, q5, k, v, do5, lse, delta, ids, cnt]
    if bits is not None:
        in_specs.append(list_spec)
        args.append(bits)
    if dq0 is not None:
        in_specs.append(row_spec)
        args.append(dq0)
    kernel = functools.partial(
        _dq_kernel,
        tile_tokens=tile_tokens,
        n_sub=n_sub,
        kv_blocks=kv_blocks,
        has_bits=bits is not None,
        has_init=dq0 is not None,
    )
    return pl.pallas_call(
        kernel,
        grid=(tp // span, b, hkv),
        in_specs=in_specs,
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(q5.shape, out_dtype),
        compiler_params=triton_params(warps, stages),
        interpret=interpret,
        name=f"sparse_attn_dq_{'tile' if tile_tokens > 1 else 'token'}",
    )(*args)


def build_csr(
    ids: jax.Array,
    *,
    block_size: int,
    pad: int,
    mask_split: bool,
    num_blocks: int | None = None,
    q_offset: int | jax.Array = 0,
    pair_sort: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inverted index: for each key block, the local query tokens that selected it (ascending).

    Args:
      ids: canonical ``[B, Hkv, Tp, K]`` block ids (``EMPTY_BLOCK`` in unused slots).
      block_size: tokens per key block.
      num_blocks: key blocks ``nb`` (all ``Tk`` keys; default ``Tp / block_size``, queries = keys).
      q_offset: key position of local token 0 (int32 scalar, may be traced).
      pad: entries appended to ``tokens`` so that a fixed-size read past the last list stays in bounds.
      mask_split: count the leading tokens that see only part of the block (the rest need no causal
        mask); otherwise report every token as needing it.
      pair_sort: sort (block, token) pairs instead of one int32 key ``block * Tp + t``; default:
        only when that key would overflow int32.

    Returns:
      ``tokens [B, Hkv, Tp * K + pad]`` int32 (entries past the valid ones are 0); ``spans [B, Hkv, nb, 3]``
      int32: block ``j``'s tokens are ``tokens[spans[j, 0]:spans[j, 1]]``, the first ``spans[j, 2]`` of
      them before the block's last key; ``order [B, Hkv, nb]``: block ids by decreasing list length,
      the order in which programs take them.
    """
    b, h, tp, k = ids.shape
    nb = tp // block_size if num_blocks is None else num_blocks
    t = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32)[:, None], ids.shape)
    real = ids < EMPTY_BLOCK
    if pair_sort is None:
        pair_sort = nb * tp >= jnp.iinfo(jnp.int32).max
    if not pair_sort:
        # One int32 key per (block, token) pair: a single-operand sort (radix sort on GPU).
        key = jnp.where(real, ids * tp + t, jnp.iinfo(jnp.int32).max).reshape(b, h, tp * k)
        key = jnp.sort(key, axis=-1)
        tokens = jnp.where(key < jnp.iinfo(jnp.int32).max, key % tp, 0)
        blocks = jnp.where(key < jnp.iinfo(jnp.int32).max, key // tp, nb)
    else:
        blocks, tokens = lax.sort(
            (jnp.where(real, ids, nb).reshape(b, h, tp * k), jnp.where(real, t, 0).reshape(b, h, tp * k)),
            dimension=2,
            num_keys=2,
        )
    bounds = jnp.arange(nb + 1, dtype=jnp.int32)
    ptr = jax.vmap(jax.vmap(lambda x: jnp.searchsorted(x, bounds, side="left")))(blocks).astype(jnp.int32)
    sees_part = (q_offset + tokens < blocks * block_size + block_size - 1) | (not mask_split)

    def count_partial(flags, seg):
        return jax.ops.segment_sum(flags, seg, num_segments=nb + 1, indices_are_sorted=True)[:nb]

    n_partial = jax.vmap(jax.vmap(count_partial))(sees_part.astype(jnp.int32), blocks)
    spans = jnp.stack([ptr[..., :-1], ptr[..., 1:], n_partial], axis=-1)
    order = jnp.argsort(ptr[..., :-1] - ptr[..., 1:], axis=-1, stable=True).astype(jnp.int32)
    tokens = jnp.pad(tokens, ((0, 0), (0, 0), (0, pad)))
    return tokens, spans, order


def _dkdv_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    tok_ref,
    spans_ref,
    order_ref,
    dk_ref,
    dv_ref,
    *,
    block_size,
    step_tokens,
):
    """dK, dV of one key block from the local query tokens that selected it.

    Refs: off ``[1]`` key position of local token 0; q, do ``[Tp, Gp, D]``; k, v, dk, dv ``[Tkp, D]``;
    lse, delta ``[Tp, Gp]``; tok ``[nnz + pad]``; spans ``[nb, 3]``; order ``[nb]``.
    """
    gp, d = q_ref.shape[1], q_ref.shape[2]
    rows = step_tokens * gp
    precision = dot_precision(q_ref.dtype)
    sm_scale = d**-0.5
    blk = order_ref[pl.program_id(2)]
    lo, hi, n_partial = spans_ref[blk, 0], spans_ref[blk, 1], spans_ref[blk, 2]
    start = pl.multiple_of(blk * block_size, block_size)
    k = k_ref[pl.ds(start, block_size), :]
    v = v_ref[pl.ds(start, block_size), :]
    kpos = start + lax.broadcasted_iota(jnp.int32, (block_size,), 0)

    def body(i, carry, masked):
        dk, dv = carry
        first = lo + i * step_tokens
        tok = tok_ref[pl.ds(first, step_tokens)]  # [step_tokens]
        if masked:
            ok = first + lax.broadcasted_iota(jnp.int32, (step_tokens,), 0) < hi
            tok = jnp.where(ok, tok, 0)
        q = q_ref[tok].reshape(rows, d)
        do = do_ref[tok].reshape(rows, d)
        lse = lse_ref[tok].reshape(rows)
        delta = delta_ref[tok].reshape(rows)
        scores = dot(q, k, trans_b=True, precision=precision) * (sm_scale * LOG2E)
        p = jnp.exp2(scores - lse[:, None])  # [rows, block]
        if masked:
            t_row = off_ref[0] + jnp.broadcast_to(tok[:, None], (step_tokens, gp)).reshape(rows)
            ok_row = jnp.broadcast_to(ok[:, None], (step_tokens, gp)).reshape(rows)
            p = jnp.where(ok_row[:, None] & (kpos[None, :] <= t_row[:, None]), p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
        dp = dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
        return dk, dv

    # Steps holding tokens that see part of the block (they come first) or past the list's end need
    # masks; the steps in between see every key of the block.
    n_steps = lax.div(hi - lo + step_tokens - 1, step_tokens)
    head = lax.div(n_partial + step_tokens - 1, step_tokens)
    tail = jnp.maximum(head, lax.div(hi - lo, step_tokens))
    zeros = jnp.zeros((block_size, d), jnp.float32)
    carry = lax.fori_loop(0, head, functools.partial(body, masked=True), (zeros, zeros))
    carry = lax.fori_loop(head, tail, functools.partial(body, masked=False), carry)
    dk, dv = lax.fori_loop(tail, n_steps, functools.partial(body, masked=True), carry)
    dk_ref[pl.ds(start, block_size), :] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[pl.ds(start, block_size), :] = dv.astype(dv_ref.dtype)


def _dkdv_call(
    off,
    q5,
    k,
    v,
    do5,
    lse,
    delta,
    tokens,
    spans,
    order,
    *,
    block_size,
    step_tokens,
    warps,
    stages,
    interpret,
):
    """Launches ``_dkdv_kernel`` on a grid (KV head, batch, block rank): the KV heads vary fastest, so
    the longest lists of every head start in the first wave. k, v: ``[B, Tkp, Hkv, D]`` (all keys,
    whole blocks); returns dk, dv like them."""
    b, tp, hkv, gp, d = q5.shape
    tkp = k.shape[1]
    nb = tkp // block_size
    row_spec = pl.BlockSpec((None, tp, None, gp, d), lambda h, j, i: (j, 0, h, 0, 0))
    lse_spec = pl.BlockSpec((None, tp, None, gp), lambda h, j, i: (j, 0, h, 0))
    seq_spec = pl.BlockSpec((None, tkp, None, d), lambda h, j, i: (j, 0, h, 0))
    tok_spec = pl.BlockSpec((None, None, tokens.shape[-1]), lambda h, j, i: (j, h, 0))
    spans_spec = pl.BlockSpec((None, None, nb, 3), lambda h, j, i: (j, h, 0, 0))
    order_spec = pl.BlockSpec((None, None, nb), lambda h, j, i: (j, h, 0))
    kernel = functools.partial(_dkdv_kernel, block_size=block_size, step_tokens=step_tokens)
    return pl.pallas_call(
        kernel,
        grid=(hkv, b, nb),
        in_specs=[
            pl.BlockSpec((1,), lambda h, j, i: (0,)),
            row_spec,
            seq_spec,
            seq_spec,
            row_spec,
            lse_spec,
            lse_spec,
            tok_spec,
            spans_spec,
            order_spec,
        ],
        out_specs=[seq_spec, seq_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=triton_params(warps, stages),
        interpret=interpret,
        name="sparse_attn_dkdv",
    )(off, q5, k, v, do5, lse, delta, tokens, spans, order)


def backward(residuals, dout, *, block_size: int, config: BlockSizes, interpret: bool):
    """Gradients of ``sparse_attention_pallas`` w.r.t. q, k, v.

    Args:
      residuals: ``(q_offset, q5, k, v, o5, lse, ids, lists)`` saved by the forward: ``q_offset``
        ``[1]`` int32; q5, o5, lse in padded, grouped layouts over the local queries; k, v
        ``[B, Tk, Hkv, D]`` as given; ``ids`` the canonical block ids.
      dout: ``[B, Tq, Hq, D]`` output cotangent.

    Returns:
      ``dq [B, Tq, Hq, D]``, ``dk, dv [B, Tk, Hkv, D]``.
    """
    off, q5, k, v, o5, lse, ids, lists = residuals
    _, t, hq, _ = dout.shape
    tp, hkv = q5.shape[1], q5.shape[2]
    do5 = group_rows(dout.astype(q5.dtype), hkv, tp)
    delta = jnp.sum(o5.astype(jnp.float32) * do5.astype(jnp.float32), axis=-1)  # [B, Tp, Hkv, Gp]
    kp, vp = pad_keys(k, block_size), pad_keys(v, block_size)
    kb, vb = block_view(kp, block_size), block_view(vp, block_size)
    common = dict(stages=config.num_stages, interpret=interpret)
    dq5 = None
    tile_dtype = jnp.float32 if config.has_token_phase else q5.dtype
    if lists.tile_ids is not None and config.mosaic_dq is not None:
        # Packed again from the residual lists: a cheap elementwise op, and the Triton dQ reads the
        # unpacked ones.
        packed = pack_tile_lists(lists.tile_ids, lists.tile_bits, lists.tile_cnt)
        dq5 = dq_tile_mgpu(
            off,
            q5,
            kp,
            vp,
            do5,
            lse,
            delta,
            packed,
            lists.tile_cnt,
            out_dtype=tile_dtype,
            config=config.mosaic_dq,
            interpret=interpret,
        )
    elif lists.tile_ids is not None:
        dq5 = _dq_call(
            off,
            q5,
            kb,
            vb,
            do5,
            lse,
            delta,
            lists.tile_ids,
            lists.tile_cnt,
            lists.tile_bits,
            None,
            tile_tokens=config.tile_tokens,
            n_sub=1,
            kv_blocks=config.tile_kv_blocks,
            warps=config.tile_warps,
            out_dtype=tile_dtype,
            **common,
        )
    if config.has_token_phase:
        dq5 = _dq_call(
            off,
            q5,
            kb,
            vb,
            do5,
            lse,
            delta,
            lists.token_ids,
            lists.token_cnt,
            None,
            dq5,
            tile_tokens=1,
            n_sub=config.token_batch,
            kv_blocks=config.token_kv_blocks,
            warps=config.token_warps,
            out_dtype=q5.dtype,
            **common,
        )
    mosaic_dkdv = config.mosaic_dkdv is not None
    tokens, spans, order = build_csr(
        ids,
        block_size=block_size,
        # The Mosaic kernel reads whole realigned steps (no read past the end) and masks only the
        # steps that need it, so it wants the partial-token counts.
        pad=0 if mosaic_dkdv else config.dkv_tokens,
        mask_split=mosaic_dkdv or config.mask_split,
        num_blocks=kp.shape[1] // block_size,
        q_offset=off[0],
    )
    if mosaic_dkdv:
        step_tokens, stats, info = step_lists(tokens, spans, order, lse, delta)
        dk, dv = dkdv_mgpu(
            off, q5, kp, vp, do5, stats, step_tokens, info, config=config.mosaic_dkdv, interpret=interpret
        )
    else:
        dk, dv = _dkdv_call(
            off,
            q5,
            kp,
            vp,
            do5,
            lse,
            delta,
            tokens,
            spans,
            order,
            block_size=block_size,
            step_tokens=config.dkv_tokens,
            warps=config.dkv_warps,
            # Pipelined fp32 tiles (tests only) overflow shared memory at D=128 (281 KB > 227 KB).
            stages=1 if q5.dtype == jnp.float32 else config.num_stages,
            interpret=interpret,
        )
    return ungroup_rows(dq5, t, hq), dk[:, : k.shape[1]], dv[:, : v.shape[1]]
