"""The fused Pallas block selection (pallas_kernels/selection.py) against the XLA reference.

On CPU the kernels run in Pallas interpret mode; on a GPU the same tests compile them through
Triton, and the ``gpu``-marked tests add long sequences.

What is checked:
- float32 inputs: the selection equals ``select_blocks_reference`` exactly. A precondition asserts
  the reference has no near-tie at the top-k border (relative gap > 1e-5), so the check cannot
  depend on float32 summation order.
- bf16 inputs: forced blocks, ascending order, -1 padding, causality and the id count hold exactly,
  and the chosen set is a valid top-k under the float32 reference block scores: every chosen past
  block scores >= every unchosen one times (1 - eps) / (1 + eps). ``eps`` bounds the kernel's
  relative score error from rounding the compressed keys to bf16 (unit roundoff u = 2^-8): a logit
  ``scale * q.K`` moves by at most ``u * scale * sum_d |q_d| |K_d|`` (delta1 for K1, delta2 for K2;
  lse2 moves by at most delta2), so ``p`` moves by at most a factor ``exp(delta1 + delta2)``; the
  ``"mma"`` group sum rounds ``p`` to bf16 (one more factor ``1 + u``); sums of positive terms and
  max-pooling keep relative bounds; 1e-5 more covers float32 arithmetic (exp2, sums). Pooled scores
  stored in bf16 (``MosaicScore.bf16_scores``) add one more factor ``1 + u``: rounding to nearest is
  monotonic, so the kernel's set is a valid top-k of scores each within that factor.
- exact ties (constant keys) go to the lowest block ids, as with ``lax.top_k``.
- a query slice at a traced ``q_offset`` (context parallelism) selects what the full sequence does.
- end to end, ``infllmv2_attention(..., implementation="pallas")`` (this selection + the Pallas
  sparse attention) matches the reference attention on the same selection, and the whole XLA
  pipeline on the tokens whose selection agrees with it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllm_jax import SparseConfig, ops
from infllm_jax.ops import attention, pallas_backend
from infllm_jax.ops.selection import _pool_and_force, _stage1_chunk
from pallas_kernels import selection as pallas_selection
from pallas_kernels.selection_mgpu import MosaicScore
from tests.kernels.cuda_lowering import lower_for_h200

INTERPRET = jax.default_backend() == "cpu"
SMALL = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=16, topk=3, dense_len=-1
)
SHIPPED = SparseConfig(dense_len=-1)
# float32 reference block scores [B, Hkv, T, nb] (+inf forced, -inf without kernels), compiled once.
block_scores = jax.jit(ops.block_scores, static_argnums=2)
BF16_UNIT_ROUNDOFF = 2.0**-8


def qk(seed, b, t, hq, hkv, d, dtype=jnp.float32):
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, t, hq, d), jnp.float32).astype(dtype)
    return q, jax.random.normal(kk, (b, t, hkv, d), jnp.float32).astype(dtype)


_INTERPRET_EXECUTABLES = {}


def pallas_select(q, k, cfg, **kwargs):
    fn = functools.partial(
        pallas_selection.select_blocks,
        **pallas_backend.selection_kwargs(cfg),
        interpret=INTERPRET,
        **kwargs,
    )
    if not INTERPRET:
        return fn(q, k)
    # Compiling the interpreted kernels dominates CPU test time (running them takes ~50 ms); XLA's
    # backend optimisations cost ~60% of it and change no result.
    key = (q.shape, q.dtype, k.shape, cfg, tuple(sorted(kwargs.items())))
    if key not in _INTERPRET_EXECUTABLES:
        lowered = jax.jit(fn).lower(q, k)
        _INTERPRET_EXECUTABLES[key] = lowered.compile({"xla_backend_optimization_level": "0"})
    return _INTERPRET_EXECUTABLES[key](q, k)


def chosen_mask(idx, nb):
    """``[B, Hkv, T, K]`` ids (-1 padded) -> ``[B, Hkv, T, nb]`` bool."""
    idx = np.asarray(idx)
    mask = np.zeros((*idx.shape[:3], nb + 1), bool)
    np.put_along_axis(mask, np.where(idx >= 0, idx, nb), True, axis=-1)
    return mask[..., :nb]


def border_scores(idx, scores, tokens, cfg):
    """Lowest chosen and highest unchosen past-block score per row (``inf`` / ``-inf`` if none)."""
    nb = scores.shape[-1]
    chosen = chosen_mask(idx, nb)
    past = np.arange(nb)[None, None, None, :] <= (np.asarray(tokens) // cfg.block_size)[None, None, :, None]
    lowest = np.where(chosen & past, scores, np.inf).min(axis=-1)
    highest = np.where(~chosen & past, scores, -np.inf).max(axis=-1)
    return lowest, highest


def check_structure(idx, tokens, cfg):
    """Forced blocks, ascending order, -1 suffix, causality and the id count, exactly."""
    idx = np.asarray(idx)
    assert idx.dtype == np.int32 and idx.shape[-1] == cfg.num_selected
    q_block = (np.asarray(tokens) // cfg.block_size)[None, None, :, None]
    valid = idx >= 0
    assert np.all(valid[..., 1:] <= valid[..., :-1]), "-1 only as a suffix"
    gaps = np.diff(np.where(valid, idx, np.iinfo(np.int32).max), axis=-1)
    assert np.all(gaps[valid[..., 1:]] > 0), "valid ids strictly ascending"
    assert np.all(np.where(valid, idx <= q_block, True)), "no block after the token's own"
    want_count = np.minimum(cfg.num_selected, q_block[..., 0] + 1)
    np.testing.assert_array_equal(valid.sum(-1), np.broadcast_to(want_count, valid.shape[:3]))
    j = np.arange(int(q_block.max()) + 1)[None, None, None, :]
    forced = (j <= q_block) & ((j < cfg.init_blocks) | (j >= q_block - cfg.local_blocks))
    chosen = chosen_mask(idx, j.shape[-1])
    assert np.all(chosen[np.broadcast_to(forced, chosen.shape)]), "forced init/local blocks present"


def bf16_score_tolerance(q, k, cfg, group_sum, bf16_scores=False):
    """Relative block-score error bound of the bf16 kernel path (module docstring)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    q_abs = jnp.abs(q.astype(jnp.float32)).reshape(b, t, hkv, hq // hkv, d)
    deltas = []
    for size, stride in (
        (cfg.kernel_size, cfg.kernel_stride),
        (cfg.coarse_kernel_size, cfg.coarse_kernel_stride),
    ):
        kc = jnp.abs(ops.compress_keys(k.astype(jnp.float32), size, stride))  # [B, n, Hkv, D]
        bound = jnp.einsum("btkgd,bnkd->btkgn", q_abs, kc, precision=jax.lax.Precision.HIGHEST)
        deltas.append(float(jnp.max(bound, initial=0.0)) * d**-0.5)
    # 1e-6 relative slack on the float32 bound itself, 1e-5 for the kernel's float32 arithmetic.
    p_rounding = BF16_UNIT_ROUNDOFF if group_sum == "mma" else 0.0
    score_rounding = BF16_UNIT_ROUNDOFF if bf16_scores else 0.0
    bound = np.exp(BF16_UNIT_ROUNDOFF * sum(deltas) * (1 + 1e-6)) * (1 + p_rounding) * (1 + score_rounding)
    return float(bound - 1) + 1e-5


def assert_valid_topk(idx, scores, tokens, cfg, eps):
    lowest, highest = border_scores(idx, scores, tokens, cfg)
    ok = lowest >= highest * (1 - eps) / (1 + eps)
    assert np.all(ok), f"{np.sum(~ok)} rows choose a block scoring below an unchosen one beyond {eps=:.2e}"


def assert_no_near_ties(idx, scores, tokens, cfg, rel=1e-5):
    lowest, highest = border_scores(idx, scores, tokens, cfg)
    finite = np.isfinite(lowest) & np.isfinite(highest)
    near = finite & (lowest > highest) & (lowest - highest <= rel * np.abs(highest))
    assert not np.any(near), "test inputs have a near-tie at the top-k border; pick another seed"


def case(cfg, t, hq, hkv, d, *, chunk=None, group_sum="mma", name):
    return pytest.param(cfg, t, hq, hkv, d, chunk, group_sum, id=name)


EXACT_CASES = [
    case(SMALL, 100, 32, 2, 16, name="G16-T100"),
    case(SMALL, 100, 32, 2, 16, group_sum="reshape", name="G16-T100-reshape"),
    case(SMALL, 77, 3, 1, 8, chunk=16, name="G3-T77-chunked"),
    case(SMALL, 130, 2, 2, 32, name="G1-T130"),
    case(
        dataclasses.replace(SHIPPED, window_size=128, topk=4),
        300,
        16,
        1,
        16,
        chunk=64,
        name="shipped-geometry-T300",
    ),
    case(
        SparseConfig(block_size=4, kernel_size=8, kernel_stride=4, window_size=8, topk=3, dense_len=-1),
        50,
        4,
        2,
        16,
        name="pool1-T50",
    ),
    case(
        dataclasses.replace(SMALL, init_blocks=0, window_size=0, topk=2),
        90,
        4,
        1,
        16,
        name="no-init-no-local",
    ),
]


@pytest.mark.parametrize("cfg,t,hq,hkv,d,chunk,group_sum", EXACT_CASES)
def test_fp32_selection_equals_reference(cfg, t, hq, hkv, d, chunk, group_sum):
    q, k = qk(t + hq, 2, t, hq, hkv, d)
    want = np.asarray(ops.select_blocks_reference(q, k, cfg))
    tokens = np.arange(t)
    assert_no_near_ties(want, np.asarray(block_scores(q, k, cfg)), tokens, cfg)
    block_sizes = pallas_selection.BlockSizes(group_sum=group_sum)
    got = np.asarray(pallas_select(q, k, cfg, query_chunk=chunk, block_sizes=block_sizes))
    check_structure(got, tokens, cfg)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "cfg,t,hq,hkv,d,chunk,group_sum",
    [
        case(SMALL, 100, 32, 2, 16, name="G16-T100"),
        case(SMALL, 100, 32, 2, 16, group_sum="reshape", name="G16-T100-reshape"),
        case(dataclasses.replace(SMALL, topk=5), 203, 6, 2, 64, chunk=64, name="G3-T203-d64-chunked"),
    ],
)
def test_bf16_selection_is_a_valid_topk(cfg, t, hq, hkv, d, chunk, group_sum):
    q, k = qk(7 * t, 1, t, hq, hkv, d, jnp.bfloat16)
    block_sizes = pallas_selection.BlockSizes(group_sum=group_sum)
    got = np.asarray(pallas_select(q, k, cfg, query_chunk=chunk, block_sizes=block_sizes))
    tokens = np.arange(t)
    check_structure(got, tokens, cfg)
    scores = np.asarray(block_scores(q.astype(jnp.float32), k.astype(jnp.float32), cfg), np.float64)
    assert_valid_topk(got, scores, tokens, cfg, bf16_score_tolerance(q, k, cfg, group_sum))


# The keys-as-rows Mosaic scoring kernel at every length (the shipped tiling takes it from 128 blocks).
MOSAIC = dataclasses.replace(pallas_selection.MOSAIC_SELECTION, mosaic=MosaicScore(key_rows_from_blocks=0))
# A 2-slot ring and two store buffers per warpgroup.
MOSAIC_TWO_STORE_BUFFERS = dataclasses.replace(
    MOSAIC, mosaic=dataclasses.replace(MOSAIC.mosaic, stages=2, store_buffers=2)
)
# The token-rows kernel: the group sum as a WGMMA on bf16 p.
MOSAIC_TOKEN_ROWS = dataclasses.replace(MOSAIC, mosaic=MosaicScore(key_rows=False))
# Pooled scores stored in float32 instead of the default bf16, with either kernel.
MOSAIC_F32_SCORES = dataclasses.replace(MOSAIC, mosaic=MosaicScore(key_rows_from_blocks=0, bf16_scores=False))
MOSAIC_TOKEN_ROWS_F32_SCORES = dataclasses.replace(
    MOSAIC, mosaic=MosaicScore(key_rows=False, bf16_scores=False)
)
# One CTA per SM running a strided share of the tiles (two CTAs in the interpreter).
MOSAIC_PERSISTENT = dataclasses.replace(MOSAIC, mosaic=MosaicScore(key_rows_from_blocks=0, persistent=True))
# Both compute warpgroups start each pass together (the default staggers them).
MOSAIC_NO_STAGGER = dataclasses.replace(MOSAIC, mosaic=MosaicScore(key_rows_from_blocks=0, stagger=False))


def group_sum_of(block_sizes, nb):
    """The ``bf16_score_tolerance`` group sum of a tiling over ``nb`` key blocks: the keys-as-rows Mosaic
    kernel sums float32 ``p`` in registers (as ``"reshape"``); the token-rows one and the Triton
    ``"mma"`` round it to bf16."""
    if block_sizes is None:
        block_sizes = pallas_selection.default_block_sizes(jnp.bfloat16, 128, 16, 4, interpret=INTERPRET)
    mosaic = block_sizes.mosaic
    if mosaic is not None:
        return "reshape" if mosaic.key_rows and nb >= mosaic.key_rows_from_blocks else "mma"
    return block_sizes.group_sum


def bf16_scores_of(block_sizes):
    """Whether a tiling's scoring kernel stores its pooled scores in bf16 (the Mosaic kernels' option)."""
    if block_sizes is None:
        block_sizes = pallas_selection.default_block_sizes(jnp.bfloat16, 128, 16, 4, interpret=INTERPRET)
    return block_sizes.mosaic is not None and block_sizes.mosaic.bf16_scores


POOL8 = SparseConfig(block_size=32, kernel_size=8, kernel_stride=4, window_size=32, topk=3, dense_len=-1)
STRIDE1 = SparseConfig(block_size=4, kernel_size=2, kernel_stride=1, window_size=8, topk=4, dense_len=-1)


@pytest.mark.parametrize(
    "cfg,t,hq,hkv,d,chunk,dtype",
    [
        pytest.param(SMALL, 100, 32, 2, 64, None, jnp.bfloat16, id="G16-T100-d64-bf16"),
        pytest.param(
            dataclasses.replace(SMALL, topk=5), 203, 6, 2, 128, 64, jnp.float16, id="G3-T203-d128-f16-chunked"
        ),
        # Stride 1: two coarse and five fine 128-key tiles at T = 600.
        pytest.param(STRIDE1, 600, 16, 1, 64, 256, jnp.bfloat16, id="G16-T600-several-key-tiles"),
        pytest.param(
            dataclasses.replace(SHIPPED, window_size=128, topk=4),
            600,
            16,
            1,
            64,
            128,
            jnp.bfloat16,
            id="shipped-geometry-T600",
        ),
        pytest.param(POOL8, 300, 8, 2, 64, None, jnp.bfloat16, id="pool8-G4-T300"),
    ],
)
def test_mosaic_scoring_is_a_valid_topk(cfg, t, hq, hkv, d, chunk, dtype, block_sizes=MOSAIC):
    """The Mosaic GPU scoring kernel (``selection_mgpu_keys`` by default; the Triton top-k) against the
    float32 reference: exact structure, valid top-k within the bf16 bound (float32 group sums; the
    token-rows kernel's is an MMA on bf16 ``p``, as the Triton ``"mma"`` path's). T = 100 and 203 read
    the query through chunk rows (not whole 8-token tiles), T = 600 in place."""
    q, k = qk(3 * t + hq, 1, t, hq, hkv, d, dtype)
    got = np.asarray(pallas_select(q, k, cfg, query_chunk=chunk, block_sizes=block_sizes))
    tokens = np.arange(t)
    check_structure(got, tokens, cfg)
    scores = np.asarray(block_scores(q.astype(jnp.float32), k.astype(jnp.float32), cfg), np.float64)
    group_sum = group_sum_of(block_sizes, scores.shape[-1])
    eps = bf16_score_tolerance(q, k, cfg, group_sum, bf16_scores_of(block_sizes))
    assert_valid_topk(got, scores, tokens, cfg, eps)


@pytest.mark.parametrize(
    "mosaic",
    [
        MOSAIC_TWO_STORE_BUFFERS.mosaic,
        dataclasses.replace(MOSAIC.mosaic, stages=1, store_buffers=1),
        MOSAIC_TOKEN_ROWS.mosaic,
        MOSAIC_F32_SCORES.mosaic,
        MOSAIC_TOKEN_ROWS_F32_SCORES.mosaic,
        MOSAIC_NO_STAGGER.mosaic,
        dataclasses.replace(MOSAIC_NO_STAGGER.mosaic, persistent=True),
    ],
    ids=[
        "st2-two-store-buffers",
        "st1-one-store-buffer",
        "token-rows",
        "f32-scores",
        "token-rows-f32-scores",
        "no-stagger",
        "no-stagger-persistent",
    ],
)
def test_mosaic_scoring_options_are_a_valid_topk(mosaic):
    """Other ring depths and store buffers than the default (3 slots, one store buffer), the
    token-rows kernel, float32 pooled scores (the default stores bf16) with either kernel, and the
    warpgroups not staggered, over two coarse and five fine key tiles."""
    block_sizes = dataclasses.replace(MOSAIC, mosaic=mosaic)
    test_mosaic_scoring_is_a_valid_topk(STRIDE1, 600, 16, 1, 64, 256, jnp.bfloat16, block_sizes=block_sizes)


@pytest.mark.parametrize(
    "cfg,t,hq,hkv,chunk,store_buffers",
    [
        pytest.param(STRIDE1, 600, 16, 1, 256, 1, id="T600-q-in-place"),
        pytest.param(SMALL, 100, 32, 2, None, 2, id="T100-Hkv2-chunk-rows-two-store-buffers"),
    ],
)
def test_mosaic_persistent_scoring_selects_what_one_tile_per_cta_does(cfg, t, hq, hkv, chunk, store_buffers):
    """The persistent launch (tiles pipelined through double-buffered queries and LSEs, the key ring
    streaming across tiles) computes every score as the one-tile-per-CTA launch does: same selection."""
    q, k = qk(3 * t + hq, 1, t, hq, hkv, 64, jnp.bfloat16)
    one = MosaicScore(key_rows_from_blocks=0, stages=2, store_buffers=store_buffers)
    tilings = [
        dataclasses.replace(MOSAIC, mosaic=dataclasses.replace(one, persistent=p)) for p in (False, True)
    ]
    want, got = (np.asarray(pallas_select(q, k, cfg, query_chunk=chunk, block_sizes=x)) for x in tilings)
    np.testing.assert_array_equal(got, want)


def test_mosaic_query_slice_at_a_traced_offset_matches_the_full_selection():
    # Every token's scores depend on its own rows only, so a slice (other 8-token tiles, other chunk
    # boundaries, more masked tiles) selects bit-identically.
    q, k = qk(22, 1, 150, 16, 1, 64, jnp.bfloat16)
    offset, n = 53, 64
    select = jax.jit(
        functools.partial(
            pallas_selection.select_blocks,
            **pallas_backend.selection_kwargs(SMALL),
            query_chunk=32,
            block_sizes=MOSAIC,
            interpret=INTERPRET,
        )
    )
    got = select(q[:, offset : offset + n], k, q_offset=jnp.int32(offset))
    want = np.asarray(pallas_select(q, k, SMALL, block_sizes=MOSAIC))[:, :, offset : offset + n]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("blocks", [None, 128], ids=["token-rows-tile", "key-rows-pair-tile"])
@pytest.mark.parametrize("pool", [4, 8])
def test_permute_fine_keys_puts_each_blocks_kernels_in_one_column_of_each_slice(pool, blocks):
    """Row ``i * blocks + c`` of a tile of ``blocks * pool`` kernels holds kernel ``pool * c + i``: block
    ``c``'s kernels are column ``c`` of the ``pool`` column slices of a ``KEY_TILE`` tile that the
    token-rows kernel max-pools (``blocks = KEY_TILE / pool``), or row ``c`` of the ``pool`` ring steps of
    a pair tile that the keys-as-rows kernel does (``blocks = 128``)."""
    from pallas_kernels.selection_mgpu import KEY_TILE, permute_fine_keys

    per_tile = KEY_TILE // pool if blocks is None else blocks
    tiles, size = 2, per_tile * pool
    kernels = jnp.arange(tiles * size, dtype=jnp.float32).reshape(1, 1, -1, 1)
    got = np.asarray(permute_fine_keys(kernels, pool, blocks)).reshape(tiles, pool, per_tile)
    tile, i, c = np.meshgrid(np.arange(tiles), np.arange(pool), np.arange(per_tile), indexing="ij")
    np.testing.assert_array_equal(got, tile * size + pool * c + i)


@pytest.mark.skipif(not INTERPRET, reason="reads the interpreter's NaN fill of unwritten outputs")
@pytest.mark.parametrize("persistent", [False, True], ids=["one-tile-per-cta", "persistent"])
def test_mosaic_key_rows_skip_only_scores_the_topk_never_reads(persistent):
    """With ``forced=(local_blocks, num_kept)`` the keys-as-rows kernel writes a block column of a tile
    iff its 64-block half pair tile starts below ``b - local_blocks`` of the tile's last token (and
    none when that token's ``b < num_kept``), and writes the blocks below that bound as it does without
    ``forced`` (the rest of the last half, which the top-k never reads, runs unmasked). Unwritten
    columns are NaN in the interpreter, which makes the skipped ones visible. T = 600 at block 4: two
    pair tiles, dense tiles at the start, tiles whose forced window covers their second pair tile."""
    from pallas_kernels.selection_mgpu import HALO_SHIFT, permute_fine_keys
    from pallas_kernels.selection_mgpu_keys import PAIR_BLOCKS, query_rows_head_major, score_tiles_mgpu_keys

    cfg, t, d, local_blocks, num_kept = STRIDE1, 600, 64, 2, 6
    assert (cfg.local_blocks, cfg.num_selected) == (local_blocks, num_kept)
    q, k = qk(5, 1, t, 16, 1, d, jnp.bfloat16)
    pool = cfg.block_size // cfg.kernel_stride
    nb_pad = 256
    width = nb_pad + HALO_SHIFT + 16

    key_layout = functools.partial(pallas_selection._key_layout, head_dim=d, dtype=q.dtype)
    k32 = k.astype(jnp.float32)
    k1 = pallas_selection.compress_keys(k32, cfg.kernel_size, cfg.kernel_stride)
    k2 = pallas_selection.compress_keys(k32, 4 * cfg.kernel_size, 4 * cfg.kernel_stride)
    n1, n2 = k1.shape[1], k2.shape[1]
    k1 = permute_fine_keys(key_layout(k1, PAIR_BLOCKS * pool), pool, PAIR_BLOCKS)
    k2 = key_layout(k2, 128)
    chunk = 608  # whole 8-token tiles; rows past T repeat token T - 1
    rows = jnp.minimum(jnp.arange(chunk), t - 1)
    q_rows = query_rows_head_major(q[:, rows].reshape(1, chunk, 1, 16, d).transpose(0, 2, 1, 3, 4))
    pos = jnp.array([0, t - 1], jnp.int32)
    mosaic = MosaicScore(key_rows_from_blocks=0, persistent=persistent)

    def score(forced):
        fn = functools.partial(
            score_tiles_mgpu_keys,
            n1=n1,
            n2=n2,
            stride=cfg.kernel_stride,
            group=16,
            pool=pool,
            width=width,
            config=mosaic,
            forced=forced,
            interpret=True,
        )
        return [np.asarray(x[0, 0].astype(jnp.float32)) for x in jax.jit(fn)(pos, q_rows, k1, k2)]

    (body, halo), (body_skip, halo_skip) = score(None), score((local_blocks, num_kept))
    tokens = np.minimum(np.arange(chunk), t - 1)
    tile_last = np.minimum(tokens // 8 * 8 + 7, t - 1)
    last_block = tile_last // cfg.block_size
    cap = np.where(last_block < num_kept, 0, np.maximum(last_block - local_blocks, 0))[:, None]
    j = np.arange(nb_pad)[None, :]
    # Without ``forced`` the kernel writes the halves that any token of the tile sees.
    was_written = ~np.isnan(body[:, :nb_pad])
    written = (j // 64 * 64 < cap) & was_written
    for got, full, cols in (
        (body_skip, body, slice(0, nb_pad)),
        (halo_skip, halo, slice(HALO_SHIFT, HALO_SHIFT + nb_pad)),
    ):
        got, full = got[:, cols], full[:, cols]
        np.testing.assert_array_equal(~np.isnan(got), written)
        scored = written & (j < cap)
        np.testing.assert_array_equal(got[scored], full[scored])
    # Both kinds of skip occur: whole tiles, and second pair tiles inside the forced window.
    assert (cap == 0).any() and (
        (cap > 0) & (cap <= PAIR_BLOCKS) & was_written[:, PAIR_BLOCKS:].any(1, keepdims=True)
    ).any()


_LOWERING_TILINGS = [
    ("default", MOSAIC),
    ("st2-two-store-buffers", MOSAIC_TWO_STORE_BUFFERS),
    ("token-rows", MOSAIC_TOKEN_ROWS),
    ("f32-scores", MOSAIC_F32_SCORES),
    ("token-rows-f32-scores", MOSAIC_TOKEN_ROWS_F32_SCORES),
    ("persistent", MOSAIC_PERSISTENT),
    ("no-stagger", MOSAIC_NO_STAGGER),
]


@pytest.mark.parametrize(
    "block_sizes,group,in_place",
    [
        pytest.param(tiling, 16, in_place, id=f"{name}-{'q-in-place' if in_place else 'chunk-rows'}")
        for name, tiling in _LOWERING_TILINGS
        for in_place in (False, True)
    ]
    # A group of 3 heads (the query is read in place only for groups of 16).
    + [pytest.param(MOSAIC, 3, False, id="default-G3-chunk-rows")],
)
@pytest.mark.parametrize("pool", [4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_mosaic_scoring_lowers_for_cuda(d, pool, block_sizes, group, in_place):
    """The compiled path (real Mosaic lowering and layout inference, SMEM budget), which the
    interpreter does not take, lowers for a CUDA target without a GPU; with the chunk's query rows
    or the whole query read in place."""
    from pallas_kernels.selection_mgpu import score_tiles_mgpu
    from pallas_kernels.selection_mgpu_keys import score_tiles_mgpu_keys

    def abstract(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    chunk = 64
    args = (
        abstract((4 if in_place else 2,), jnp.int32),
        abstract((1, 104, 32, d) if in_place else (1, 2, chunk * 16, d), jnp.bfloat16),
        abstract((1, 2, 1024, d), jnp.bfloat16),
        abstract((1, 2, 128, d), jnp.bfloat16),
    )

    def score(*a):
        return (score_tiles_mgpu_keys if block_sizes.mosaic.key_rows else score_tiles_mgpu)(
            *a,
            n1=1000,
            n2=120,
            stride=16,
            group=group,
            pool=pool,
            width=528,
            config=block_sizes.mosaic,
            chunk=chunk if in_place else None,
        )

    text = jax.jit(score).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("blocks", [127, 128])
def test_shipped_mosaic_tiling_scores_with_key_rows_from_128_blocks(blocks):
    """``MOSAIC_SELECTION`` picks the scoring kernel by the number of key blocks
    (``MosaicScore.key_rows_from_blocks``): token rows below 128, keys as rows from 128 on."""
    t = blocks * SMALL.block_size
    q = jax.ShapeDtypeStruct((1, t, 16, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.bfloat16)
    select = functools.partial(
        pallas_selection.select_blocks,
        **pallas_backend.selection_kwargs(SMALL),
        block_sizes=pallas_selection.MOSAIC_SELECTION,
    )
    text = lower_for_h200(select, q, k)
    assert "infllmv2_select_scores_mgpu" in text
    assert ("infllmv2_select_scores_mgpu_keys" in text) == (blocks >= 128)


def test_mosaic_scoring_rejects_unsupported_inputs():
    q, k = qk(0, 1, 64, 4, 2, 64)
    with pytest.raises(NotImplementedError, match="Mosaic GPU scoring does not support dtype"):
        pallas_select(q, k, SMALL, block_sizes=MOSAIC)
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    pool2 = SparseConfig(block_size=8, kernel_size=8, kernel_stride=4, window_size=8, topk=3, dense_len=-1)
    with pytest.raises(NotImplementedError, match="block_size / kernel_stride = 2"):
        pallas_select(q, k, pool2, block_sizes=MOSAIC)
    assert pallas_selection.default_block_sizes(jnp.bfloat16, 64, 2, 4, interpret=True).mosaic is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_exact_ties_go_to_the_lowest_block_ids(dtype):
    # Identical keys at every position make every compressed key equal, so all blocks with a
    # visible kernel tie exactly; both implementations must then pick the lowest ids.
    q, k = qk(11, 2, 100, 32, 2, 16, dtype)
    k = jnp.broadcast_to(k[:, :1], k.shape)
    want = np.asarray(ops.select_blocks_reference(q, k, SMALL))
    np.testing.assert_array_equal(pallas_select(q, k, SMALL), want)


@pytest.mark.parametrize("ties", [False, True], ids=["random", "all-tied"])
def test_topk_early_exit_is_bit_identical(ties):
    """Stopping the bitwise search once exactly k keys reach the threshold selects the same blocks
    as the 32-pass search, on random scores and on rows that tie at their k-th score."""
    q, k = qk(23, 1, 150, 16, 2, 16)
    if ties:
        k = jnp.broadcast_to(k[:, :1], k.shape)
    cfg = dataclasses.replace(SMALL, topk=5)
    search = {exit_: pallas_selection.BlockSizes(topk_early_exit=exit_) for exit_ in (False, True)}
    want = np.asarray(pallas_select(q, k, cfg, block_sizes=search[False]))
    got = pallas_select(q, k, cfg, block_sizes=search[True])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("q_offset", [0, 200], ids=["whole", "static-slice"])
def test_topk_bands_are_bit_identical(q_offset):
    """Banded top-k widths (16, 32 and 64 block columns here, the first band narrower than k = 24)
    select exactly what one band over all columns selects, also for a query slice."""
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=64, topk=20, dense_len=-1)
    q, k = qk(29, 1, 600, 4, 2, 16)
    q = q[:, q_offset:]
    bands = {on: pallas_selection.BlockSizes(topk_bands=on) for on in (False, True)}
    kwargs = {"q_offset": q_offset, "query_chunk": 64}
    want = np.asarray(pallas_select(q, k, cfg, block_sizes=bands[False], **kwargs))
    got = pallas_select(q, k, cfg, block_sizes=bands[True], **kwargs)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want, ops.select_blocks_reference(q, k, cfg, q_offset=q_offset))


def test_topk_bands_follow_the_last_token_of_each_chunk():
    # 128K tokens in 16 chunks of 8K (the H200 default): 128 blocks per chunk, widths rounded up.
    bands = functools.partial(
        pallas_selection._topk_bands, 16, 8192, 131072, block_size=64, nb=2048, nb_pad=2048, min_cols=16
    )
    assert bands(0, enable=True) == [(0, 1, 128), (1, 2, 256), (2, 4, 512), (4, 8, 1024), (8, 16, 2048)]
    assert bands(0, enable=False) == [(0, 16, 2048)]
    assert bands(None, enable=True) == [(0, 16, 2048)]  # a traced offset
    assert bands(65536, enable=True) == [(0, 16, 2048)]  # a slice of the second half sees > 1024 blocks


@pytest.mark.parametrize("early_exit", [False, True], ids=["32-pass-search", "early-exit"])
def test_triton_selection_lowers_for_cuda(early_exit):
    """The Triton scoring and top-k kernels lower for a CUDA target without a GPU (Pallas -> Triton IR
    for an H200, through an abstract mesh that names the device), which interpret mode does not check."""
    q = jax.ShapeDtypeStruct((1, 4096, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
    block_sizes = pallas_selection.BlockSizes(topk_early_exit=early_exit)

    def select(q, k):
        kwargs = pallas_backend.selection_kwargs(SparseConfig())  # the shipped MiniCPM4 config
        return pallas_selection.select_blocks(q, k, **kwargs, block_sizes=block_sizes)

    text = lower_for_h200(select, q, k)
    assert "infllmv2_select_topk" in text


def test_block_size_options_are_validated():
    with pytest.raises(ValueError, match="group_sum"):
        pallas_selection.BlockSizes(group_sum="sum")
    with pytest.raises(ValueError, match="power of two"):
        pallas_selection.BlockSizes(topk_elems=1000)
    with pytest.raises(ValueError, match="store_buffers must be 1 or 2"):
        MosaicScore(store_buffers=3)
    with pytest.raises(ValueError, match="stages must be >= 1"):
        MosaicScore(stages=0)
    with pytest.raises(ValueError, match="persistent needs the keys-as-rows kernel"):
        MosaicScore(key_rows=False, persistent=True)


def test_registered_as_pallas_select_blocks():
    q, k = qk(132, 2, 100, 32, 2, 16)
    assert attention.SELECT_BLOCKS["pallas"] is pallas_backend.select_blocks_pallas
    got = ops.select_blocks(q, k, SMALL, implementation="pallas")
    np.testing.assert_array_equal(got, ops.select_blocks_reference(q, k, SMALL))


def test_query_slice_at_a_traced_offset_matches_the_full_selection():
    # Context parallelism: a contiguous slice of the queries against all keys, offset traced.
    q, k = qk(21, 1, 150, 8, 2, 16)
    offset, n = 53, 64
    got = ops.select_blocks(
        q[:, offset : offset + n], k, SMALL, implementation="pallas", q_offset=jnp.int32(offset)
    )
    want = ops.select_blocks_reference(q, k, SMALL)[:, :, offset : offset + n]
    np.testing.assert_array_equal(got, want)


def test_unsupported_inputs_raise_not_implemented():
    q, k = qk(0, 1, 64, 4, 2, 16)
    pool3 = SparseConfig(block_size=12, kernel_size=8, kernel_stride=4, window_size=12, topk=2, dense_len=-1)
    with pytest.raises(NotImplementedError, match="power"):
        pallas_backend.select_blocks_pallas(q, k, pool3)
    with pytest.raises(NotImplementedError, match="dtype"):
        pallas_backend.select_blocks_pallas(q, k.astype(jnp.bfloat16), SMALL)


def test_selection_has_no_gradient():
    q, k = qk(1, 1, 64, 4, 2, 16)

    def loss(q, k):
        idx = pallas_selection.select_blocks(
            q,
            k,
            block_size=16,
            kernel_size=8,
            kernel_stride=4,
            init_blocks=1,
            local_blocks=1,
            num_selected=4,
            interpret=INTERPRET,
        )
        return idx.astype(jnp.float32).sum()

    grads = jax.grad(loss, argnums=(0, 1))(q, k)
    assert not np.any(grads[0]) and not np.any(grads[1])


def rms_rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))


def test_prefill_end_to_end_matches_reference():
    if "pallas" not in attention.SPARSE_ATTENTION:
        pytest.skip("the Pallas sparse-attention kernel is not registered")
    cfg = dataclasses.replace(SMALL, window_size=32, topk=3)
    q, k = qk(5, 1, 200, 32, 2, 64, jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(6), k.shape, jnp.float32).astype(jnp.bfloat16)
    got = ops.infllmv2_attention(q, k, v, cfg, implementation="pallas")
    # Same selection, reference attention: isolates the kernels' arithmetic (bf16 output, bf16 P).
    idx = ops.select_blocks(q, k, cfg, implementation="pallas")
    assert rms_rel_err(got, ops.sparse_attention_xla(q, k, v, idx, block_size=cfg.block_size)) < 1e-2
    # Whole XLA pipeline: tokens whose selection agrees with the float32 reference match too.
    want = ops.infllmv2_attention(q, k, v, cfg, implementation="xla")
    same = np.all(np.asarray(idx) == np.asarray(ops.select_blocks_reference(q, k, cfg)), axis=(0, 1, 3))
    assert same.mean() > 0.9
    assert rms_rel_err(np.asarray(got)[:, same], np.asarray(want)[:, same]) < 1e-2


def reference_scores_at(q, k, cfg, tokens):
    """float32 reference block scores ``[B, Hkv, len(tokens), nb]`` for some tokens only."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    k32 = k.astype(jnp.float32)
    k1 = ops.compress_keys(k32, cfg.kernel_size, cfg.kernel_stride)
    k2 = ops.compress_keys(k32, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)
    t_c = jnp.asarray(tokens, jnp.int32)
    q_c = q[:, t_c].astype(jnp.float32).reshape(b, len(tokens), hkv, hq // hkv, d)
    s = _stage1_chunk(q_c, t_c, k1, k2, cfg)
    return np.asarray(_pool_and_force(s, t_c, ops.num_blocks(t, cfg.block_size), cfg), np.float64)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "block_sizes",
    [
        None,
        pallas_selection.BlockSizes(),
        MOSAIC_TWO_STORE_BUFFERS,
        MOSAIC_TOKEN_ROWS,
        MOSAIC_F32_SCORES,
        MOSAIC_PERSISTENT,
    ],
    ids=[
        "default-tiling",
        "triton-scoring",
        "mosaic-st2-two-store-buffers",
        "mosaic-token-rows",
        "mosaic-f32-scores",
        "mosaic-persistent",
    ],
)
def test_gpu_shipped_config_32k_bf16_is_a_valid_topk(block_sizes):
    # The default tiling on an H100/H200 scores with the Mosaic GPU kernel; the Triton one elsewhere.
    t = 32768
    q, k = qk(0, 1, t, 32, 2, 128, jnp.bfloat16)
    got = np.asarray(pallas_select(q, k, SHIPPED, block_sizes=block_sizes))
    check_structure(got, np.arange(t), SHIPPED)
    # Tokens past 6144 choose 62 of their past blocks by score; check a window at 8K and the tail.
    tokens = np.concatenate([np.arange(8000, 8256), np.arange(t - 256, t)])
    scores = reference_scores_at(q, k, SHIPPED, tokens)
    group_sum = group_sum_of(block_sizes, t // SHIPPED.block_size)
    eps = bf16_score_tolerance(q[:, tokens], k, SHIPPED, group_sum, bf16_scores_of(block_sizes))
    assert_valid_topk(got[:, :, tokens], scores, tokens, SHIPPED, eps)


@pytest.mark.gpu
def test_gpu_shipped_tiling_below_128_blocks_is_a_valid_topk():
    # 8000 tokens = 125 blocks: the default tiling scores with the token-rows Mosaic kernel, one tile per
    # CTA, although MOSAIC_SELECTION asks for a persistent launch (which only the keys-as-rows one has).
    # Tokens past 6144 choose 62 of their past blocks by score.
    t = 8000
    q, k = qk(2, 1, t, 32, 2, 128, jnp.bfloat16)
    got = np.asarray(pallas_select(q, k, SHIPPED))
    check_structure(got, np.arange(t), SHIPPED)
    tokens = np.arange(t - 256, t)
    scores = reference_scores_at(q, k, SHIPPED, tokens)
    eps = bf16_score_tolerance(q[:, tokens], k, SHIPPED, group_sum_of(None, t // 64), bf16_scores_of(None))
    assert_valid_topk(got[:, :, tokens], scores, tokens, SHIPPED, eps)


@pytest.mark.gpu
def test_gpu_fp32_8k_matches_reference_up_to_near_ties():
    cfg = dataclasses.replace(SHIPPED, window_size=256, topk=16)
    q, k = qk(1, 1, 8192, 32, 2, 128)
    got = np.asarray(pallas_select(q, k, cfg))
    want = np.asarray(ops.select_blocks_reference(q, k, cfg))
    check_structure(got, np.arange(8192), cfg)
    assert np.mean(np.all(got == want, axis=-1)) > 0.999
    tokens = np.arange(8192 - 512, 8192)
    assert_valid_topk(got[:, :, tokens], reference_scores_at(q, k, cfg, tokens), tokens, cfg, 1e-5)


@pytest.mark.gpu
def test_gpu_128k_selection_memory_is_bounded():
    # The group-summed score matrix alone would be 2 * 131072 * 8191 * 2 B = 4.3 GB in bf16.
    q = jax.ShapeDtypeStruct((1, 131072, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 131072, 2, 128), jnp.bfloat16)
    mem = jax.jit(lambda q, k: pallas_select(q, k, SHIPPED)).lower(q, k).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 2**30, mem
