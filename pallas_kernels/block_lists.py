"""The sparse attention's tile and token lists, built in a Pallas kernel from the top-k's selection masks.

``tiling.tile_lists`` builds the lists in XLA from the tokens' sorted block ids: one row-wise sort of
each tile's (block, token) pairs, then prefix-sum compactions and scatters, dozens of small kernels
(~3 ms at 128K on the H200, ~0.5 ms at 16K with the launch gaps). The selection's top-k already
holds every token's choice as a dense mask over block columns, so it can write that mask
(``int32 [T, columns]``, 1 where the token kept the block) and one program per tile can read its
tokens' rows column block by column block, ascending:

- a column's token bits are ``sum_r mask[r] << r`` and its share the column sum;
- columns chosen by at least ``min_share`` of the tile's tokens get the next tile-list slots (a
  prefix sum over the shared flags), the other chosen ones the next slots of their tokens' lists;
- with ``half_order`` (``BlockSizes.half_order``, the Hopper default) one prefix sum of three packed
  counts puts the shared columns in their halves' groups (first half only, both, second half only);
  a group starts after the groups before it, so a row walked in several steps is walked twice (the
  first walk counts the groups). On the H200 at 128K the widest launch took 0.69 ms with two walks of
  512-column steps, against 1.08 for whole rows in one walk and 0.59 for ascending lists in one walk
  of the same steps (``bench_selection_h200_two_walks.json``, smooth q/k).

The lists come out in ``tile_lists``' order (ascending, or ascending within each half group), and
equal them entry for entry for canonical inputs (tests compare both). Only tilings without ``mask_split`` (no
mask-free group ahead of the rest; every shipped tiling) and with a tile phase are built here.

On the H200 (``experiments/results/bench_selection_h200_fused_lists*.json``, same runs): the list
kernel takes 1.2 ms at 128K and 0.04 ms at 16K, and the prefill drops from 58.73 to 56.76 ms at 128K
and from 4.34 to 3.85 ms at 16K (smooth inputs); other launch parameters were no faster
(``bench_selection_h200_list_kernel_variants.json``).
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import pl, pltriton, triton_params
from pallas_kernels.tiling import EMPTY_BLOCK, BlockSizes, TileLists, half_groups, next_pow2, round_up

__all__ = ["ListTiling", "list_tiling", "lists_from_masks", "stack_chunk_lists"]


@dataclasses.dataclass(frozen=True, slots=True)
class ListTiling:
    """What ``lists_from_masks`` needs of the attention's ``BlockSizes`` (static, hashable).

    Attributes:
      tile_tokens: tokens per tile; min_share: tokens of a tile that must share a block for the tile
        phase; align: ``Tp`` is ``T`` rounded up to a multiple of this; half_order: order the tile
        lists by the halves of the tile that chose each entry (``BlockSizes.half_order``).
    """

    tile_tokens: int
    min_share: int
    align: int
    half_order: bool = False


def list_tiling(config: BlockSizes) -> ListTiling | None:
    """The tiling ``lists_from_masks`` needs from ``config``, or ``None`` when it cannot build its lists
    (no tile phase, or ``mask_split``: ``tile_lists`` then puts mask-free entries first)."""
    if config.tile_tokens == 0 or config.mask_split:
        return None
    return ListTiling(config.tile_tokens, config.min_share, config.align, config.half_order)


def _half_group(bits, tq: int):
    """``BlockSizes.half_order``'s group of each column: 0 if only tokens of the tile's first half
    chose it, 1 if both halves did, 2 if only the second half did (``bits``: token ``i`` is bit ``i``)."""
    first_half, second_half = half_groups(bits, tq)
    return jnp.where(second_half, jnp.where(first_half, 1, 2), 0)


def _group_ranks(group, shared, n_groups: int, lp: int):
    """Inclusive rank ``[1, step]`` of each shared column among the step's shared columns of its group,
    and the step's count of each group (``[1, 1]`` each).

    A group holds fewer than ``lp`` entries, so while ``n_groups`` counts of ``log2(lp)`` bits fit in
    32 bits one prefix sum of ``1 << (group * width)`` ranks every group at once (int32 wraps, and
    logical shifts read the top field back); else one prefix sum per group.
    """
    if n_groups == 1:
        flags = shared.astype(jnp.int32)
        return jnp.cumsum(flags, axis=1), (jnp.sum(flags, axis=1, keepdims=True),)
    width = (lp - 1).bit_length()
    if n_groups * width <= 32:
        field = (1 << width) - 1
        one_hot = jnp.where(shared, lax.shift_left(1, group * width), 0)
        totals = jnp.sum(one_hot, axis=1, keepdims=True)
        counts = tuple(lax.shift_right_logical(totals, g * width) & field for g in range(n_groups))
        rank = lax.shift_right_logical(jnp.cumsum(one_hot, axis=1), group * width) & field
        return rank, counts
    members = [(shared & (group == g)).astype(jnp.int32) for g in range(n_groups)]
    rank = sum(jnp.where(group == g, jnp.cumsum(m, axis=1), 0) for g, m in enumerate(members))
    return rank, tuple(jnp.sum(m, axis=1, keepdims=True) for m in members)


def _lists_kernel(
    pos_ref,
    mask_ref,
    tile_ids_ref,
    tile_bits_ref,
    tile_cnt_ref,
    token_ids_ref,
    token_cnt_ref,
    *,
    tq: int,
    step: int,
    min_share: int,
    block_size: int,
    half_order: bool,
):
    """One tile of ``tq`` tokens (leading batch / KV-head dims squeezed).

    The tile list is a sequence of groups (one, or ``half_order``'s three), each ascending: a shared
    column's slot is its group's start (the counts of the groups before it) plus the group's entries
    of earlier steps plus its rank in this step. With several groups over several steps, a first walk
    over the steps counts the groups; in one step, the step's own counts are the totals.

    Refs:
      pos_ref: ``[2]`` int32: key position of the chunk's first token and of the sequence's last one.
      mask_ref: ``[tq, cols]`` int8/int32 selection masks (0 past each token's own block).
      tile_ids_ref, tile_bits_ref: ``[1, Lp]`` int32 out, ``Lp > tq * K``; slot ``Lp - 1`` is scratch
        for the masked scatters.
      tile_cnt_ref: ``[1, 2]``; token_ids_ref: ``[tq, Kp]``, ``Kp > K``; token_cnt_ref: ``[tq, 2]``.
    """
    lp, kp = tile_ids_ref.shape[-1], token_ids_ref.shape[-1]
    cols = mask_ref.shape[-1]
    first = pos_ref[0] + pl.program_id(0) * tq
    # Columns past the tile's last own block are 0 in every row: the walk stops there.
    last_block = lax.div(jnp.minimum(first + tq - 1, pos_ref[1]), block_size)
    n_steps = jnp.minimum(lax.div(last_block + step, step), cols // step)
    row = lax.broadcasted_iota(jnp.int32, (tq, 1), 0)
    tile_row = jnp.zeros((1, step), jnp.int32)
    token_rows = jnp.broadcast_to(row, (tq, step))
    n_groups = 3 if half_order else 1
    zeros = tuple(jnp.zeros((1, 1), jnp.int32) for _ in range(n_groups))

    def columns(i):
        """Step ``i``'s block ids ``[1, step]``, masks ``[tq, step]``, token bits, shared flags and groups."""
        block = i * step + lax.broadcasted_iota(jnp.int32, (1, step), 1)
        chosen = pltriton.load(mask_ref.at[:, pl.ds(i * step, step)]).astype(jnp.int32)
        bits = jnp.sum(lax.shift_left(chosen, row), axis=0, keepdims=True)
        shared = jnp.sum(chosen, axis=0, keepdims=True) >= min_share
        group = _half_group(bits, tq) if half_order else jnp.zeros_like(bits)
        return block, chosen, bits, shared, group

    def count(i, totals):
        _, _, _, shared, group = columns(i)
        return tuple(
            t + jnp.sum((shared & (group == g)).astype(jnp.int32), axis=1, keepdims=True)
            for g, t in enumerate(totals)
        )

    totals = lax.fori_loop(0, n_steps, count, zeros) if n_groups > 1 and step < cols else None

    def body(i, carry):
        runs, n_token = carry  # per group [1, 1]; [tq, 1]
        block, chosen, bits, shared, group = columns(i)
        rank, counts = _group_ranks(group, shared, n_groups, lp)
        ends = list(itertools.accumulate(counts if totals is None else totals))
        base = runs[0]
        for g in range(1, n_groups):
            base = jnp.where(group == g, ends[g - 1] + runs[g], base)
        slot = jnp.where(shared, base + rank - 1, lp - 1)
        pltriton.store(tile_ids_ref.at[tile_row, slot], block, mask=shared)
        pltriton.store(tile_bits_ref.at[tile_row, slot], bits, mask=shared)
        own = (chosen > 0) & ~shared
        token_slot = jnp.where(own, n_token + jnp.cumsum(own.astype(jnp.int32), axis=1) - 1, kp - 1)
        pltriton.store(
            token_ids_ref.at[token_rows, token_slot], jnp.broadcast_to(block, (tq, step)), mask=own
        )
        return (
            tuple(r + c for r, c in zip(runs, counts, strict=True)),
            n_token + jnp.sum(own.astype(jnp.int32), axis=1, keepdims=True),
        )

    runs, n_token = lax.fori_loop(0, n_steps, body, (zeros, jnp.zeros((tq, 1), jnp.int32)))
    n_tile = sum(runs)
    tile_slot = lax.broadcasted_iota(jnp.int32, (1, lp), 1)
    pltriton.store(tile_ids_ref, jnp.zeros((1, lp), jnp.int32), mask=tile_slot >= n_tile)
    pltriton.store(tile_bits_ref, jnp.zeros((1, lp), jnp.int32), mask=tile_slot >= n_tile)
    token_slot = lax.broadcasted_iota(jnp.int32, (tq, kp), 1)
    pltriton.store(token_ids_ref, jnp.full((tq, kp), EMPTY_BLOCK, jnp.int32), mask=token_slot >= n_token)
    # Second columns: the mask-free counts, always 0 without mask_split.
    first_col = lax.broadcasted_iota(jnp.int32, (1, 2), 1) == 0
    tile_cnt_ref[...] = jnp.where(first_col, n_tile, 0)
    token_cnt_ref[...] = jnp.where(jnp.broadcast_to(first_col, (tq, 2)), n_token, 0)


def lists_from_masks(
    pos: jax.Array,
    mask: jax.Array,
    *,
    tiling: ListTiling,
    num_selected: int,
    block_size: int,
    step_elems: int = 4096,
    warps: int = 4,
    stages: int = 1,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Tile and token lists of one query chunk from its selection masks.

    Args:
      pos: ``[2]`` int32: key position of the chunk's first token and of the sequence's last token.
      mask: ``[B, Hkv, C, cols]`` int8 or int32, 1 where a token kept a block (none past its own block, none
        for tokens past the sequence); ``C`` a multiple of ``tiling.tile_tokens``, ``cols`` a power of
        two.
      tiling: the attention's tiling (``list_tiling``).
      num_selected: ``K``, the most blocks a token keeps.
      block_size: tokens per key block.
      step_elems: mask elements (tile rows x columns) a program reads per step, in registers (with
        ``tiling.half_order`` and more than one step per row, the program reads each step twice).
      warps, stages: Triton launch parameters.
      interpret: run in the Pallas interpreter (CPU).

    Returns:
      ``tile_ids, tile_bits [B, Hkv, C / tq, Lp]``, ``tile_cnt [B, Hkv, C / tq, 2]``,
      ``token_ids [B, Hkv, C, Kp]``, ``token_cnt [B, Hkv, C, 2]`` int32 (``tq`` tile tokens,
      ``Lp > tq * K`` and ``Kp > K`` powers of two; ``stack_chunk_lists`` trims them).
    """
    b, hkv, chunk, cols = mask.shape
    tq = tiling.tile_tokens
    if chunk % tq or cols & (cols - 1):
        raise ValueError(f"masks {mask.shape}: need whole {tq}-token tiles and a power-of-two width")
    lp, kp = next_pow2(tq * num_selected + 1), next_pow2(num_selected + 1)
    step = min(cols, max(step_elems // tq, 16))
    n_tiles = chunk // tq

    def tile_spec(width):
        return pl.BlockSpec((None, None, 1, width), lambda i, bi, h: (bi, h, i, 0))

    def token_spec(width):
        return pl.BlockSpec((None, None, tq, width), lambda i, bi, h: (bi, h, i, 0))

    def shape(rows, width):
        return jax.ShapeDtypeStruct((b, hkv, rows, width), jnp.int32)

    return pl.pallas_call(
        functools.partial(
            _lists_kernel,
            tq=tq,
            step=step,
            min_share=tiling.min_share,
            block_size=block_size,
            half_order=tiling.half_order,
        ),
        grid=(n_tiles, b, hkv),
        in_specs=[pl.BlockSpec((2,), lambda i, bi, h: (0,)), token_spec(cols)],
        out_specs=[tile_spec(lp), tile_spec(lp), tile_spec(2), token_spec(kp), token_spec(2)],
        out_shape=[
            shape(n_tiles, lp),
            shape(n_tiles, lp),
            shape(n_tiles, 2),
            shape(chunk, kp),
            shape(chunk, 2),
        ],
        compiler_params=triton_params(warps, stages),
        interpret=interpret,
        name="infllmv2_block_lists",
    )(pos, mask)


def stack_chunk_lists(
    chunks: tuple[jax.Array, ...], *, tiling: ListTiling, num_selected: int, seq_len: int
) -> TileLists:
    """Joins the per-chunk outputs of ``lists_from_masks`` (stacked on a leading chunk axis) into the
    ``TileLists`` of the ``Tp = round_up(seq_len, align)`` tokens that ``sparse_attention`` tiles."""
    tq = tiling.tile_tokens
    tp = round_up(seq_len, tiling.align)

    def join(x, rows, width):
        n, b, h, per_chunk, w = x.shape
        x = x.transpose(1, 2, 0, 3, 4).reshape(b, h, n * per_chunk, w)
        if n * per_chunk < rows:
            raise ValueError(f"the chunks cover {n * per_chunk} rows, fewer than {rows}")
        return x[:, :, :rows, :width]

    tile_ids, tile_bits, tile_cnt, token_ids, token_cnt = chunks
    k_tile = tq * num_selected
    lists = TileLists(
        join(tile_ids, tp // tq, k_tile),
        join(tile_bits, tp // tq, k_tile),
        join(tile_cnt, tp // tq, 2),
        join(token_ids, tp, num_selected),
        join(token_cnt, tp, 2),
    )
    if tiling.min_share == 1:  # a pure union: no token phase (``tile_lists`` returns no token lists)
        return lists._replace(token_ids=None, token_cnt=None)
    return lists
