"""Context and data parallelism on 8 fake CPU devices (tests/conftest.py sets the device count)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infllm_jax import InfLLMv2Attention, SparseConfig, infllmv2_attention
from infllm_jax.parallel import (
    attention_runs_per_shard,
    batch_sharding,
    context_parallel_attention,
    make_mesh,
    param_shardings,
)

SMALL = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=16, topk=3, dense_len=-1
)

needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (fake CPU devices are set up)")


def qkv(seed, b, t, hq, hkv, d):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d))
    return tuple(jax.random.normal(key, s) for key, s in zip((kq, kk, kv), shapes, strict=True))


@needs_8
@pytest.mark.parametrize("seq", [2, 4, 8])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_context_parallel_matches_single_device_forward_and_gradients(seq, sparse):
    cfg = SMALL if sparse else dataclasses.replace(SMALL, dense_len=1 << 20)
    mesh = make_mesh(seq=seq)
    b = mesh.shape["data"]
    q, k, v = qkv(seq, b, 128, 4, 2, 8)
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape)

    def loss(attn):
        return lambda q, k, v: jnp.sum(attn(q, k, v) * w)

    single = jax.value_and_grad(loss(lambda q, k, v: infllmv2_attention(q, k, v, cfg)), argnums=(0, 1, 2))
    cp = jax.jit(
        jax.value_and_grad(
            loss(lambda q, k, v: context_parallel_attention(q, k, v, cfg, mesh=mesh)), argnums=(0, 1, 2)
        )
    )
    shard = batch_sharding(mesh)
    (l1, g1), (l2, g2) = single(q, k, v), cp(*(jax.device_put(x, shard) for x in (q, k, v)))
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, c in zip(g1, g2, strict=True):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5)


@needs_8
def test_context_parallel_pallas_kernels_match_single_device_reference():
    # Each shard runs the Pallas selection and sparse-attention kernels (interpreted on CPU) on its
    # query slice, with the traced shard offset as q_offset; 32-token shards = 2 blocks of 16.
    mesh = make_mesh(seq=4)
    b = mesh.shape["data"]
    q, k, v = qkv(11, b, 128, 4, 2, 64)
    w = jax.random.normal(jax.random.PRNGKey(2), q.shape)

    def loss(attn):
        return lambda q, k, v: jnp.sum(attn(q, k, v) * w)

    single = jax.value_and_grad(
        loss(lambda q, k, v: infllmv2_attention(q, k, v, SMALL, implementation="xla")), argnums=(0, 1, 2)
    )

    def sharded(q, k, v):
        return context_parallel_attention(q, k, v, SMALL, mesh=mesh, implementation="pallas")

    cp = jax.jit(jax.value_and_grad(loss(sharded), argnums=(0, 1, 2)))
    shard = batch_sharding(mesh)
    (l1, g1), (l2, g2) = single(q, k, v), cp(*(jax.device_put(x, shard) for x in (q, k, v)))
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, c in zip(g1, g2, strict=True):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5)


@needs_8
def test_context_parallel_rejects_indivisible_lengths():
    mesh = make_mesh(seq=8)
    q, k, v = qkv(0, 1, 100, 2, 1, 8)
    with pytest.raises(ValueError, match="T=100 divisible by seq=8"):
        context_parallel_attention(q, k, v, SMALL, mesh=mesh)


def test_make_mesh_checks_the_device_count():
    with pytest.raises(ValueError, match="positive divisor of the device count"):
        make_mesh(seq=len(jax.devices()) + 1)


@needs_8
def test_fsdp_rule_shards_the_first_divisible_axis():
    mesh = make_mesh(seq=1)
    params = {"w": jnp.zeros((12, 16)), "b": jnp.zeros((16,)), "odd": jnp.zeros((3, 5))}
    shardings = param_shardings(params, mesh, fsdp=True)
    assert shardings["w"].spec == jax.sharding.PartitionSpec(None, "data")
    assert shardings["b"].spec == jax.sharding.PartitionSpec()
    assert shardings["odd"].spec == jax.sharding.PartitionSpec()
    assert param_shardings(params, mesh)["w"].spec == jax.sharding.PartitionSpec()


@needs_8
@pytest.mark.parametrize("seq", [1, 2], ids=["data_only", "data_and_seq"])
def test_attention_layer_runs_per_shard_on_any_multi_device_mesh(seq):
    # XLA cannot partition a Pallas kernel (a custom call on GPU) and would replicate it over the batch,
    # so the layer must wrap attention in shard_map on a data-only mesh too.
    layer = InfLLMv2Attention(32, 4, 2, 8, sparse_config=SMALL, mode="sparse", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (8 // seq, 64, 32))
    mesh = make_mesh(seq=seq)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(layer)(x))
    assert "shard_map" in jaxpr
    assert "shard_map" not in str(jax.make_jaxpr(layer)(x))


@needs_8
def test_attention_layer_keeps_plain_jit_on_a_mesh_with_other_axis_names():
    layer = InfLLMv2Attention(32, 4, 2, 8, sparse_config=SMALL, mode="sparse", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 64, 32))
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert not attention_runs_per_shard()
        y = layer(x)
    np.testing.assert_allclose(y, layer(x), rtol=1e-6, atol=1e-6)
