"""The attention's block lists built from the top-k's masks (pallas_kernels/block_lists.py).

``select_blocks(..., lists_for=)`` must give, entry for entry, the ``TileLists`` that the XLA path
(``canonical_blocks`` + ``tile_lists``) builds from the same selection: across tilings (tile sizes,
shares, a pure union without token phase, token batches, lists grouped by the tile's halves),
sequence lengths that are no multiple of a tile, several query chunks in several top-k bands, and
query slices at static and traced offsets. End to end, ``infllmv2_attention(...,
implementation="pallas")`` takes this path and equals selection followed by sparse attention bit for
bit, forward and gradients. On CPU the kernels run in Pallas
interpret mode; the ``gpu``-marked test compiles them at 32K.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllm_jax import SparseConfig, ops
from infllm_jax.ops import pallas_backend
from pallas_kernels import block_lists, sparse_attention
from pallas_kernels import selection as pallas_selection
from pallas_kernels.tiling import BlockSizes, canonical_blocks, round_up, tile_lists
from tests.kernels.cuda_lowering import lower_for_h200

INTERPRET = jax.default_backend() == "cpu"
SMALL = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3, dense_len=-1
)


def qkv(seed, t, hq=4, hkv=2, d=64, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (1, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (1, t, hkv, d), jnp.float32).astype(dtype)
    return q, k, jax.random.normal(kv, (1, t, hkv, d), jnp.float32).astype(dtype)


def xla_lists(idx, config: BlockSizes, cfg: SparseConfig, q_offset=0):
    tp = round_up(idx.shape[2], config.align)
    ids, _ = canonical_blocks(idx, padded_len=tp, block_size=cfg.block_size, q_offset=q_offset)
    return tile_lists(ids, config, cfg.block_size, q_offset)


def assert_lists_equal(got, want):
    for name, g, w in zip(want._fields, got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape, (name, g.shape, w.shape)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


def select_with_lists(q, k, cfg, config, q_offset=0, **kwargs):
    return pallas_selection.select_blocks(
        q,
        k,
        **pallas_backend.selection_kwargs(cfg),
        q_offset=q_offset,
        lists_for=block_lists.list_tiling(config),
        interpret=INTERPRET,
        **kwargs,
    )


TILINGS = {
    "4-token-tiles-share-2": BlockSizes(),
    "8-token-tiles-share-2": BlockSizes(tile_tokens=8, min_share=2),
    "8-token-tiles-share-3": BlockSizes(tile_tokens=8, min_share=3),
    "8-token-tiles-union-no-token-phase": BlockSizes(tile_tokens=8, min_share=1),
    "8-token-tiles-share-2-half-order": BlockSizes(tile_tokens=8, min_share=2, half_order=True),
    "8-token-tiles-union-half-order": BlockSizes(tile_tokens=8, min_share=1, half_order=True),
    "16-token-tiles-token-batch-2": BlockSizes(tile_tokens=16, min_share=2, token_batch=2),
}


@pytest.mark.parametrize("config", TILINGS.values(), ids=TILINGS.keys())
def test_lists_equal_the_xla_lists(config):
    # 300 tokens: no multiple of any tile; 64-token chunks: five chunks in three top-k bands.
    q, k, _ = qkv(0, 300)
    idx, lists = select_with_lists(q, k, SMALL, config, query_chunk=64)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(select_with_lists(q, k, SMALL, config)[0]))
    assert_lists_equal(lists, xla_lists(idx, config, SMALL))
    assert lists.tile_cnt[..., 0].max() > 0
    if config.min_share > 1:
        assert lists.token_cnt[..., 0].max() > 0  # both phases get blocks


@pytest.mark.parametrize(
    "config",
    [
        TILINGS["4-token-tiles-share-2"],
        TILINGS["8-token-tiles-share-3"],
        TILINGS["8-token-tiles-share-2-half-order"],
    ],
    ids=["4-token-tiles-share-2", "8-token-tiles-share-3", "8-token-tiles-share-2-half-order"],
)
def test_lists_built_over_several_column_steps_equal_the_xla_lists(config):
    # 64 mask elements per step: 16 block columns (the minimum), so tiles walk their up to 19 blocks in
    # two steps and the slot counts carry over from one step to the next; int8 masks (default int32).
    # With half_order the kernel walks such rows twice (the first walk counts the groups), so its groups
    # still span the whole list.
    q, k, _ = qkv(5, 300)
    tiling = pallas_selection.BlockSizes(list_elems=64, list_warps=2, list_mask_dtype="int8")
    idx, lists = select_with_lists(q, k, SMALL, config, query_chunk=128, block_sizes=tiling)
    assert_lists_equal(lists, xla_lists(idx, config, SMALL))


@pytest.mark.parametrize("lp", [1024, 2048], ids=["packed-counts", "one-prefix-sum-per-group"])
def test_half_order_ranks_count_each_group(lp):
    """Both ways of ranking the halves' groups (three counts packed in one prefix sum while they fit,
    else one prefix sum per group) give each shared column its rank within its group, and the counts."""
    rng = np.random.default_rng(7)
    cols = 512
    bits = rng.integers(0, 256, size=(1, cols), dtype=np.int32)
    shared = rng.random((1, cols)) < 0.6
    group = block_lists._half_group(jnp.asarray(bits), 8)
    rank, counts = block_lists._group_ranks(group, jnp.asarray(shared), 3, lp)
    first, second = (bits & 0x0F) != 0, (bits & 0xF0) != 0
    want_group = np.where(second, np.where(first, 1, 2), 0)
    np.testing.assert_array_equal(np.asarray(group), want_group)
    for g in range(3):
        members = shared[0] & (want_group[0] == g)
        np.testing.assert_array_equal(np.asarray(rank)[0, members], np.arange(1, members.sum() + 1))
        assert int(counts[g][0, 0]) == members.sum()


def test_list_kernel_launch_parameters_are_validated():
    with pytest.raises(ValueError, match="list_elems"):
        pallas_selection.BlockSizes(list_elems=1000)
    with pytest.raises(ValueError, match="list_mask_dtype"):
        pallas_selection.BlockSizes(list_mask_dtype="bool")


@pytest.mark.parametrize("traced", [False, True], ids=["static-offset", "traced-offset"])
def test_lists_of_a_query_slice_equal_the_xla_lists(traced):
    # Context parallelism: queries [96, 296) against all 296 keys, tiles counted from the slice start.
    q, k, _ = qkv(1, 296)
    config = TILINGS["8-token-tiles-share-2"]
    offset = jnp.int32(96) if traced else 96
    idx, lists = select_with_lists(q[:, 96:], k, SMALL, config, q_offset=offset, query_chunk=64)
    assert_lists_equal(lists, xla_lists(idx, config, SMALL, q_offset=96))


def test_tilings_without_mask_free_group_or_tile_phase_are_left_to_xla():
    assert block_lists.list_tiling(BlockSizes(tile_tokens=0)) is None
    assert block_lists.list_tiling(BlockSizes(mask_split=True)) is None
    assert block_lists.list_tiling(sparse_attention.MOSAIC_BLOCK_SIZES) == block_lists.ListTiling(
        8, 2, 8, True
    )


def test_infllmv2_attention_builds_the_lists_in_the_selection():
    q, k, v = qkv(2, 200)
    fused = jax.jit(lambda q, k, v: ops.infllmv2_attention(q, k, v, SMALL, implementation="pallas"))
    assert "infllmv2_block_lists" in str(fused.trace(q, k, v).jaxpr)

    def composed(q, k, v):
        idx = ops.select_blocks(q, k, SMALL, implementation="pallas")
        return ops.sparse_attention(q, k, v, idx, block_size=SMALL.block_size, implementation="pallas")

    assert "infllmv2_block_lists" not in str(jax.make_jaxpr(composed)(q, k, v))
    np.testing.assert_array_equal(np.asarray(fused(q, k, v)), np.asarray(composed(q, k, v)))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * v.mean(axis=2, keepdims=True))

    grads = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, jax.grad(loss(composed), argnums=(0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "tiling",
    [None, BlockSizes(tile_tokens=0)],
    ids=["default-tiling-with-lists", "token-phase-only-no-lists"],
)
def test_the_prefill_stages_compose_to_infllmv2_attention_pallas(tiling):
    # experiments/power_draw.py times the two stages apart; together they are the whole op.
    q, k, v = qkv(4, 200)
    config = pallas_backend.prefill_attention_tiling(q, k, SMALL, tiling)
    idx, lists = pallas_backend.prefill_selection_pallas(q, k, SMALL, attention_tiling=config)
    assert (lists is None) == (block_lists.list_tiling(config) is None)
    staged = pallas_backend.prefill_attention_pallas(q, k, v, idx, lists, SMALL, attention_tiling=config)
    whole = pallas_backend.infllmv2_attention_pallas(
        q, k, v, SMALL, select_q=q, select_k=k, attention_tiling=tiling
    )
    np.testing.assert_array_equal(np.asarray(staged), np.asarray(whole))


def test_lists_of_the_wrong_shape_are_rejected():
    q, k, v = qkv(3, 64)
    config = TILINGS["8-token-tiles-share-2"]
    idx, lists = select_with_lists(q, k, SMALL, config)
    wrong = lists._replace(tile_ids=lists.tile_ids[:, :, :-1])
    with pytest.raises(ValueError, match="lists do not fit the tiling"):
        sparse_attention.sparse_attention_pallas(
            q, k, v, idx, block_size=SMALL.block_size, config=config, lists=wrong, interpret=INTERPRET
        )


@pytest.mark.parametrize("list_elems", [4096, 256], ids=["one-walk", "two-walks"])
def test_block_lists_kernel_lowers_for_cuda(list_elems):
    """The mask output of the top-k and the list kernel lower for an H200 (Pallas -> Triton IR), which
    interpret mode does not check: with the Hopper tiling's half-order lists, in one walk over the 64
    block columns of 4096 tokens, or in two (32-column steps)."""
    q = jax.ShapeDtypeStruct((1, 4096, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 4096, 2, 128), jnp.bfloat16)
    tiling = block_lists.list_tiling(sparse_attention.MOSAIC_BLOCK_SIZES)

    def select(q, k):
        kwargs = pallas_backend.selection_kwargs(SparseConfig())
        block_sizes = pallas_selection.BlockSizes(list_elems=list_elems)
        return pallas_selection.select_blocks(q, k, **kwargs, block_sizes=block_sizes, lists_for=tiling)

    text = lower_for_h200(select, q, k)
    assert "infllmv2_block_lists" in text


@pytest.mark.gpu
def test_gpu_32k_lists_and_prefill_equal_the_xla_lists():
    cfg = SparseConfig(dense_len=-1)
    q, k, v = qkv(4, 32768, hq=32, hkv=2, d=128, dtype=jnp.bfloat16)
    config = sparse_attention.default_block_sizes(q.dtype, 128, cfg.block_size, interpret=False)
    idx, lists = jax.jit(lambda q, k: select_with_lists(q, k, cfg, config))(q, k)
    assert_lists_equal(lists, jax.jit(lambda idx: xla_lists(idx, config, cfg))(idx))
    fused = jax.jit(lambda q, k, v: ops.infllmv2_attention(q, k, v, cfg, implementation="pallas"))
    composed = jax.jit(
        lambda q, k, v: ops.sparse_attention(q, k, v, idx, block_size=cfg.block_size, implementation="pallas")
    )
    np.testing.assert_array_equal(np.asarray(fused(q, k, v)), np.asarray(composed(q, k, v)))


def test_unsupported_attention_falls_back_per_op_only_without_an_explicit_backend(monkeypatch):
    # Head dim 32: the Pallas selection handles it, the Pallas sparse attention does not.
    from infllm_jax.ops import attention

    q, k, v = qkv(6, 128, d=32)
    monkeypatch.setitem(attention._PREFERENCE, jax.default_backend(), ("pallas", "xla"))
    with pytest.raises(NotImplementedError, match="head dim 32"):
        ops.infllmv2_attention(q, k, v, SMALL, implementation="pallas")
    got = ops.infllmv2_attention(q, k, v, SMALL)  # selection by Pallas, attention by XLA
    idx = ops.select_blocks(q, k, SMALL, implementation="pallas")
    want = ops.sparse_attention(q, k, v, idx, block_size=SMALL.block_size, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
