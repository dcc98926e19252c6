"""Stage-1 scoring of the block selection as a warp-specialised Mosaic GPU kernel (Hopper).

Same contract as the Triton ``selection_triton._score_kernel``: for every query token of a chunk it writes
``body[t, j]`` (the max over block ``j``'s own kernels of the group-summed score) and
``halo[t, j + HALO_SHIFT]`` (the score of block ``j``'s last kernel, part of block ``j + 1``'s pool
window);
the Triton top-k kernel combines them. The per-token score matrix never leaves the SM. Written the
way ``sparse_attention_mgpu``'s forward tile phase is:

- One CTA owns 8 consecutive tokens of the chunk for one (batch row, KV head). Two *compute*
  warpgroups hold 4 tokens x 16 query rows each (the group's heads, zero-padded to 16): 64 rows, the
  WGMMA row count. One *memory* warpgroup TMA-copies 128-key tiles of compressed keys into an SMEM
  ring that both compute warpgroups read: first the coarse tiles, then the fine ones, as far as the
  CTA's last token sees.
- Pass 1 (coarse keys): ``S = Q K2^T`` and an online max / sum per row give the base-2 log-sum-exp
  ``lse``; rows of padding heads, and rows that see no coarse kernel, get ``lse = +inf`` (score 0).
- Pass 2 (fine keys): ``p = exp2(Q K1^T - lse)``, 0 where the kernel is not visible. The sum over the
  group's heads is a second WGMMA, ``E^T P``, with a constant 0/1 matrix ``E^T`` (row ``i`` adds the
  16 rows of token ``i``; rows 4.. are zero) and ``P`` in SMEM in bf16, as the Triton kernel's
  ``"mma"`` group sum rounds it.
- Pooling without moving data between threads: ``permute_fine_keys`` reorders every 128-key tile so
  that kernel ``pool * c + i`` sits at row ``i * 128 / pool + c``. Block ``c``'s kernels are then
  columns ``c, c + 128 / pool, ...`` of the group-summed tile, its max is the elementwise max of
  ``pool`` column slices, and its last kernel (the next block's halo) is the last slice.
- Rows 0..3 of the pooled tiles (the 4 tokens) go to HBM by TMA from SMEM. A TMA store
  whose start in the minor dimension is not 16-byte aligned traps on the H200 (illegal instruction;
  a one-column halo offset did), hence ``HALO_SHIFT``.

128-key steps rather than 64: the per-step costs (two SMEM fences, two MMA waits, two TMA stores)
then cover twice the scores. Three ring slots with one store buffer per warpgroup beat two slots
with two buffers (the store a step waits for was issued a whole step earlier). A FlashAttention-3
ping-pong between the two compute warpgroups was slower with either ring (session-5 notes).

Only bf16/fp16 inputs, head dims 64/128, groups of at most 16 heads and ``block_size / kernel_stride``
in {4, 8} (``supported_mosaic_scoring``).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import SWIZZLED_128B, pl, plgpu
from pallas_kernels.mgpu_sync import wait_last_releases
from pallas_kernels.tiling import DEFAULT_MASK_VALUE, GROUP_ROWS, LOG2E

__all__ = [
    "HALO_SHIFT",
    "KEY_TILE",
    "TILE_TOKENS",
    "MosaicScore",
    "coarse_lse",
    "copy_key_tiles",
    "permute_fine_keys",
    "score_dtype",
    "score_tiles_mgpu",
    "stream_key_tiles",
    "supported_mosaic_scoring",
    "visible_kernels",
]

# Tokens per CTA: two compute warpgroups of 4 tokens x 16 rows each.
TILE_TOKENS = 8
_WG_TOKENS = 4
_ROWS = _WG_TOKENS * GROUP_ROWS
_COMPUTE_WGS = 2
# Compressed keys per ring slot and per step.
KEY_TILE = 128
_SUPPORTED_HEAD_DIMS = (64, 128)
# Column offset of the halo outputs: block j's last kernel is stored at column j + HALO_SHIFT, a whole
# 64 bytes past its block (TMA stores need 16-byte aligned starts).
HALO_SHIFT = 16


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MosaicScore:
    """Launch parameters of the Mosaic GPU scoring kernel (Hopper only).

    Attributes:
      stages: key tiles in flight in the SMEM ring.
      store_buffers: SMEM buffers per warpgroup for the pooled outputs' TMA stores (2: a step's
        stores may still be in flight while the next step fills the other buffer; 1: a step first
        waits for the previous step's stores, which frees the 32 KB that a third ring slot needs at
        head dim 128).
      compute_registers, memory_registers: per-thread register budgets of the compute and memory
        warpgroups (``setmaxnreg``).
      key_rows: score with the keys as the WGMMA rows and sum the group in registers
        (``selection_mgpu_keys``); ``False``: token rows and an ``E^T P`` WGMMA (this module).
      key_rows_from_blocks: with ``key_rows``, ``select_blocks`` still takes the token-rows kernel for
        keys of fewer blocks than this: the keys-as-rows kernel's fine pass works in halves
        of 128-block pair tiles per warpgroup, so on short sequences the partly visible last one
        costs more than the group-sum WGMMA it saves. Session 12 measured the prefill with either
        kernel as fast from 128 blocks (8K tokens at block size 64) and keys as rows faster from 512.
      persistent: one CTA per SM runs a strided share of the tiles: the memory warpgroup loads the
        next tile's query rows into a second buffer and keeps the key ring streaming across tiles, so
        a CTA's start-up and last stores overlap the neighbouring tiles' steps. Keys-as-rows kernel
        only: below ``key_rows_from_blocks`` ``select_blocks`` launches the token-rows kernel with one
        tile per CTA.
      stagger: keys-as-rows kernel only: at the start of each pass (coarse, fine) of a tile, compute
        warpgroup 1 waits until warpgroup 0's first WGMMA of that pass is done, so that one
        warpgroup's exponentials can run while the other's WGMMA does. Without it both start a pass
        together (the LSE exchange lines them up), and a ring step costs about the WGMMAs' time
        plus the exponentials' time (``experiments/scoring_anatomy.py``). The stagger recovers only
        a little of that: 11.33 vs 11.72 ms for the 128K prefill's scoring kernel on the H200
        (``experiments/results/bench_selection_h200_stagger.json``).
      bf16_scores: the pooled block scores (``body``, ``halo``) go to HBM in bfloat16, rounded to
        nearest from the float32 sums, as the official kernel stores its stage-1 scores (SPEC.md
        §4, §13 item 4: rounding is monotonic, so pooling the rounded scores or rounding the pooled
        ones is the same); half the bytes to write and for the top-k to read, whose bitwise search
        then takes at most 16 passes (128K prefill on the H200: 0.47 ms faster,
        ``experiments/results/bench_selection_h200_bf16_scores.json``). ``False``: float32.
    """

    stages: int = 3
    store_buffers: int = 1
    compute_registers: int = 232
    memory_registers: int = 40
    key_rows: bool = True
    key_rows_from_blocks: int = 128
    persistent: bool = False
    stagger: bool = True
    bf16_scores: bool = True

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"MosaicScore.stages must be >= 1, got {self.stages}")
        if self.key_rows_from_blocks < 0:
            raise ValueError(
                f"MosaicScore.key_rows_from_blocks must be >= 0, got {self.key_rows_from_blocks}"
            )
        if self.store_buffers not in (1, 2):
            raise ValueError(f"MosaicScore.store_buffers must be 1 or 2, got {self.store_buffers}")
        if self.persistent and not self.key_rows:
            raise ValueError("MosaicScore.persistent needs the keys-as-rows kernel (key_rows=True)")


def score_dtype(config: MosaicScore):
    """dtype of the Mosaic scoring kernels' pooled outputs (``MosaicScore.bf16_scores``)."""
    return jnp.bfloat16 if config.bf16_scores else jnp.float32


def supported_mosaic_scoring(dtype, head_dim: int, group: int, pool: int) -> str | None:
    """Why ``score_tiles_mgpu`` cannot score these inputs, or ``None``."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (the Mosaic scoring kernel needs bfloat16 or float16)"
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} (supported: {_SUPPORTED_HEAD_DIMS})"
    if group > GROUP_ROWS:
        return f"GQA group {group} > {GROUP_ROWS}"
    if pool not in (4, 8):
        # Smaller pools need 64- or 128-column output buffers: more SMEM than an SM has.
        return f"block_size / kernel_stride = {pool} (supported: 4, 8)"
    return None


def visible_kernels(t, size: int, step: int, n: int):
    """Number of kernels ``c < n`` whose window ``[step*c, step*c + size)`` ends at or before ``t``."""
    return jnp.minimum(lax.div(jnp.maximum(t + 1 - size + step, 0), step), n)


def coarse_lse(raw_scores, *, t_row, t_first, n2: int, n2_tiles, stride: int, qk_scale: float, valid_rows):
    """Pass 1 of the scoring kernels: the online base-2 log-sum-exp of 64 query rows over the coarse
    keys. Steps every row sees entirely skip the mask.

    Args:
      raw_scores: ``j -> [64, 128]`` float32 ``Q K2^T`` of coarse ring step ``j`` (WGMMA layout,
        unscaled).
      t_row: ``[64, 128]`` int32 (WGMMA layout): each row's key position; t_first: the smallest.
      n2, n2_tiles: coarse kernels, and the ring steps to run over them.
      stride: the fine kernel stride (coarse kernels: 4x, sizes 2x the strides).
      qk_scale: ``log2(e) / sqrt(D)``.
      valid_rows: ``[64]`` bool: rows of real heads.

    Returns:
      ``[64]`` float32 (WGMMA row layout): the LSE, ``+inf`` for a row that sees no coarse key or
      is not valid (its fine scores are then 0).

    Session 22 tried keeping the max and sum per row and column class ``c % 8`` (reduced in each
    thread's registers, the exchange between a row's 4 threads once per tile instead of twice per
    step): no measurable gain on the H200 (128K prefill 49.92 vs 50.01 ms smooth, 78.63 vs 78.84
    random, scoring kernel 11.77 vs 11.51 and 12.68 vs 12.75 ms,
    ``experiments/results/bench_selection_h200_coarse_partials.json``), so the simpler row-wise
    reduction stays.
    """
    layout = plgpu.Layout.WGMMA
    row_layout = layout.reduce(1)
    size2, stride2 = 8 * stride, 4 * stride
    col = plgpu.broadcasted_iota(jnp.int32, (64, KEY_TILE), 1, layout=layout)
    n_all = jnp.minimum(lax.div(visible_kernels(t_first, size2, stride2, n2), KEY_TILE), n2_tiles)

    def step(j, carry, masked):
        m, l = carry
        s = raw_scores(j) * qk_scale
        if masked:
            s = jnp.where((j * KEY_TILE + col) * stride2 + size2 <= t_row + 1, s, DEFAULT_MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        return m_new, l * jnp.exp2(m - m_new) + p.sum(axis=1)

    m = plgpu.layout_cast(jnp.full((64,), DEFAULT_MASK_VALUE, jnp.float32), row_layout)
    l = plgpu.layout_cast(jnp.zeros((64,), jnp.float32), row_layout)
    carry = lax.fori_loop(0, n_all, functools.partial(step, masked=False), (m, l))
    m, l = lax.fori_loop(n_all, n2_tiles, functools.partial(step, masked=True), carry)
    # A row that saw no coarse key (m still at the mask value) or a padding head scores 0.
    ok = (m > 0.5 * DEFAULT_MASK_VALUE) & valid_rows
    return jnp.where(ok, m + jnp.log2(jnp.where(ok, l, 1.0)), jnp.inf)


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


def permute_fine_keys(k1: jax.Array, pool: int, blocks: int | None = None) -> jax.Array:
    """Reorders every tile of ``blocks * pool`` kernels so that kernel ``pool * c + i`` lands at row
    ``i * blocks + c``.

    Args:
      k1: ``[B, H, n_pad, D]`` fine compressed keys, ``n_pad`` a multiple of ``blocks * pool``.
      pool: kernels per block; blocks: blocks per tile (default ``KEY_TILE / pool``: one ring slot of
        ``score_tiles_mgpu``).

    Returns:
      The same keys, permuted inside each tile.
    """
    b, h, n, d = k1.shape
    blocks = KEY_TILE // pool if blocks is None else blocks
    return k1.reshape(b, h, n // (blocks * pool), blocks, pool, d).swapaxes(3, 4).reshape(b, h, n, d)


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
):
    """One CTA: warpgroups 0 and 1 score tokens ``4w .. 4w + 3`` of tile ``tile``, warpgroup 2 streams
    the keys (refs and shapes as in ``score_tiles_mgpu``)."""
    (q_smem, ring, p_smem, et_smem, out_smem), (q_bar, k_bar, k_free) = scratch
    tile, b, h = lax.axis_index("tile"), lax.axis_index("batch"), lax.axis_index("kv")
    wg = lax.axis_index("wg")
    stages = config.stages
    head_dim = q_smem.shape[-1]
    size1, size2, stride2 = 2 * stride, 8 * stride, 4 * stride  # kernel sizes are 2x the strides
    per_tile = KEY_TILE // pool  # blocks per fine tile
    t_end = pos_ref[1]
    cta_last = jnp.minimum(pos_ref[0] + tile * TILE_TOKENS + TILE_TOKENS - 1, t_end)
    n2_tiles = _cdiv(visible_kernels(cta_last, size2, stride2, n2), KEY_TILE)
    n1_tiles = _cdiv(visible_kernels(cta_last, size1, stride, n1), KEY_TILE)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(config.compute_registers, action="increase")
        tok0 = tile * TILE_TOKENS + wg * _WG_TOKENS  # first chunk token of this warpgroup
        my_q, my_p, my_et = q_smem.at[wg], p_smem.at[wg], et_smem.at[wg]
        if in_place:
            # The whole query [B, T, Hkv * 16, D]: each token's group is 16 consecutive heads; tokens
            # past the last one repeat it.
            q_bars = [q_bar.at[wg * _WG_TOKENS + i] for i in range(_WG_TOKENS)]
            for i, bar in enumerate(q_bars):
                token = jnp.minimum(pos_ref[2] + tok0 + i, pos_ref[3])
                plgpu.copy_gmem_to_smem(
                    q_ref.at[b, token, pl.ds(h * GROUP_ROWS, GROUP_ROWS)],
                    my_q.at[pl.ds(i * GROUP_ROWS, GROUP_ROWS)],
                    bar,
                )
        else:
            q_bars = [q_bar.at[wg]]
            plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(tok0 * GROUP_ROWS, _ROWS)], my_q, q_bars[0])

        layout = plgpu.Layout.WGMMA
        row = plgpu.broadcasted_iota(jnp.int32, (_ROWS, KEY_TILE), 0, layout=layout)
        col = plgpu.broadcasted_iota(jnp.int32, (_ROWS, KEY_TILE), 1, layout=layout)
        # E^T: output row i sums the 16 query rows of token i.
        et_row = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _ROWS), 0, layout=layout)
        et_col = plgpu.broadcasted_iota(jnp.int32, (_ROWS, _ROWS), 1, layout=layout)
        my_et[...] = (et_col // GROUP_ROWS == et_row).astype(my_et.dtype)
        plgpu.commit_smem()
        t_first = jnp.minimum(pos_ref[0] + tok0, t_end)
        t_row = jnp.minimum(pos_ref[0] + tok0 + row // GROUP_ROWS, t_end)
        row_layout = layout.reduce(1)
        head = plgpu.broadcasted_iota(jnp.int32, (_ROWS,), 0, layout=row_layout) % GROUP_ROWS
        qk_scale = head_dim**-0.5 * LOG2E
        for bar in q_bars:
            plgpu.barrier_wait(bar)

        def scores(j):
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, my_q, ring.at[slot].T)
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((_ROWS, KEY_TILE), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            return s

        # Pass 1: log-sum-exp over the coarse keys.
        lse = coarse_lse(
            scores,
            t_row=t_row,
            t_first=t_first,
            n2=n2,
            n2_tiles=n2_tiles,
            stride=stride,
            qk_scale=qk_scale,
            valid_rows=head < group,
        )

        # Pass 2: p over the fine keys, group sums by E^T P, pooled by column slices.
        kernel_in_tile = (col % per_tile) * pool + col // per_tile  # permute_fine_keys' order

        def fine(jt, carry, masked):
            s = scores(n2_tiles + jt) * qk_scale
            p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
            if masked:
                visible = (jt * KEY_TILE + kernel_in_tile) * stride + size1 <= t_row + 1
                p = jnp.where(visible, p, 0.0)
            my_p[...] = p.astype(my_p.dtype)
            plgpu.commit_smem()

            def group_sum(acc_ref):
                plgpu.wgmma(acc_ref, my_et, my_p)
                return acc_ref[...]

            sums = pl.run_scoped(group_sum, plgpu.ACC((_ROWS, KEY_TILE), jnp.float32))
            parts = [sums[:, i * per_tile : (i + 1) * per_tile] for i in range(pool)]
            buffers = config.store_buffers
            buf = out_smem.at[wg, lax.rem(jt, buffers)]
            # The stores that last read this buffer (``buffers`` steps ago) must be done; with two
            # buffers the previous step's two may still be in flight.
            plgpu.wait_smem_to_gmem(2 * (buffers - 1), wait_read_only=True)
            buf.at[0][...] = functools.reduce(jnp.maximum, parts).astype(score_dtype(config))
            buf.at[1][...] = parts[-1].astype(score_dtype(config))
            plgpu.commit_smem()
            tokens = pl.ds(tok0, _WG_TOKENS)
            plgpu.copy_smem_to_gmem(
                buf.at[0, pl.ds(0, _WG_TOKENS)], body_ref.at[b, h, tokens, pl.ds(jt * per_tile, per_tile)]
            )
            plgpu.copy_smem_to_gmem(
                buf.at[1, pl.ds(0, _WG_TOKENS)],
                halo_ref.at[b, h, tokens, pl.ds(jt * per_tile + HALO_SHIFT, per_tile)],
            )
            return carry

        n1_all = jnp.minimum(lax.div(visible_kernels(t_first, size1, stride, n1), KEY_TILE), n1_tiles)
        lax.fori_loop(0, n1_all, functools.partial(fine, masked=False), 0)
        lax.fori_loop(n1_all, n1_tiles, functools.partial(fine, masked=True), 0)
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == _COMPUTE_WGS)(
        functools.partial(
            stream_key_tiles,
            (k2_ref.at[b, h], k1_ref.at[b, h]),
            (ring, k_bar, k_free),
            n2_tiles=n2_tiles,
            total=n2_tiles + n1_tiles,
            registers=config.memory_registers,
        )
    )


def stream_key_tiles(keys, smem, *, n2_tiles, total, registers):
    """The memory warpgroup of a one-tile-per-CTA scoring kernel (this module's or
    ``selection_mgpu_keys``'): ``copy_key_tiles``, then waits until the ring is released.

    Args:
      keys: ``(coarse, fine)`` GMEM refs ``[n_pad, D]`` of one (batch row, KV head).
      smem: the ring ``[stages, 128, D]``, its arrival and its release barriers.
      n2_tiles, total: coarse tiles, and all tiles.
      registers: the memory warpgroup's register budget.
    """
    plgpu.set_max_registers(registers, action="decrease")
    copy_key_tiles(keys, smem, n2_tiles=n2_tiles, total=total, base=0)
    wait_last_releases((smem[2],), total, smem[0].shape[0])


def copy_key_tiles(keys, smem, *, n2_tiles, total, base):
    """Copies ``n2_tiles`` 128-key tiles of coarse keys, then ``total - n2_tiles`` of fine ones: tile
    ``j`` is the CTA's ring step ``base + j``, which goes into slot ``(base + j) % stages`` once both
    compute warpgroups released the step that held it (arguments as in ``stream_key_tiles``)."""
    (coarse_keys, fine_keys), (ring, k_bar, k_free) = keys, smem
    stages = ring.shape[0]

    @pl.loop(0, total)
    def _(j):
        slot = lax.rem(base + j, stages)

        @pl.when(base + j >= stages)
        def _():
            plgpu.barrier_wait(k_free.at[slot])

        @pl.when(j < n2_tiles)
        def _():
            tile = pl.ds(pl.multiple_of(j * KEY_TILE, KEY_TILE), KEY_TILE)
            plgpu.copy_gmem_to_smem(coarse_keys.at[tile], ring.at[slot], k_bar.at[slot])

        @pl.when(j >= n2_tiles)
        def _():
            tile = pl.ds(pl.multiple_of((j - n2_tiles) * KEY_TILE, KEY_TILE), KEY_TILE)
            plgpu.copy_gmem_to_smem(fine_keys.at[tile], ring.at[slot], k_bar.at[slot])


def score_tiles_mgpu(
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
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pooled stage-1 scores of one query chunk (``selection_triton._score_kernel``'s outputs).

    Args:
      pos: ``[2]`` int32: key position of the chunk's first query and of the sequence's last one;
        with ``chunk``, ``[4]``: these, then the index in ``q_rows`` of the chunk's first token and of
        the last token.
      q_rows: ``[B, Hkv, C * 16, D]`` bf16/fp16 chunk queries, row ``t * 16 + g`` (heads ``g >= group``
        are zero padding); ``C`` a multiple of 8. With ``chunk``: the whole query ``[B, T, Hkv * 16,
        D]`` (``group`` = 16), read in place, so no chunk copy is made; tokens past ``pos[3]`` repeat
        it.
      k1: ``[B, Hkv, n1_pad, D]`` fine compressed keys in ``permute_fine_keys`` order, zero rows past
        ``n1``; ``k2``: ``[B, Hkv, n2_pad, D]`` coarse ones; both paddings multiples of 128.
      n1, n2: numbers of fine / coarse kernels; stride: the fine kernel stride (coarse: 4x).
      group: query heads per KV head; pool: fine kernels per block (``block_size / stride``).
      width: columns of the outputs (at least ``nb_pad + HALO_SHIFT``, a multiple of 4).
      config: launch parameters.
      chunk: ``C`` (a multiple of 8) when ``q_rows`` is the whole query.
      interpret: run in the Mosaic GPU interpreter (CPU tests).

    Returns:
      ``body, halo [B, Hkv, C, width]`` float32 (bfloat16 with ``config.bf16_scores``); columns of
      blocks the token cannot see are unspecified.
    """
    if config.key_rows:
        raise ValueError(
            "MosaicScore(key_rows=True) is score_tiles_mgpu_keys' configuration, not this kernel's"
        )
    in_place = chunk is not None
    d = q_rows.shape[-1]
    b, hkv = k1.shape[:2]
    if in_place:
        if q_rows.shape[2] != hkv * GROUP_ROWS or group != GROUP_ROWS or pos.shape != (4,):
            raise ValueError(
                f"in place, q_rows {q_rows.shape} needs {hkv} groups of exactly {GROUP_ROWS} heads "
                f"(group={group}) and pos [4], got {pos.shape}"
            )
    else:
        chunk = q_rows.shape[2] // GROUP_ROWS
    reason = supported_mosaic_scoring(q_rows.dtype, d, group, pool)
    if reason is not None:
        raise NotImplementedError(f"Mosaic GPU scoring does not support {reason}")
    if chunk % TILE_TOKENS or (not in_place and q_rows.shape[2] % GROUP_ROWS):
        raise ValueError(f"q_rows {q_rows.shape} needs whole {TILE_TOKENS}-token tiles of {GROUP_ROWS} rows")
    if k1.shape[2] % KEY_TILE or k2.shape[2] % KEY_TILE:
        raise ValueError(f"the keys {k1.shape}, {k2.shape} need whole {KEY_TILE}-key tiles")
    stages = config.stages
    per_tile = KEY_TILE // pool
    scratch = (
        (
            plgpu.SMEM((_COMPUTE_WGS, _ROWS, d), q_rows.dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((stages, KEY_TILE, d), q_rows.dtype, transforms=SWIZZLED_128B),
            plgpu.SMEM((_COMPUTE_WGS, _ROWS, KEY_TILE), jnp.bfloat16, transforms=SWIZZLED_128B),
            plgpu.SMEM((_COMPUTE_WGS, _ROWS, _ROWS), jnp.bfloat16, transforms=SWIZZLED_128B),
            # Per warpgroup ``store_buffers`` buffers (alternate steps) of pooled maxima and halos.
            plgpu.SMEM((_COMPUTE_WGS, config.store_buffers, 2, _ROWS, per_tile), score_dtype(config)),
        ),
        (
            # The queries: one copy per warpgroup, or one per token in place.
            plgpu.Barrier(num_barriers=_COMPUTE_WGS * (_WG_TOKENS if in_place else 1)),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
        ),
    )
    kernel = functools.partial(
        _kernel, n1=n1, n2=n2, stride=stride, group=group, pool=pool, config=config, in_place=in_place
    )

    # The profiler names the kernel after this function.
    def infllmv2_select_scores_mgpu(*refs):
        pl.run_scoped(lambda *allocs: kernel(*refs, scratch=allocs), *scratch, collective_axes="wg")

    out = jax.ShapeDtypeStruct((b, hkv, chunk, width), score_dtype(config))
    return plgpu.kernel(
        infllmv2_select_scores_mgpu,
        out_type=(out, out),
        grid=(chunk // TILE_TOKENS, b, hkv),
        grid_names=("tile", "batch", "kv"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(pos, q_rows, k1, k2)
