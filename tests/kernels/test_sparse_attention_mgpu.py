"""The Mosaic GPU kernels (``BlockSizes(mosaic=..., mosaic_dkdv=...)``) against the XLA gather reference.

Same checks and tolerances as ``test_sparse_attention_pallas`` (forward, dq/dk/dv, the empty token's
zero rows, bit-identical reruns). On CPU the Mosaic kernel runs in the Mosaic GPU interpreter, which
simulates its warpgroups, TMA copies and barriers; the token phase, dQ and (without
``mosaic_dkdv``) dK/dV run in the Triton interpreter. The interpreter runs each warpgroup as a
thread that blocks inside XLA callbacks while it waits on a barrier, so it needs more XLA CPU
threads than a 2-core host gives one device: ``tests/conftest.py`` splits the host into 8 devices,
which provides them.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import (
    MOSAIC_BLOCK_SIZES,
    MOSAIC_UNION_BLOCK_SIZES,
    UNION_KEY_BLOCKS_PER_SELECTED,
    default_block_sizes,
    prefers_union,
    sparse_attention_pallas,
)
from pallas_kernels.sparse_attention_bwd import build_csr
from pallas_kernels.sparse_attention_mgpu import TILE_TOKENS, tile_phase_mgpu
from pallas_kernels.sparse_attention_mgpu_bwd import LIST_CHUNK, dkdv_mgpu, dq_tile_mgpu, step_lists
from pallas_kernels.tiling import BlockSizes, MosaicDkdv, MosaicTile, canonical_blocks
from tests.kernels.test_sparse_attention_pallas import (
    INTERPRET,
    Case,
    _inputs,
    check_against_reference,
    check_chunked_bit_identical,
    random_block_idx,
)

# Every Mosaic option: FA3 ping-pong, 3-slot ring, every block masked per score (no skipping, no
# unmasked or row-mask paths), and the pure union (no token phase); the Mosaic dK/dV kernel with a
# one-slot ring.
SCORE_MASKS = MosaicTile(skip_unselected=False, unmasked_path=False, row_masks=False)
PINGPONG_UNION = BlockSizes(
    tile_tokens=8,
    min_share=1,
    mosaic=dataclasses.replace(SCORE_MASKS, stages=3, pingpong=True),
    mosaic_dkdv=MosaicDkdv(stages=1),
    mosaic_dq=dataclasses.replace(SCORE_MASKS, stages=1),
)
# The session-2 default: the 64-key Mosaic forward (skip and unmasked paths; row masks since session 6)
# with the Triton backward;
# and the default with only the Mosaic dK/dV (the default has the Mosaic dQ tile phase and dK/dV).
TRITON_BWD = dataclasses.replace(MOSAIC_BLOCK_SIZES, mosaic=MosaicTile(), mosaic_dkdv=None, mosaic_dq=None)
MOSAIC_DKDV = dataclasses.replace(MOSAIC_BLOCK_SIZES, mosaic_dq=None)
# 128-key forward steps (two list entries per ring slot); with the pure union and ping-pong too, where
# every block before the warpgroup's tokens takes the row-mask path (forward and dQ: no skipping, no
# unmasked path), list padding included.
PAIRS = dataclasses.replace(MOSAIC_BLOCK_SIZES, mosaic=MosaicTile(blocks_per_step=2))
ROW_MASKS = MosaicTile(skip_unselected=False, unmasked_path=False)
PAIRS_PINGPONG_UNION = dataclasses.replace(
    PINGPONG_UNION,
    mosaic=dataclasses.replace(ROW_MASKS, blocks_per_step=2, pingpong=True),
    mosaic_dq=dataclasses.replace(ROW_MASKS, stages=1),
)
# The default forward launch is persistent (one CTA per SM running a strided share of the tiles; two
# CTAs in the interpreter), its fp32 state staged in two column slices; here with a bf16/fp16 output
# staged in one (pure union). PAIRS and the configs above run one tile per CTA.
PERSISTENT_UNION = dataclasses.replace(
    PAIRS_PINGPONG_UNION, mosaic=dataclasses.replace(PAIRS_PINGPONG_UNION.mosaic, persistent=True)
)
CASES = [
    Case(g=16, d=64, t=192, hkv=1, block_size=64, k=4, dtype=jnp.bfloat16, config=TRITON_BWD),
    # Block 0's list (~150 tokens) spans two 128-token chunks of the dK/dV kernel's list stream.
    Case(g=16, d=64, t=192, hkv=1, block_size=64, k=4, dtype=jnp.bfloat16, config=MOSAIC_DKDV),
    Case(g=1, d=64, t=130, b=2, hkv=1, block_size=64, k=3, dtype=jnp.float16, config=PINGPONG_UNION),
    # A query slice (context parallelism) with a traced offset, padded rows (G=3) and a tail.
    Case(
        g=3,
        d=128,
        t=100,
        hkv=1,
        block_size=64,
        k=3,
        offset=70,
        keys=230,
        dtype=jnp.bfloat16,
        config=MOSAIC_BLOCK_SIZES,
        traced=True,
    ),
    # Lists of odd and even lengths: the last step of an odd list pairs its block with padding.
    Case(g=16, d=64, t=200, hkv=1, block_size=64, k=3, dtype=jnp.bfloat16, config=PAIRS),
    Case(g=3, d=128, t=130, hkv=1, block_size=64, k=3, dtype=jnp.float16, config=PAIRS_PINGPONG_UNION),
    # Persistent launches: 26 and 34 tiles over two CTAs, two KV heads / batch rows in the tile order.
    Case(g=16, d=64, t=100, hkv=2, block_size=64, k=3, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES),
    Case(g=3, d=128, t=130, b=2, hkv=1, block_size=64, k=3, dtype=jnp.float16, config=PERSISTENT_UNION),
    # The Hopper default for few key blocks per selected block: the default's kernel options on the
    # pure union's lists.
    Case(g=16, d=64, t=150, hkv=2, block_size=64, k=3, dtype=jnp.bfloat16, config=MOSAIC_UNION_BLOCK_SIZES),
]
GPU_CASES = [
    Case(g=16, d=128, t=8192 + 37, block_size=64, k=24, dtype=jnp.bfloat16, config=TRITON_BWD),
    Case(g=2, d=64, t=4096 + 5, block_size=64, k=16, dtype=jnp.bfloat16, config=PINGPONG_UNION),
    Case(g=16, d=128, t=32768, hkv=1, block_size=64, k=8, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES),
    Case(g=16, d=128, t=8192 + 37, block_size=64, k=24, dtype=jnp.bfloat16, config=MOSAIC_DKDV),
    Case(g=4, d=128, t=16384 + 5, hkv=1, block_size=64, k=40, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES),
    Case(g=16, d=64, t=4096 + 11, b=2, block_size=64, k=24, dtype=jnp.float16, config=MOSAIC_BLOCK_SIZES),
    Case(g=16, d=128, t=8192 + 37, block_size=64, k=25, dtype=jnp.bfloat16, config=PAIRS),
    Case(g=4, d=64, t=4096 + 5, b=2, block_size=64, k=15, dtype=jnp.bfloat16, config=PAIRS_PINGPONG_UNION),
    Case(g=16, d=128, t=8192 + 37, block_size=64, k=25, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES),
    Case(g=4, d=64, t=4096 + 5, b=2, block_size=64, k=15, dtype=jnp.bfloat16, config=PERSISTENT_UNION),
    Case(
        g=16, d=128, t=16384, hkv=1, block_size=64, k=40, dtype=jnp.bfloat16, config=MOSAIC_UNION_BLOCK_SIZES
    ),
]


def _ids(case):
    bwd = "".join(f"-{name}" for name in ("dkdv", "dq") if getattr(case.config, f"mosaic_{name}") is not None)
    pairs = "-pairs" if case.config.mosaic.blocks_per_step == 2 else ""
    persistent = "-persistent" if case.config.mosaic.persistent else ""
    return f"{case}-mosaic-{'union' if case.config.min_share == 1 else 'share2'}{pairs}{persistent}{bwd}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference(case):
    check_against_reference(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids)
def test_matches_reference_large(case):
    check_against_reference(case)


def test_chunked_forward_is_bit_identical():
    """Mosaic tile phase per chunk (3 chunks, the last shorter) == one chunk, outputs and gradients."""
    case = Case(g=16, d=64, t=150, hkv=1, block_size=64, k=3, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES)
    check_chunked_bit_identical(case, chunk_tokens=56)


@pytest.mark.gpu
def test_gpu_dynamic_tiles_give_the_strided_output():
    """The compiled persistent forward (T = 32K, 8,192 tiles over one CTA per SM): CTAs taking their
    tiles from the atomic counter (``MosaicTile.dynamic``) compute exactly what CTAs taking tiles
    ``c, c + C, ...`` (the default) do, whichever CTA ran which tile."""
    strided = MOSAIC_BLOCK_SIZES
    case = Case(g=16, d=128, t=32768, hkv=2, block_size=64, k=24, dtype=jnp.bfloat16, config=strided)
    (q, k, v, _), idx = _inputs(case, seed=4)

    def forward(config):
        fn = functools.partial(sparse_attention_pallas, block_size=64, config=config, interpret=INTERPRET)
        return np.asarray(jax.jit(fn)(q, k, v, idx))

    dynamic = dataclasses.replace(strided, mosaic=dataclasses.replace(strided.mosaic, dynamic=True))
    want = forward(strided)
    np.testing.assert_array_equal(forward(dynamic), want)
    # Twice: a second launch starts from a fresh counter.
    np.testing.assert_array_equal(forward(dynamic), want)


def test_config_needs_8_token_tiles():
    with pytest.raises(ValueError, match="8-token tiles"):
        BlockSizes(tile_tokens=4, mosaic=MosaicTile())
    with pytest.raises(ValueError, match="8-token tiles"):
        BlockSizes(tile_tokens=4, mosaic_dq=MosaicTile())
    with pytest.raises(ValueError, match="no ping-pong"):
        BlockSizes(tile_tokens=8, mosaic_dq=MosaicTile(pingpong=True))
    with pytest.raises(ValueError, match="one block per step"):
        BlockSizes(tile_tokens=8, mosaic_dq=MosaicTile(blocks_per_step=2))
    with pytest.raises(ValueError, match="no persistent launch"):
        BlockSizes(tile_tokens=8, mosaic_dq=MosaicTile(persistent=True))
    with pytest.raises(ValueError, match="blocks_per_step must be 1 or 2"):
        MosaicTile(blocks_per_step=3)
    with pytest.raises(ValueError, match="needs persistent=True"):
        MosaicTile(dynamic=True)


@pytest.mark.parametrize(("dtype", "block_size"), [(jnp.float32, 64), (jnp.bfloat16, 32)], ids=str)
def test_unsupported_inputs_raise(dtype, block_size):
    q = jnp.zeros((1, 64, 16, 64), dtype)
    k = jnp.zeros((1, 64, 1, 64), dtype)
    idx = jnp.zeros((1, 1, 64, 2), jnp.int32)
    with pytest.raises(NotImplementedError, match="Mosaic GPU kernels"):
        sparse_attention_pallas(
            q, k, k, idx, block_size=block_size, config=MOSAIC_BLOCK_SIZES, interpret=INTERPRET
        )


def test_default_tiling():
    """Interpret mode and non-Hopper backends default to the Triton tiling; fp32 never gets Mosaic;
    on Hopper inputs of at most UNION_KEY_BLOCKS_PER_SELECTED key blocks per selected block get the
    pure union (256 blocks of 64 keys for the shipped 96 selected blocks)."""
    assert UNION_KEY_BLOCKS_PER_SELECTED * 96 == 256
    short, long = 256 * 64, 256 * 64 + 1
    default = functools.partial(default_block_sizes, jnp.bfloat16, 128, 64)
    assert default(interpret=True) == BlockSizes()
    assert default(interpret=True, num_keys=short, num_selected=96) == BlockSizes()
    assert (
        default_block_sizes(jnp.float32, 128, 64, INTERPRET, num_keys=short, num_selected=96) == BlockSizes()
    )
    hopper = jax.default_backend() == "gpu" and str(jax.devices()[0].compute_capability).startswith("9")
    want = MOSAIC_BLOCK_SIZES if hopper else BlockSizes()
    want_short = MOSAIC_UNION_BLOCK_SIZES if hopper else BlockSizes()
    assert default(interpret=INTERPRET) == want
    assert default(interpret=INTERPRET, num_keys=short) == want  # no selection size: no union
    assert default(interpret=INTERPRET, num_keys=long, num_selected=96) == want
    assert default(interpret=INTERPRET, num_keys=short, num_selected=96) == want_short
    assert MOSAIC_UNION_BLOCK_SIZES.min_share == 1 and not MOSAIC_UNION_BLOCK_SIZES.has_token_phase


def test_the_union_bound_scales_with_the_selection():
    # The shipped 96 selected 64-key blocks: the union up to 256 key blocks (16K tokens), a partial
    # last block counting as one.
    assert prefers_union(16384, 96, 64) and not prefers_union(16385, 96, 64)
    assert prefers_union(16384 - 63, 96, 64)
    # A smaller selection switches at proportionally fewer blocks: 48 selected, 128 blocks.
    assert prefers_union(128 * 64, 48, 64) and not prefers_union(128 * 64 + 1, 48, 64)
    # Blocks, not tokens: 32-key blocks halve the key length at which it switches.
    assert prefers_union(256 * 32, 96, 32) and not prefers_union(256 * 32 + 1, 96, 32)


# Abstract operands of the lowering tests: 1 batch row, 256 tokens, 2 KV heads.
_B, _T, _HKV = 1, 256, 2


def _abstract(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _operands(d):
    """Key offset, q/dO rows ``[B, T, Hkv, 16, D]`` and K/V ``[B, T, Hkv, D]``."""
    return _abstract((1,), jnp.int32), _abstract((_B, _T, _HKV, 16, d)), _abstract((_B, _T, _HKV, d))


def _packed_tile_lists():
    """Packed 8-token tile lists (one 128-entry row) and their counts."""
    tiles = _T // TILE_TOKENS
    return _abstract((_B, _HKV, tiles, 1, 128), jnp.int32), _abstract((_B, _HKV, tiles, 2), jnp.int32)


def _assert_lowers_for_cuda(fn, *args):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    return text


@pytest.mark.parametrize(
    "mosaic",
    [
        MOSAIC_BLOCK_SIZES.mosaic,
        PINGPONG_UNION.mosaic,
        MosaicTile(stages=3, pingpong=True),
        PAIRS.mosaic,
        PAIRS_PINGPONG_UNION.mosaic,
        dataclasses.replace(MOSAIC_BLOCK_SIZES.mosaic, row_masks=False),
        dataclasses.replace(MOSAIC_BLOCK_SIZES.mosaic, persistent=False),
        dataclasses.replace(MOSAIC_BLOCK_SIZES.mosaic, dynamic=True),
        PERSISTENT_UNION.mosaic,
    ],
    ids=[
        "default",
        "pingpong-union",
        "pingpong-skip-unmasked",
        "pairs",
        "pairs-pingpong-union",
        "default-score-masks",
        "default-one-tile-per-cta",
        "default-dynamic-tiles",
        "persistent-pairs-pingpong-union",
    ],
)
def test_lowers_for_cuda(mosaic):
    """The compiled path (register P operand, real Mosaic lowering and layout inference), which the
    interpreter does not take, lowers for a CUDA target without a GPU (D=128, bf16, fp32 state)."""
    off, q5, keys = _operands(128)

    def tile_phase(*a):
        return tile_phase_mgpu(*a, start=0, length=_T, out_dtype=jnp.float32, config=mosaic)

    text = _assert_lowers_for_cuda(tile_phase, off, q5, keys, keys, *_packed_tile_lists())
    # Only the dynamic persistent launch takes its tiles from an atomic counter.
    assert ("atom.add.u32" in text) == mosaic.dynamic


@pytest.mark.parametrize("dkdv", [MosaicDkdv(), MosaicDkdv(stages=1)], ids=["default", "one-slot"])
@pytest.mark.parametrize("d", [64, 128])
def test_dkdv_lowers_for_cuda(dkdv, d):
    """The compiled dK/dV path (register operands, accumulators kept across steps) lowers for CUDA."""
    off, rows, keys = _operands(d)
    entries = _T * 4
    stats = _abstract((_B, _HKV, entries // 4, 2, 64), jnp.float32)
    lists = _abstract((_B, _HKV, entries + LIST_CHUNK), jnp.int32)
    info = _abstract((_B, _HKV, _T // 64, 4), jnp.int32)
    _assert_lowers_for_cuda(
        lambda *a: dkdv_mgpu(*a, config=dkdv), off, rows, keys, keys, rows, stats, lists, info
    )


@pytest.mark.parametrize(
    "dq",
    [MosaicTile(), MosaicTile(stages=1, skip_unselected=False), ROW_MASKS, SCORE_MASKS],
    ids=["default", "no-skip", "row-masks", "score-masks"],
)
def test_dq_lowers_for_cuda(dq):
    """The compiled dQ tile phase (register dS operand, accumulator kept across blocks) lowers for CUDA."""
    off, rows, keys = _operands(128)
    stats = _abstract((_B, _T, _HKV, 16), jnp.float32)

    def tile_phase(*a):
        return dq_tile_mgpu(*a, out_dtype=jnp.float32, config=dq)

    _assert_lowers_for_cuda(tile_phase, off, rows, keys, keys, rows, stats, stats, *_packed_tile_lists())


def test_step_lists_realign_csr():
    """``step_lists``: each block's CSR list starts at a multiple of 32 and is padded with its last
    token; the per-step stats are the LSE / delta rows of the step's 4 tokens; ``info`` follows
    ``order`` (empty blocks included)."""
    rng = np.random.default_rng(4)
    t, k, bs, hkv = 256, 6, 64, 2
    ids, _ = canonical_blocks(random_block_idx(rng, 1, hkv, t, k, bs), padded_len=t, block_size=bs)
    tokens, spans, order = build_csr(ids, block_size=bs, pad=0, mask_split=True)
    lse = jnp.asarray(rng.standard_normal((1, t, hkv, 16)), jnp.float32)
    delta = jnp.asarray(rng.standard_normal((1, t, hkv, 16)), jnp.float32)
    lists, stats, info = jax.device_get(step_lists(tokens, spans, order, lse, delta))
    tokens, spans, order = jax.device_get((tokens, spans, order))
    lse, delta = np.asarray(lse), np.asarray(delta)
    for h in range(hkv):
        for rank, (start, end, n_partial, blk) in enumerate(info[0, h]):
            lo, hi, want_partial = spans[0, h, blk]
            assert blk == order[0, h, rank] and n_partial == want_partial
            assert start % 32 == 0 and end - start == hi - lo
            assert lists[0, h, start:end].tolist() == tokens[0, h, lo:hi].tolist()
            padded = -(-(end - start) // 32) * 32
            assert (lists[0, h, end : start + padded] == tokens[0, h, hi - 1]).all()
            for step in range(start // 4, (start + padded) // 4):
                toks = lists[0, h, 4 * step : 4 * step + 4]
                np.testing.assert_array_equal(stats[0, h, step, 0], lse[0, toks, h].reshape(64))
                np.testing.assert_array_equal(stats[0, h, step, 1], delta[0, toks, h].reshape(64))
