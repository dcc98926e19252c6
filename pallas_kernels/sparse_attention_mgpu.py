"""Tile phase of the block-sparse forward as a warp-specialised Mosaic GPU kernel (Hopper).

Same contract as the Triton tile phase in ``sparse_attention`` (per-tile block lists with per-block
token bitmasks, token-level causal masking, fp32 base-2 LSE), but written for the H100/H200 the way
FlashAttention-3 is: one CTA has two *compute* warpgroups and one *memory* warpgroup.

- The CTA owns a tile of 8 consecutive tokens and its list (the blocks that enough of those tokens
  selected, ``tile_lists(..., tile_tokens=8)``). Compute warpgroup ``w`` holds tokens ``4w .. 4w+3``:
  4 tokens x 16 heads = 64 rows, the WGMMA row count of one warpgroup.
- The memory warpgroup TMA-copies each listed 64-key block of K and V into a ring of SMEM slots; both
  compute warpgroups read the same slot (one K/V load serves 128 rows) and release it through a
  two-arrival barrier.
- A row only sees a block when its own token selected it (bit ``4w + row // 16`` of the block's
  mask) and only keys ``<= `` its token's position; the bitmask and id come from an SMEM copy of the
  CTA's packed list (``id * 256 + bits``), loaded once.
- A warpgroup skips the math of a block none of its 4 tokens selected (``skip_unselected``) and drops
  the mask for a block all 4 selected and see entirely (``unmasked_path``); it still takes part in the
  slot's barriers, so both warpgroups stay in step with the ring.
- Blocks wholly before the warpgroup's tokens but not selected by all of them (``row_masks``): a row
  then sees all 64 keys of an entry or none, so the mask acts on the row maxima and the exponentials'
  shifts (an unselected entry's shift is infinite), not on every score. Only the steps that hold
  one of the warpgroup's own blocks mask per score (causal).
- Optionally (``pingpong``) the two compute warpgroups alternate on the tensor cores through a
  shared barrier, so that one's softmax overlaps the other's matmuls (FlashAttention-3's schedule).
- Optionally (``blocks_per_step=2``) a step takes two consecutive list entries: a ring slot holds
  both blocks (128 keys, two TMA copies) and the step runs one 64x128 softmax round and 128-key
  WGMMAs, so the per-step costs (barrier waits, MMA waits, row reductions) cover twice the keys. An
  odd list's last step pairs its block with the list padding (block 0, no token bits: masked).
- The output staging buffer shares SMEM with the K ring (both warpgroups are done with the ring
  once they pass the epilogue barrier), which leaves room for two 128-key slots at head dim 128
  with an fp32 output.
- Optionally (``persistent``, the default tiling's choice) one CTA per SM runs a strided share of the
  tiles: the memory warpgroup prefetches the next tile's list and query rows into a second buffer
  and keeps the K/V ring streaming across tiles, so a CTA's start-up and epilogue overlap the
  neighbouring tiles' steps; the output is then staged through the warpgroup's own query buffer.

Only bf16/fp16 inputs, head dims 64/128, 64-key blocks (``sparse_attention.supported_mosaic`` says why not).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import SWIZZLED_128B, pl, plgpu
from pallas_kernels.mgpu_sync import (
    announced_item,
    queue_loop,
    take_queued_item,
    wait_last_queued_release,
    wait_last_releases,
)
from pallas_kernels.tiling import DEFAULT_MASK_VALUE, GROUP_ROWS, LOG2E, MosaicTile, persistent_ctas

__all__ = [
    "TILE_TOKENS",
    "list_entry",
    "pack_tile_lists",
    "rows_selecting",
    "run_first",
    "stream_blocks",
    "tile_phase_mgpu",
]

# Tokens per CTA: two compute warpgroups of 4 tokens x 16 rows each.
TILE_TOKENS = 8
_WG_TOKENS = 4
_ROWS = _WG_TOKENS * GROUP_ROWS
_COMPUTE_WGS = 2
_BLOCK = 64
# Packed list entries per SMEM row (TMA boxes are at most 256 elements wide).
_LIST_COLS = 128
_BITS_SHIFT = 8


def pack_tile_lists(tile_ids: jax.Array, tile_bits: jax.Array, tile_cnt: jax.Array) -> jax.Array:
    """Packs 8-token tile lists as ``id * 256 + bits`` in rows of 128 for one TMA copy per CTA.

    Args:
      tile_ids, tile_bits: ``[B, Hkv, n_tiles, L]`` int32 (``tile_lists`` with ``tile_tokens=8``).
      tile_cnt: ``[B, Hkv, n_tiles, 2]`` int32.

    Returns:
      ``[B, Hkv, n_tiles, ceil(L / 128), 128]`` int32; slots past the count hold block 0, no bits.
    """
    b, h, n, length = tile_ids.shape
    valid = jnp.arange(length, dtype=jnp.int32)[None, None, None, :] < tile_cnt[..., :1]
    packed = jnp.where(valid, tile_ids * (1 << _BITS_SHIFT) + tile_bits, 0)
    pad = -length % _LIST_COLS
    packed = jnp.pad(packed, ((0, 0), (0, 0), (0, 0), (0, pad)))
    return packed.reshape(b, h, n, (length + pad) // _LIST_COLS, _LIST_COLS)


def list_entry(list_smem, j):
    """Block id and token bitmask of entry ``j`` of a packed list in SMEM (``pack_tile_lists``)."""
    packed = list_smem[lax.div(j, _LIST_COLS), lax.rem(j, _LIST_COLS)]
    return lax.shift_right_logical(packed, _BITS_SHIFT), packed & ((1 << _BITS_SHIFT) - 1)


def rows_selecting(bits, wg, layout):
    """``[64]`` bool in ``layout``: row ``r`` of compute warpgroup ``wg`` (token ``4 wg + r // 16`` of
    the tile) selected the list entry whose token bitmask is ``bits``."""
    row_token = plgpu.broadcasted_iota(jnp.int32, (_ROWS,), 0, layout=layout) // GROUP_ROWS
    return (lax.shift_right_logical(bits, row_token + wg * _WG_TOKENS) & 1) == 1


def _steps(count, per_step: int):
    """Ring steps that cover ``count`` list entries, ``per_step`` entries per step."""
    return lax.div(count + per_step - 1, per_step)


def _attend_tile(smem, bars, my_q, list_smem, count, t0, base, *, wg, config: MosaicTile):
    """A compute warpgroup's online softmax over one tile's list (ring steps ``base ...`` of the CTA).

    Args:
      smem: ``(k_ring, v_ring, p_smem)`` (``p_smem`` only in interpret mode, else ``None``).
      bars: the ring's K and V arrival and release barriers and the ping-pong barrier.
      my_q: ``[64, D]`` SMEM, the warpgroup's query rows; list_smem: the tile's packed list.
      count: list entries; t0: key position of the warpgroup's first token.
      base: ring steps the CTA ran before this tile (slot ``(base + j) % stages`` holds step ``j``).

    Returns:
      ``(acc [64, D], m [64], l [64])`` fp32, the unnormalised state (WGMMA layouts).
    """
    k_smem, v_smem, p_smem = smem
    k_bar, v_bar, k_free, v_free, sched = bars
    stages = config.stages
    head_dim = my_q.shape[-1]
    keys = k_smem.shape[1]  # keys per step
    per_step = keys // _BLOCK  # list entries per step

    def sync_point():
        if config.pingpong:
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

    wgmma_layout = plgpu.Layout.WGMMA
    row = plgpu.broadcasted_iota(jnp.int32, (_ROWS, keys), 0, layout=wgmma_layout)
    col = plgpu.broadcasted_iota(jnp.int32, (_ROWS, keys), 1, layout=wgmma_layout)
    tok_row = row // GROUP_ROWS
    t_row = t0 + tok_row
    bit_shift = tok_row + wg * _WG_TOKENS
    qk_scale = head_dim**-0.5 * LOG2E

    row_layout = wgmma_layout.reduce(1)
    m = plgpu.layout_cast(jnp.full((_ROWS,), DEFAULT_MASK_VALUE, jnp.float32), row_layout)
    l = plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), row_layout)
    acc = plgpu.layout_cast(jnp.zeros((_ROWS, head_dim), jnp.float32), wgmma_layout)

    pl.when(wg == 1)(sync_point)

    def attend(carry, slot, entries, mask):
        """One step; ``mask``: "none" (every row sees every key), "rows" (every key is before
        the warpgroup's tokens, so a row sees a whole entry or none of it) or "scores"."""
        acc, m, l = carry
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].T)
            sync_point()
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((_ROWS, keys), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        if mask == "rows":
            # The mask is constant over an entry's 64 columns of a row, so it acts on row
            # statistics only: an unselected entry leaves the row maximum alone and its
            # exponentials get an infinite shift (exactly 0). No per-score work, unlike "scores".
            parts = [s[:, i * _BLOCK : (i + 1) * _BLOCK] for i in range(per_step)]
            selected = [rows_selecting(bits, wg, row_layout) for _, bits in entries]
            part_max = [
                jnp.where(sel, part.max(axis=1) * qk_scale, DEFAULT_MASK_VALUE)
                for sel, part in zip(selected, parts, strict=True)
            ]
            m_new = functools.reduce(jnp.maximum, part_max, m)
            p_parts = [
                jnp.exp2(
                    part * qk_scale - lax.broadcast_in_dim(jnp.where(sel, m_new, jnp.inf), part.shape, [0])
                )
                for sel, part in zip(selected, parts, strict=True)
            ]
            row_sum = functools.reduce(jnp.add, [part.sum(axis=1) for part in p_parts])
            p = p_parts[0] if per_step == 1 else jnp.concatenate(p_parts, axis=1)
        else:
            s = s * qk_scale
            if mask == "scores":
                # Column c holds key c % 64 of entry c // 64: its position is c + key_base.
                blk, bits = entries[0]
                key_base, col_bits = blk * _BLOCK, bits
                for i, (blk, bits) in enumerate(entries[1:], 1):
                    later = col >= i * _BLOCK
                    key_base = jnp.where(later, (blk - i) * _BLOCK, key_base)
                    col_bits = jnp.where(later, bits, col_bits)
                valid = (col + key_base <= t_row) & ((lax.shift_right_logical(col_bits, bit_shift) & 1) == 1)
                s = jnp.where(valid, s, DEFAULT_MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            row_sum = p.sum(axis=1)
        alpha = jnp.exp2(m - m_new)
        l = l * alpha + row_sum
        p16 = p.astype(k_smem.dtype)
        if config.pingpong:
            plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_bar.at[slot])
        if config.pingpong:
            plgpu.barrier_wait(sched)

        if p_smem is not None:
            # The Mosaic GPU interpreter only takes SMEM operands for wgmma.
            p_smem.at[wg][...] = p16
            plgpu.commit_smem()
        p_operand = p16 if p_smem is None else p_smem.at[wg]

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_operand, v_smem.at[slot])
            return acc_ref[...]

        # A fresh accumulator, then one FMA per element: the same work as rescaling ``acc`` before
        # accumulating into it, and it keeps the rescale off the tensor cores' critical path.
        pv_out = pl.run_scoped(pv, plgpu.ACC((_ROWS, head_dim), jnp.float32))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv_out, m_new, l

    def pass_slot(carry, slot, entries):
        # None of this warpgroup's tokens selected the block: the same barrier traffic as
        # ``attend`` (phases stay in step with the other warpgroups), no math.
        plgpu.barrier_wait(k_bar.at[slot])
        sync_point()
        plgpu.barrier_arrive(k_free.at[slot])
        if config.pingpong:
            plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(v_bar.at[slot])
        if config.pingpong:
            plgpu.barrier_wait(sched)
        plgpu.barrier_arrive(v_free.at[slot])
        return carry

    my_bits_mask = ((1 << _WG_TOKENS) - 1) << (wg * _WG_TOKENS)

    def step(j, carry):
        slot = lax.rem(base + j, stages)
        entries = [list_entry(list_smem, j * per_step + i) for i in range(per_step)]
        any_bits = functools.reduce(lambda x, y: x | y, [bits for _, bits in entries])
        all_bits = functools.reduce(lambda x, y: x & y, [bits for _, bits in entries])
        last_blk = functools.reduce(jnp.maximum, [blk for blk, _ in entries])
        # Every key of the step is before all of this warpgroup's tokens (list padding, block 0
        # with no bits, is too: it is simply unselected).
        before = last_blk * _BLOCK + _BLOCK - 1 <= t0
        # Every token of this warpgroup selected the step's blocks (padding has no bits).
        whole = before & (all_bits & my_bits_mask == my_bits_mask)
        paths = [
            (pass_slot, config.skip_unselected and any_bits & my_bits_mask == 0),
            (functools.partial(attend, mask="none"), config.unmasked_path and whole),
            (functools.partial(attend, mask="rows"), config.row_masks and before),
            (functools.partial(attend, mask="scores"), True),
        ]
        return run_first(paths, carry, slot, entries)

    acc, m, l = lax.fori_loop(0, _steps(count, per_step), step, (acc, m, l))
    pl.when(wg == 0)(sync_point)
    return acc, m, l


def _normalise(acc, m, l):
    """``(o, lse)`` of a softmax state: rows that never saw a key (``m`` still at the mask value)
    output 0 with ``lse = -inf``."""
    seen = m > 0.5 * DEFAULT_MASK_VALUE
    l = jnp.where(seen, l, 1.0)
    o = acc / lax.broadcast_in_dim(l, acc.shape, [0])
    o = jnp.where(lax.broadcast_in_dim(seen, acc.shape, [0]), o, 0.0)
    return o, jnp.where(seen, m + jnp.log2(l), -jnp.inf)


def _kernel(
    off_ref, q_ref, k_ref, v_ref, list_ref, cnt_ref, o_ref, lse_ref, *, scratch, first, config: MosaicTile
):
    """Warpgroups 0 and 1 compute tokens ``4w .. 4w + 3`` of a tile, warpgroup 2 feeds them (refs and
    shapes as in ``tile_phase_mgpu``; ``p_smem`` exists only in interpret mode). One tile per CTA, or
    with ``config.persistent`` a strided share of all tiles (``_persistent_kernel``)."""
    (q_smem, k_and_out, v_smem, list_smem, lse_smem, p_smem), barriers = scratch
    k_smem, o_smem = k_and_out
    q_bar, k_bar, v_bar, list_bar, k_free, v_free, sched, ring_done = barriers
    local, b, h = lax.axis_index("tile"), lax.axis_index("batch"), lax.axis_index("kv")
    tile = first + local  # among all local query tiles (lists and q5 rows)
    wg = lax.axis_index("wg")
    count = cnt_ref[b, h, tile, 0]
    attend_tile = functools.partial(
        _attend_tile, (k_smem, v_smem, p_smem), (k_bar, v_bar, k_free, v_free, sched), wg=wg, config=config
    )

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(config.compute_registers, action="increase")
        row0 = tile * TILE_TOKENS + wg * _WG_TOKENS  # first q5 row (local token) of this warpgroup
        out0 = local * TILE_TOKENS + wg * _WG_TOKENS  # its first output row
        my_q = q_smem.at[wg]
        for i in range(_WG_TOKENS):
            plgpu.copy_gmem_to_smem(
                q_ref.at[b, row0 + i, h], my_q.at[pl.ds(i * GROUP_ROWS, GROUP_ROWS)], q_bar.at[wg, i]
            )
        for i in range(_WG_TOKENS):
            plgpu.barrier_wait(q_bar.at[wg, i])
        plgpu.barrier_wait(list_bar)
        acc, m, l = attend_tile(my_q, list_smem, count, off_ref[0] + out0, 0)
        # The output staging buffer is the K ring's memory: wait until both warpgroups are done with it.
        plgpu.barrier_arrive(ring_done)
        plgpu.barrier_wait(ring_done)
        o, lse = _normalise(acc, m, l)
        o_smem.at[wg][...] = o.astype(o_smem.dtype)
        lse_smem.at[wg][...] = lse
        plgpu.commit_smem()
        for i in range(_WG_TOKENS):
            rows = pl.ds(i * GROUP_ROWS, GROUP_ROWS)
            plgpu.copy_smem_to_gmem(o_smem.at[wg, rows], o_ref.at[b, out0 + i, h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg, rows], lse_ref.at[b, out0 + i, h])
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


def _persistent_kernel(
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    list_ref,
    cnt_ref,
    o_ref,
    lse_ref,
    *,
    scratch,
    first,
    config: MosaicTile,
    dynamic: bool,
):
    """``config.persistent``: one CTA per SM runs the ``(batch, kv head, tile)`` grid's tiles (tiles
    fastest, so concurrent CTAs read the same keys, as in the one-tile-per-CTA launch). With
    ``dynamic`` the CTAs take the tiles in that order from an atomic counter, each its next tile
    when it starts loading one (``take_next_item``); else CTA ``c`` of ``C`` runs tiles ``c, c + C,
    ...``.

    The memory warpgroup loads each tile's list and query rows into one of two buffers while the
    compute warpgroups still work on the previous tile, and streams K/V through the ring across tiles
    (global step numbers), so a tile's first blocks arrive during the previous tile's last steps and
    epilogue. A compute warpgroup stages its output through its own query buffer, which it no longer
    reads (in column slices when the output dtype is wider than the query's), and then releases the
    tile's buffers (``item_free``). With ``dynamic`` the memory warpgroup also writes each tile's index
    into the buffer's ``item_smem`` slot and announces it (``item_ready``); an index past the last tile
    ends both loops.
    """
    (q_and_out, k_smem, v_smem, list_smem, lse_smem, p_smem, item_smem), barriers = scratch
    q_smem, o_smem = q_and_out
    q_bar, k_bar, v_bar, list_bar, k_free, v_free, sched, item_free, item_ready = barriers
    wg = lax.axis_index("wg")
    batch, length, hkv = o_ref.shape[:3]
    n_local = length // TILE_TOKENS
    grid = (batch, hkv, n_local)
    n_items = batch * hkv * n_local
    part_cols = o_smem.shape[-1]
    parts = q_smem.shape[-1] // part_cols
    stages = k_smem.shape[0]
    per_step = k_smem.shape[1] // _BLOCK

    def tile_of(item):
        """(batch row, KV head, local tile) of grid item ``item`` (tiles fastest)."""
        bh = lax.div(item, n_local)
        return lax.div(bh, hkv), lax.rem(bh, hkv), lax.rem(item, n_local)

    def item_of(loop_info):
        b, h, local = loop_info.index
        return (b * hkv + h) * n_local + local

    def attend(item, buf, base):
        """A compute warpgroup's tile ``item`` from buffer ``buf``, ring steps ``base ...``; returns the
        CTA's ring steps after it."""
        b, h, local = tile_of(item)
        count = cnt_ref[b, h, first + local, 0]
        out0 = local * TILE_TOKENS + wg * _WG_TOKENS
        my_q = q_smem.at[buf, wg]
        plgpu.barrier_wait(q_bar.at[buf, wg])
        plgpu.barrier_wait(list_bar.at[buf])
        acc, m, l = _attend_tile(
            (k_smem, v_smem, p_smem),
            (k_bar, v_bar, k_free, v_free, sched),
            my_q,
            list_smem.at[buf],
            count,
            off_ref[0] + out0,
            base,
            wg=wg,
            config=config,
        )
        o, lse = _normalise(acc, m, l)
        for part in range(parts):
            cols = slice(part * part_cols, (part + 1) * part_cols)
            # The previous slice's TMA stores must have read the buffer (the first one: the
            # previous tile's LSE stores).
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem.at[buf, wg][...] = o[:, cols].astype(o_smem.dtype)
            if part == 0:
                lse_smem.at[wg][...] = lse
            plgpu.commit_smem()
            for i in range(_WG_TOKENS):
                rows = pl.ds(i * GROUP_ROWS, GROUP_ROWS)
                plgpu.copy_smem_to_gmem(
                    o_smem.at[buf, wg, rows],
                    o_ref.at[b, out0 + i, h, :, pl.ds(part * part_cols, part_cols)],
                )
                if part == 0:
                    plgpu.copy_smem_to_gmem(lse_smem.at[wg, rows], lse_ref.at[b, out0 + i, h])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        plgpu.barrier_arrive(item_free.at[buf])
        return base + _steps(count, per_step)

    def load(item, buf, base):
        """The memory warpgroup's copies of tile ``item`` into buffer ``buf`` and the ring (steps
        ``base ...``); returns the tile's ring steps."""
        b, h, local = tile_of(item)
        tile = first + local
        plgpu.copy_gmem_to_smem(list_ref.at[b, h, tile], list_smem.at[buf], list_bar.at[buf])
        for w in range(_COMPUTE_WGS):
            for i in range(_WG_TOKENS):
                plgpu.copy_gmem_to_smem(
                    q_ref.at[b, tile * TILE_TOKENS + w * _WG_TOKENS + i, h],
                    q_smem.at[buf, w, pl.ds(i * GROUP_ROWS, GROUP_ROWS)],
                    q_bar.at[buf, w],
                )
        plgpu.barrier_wait(list_bar.at[buf])
        steps = _steps(cnt_ref[b, h, tile, 0], per_step)
        stream_steps(
            (k_ref.at[b, :, h], v_ref.at[b, :, h]),
            (list_smem.at[buf], k_smem, v_smem),
            (k_bar, v_bar, k_free, v_free),
            steps=steps,
            base=base,
        )
        return steps

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(config.compute_registers, action="increase")
        if dynamic:
            queue_loop(
                n_items,
                lambda i: announced_item(item_smem, item_ready, i),
                lambda item, i, base: attend(item, lax.rem(i, 2), base),
            )
        else:

            @plgpu.nd_loop(grid, collective_axes="cta", init_carry=jnp.int32(0))
            def _tiles(loop_info, carry):
                return attend(item_of(loop_info), lax.rem(loop_info.local_index, 2), carry)

        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(config.memory_registers, action="decrease")
        if dynamic:
            counter = pl.get_global(plgpu.SemaphoreType.REGULAR((1,)))
            n_local_items, total_steps = queue_loop(
                n_items,
                lambda i: take_queued_item(counter, item_smem, item_ready, item_free, i),
                lambda item, i, base: base + load(item, lax.rem(i, 2), base),
            )
            wait_last_releases((k_free, v_free), total_steps, stages)
            wait_last_queued_release(item_free, n_local_items)
        else:

            @plgpu.nd_loop(grid, collective_axes="cta", init_carry=(jnp.int32(0),) * 2)
            def totals(loop_info, carry):
                buf = lax.rem(loop_info.local_index, 2)

                @pl.when(loop_info.local_index >= 2)
                def _():
                    plgpu.barrier_wait(item_free.at[buf])

                steps = load(item_of(loop_info), buf, carry[0])
                return carry[0] + steps, carry[1] + 1

            total_steps, n_local_items = totals
            # The K/V ring's and the two tile buffers' last releases.
            wait_last_releases((k_free, v_free), total_steps, stages)
            wait_last_releases((item_free,), n_local_items, 2)


def run_first(paths, *args):
    """Runs the first branch of ``paths`` (``(branch, condition)`` pairs, the last one's condition
    ``True``) whose condition holds; a condition that is ``False`` in Python drops its branch from
    the kernel."""
    paths = [(branch, cond) for branch, cond in paths if cond is not False]
    if len(paths) == 1:
        return paths[0][0](*args)
    index = jnp.int32(len(paths) - 1)
    for i in reversed(range(len(paths) - 1)):
        index = jnp.where(paths[i][1], i, index)
    return lax.switch(index, [branch for branch, _ in paths], *args)


def stream_blocks(gmem, smem, bars, *, index, count, registers):
    """The memory warpgroup of a one-tile-per-CTA tile kernel (forward or dQ).

    Copies tile ``tile``'s packed list into SMEM, then the listed 64-key blocks of K and V
    (``stream_steps``), then waits until the compute warpgroups released the ring.

    Args:
      gmem: ``(k, v, lists)``: ``[B, Tk, Hkv, D]`` keys and values, ``pack_tile_lists`` output.
      smem: ``(list, k_ring, v_ring)`` SMEM refs ``[stages, 64 * per_step, D]``.
      bars: the list barrier, the ring's K and V arrival barriers (``per_step`` arrivals each) and its
        K and V release barriers.
      index: ``(b, h, tile)``.
      count: number of list entries.
      registers: the memory warpgroup's register budget.
    """
    plgpu.set_max_registers(registers, action="decrease")
    (k_ref, v_ref, list_ref), (list_smem, k_smem, _) = gmem, smem
    list_bar, *ring_bars = bars
    b, h, tile = index
    steps = _steps(count, k_smem.shape[1] // _BLOCK)
    plgpu.copy_gmem_to_smem(list_ref.at[b, h, tile], list_smem, list_bar)
    plgpu.barrier_wait(list_bar)
    stream_steps((k_ref.at[b, :, h], v_ref.at[b, :, h]), smem, ring_bars, steps=steps, base=0)
    wait_last_releases(ring_bars[2:], steps, k_smem.shape[0])


def stream_steps(gmem, smem, bars, *, steps, base):
    """Copies a list's blocks of K and V into the ring, ``per_step`` consecutive entries per slot
    (``k_ring.shape[1] / 64``): step ``j`` is the CTA's ring step ``base + j``, which goes into slot
    ``(base + j) % stages`` once the compute warpgroups released the step that held it.

    Args:
      gmem: ``(k, v)`` ``[Tk, D]`` (one batch row and KV head).
      smem: ``(list, k_ring, v_ring)``: the packed list and the ring ``[stages, 64 * per_step, D]``.
      bars: the ring's K and V arrival barriers (``per_step`` arrivals each) and release barriers.
      steps, base: steps of this list, and ring steps the CTA ran before it.
    """
    (k_ref, v_ref), (list_smem, k_smem, v_smem) = gmem, smem
    k_bar, v_bar, k_free, v_free = bars
    stages = k_smem.shape[0]
    per_step = k_smem.shape[1] // _BLOCK

    def copy_step(src, dst, bar, j):
        # Entry j * per_step + i goes to keys [64 i, 64 i + 64) of the slot; each copy is one of the
        # barrier's per_step arrivals.
        for i in range(per_step):
            blk = list_entry(list_smem, j * per_step + i)[0]
            keys = pl.ds(pl.multiple_of(blk * _BLOCK, _BLOCK), _BLOCK)
            plgpu.copy_gmem_to_smem(src.at[keys], dst.at[pl.ds(i * _BLOCK, _BLOCK)], bar)

    @pl.loop(0, steps)
    def _(j):
        slot = lax.rem(base + j, stages)

        @pl.when(base + j >= stages)
        def _():
            plgpu.barrier_wait(k_free.at[slot])

        copy_step(k_ref, k_smem.at[slot], k_bar.at[slot], j)

        @pl.when(base + j >= stages)
        def _():
            plgpu.barrier_wait(v_free.at[slot])

        copy_step(v_ref, v_smem.at[slot], v_bar.at[slot], j)


def tile_phase_mgpu(
    off: jax.Array,
    q5: jax.Array,
    k: jax.Array,
    v: jax.Array,
    packed_lists: jax.Array,
    tile_cnt: jax.Array,
    *,
    start: int,
    length: int,
    out_dtype,
    config: MosaicTile,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Runs the tile phase for local query tokens ``[start, start + length)`` (8-token tiles).

    Args:
      off: ``[1]`` int32, key position of local token ``start``.
      q5: ``[B, Tp, Hkv, 16, D]`` bf16/fp16 (``group_rows``), all local tokens.
      k, v: ``[B, Tkp, Hkv, D]`` all keys, ``Tkp`` a multiple of 64.
      packed_lists: ``pack_tile_lists`` of the 8-token tile lists, ``[B, Hkv, Tp / 8, R, 128]``.
      tile_cnt: ``[B, Hkv, Tp / 8, 2]`` int32 (only the count is used).
      start, length: static multiples of 8.
      out_dtype: dtype of the normalised output (float32 when a token phase resumes from it).
      config: launch parameters.
      interpret: run in the Mosaic GPU interpreter (CPU tests).

    Returns:
      ``o [B, length, Hkv, 16, D]`` in ``out_dtype`` and base-2 ``lse [B, length, Hkv, 16]`` fp32.
    """
    b, tp, hkv, gp, d = q5.shape
    if gp != GROUP_ROWS or start % TILE_TOKENS or length % TILE_TOKENS or start + length > tp:
        raise ValueError(
            f"q5 {q5.shape} must be [B, Tp, Hkv, {GROUP_ROWS}, D] and [{start}, {start + length}) a "
            f"range of whole {TILE_TOKENS}-token tiles inside it"
        )
    in_dtype = q5.dtype
    list_rows = packed_lists.shape[-2]
    stages, per_step = config.stages, config.blocks_per_step
    keys = per_step * _BLOCK
    ring = plgpu.SMEM((stages, keys, d), in_dtype, transforms=SWIZZLED_128B)
    q_rows = plgpu.SMEM((_COMPUTE_WGS, _ROWS, d), in_dtype, transforms=SWIZZLED_128B)
    p_smem = (
        plgpu.SMEM((_COMPUTE_WGS, _ROWS, keys), in_dtype, transforms=SWIZZLED_128B) if interpret else None
    )
    ring_bars = (
        plgpu.Barrier(num_arrivals=per_step, num_barriers=stages),
        plgpu.Barrier(num_arrivals=per_step, num_barriers=stages),
    )
    free_bars = (
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
    )
    if config.persistent:
        # Two buffers of query rows and lists; a warpgroup's output staging is its query buffer, in
        # column slices (two for an fp32 output of bf16 queries).
        parts = max(1, jnp.dtype(out_dtype).itemsize // jnp.dtype(in_dtype).itemsize)
        scratch = (
            (
                plgpu.RefUnion(
                    plgpu.SMEM((2, _COMPUTE_WGS, _ROWS, d), in_dtype, transforms=SWIZZLED_128B),
                    plgpu.SMEM((2, _COMPUTE_WGS, _ROWS, d // parts), out_dtype),
                ),
                ring,
                ring,
                plgpu.SMEM((2, list_rows, _LIST_COLS), jnp.int32),
                plgpu.SMEM((_COMPUTE_WGS, _ROWS), jnp.float32),
                p_smem,
                plgpu.SMEM((2, 1), jnp.int32),  # with ``dynamic``: each buffer's tile
            ),
            (
                plgpu.Barrier(num_arrivals=_WG_TOKENS, num_barriers=(2, _COMPUTE_WGS)),
                *ring_bars,
                plgpu.Barrier(num_barriers=2),
                *free_bars,
                plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
                plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=2),
                plgpu.Barrier(num_barriers=2),  # with ``dynamic``: a buffer's tile index is written
            ),
        )
        # The interpreter cannot run the atomic counter: there the CTAs take their tiles strided.
        kernel = functools.partial(_persistent_kernel, dynamic=config.dynamic and not interpret)
        n_tiles = b * hkv * (length // TILE_TOKENS)
        grid, grid_names = (min(n_tiles, persistent_ctas(interpret)),), ("cta",)
    else:
        scratch = (
            (
                q_rows,
                plgpu.RefUnion(ring, plgpu.SMEM((_COMPUTE_WGS, _ROWS, d), out_dtype)),
                ring,
                plgpu.SMEM((list_rows, _LIST_COLS), jnp.int32),
                plgpu.SMEM((_COMPUTE_WGS, _ROWS), jnp.float32),
                p_smem,
            ),
            (
                plgpu.Barrier(num_barriers=(_COMPUTE_WGS, _WG_TOKENS)),
                *ring_bars,
                plgpu.Barrier(),
                *free_bars,
                plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
                plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            ),
        )
        kernel = _kernel
        grid, grid_names = (length // TILE_TOKENS, b, hkv), ("tile", "batch", "kv")

    # The profiler names the kernel after this function.
    def sparse_attn_fwd_tile_mgpu(*refs):
        pl.run_scoped(
            lambda *allocs: kernel(*refs, scratch=allocs, first=start // TILE_TOKENS, config=config),
            *scratch,
            collective_axes="wg",
        )

    return plgpu.kernel(
        sparse_attn_fwd_tile_mgpu,
        out_type=(
            jax.ShapeDtypeStruct((b, length, hkv, gp, d), out_dtype),
            jax.ShapeDtypeStruct((b, length, hkv, gp), jnp.float32),
        ),
        grid=grid,
        grid_names=grid_names,
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(off, q5, k, v, packed_lists, tile_cnt)
