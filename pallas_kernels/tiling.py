"""Tiling configuration of the block-sparse attention kernels and the block lists they read.

``BlockSizes`` (and ``MosaicTile``) choose how ``sparse_attention`` splits each token's selected
blocks between the tile phase (blocks shared by several tokens of a tile, on ``tile_tokens * 16``
rows) and the token phase (each token's remaining blocks, 16 rows). ``canonical_blocks`` and
``tile_lists`` build that split in XLA, outside the kernels: one row-wise sort of each tile's
(block, token) pairs, and prefix-sum compactions instead of further sorts.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "DEFAULT_MASK_VALUE",
    "EMPTY_BLOCK",
    "GROUP_ROWS",
    "LOG2E",
    "BlockSizes",
    "MosaicDkdv",
    "MosaicTile",
    "TileLists",
    "canonical_blocks",
    "half_groups",
    "next_pow2",
    "persistent_ctas",
    "round_up",
    "tile_lists",
]

# Finite, so that fully masked rows never compute (-inf) - (-inf) = NaN in the online softmax.
DEFAULT_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Id of an unused slot after canonicalisation: larger than any block id, so it sorts last.
EMPTY_BLOCK = 1 << 30
# Query rows per token: the KV group's heads, padded to the 16-row tensor-core minimum.
GROUP_ROWS = 16
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MosaicTile:
    """Launch parameters of a Mosaic GPU tile phase (forward: ``sparse_attention_mgpu``; dQ:
    ``sparse_attention_mgpu_bwd``; Hopper only).

    Attributes:
      stages: K/V SMEM ring slots (blocks in flight); the dQ kernel's fp32 staging buffers leave room
        for two at head dim 128.
      pingpong: alternate the two compute warpgroups on the tensor cores (FlashAttention-3 schedule;
        forward only).
      skip_unselected: a warpgroup skips the math of blocks none of its 4 tokens selected.
      unmasked_path: blocks that all 4 tokens of a warpgroup selected and see entirely run without
        any mask.
      row_masks: a block wholly before the warpgroup's 4 tokens (any block but their own) hides
        itself from the rows of the tokens that did not select it through the softmax's row
        statistics: such a row sees all of the block's keys or none, so no score needs a mask. Off:
        these blocks mask every score.
      blocks_per_step: list entries per ring slot and softmax round: 1 (64-key steps) or 2 (128-key
        steps; forward only).
      persistent: one CTA per SM, each running a strided share of the tiles, so that a tile's list,
        query rows and first K/V blocks load during the previous tile's last steps and epilogue
        (forward only).
      dynamic: with ``persistent``, the CTAs take the tiles in launch order from an atomic counter
        (each its next one when it starts loading one) instead of tile ``c, c + C, ...`` to CTA ``c``:
        a CTA whose tiles ran long takes fewer, so the launch ends with less idle SM time. Compiled
        kernels only: the Mosaic GPU interpreter cannot run the atomic and keeps the strided order.
        Off by default: on the H200 it halved the 128K forward launches' idle tail (1.5% -> 0.7% of
        their SM time, ``experiments/cta_balance.py``) and the GPU span of the 128K prefill was
        0.13-0.17 ms shorter in two paired runs, but its timed medians were not, and the 16K tile
        kernel took 2-3.5% longer (``experiments/results/NOTES_attention_kernels.md``, session 18).
      compute_registers, memory_registers: per-thread register budgets of the compute and memory
        warpgroups (``setmaxnreg``).
    """

    stages: int = 2
    pingpong: bool = False
    skip_unselected: bool = True
    unmasked_path: bool = True
    row_masks: bool = True
    blocks_per_step: int = 1
    persistent: bool = False
    dynamic: bool = False
    compute_registers: int = 232
    memory_registers: int = 40

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.blocks_per_step not in (1, 2):
            raise ValueError(f"blocks_per_step must be 1 or 2, got {self.blocks_per_step}")
        if self.dynamic and not self.persistent:
            raise ValueError("dynamic hands out the tiles of a persistent launch: it needs persistent=True")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MosaicDkdv:
    """Launch parameters of the Mosaic GPU dK/dV kernel (``sparse_attention_mgpu_bwd``, Hopper only).

    Attributes:
      stages: Q/dO SMEM ring slots per compute warpgroup (4-token steps in flight); at head dim 128
        two fill the 227 KB of shared memory.
      compute_registers, memory_registers: per-thread register budgets of the compute and memory
        warpgroups (``setmaxnreg``).
    """

    stages: int = 2
    compute_registers: int = 240
    memory_registers: int = 24

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BlockSizes:
    """Tiling and launch parameters (all static).

    Attributes:
      tile_tokens: consecutive tokens per tile of the tile phase (``tile_tokens * 16`` rows); 0
        disables the tile phase (plain per-token kernel). At most 16 (bitmask width).
      min_share: a block goes to the tile phase when at least this many tokens of the tile selected
        it; 1 = pure union of the tile's blocks, no token phase.
      token_batch: tokens handled one after another by one program of the token phase.
      tile_kv_blocks, token_kv_blocks: key blocks gathered per inner step of the tile and token
        phases (``kv_blocks * block_size`` keys per step).
      mask_split: run the blocks that need no mask (all of the tile's tokens selected them and see
        all their keys) in a first loop without any masking. Off by default: on the H200 it saved
        1% in the tile phase and cost 10% in the token phase (experiments/results/NOTES_attention_kernels.md).
      half_order: order each tile list by which halves of the tile's tokens selected an entry: the
        blocks only the first half chose, then those both halves chose, then those only the second
        half chose, each group ascending (else the list is ascending). The Mosaic forward's 128-key
        steps take two consecutive entries, and each compute warpgroup (one half) runs a step when
        either entry is its half's: grouped, a step rarely pairs one half's private entry with
        another group's, which costs the other warpgroup a 64-key half step for nothing. The order
        changes no result beyond the online softmax's rounding. On the H200 at 128K it cut the
        Mosaic tile kernel by 1.1-1.9 ms (of ~28.5, random q/k) and by 0.04-1.0 ms (smooth q/k) in
        three runs (experiments/results/bench_selection_h200_half_order.json). The block-list kernel
        then walks each row twice when it takes more than one column step (a group starts after the
        groups before it): with the default launch its widest launch at 128K took 0.69 instead of
        0.59 ms (bench_selection_h200_two_walks.json, smooth q/k; notes of sessions 24-25).
      dkv_tokens: tokens stacked per step of the dK/dV walk (``dkv_tokens * 16`` rows).
      tile_warps, token_warps, dkv_warps: ``num_warps`` of the tile-phase, token-phase and dK/dV kernels.
      num_stages: Triton software-pipelining depth of every kernel but the forward's token phase.
      token_stages: Triton software-pipelining depth of the forward's token phase. With neighbouring
        tokens sharing most blocks, a token runs only a few private ones, so a deep pipeline
        presumably costs more in shared memory (fewer programs per SM) than it hides (not profiled):
        on the H200 two stages beat three by 12% at 128K (smooth inputs; on random ones, whose token
        phase takes 6x as long, they tie: experiments/results/NOTES_attention_kernels.md, session 15).
      fwd_chunk_bytes: bound on the fp32 state passed from the tile phase to the token phase in the
        forward (``B * Hkv * 16 * (D + 1) * 4`` bytes per query token): the queries run in as few
        equal chunks as keep it below this (at least one tile per chunk). The result does not
        depend on it; smaller chunks cost one launch of each phase per chunk.
      mosaic: run the forward's tile phase with the warp-specialised Mosaic GPU kernel
        (``sparse_attention_mgpu``; needs ``tile_tokens=8``, bf16/fp16, head dim 64/128, 64-key
        blocks, a Hopper GPU or the Mosaic GPU interpreter); ``None``: the Triton tile kernel.
        The token phase stays a Triton kernel.
      mosaic_dkdv: run the backward's dK/dV with the warp-specialised Mosaic GPU kernel
        (``sparse_attention_mgpu_bwd``; same input limits as ``mosaic``); ``None``: the Triton kernel.
      mosaic_dq: run the backward's dQ tile phase with the warp-specialised Mosaic GPU kernel
        (``sparse_attention_mgpu_bwd``; needs ``tile_tokens=8`` and the same inputs as ``mosaic``);
        ``None``: the Triton kernel. The dQ token phase stays Triton.
    """

    tile_tokens: int = 4
    min_share: int = 2
    token_batch: int = 1
    tile_kv_blocks: int = 1
    token_kv_blocks: int = 1
    mask_split: bool = False
    half_order: bool = False
    dkv_tokens: int = 8
    tile_warps: int = 4
    token_warps: int = 2
    dkv_warps: int = 8
    num_stages: int = 3
    token_stages: int = 3
    fwd_chunk_bytes: int = 256 << 20
    mosaic: MosaicTile | None = None
    mosaic_dkdv: MosaicDkdv | None = None
    mosaic_dq: MosaicTile | None = None

    def __post_init__(self):
        if (self.mosaic is not None or self.mosaic_dq is not None) and self.tile_tokens != 8:
            raise ValueError(f"the Mosaic tile phases run 8-token tiles, got tile_tokens={self.tile_tokens}")
        if self.mosaic_dq is not None and self.mosaic_dq.pingpong:
            raise ValueError("the Mosaic dQ tile phase has no ping-pong schedule (mosaic_dq.pingpong=True)")
        if self.mosaic_dq is not None and self.mosaic_dq.blocks_per_step != 1:
            raise ValueError(
                "the Mosaic dQ tile phase takes one block per step "
                f"(mosaic_dq.blocks_per_step={self.mosaic_dq.blocks_per_step})"
            )
        if self.mosaic_dq is not None and self.mosaic_dq.persistent:
            raise ValueError("the Mosaic dQ tile phase has no persistent launch (mosaic_dq.persistent=True)")
        if self.tile_tokens not in (0, 1, 2, 4, 8, 16):
            raise ValueError(f"tile_tokens must be 0 or a power of two <= 16, got {self.tile_tokens}")
        if self.min_share < 1:
            raise ValueError(f"min_share must be >= 1, got {self.min_share}")
        if self.half_order and (self.tile_tokens < 2 or self.mask_split):
            raise ValueError(
                "half_order needs tiles of at least 2 tokens and no mask_split (which orders the lists "
                f"by mask instead), got tile_tokens={self.tile_tokens}, mask_split={self.mask_split}"
            )
        for name in ("num_stages", "token_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fwd_chunk_bytes < 1:
            raise ValueError(f"fwd_chunk_bytes must be positive, got {self.fwd_chunk_bytes}")
        for name in ("token_batch", "tile_kv_blocks", "token_kv_blocks", "dkv_tokens"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")

    @property
    def has_token_phase(self) -> bool:
        """Whether some blocks run on one-token tiles (always, unless the tile phase takes all)."""
        return self.tile_tokens == 0 or self.min_share > 1

    @property
    def align(self) -> int:
        """Tokens every launch of the kernels covers a multiple of (tile and token-batch spans)."""
        return max(self.tile_tokens, self.token_batch)


# SMs of an H100/H200: persistent launches lowered where the device does not say (CPU lowering tests).
_H100_SMS = 132


def persistent_ctas(interpret: bool) -> int:
    """CTAs of a persistent Mosaic GPU launch: one per SM of the default device (two in the
    interpreter, so that each runs several tiles)."""
    if interpret:
        return 2
    return getattr(jax.devices()[0], "core_count", None) or _H100_SMS


def next_pow2(x: int) -> int:
    """The smallest power of two ``>= x`` (1 for ``x <= 1``)."""
    return 1 << max(0, x - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-n // multiple) * multiple


class TileLists(NamedTuple):
    """Per-tile and per-token block lists of the ``Tp`` (padded) local query tokens (XLA-built
    metadata, non-differentiable).

    Attributes:
      tile_ids: ``[B, Hkv, Tp / tile_tokens, tile_tokens * K]`` int32 block ids of the tile phase,
        the first ``tile_cnt[..., 0]`` valid, of which the first ``tile_cnt[..., 1]`` need no mask
        (every token of the tile selected them and sees all their keys); ``None`` without a tile phase.
      tile_bits: same shape; bit ``i`` set when token ``i`` of the tile selected the block.
      tile_cnt: ``[B, Hkv, Tp / tile_tokens, 2]`` int32 (count, unmasked count).
      token_ids: ``[B, Hkv, Tp, K]`` int32 block ids of the token phase, ascending, the first
        ``token_cnt[..., 0]`` valid, of which the first ``token_cnt[..., 1]`` are wholly before the
        token (no causal mask); ``None`` without a token phase.
      token_cnt: ``[B, Hkv, Tp, 2]`` int32 (count, unmasked count).
    """

    tile_ids: jax.Array | None
    tile_bits: jax.Array | None
    tile_cnt: jax.Array | None
    token_ids: jax.Array | None
    token_cnt: jax.Array | None


def canonical_blocks(
    block_idx: jax.Array, *, padded_len: int, block_size: int, q_offset: int | jax.Array = 0
) -> tuple[jax.Array, jax.Array]:
    """Valid, distinct, ascending block ids per token, padded with ``EMPTY_BLOCK``.

    A slot counts when ``0 <= id <= (q_offset + t) // block_size`` and it does not repeat the previous
    slot (the reference's ``valid_block_slots``); ids after the token's own block hold only future
    keys, so dropping them changes nothing and keeps every id in range.

    Args:
      block_idx: int ``[B, Hkv, T, K]``, ascending, ``-1`` padded (unsorted ids are not reordered).
      padded_len: ``Tp >= T``; tokens ``>= T`` get no block.
      block_size: tokens per key block.
      q_offset: key position of local token 0 (int32 scalar, may be traced).

    Returns:
      ``ids [B, Hkv, Tp, K]`` int32 and ``count [B, Hkv, Tp]`` int32.
    """
    t = block_idx.shape[2]
    ids = block_idx.astype(jnp.int32)
    ids = jnp.pad(ids, ((0, 0), (0, 0), (0, padded_len - t), (0, 0)), constant_values=-1)
    prev = jnp.concatenate([jnp.full_like(ids[..., :1], -1), ids[..., :-1]], axis=-1)
    own = ((q_offset + jnp.arange(padded_len, dtype=jnp.int32)) // block_size)[None, None, :, None]
    keep = (ids >= 0) & (ids != prev) & (ids <= own)
    # The kept ids are ascending already (the input's contract), so a compaction orders them: cheaper
    # than a sort on the GPU.
    (ids,) = _stable_partition((keep,), (ids,), fill=(EMPTY_BLOCK,))
    return ids, keep.sum(axis=-1, dtype=jnp.int32)


def _token_counts(ids, block_size, mask_split, q_offset):
    """``[..., T, 2]`` (valid entries, leading entries wholly before the token) of ascending lists."""
    valid = ids < EMPTY_BLOCK
    t = q_offset + jnp.arange(ids.shape[-2], dtype=jnp.int32).reshape((1,) * (ids.ndim - 2) + (-1, 1))
    free = valid & (ids * block_size + block_size - 1 <= t) if mask_split else jnp.zeros_like(valid)
    return jnp.stack([valid.sum(axis=-1, dtype=jnp.int32), free.sum(axis=-1, dtype=jnp.int32)], axis=-1)


def tile_lists(
    ids: jax.Array,
    config: BlockSizes,
    block_size: int,
    q_offset: int | jax.Array = 0,
    *,
    num_key_blocks: int | None = None,
) -> TileLists:
    """Splits canonical per-token lists into tile-phase and token-phase lists.

    Within a tile of ``tile_tokens`` tokens, a block selected by ``n`` of its tokens goes to the tile
    phase (with an ``n``-bit token mask) when ``n >= min_share``, else to the token phase of each of
    those tokens. Lists that need no mask come first (``config.mask_split``), so the kernels run them
    without any masking, as flash attention does for the blocks below the causal diagonal.

    Args:
      ids: ``canonical_blocks`` ids, ``[B, Hkv, Tp, K]``.
      config: tiling.
      block_size: tokens per key block.
      q_offset: key position of local token 0 (int32 scalar, may be traced); only the mask-free
        split depends on it.
      num_key_blocks: a bound on the block ids (``ids < num_key_blocks`` or ``EMPTY_BLOCK``); with it,
        the sort runs on one packed int32 key when that fits. ``None``: a two-array (id, position) sort.

    Returns:
      ``TileLists``.
    """
    tq = config.tile_tokens
    if tq == 0:
        return TileLists(None, None, None, ids, _token_counts(ids, block_size, config.mask_split, q_offset))
    b, h, tp, k = ids.shape
    n = tq * k
    x = ids.reshape(b, h, tp // tq, n)
    # Sort the tile's (block, token) pairs by block: each block becomes a run, one entry per token.
    # The only sort: the lists below are compactions of this order or of the tokens' own lists.
    x, pos = _sort_by_block(x, num_key_blocks)
    tok = pos // k
    bit = jnp.left_shift(1, tok)
    first = x != jnp.concatenate([jnp.full_like(x[..., :1], -1), x[..., :-1]], axis=-1)
    last = x != jnp.concatenate([x[..., 1:], jnp.full_like(x[..., :1], -1)], axis=-1)
    # Tokens are distinct within a run, so the sum of their bits is their OR: a run's bits are the
    # inclusive prefix sum at its end minus the exclusive prefix sum at its start.
    csum = lax.cumsum(bit, axis=3)
    base = lax.cummax(jnp.where(first, csum - bit, 0), axis=3)
    end = lax.cummin(jnp.where(last, csum, jnp.iinfo(jnp.int32).max), axis=3, reverse=True)
    run_bits = end - base
    real = x < EMPTY_BLOCK
    in_tile = real & (lax.population_count(run_bits) >= config.min_share)
    head = in_tile & last
    # Entries that need no mask go first, then the masked ones, each group ascending.
    t0 = (q_offset + jnp.arange(tp // tq, dtype=jnp.int32) * tq)[None, None, :, None]
    free = (run_bits == (1 << tq) - 1) & (x * block_size + block_size - 1 <= t0) & config.mask_split
    if config.half_order:  # (no mask_split)
        first_half, second_half = half_groups(run_bits, tq)
        groups = (head & first_half & ~second_half, head & first_half & second_half, head & ~first_half)
    else:
        groups = (head & free, head & ~free)
    tile_ids, tile_bits = _stable_partition(groups, (x, run_bits), fill=(0, 0))
    tile_cnt = jnp.stack(
        [head.sum(axis=3, dtype=jnp.int32), (head & free).sum(axis=3, dtype=jnp.int32)], axis=-1
    )
    if not config.has_token_phase:
        return TileLists(tile_ids, tile_bits, tile_cnt, None, None)
    # A token's remaining blocks are its own ascending list minus the tile-phase ones: scatter the
    # "remaining" flags back to the tokens' list order, then compact each token's row.
    rest = jnp.put_along_axis(jnp.zeros_like(real), pos, real & ~in_tile, axis=3, inplace=False)
    (token_ids,) = _stable_partition((rest.reshape(b, h, tp, k),), (ids,), fill=(EMPTY_BLOCK,))
    return TileLists(
        tile_ids,
        tile_bits,
        tile_cnt,
        token_ids,
        _token_counts(token_ids, block_size, config.mask_split, q_offset),
    )


def half_groups(bits: jax.Array, tile_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Whether a token of the first half, and one of the second half, of a ``tile_tokens``-token tile
    set a bit of ``bits`` (token ``i`` is bit ``i``): ``BlockSizes.half_order``'s groups."""
    half = tile_tokens // 2
    return (bits & ((1 << half) - 1)) != 0, lax.shift_right_logical(bits, half) != 0


def _sort_by_block(x: jax.Array, num_key_blocks: int | None) -> tuple[jax.Array, jax.Array]:
    """Sorts each row of ``x [..., n]`` (block ids or ``EMPTY_BLOCK``); returns the sorted ids and the
    position each came from.

    With ``num_key_blocks`` and ``(num_key_blocks + 1) * n <= 2**31``, it sorts one int32 key
    ``id * n + position`` (``EMPTY_BLOCK`` as ``num_key_blocks``): one array instead of two through
    the GPU sort's shared memory; ties (one block, several tokens) come out in position order. On the
    H200 at 128K this sort took 1.04 ms where the session-6 sort of three arrays took 1.21 ms.
    """
    n = x.shape[-1]
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x.shape)
    if num_key_blocks is None or (num_key_blocks + 1) * n > 2**31:
        x, pos = lax.sort((x, pos), dimension=x.ndim - 1, num_keys=1)
        return x, pos
    key = lax.sort(jnp.minimum(x, num_key_blocks) * n + pos, dimension=x.ndim - 1)
    blocks = key // n
    return jnp.where(blocks == num_key_blocks, EMPTY_BLOCK, blocks), key % n


def _stable_partition(groups, values, fill):
    """Moves the entries of disjoint boolean ``groups`` to the front of the last axis, group after
    group, each in its original order; the other slots get ``fill`` (one per value array).

    A permutation scatter built from prefix sums: the same result as a stable sort by group, without
    sorting.
    """
    rest = ~functools.reduce(jnp.logical_or, groups)
    dest = jnp.zeros(rest.shape, jnp.int32)
    offset = jnp.zeros((*rest.shape[:-1], 1), jnp.int32)
    for g in (*groups, rest):
        dest = jnp.where(g, offset + jnp.cumsum(g, axis=-1, dtype=jnp.int32) - 1, dest)
        offset = offset + g.sum(axis=-1, keepdims=True, dtype=jnp.int32)
    out = []
    for v, f in zip(values, fill, strict=True):
        src = jnp.where(rest, jnp.asarray(f, v.dtype), v)
        out.append(jnp.put_along_axis(jnp.zeros_like(src), dest, src, axis=-1, inplace=False))
    return out
