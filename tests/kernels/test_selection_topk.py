"""The selection's top-k launch (``pallas_kernels.selection._topk_call``) alone, on crafted pooled scores.

The Mosaic scoring kernels store the pooled scores in bf16 (``MosaicScore.bf16_scores``); the top-k
then searches only the top 16 bits of its order-preserving keys, after clearing the low 16 bits that
the key transform sets to ones for negative scores. Here both searches run on the same numbers, given
once as bf16 and once as float32: the selections must be identical, and equal to ``lax.top_k``'s rule
(larger score first, lower block id on a tie) applied to the kernel's documented block scores. The
values come from a small grid of bf16 numbers, so rows hold many exact ties and neighbours one bf16
unit apart, of both signs, and zeros.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selection as pallas_selection
from pallas_kernels.selection_mgpu import HALO_SHIFT

INTERPRET = jax.default_backend() == "cpu"
# Block 16 = 4 kernels of stride 4 (size 8); 1 init block and 2 local blocks forced; 12 blocks kept per token.
BLOCK, STRIDE, POOL, INIT, LOCAL, NUM_SELECTED = 16, 4, 4, 1, 2, 12
ROWS, NB = 8, 40
NB_PAD = 64
WIDTH = NB_PAD + HALO_SHIFT + 16
N1 = (NB * BLOCK - 2 * STRIDE) // STRIDE + 1  # fine kernels of 640 keys
KP = 16  # next power of two above NUM_SELECTED (a spare slot for the masked scatter)


def grid_values(rng, shape, negative, zeros):
    """bf16-exact values +-(0.5 + i / 256) (one bf16 unit apart) for i < 12, each negative with probability
    ``negative``, or 0 with probability ``zeros``."""
    values = (0.5 + rng.integers(0, 12, shape) / 256.0) * np.where(rng.random(shape) < negative, -1.0, 1.0)
    return np.where(rng.random(shape) < zeros, 0.0, values).astype(np.float32)


def run_topk(first, body, halo, *, early_exit):
    """``select_blocks``' top-k launch on ``ROWS`` tokens at key positions ``first, first + 1, ...``.

    Returns:
      int ``[ROWS, NUM_SELECTED]``: ascending kept block ids, -1 padded.
    """
    # One program of ROWS rows over NB_PAD columns.
    tiling = pallas_selection.BlockSizes(topk_elems=ROWS * NB_PAD, topk_early_exit=early_exit)
    call = pallas_selection._topk_call(
        tiling,
        NB_PAD,
        shape=(1, 1, ROWS, WIDTH),
        kp=KP,
        masks=False,
        interpret=INTERPRET,
        k_sel=NUM_SELECTED,
        n1=N1,
        nb=NB,
        stride=STRIDE,
        pool=POOL,
        block_size=BLOCK,
        init_blocks=INIT,
        local_blocks=LOCAL,
    )
    pos = jnp.array([first, first + ROWS - 1], jnp.int32)
    (idx,) = call(pos, body[None, None], halo[None, None])
    return np.asarray(idx)[0, 0, :, :NUM_SELECTED]


def block_scores(first, body, halo):
    """The kernel's documented block scores ``[ROWS, NB]`` (+inf forced, -inf without kernels) and each
    token's block."""
    t = first + np.arange(ROWS)[:, None]
    j = np.arange(NB)[None, :]
    n1_vis = np.minimum(np.maximum(t + 1 - 2 * STRIDE + STRIDE, 0) // STRIDE, N1)
    own = np.where(POOL * j < n1_vis, body[:, :NB], 0.0)
    prev_last = np.where((j >= 1) & (POOL * j <= n1_vis), halo[:, HALO_SHIFT - 1 : HALO_SHIFT - 1 + NB], 0.0)
    score = np.where(np.maximum(POOL * j - 1, 0) < N1, np.maximum(own, prev_last), -np.inf)
    q_block = t // BLOCK
    return np.where((j < INIT) | ((j >= q_block - LOCAL) & (j <= q_block)), np.inf, score), q_block


def expected_ids(scores, q_block):
    """``lax.top_k``'s choice (larger first, lower id on a tie), ids past the token's block dropped,
    ascending, -1 padded."""
    _, top = jax.lax.top_k(jnp.asarray(scores), NUM_SELECTED)
    top = np.where(np.asarray(top) <= q_block, np.asarray(top), np.iinfo(np.int32).max)
    top = np.sort(top, axis=1)
    return np.where(top == np.iinfo(np.int32).max, -1, top)


@pytest.mark.parametrize("early_exit", [True, False], ids=["early-exit", "all-passes"])
@pytest.mark.parametrize(
    ("first", "negative", "zeros"),
    [(600, 0.2, 0.1), (600, 0.97, 0.0), (40, 0.5, 0.1)],
    ids=["38-blocks-seen-mostly-positive", "38-blocks-seen-mostly-negative", "3-blocks-seen"],
)
def test_bf16_scores_select_what_float32_scores_of_the_same_values_select(first, negative, zeros, early_exit):
    rng = np.random.default_rng([first, int(negative * 10), early_exit])
    body, halo = (grid_values(rng, (ROWS, WIDTH), negative, zeros) for _ in range(2))
    as_bf16 = (jnp.asarray(body, jnp.bfloat16), jnp.asarray(halo, jnp.bfloat16))
    got_bf16 = run_topk(first, *as_bf16, early_exit=early_exit)
    got_f32 = run_topk(first, jnp.asarray(body), jnp.asarray(halo), early_exit=early_exit)
    scores, q_block = block_scores(first, body, halo)
    want = expected_ids(scores, q_block)
    np.testing.assert_array_equal(got_bf16, got_f32)
    np.testing.assert_array_equal(got_f32, want)
    if first == 600:
        # Some row ties at its k-th score with a block left out (so the tie rule decides) while that score
        # has the sign the case is about (negative scores' keys need their low bits cleared).
        kth = -np.sort(-scores, axis=1)[:, NUM_SELECTED - 1 : NUM_SELECTED]
        tied = (scores == kth).sum(axis=1) > (np.take_along_axis(scores, want, axis=1) == kth).sum(axis=1)
        signed = np.sign(kth[:, 0]) == (-1 if negative > 0.5 else 1)
        assert (tied & signed).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("first", [600, 40], ids=["38-blocks-seen", "3-blocks-seen"])
def test_scores_the_keys_as_rows_kernel_skips_are_never_read(first, dtype):
    """The columns that ``score_tiles_mgpu_keys(..., forced=(LOCAL, NUM_SELECTED))`` leaves unwritten
    (blocks from ``b - LOCAL`` of the tile's last token on; every block when that token's ``b <
    NUM_SELECTED``) may hold anything, NaN included: the selection is the one of the written scores."""
    rng = np.random.default_rng(first)
    body, halo = (grid_values(rng, (ROWS, WIDTH), 0.2, 0.1) for _ in range(2))
    last_block = (first + ROWS - 1) // BLOCK
    skipped = 0 if last_block < NUM_SELECTED else max(last_block - LOCAL, 0)
    # Block j's own kernels are body column j, its last kernel halo column j + HALO_SHIFT.
    garbage_body, garbage_halo = body.copy(), halo.copy()
    garbage_body[:, skipped:] = np.nan
    garbage_halo[:, skipped + HALO_SHIFT :] = np.nan
    want = run_topk(first, jnp.asarray(body, dtype), jnp.asarray(halo, dtype), early_exit=True)
    got = run_topk(first, jnp.asarray(garbage_body, dtype), jnp.asarray(garbage_halo, dtype), early_exit=True)
    np.testing.assert_array_equal(got, want)
    scores, q_block = block_scores(first, body, halo)
    np.testing.assert_array_equal(want, expected_ids(scores, q_block))
