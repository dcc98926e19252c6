"""Stage-1 selection against the naive loops of tests/naive.py, plus its invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from infllm_jax import SparseConfig, ops
from tests import naive

SMALL = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=16, topk=3, dense_len=-1
)


def qk(seed, b, t, hq, hkv, d):
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(kq, (b, t, hq, d)), jax.random.normal(kk, (b, t, hkv, d))


@pytest.mark.parametrize("t", [7, 8, 9, 31, 32, 33, 100])
@pytest.mark.parametrize("kernel_size,stride", [(8, 4), (32, 16)])
def test_compress_keys_counts_and_tails(t, kernel_size, stride):
    k = jax.random.normal(jax.random.PRNGKey(t), (2, t, 3, 8))
    got = ops.compress_keys(k, kernel_size, stride)
    want = naive.compress(k, kernel_size, stride)
    assert got.shape == want.shape == (2, ops.num_compressed(t, kernel_size, stride), 3, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [20, 47, 97])
def test_stage1_scores_match_naive(t):
    q, k = qk(t, 2, t, 4, 2, 8)
    got = ops.stage1_scores(q, k, SMALL)
    np.testing.assert_allclose(got, naive.stage1(q, k, SMALL), rtol=2e-5, atol=1e-6)


def test_rows_without_visible_coarse_kernel_score_zero():
    cfg = SMALL  # coarse kernel 32: tokens t < 31 see no coarse kernel, though fine kernels exist
    q, k = qk(0, 1, 40, 2, 1, 8)
    s = np.asarray(ops.stage1_scores(q, k, cfg))
    assert np.all(s[:, :, :31] == 0)
    assert np.all(s[:, :, 31, :7] > 0) and np.all(s[:, :, 31, 7:] == 0)  # fine kernels 0..6 visible at t=31


@pytest.mark.parametrize("t", [33, 129])
def test_block_scores_match_naive(t):
    q, k = qk(t + 1, 1, t, 6, 2, 8)
    got = ops.block_scores(q, k, SMALL)
    want = naive.pool_and_force(naive.stage1(q, k, SMALL), t, SMALL)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        SMALL,
        dataclasses.replace(SMALL, init_blocks=2, window_size=0, topk=4),
        dataclasses.replace(SMALL, window_size=32, topk=2),
        dataclasses.replace(SMALL, block_size=8),
    ],
    ids=lambda c: f"bs{c.block_size}-init{c.init_blocks}-local{c.local_blocks}-topk{c.topk}",
)
@pytest.mark.parametrize("t", [50, 129])
def test_select_blocks_matches_naive(cfg, t):
    q, k = qk(t, 2, t, 6, 2, 8)
    got = np.asarray(ops.select_blocks(q, k, cfg))
    np.testing.assert_array_equal(got, naive.select(q, k, cfg))


def test_chunking_does_not_change_the_selection():
    q, k = qk(3, 1, 150, 4, 2, 8)
    whole = ops.select_blocks_reference(q, k, SMALL, query_chunk=256)
    for chunk in (7, 64):
        np.testing.assert_array_equal(ops.select_blocks_reference(q, k, SMALL, query_chunk=chunk), whole)


def test_gqa_group_sum_shares_the_selection_across_heads():
    q, k = qk(5, 1, 96, 16, 1, 8)
    s = ops.stage1_scores(q, k, SMALL)
    per_head = [ops.stage1_scores(q[:, :, g : g + 1], k, SMALL) for g in range(16)]
    np.testing.assert_allclose(s, sum(per_head), rtol=1e-5, atol=1e-6)


def test_shipped_config_is_dense_equivalent_before_6144_tokens():
    # With 96 slots every token before 96 * 64 tokens can select every past block.
    cfg = SparseConfig(dense_len=-1)
    assert cfg.local_blocks == 32 and cfg.num_selected == 96
    q, k = qk(0, 1, 96 * 64, 2, 1, 16)
    idx = np.asarray(ops.select_blocks(q, k, cfg))
    t = np.arange(96 * 64)
    n_valid = (idx >= 0).sum(-1)
    np.testing.assert_array_equal(n_valid[0, 0], t // 64 + 1)


def check_invariants(idx, t, cfg):
    idx = np.asarray(idx)
    assert idx.dtype == np.int32 and idx.shape[-1] == cfg.num_selected
    q_block = (np.arange(t) // cfg.block_size)[None, None, :, None]
    valid = idx >= 0
    # -1 only as a suffix; valid ids strictly ascending; never a future block
    assert np.all(valid[..., 1:] <= valid[..., :-1])
    diffs = np.diff(np.where(valid, idx, np.iinfo(np.int32).max), axis=-1)
    assert np.all(diffs[valid[..., 1:]] > 0)
    assert np.all(np.where(valid, idx <= q_block, True))
    # every past block that fits is selected: min(num_selected, b(t) + 1) ids per token
    n_valid = valid.sum(-1)
    want = np.broadcast_to(np.minimum(cfg.num_selected, q_block[..., 0] + 1), n_valid.shape)
    np.testing.assert_array_equal(n_valid, want)
    # forced init and local blocks are always present
    for j_fn in (
        lambda qb: np.arange(min(cfg.init_blocks, qb + 1)),
        lambda qb: np.arange(max(0, qb - cfg.local_blocks), qb + 1),
    ):
        for ti in range(0, t, max(1, t // 17)):
            qb = ti // cfg.block_size
            forced = j_fn(qb)
            row = idx[..., ti, :]
            assert np.all(np.isin(forced, row[0, 0])) and np.all(np.isin(forced, row[-1, -1]))


# Every example compiles anew, so shrinking (hundreds of compilations) is switched off.
@settings(max_examples=15, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    pool_stride=st.sampled_from([1, 2, 4]),
    kernel_stride=st.sampled_from([2, 4]),
    init_blocks=st.integers(0, 2),
    local_blocks=st.integers(0, 3),
    extra_topk=st.integers(1, 5),
    t=st.integers(1, 200),
    g=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_selection_invariants_hold_for_random_configs(
    pool_stride, kernel_stride, init_blocks, local_blocks, extra_topk, t, g, seed
):
    block = pool_stride * kernel_stride
    cfg = SparseConfig(
        block_size=block,
        kernel_size=2 * kernel_stride,
        kernel_stride=kernel_stride,
        init_blocks=init_blocks,
        window_size=local_blocks * block,
        topk=init_blocks + extra_topk,
        dense_len=-1,
    )
    q, k = qk(seed, 2, t, 2 * g, 2, 4)
    check_invariants(ops.select_blocks(q, k, cfg), t, cfg)


def test_selection_has_no_gradient():
    q, k = qk(1, 1, 64, 2, 1, 8)
    grads = jax.grad(lambda q, k: ops.select_blocks(q, k, SMALL).astype(jnp.float32).sum(), argnums=(0, 1))
    gq, gk = grads(q, k)
    assert not np.any(gq) and not np.any(gk)


@pytest.mark.slow
def test_select_blocks_32k_tokens_in_bounded_memory():
    # The full score matrix S would be T * n1 * 4 B = 32768 * 8191 * 4 B = 1 GiB for one KV head.
    cfg = SparseConfig(block_size=64, kernel_size=8, kernel_stride=4, window_size=128, topk=8, dense_len=-1)
    q = jax.ShapeDtypeStruct((1, 32768, 2, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 32768, 1, 16), jnp.float32)
    compiled = jax.jit(lambda q, k: ops.select_blocks_reference(q, k, cfg)).lower(q, k).compile()
    mem = compiled.memory_analysis()
    assert mem.temp_size_in_bytes < 256 * 2**20, mem
    qv, kv = qk(0, 1, 32768, 2, 1, 16)
    check_invariants(compiled(qv, kv), 32768, cfg)
