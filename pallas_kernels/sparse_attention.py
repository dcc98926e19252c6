"""Block-sparse flash attention over per-token selected key blocks (InfLLM-V2 stage 2), Pallas GPU.

What it computes (SPEC.md §7): query token ``t``, head ``h = kv * G + g`` attends to the keys
``p <= t`` of the union of the blocks ``block_idx[b, kv, t]`` selects, with one online softmax; the
forward saves an fp32 **base-2** log-sum-exp (``lse = log2 sum_p 2^(s_p)`` of the base-2 scaled scores
``s = q.k * scale * log2(e)``) for the backward. A token with no visible key outputs 0 and has
``lse = -inf``.

Tiling. The G heads of a KV group share the selection, so they are the rows of a tile (padded to 16
rows, the tensor-core minimum). A one-token tile (16 rows) re-reads every selected 64-key block for
16 rows only, which makes it L2-bandwidth-bound (measured on the H200: ~10 TB/s of K/V reads,
~160 TFLOP/s). Neighbouring tokens share blocks (all init + local blocks, and as many top-k choices as
their selections have in common), so the work is split per *tile* of ``tile_tokens`` consecutive
tokens (``tile_tokens * 16`` rows):

1. **Tile phase**: the blocks that at least ``min_share`` tokens of the tile selected, each loaded
   once for all rows of the tile, with a per-row mask from a per-block token bitmask (a row only
   sees blocks its own token selected) and token-level causal masking.
2. **Token phase**: each token's remaining blocks on a one-token tile, resuming the online softmax
   from the tile phase's normalised output and LSE.

``min_share=1`` is the pure union (no token phase); ``tile_tokens=0`` is the plain per-token kernel.
Both phases give the exact per-token result. The block lists, bitmasks and counts are built in XLA
(``tiling.tile_lists``), outside the kernels, which only read scalars from them. The kernels are
Triton-lowered Pallas; on Hopper GPUs the forward's and dQ's tile phases and the backward's dK/dV
run warp-specialised Mosaic GPU kernels instead (``sparse_attention_mgpu``,
``sparse_attention_mgpu_bwd``; ``BlockSizes.mosaic``, ``mosaic_dq`` and ``mosaic_dkdv``, chosen by
``default_block_sizes``, which there takes the pure union for inputs of few key blocks per selected
block, ``UNION_KEY_BLOCKS_PER_SELECTED``).

Query slices. ``q`` (and ``block_idx``) may hold only the query positions ``[q_offset, q_offset + Tq)``
of the ``Tk`` keys (context parallelism); ``q_offset`` may be traced. The kernels take it as a
one-element int32 input and add it to the local token index wherever a token's position matters
(the causal mask, a token's own block, the mask-free split); the lists and grids stay local.

Memory. With both phases, the tile phase's fp32 output (``[B, Tq, Hkv, 16, D]``, 2 GiB at 128K
tokens, Hkv=2, D=128) only exists for one chunk of queries at a time (``BlockSizes.fwd_chunk_bytes``):
per chunk the tile phase writes a chunk-sized fp32 state and the token phase resumes from it and
writes its rows into the full-size output and LSE, which it takes as aliased inputs
(``input_output_aliases``), so the chunks chain through one buffer without copies.

The backward (``sparse_attention_bwd``) computes dQ with the same two phases and dK/dV by walking,
for each key block, the tokens that selected it (a CSR index built on device): no atomics,
deterministic.
"""

import dataclasses
import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import sparse_attention_mgpu
from pallas_kernels._compat import dot, pl, triton_params
from pallas_kernels.tiling import (
    DEFAULT_MASK_VALUE,
    EMPTY_BLOCK,
    GROUP_ROWS,
    LOG2E,
    BlockSizes,
    MosaicDkdv,
    MosaicTile,
    TileLists,
    canonical_blocks,
    round_up,
    tile_lists,
)

__all__ = [
    "MOSAIC_BLOCK_SIZES",
    "MOSAIC_UNION_BLOCK_SIZES",
    "UNION_KEY_BLOCKS_PER_SELECTED",
    "block_view",
    "default_block_sizes",
    "fwd_chunk_len",
    "gather_blocks",
    "prefers_union",
    "sparse_attention_pallas",
    "supported",
    "supported_mosaic",
]

_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_SUPPORTED_HEAD_DIMS = (64, 128)
_SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def supported(q_shape, k_shape, dtype, block_size: int) -> str | None:
    """Why the Pallas kernels cannot run these inputs, or ``None`` when they can.

    ``q_shape`` is ``[B, Tq, Hq, D]`` and ``k_shape`` ``[B, Tk, Hkv, D]`` with ``Tq <= Tk`` (a query slice).
    """
    _, t, hq, d = q_shape
    hkv = k_shape[2]
    if k_shape[1] < t:
        return f"{t} queries against {k_shape[1]} keys (a query slice needs at least as many keys)"
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        return f"dtype {dtype} (supported: bfloat16, float16, float32)"
    if d not in _SUPPORTED_HEAD_DIMS:
        return f"head dim {d} (supported: {_SUPPORTED_HEAD_DIMS})"
    if hq // hkv > GROUP_ROWS:
        return f"GQA group {hq // hkv} > {GROUP_ROWS}"
    if block_size not in _SUPPORTED_BLOCK_SIZES:
        return f"block_size {block_size} (supported: {_SUPPORTED_BLOCK_SIZES})"
    return None


def supported_mosaic(dtype, head_dim: int, block_size: int) -> str | None:
    """Why the Mosaic GPU kernels (forward tile phase, dK/dV) cannot run these inputs, or ``None``."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (the Mosaic kernels need bfloat16 or float16)"
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} (supported: {_SUPPORTED_HEAD_DIMS})"
    if block_size != 64:
        return f"block_size {block_size} (the Mosaic kernels need 64)"
    return None


def row_validity(kpos, t_row, tok_row, bits, col_ok):
    """``[rows, cols]`` mask: key visible to the row's token, and its block selected by that token.

    Args:
      kpos: ``[cols]`` key positions; t_row: ``[rows]`` key position of each row's token.
      tok_row: ``[rows]`` index of the row's token inside its tile.
      bits: token bitmask of the block (a scalar, or ``[cols]`` per column), or ``None`` when every
        token of the tile selected it.
      col_ok: ``[cols]`` columns that come from a valid list slot, or ``None`` when all do.
    """
    valid = kpos[None, :] <= t_row[:, None]
    if bits is not None:
        if jnp.ndim(bits) == 0:
            valid &= ((jnp.right_shift(bits, tok_row) & 1) == 1)[:, None]
        else:
            valid &= (jnp.right_shift(bits[None, :], tok_row[:, None]) & 1) == 1
    if col_ok is not None:
        valid &= col_ok[None, :]
    return valid


def gather_blocks(k_ref, v_ref, ids_ref, bits_ref, s, j, count, kv_blocks):
    """K and V of list slots ``j * kv_blocks ... j * kv_blocks + kv_blocks - 1`` of sub-tile ``s``.

    Args:
      k_ref, v_ref: ``[nb, block, D]`` (one batch row and KV head).
      ids_ref, bits_ref: ``[n_sub, L]`` block ids and token bitmasks (``bits_ref`` may be ``None``);
        L is a multiple of ``kv_blocks``.
      count: valid slots of the list.

    Returns:
      ``k, v [kv_blocks * block, D]``, key positions ``[kv_blocks * block]``, the bitmask (scalar or
      per column, or ``None``) and per-column slot validity (``None`` for a single slot: the loop
      only visits valid ones).
    """
    block = k_ref.shape[1]
    if kv_blocks == 1:
        blk = ids_ref[s, j]
        kpos = blk * block + lax.broadcasted_iota(jnp.int32, (block,), 0)
        return k_ref[blk], v_ref[blk], kpos, None if bits_ref is None else bits_ref[s, j], None
    slots = pl.ds(j * kv_blocks, kv_blocks)
    ok = j * kv_blocks + lax.broadcasted_iota(jnp.int32, (kv_blocks,), 0) < count
    # Clamp before addressing: slots past the count hold EMPTY_BLOCK.
    blk = jnp.where(ok, ids_ref[s, slots], 0)

    def per_column(x):
        return jnp.broadcast_to(x[:, None], (kv_blocks, block)).reshape(kv_blocks * block)

    kpos = (blk[:, None] * block + lax.broadcasted_iota(jnp.int32, (kv_blocks, block), 1)).reshape(-1)
    k = k_ref[blk].reshape(kv_blocks * block, -1)
    v = v_ref[blk].reshape(kv_blocks * block, -1)
    bits = None if bits_ref is None else per_column(bits_ref[s, slots])
    return k, v, kpos, bits, per_column(ok)


def dot_precision(dtype):
    """fp32 inputs get true fp32 dots (Triton would default to tf32); bf16/fp16 use the MMA path."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _fwd_kernel(
    off_ref, q_ref, k_ref, v_ref, ids_ref, cnt_ref, *refs, tile_tokens, n_sub, kv_blocks, has_bits, has_init
):
    """Online-softmax attention of ``n_sub`` tiles of ``tile_tokens`` tokens over their block lists.

    Refs: off ``[1]`` int32, key position of the launch's first token; q ``[n_sub * tq, Gp, D]``;
    k, v ``[nb, block, D]`` (all keys of one batch row and KV head, gathered per block); ids, bits
    ``[n_sub, L]``; cnt ``[n_sub, 2]`` (entries, leading entries without mask); optional initial
    state o0 ``[n_sub * tq, Gp, D]`` fp32 (normalised) and lse0 ``[n_sub * tq, Gp]``; optional
    output buffers aliased to o, lse (never read); outputs o, lse.
    """
    bits_ref = refs[0] if has_bits else None
    o0_ref, lse0_ref = refs[has_bits : has_bits + 2] if has_init else (None, None)
    o_ref, lse_ref = refs[-2:]
    gp, d = q_ref.shape[1], q_ref.shape[2]
    rows = tile_tokens * gp
    precision = dot_precision(q_ref.dtype)
    qk_scale = d**-0.5 * LOG2E
    tok_row = lax.broadcasted_iota(jnp.int32, (rows,), 0) // gp
    for s in range(n_sub):
        tokens = pl.ds(s * tile_tokens, tile_tokens)
        t_row = off_ref[0] + (pl.program_id(0) * n_sub + s) * tile_tokens + tok_row
        q = q_ref[tokens].reshape(rows, d)
        if has_init:
            # Resume from (o, lse): m = lse, l = 1, acc = o is the same softmax state.
            lse0 = lse0_ref[tokens].reshape(rows)
            seen = lse0 > -jnp.inf
            state = (
                o0_ref[tokens].reshape(rows, d),
                jnp.where(seen, lse0, DEFAULT_MASK_VALUE),
                jnp.where(seen, 1.0, 0.0),
            )
        else:
            state = (
                jnp.zeros((rows, d), jnp.float32),
                jnp.full((rows,), DEFAULT_MASK_VALUE, jnp.float32),
                jnp.zeros((rows,), jnp.float32),
            )

        count, free = cnt_ref[s, 0], cnt_ref[s, 1]

        def body(j, carry, masked, s=s, q=q, t_row=t_row, count=count):
            acc, m, l = carry
            k, v, kpos, bits, col_ok = gather_blocks(
                k_ref, v_ref, ids_ref, bits_ref if masked else None, s, j, count, kv_blocks
            )
            scores = dot(q, k, trans_b=True, precision=precision) * qk_scale  # [rows, kv_blocks * block]
            if masked:
                valid = row_validity(kpos, t_row, tok_row, bits, col_ok)
                scores = jnp.where(valid, scores, DEFAULT_MASK_VALUE)
            m_new = jnp.maximum(m, scores.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            # Rows with nothing visible yet have m_new = MASK and p = 1 on masked keys: harmless, the
            # first visible key gives alpha = 2^(MASK - m) = 0; the epilogue zeroes rows that never see one.
            p = jnp.exp2(scores - m_new[:, None])
            acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v, precision=precision)
            return acc, m_new, l * alpha + p.sum(axis=1)

        # Whole steps of blocks that need no mask first, then the rest with masks.
        n_free, n_steps = lax.div(free, kv_blocks), lax.div(count + kv_blocks - 1, kv_blocks)
        state = lax.fori_loop(0, n_free, functools.partial(body, masked=False), state)
        acc, m, l = lax.fori_loop(n_free, n_steps, functools.partial(body, masked=True), state)
        seen = m > 0.5 * DEFAULT_MASK_VALUE
        l = jnp.where(seen, l, 1.0)
        o_ref[tokens] = (
            jnp.where(seen[:, None], acc / l[:, None], 0.0).reshape(tile_tokens, gp, d).astype(o_ref.dtype)
        )
        lse_ref[tokens] = jnp.where(seen, m + jnp.log2(l), -jnp.inf).reshape(tile_tokens, gp)


def _fwd_call(
    off,
    q5,
    k,
    v,
    ids,
    cnt,
    bits,
    init,
    dest,
    *,
    start,
    length,
    tile_tokens,
    n_sub,
    kv_blocks,
    out_dtype,
    warps,
    stages,
    interpret,
):
    """Launches ``_fwd_kernel`` for local tokens ``[start, start + length)`` on a grid (programs along
    them, batch, KV head).

    Args:
      off: ``[1]`` int32, key position of local token ``start``.
      q5: ``[B, Tp, Hkv, Gp, D]`` (all local tokens); k, v: ``[B, nb, block, Hkv, D]`` (all keys).
      ids, bits: ``[B, Hkv, Tp / tile_tokens, L]`` int32 (bits may be ``None``).
      cnt: ``[B, Hkv, Tp / tile_tokens, 2]`` int32, valid and unmasked entries of each list.
      init: ``None`` or the state these tokens resume from, ``(o0 [B, length, Hkv, Gp, D] fp32
        (normalised), lse0 [B, length, Hkv, Gp])``.
      dest: ``None`` or full-size ``(o [B, Tp, Hkv, Gp, D], lse [B, Tp, Hkv, Gp])`` buffers that the
        tokens' rows are written into in place (aliased to the outputs; other rows keep their values),
        or their ``jax.ShapeDtypeStruct``s: full-size outputs are then allocated and only the tokens'
        rows written (the other rows are undefined until later launches write them).
      start, length: static, multiples of ``n_sub * tile_tokens``.

    Returns:
      ``(o, lse)``: ``dest`` with the rows written, or without ``dest`` new ``o [B, length, Hkv, Gp, D]``
      in ``out_dtype`` and ``lse [B, length, Hkv, Gp]`` fp32.
    """
    b, _, hkv, gp, d = q5.shape
    span = n_sub * tile_tokens
    first = start // span
    ids, bits = pad_lists(ids, bits, kv_blocks)

    def row_specs(shift):
        # (o-like, lse-like) specs of the launch's rows, at block index i + shift along the tokens.
        return (
            pl.BlockSpec((None, span, None, gp, d), lambda i, j, h: (j, i + shift, h, 0, 0)),
            pl.BlockSpec((None, span, None, gp), lambda i, j, h: (j, i + shift, h, 0)),
        )

    local_specs, global_specs = row_specs(0), row_specs(first)
    seq_spec = pl.BlockSpec((None, *k.shape[1:3], None, d), lambda i, j, h: (j, 0, 0, h, 0))
    list_spec = pl.BlockSpec((None, None, n_sub, ids.shape[-1]), lambda i, j, h: (j, h, i + first, 0))
    cnt_spec = pl.BlockSpec((None, None, n_sub, 2), lambda i, j, h: (j, h, i + first, 0))
    off_spec = pl.BlockSpec((1,), lambda i, j, h: (0,))
    in_specs = [off_spec, global_specs[0], seq_spec, seq_spec, list_spec, cnt_spec]
    args = [off, q5, k, v, ids, cnt]
    if bits is not None:
        in_specs.append(list_spec)
        args.append(bits)
    if init is not None:
        in_specs += local_specs
        args += list(init)
    if dest is None:
        out_specs = local_specs
        out_shape = [
            jax.ShapeDtypeStruct((b, length, hkv, gp, d), out_dtype),
            jax.ShapeDtypeStruct((b, length, hkv, gp), jnp.float32),
        ]
        aliases = {}
    else:
        out_specs = global_specs
        out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in dest]
        aliases = {}
        if isinstance(dest[0], jax.Array):
            in_specs += global_specs
            aliases = {len(args): 0, len(args) + 1: 1}
            args += list(dest)
    kernel = functools.partial(
        _fwd_kernel,
        tile_tokens=tile_tokens,
        n_sub=n_sub,
        kv_blocks=kv_blocks,
        has_bits=bits is not None,
        has_init=init is not None,
    )
    return pl.pallas_call(
        kernel,
        grid=(length // span, b, hkv),
        in_specs=in_specs,
        out_specs=list(out_specs),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=triton_params(warps, stages),
        interpret=interpret,
        name=f"sparse_attn_fwd_{'tile' if tile_tokens > 1 else 'token'}",
    )(*args)


def pad_lists(ids, bits, kv_blocks):
    """Pads list rows to a multiple of ``kv_blocks`` so that the last step's slots stay in bounds."""
    pad = -ids.shape[-1] % kv_blocks
    if pad:
        widths = ((0, 0),) * (ids.ndim - 1) + ((0, pad),)
        ids = jnp.pad(ids, widths, constant_values=EMPTY_BLOCK)
        bits = None if bits is None else jnp.pad(bits, widths)
    return ids, bits


def pad_keys(x: jax.Array, block_size: int) -> jax.Array:
    """``[B, Tk, Hkv, D]`` -> ``[B, Tkp, Hkv, D]``, zero-padded to a whole number of key blocks."""
    return jnp.pad(x, ((0, 0), (0, round_up(x.shape[1], block_size) - x.shape[1]), (0, 0), (0, 0)))


def block_view(x: jax.Array, block_size: int) -> jax.Array:
    """``[B, Tkp, Hkv, D]`` -> ``[B, Tkp / block, block, Hkv, D]`` (free), gathered per block."""
    b, tp, hkv, d = x.shape
    return x.reshape(b, tp // block_size, block_size, hkv, d)


def group_rows(x: jax.Array, hkv: int, padded: int) -> jax.Array:
    """``[B, T, Hq, D]`` -> ``[B, Tp, Hkv, 16, D]``: heads ``kv * G + g`` as rows, zero padding."""
    b, t, hq, d = x.shape
    x = x.reshape(b, t, hkv, hq // hkv, d)
    return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, GROUP_ROWS - hq // hkv), (0, 0)))


def ungroup_rows(x5: jax.Array, seq_len: int, hq: int) -> jax.Array:
    """Inverse of ``group_rows``."""
    b, _, hkv, _, d = x5.shape
    return x5[:, :seq_len, :, : hq // hkv].reshape(b, seq_len, hq, d)


def fwd_chunk_len(b: int, hkv: int, d: int, padded: int, config: BlockSizes) -> int:
    """Local tokens per chunk of the forward (``padded`` when there is no tile-to-token-phase state).

    As few equal chunks (multiples of ``config.align``) as keep the fp32 state ``o [B, C, Hkv, 16, D]``
    + ``lse [B, C, Hkv, 16]`` within ``config.fwd_chunk_bytes``.
    """
    if config.tile_tokens == 0 or not config.has_token_phase:
        return padded
    per_token = b * hkv * GROUP_ROWS * (d + 1) * 4
    most = max(config.align, config.fwd_chunk_bytes // per_token // config.align * config.align)
    n_chunks = -(-padded // most)
    return round_up(-(-padded // n_chunks), config.align)


def _forward(q, k, v, block_idx, q_offset, lists, block_size, config, interpret):
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    tp = round_up(tq, config.align)
    q5 = group_rows(q, hkv, tp)
    kp, vp = pad_keys(k, block_size), pad_keys(v, block_size)
    kb, vb = block_view(kp, block_size), block_view(vp, block_size)
    ids, _ = canonical_blocks(block_idx, padded_len=tp, block_size=block_size, q_offset=q_offset[0])
    if lists is None:
        lists = tile_lists(ids, config, block_size, q_offset[0], num_key_blocks=kb.shape[1])
    packed = None
    if any(x is not None for x in (config.mosaic, config.mosaic_dkdv, config.mosaic_dq)):
        reason = supported_mosaic(q.dtype, d, block_size)
        if reason is not None:
            raise NotImplementedError(f"the Mosaic GPU kernels do not support {reason}")
    if config.mosaic is not None:
        # The Mosaic kernel reads packed lists and unblocked K/V.
        packed = sparse_attention_mgpu.pack_tile_lists(lists.tile_ids, lists.tile_bits, lists.tile_cnt)
    chunk = fwd_chunk_len(b, hkv, d, tp, config)
    # Several chunks: the first one's last phase allocates the full-size output and LSE and writes its
    # rows; each later chunk writes its rows into them in place (aliased), so nothing zero-fills them.
    # One chunk: the last phase allocates the chunk-sized (= full) output itself.
    out = None
    if chunk < tp:
        out = (jax.ShapeDtypeStruct(q5.shape, q.dtype), jax.ShapeDtypeStruct(q5.shape[:4], jnp.float32))
    for start in range(0, tp, chunk):
        common = dict(
            start=start, length=min(chunk, tp - start), stages=config.num_stages, interpret=interpret
        )
        off = q_offset + start
        init = None
        if lists.tile_ids is not None:
            state_dtype = jnp.float32 if config.has_token_phase else q.dtype
            if packed is not None:
                # Without a token phase there is one chunk (``fwd_chunk_len``), so no ``out`` to fill.
                state = sparse_attention_mgpu.tile_phase_mgpu(
                    off,
                    q5,
                    kp,
                    vp,
                    packed,
                    lists.tile_cnt,
                    start=start,
                    length=common["length"],
                    out_dtype=state_dtype,
                    config=config.mosaic,
                    interpret=interpret,
                )
            else:
                state = _fwd_call(
                    off,
                    q5,
                    kb,
                    vb,
                    lists.tile_ids,
                    lists.tile_cnt,
                    lists.tile_bits,
                    None,
                    None if config.has_token_phase else out,
                    tile_tokens=config.tile_tokens,
                    n_sub=1,
                    kv_blocks=config.tile_kv_blocks,
                    warps=config.tile_warps,
                    out_dtype=state_dtype,
                    **common,
                )
            if config.has_token_phase:
                init = state
            else:
                out = state
        if config.has_token_phase:
            out = _fwd_call(
                off,
                q5,
                kb,
                vb,
                lists.token_ids,
                lists.token_cnt,
                None,
                init,
                out,
                tile_tokens=1,
                n_sub=config.token_batch,
                kv_blocks=config.token_kv_blocks,
                warps=config.token_warps,
                out_dtype=q.dtype,
                **(common | dict(stages=config.token_stages)),
            )
        if chunk < tp:
            # The next chunk reads q5 only after this one wrote its rows, so a scheduler that keeps
            # the barrier cannot hoist later chunks' tile phases (and their fp32 states) ahead of it.
            q5, out = lax.optimization_barrier((q5, out))
    o5, lse = out
    residuals = (q_offset, q5, k, v, o5, lse, ids, lists)
    return ungroup_rows(o5, tq, hq), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, block_idx, q_offset, lists, block_size, config, interpret):
    return _forward(q, k, v, block_idx, q_offset, lists, block_size, config, interpret)[0]


def _attention_fwd(q, k, v, block_idx, q_offset, lists, block_size, config, interpret):
    return _forward(q, k, v, block_idx, q_offset, lists, block_size, config, interpret)


def _attention_bwd(block_size, config, interpret, res, dout):
    # Imported here: the backward module imports this one for the shared tiling helpers.
    from pallas_kernels import sparse_attention_bwd

    dq, dk, dv = sparse_attention_bwd.backward(
        res, dout, block_size=block_size, config=config, interpret=interpret
    )
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.jit, static_argnames=("block_size", "config", "interpret"))
def _attention_jit(q, k, v, block_idx, q_offset, lists, *, block_size, config, interpret):
    q_offset = jnp.asarray(q_offset, jnp.int32).reshape(1)
    block_idx, lists = lax.stop_gradient((block_idx, lists))
    return _attention(q, k, v, block_idx, q_offset, lists, block_size, config, interpret)


# The tiling on Hopper GPUs: 8-token tiles whose forward and dQ tile phases run Mosaic GPU kernels
# (the forward with 128-key steps, the ping-pong schedule and row masks for every block before the
# warpgroup's tokens; without a separate unmasked path its tile kernel ran 1.7 ms faster at 128K),
# and the Mosaic GPU dK/dV kernel; the token phases stay Triton
# (experiments/results/bench_attention_sweep_h200_rows.json and bench_attention_h200_session6.json compare
# the variants). Forward chunks of up to 1 GiB of fp32 state: 3 chunks at 128K instead of 9, 1 at 16K
# instead of 2 (fewer launches and tails), for ~0.5 GiB more peak memory at 128K. The forward tile
# kernel runs persistent (one CTA per SM; 27.46 vs 27.77 ms at 128K, 3.60 vs 3.72 ms for the 16K prefill,
# bench_selection_h200_persistent.json). The Triton token phase pipelines two stages deep, not three
# (5.44 vs 6.18 ms at 128K, 0.29 vs 0.37 ms at 16K, bench_selection_h200_token_stages.json). The tile
# lists are grouped by the halves of the tile that chose each block (half_order): prefill at 128K
# 76.71 vs 77.64 ms on random q/k, 49.28 vs 49.33 on smooth ones; 16K 4.12 vs 4.25 and 3.20 vs 3.24
# (bench_selection_h200_half_order.json; two more runs in the session-24 notes agree on random q/k).
MOSAIC_BLOCK_SIZES = BlockSizes(
    tile_tokens=8,
    min_share=2,
    half_order=True,
    tile_warps=8,
    token_stages=2,
    fwd_chunk_bytes=1 << 30,
    mosaic=MosaicTile(blocks_per_step=2, pingpong=True, unmasked_path=False, persistent=True),
    mosaic_dkdv=MosaicDkdv(),
    mosaic_dq=MosaicTile(),
)


# For inputs of few key blocks per selected block the Hopper default puts every block in the tile
# phases (the pure union: no token phases, no fp32 state between the forward's phases). When a token
# chooses 96 of at most 256 blocks, an 8-token tile's union covers most of them anyway, and the token
# phase's per-token cost (~450 SM-ns, experiments/results/phase_blocks_h200.json) outweighs the rows
# the union wastes. In alternating blocks of prefill calls with the shipped 96 selected blocks
# (interleaved_prefill_h200_16k_min_share_1.json and interleaved_prefill_h200_8k_64k_min_share_1.json)
# the union took 1.30 vs 1.43 ms (smooth q/k) and 1.35 vs 1.43 ms (random) at 8K, 3.45 vs 3.62 and
# 4.43 vs 4.59 ms at 16K (256 blocks), but 13.80 vs 12.84 ms on random q/k at 32K and 37.31 vs 31.82
# at 64K; forward + backward at 16K 16.14 vs 16.74 ms (correlated selection) and 18.43 vs 18.47
# (random, bench_attention_h200_16k_union.json). The bound is kept as a ratio, so that smaller
# selections (whose tiles share less) switch to the union at proportionally fewer blocks; only 96
# selected blocks were measured.
UNION_KEY_BLOCKS_PER_SELECTED = fractions.Fraction(256, 96)
MOSAIC_UNION_BLOCK_SIZES = dataclasses.replace(MOSAIC_BLOCK_SIZES, min_share=1)


def default_block_sizes(
    dtype,
    head_dim: int,
    block_size: int,
    interpret: bool,
    num_keys: int | None = None,
    num_selected: int | None = None,
) -> BlockSizes:
    """The tiling ``sparse_attention_pallas`` uses when none is given.

    ``MOSAIC_BLOCK_SIZES`` when compiling for a Hopper GPU (compute capability 9.x: the kernel uses
    WGMMA and TMA) with inputs the Mosaic tile phase supports (bf16/fp16, head dim 64/128, 64-key
    blocks), or there ``MOSAIC_UNION_BLOCK_SIZES`` when ``num_keys`` (the key length) spans at most
    ``UNION_KEY_BLOCKS_PER_SELECTED * num_selected`` blocks (256 for the shipped 96 selected blocks,
    i.e. 16K tokens); else ``BlockSizes()`` (Triton kernels only, and the interpret-mode default).
    """
    if interpret or jax.default_backend() != "gpu":
        return BlockSizes()
    major = str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0]
    if major == "9" and supported_mosaic(dtype, head_dim, block_size) is None:
        if (
            num_keys is not None
            and num_selected is not None
            and prefers_union(num_keys, num_selected, block_size)
        ):
            return MOSAIC_UNION_BLOCK_SIZES
        return MOSAIC_BLOCK_SIZES
    return BlockSizes()


def prefers_union(num_keys: int, num_selected: int, block_size: int) -> bool:
    """Whether the Hopper default takes the pure union for ``num_keys`` keys in ``block_size`` blocks of
    which each token selects ``num_selected``: at most ``UNION_KEY_BLOCKS_PER_SELECTED`` key blocks per
    selected block."""
    return -(-num_keys // block_size) <= UNION_KEY_BLOCKS_PER_SELECTED * num_selected


def sparse_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    q_offset: int | jax.Array = 0,
    config: BlockSizes | None = None,
    lists: TileLists | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Block-sparse causal attention over each token's selected blocks (Pallas GPU kernels).

    Args:
      q: ``[B, Tq, Hq, D]``; head ``h = kv * G + g`` uses the selection of KV head ``kv``. Query ``i``
        sits at key position ``q_offset + i``.
      k, v: ``[B, Tk, Hkv, D]``, ``Tk >= q_offset + Tq``.
      block_idx: int ``[B, Hkv, Tq, K]`` selected block ids per query, ascending, ``-1`` padded
        (non-differentiable).
      block_size: tokens per key block.
      q_offset: key position of ``q[:, 0]`` (a Python int, or an int32 scalar that may be traced,
        e.g. the shard's start under context parallelism; ``Tk >= q_offset + Tq`` is then the
        caller's contract).
      config: tiling (default: ``default_block_sizes``).
      lists: the tile and token lists of ``block_idx`` for ``config``, when the caller built them
        already (``selection.select_blocks(..., lists_for=)``); default: built here by
        ``tiling.tile_lists``. They must be the lists of this ``block_idx``: the kernels trust them.
      interpret: run the kernels in Pallas interpret mode (CPU tests).

    Returns:
      ``[B, Tq, Hq, D]`` in ``q.dtype``; differentiable w.r.t. q, k, v.

    Raises:
      NotImplementedError: for dtypes, head dims, group sizes or block sizes the kernels do not
        support (``supported`` says which).
      ValueError: for a ``block_idx`` of the wrong shape or a static ``q_offset`` outside
        ``[0, Tk - Tq]``.
    """
    reason = supported(q.shape, k.shape, q.dtype, block_size)
    if reason is not None:
        raise NotImplementedError(f"Pallas sparse attention does not support {reason}")
    b, tq, _, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if block_idx.ndim != 4 or tuple(block_idx.shape[:3]) != (b, hkv, tq):
        raise ValueError(f"block_idx must have shape [{b}, {hkv}, {tq}, K], got {block_idx.shape}")
    if isinstance(q_offset, int | np.integer) and not 0 <= q_offset <= tk - tq:
        raise ValueError(f"q_offset={q_offset} puts {tq} queries outside the {tk} keys")
    if config is None:
        config = default_block_sizes(
            q.dtype, q.shape[-1], block_size, interpret, num_keys=tk, num_selected=block_idx.shape[-1]
        )
    if lists is not None:
        _check_lists(lists, b, hkv, round_up(tq, config.align), block_idx.shape[-1], config)
    return _attention_jit(
        q, k, v, block_idx, q_offset, lists, block_size=block_size, config=config, interpret=interpret
    )


def _check_lists(lists: TileLists, b: int, hkv: int, tp: int, k: int, config: BlockSizes) -> None:
    """Raises ``ValueError`` unless ``lists`` have the shapes ``tile_lists`` gives for this tiling."""
    tq = config.tile_tokens
    want = TileLists(
        *(((b, hkv, tp // tq, n) for n in (tq * k, tq * k, 2)) if tq else (None,) * 3),
        *(((b, hkv, tp, n) for n in (k, 2)) if config.has_token_phase else (None,) * 2),
    )
    got = TileLists(*(None if x is None else tuple(x.shape) for x in lists))
    if got != want:
        raise ValueError(f"lists do not fit the tiling {config}: shapes {got}, expected {want}")
