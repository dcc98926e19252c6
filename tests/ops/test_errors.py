"""Bad inputs fail at the API boundary with a message that says what is wrong."""

import jax.numpy as jnp
import pytest

from infllm_jax import SparseConfig, infllmv2_attention, ops

CFG = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=16, topk=3, dense_len=-1)


def arrays(b=1, t=32, hq=4, hkv=2, d=8, dtype=jnp.float32):
    return jnp.ones((b, t, hq, d), dtype), jnp.ones((b, t, hkv, d), dtype), jnp.ones((b, t, hkv, d), dtype)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=0), "block_size must be a positive int"),
        (dict(kernel_size=8, kernel_stride=3), "must equal 2 \\* kernel_stride"),
        (dict(block_size=18, kernel_size=8, kernel_stride=4, window_size=18), "multiple of kernel_stride"),
        (dict(window_size=100), "window_size=100 must be a multiple of block_size=64"),
        (dict(topk=1, init_blocks=1), "topk=1 must exceed init_blocks=1"),
        (dict(dense_len=-2), "dense_len must be >= 0 or -1"),
        (dict(init_blocks=-1), "init_blocks must be a non-negative int"),
        (dict(topk=2.5), "topk must be a positive int"),
    ],
    ids=lambda x: str(x)[:40] if isinstance(x, dict) else "",
)
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConfig(**kwargs)


def test_config_defaults_are_the_shipped_ones():
    cfg = SparseConfig()
    assert (cfg.block_size, cfg.kernel_size, cfg.kernel_stride, cfg.init_blocks) == (64, 32, 16, 1)
    assert (cfg.window_size, cfg.topk, cfg.dense_len, cfg.use_nope) == (2048, 64, 8192, False)
    assert (cfg.local_blocks, cfg.num_selected) == (32, 96)
    assert (cfg.coarse_kernel_size, cfg.coarse_kernel_stride, cfg.pool_stride) == (128, 64, 4)
    assert not cfg.is_sparse(8191) and cfg.is_sparse(8192)
    assert SparseConfig(dense_len=-1).is_sparse(1)


@pytest.mark.parametrize(
    "q,k,v,exc,match",
    [
        (jnp.ones((32, 4, 8)), *arrays()[1:], ValueError, "q must have shape \\[B, T, Hq, D\\]"),
        (arrays()[0], jnp.ones((1, 32, 2)), arrays()[2], ValueError, "k must have shape"),
        (*arrays(hq=5), ValueError, "query heads \\(5\\) must be a multiple of key/value heads \\(2\\)"),
        (arrays()[0], *arrays(t=31)[1:], ValueError, "share batch and sequence length"),
        (arrays()[0], *arrays(d=16)[1:], ValueError, "share the head dim"),
        (*arrays()[:2], jnp.ones((1, 32, 3, 8)), ValueError, "v must have the shape of k"),
        (arrays()[0].astype(jnp.int32), *arrays()[1:], TypeError, "q must be a floating-point array"),
        (arrays()[0].astype(jnp.bfloat16), *arrays()[1:], TypeError, "share a dtype"),
    ],
    ids=["q-rank", "k-rank", "head-ratio", "seq-len", "head-dim", "v-shape", "int-dtype", "mixed-dtype"],
)
def test_bad_tensors(q, k, v, exc, match):
    with pytest.raises(exc, match=match):
        infllmv2_attention(q, k, v, CFG)


def test_bad_block_idx():
    q, k, v = arrays()
    with pytest.raises(ValueError, match="block_idx must have shape \\[B, Hkv, T, K\\]"):
        ops.sparse_attention(q, k, v, jnp.zeros((1, 32, 2, 3), jnp.int32), block_size=16)
    with pytest.raises(TypeError, match="block_idx must be an integer array"):
        ops.sparse_attention(q, k, v, jnp.zeros((1, 2, 32, 3)), block_size=16)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        ops.sparse_attention(q, k, v, jnp.zeros((1, 2, 32, 3), jnp.int32), block_size=0)


def test_unknown_implementation():
    q, k, v = arrays()
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        infllmv2_attention(q, k, v, CFG, implementation="cuda")


def test_use_nope_needs_pre_rope_inputs():
    q, k, v = arrays()
    cfg = SparseConfig(
        block_size=16, kernel_size=8, kernel_stride=4, window_size=16, topk=3, dense_len=-1, use_nope=True
    )
    with pytest.raises(ValueError, match="use_nope=True"):
        infllmv2_attention(q, k, v, cfg)
    assert infllmv2_attention(q, k, v, cfg, select_q=q, select_k=k).shape == q.shape
