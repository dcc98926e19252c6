"""Stage-1 scoring with the keys as the WGMMA rows: the group sum in registers (Mosaic GPU, Hopper).

Same outputs as ``selection_mgpu.score_tiles_mgpu`` (``body[t, j]``, the max over block ``j``'s own
kernels of the group-summed score, and ``halo[t, j + HALO_SHIFT]``, block ``j``'s last kernel), for
the same Triton top-k. ``score_tiles_mgpu`` computes ``S = Q K^T`` with the 4 tokens x 16 heads of a
warpgroup as rows and sums each token's 16 rows with a second WGMMA (``E^T P``), 64 output rows of
which 4 are used: half the tensor work of ``Q K^T`` for 1/16 of its output, plus a round trip of
``P`` through SMEM. Here the fine pass computes ``S^T = K Q^T`` instead:

- One CTA owns 8 tokens of one (batch row, KV head), as before; its query rows sit in SMEM head-major,
  row ``head * 8 + token``, and form the WGMMA's ``N = 128`` columns. Column ``8 * head + token`` of a
  ``[64 keys, 128]`` accumulator tile, so the sum over the group is the sum of the 16 column slices
  ``[:, 8 h : 8 h + 8]``: every thread holds the same columns of each slice, and the 15 adds per
  element stay in its registers.
- Pass 1 (coarse keys) is ``Q K2^T`` as in ``score_tiles_mgpu``: warpgroup ``w`` takes heads
  ``8 w .. 8 w + 7`` (64 rows) over every coarse tile and gets their base-2 log-sum-exp. The two
  halves meet in SMEM and each warpgroup reads all 128 back as a column vector.
- Pass 2 (fine keys) splits the keys instead: a ring slot holds 128 fine kernels, the first 64 for
  warpgroup 0 and the rest for warpgroup 1, each against all 128 query rows.
- Pooling without moving data between threads: ``permute_fine_keys(k1, pool, blocks=128)`` orders
  a *pair tile* of ``128 * pool`` kernels (128 blocks) so that ring step ``i`` of the pair tile holds
  kernel ``pool * c + i`` of block ``c`` at row ``c`` (warpgroup ``c // 64``, row ``c % 64``). A
  block's kernels then sit in the same row of ``pool`` consecutive steps, its max is an elementwise
  max over the steps, and its last kernel (the next block's halo) is the last step's sum.
- The pooled ``[64 blocks, 8 tokens]`` tiles are stored transposed into SMEM (``[8, 64]``), so the
  TMA stores write token-major rows as the top-k reads them.

The fine pass's granularity is a warpgroup's half of a pair tile (64 blocks): a half that holds no
block the CTA scores is skipped, one whose scored blocks every token sees entirely runs without a mask.

Code size matters here (session 12's Nsight Compute profile): both compute warpgroups run one body
with the warpgroup index traced, and the ``pool`` ring steps of a pair tile are a loop.

Only bf16/fp16 inputs, head dims 64/128, groups of at most 16 heads and ``block_size / kernel_stride``
in {4, 8} (``selection_mgpu.supported_mosaic_scoring``).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import SWIZZLED_128B, pl, plgpu
from pallas_kernels.mgpu_sync import wait_last_releases
from pallas_kernels.selection_mgpu import (
    HALO_SHIFT,
    KEY_TILE,
    TILE_TOKENS,
    MosaicScore,
    coarse_lse,
    copy_key_tiles,
    score_dtype,
    stream_key_tiles,
    supported_mosaic_scoring,
    visible_kernels,
)
from pallas_kernels.tiling import GROUP_ROWS, LOG2E, persistent_ctas

__all__ = ["PAIR_BLOCKS", "query_rows_head_major", "score_tiles_mgpu_keys"]

# Blocks per pair tile: 64 per compute warpgroup (the WGMMA row count).
PAIR_BLOCKS = 128
_HALF_BLOCKS = PAIR_BLOCKS // 2
_COMPUTE_WGS = 2
_HEADS_PER_WG = GROUP_ROWS // _COMPUTE_WGS
_ROWS = TILE_TOKENS * GROUP_ROWS  # query rows of a CTA: the fine pass's N


def query_rows_head_major(q_c: jax.Array) -> jax.Array:
    """``[B, Hkv, C, 16, D]`` chunk queries -> ``[B, Hkv, C * 16, D]``, row ``tile * 128 + head * 8 +
    token`` (the kernel's SMEM order; ``C`` a multiple of 8)."""
    b, h, c, g, d = q_c.shape
    q_c = q_c.reshape(b, h, c // TILE_TOKENS, TILE_TOKENS, g, d).swapaxes(3, 4)
    return q_c.reshape(b, h, c * g, d)


def _geometry(pos_ref, tile, *, n1: int, n2: int, stride: int, pool: int, forced: tuple[int, int] | None):
    """Key positions and step counts of tile ``tile`` (8 tokens): ``(t_first, t_end, n2_tiles,
    blocks_seen, blocks_whole, n_pairs)``: its first token's key position, the sequence's last one,
    its coarse ring steps, the blocks it scores (those with at least one kernel its last token sees,
    less the ones ``forced`` leaves unscored), the blocks all of whose kernels its first token sees,
    and its pair tiles."""
    size1, size2, stride2 = 2 * stride, 8 * stride, 4 * stride  # kernel sizes are 2x the strides
    t_end = pos_ref[1]
    t_first = jnp.minimum(pos_ref[0] + tile * TILE_TOKENS, t_end)
    cta_last = jnp.minimum(pos_ref[0] + tile * TILE_TOKENS + TILE_TOKENS - 1, t_end)
    n2_tiles = lax.div(visible_kernels(cta_last, size2, stride2, n2) + KEY_TILE - 1, KEY_TILE)
    blocks_seen = lax.div(visible_kernels(cta_last, size1, stride, n1) + pool - 1, pool)
    if forced is not None:
        # The top-k forces blocks b - local .. b of a token in block b, and keeps every visible block of
        # a token in a block b < num_kept: the scores of the blocks from the last token's b - local on,
        # and all of them in a tile whose last token has b < num_kept, are never read. Such a tile
        # skips its coarse pass too (the LSE only normalises fine scores).
        local_blocks, num_kept = forced
        q_block = lax.div(cta_last, pool * stride)
        scored = jnp.where(q_block < num_kept, 0, jnp.maximum(q_block - local_blocks, 0))
        blocks_seen = jnp.minimum(blocks_seen, scored)
        n2_tiles = jnp.where(blocks_seen > 0, n2_tiles, 0)
    blocks_whole = lax.div(visible_kernels(t_first, size1, stride, n1), pool)
    n_pairs = lax.div(blocks_seen + PAIR_BLOCKS - 1, PAIR_BLOCKS)
    return t_first, t_end, n2_tiles, blocks_seen, blocks_whole, n_pairs


def _load_queries(pos_ref, q_ref, q_smem, q_bar, *, w, tile, b, h, in_place: bool):
    """Copies compute warpgroup ``w``'s 64 query rows (heads ``8 w .. 8 w + 7``) of tile ``tile`` into
    ``q_smem`` (``[128, D]``, row ``head * 8 + token``), arriving on ``q_bar``."""
    w = jnp.int32(w)
    wg_rows = _HEADS_PER_WG * TILE_TOKENS
    if in_place:
        # The whole query [B, T, Hkv * 16, D], T a multiple of 8: head g of the tile's 8 tokens is
        # one strided box. Tiles past the last token repeat the last tile.
        start = pl.multiple_of(
            jnp.minimum(pos_ref[2] + tile * TILE_TOKENS, pos_ref[3] + 1 - TILE_TOKENS), TILE_TOKENS
        )
        # ``start`` must be provably a multiple of 8 (the SMEM tiling) for layout inference.
        for i in range(_HEADS_PER_WG):
            g = w * _HEADS_PER_WG + i
            plgpu.copy_gmem_to_smem(
                q_ref.at[b, pl.ds(start, TILE_TOKENS), h * GROUP_ROWS + g],
                q_smem.at[pl.ds(pl.multiple_of(g * TILE_TOKENS, TILE_TOKENS), TILE_TOKENS)],
                q_bar,
            )
    else:
        rows = pl.ds(tile * _ROWS + w * wg_rows, wg_rows)
        plgpu.copy_gmem_to_smem(
            q_ref.at[b, h, rows], q_smem.at[pl.ds(pl.multiple_of(w * wg_rows, wg_rows), wg_rows)], q_bar
        )


def _score_tile(
    refs, smem, bars, geometry, *, w, tile, b, h, base, n1, n2, stride, group, pool, config: MosaicScore
):
    """Compute warpgroup ``w``'s two passes over one tile (ring steps ``base ...`` of the CTA) and the
    TMA stores of its pooled scores (issued, not waited for).

    Args:
      refs: ``(pos, body, halo)`` GMEM refs; smem: ``(q [128, D], ring, lse [128], output buffers)``;
        bars: the ring's arrival and release barriers, the LSE exchange barrier and the two stagger
        barriers (coarse, fine; ``None`` without ``config.stagger``).
      geometry: ``_geometry`` of the tile.
    """
    pos_ref, body_ref, halo_ref = refs
    q_smem, ring, lse_smem, out_smem = smem
    k_bar, k_free, lse_bar, kick = bars
    t_first, t_end, n2_tiles, blocks_seen, blocks_whole, n_pairs = geometry
    stages = config.stages
    head_dim = q_smem.shape[-1]
    size1 = 2 * stride  # fine kernel size
    wg_rows = _HEADS_PER_WG * TILE_TOKENS
    my_rows = pl.ds(pl.multiple_of(w * wg_rows, wg_rows), wg_rows)

    layout = plgpu.Layout.WGMMA
    qk_scale = head_dim**-0.5 * LOG2E

    def stagger_wait(which, steps):
        # Warpgroup 1 starts pass ``which`` once warpgroup 0's first WGMMA of it is done (one
        # arrival per tile and pass on each barrier: warpgroup 0 cannot get a tile ahead of these
        # waits, since it must pass the LSE exchange, which warpgroup 1 reaches after them).
        if kick is not None:
            pl.when((w == 1) & (steps > 0))(lambda: plgpu.barrier_wait(kick.at[which]))

    def stagger_arrive(which, first):
        if kick is not None:
            pl.when((w == 0) & first)(lambda: plgpu.barrier_arrive(kick.at[which]))

    # Pass 1: rows head * 8 + token of this warpgroup's 8 heads against 128 coarse keys per step.
    row = plgpu.broadcasted_iota(jnp.int32, (64, KEY_TILE), 0, layout=layout)
    t_row = jnp.minimum(pos_ref[0] + tile * TILE_TOKENS + row % TILE_TOKENS, t_end)
    row_layout = layout.reduce(1)
    head = w * _HEADS_PER_WG + plgpu.broadcasted_iota(jnp.int32, (64,), 0, layout=row_layout) // TILE_TOKENS

    def coarse_scores(j):
        slot = lax.rem(base + j, stages)
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem.at[my_rows], ring.at[slot].T)
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((64, KEY_TILE), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        stagger_arrive(0, j == 0)
        return s

    stagger_wait(0, n2_tiles)
    lse_smem.at[my_rows][...] = coarse_lse(
        coarse_scores,
        t_row=t_row,
        t_first=t_first,
        n2=n2,
        n2_tiles=n2_tiles,
        stride=stride,
        qk_scale=qk_scale,
        valid_rows=head < group,
    )
    plgpu.barrier_arrive(lse_bar)
    plgpu.barrier_wait(lse_bar)
    lse = plgpu.load(lse_smem, layout=layout.reduce(0))  # [128]: column c's row

    # Pass 2: S^T = K1 Q^T over this warpgroup's 64 kernels of each ring slot.
    key_row = plgpu.broadcasted_iota(jnp.int32, (64, _ROWS), 0, layout=layout)
    q_col = plgpu.broadcasted_iota(jnp.int32, (64, _ROWS), 1, layout=layout)
    t_col = jnp.minimum(pos_ref[0] + tile * TILE_TOKENS + q_col % TILE_TOKENS, t_end)
    lse_cols = lax.broadcast_in_dim(lse, (64, _ROWS), [1])
    block0 = w * _HALF_BLOCKS  # this warpgroup's first block of a pair tile

    def fine_step(j):
        slot = lax.rem(base + j, stages)
        plgpu.barrier_wait(k_bar.at[slot])

        def kq(acc_ref):
            plgpu.wgmma(acc_ref, ring.at[slot, pl.ds(pl.multiple_of(w * 64, 64), 64)], q_smem.T)
            return acc_ref[...]

        s = pl.run_scoped(kq, plgpu.ACC((64, _ROWS), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        # Warpgroup 0's first fine step is always computed (its half of pair tile 0 holds block 0).
        stagger_arrive(1, j == n2_tiles)
        return s

    def pair(pt, carry, mode):
        """Pair tile ``pt``: ``pool`` ring steps; ``mode`` "none" (every token sees every kernel of
        this half), "mask" or "pass" (no token sees any: barrier traffic only)."""
        first_step = n2_tiles + pt * pool
        if mode == "pass":
            for i in range(pool):
                slot = lax.rem(base + first_step + i, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
            return carry

        def pool_step(i, carry):
            pooled, _ = carry
            x = fine_step(first_step + i) * qk_scale - lse_cols
            if mode == "mask":
                kernel_end = pool * (pt * PAIR_BLOCKS + block0 + key_row) + i
                kernel_end = kernel_end * stride + size1  # one past the kernel's last key

            def head_probs(g):
                # Column 8 * head + token: the group sum adds whole 8-column slices.
                cols = slice(g * TILE_TOKENS, (g + 1) * TILE_TOKENS)
                p = jnp.exp2(x[:, cols])
                if mode == "mask":
                    p = jnp.where(kernel_end[:, cols] <= t_col[:, cols] + 1, p, 0.0)
                return p

            sums = functools.reduce(jnp.add, [head_probs(g) for g in range(group)])
            return jnp.maximum(pooled, sums), sums

        # Sums of probabilities are >= 0, so a max that starts at 0 is the max over the steps. A
        # loop, not ``pool`` copies of the step: less code to fetch (and to lower).
        zeros = plgpu.layout_cast(jnp.zeros((64, TILE_TOKENS), jnp.float32), layout)
        pooled, sums = lax.fori_loop(0, pool, pool_step, (zeros, zeros))
        buffers = config.store_buffers
        buf = out_smem.at[w, lax.rem(pt, buffers)]
        # The stores that last read this buffer (``buffers`` pair tiles ago) must be done.
        plgpu.wait_smem_to_gmem(2 * (buffers - 1), wait_read_only=True)
        # Transposed stores need the 2x2-transposed WGMMA layout (one shuffle per register pair).
        transposed = plgpu.Layout.WGMMA_TRANSPOSED
        buf.at[0].T[...] = plgpu.layout_cast(pooled.astype(score_dtype(config)), transposed)
        # The last step: each block's last kernel.
        buf.at[1].T[...] = plgpu.layout_cast(sums.astype(score_dtype(config)), transposed)
        plgpu.commit_smem()
        blocks = pt * PAIR_BLOCKS + block0
        tokens = pl.ds(tile * TILE_TOKENS, TILE_TOKENS)
        plgpu.copy_smem_to_gmem(buf.at[0], body_ref.at[b, h, tokens, pl.ds(blocks, _HALF_BLOCKS)])
        plgpu.copy_smem_to_gmem(
            buf.at[1], halo_ref.at[b, h, tokens, pl.ds(blocks + HALO_SHIFT, _HALF_BLOCKS)]
        )
        return carry

    # Pair tiles whose half holds a scored block; of those, the ones whose scored blocks every token
    # sees entirely. When every scored block is whole (the tile's forced window covers the partly
    # visible ones), the last half runs unmasked too: its columns past the scored blocks are never read.
    n_seen = jnp.minimum(
        lax.div(jnp.maximum(blocks_seen - block0, 0) + PAIR_BLOCKS - 1, PAIR_BLOCKS), n_pairs
    )
    n_whole = jnp.where(
        blocks_whole >= blocks_seen,
        n_seen,
        jnp.minimum(lax.div(blocks_whole + _HALF_BLOCKS - block0, PAIR_BLOCKS), n_pairs),
    )
    stagger_wait(1, n_pairs)
    lax.fori_loop(0, n_whole, functools.partial(pair, mode="none"), 0)
    lax.fori_loop(n_whole, n_seen, functools.partial(pair, mode="mask"), 0)
    lax.fori_loop(n_seen, n_pairs, functools.partial(pair, mode="pass"), 0)


def _kernel(
    pos_ref,
    q_ref,
    k1_ref,
    k2_ref,
    body_ref,
    halo_ref,
    *,
    scratch,
    n1: int,
    n2: int,
    stride: int,
    group: int,
    pool: int,
    config: MosaicScore,
    in_place: bool,
    forced: tuple[int, int] | None,
):
    """One CTA: warpgroups 0 and 1 score tile ``tile``'s 8 tokens, warpgroup 2 streams the keys (refs
    and shapes as in ``score_tiles_mgpu_keys``)."""
    (q_tiles, ring, lse_tiles, out_smem), (q_bars, k_bar, k_free, lse_bar, _, kick) = scratch
    q_smem, lse_smem = q_tiles.at[0], lse_tiles.at[0]  # one tile: one buffer
    tile, b, h = lax.axis_index("tile"), lax.axis_index("batch"), lax.axis_index("kv")
    wg = lax.axis_index("wg")
    geometry = _geometry(pos_ref, tile, n1=n1, n2=n2, stride=stride, pool=pool, forced=forced)
    n2_tiles, n_pairs = geometry[2], geometry[5]

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        # One body for both compute warpgroups (``w`` traced), not a copy each: half the code to fetch.
        plgpu.set_max_registers(config.compute_registers, action="increase")
        _load_queries(pos_ref, q_ref, q_smem, q_bars.at[0, wg], w=wg, tile=tile, b=b, h=h, in_place=in_place)
        # Both warpgroups read all 128 rows in pass 2.
        for bar in range(_COMPUTE_WGS):
            plgpu.barrier_wait(q_bars.at[0, bar])
        _score_tile(
            (pos_ref, body_ref, halo_ref),
            (q_smem, ring, lse_smem, out_smem),
            (k_bar, k_free, lse_bar, kick if config.stagger else None),
            geometry,
            w=wg,
            tile=tile,
            b=b,
            h=h,
            base=0,
            n1=n1,
            n2=n2,
            stride=stride,
            group=group,
            pool=pool,
            config=config,
        )
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == _COMPUTE_WGS)(
        functools.partial(
            stream_key_tiles,
            (k2_ref.at[b, h], k1_ref.at[b, h]),
            (ring, k_bar, k_free),
            n2_tiles=n2_tiles,
            total=n2_tiles + n_pairs * pool,
            registers=config.memory_registers,
        )
    )


def _persistent_kernel(
    pos_ref,
    q_ref,
    k1_ref,
    k2_ref,
    body_ref,
    halo_ref,
    *,
    scratch,
    n1: int,
    n2: int,
    stride: int,
    group: int,
    pool: int,
    config: MosaicScore,
    in_place: bool,
    forced: tuple[int, int] | None,
):
    """``config.persistent``: CTA ``c`` of ``C`` scores tiles ``c, c + C, ...`` of the ``(batch, kv head,
    tile)`` grid (tiles fastest, so concurrent CTAs read the same keys, as in the one-tile-per-CTA
    launch). The memory warpgroup loads each tile's query rows into one of two buffers while the
    compute warpgroups still score the previous tile, and streams the key tiles through the ring
    across tiles (global step numbers); the LSE exchange is double-buffered too, since a tile without
    key steps lets a warpgroup reach the next exchange before the other one read the last."""
    (q_smem, ring, lse_smem, out_smem), (q_bar, k_bar, k_free, lse_bar, tile_free, kick) = scratch
    wg = lax.axis_index("wg")
    batch, hkv, chunk = body_ref.shape[:3]
    grid = (batch, hkv, chunk // TILE_TOKENS)
    geometry_of = functools.partial(_geometry, pos_ref, n1=n1, n2=n2, stride=stride, pool=pool, forced=forced)

    def tile_of(loop_info):
        b, h, tile = loop_info.index
        return b, h, tile, lax.rem(loop_info.local_index, 2)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(config.compute_registers, action="increase")

        @plgpu.nd_loop(grid, collective_axes="cta", init_carry=jnp.int32(0))
        def _tiles(loop_info, carry):
            b, h, tile, buf = tile_of(loop_info)
            geometry = geometry_of(tile)
            for bar in range(_COMPUTE_WGS):
                plgpu.barrier_wait(q_bar.at[buf, bar])
            _score_tile(
                (pos_ref, body_ref, halo_ref),
                (q_smem.at[buf], ring, lse_smem.at[buf], out_smem),
                (k_bar, k_free, lse_bar, kick if config.stagger else None),
                geometry,
                w=wg,
                tile=tile,
                b=b,
                h=h,
                base=carry,
                n1=n1,
                n2=n2,
                stride=stride,
                group=group,
                pool=pool,
                config=config,
            )
            plgpu.barrier_arrive(tile_free.at[buf])
            if config.store_buffers > 1:
                # The next tile's first pair tile takes output buffer 0 again, whatever this one's last took.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            return carry + geometry[2] + geometry[5] * pool

        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(config.memory_registers, action="decrease")

        @plgpu.nd_loop(grid, collective_axes="cta", init_carry=(jnp.int32(0),) * 2)
        def totals(loop_info, carry):
            b, h, tile, buf = tile_of(loop_info)
            geometry = geometry_of(tile)

            @pl.when(loop_info.local_index >= 2)
            def _():
                plgpu.barrier_wait(tile_free.at[buf])

            for w in range(_COMPUTE_WGS):
                _load_queries(
                    pos_ref,
                    q_ref,
                    q_smem.at[buf],
                    q_bar.at[buf, w],
                    w=w,
                    tile=tile,
                    b=b,
                    h=h,
                    in_place=in_place,
                )
            steps = geometry[2] + geometry[5] * pool
            copy_key_tiles(
                (k2_ref.at[b, h], k1_ref.at[b, h]),
                (ring, k_bar, k_free),
                n2_tiles=geometry[2],
                total=steps,
                base=carry[0],
            )
            return carry[0] + steps, carry[1] + 1

        total, n_local = totals
        # The key ring's and the two tile buffers' last releases.
        wait_last_releases((k_free,), total, config.stages)
        wait_last_releases((tile_free,), n_local, 2)


def score_tiles_mgpu_keys(
    pos: jax.Array,
    q_rows: jax.Array,
    k1: jax.Array,
    k2: jax.Array,
    *,
    n1: int,
    n2: int,
    stride: int,
    group: int,
    pool: int,
    width: int,
    config: MosaicScore,
    chunk: int | None = None,
    forced: tuple[int, int] | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pooled stage-1 scores of one query chunk (``score_tiles_mgpu``'s outputs).

    Args:
      pos: ``[2]`` int32: key position of the chunk's first query and of the sequence's last one;
        with ``chunk``, ``[4]``: these, then the index in ``q_rows`` of the chunk's first token and of
        the last token.
      q_rows: ``[B, Hkv, C * 16, D]`` bf16/fp16 chunk queries in ``query_rows_head_major`` order (heads
        ``g >= group`` are zero padding); ``C`` a multiple of 8. With ``chunk``: the whole query ``[B,
        T, Hkv * 16, D]`` (``group`` = 16, ``T`` a multiple of 8), read in place.
      k1: ``[B, Hkv, n1_pad, D]`` fine compressed keys in ``permute_fine_keys(k1, pool, PAIR_BLOCKS)``
        order, zero rows past ``n1``, ``n1_pad`` a multiple of ``128 * pool``; ``k2``: ``[B, Hkv,
        n2_pad, D]`` coarse ones, ``n2_pad`` a multiple of 128.
      n1, n2: numbers of fine / coarse kernels; stride: the fine kernel stride (coarse: 4x).
      group: query heads per KV head; pool: fine kernels per block (``block_size / stride``).
      width: columns of the outputs (at least ``nb_pad + HALO_SHIFT`` with ``nb_pad`` a multiple of 128).
      config: launch parameters.
      chunk: ``C`` (a multiple of 8) when ``q_rows`` is the whole query.
      forced: ``(local_blocks, num_kept)`` of the top-k that reads the scores: blocks ``b - local_blocks
        .. b`` of a token in block ``b`` are forced, and a token with ``b < num_kept`` keeps every
        visible block. Tiles then skip the blocks whose scores no token of theirs uses (every one in a
        tile whose last token has ``b < num_kept``). ``None``: score every visible block.
      interpret: run in the Mosaic GPU interpreter (CPU tests).

    Returns:
      ``body, halo [B, Hkv, C, width]`` float32 (bfloat16 with ``config.bf16_scores``); columns of
      blocks the token cannot see, and with ``forced`` of the blocks its tile skips, are unspecified.
    """
    if not config.key_rows:
        raise ValueError("MosaicScore(key_rows=False) is score_tiles_mgpu's configuration, not this kernel's")
    in_place = chunk is not None
    d = k1.shape[-1]
    b, hkv = k1.shape[:2]
    if in_place:
        if (
            q_rows.shape[2:] != (hkv * GROUP_ROWS, d)
            or group != GROUP_ROWS
            or pos.shape != (4,)
            or q_rows.shape[1] % TILE_TOKENS
        ):
            raise ValueError(
                f"in place, q_rows {q_rows.shape} needs {hkv} groups of exactly {GROUP_ROWS} heads "
                f"(group={group}), a multiple of {TILE_TOKENS} tokens and pos [4], got {pos.shape}"
            )
    else:
        chunk = q_rows.shape[2] // GROUP_ROWS
    reason = supported_mosaic_scoring(q_rows.dtype, d, group, pool)
    if reason is not None:
        raise NotImplementedError(f"Mosaic GPU scoring does not support {reason}")
    if chunk % TILE_TOKENS or (not in_place and q_rows.shape[2] % GROUP_ROWS):
        raise ValueError(f"q_rows {q_rows.shape} needs whole {TILE_TOKENS}-token tiles of {GROUP_ROWS} rows")
    if k1.shape[2] % (PAIR_BLOCKS * pool) or k2.shape[2] % KEY_TILE:
        raise ValueError(
            f"the keys {k1.shape}, {k2.shape} need whole pair tiles ({PAIR_BLOCKS * pool} fine kernels) "
            f"and {KEY_TILE}-key coarse tiles"
        )
    if width < k1.shape[2] // pool + HALO_SHIFT:
        raise ValueError(f"width {width} < {k1.shape[2] // pool} blocks + {HALO_SHIFT}")
    stages = config.stages
    # Per tile: one arrival per query copy of a warpgroup, 8 strided boxes in place, else one.
    q_arrivals = _HEADS_PER_WG if in_place else 1
    q_tiles = 2 if config.persistent else 1  # query (and LSE) buffers
    scratch = (
        (
            plgpu.SMEM((q_tiles, _ROWS, d), q_rows.dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((stages, KEY_TILE, d), q_rows.dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((q_tiles, _ROWS), jnp.float32),
            # Per warpgroup ``store_buffers`` buffers (alternate pair tiles) of pooled maxima and halos,
            # token-major.
            plgpu.SMEM(
                (_COMPUTE_WGS, config.store_buffers, 2, TILE_TOKENS, _HALF_BLOCKS), score_dtype(config)
            ),
        ),
        (
            plgpu.Barrier(num_arrivals=q_arrivals, num_barriers=(q_tiles, _COMPUTE_WGS)),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=2),
            # The stagger barriers (coarse, fine pass): warpgroup 0 arrives, warpgroup 1 waits.
            plgpu.Barrier(num_barriers=2),
        ),
    )
    kernel = functools.partial(
        _persistent_kernel if config.persistent else _kernel,
        n1=n1,
        n2=n2,
        stride=stride,
        group=group,
        pool=pool,
        config=config,
        in_place=in_place,
        forced=forced,
    )
    if config.persistent:
        n_tiles = b * hkv * (chunk // TILE_TOKENS)
        grid, grid_names = (min(n_tiles, persistent_ctas(interpret)),), ("cta",)
    else:
        grid, grid_names = (chunk // TILE_TOKENS, b, hkv), ("tile", "batch", "kv")

    # The profiler names the kernel after this function.
    def infllmv2_select_scores_mgpu_keys(*refs):
        pl.run_scoped(lambda *allocs: kernel(*refs, scratch=allocs), *scratch, collective_axes="wg")

    out = jax.ShapeDtypeStruct((b, hkv, chunk, width), score_dtype(config))
    return plgpu.kernel(
        infllmv2_select_scores_mgpu_keys,
        out_type=(out, out),
        grid=grid,
        grid_names=grid_names,
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(pos, q_rows, k1, k2)
