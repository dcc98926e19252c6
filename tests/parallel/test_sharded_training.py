"""Sharded train/eval steps (data, context and FSDP parallelism) equal the single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infllm_jax import SparseConfig
from infllm_jax.model import Transformer, get_config
from infllm_jax.parallel import make_mesh, train_shardings
from infllm_jax.train import TrainConfig, make_eval_step, make_optimizer, make_train_step, split_model

needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (fake CPU devices are set up)")

CONFIG = get_config(
    "tiny",
    vocab_size=64,
    num_layers=2,
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    sparse=SparseConfig(block_size=8, kernel_size=4, kernel_stride=2, window_size=8, topk=2, dense_len=32),
)


def batch(b, t, seed=0):
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (b, t + 1), 0, CONFIG.vocab_size)
    mask = (jax.random.uniform(jax.random.PRNGKey(seed + 1), (b, t)) > 0.2).astype(jnp.float32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


@needs_8
@pytest.mark.parametrize(
    "data,seq,fsdp", [(8, 1, False), (2, 4, False), (1, 8, False), (4, 2, True)], ids=lambda x: str(x)
)
def test_sharded_step_matches_single_device(data, seq, fsdp):
    graphdef, params = split_model(Transformer(CONFIG, rngs=nnx.Rngs(0)))
    tx = make_optimizer(TrainConfig(total_steps=10, warmup_steps=2))
    b, t = 8, 64  # T=64 >= dense_len=32: the sparse path, with 8 blocks of which 3 are selected
    data_batch = batch(b, t)

    single = make_train_step(graphdef, tx)
    p1, _, m1 = single(copy(params), tx.init(params), data_batch)

    mesh = make_mesh(seq=seq, devices=jax.devices()[: data * seq])
    opt_state = tx.init(params)
    shardings = train_shardings(mesh, params, opt_state, fsdp=fsdp)
    placed = jax.device_put((copy(params), opt_state), (shardings.params, shardings.opt_state))
    sharded = make_train_step(graphdef, tx, shardings=shardings)
    p2, _, m2 = sharded(*placed, jax.device_put(data_batch, shardings.batch))

    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)

    evaluate = make_eval_step(graphdef, shardings=shardings)
    sums = evaluate(jax.device_put(p1, shardings.params), jax.device_put(data_batch, shardings.batch))
    want = make_eval_step(graphdef)(p1, data_batch)
    for key, value in want.items():
        np.testing.assert_allclose(sums[key], value, rtol=1e-5, err_msg=key)
