"""Gather-based sparse attention ("xla") and the public InfLLM-V2 attention against naive loops."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllm_jax import SparseConfig, infllmv2_attention, ops
from tests import naive

SMALL = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=16, topk=3, dense_len=-1
)


def qkv(seed, b, t, hq, hkv, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(kq, (b, t, hq, d), dtype),
        jax.random.normal(kk, (b, t, hkv, d), dtype),
        jax.random.normal(kv, (b, t, hkv, d), dtype),
    )


def random_block_idx(seed, b, hkv, t, n_slots, block_size):
    """Sorted, -1-padded random block ids that always include the token's own block."""
    rng = np.random.default_rng(seed)
    out = np.full((b, hkv, t, n_slots), -1, np.int32)
    for idx in np.ndindex(b, hkv, t):
        qb = idx[2] // block_size
        past = rng.permutation(qb)[: rng.integers(0, n_slots)]
        chosen = np.unique(np.append(past, qb))[:n_slots]
        out[idx][: len(chosen)] = chosen
    return jnp.asarray(out)


def all_blocks(b, hkv, t, block_size):
    nb = -(-t // block_size)
    return jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, hkv, t, nb))


@pytest.mark.parametrize("g", [1, 2, 3, 16])
@pytest.mark.parametrize("d", [64, 128])
def test_sparse_attention_matches_naive(g, d):
    b, hkv, t, bs = 2, 2 if g < 16 else 1, 45, 8
    q, k, v = qkv(g * d, b, t, hkv * g, hkv, d)
    idx = random_block_idx(g + d, b, hkv, t, 3, bs)
    got = ops.sparse_attention(q, k, v, idx, block_size=bs, implementation="xla")
    np.testing.assert_allclose(got, naive.sparse_attention(q, k, v, idx, bs), rtol=1e-5, atol=1e-5)


def test_unused_slots_repeats_and_empty_rows():
    b, t, bs = 1, 20, 4
    q, k, v = qkv(0, b, t, 2, 1, 8)
    idx = np.full((b, 1, t, 3), -1, np.int32)
    idx[0, 0, 5:] = [0, 0, 1]  # a repeated id counts once (union semantics)
    idx[0, 0, 10] = [1, 1, 1]
    # tokens 0..4 select nothing at all: their output must be exactly zero, not NaN
    got = np.asarray(ops.sparse_attention(q, k, v, jnp.asarray(idx), block_size=bs))
    assert np.all(got[:, :5] == 0) and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, naive.sparse_attention(q, k, v, idx, bs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [37, 64])
def test_every_block_selected_equals_dense(t):
    q, k, v = qkv(t, 2, t, 6, 2, 16)
    idx = all_blocks(2, 2, t, 16)
    sparse = ops.sparse_attention(q, k, v, idx, block_size=16)
    dense = ops.dense_attention(q, k, v, implementation="xla")
    np.testing.assert_allclose(sparse, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sparse, naive.dense_causal(q, k, v), rtol=1e-5, atol=1e-5)


def test_every_block_selected_has_dense_gradients():
    t = 40
    q, k, v = qkv(1, 1, t, 4, 2, 16)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)
    idx = all_blocks(1, 2, t, 8)

    def loss(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    sparse = loss(lambda q, k, v: ops.sparse_attention(q, k, v, idx, block_size=8))
    dense = loss(lambda q, k, v: ops.dense_attention(q, k, v, implementation="xla"))
    for s, d in zip(sparse, dense, strict=True):
        np.testing.assert_allclose(s, d, rtol=1e-4, atol=1e-5)


def test_infllmv2_attention_is_dense_below_dense_len():
    q, k, v = qkv(2, 2, 100, 4, 2, 16)  # 7 blocks, 4 slots: sparse differs from dense
    cfg = dataclasses.replace(SMALL, dense_len=101)
    np.testing.assert_array_equal(infllmv2_attention(q, k, v, cfg), ops.dense_attention(q, k, v))
    # at T == dense_len the sparse path runs (inclusive boundary): selection is really sparse here
    sparse = infllmv2_attention(q, k, v, dataclasses.replace(cfg, dense_len=100))
    assert not np.allclose(sparse, ops.dense_attention(q, k, v), atol=1e-3)


def test_infllmv2_attention_sparse_matches_naive_pipeline():
    q, k, v = qkv(3, 2, 70, 6, 2, 8)
    got = infllmv2_attention(q, k, v, SMALL)
    idx = naive.select(q, k, SMALL)
    np.testing.assert_allclose(
        got, naive.sparse_attention(q, k, v, idx, SMALL.block_size), rtol=1e-5, atol=1e-5
    )


def test_infllmv2_attention_with_enough_slots_equals_dense():
    q, k, v = qkv(4, 1, 64, 4, 1, 16)
    cfg = dataclasses.replace(SMALL, topk=8)  # 9 slots >= 4 blocks: every past block is selected
    np.testing.assert_allclose(
        infllmv2_attention(q, k, v, cfg), ops.dense_attention(q, k, v), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("t0", [0, 17, 33, 63, 79])
def test_causality_gradient_to_future_keys_is_exactly_zero(t0):
    t = 80
    q, k, v = qkv(5, 2, t, 4, 2, 8)

    def out_at_t0(k, v):
        return jnp.sum(infllmv2_attention(q, k, v, SMALL)[:, t0] ** 2)

    gk, gv = jax.grad(out_at_t0, argnums=(0, 1))(k, v)
    assert np.all(np.asarray(gk)[:, t0 + 1 :] == 0) and np.all(np.asarray(gv)[:, t0 + 1 :] == 0)
    assert np.any(np.asarray(gv)[:, : t0 + 1] != 0)


def test_batch_rows_are_independent():
    q, k, v = qkv(6, 3, 50, 4, 2, 8)
    whole = infllmv2_attention(q, k, v, SMALL)
    for i in range(3):
        one = infllmv2_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], SMALL)
        np.testing.assert_allclose(whole[i : i + 1], one, rtol=1e-6, atol=1e-6)
    assert not np.allclose(whole[0], whole[1])


def test_bf16_inputs_keep_their_dtype_and_stay_close_to_fp32():
    q, k, v = qkv(7, 1, 48, 4, 2, 64)
    idx = random_block_idx(7, 1, 2, 48, 3, 16)
    out16 = ops.sparse_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), idx, block_size=16)
    assert out16.dtype == jnp.bfloat16
    ref = ops.sparse_attention(
        *(x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)), idx, block_size=16
    )
    np.testing.assert_allclose(out16.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)


def test_query_chunking_does_not_change_the_result():
    q, k, v = qkv(8, 1, 50, 4, 2, 8)
    idx = random_block_idx(8, 1, 2, 50, 4, 8)
    whole = ops.sparse_attention_xla(q, k, v, idx, block_size=8, query_chunk=64)
    np.testing.assert_allclose(
        ops.sparse_attention_xla(q, k, v, idx, block_size=8, query_chunk=7), whole, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_query_slice_with_offset_equals_the_slice_of_the_full_result(sparse):
    # Context parallelism runs local queries against all keys: the result must be the full one's slice.
    t, lo, hi = 96, 40, 72
    q, k, v = qkv(9, 2, t, 4, 2, 8)
    cfg = SMALL if sparse else dataclasses.replace(SMALL, dense_len=t + 1)
    full = infllmv2_attention(q, k, v, cfg)
    part = jax.jit(lambda q, k, v, off: infllmv2_attention(q, k, v, cfg, q_offset=off))(q[:, lo:hi], k, v, lo)
    np.testing.assert_allclose(part, full[:, lo:hi], rtol=1e-5, atol=1e-6)
    if sparse:
        idx = ops.select_blocks(q[:, lo:hi], k, cfg, q_offset=lo)
        np.testing.assert_array_equal(idx, ops.select_blocks(q, k, cfg)[:, :, lo:hi])
