"""InfLLM-V2 stage-1 block selection in Pallas (Triton backend): scores, pooling and top-k fused.

Computes what ``infllm_jax.ops.selection.select_blocks_reference`` computes (SPEC.md §3-§6) without
ever writing the per-token score matrix ``S [B, Hkv, T, n1]`` to HBM. Two kernels run per query
chunk (``lax.map`` over chunks of ``C`` tokens, so only one chunk's intermediates exist at a time):

1. ``selection_triton._score_kernel``, grid ``(C / tq, B, Hkv)``. A program owns ``tq`` tokens x
   ``Gp`` query heads of one KV group (``Gp`` = G rounded up to a power of two; rows
   ``t * Gp + g``; ``tq * Gp = 128`` rows by default) and computes scores transposed,
   ``[keys, rows]``. Pass 1 walks the coarse keys K2 up to the program's last visible one with an
   online max/sum (base 2), giving ``lse2`` per row. Pass 2 walks the fine keys K1 in tiles of
   ``block_k1`` kernels, forms ``p = exp2(s - lse2)`` (0 where invisible), sums the G rows of each
   token (an MMA with a 0/1 matrix, or an exact reshape + sum) and max-pools each group of
   ``r = block_size / stride`` kernels. Tiles that every token of the program sees skip the causal
   mask; tiles no token sees are skipped.
   A block's pool window is its own ``r`` kernels plus the last kernel of the previous block
   (kernel ``r*j - 1``). Shifting that halo by one block inside registers has no Triton lowering,
   so the kernel writes the group maxima to ``body[t, j]`` and the group's last kernel to
   ``halo[t, j + HALO_SHIFT]`` (a store at a 16-column offset, which the Mosaic kernel's TMA stores
   need too); the top-k kernel takes the max of ``body[t, j]`` and ``halo[t, j - 1 + HALO_SHIFT]``.
2. ``_topk_kernel``, grid ``(C / tq_b, B, Hkv)``. Loads whole rows of ``body`` and ``halo``
   (``[tq_b, nb_pad]``, held in registers) and forms the reference's block scores: ``max(body, halo)``
   where a kernel of the part is visible to the token, 0 where the kernels exist but are invisible,
   ``-inf`` for blocks without any kernel, ``+inf`` for the forced init/local blocks. The top-k is
   exact: scores map to order-preserving int32 keys, a 32-step bitwise search finds the k-th largest
   key per row, the keys above it plus the lowest-index ties at it are selected (``lax.top_k``'s tie
   rule), ids past the token's block are dropped, and an inclusive cumsum gives each kept id its
   ascending output slot; ids are scattered there and the other slots get -1.
   With ``BlockSizes.topk_bands`` (and a static ``q_offset``) chunks are grouped into bands by the
   blocks their last token sees, and each band's top-k covers only those columns (``nb_pad`` of the
   band, a power of two): the dropped columns are blocks after every token's own, which score 0 or
   ``-inf`` and lose every tie by index, so the result is the same at ~2/3 of the work at 128K.
   With ``lists_for`` the top-k also writes each token's kept blocks as a mask row (int32 by default), and
   ``block_lists.lists_from_masks`` turns a chunk's masks into the sparse attention's tile and token
   lists (what ``tiling.tile_lists`` builds from the ids), so the prefill sorts nothing in XLA.

Memory: besides the inputs, one chunk of ``body``/``halo`` (``2 * B * Hkv * C * (nb_pad + 32) * 4``
bytes in float32, at most ``BlockSizes.chunk_bytes``; 260 MiB with C = 8K tokens at 128K and Hkv = 2;
half that per token in bf16, the Mosaic default, whose ``MOSAIC_SELECTION`` chunks are 32K tokens:
~520 MiB), a copy of the chunk's queries (64 MiB for 8K tokens; none for the Mosaic kernels with groups
of 16 heads, which read ``q`` in place, the keys-as-rows one when ``T`` is a multiple of 8), with
``lists_for`` the chunk's int32 masks (``B * Hkv * C * nb_pad * 4`` bytes) and the int32 ids of all
chunks (128 MiB). The compiled program's temporaries at 128K, 32/2 heads, hd 128, compiled for the H200:
393 MiB with 8K chunks (``experiments/results/bench_selection_h200.json``), under 1 GiB with the 32K ones
(``test_gpu_128k_selection_memory_is_bounded``), against 4.3 GB for the group-summed score matrix alone.

On Hopper GPUs the scoring runs instead as a warp-specialised Mosaic GPU kernel with the same outputs
(``BlockSizes.mosaic``; ``default_block_sizes`` picks it): from ``MosaicScore.key_rows_from_blocks`` key
blocks on ``selection_mgpu_keys.score_tiles_mgpu_keys`` (keys as the WGMMA rows, the group sum in
registers), below that ``selection_mgpu.score_tiles_mgpu`` (token rows, the group sum as a WGMMA). The
top-k kernel is shared.

Precision: with bf16/f16 inputs the score dots take bf16/f16 operands (the compressed keys are
rounded to the input dtype) with float32 accumulation, and the ``"mma"`` group sum (Triton, and the
token-rows Mosaic kernel) takes ``p`` in bf16 (as flash attention's P); everything else is float32, the
keys-as-rows kernel's group sum included. With float32 inputs every dot runs at
IEEE float32 precision, so the selection equals the reference's unless two block scores are within
float32 rounding of each other.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import pl, pltriton, triton_params
from pallas_kernels.block_lists import ListTiling, lists_from_masks, stack_chunk_lists
from pallas_kernels.selection_mgpu import (
    HALO_SHIFT,
    KEY_TILE,
    TILE_TOKENS,
    MosaicScore,
    permute_fine_keys,
    score_tiles_mgpu,
    supported_mosaic_scoring,
    visible_kernels,
)
from pallas_kernels.selection_mgpu_keys import PAIR_BLOCKS, query_rows_head_major, score_tiles_mgpu_keys
from pallas_kernels.selection_triton import score_tiles_triton
from pallas_kernels.tiling import GROUP_ROWS, TileLists, next_pow2, round_up

__all__ = ["MOSAIC_SELECTION", "BlockSizes", "compress_keys", "default_block_sizes", "select_blocks"]

_LOG2E = math.log2(math.e)
_INT32_MIN = -(2**31)
# Longest block-score row the top-k kernel keeps in registers (T = 1M tokens at block 64).
_MAX_ROW = 16384


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class BlockSizes:
    """Tiling of the two selection kernels; every size is a power of two.

    Attributes:
      score_rows: rows (tokens x padded group heads) per scoring program; at least 16 (MMA M).
      block_k1: fine compressed keys per pass-2 step (a multiple of the pool stride, >= 16).
      block_k2: coarse compressed keys per pass-1 step (>= 16).
      score_warps, score_stages: Triton launch parameters of the scoring kernel.
      topk_elems: block scores per top-k program (rows x padded blocks), kept in registers.
      topk_warps: Triton warps of the top-k kernel.
      topk_early_exit: stop the top-k's bitwise search once, in every row of the program, exactly
        ``k`` keys reach the threshold built so far: those keys are then the selection, so the result is
        identical, in fewer than 32 passes unless a row has ties at its k-th score (selection at 128K
        on the H200: 20.9 instead of 21.9 ms, ``bench_selection_h200_early_exit.json``).
      topk_bands: give the top-k of each band of query chunks only the block columns its last token
        sees, rounded up to a power of two, instead of all of them (needs a static ``q_offset``;
        identical result, see the module docstring; top-k at 128K on the H200: 2.5 instead of 3.3 ms,
        ``bench_selection_h200_topk_bands.json``).
      list_elems, list_warps, list_stages: mask elements per step (tile rows x block columns), Triton
        warps and pipelining depth of the block-lists kernel (``select_blocks(..., lists_for=)``).
      list_mask_dtype: dtype of the selection masks the top-k writes for it (``"int32"`` or ``"int8"``).
        int32 writes 4x the bytes but was faster: at 128K on the H200 int8 masks made the top-k ~0.35 ms
        slower than int32 ones (prefill 56.22 vs 55.84 ms, ``bench_selection_h200_int32_masks.json``),
        presumably a layout conversion before the byte stores.
      chunk_bytes: budget for one query chunk's pooled scores (``body`` + ``halo``, float32).
      max_chunk: most tokens per query chunk (bounds the chunk's copy of the queries: 64 MiB at
        8K tokens x 32 heads x 128 dims in bf16); 8K tokens x 2 KV heads still fill the GPU.
      group_sum: how the G query heads of a token are summed: ``"mma"`` (a dot with a 0/1 matrix;
        ``p`` enters it in bf16 unless the inputs are float32) or ``"reshape"`` (an exact float32
        reshape + sum, which costs a layout change through shared memory per tile).
      mosaic: score with the Mosaic GPU kernel (Hopper; bf16/fp16, head dim 64/128) instead of the
        Triton one; ``score_rows``, ``block_k1``, ``block_k2``, ``score_warps``, ``score_stages`` and
        ``group_sum`` then do not apply (it sums the group by an MMA with ``p`` in bf16).
    """

    score_rows: int = 128
    block_k1: int = 64
    block_k2: int = 64
    score_warps: int = 4
    score_stages: int = 2
    topk_elems: int = 4096
    topk_warps: int = 4
    topk_early_exit: bool = True
    topk_bands: bool = True
    list_elems: int = 4096
    list_warps: int = 4
    list_stages: int = 1
    list_mask_dtype: str = "int32"
    chunk_bytes: int = 512 * 2**20
    max_chunk: int = 8192
    group_sum: str = "mma"
    mosaic: MosaicScore | None = None

    def __post_init__(self):
        if self.list_mask_dtype not in ("int8", "int32"):
            raise ValueError(
                f"BlockSizes.list_mask_dtype must be 'int8' or 'int32', got {self.list_mask_dtype!r}"
            )
        if self.group_sum not in ("mma", "reshape"):
            raise ValueError(f"BlockSizes.group_sum must be 'mma' or 'reshape', got {self.group_sum!r}")
        for name in ("score_rows", "block_k1", "block_k2", "topk_elems", "list_elems", "max_chunk"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name}={value} must be a power of two >= 16")


def _topk_rows(bs: BlockSizes, nb_cols: int) -> int:
    """Token rows per top-k program over ``nb_cols`` block columns (``topk_elems`` in registers)."""
    return max(1, min(bs.topk_elems // nb_cols, 64))


def _topk_bands(
    n_chunks: int,
    chunk: int,
    t: int,
    q_offset: int | None,
    *,
    block_size: int,
    nb: int,
    nb_pad: int,
    min_cols: int,
    enable: bool,
) -> list[tuple[int, int, int]]:
    """``(first chunk, end chunk, block columns)`` runs of query chunks whose top-k can share a width.

    A chunk needs the columns of the blocks its last token sees, rounded up to a power of two (at
    least ``min_cols``, at most ``nb_pad``); consecutive chunks needing the same width form a band. One
    band of ``nb_pad`` columns when disabled or when ``q_offset`` is None (traced: positions unknown).
    """
    if not enable or q_offset is None:
        return [(0, n_chunks, nb_pad)]
    bands = []
    for c in range(n_chunks):
        last = min((c + 1) * chunk, t) - 1 + q_offset
        cols = min(max(next_pow2(min(nb, last // block_size + 1)), min_cols), nb_pad)
        if bands and bands[-1][2] == cols:
            bands[-1] = (bands[-1][0], c + 1, cols)
        else:
            bands.append((c, c + 1, cols))
    return bands


def compress_keys(k: jax.Array, kernel_size: int, kernel_stride: int) -> jax.Array:
    """Mean of every complete window of ``kernel_size`` keys, windows ``kernel_stride`` apart.

    Same arithmetic as ``infllm_jax.ops.compress_keys`` (this package does not import infllm_jax).

    Args:
      k: ``[B, T, H, D]`` keys.

    Returns:
      ``[B, n, H, D]`` float32, ``n = (T - kernel_size) // kernel_stride + 1`` (0 if ``T < kernel_size``).
    """
    b, t, h, d = k.shape
    n = (t - kernel_size) // kernel_stride + 1 if t >= kernel_size else 0
    if n == 0:
        return jnp.zeros((b, 0, h, d), jnp.float32)
    r = kernel_size // kernel_stride
    n_chunks = n + r - 1
    chunks = k[:, : n_chunks * kernel_stride].astype(jnp.float32)
    chunks = chunks.reshape(b, n_chunks, kernel_stride, h, d).sum(axis=2)
    windows = sum(chunks[:, i : i + n] for i in range(r))
    return windows / kernel_size


def _key_layout(kc: jax.Array, block: int, *, head_dim: int, dtype) -> jax.Array:
    """``[B, n, Hkv, D]`` compressed keys -> ``[B, Hkv, n_pad, head_dim]`` in ``dtype``, ``n_pad`` a multiple
    of ``block``: the scoring kernels' key layout. Zero rows are never visible, zero columns inert."""
    n_pad = round_up(max(1, kc.shape[1]), block)
    kc = jnp.pad(kc, ((0, 0), (0, n_pad - kc.shape[1]), (0, 0), (0, head_dim - kc.shape[3])))
    return kc.swapaxes(1, 2).astype(dtype)


def _topk_kernel(
    pos_ref,
    body_ref,
    halo_ref,
    idx_ref,
    mask_ref=None,
    *,
    tq: int,
    n1: int,
    nb: int,
    nb_pad: int,
    stride: int,
    pool: int,
    block_size: int,
    init_blocks: int,
    local_blocks: int,
    k_sel: int,
    early_exit: bool,
):
    """Forcing, exact top-k, sort and -1 padding for ``tq`` tokens.

    Refs (leading batch / KV-head dims squeezed):
      pos_ref: ``[2]`` int32: key position of the chunk's first query, and of the last query.
      body_ref, halo_ref: ``[tq, >= nb_pad]`` float32 from the scoring kernel (Triton or Mosaic), or
        bfloat16 (``MosaicScore.bf16_scores``).
      idx_ref: ``[tq, Kp]`` int32 out, ``Kp > num_selected``: ascending ids, then -1. Slot ``Kp - 1``
        is scratch for the masked scatter and is sliced away by the caller.
      mask_ref: optional ``[tq, nb_pad]`` int32 or int8 out: 1 where the token kept the block, 0
        elsewhere and in the rows of tokens past the last one (``block_lists.lists_from_masks`` reads it).
    """
    kp = idx_ref.shape[-1]
    t = jnp.minimum(
        pos_ref[0] + pl.program_id(0) * tq + lax.broadcasted_iota(jnp.int32, (tq, 1), 0), pos_ref[1]
    )  # [tq, 1]
    j = lax.broadcasted_iota(jnp.int32, (1, nb_pad), 1)
    n1_vis = visible_kernels(t, 2 * stride, stride, n1)  # [tq, 1]
    # Block j pools kernels pool*j - 1 .. pool*j + pool - 1. Invisible kernels score 0, and S >= 0,
    # so a part no kernel of which is visible contributes 0; the score kernel wrote every visible part.
    body = pltriton.load(body_ref.at[:, pl.ds(0, nb_pad)], mask=pool * j < n1_vis, other=0.0)
    # Column j of this window is block j - 1's last kernel (the score kernels' HALO_SHIFT).
    halo_cols = pl.ds(HALO_SHIFT - 1, nb_pad)
    halo = pltriton.load(halo_ref.at[:, halo_cols], mask=(j >= 1) & (pool * j <= n1_vis), other=0.0)
    # bfloat16 scores are float32 ones with 16 zero low bits: a search over the top 16 bits is exact.
    key_bits = 16 if body.dtype == jnp.bfloat16 else 32
    body, halo = body.astype(jnp.float32), halo.astype(jnp.float32)
    score = jnp.where(jnp.maximum(pool * j - 1, 0) < n1, jnp.maximum(body, halo), -jnp.inf)
    q_block = lax.div(t, block_size)
    # A token in block b < k_sel keeps every visible block (they score >= 0 or are forced; later blocks
    # score 0 or -inf and lose ties to them), so forcing them all changes nothing, and lets the
    # keys-as-rows scoring kernel skip such tokens' tiles (its ``forced``): their scores are unspecified.
    forced = (
        (j < init_blocks)
        | ((j >= q_block - local_blocks) & (j <= q_block))
        | ((q_block < k_sel) & (j <= q_block))
    )
    score = jnp.where(forced, jnp.inf, score)

    # Order-preserving int32 keys (flip the magnitude bits of negatives); padding columns sort last.
    bits = lax.bitcast_convert_type(score, jnp.int32)
    key = bits ^ (lax.shift_right_arithmetic(bits, 31) & 0x7FFFFFFF)
    if key_bits == 16:
        # Negative scores' keys have their low bits flipped to ones; clearing them keeps the order.
        key = key & ~0xFFFF
    key = jnp.where(j < nb, key, _INT32_MIN)

    # Largest threshold thr (in unsigned order, key ^ INT32_MIN) with count(key >= thr) >= k_sel,
    # built bit by bit from the top: it equals the k_sel-th largest key. With early_exit the search
    # stops once count(key >= thr) == k_sel in every row: ``thr`` may then lie below the k-th key, but
    # the keys above or at it are exactly the k_sel largest, which is what the tie rule below selects.
    def count_ge(cand):
        return jnp.sum((key >= (cand ^ _INT32_MIN)).astype(jnp.int32), axis=1, keepdims=True)

    def search_step(i, thr):
        """The next threshold, whether each row raised it, and count(key >= candidate)."""
        cand = thr | lax.shift_left(jnp.int32(1), 31 - i)
        count = count_ge(cand)
        take = count >= k_sel
        return jnp.where(take, cand, thr), take, count

    thr = jnp.zeros((tq, 1), jnp.int32)
    if early_exit:

        def searching(state):
            i, _, count_thr = state
            # A max over one axis at a time, not jnp.any: Pallas' Triton lowering has no reduce_or,
            # and it failed on a reduction over both axes at once (jax 0.11.2).
            open_rows = jnp.max((count_thr != k_sel).astype(jnp.int32), axis=1)
            return (i < key_bits) & (jnp.max(open_rows, axis=0) > 0)

        def step(state):
            i, thr, count_thr = state
            thr, take, count = search_step(i, thr)
            return i + 1, thr, jnp.where(take, count, count_thr)

        # count(key >= thr) for thr = 0 (INT32_MIN as a signed key) counts every column.
        state = (jnp.int32(0), thr, jnp.full((tq, 1), nb_pad, jnp.int32))
        _, thr, count_thr = lax.while_loop(searching, step, state)
    else:
        thr = lax.fori_loop(0, key_bits, lambda i, thr: search_step(i, thr)[0], thr)
        count_thr = count_ge(thr)
    kth = thr ^ _INT32_MIN

    def tie_rule():
        # Ties at the k-th key: lax.top_k's rule, the lower index wins (a scan over the row).
        above = key > kth
        n_above = jnp.sum(above.astype(jnp.int32), axis=1, keepdims=True)
        tie = key == kth
        tie_rank = jnp.cumsum(tie.astype(jnp.int32), axis=1)
        return (above | (tie & (tie_rank <= k_sel - n_above))).astype(jnp.int32)

    # Without a row whose keys >= thr outnumber k_sel, those keys are the selection: no scan.
    all_exact = jnp.max(jnp.max((count_thr != k_sel).astype(jnp.int32), axis=1), axis=0) == 0
    selected = lax.cond(all_exact, lambda: (key >= kth).astype(jnp.int32), tie_rule) > 0

    keep = selected & (j <= q_block)
    slot = jnp.cumsum(keep.astype(jnp.int32), axis=1) - 1  # ascending ids -> ascending slots
    n_keep = jnp.sum(keep.astype(jnp.int32), axis=1, keepdims=True)
    rows = jnp.broadcast_to(lax.broadcasted_iota(jnp.int32, (tq, 1), 0), (tq, nb_pad))
    pltriton.store(
        idx_ref.at[rows, jnp.where(keep, slot, kp - 1)], jnp.broadcast_to(j, (tq, nb_pad)), mask=keep
    )
    out_slot = lax.broadcasted_iota(jnp.int32, (tq, kp), 1)
    pltriton.store(idx_ref, jnp.full((tq, kp), -1, jnp.int32), mask=out_slot >= n_keep)
    if mask_ref is not None:
        # Rows past the last token repeat it (t is clipped); their masks stay empty.
        real = pos_ref[0] + pl.program_id(0) * tq + lax.broadcasted_iota(jnp.int32, (tq, 1), 0) <= pos_ref[1]
        mask_ref[...] = (keep & real).astype(mask_ref.dtype)


def _topk_call(
    bs: BlockSizes,
    nb_cols: int,
    *,
    shape: tuple[int, int, int, int],
    kp: int,
    masks: bool,
    interpret: bool,
    k_sel: int,
    **geometry,
):
    """The top-k launch over the first ``nb_cols`` block columns (a power of two <= nb_pad) of one query
    chunk: ``(pos [2], body, halo [B, Hkv, C, width]) -> [idx [B, Hkv, C, kp]]`` (and the selection
    masks ``[B, Hkv, C, nb_cols]`` with ``masks``), for ``shape = (B, Hkv, C, width)``. ``geometry``:
    ``_topk_kernel``'s ``n1, nb, stride, pool, block_size, init_blocks, local_blocks``."""
    b, hkv, chunk, width = shape
    tq = min(_topk_rows(bs, nb_cols), chunk)
    outputs = ((kp, jnp.int32), (nb_cols, bs.list_mask_dtype))[: 1 + masks]
    return pl.pallas_call(
        functools.partial(
            _topk_kernel,
            tq=tq,
            nb_pad=nb_cols,
            # Fewer columns than k: all of them are visible or after every token's block, and every
            # visible block is kept either way.
            k_sel=min(k_sel, nb_cols),
            early_exit=bs.topk_early_exit,
            **geometry,
        ),
        grid=(chunk // tq, b, hkv),
        in_specs=[
            pl.BlockSpec((2,), lambda i, bi, h: (0,)),
            pl.BlockSpec((None, None, tq, width), lambda i, bi, h: (bi, h, i, 0)),
            pl.BlockSpec((None, None, tq, width), lambda i, bi, h: (bi, h, i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, tq, cols), lambda i, bi, h: (bi, h, i, 0)) for cols, _ in outputs
        ],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, chunk, cols), dtype) for cols, dtype in outputs],
        compiler_params=triton_params(bs.topk_warps, 1),
        interpret=interpret,
        name="infllmv2_select_topk",
    )


def _check_supported(q, k, block_size, kernel_size, kernel_stride, block_sizes):
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        raise NotImplementedError(
            f"pallas selection needs f32/bf16/f16 q and k of one dtype: {q.dtype}, {k.dtype}"
        )
    if kernel_size != 2 * kernel_stride:
        raise NotImplementedError(f"pallas selection needs kernel_size == 2 * kernel_stride: {kernel_size=}")
    pool = block_size // kernel_stride
    if block_size % kernel_stride or pool & (pool - 1) or pool > block_sizes.block_k1:
        raise NotImplementedError(
            f"pallas selection needs block_size / kernel_stride = {block_size}/{kernel_stride} to be a power "
            f"of two <= block_k1={block_sizes.block_k1}"
        )
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"q must not be longer than k: {q.shape} vs {k.shape}")
    _, t, hq, d = q.shape
    t = k.shape[1]
    gp = next_pow2(hq // k.shape[2])
    if gp > block_sizes.score_rows:
        raise NotImplementedError(f"GQA group {hq // k.shape[2]} exceeds score_rows={block_sizes.score_rows}")
    if d > 256:
        raise NotImplementedError(f"pallas selection supports head_dim <= 256, got {d}")
    if next_pow2(-(-t // block_size)) > _MAX_ROW:
        raise NotImplementedError(f"pallas selection supports at most {_MAX_ROW} key blocks, got T={t}")
    if block_sizes.mosaic is not None:
        reason = supported_mosaic_scoring(q.dtype, d, hq // k.shape[2], pool)
        if reason is not None:
            raise NotImplementedError(f"Mosaic GPU scoring does not support {reason}")


# The selection tiling on Hopper GPUs: the Mosaic GPU scoring kernel (keys as rows from 128 blocks
# on, launched persistent: 12.54 vs 13.04 ms at 128K, bench_selection_h200_scoring_persistent.json),
# the Triton top-k, and query chunks of up to 32K tokens (4 at 128K instead of 16: the 128K prefill
# took 51.44 vs 52.19 ms for the same kernel time, i.e. fewer launch gaps; peak memory 3.01 vs 3.00 GiB,
# bench_selection_h200_chunks_session14.json). The top-k programs hold 2048 block scores, one row of
# the widest band (2.04 vs 2.26 ms at 128K, bench_selection_h200_token_stages.json). The block-list
# kernel keeps BlockSizes' launch (4096 mask elements per program, 4 warps): with the Hopper attention
# tiling's half_order it walks each row of 8-token tiles twice in 512-column steps: at 128K its widest
# launch took 0.69 instead of 1.08 ms against whole rows in one walk with 8 warps (the default in
# session 24; bench_selection_h200_two_walks.json, smooth q/k; 0.74 vs 1.14 random).
MOSAIC_SELECTION = BlockSizes(
    mosaic=MosaicScore(persistent=True),
    max_chunk=32768,
    chunk_bytes=2 << 30,
    topk_elems=2048,
)


def default_block_sizes(dtype, head_dim: int, group: int, pool: int, interpret: bool) -> BlockSizes:
    """The tiling ``select_blocks`` uses when none is given: ``MOSAIC_SELECTION`` when compiling for a
    Hopper GPU (compute capability 9.x: WGMMA and TMA) with inputs the Mosaic scoring kernel supports
    (``supported_mosaic_scoring``), else ``BlockSizes()`` (Triton only, and the interpret-mode default)."""
    if interpret or jax.default_backend() != "gpu":
        return BlockSizes()
    major = str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0]
    if major == "9" and supported_mosaic_scoring(dtype, head_dim, group, pool) is None:
        return MOSAIC_SELECTION
    return BlockSizes()


def select_blocks(
    q: jax.Array,
    k: jax.Array,
    *,
    block_size: int,
    kernel_size: int,
    kernel_stride: int,
    init_blocks: int,
    local_blocks: int,
    num_selected: int,
    q_offset: int | jax.Array = 0,
    query_chunk: int | None = None,
    block_sizes: BlockSizes | None = None,
    lists_for: ListTiling | None = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, TileLists]:
    """InfLLM-V2 block selection for every query token (no gradient).

    Args:
      q: ``[B, Tq, Hq, D]`` queries, head ``kv * G + g``.
      k: ``[B, T, Hkv, D]`` keys, same dtype, ``T >= Tq``.
      block_size, kernel_size, kernel_stride, init_blocks, local_blocks, num_selected: the
        ``SparseConfig`` fields/properties of the same names (``kernel_size == 2 * kernel_stride``;
        coarse keys are 4x both).
      q_offset: key position of ``q[:, 0]`` when ``q`` is the slice ``[q_offset, q_offset + Tq)`` of the
        positions (context parallelism); may be traced. A Python int also sizes the top-k bands
        (``BlockSizes.topk_bands``) and compiles once per value; an array compiles once for all.
      query_chunk: tokens per chunk (rounded up to a power of two); default from
        ``block_sizes.chunk_bytes``.
      block_sizes: kernel tiling (default: ``default_block_sizes``).
      lists_for: also build the sparse attention's tile and token lists for this tiling
        (``block_lists.list_tiling`` of its ``BlockSizes``) from the top-k's masks, in a Pallas kernel
        per chunk instead of XLA sorts and scatters (``sparse_attention_pallas(..., lists=)``).
      interpret: run the kernels in the Pallas interpreter (CPU).

    Returns:
      int32 ``[B, Hkv, Tq, num_selected]``: per token and KV head the ids of the top
      ``min(num_selected, nb)`` blocks by score (init/local forced), ascending, ids after the token's
      own block dropped, -1 in the unused slots. With ``lists_for``: these and the ``TileLists``
      that ``tiling.tile_lists`` builds from them.

    Raises:
      NotImplementedError: for inputs these kernels do not handle (the dispatcher falls back to XLA).
    """
    return _select_blocks(
        q,
        k,
        block_size=block_size,
        kernel_size=kernel_size,
        kernel_stride=kernel_stride,
        init_blocks=init_blocks,
        local_blocks=local_blocks,
        num_selected=num_selected,
        q_offset=q_offset,
        static_offset=q_offset if isinstance(q_offset, int) else None,
        query_chunk=query_chunk,
        block_sizes=block_sizes,
        lists_for=lists_for,
        interpret=interpret,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_size",
        "kernel_size",
        "kernel_stride",
        "init_blocks",
        "local_blocks",
        "num_selected",
        "query_chunk",
        "block_sizes",
        "lists_for",
        "interpret",
        "static_offset",
    ),
)
def _select_blocks(
    q: jax.Array,
    k: jax.Array,
    *,
    block_size: int,
    kernel_size: int,
    kernel_stride: int,
    init_blocks: int,
    local_blocks: int,
    num_selected: int,
    q_offset: int | jax.Array,
    static_offset: int | None,
    query_chunk: int | None,
    block_sizes: BlockSizes | None,
    lists_for: ListTiling | None,
    interpret: bool,
) -> jax.Array | tuple[jax.Array, TileLists]:
    # q_offset is traced; static_offset (the caller's offset when it is a Python int, else None) only
    # sizes the top-k bands, and each value of it compiles its own executable.
    b, t, hq, d = q.shape
    t_keys, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    pool = block_size // kernel_stride
    if block_sizes is None:
        block_sizes = default_block_sizes(q.dtype, d, g, pool, interpret)
    _check_supported(q, k, block_size, kernel_size, kernel_stride, block_sizes)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    bs = block_sizes
    mosaic = bs.mosaic is not None
    # Query rows per token: the group padded to a power of two (Triton) or to 16 (Mosaic).
    gp = GROUP_ROWS if mosaic else next_pow2(g)
    dp = d if mosaic else max(16, next_pow2(d))  # Triton: dot K >= 16, power-of-two tiles
    tq = TILE_TOKENS if mosaic else bs.score_rows // gp  # tokens per scoring program / CTA
    nb = -(-t_keys // block_size)
    key_rows = mosaic and bs.mosaic.key_rows and nb >= bs.mosaic.key_rows_from_blocks
    # Blocks per fine-key tile (the keys-as-rows kernel's pair tile).
    nbt = PAIR_BLOCKS if key_rows else (KEY_TILE if mosaic else bs.block_k1) // pool
    nb_pad = max(next_pow2(nb), nbt)
    # Columns of body/halo: nb_pad blocks, then spare columns (the shifted halo store of the last block
    # lands on column nb_pad - 1 + HALO_SHIFT; masked stores address the last one, past it). Multiples
    # of 16 keep rows 64-byte aligned.
    width = nb_pad + HALO_SHIFT + 16
    k_sel = min(num_selected, nb)
    kp = next_pow2(num_selected + 1)  # one spare slot for the masked scatter
    exact = q.dtype == jnp.float32

    k32 = k.astype(jnp.float32)
    k1 = compress_keys(k32, kernel_size, kernel_stride)
    k2 = compress_keys(k32, 4 * kernel_size, 4 * kernel_stride)
    n1, n2 = k1.shape[1], k2.shape[1]

    key_layout = functools.partial(_key_layout, head_dim=dp, dtype=q.dtype)
    if mosaic:
        k1 = permute_fine_keys(key_layout(k1, nbt * pool), pool, nbt)
        k2 = key_layout(k2, KEY_TILE)
    else:
        k1, k2 = key_layout(k1, bs.block_k1), key_layout(k2, bs.block_k2)

    if query_chunk is None:
        # body + halo of one chunk stay within chunk_bytes (the largest power of two that fits).
        chunk = 1 << (max(1, bs.chunk_bytes // (b * hkv * (2 * width) * 4)).bit_length() - 1)
    else:
        chunk = next_pow2(query_chunk)
    chunk = max(min(chunk, bs.max_chunk, next_pow2(t)), tq, _topk_rows(bs, nb_pad))
    if lists_for is not None:
        chunk = max(chunk, lists_for.align)  # whole tiles per chunk, and chunks cover round_up(T, align)
    n_chunks = -(-t // chunk)

    # (pos, q rows, k1, k2) -> (body, halo) of one chunk. The Mosaic kernel reads groups of 16 heads
    # from q in place: no chunk copy of the queries (an XLA gather + transpose: 0.66 ms at 128K).
    # The keys-as-rows kernel copies 8 tokens per box, so in place it needs whole 8-token tiles.
    in_place = mosaic and g == GROUP_ROWS and not (key_rows and t % TILE_TOKENS)
    if mosaic:
        score_call = functools.partial(
            score_tiles_mgpu_keys if key_rows else score_tiles_mgpu,
            n1=n1,
            n2=n2,
            stride=kernel_stride,
            group=g,
            pool=pool,
            width=width,
            # Only the keys-as-rows kernel has a persistent launch; the token-rows one keeps one tile per CTA.
            config=dataclasses.replace(
                bs.mosaic, key_rows=key_rows, persistent=bs.mosaic.persistent and key_rows
            ),
            chunk=chunk if in_place else None,
            # Scores the top-k forces or never reads are not computed (see its forcing rule).
            **({"forced": (local_blocks, k_sel)} if key_rows else {}),
            interpret=interpret,
        )
    else:
        score_call = score_tiles_triton(
            tq=tq,
            g=g,
            gp=gp,
            dp=dp,
            n1=n1,
            n2=n2,
            stride=kernel_stride,
            pool=pool,
            qk_scale=d**-0.5 * _LOG2E,
            exact=exact,
            shapes=(b, hkv, chunk, width, k1.shape[2], k2.shape[2]),
            block_k1=bs.block_k1,
            block_k2=bs.block_k2,
            group_sum=bs.group_sum,
            warps=bs.score_warps,
            stages=bs.score_stages,
            interpret=interpret,
        )

    topk_call = functools.partial(
        _topk_call,
        bs,
        shape=(b, hkv, chunk, width),
        kp=kp,
        masks=lists_for is not None,
        interpret=interpret,
        n1=n1,
        nb=nb,
        stride=kernel_stride,
        pool=pool,
        block_size=block_size,
        init_blocks=init_blocks,
        local_blocks=local_blocks,
        k_sel=k_sel,
    )

    def one_chunk(start, topk):
        pos = jnp.stack([start + q_offset, t - 1 + q_offset]).astype(jnp.int32)
        if in_place:
            body, halo = score_call(jnp.concatenate([pos, jnp.stack([start, t - 1])]), q, k1, k2)
        else:
            # Rows past T repeat token T - 1 (clipped gather) instead of padding all of q.
            rows = jnp.minimum(start + jnp.arange(chunk, dtype=jnp.int32), t - 1)
            q_c = jnp.take(q, rows, axis=1, mode="clip").reshape(b, chunk, hkv, g, d)
            q_c = jnp.pad(q_c, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, dp - d)))
            q_c = q_c.transpose(0, 2, 1, 3, 4)
            q_c = query_rows_head_major(q_c) if key_rows else q_c.reshape(b, hkv, chunk * gp, dp)
            body, halo = score_call(pos, q_c, k1, k2)
        outs = topk(pos, body, halo)  # idx [B, Hkv, C, Kp] (and the masks [B, Hkv, C, cols])
        if lists_for is None:
            return outs[0]
        lists = lists_from_masks(
            pos,
            outs[1],
            tiling=lists_for,
            num_selected=num_selected,
            block_size=block_size,
            step_elems=bs.list_elems,
            warps=bs.list_warps,
            stages=bs.list_stages,
            interpret=interpret,
        )
        return outs[0], lists

    bands = _topk_bands(
        n_chunks,
        chunk,
        t,
        static_offset,
        block_size=block_size,
        nb=nb,
        nb_pad=nb_pad,
        min_cols=nbt,
        enable=bs.topk_bands,
    )
    per_band = [
        lax.map(
            functools.partial(one_chunk, topk=topk_call(cols)), jnp.arange(c0, c1, dtype=jnp.int32) * chunk
        )
        for c0, c1, cols in bands
    ]
    # Chunk outputs stacked on a leading chunk axis: idx [n_chunks, B, Hkv, C, Kp] (and the lists).
    stacked = jax.tree.map(lambda *parts: jnp.concatenate(parts), *per_band)
    idx = stacked if lists_for is None else stacked[0]
    idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, hkv, n_chunks * chunk, kp)[:, :, :t, :num_selected]
    if lists_for is None:
        return idx
    return idx, stack_chunk_lists(stacked[1], tiling=lists_for, num_selected=num_selected, seq_len=t)
