"""InfLLMv2Attention and RoPE: parameters, shapes, the dense/sparse switch and validation."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infllm_jax import InfLLMv2Attention, SparseConfig
from infllm_jax.nn import apply_rope, visible_fraction
from infllm_jax.ops import dense_attention, select_blocks

# 16-token blocks; with T = 64 there are 4 blocks and a token may select 2 (topk) + 1 (local) = 3.
SPARSE = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=16, topk=2)


def make_attn(cfg=SPARSE, mode="auto", **kwargs):
    return InfLLMv2Attention(32, 4, 2, 8, sparse_config=cfg, mode=mode, rngs=nnx.Rngs(0), **kwargs)


def inputs(b=2, t=64, e=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, e), jnp.float32)


def test_rope_matches_complex_rotation():
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 8))
    pos = jnp.arange(5) + 7
    out = np.asarray(apply_rope(x, pos, theta=100.0))
    # Half-split convention: channel i pairs with channel i + D/2, frequency theta^(-2i/D).
    xn = np.asarray(x, np.float64)
    z = xn[..., :4] + 1j * xn[..., 4:]
    freq = 100.0 ** (-np.arange(4) * 2 / 8)
    z = z * np.exp(1j * np.asarray(pos)[None, :, None, None] * freq)
    np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(3), (1, 1, 1, 16))

    def score(m, n):
        return float(jnp.sum(apply_rope(q, jnp.array([m])) * apply_rope(k, jnp.array([n]))))

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)


def test_parameters_are_exactly_dense_attention():
    attn = make_attn()
    params = nnx.state(attn, nnx.Param)
    assert sorted(params.keys()) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert all(sorted(params[name].keys()) == ["kernel"] for name in params.keys())  # no biases
    assert attn.q_proj.kernel.shape == (32, 4 * 8)
    assert attn.k_proj.kernel.shape == attn.v_proj.kernel.shape == (32, 2 * 8)
    assert attn.o_proj.kernel.shape == (4 * 8, 32)
    assert len(jax.tree.leaves(nnx.state(attn))) == 4
    # Every mode holds the same parameters: a dense checkpoint loads into sparse mode unchanged.
    for mode in ("dense", "sparse"):
        other = nnx.state(make_attn(mode=mode), nnx.Param)
        chex.assert_trees_all_equal(params, other)


@pytest.mark.parametrize("mode", ["dense", "sparse", "auto"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_shapes_and_dtypes(mode, dtype):
    attn = make_attn(mode=mode, dtype=dtype)
    y = attn(inputs(t=48))
    assert y.shape == (2, 48, 32)
    assert y.dtype == (dtype or jnp.float32)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_dense_and_sparse_agree_when_every_block_is_selected():
    # 4 blocks, num_selected = 2 + 2 = 4: every causal block is selected, so sparse == dense.
    cfg = dataclasses.replace(SPARSE, window_size=32)
    x = inputs()
    dense = make_attn(cfg, mode="dense")(x)
    sparse = make_attn(cfg, mode="sparse")(x)
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), rtol=1e-5, atol=1e-5)


def test_sparse_differs_from_dense_when_selection_is_sparse():
    x = inputs()
    dense = make_attn(mode="dense")(x)
    sparse = make_attn(mode="sparse")(x)
    # Tokens in the first 3 blocks see every earlier block either way; the last block does not.
    np.testing.assert_allclose(np.asarray(sparse[:, :48]), np.asarray(dense[:, :48]), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(sparse[:, 48:] - dense[:, 48:]))) > 1e-4


def test_auto_mode_switches_at_dense_len():
    cfg = dataclasses.replace(SPARSE, dense_len=64)
    x = inputs()
    auto = make_attn(cfg, mode="auto")
    np.testing.assert_array_equal(auto(x[:, :63]), make_attn(cfg, mode="dense")(x[:, :63]))
    np.testing.assert_array_equal(auto(x), make_attn(cfg, mode="sparse")(x))


def test_select_uses_post_rope_keys_unless_use_nope():
    x = inputs()
    attn = make_attn()
    q, k, _, q_raw, k_raw = attn._qkv(x, None)
    np.testing.assert_array_equal(attn.select(x), select_blocks(q, k, SPARSE))
    nope = make_attn(dataclasses.replace(SPARSE, use_nope=True))
    np.testing.assert_array_equal(nope.select(x), select_blocks(q_raw, k_raw, SPARSE))
    assert nope(x).shape == x.shape


def test_positions_shift_rope_only():
    attn = make_attn(mode="dense")
    x = inputs(t=32)
    q, k, v, _, _ = attn._qkv(x, jnp.arange(32) + 5)
    expected = attn.o_proj(dense_attention(q, k, v).reshape(2, 32, 32))
    np.testing.assert_allclose(np.asarray(attn(x, jnp.arange(32) + 5)), np.asarray(expected), atol=1e-6)
    batched = jnp.broadcast_to(jnp.arange(32) + 5, (2, 32))
    np.testing.assert_allclose(np.asarray(attn(x, batched)), np.asarray(expected), atol=1e-6)


def test_visible_fraction():
    # One token per block, block_size 1: token t selecting blocks {0, t} sees 2 of t + 1 keys (1 at t = 0).
    t = 4
    ids = jnp.stack([jnp.zeros(t, jnp.int32), jnp.arange(t, dtype=jnp.int32)], -1)  # [T, 2]
    ids = ids.at[0, 1].set(-1)[None, None]
    expected = np.mean([1.0, 2 / 2, 2 / 3, 2 / 4])
    assert float(visible_fraction(ids, 1)) == pytest.approx(expected)
    full = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (1, 1, 64, 4))
    assert float(visible_fraction(full, 16)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=3), "multiple of num_kv_heads"),
        (dict(head_dim=7), "head_dim=7 must be even"),
        (dict(hidden_size=0), "hidden_size must be a positive int"),
        (dict(mode="fast"), "mode must be one of"),
        (dict(sparse_config={"topk": 4}), "sparse_config must be a SparseConfig"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, sparse_config=SPARSE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        InfLLMv2Attention(
            args.pop("hidden_size"),
            args.pop("num_heads"),
            args.pop("num_kv_heads"),
            args.pop("head_dim"),
            rngs=nnx.Rngs(0),
            **args,
        )


def test_wrong_input_width_raises():
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 32\]"):
        make_attn()(jnp.zeros((1, 16, 31)))
