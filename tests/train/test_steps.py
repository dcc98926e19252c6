"""Pure steps: losses, schedule, optimizer masking, one train step lowering the loss, eval sums."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from infllm_jax.data.tokenizer import ByteTokenizer
from infllm_jax.model import ModelConfig, Transformer
from infllm_jax.train import (
    TrainConfig,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    masked_cross_entropy,
    row_mean_cross_entropy,
    split_model,
)

CONFIG = ModelConfig(
    vocab_size=259,
    num_layers=2,
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
)
TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def byte_batch(b=4, t=32):
    ids = ByteTokenizer().encode(TEXT * 4)
    rows = np.stack([ids[i * 7 : i * 7 + t + 1] for i in range(b)])
    return {
        "tokens": jnp.asarray(rows[:, :-1]),
        "targets": jnp.asarray(rows[:, 1:]),
        "loss_mask": jnp.ones((b, t), jnp.float32),
    }


def test_cross_entropies():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    targets = jnp.array([[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]])
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    loss_sum, count = masked_cross_entropy(logits, targets, mask)
    np.testing.assert_allclose(loss_sum, jnp.sum(nll * mask), rtol=1e-6)
    assert float(count) == 6.0
    # Rows weigh the same: (mean of row 0 + the single target of row 1) / 2.
    expected = (jnp.mean(nll[0]) + nll[1, 0]) / 2
    np.testing.assert_allclose(row_mean_cross_entropy(logits, targets, mask), expected, rtol=1e-6)
    full = jnp.ones_like(mask)
    np.testing.assert_allclose(row_mean_cross_entropy(logits, targets, full), jnp.mean(nll), rtol=1e-6)
    # A row without targets is ignored, not counted as a zero loss.
    empty = mask.at[1].set(0.0)
    np.testing.assert_allclose(row_mean_cross_entropy(logits, targets, empty), jnp.mean(nll[0]), rtol=1e-6)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule(decay):
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, decay=decay, end_lr_ratio=0.1)
    lr = make_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(110)) == pytest.approx(1.0 if decay == "constant" else 0.1)
    if decay == "linear":
        assert float(lr(60)) == pytest.approx(0.55)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(learning_rate=0.0), "learning_rate must be positive"),
        (dict(total_steps=0), "total_steps must be a positive int"),
        (dict(warmup_steps=2000), "warmup_steps must be an int in"),
        (dict(decay="step"), "decay must be one of"),
        (dict(end_lr_ratio=2.0), "end_lr_ratio must be in"),
        (dict(grad_clip=0.0), "grad_clip > 0"),
        (dict(b2=1.0), "0 <= b1, b2 < 1"),
    ],
)
def test_train_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)


def test_weight_decay_skips_norms():
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    _, params = split_model(model)
    tx = make_optimizer(TrainConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # Zero gradients: only weight decay moves parameters, and only matrices.
    chex.assert_trees_all_equal(new["final_norm"], params["final_norm"])
    assert float(jnp.max(jnp.abs(new["embed"]["embedding"][...]))) < float(
        jnp.max(jnp.abs(params["embed"]["embedding"][...]))
    )


def test_split_model_rejects_non_param_state():
    class WithCounter(nnx.Module):
        def __init__(self):
            self.count = nnx.BatchStat(jnp.zeros(()))

    with pytest.raises(ValueError, match="non-Param state"):
        split_model(WithCounter())


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_train_steps_lower_the_loss(mode):
    cfg = dataclasses.replace(CONFIG, attention_mode=mode)
    graphdef, params = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    tx = make_optimizer(TrainConfig(learning_rate=3e-3, warmup_steps=0, total_steps=100))
    opt_state = tx.init(params)
    train_step, eval_step = make_train_step(graphdef, tx), make_eval_step(graphdef)
    batch = byte_batch()
    before = eval_step(params, batch)
    losses = []
    for _ in range(5):
        params, opt_state, metrics = train_step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    after = eval_step(params, batch)
    assert losses[0] == pytest.approx(float(before["loss_sum"] / before["tokens"]), rel=1e-5)
    assert float(after["loss_sum"]) < float(before["loss_sum"])
    assert losses[-1] < losses[0]
    assert set(metrics) == {"loss", "tokens", "grad_norm"} and float(metrics["tokens"]) == 4 * 32


def test_eval_step_sums():
    graphdef, params = split_model(Transformer(CONFIG, rngs=nnx.Rngs(1)))
    batch = byte_batch(b=3, t=16)
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, batch["tokens"])
    pred = jnp.argmax(logits, -1)
    # Make row 0 fully right on its single scored position and row 2 unscored.
    batch["targets"] = batch["targets"].at[0, 4].set(pred[0, 4])
    batch["loss_mask"] = jnp.zeros((3, 16)).at[0, 4].set(1.0).at[1].set(1.0)
    sums = make_eval_step(graphdef)(params, batch)
    assert float(sums["tokens"]) == 17.0
    assert float(sums["examples"]) == 2.0
    right1 = jnp.sum(pred[1] == batch["targets"][1])
    assert float(sums["correct"]) == pytest.approx(1.0 + float(right1))
    assert float(sums["exact"]) == 1.0 + float(right1 == 16)
