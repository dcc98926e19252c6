"""The block-sparse backward's dK/dV and dQ tile phase as warp-specialised Mosaic GPU kernels.

**dQ tile phase** (``dq_tile_mgpu``): the forward tile kernel's structure (``sparse_attention_mgpu``:
8-token tiles, two compute warpgroups of 4 tokens x 16 heads, one memory warpgroup streaming the tile's
listed K/V blocks into a shared ring, the same skip, unmasked and row-mask paths) with ``S = Q K^T``,
``dP = dO V^T``, ``dS = P (dP - delta)``, ``dQ += dS K``; the token phase (Triton) adds each token's
remaining blocks onto its fp32 result.

**dK/dV** (``dkdv_mgpu``): same contract as the Triton ``sparse_attention_bwd._dkdv_kernel``: one CTA
per (key block, batch row, KV head) walks the CSR list of local query tokens that selected the block
(``build_csr``) and writes the block's dK and dV once: no atomics, deterministic. Written the way
FlashAttention-3's backward is:

- Keys are the WGMMA rows. With ``S^T = K Q^T`` (64 keys x 4 tokens * 16 heads) a step needs four
  matmuls: ``S^T``, ``dP^T = V dO^T`` and the accumulations ``dV += P^T dO``, ``dK += dS^T Q`` whose
  left operands ``P^T`` and ``dS^T`` stay in registers.
- Two *compute* warpgroups take the list's 4-token steps alternately (even / odd), each with its
  own fp32 dK/dV accumulators; at the end warpgroup 1 hands its sums to warpgroup 0 through SMEM,
  which adds them in a fixed order (deterministic) and stores the block.
- One *memory* warpgroup loads the block's K and V once, streams the token list through SMEM in
  chunks of 128 ids and TMA-copies every step's 4 tokens' Q and dO rows (16 heads each) and the
  step's LSE and ``delta`` into a per-warpgroup ring of slots.
- A TMA destination in SMEM must be 128-byte aligned, and one token's 16 LSE values are 64 bytes, so
  the kernel cannot gather them per token. ``step_lists`` (XLA) instead lays every block's list out
  from a 32-entry boundary, padded with the list's last token, and gathers LSE and ``delta`` per
  4-entry step (``[2, 64]`` fp32, one copy per step).
- Only the first steps (tokens inside the key block, which see part of it) and the last step of a
  list (fewer than 4 tokens) are masked; the padding rows of a short last step are dropped there.

Only bf16/fp16 inputs, head dims 64/128 and 64-key blocks (``sparse_attention.supported_mosaic``).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import SWIZZLED_128B, pl, plgpu
from pallas_kernels.sparse_attention_mgpu import (
    TILE_TOKENS,
    list_entry,
    rows_selecting,
    run_first,
    stream_blocks,
)
from pallas_kernels.tiling import GROUP_ROWS, LOG2E, MosaicDkdv, MosaicTile, round_up

__all__ = ["LIST_CHUNK", "dkdv_mgpu", "dq_tile_mgpu", "step_lists"]

_STEP_TOKENS = 4
_ROWS = _STEP_TOKENS * GROUP_ROWS
_COMPUTE_WGS = 2
_BLOCK = 64
# Token ids per SMEM chunk of the list (one TMA each); ``tokens`` must extend this far past its end.
LIST_CHUNK = 128
_STEPS_PER_CHUNK = LIST_CHUNK // _STEP_TOKENS
# Lists start at multiples of this many entries (whole steps, 128-byte aligned chunks).
_LIST_ALIGN = 32
# TMA copies per ring slot: Q and dO of each of the step's tokens, and the step's LSE and delta.
_COPIES_PER_STEP = 2 * _STEP_TOKENS + 1


def step_lists(
    tokens: jax.Array, spans: jax.Array, order: jax.Array, lse: jax.Array, delta: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Realigns ``build_csr`` lists for ``dkdv_mgpu`` and gathers LSE and ``delta`` per step.

    Args:
      tokens, spans, order: ``build_csr`` output (``[B, Hkv, N]``, ``[B, Hkv, nb, 3]``, ``[B, Hkv, nb]``).
      lse, delta: ``[B, Tp, Hkv, 16]`` fp32.

    Returns:
      ``lists [B, Hkv, M + LIST_CHUNK]`` int32: block ``j``'s tokens from a multiple of 32, padded to
      one with its last token (``M = N + 32 * nb`` rounded up); ``stats [B, Hkv, M / 4, 2, 64]`` fp32:
      LSE and ``delta`` of the 4 tokens x 16 heads of every step; ``info [B, Hkv, nb, 4]`` int32 per
      launch rank (``order``): list start and end in ``lists``, leading tokens that see only part of
      the block, block id.
    """
    b, h, nb, _ = spans.shape
    lo, hi, n_partial = spans[..., 0], spans[..., 1], spans[..., 2]
    length = hi - lo
    padded = (length + _LIST_ALIGN - 1) // _LIST_ALIGN * _LIST_ALIGN
    start = jnp.cumsum(padded, axis=-1) - padded
    total = round_up(tokens.shape[-1] + _LIST_ALIGN * nb, _LIST_ALIGN)
    pos = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (b, h, total))
    # The block each aligned position belongs to (empty blocks share their start with the next one).
    find = jax.vmap(jax.vmap(lambda s, p: jnp.searchsorted(s, p, side="right") - 1))
    owner = find(start, pos).astype(jnp.int32)
    offset = pos - jnp.take_along_axis(start, owner, axis=-1)
    last = jnp.maximum(jnp.take_along_axis(length, owner, axis=-1) - 1, 0)
    src = jnp.take_along_axis(lo, owner, axis=-1) + jnp.minimum(offset, last)
    lists = jnp.take_along_axis(tokens, jnp.minimum(src, tokens.shape[-1] - 1), axis=-1)

    def per_step(x):
        rows = jnp.take_along_axis(x.transpose(0, 2, 1, 3), lists[..., None], axis=2)  # [B, Hkv, M, 16]
        return rows.reshape(b, h, total // _STEP_TOKENS, _ROWS)

    stats = jnp.stack([per_step(lse), per_step(delta)], axis=3)
    lists = jnp.pad(lists, ((0, 0), (0, 0), (0, LIST_CHUNK)))
    info = jnp.stack([start, start + length, n_partial, jnp.broadcast_to(jnp.arange(nb), start.shape)], -1)
    info = jnp.take_along_axis(info, order[..., None], axis=2).astype(jnp.int32)
    return lists, stats, info


def _mma_operand(x, staging):
    """``x`` as the left operand of a wgmma: in registers compiled; through the SMEM ``staging`` ref
    in the Mosaic GPU interpreter, which only takes SMEM operands."""
    if staging is None:
        return x
    staging[...] = x
    plgpu.commit_smem()
    return staging


def _mma_accumulate(*terms, interpret):
    """``acc + a @ b`` for each ``(acc, a, b)`` on the tensor cores, all issued before one wait."""
    if not interpret:

        def issue(acc_refs):
            for acc_ref, (_, a, b_op) in zip(acc_refs, terms, strict=True):
                plgpu.wgmma(acc_ref, a, b_op)

        out = pl.run_state(issue)(tuple(plgpu.ACC.init(acc) for acc, _, _ in terms))
        return out if len(terms) > 1 else out[0]

    # The interpreter does not run ``run_state`` on accumulators: a fresh one per term, added on
    # (the same sums; only the compiled path keeps them in the accumulator registers).
    def product(a, b_op, shape):
        def mma(acc_ref):
            plgpu.wgmma(acc_ref, a, b_op)
            return acc_ref[...]

        return pl.run_scoped(mma, plgpu.ACC(shape, jnp.float32))

    out = tuple(acc + product(a, b_op, acc.shape) for acc, a, b_op in terms)
    return out if len(terms) > 1 else out[0]


def _dkdv_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    stats_ref,
    tok_ref,
    info_ref,
    dk_ref,
    dv_ref,
    *,
    scratch,
    config: MosaicDkdv,
):
    """One CTA: the key block of rank ``rank`` (``info``: list start, end, masked-token count, block
    id) for batch row ``b`` and KV head ``h`` (refs and shapes as in ``dkdv_mgpu``; ``op_smem`` exists
    only in interpret mode)."""
    (k_smem, v_smem, q_smem, do_smem, stats_smem, list_smem, red_smem, op_smem), barriers = scratch
    kv_bar, list_bar, row_bar, free_bar, red_full, red_empty = barriers
    h, b, rank = lax.axis_index("kv"), lax.axis_index("batch"), lax.axis_index("rank")
    wg = lax.axis_index("wg")
    stages = config.stages
    head_dim = k_smem.shape[-1]
    lo, hi = info_ref[b, h, rank, 0], info_ref[b, h, rank, 1]
    n_partial, blk = info_ref[b, h, rank, 2], info_ref[b, h, rank, 3]
    n_tokens = hi - lo
    n_steps = lax.div(n_tokens + _STEP_TOKENS - 1, _STEP_TOKENS)
    key0 = pl.multiple_of(blk * _BLOCK, _BLOCK)

    def wg_steps(w):
        # Warpgroup ``w`` takes global steps w, w + 2, w + 4, ...
        return lax.div(n_steps + _COMPUTE_WGS - 1 - w, _COMPUTE_WGS)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(config.compute_registers, action="increase")
        wgmma_layout = plgpu.Layout.WGMMA
        col_layout = wgmma_layout.reduce(0)
        key_row = plgpu.broadcasted_iota(jnp.int32, (_BLOCK, _ROWS), 0, layout=wgmma_layout)
        q_col = plgpu.broadcasted_iota(jnp.int32, (_BLOCK, _ROWS), 1, layout=wgmma_layout)
        col_token = q_col // GROUP_ROWS
        qk_scale = head_dim**-0.5 * LOG2E
        zeros_kd = plgpu.layout_cast(jnp.zeros((_BLOCK, head_dim), jnp.float32), wgmma_layout)
        zeros_kq = plgpu.layout_cast(jnp.zeros((_BLOCK, _ROWS), jnp.float32), wgmma_layout)
        plgpu.barrier_wait(kv_bar)

        operand = functools.partial(_mma_operand, staging=None if op_smem is None else op_smem.at[wg])
        accumulate = functools.partial(_mma_accumulate, interpret=op_smem is not None)

        def step(carry, jj, masked):
            dk, dv = carry
            slot = lax.rem(jj, stages)
            j = jj * _COMPUTE_WGS + wg  # global step
            my_q, my_do = q_smem.at[wg, slot], do_smem.at[wg, slot]
            plgpu.barrier_wait(row_bar.at[wg, slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, k_smem, my_q.T)
                return acc_ref[...]

            s_t = pl.run_scoped(scores, plgpu.ACC((_BLOCK, _ROWS), jnp.float32))
            lse = plgpu.load(stats_smem.at[wg, slot, 0], layout=col_layout)
            p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))
            if masked:
                # List position and key position of every column's token (read from the CSR list:
                # masked steps are few, so four scalar loads each are cheap).
                first = lo + j * _STEP_TOKENS
                t_col = jnp.zeros_like(col_token)
                for i in range(_STEP_TOKENS):
                    t_col = jnp.where(col_token == i, tok_ref[b, h, first + i], t_col)
                valid = (j * _STEP_TOKENS + col_token < n_tokens) & (key0 + key_row <= off_ref[0] + t_col)
                p_t = jnp.where(valid, p_t, 0.0)

            dv, dp_t = accumulate((dv, operand(p_t.astype(k_smem.dtype)), my_do), (zeros_kq, v_smem, my_do.T))
            delta = plgpu.load(stats_smem.at[wg, slot, 1], layout=col_layout)
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
            dk = accumulate((dk, operand(ds_t.astype(k_smem.dtype)), my_q))
            plgpu.barrier_arrive(free_bar.at[wg, slot])
            return dk, dv

        def body(jj, carry):
            j = jj * _COMPUTE_WGS + wg
            masked = (j * _STEP_TOKENS < n_partial) | ((j + 1) * _STEP_TOKENS > n_tokens)
            return lax.cond(
                masked,
                functools.partial(step, masked=True),
                functools.partial(step, masked=False),
                carry,
                jj,
            )

        dk, dv = lax.fori_loop(0, wg_steps(wg), body, (zeros_kd, zeros_kd))

        # Warpgroup 1's partial sums go to warpgroup 0 through one fp32 buffer, dV then dK.
        @pl.when(wg == 1)
        def _hand_over():
            red_smem[...] = dv
            plgpu.barrier_arrive(red_full)
            plgpu.barrier_wait(red_empty)
            red_smem[...] = dk
            plgpu.barrier_arrive(red_full)

        @pl.when(wg == 0)
        def _store():
            plgpu.barrier_wait(red_full)
            total_dv = dv + plgpu.load(red_smem, layout=wgmma_layout)
            plgpu.barrier_arrive(red_empty)
            plgpu.barrier_wait(red_full)
            total_dk = dk + plgpu.load(red_smem, layout=wgmma_layout)
            # Both warpgroups are past their last matmul, so K and V's SMEM can hold the results.
            k_smem[...] = (total_dk * head_dim**-0.5).astype(k_smem.dtype)
            v_smem[...] = total_dv.astype(v_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, pl.ds(key0, _BLOCK), h])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, pl.ds(key0, _BLOCK), h])
            plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(config.memory_registers, action="decrease")
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(key0, _BLOCK), h], k_smem, kv_bar)
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(key0, _BLOCK), h], v_smem, kv_bar)

        def load_chunk(c):
            plgpu.copy_gmem_to_smem(
                tok_ref.at[b, h, pl.ds(lo + c * LIST_CHUNK, LIST_CHUNK)],
                list_smem.at[lax.rem(c, 2)],
                list_bar.at[lax.rem(c, 2)],
            )

        @pl.when(n_steps > 0)
        def _():
            load_chunk(0)

        @pl.loop(0, n_steps)
        def _(j):
            chunk = lax.div(j, _STEPS_PER_CHUNK)

            @pl.when(lax.rem(j, _STEPS_PER_CHUNK) == 0)
            def _():
                plgpu.barrier_wait(list_bar.at[lax.rem(chunk, 2)])

                @pl.when((chunk + 1) * LIST_CHUNK < n_tokens)
                def _():
                    load_chunk(chunk + 1)

            w, jj = lax.rem(j, _COMPUTE_WGS), lax.div(j, _COMPUTE_WGS)
            slot = lax.rem(jj, stages)

            @pl.when(jj >= stages)
            def _():
                plgpu.barrier_wait(free_bar.at[w, slot])

            bar = row_bar.at[w, slot]
            for i in range(_STEP_TOKENS):
                # Past the list's end the padding repeats the last token (finite data; masked).
                tok = list_smem[lax.rem(chunk, 2), j * _STEP_TOKENS + i - chunk * LIST_CHUNK]
                rows = pl.ds(i * GROUP_ROWS, GROUP_ROWS)
                plgpu.copy_gmem_to_smem(q_ref.at[b, tok, h], q_smem.at[w, slot, rows], bar)
                plgpu.copy_gmem_to_smem(do_ref.at[b, tok, h], do_smem.at[w, slot, rows], bar)
            step = lax.div(lo, _STEP_TOKENS) + j
            plgpu.copy_gmem_to_smem(stats_ref.at[b, h, step], stats_smem.at[w, slot], bar)

        # Consume the last releases too, so that every barrier phase completes before the CTA exits.
        for w in range(_COMPUTE_WGS):

            @pl.loop(jnp.maximum(wg_steps(w) - stages, 0), wg_steps(w))
            def _(jj, w=w):
                plgpu.barrier_wait(free_bar.at[w, lax.rem(jj, stages)])


def dkdv_mgpu(
    off: jax.Array,
    q5: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do5: jax.Array,
    stats: jax.Array,
    lists: jax.Array,
    info: jax.Array,
    *,
    config: MosaicDkdv,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """dK and dV of every 64-key block from the local query tokens that selected it.

    Args:
      off: ``[1]`` int32, key position of local token 0.
      q5, do5: ``[B, Tp, Hkv, 16, D]`` bf16/fp16 (``group_rows``).
      k, v: ``[B, Tkp, Hkv, D]`` all keys, ``Tkp`` a multiple of 64.
      stats, lists, info: ``step_lists`` of the CSR lists, the forward's base-2 LSE and
        ``delta = sum(o * do)`` (``info`` covers all ``Tkp / 64`` blocks, longest list first).
      config: launch parameters.
      interpret: run in the Mosaic GPU interpreter (CPU tests).

    Returns:
      ``dk, dv [B, Tkp, Hkv, D]`` in ``k.dtype`` (dK includes the softmax scale).
    """
    b, _, hkv, gp, d = q5.shape
    nb = k.shape[1] // _BLOCK
    if gp != GROUP_ROWS or k.shape[1] % _BLOCK or info.shape != (b, hkv, nb, 4):
        raise ValueError(
            f"q5 {q5.shape} must be [B, Tp, Hkv, {GROUP_ROWS}, D], k {k.shape} whole {_BLOCK}-key blocks "
            f"and info {info.shape} [B, Hkv, blocks, 4]"
        )
    dtype = q5.dtype
    stages = config.stages
    ring = (_COMPUTE_WGS, stages)
    scratch = (
        (
            plgpu.SMEM((_BLOCK, d), dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((_BLOCK, d), dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((*ring, _ROWS, d), dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((*ring, _ROWS, d), dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((*ring, 2, _ROWS), jnp.float32),
            plgpu.SMEM((2, LIST_CHUNK), jnp.int32),
            plgpu.SMEM((_BLOCK, d), jnp.float32),
            plgpu.SMEM((_COMPUTE_WGS, _BLOCK, _ROWS), dtype, transforms=SWIZZLED_128B) if interpret else None,
        ),
        (
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_arrivals=_COPIES_PER_STEP, num_barriers=ring),
            plgpu.Barrier(num_barriers=ring),
            plgpu.Barrier(),
            plgpu.Barrier(),
        ),
    )

    # The profiler names the kernel after this function.
    def sparse_attn_dkdv_mgpu(*refs):
        pl.run_scoped(
            lambda *allocs: _dkdv_kernel(*refs, scratch=allocs, config=config), *scratch, collective_axes="wg"
        )

    out = jax.ShapeDtypeStruct(k.shape, k.dtype)
    return plgpu.kernel(
        sparse_attn_dkdv_mgpu,
        out_type=(out, out),
        grid=(hkv, b, nb),
        grid_names=("kv", "batch", "rank"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(off, q5, k, v, do5, stats, lists, info)


def _dq_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    list_ref,
    cnt_ref,
    dq_ref,
    *,
    scratch,
    config: MosaicTile,
):
    """One CTA: warpgroups 0 and 1 accumulate dQ of tokens ``4w .. 4w + 3`` of tile ``tile`` over its
    list, warpgroup 2 streams the listed K/V blocks (``stream_blocks``); refs as in ``dq_tile_mgpu``."""
    (q_smem, do_smem, k_smem, v_smem, list_smem, stats_smem, dq_smem, op_smem), barriers = scratch
    row_bar, k_bar, v_bar, list_bar, k_free, v_free = barriers
    tile, b, h = lax.axis_index("tile"), lax.axis_index("batch"), lax.axis_index("kv")
    wg = lax.axis_index("wg")
    head_dim = q_smem.shape[-1]
    count = cnt_ref[b, h, tile, 0]

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(config.compute_registers, action="increase")
        row0 = tile * TILE_TOKENS + wg * _STEP_TOKENS  # first local token of this warpgroup
        t0 = off_ref[0] + row0
        my_q, my_do, bar = q_smem.at[wg], do_smem.at[wg], row_bar.at[wg]
        for i in range(_STEP_TOKENS):
            rows = pl.ds(i * GROUP_ROWS, GROUP_ROWS)
            plgpu.copy_gmem_to_smem(q_ref.at[b, row0 + i, h], my_q.at[rows], bar)
            plgpu.copy_gmem_to_smem(do_ref.at[b, row0 + i, h], my_do.at[rows], bar)
        # The 4 tokens are consecutive, so their LSE / delta rows are one 256-byte copy each.
        stats = pl.ds(row0 * GROUP_ROWS, _ROWS)
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, stats], stats_smem.at[wg, 0], bar)
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, stats], stats_smem.at[wg, 1], bar)
        plgpu.barrier_wait(bar)
        plgpu.barrier_wait(list_bar)

        wgmma_layout = plgpu.Layout.WGMMA
        row_layout = wgmma_layout.reduce(1)
        lse = plgpu.load(stats_smem.at[wg, 0], layout=row_layout)
        delta = plgpu.load(stats_smem.at[wg, 1], layout=row_layout)
        row = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _BLOCK), 0, layout=wgmma_layout)
        col = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _BLOCK), 1, layout=wgmma_layout)
        tok_row = row // GROUP_ROWS
        bit_shift = tok_row + wg * _STEP_TOKENS
        qk_scale = head_dim**-0.5 * LOG2E
        operand = functools.partial(_mma_operand, staging=None if op_smem is None else op_smem.at[wg])
        accumulate = functools.partial(_mma_accumulate, interpret=op_smem is not None)

        def attend(dq, slot, blk, bits, mask):
            """One block; ``mask`` as in the forward's ``attend``: "none", "rows" or "scores"."""
            plgpu.barrier_wait(k_bar.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].T)
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((_ROWS, _BLOCK), jnp.float32))
            shift = lse
            if mask == "rows":
                # A row sees the whole block or none of it: an infinite shift makes its p exactly 0.
                shift = jnp.where(rows_selecting(bits, wg, row_layout), lse, jnp.inf)
            p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(shift, s.shape, [0]))
            if mask == "scores":
                # A select, not a masked score: rows without any visible key have lse = -inf.
                selected = (lax.shift_right_logical(bits, bit_shift) & 1) == 1
                p = jnp.where(selected & (col + blk * _BLOCK <= t0 + tok_row), p, 0.0)
            plgpu.barrier_wait(v_bar.at[slot])

            def grad_p(acc_ref):
                plgpu.wgmma(acc_ref, my_do, v_smem.at[slot].T)
                return acc_ref[...]

            dp = pl.run_scoped(grad_p, plgpu.ACC((_ROWS, _BLOCK), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            dq = accumulate((dq, operand(ds.astype(k_smem.dtype)), k_smem.at[slot]))
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        def pass_slot(dq, slot, blk, bits):
            # None of this warpgroup's tokens selected the block: release it without any math.
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        my_bits_mask = ((1 << _STEP_TOKENS) - 1) << (wg * _STEP_TOKENS)

        def step(j, dq):
            slot = lax.rem(j, config.stages)
            blk, bits = list_entry(list_smem, j)
            mine = bits & my_bits_mask
            before = blk * _BLOCK + _BLOCK - 1 <= t0  # every key is before all 4 tokens
            paths = [
                (pass_slot, config.skip_unselected and mine == 0),
                (
                    functools.partial(attend, mask="none"),
                    config.unmasked_path and before & (mine == my_bits_mask),
                ),
                (functools.partial(attend, mask="rows"), config.row_masks and before),
                (functools.partial(attend, mask="scores"), True),
            ]
            return run_first(paths, dq, slot, blk, bits)

        dq = plgpu.layout_cast(jnp.zeros((_ROWS, head_dim), jnp.float32), wgmma_layout)
        dq = lax.fori_loop(0, count, step, dq)
        dq_smem.at[wg][...] = (dq * head_dim**-0.5).astype(dq_smem.dtype)
        plgpu.commit_smem()
        for i in range(_STEP_TOKENS):
            rows = pl.ds(i * GROUP_ROWS, GROUP_ROWS)
            plgpu.copy_smem_to_gmem(dq_smem.at[wg, rows], dq_ref.at[b, row0 + i, h])
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == _COMPUTE_WGS)(
        functools.partial(
            stream_blocks,
            (k_ref, v_ref, list_ref),
            (list_smem, k_smem, v_smem),
            (list_bar, k_bar, v_bar, k_free, v_free),
            index=(b, h, tile),
            count=count,
            registers=config.memory_registers,
        )
    )


def dq_tile_mgpu(
    off: jax.Array,
    q5: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do5: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    packed_lists: jax.Array,
    tile_cnt: jax.Array,
    *,
    out_dtype,
    config: MosaicTile,
    interpret: bool = False,
) -> jax.Array:
    """dQ of every local query token over its 8-token tile's list (the tile phase of dQ).

    Args:
      off: ``[1]`` int32, key position of local token 0.
      q5, do5: ``[B, Tp, Hkv, 16, D]`` bf16/fp16 (``group_rows``), ``Tp`` a multiple of 8.
      k, v: ``[B, Tkp, Hkv, D]`` all keys, ``Tkp`` a multiple of 64.
      lse, delta: ``[B, Tp, Hkv, 16]`` fp32 (forward's base-2 LSE, ``sum(o * do)``).
      packed_lists, tile_cnt: ``sparse_attention_mgpu.pack_tile_lists`` of the 8-token tile lists
        and their counts.
      out_dtype: dtype of dQ (float32 when a token phase adds onto it).
      config: launch parameters.
      interpret: run in the Mosaic GPU interpreter (CPU tests).

    Returns:
      ``dq [B, Tp, Hkv, 16, D]`` in ``out_dtype`` (includes the softmax scale).
    """
    b, tp, hkv, gp, d = q5.shape
    if gp != GROUP_ROWS or tp % TILE_TOKENS or k.shape[1] % _BLOCK:
        raise ValueError(
            f"q5 {q5.shape} must be [B, Tp, Hkv, {GROUP_ROWS}, D] with Tp a multiple of {TILE_TOKENS}, "
            f"k {k.shape} whole {_BLOCK}-key blocks"
        )
    dtype = q5.dtype
    stages = config.stages
    scratch = (
        (
            plgpu.SMEM((_COMPUTE_WGS, _ROWS, d), dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((_COMPUTE_WGS, _ROWS, d), dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((stages, _BLOCK, d), dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((stages, _BLOCK, d), dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM(packed_lists.shape[-2:], jnp.int32),
            plgpu.SMEM((_COMPUTE_WGS, 2, _ROWS), jnp.float32),
            plgpu.SMEM((_COMPUTE_WGS, _ROWS, d), out_dtype),
            plgpu.SMEM((_COMPUTE_WGS, _ROWS, _BLOCK), dtype, transforms=SWIZZLED_128B) if interpret else None,
        ),
        (
            plgpu.Barrier(num_arrivals=2 * _STEP_TOKENS + 2, num_barriers=_COMPUTE_WGS),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
        ),
    )

    # The profiler names the kernel after this function.
    def sparse_attn_dq_tile_mgpu(*refs):
        pl.run_scoped(
            lambda *allocs: _dq_kernel(*refs, scratch=allocs, config=config), *scratch, collective_axes="wg"
        )

    # LSE and delta head-major, so that a warpgroup's 4 consecutive tokens are one contiguous row.
    def head_major(x):
        return x.transpose(0, 2, 1, 3).reshape(b, hkv, tp * gp)

    return plgpu.kernel(
        sparse_attn_dq_tile_mgpu,
        out_type=jax.ShapeDtypeStruct(q5.shape, out_dtype),
        grid=(tp // TILE_TOKENS, b, hkv),
        grid_names=("tile", "batch", "kv"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(off, q5, k, v, do5, head_major(lse), head_major(delta), packed_lists, tile_cnt)
