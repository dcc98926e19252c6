"""The loop: orbax checkpoint round trip, bit-exact resume, JSONL metrics, time budget, plots."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infllm_jax.data.tokenizer import ByteTokenizer
from infllm_jax.model import ModelConfig, Transformer
from infllm_jax.train import (
    MetricsLogger,
    TrainConfig,
    checkpoint_manager,
    make_optimizer,
    make_schedule,
    make_train_step,
    plot_curves,
    restore_checkpoint,
    run_training,
    save_checkpoint,
    split_model,
)

CONFIG = ModelConfig(
    vocab_size=259,
    num_layers=1,
    hidden_size=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    intermediate_size=64,
)
TRAIN = TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=6)
STREAM = ByteTokenizer().encode("And God said, Let there be light: and there was light. " * 40)


def batch_fn(step):
    """A deterministic function of the step, as the loop requires for exact resumption."""
    rng = np.random.default_rng(step)
    starts = rng.integers(0, len(STREAM) - 33, size=4)
    rows = np.stack([STREAM[s : s + 33] for s in starts])
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": np.ones((4, 32), np.float32)}


@pytest.fixture(scope="module")
def setup():
    graphdef, _ = split_model(Transformer(CONFIG, rngs=nnx.Rngs(0)))
    tx = make_optimizer(TRAIN)
    return graphdef, tx, make_train_step(graphdef, tx)


def fresh_state(tx):
    _, params = split_model(Transformer(CONFIG, rngs=nnx.Rngs(0)))
    return params, tx.init(params)


def test_checkpoint_round_trip(tmp_path, setup):
    _, tx, _ = setup
    params, opt_state = fresh_state(tx)
    mngr = checkpoint_manager(tmp_path / "ckpt", max_to_keep=2, save_every=1)
    assert save_checkpoint(mngr, 7, params, opt_state)
    mngr.wait_until_finished()
    template = fresh_state(tx)
    template = jax.tree.map(jnp.zeros_like, template)
    step, restored_params, restored_opt = restore_checkpoint(mngr, *template)
    assert step == 7
    chex.assert_trees_all_equal(restored_params, params)
    chex.assert_trees_all_equal(restored_opt, opt_state)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
        restore_checkpoint(mngr, *template, step=3)
    mngr.close()


def test_resume_reproduces_the_next_losses_exactly(tmp_path, setup):
    _, tx, train_step = setup
    # Uninterrupted: 6 steps, checkpoints every 3 steps, keep-N = 1.
    mngr = checkpoint_manager(tmp_path / "a", max_to_keep=1, save_every=3)
    full = run_training(
        train_step, *fresh_state(tx), batch_fn, num_steps=6, log_every=1, ckpt=mngr, progress=False
    )
    assert mngr.all_steps() == [6]  # keep-N dropped step 3
    mngr.close()
    # Interrupted after 3 steps, then resumed from the step-3 checkpoint by a fresh process state.
    mngr = checkpoint_manager(tmp_path / "b", max_to_keep=2, save_every=3)
    run_training(train_step, *fresh_state(tx), batch_fn, num_steps=3, log_every=1, ckpt=mngr, progress=False)
    step, params, opt_state = restore_checkpoint(mngr, *fresh_state(tx))
    assert step == 3
    resumed = run_training(
        train_step, params, opt_state, batch_fn, num_steps=6, start_step=step, log_every=1, progress=False
    )
    mngr.close()
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[3:]]
    chex.assert_trees_all_equal(resumed.params, full.params)


def test_metrics_log_eval_and_time_budget(tmp_path, setup):
    _, tx, train_step = setup
    logger = MetricsLogger(tmp_path / "m.jsonl")
    calls = []

    def eval_fn(params, step):
        calls.append(step)
        return {"eval_loss": 1.0}

    result = run_training(
        train_step,
        *fresh_state(tx),
        batch_fn,
        num_steps=6,
        tokens_per_step=128,
        log_every=2,
        logger=logger,
        schedule=make_schedule(TRAIN),
        eval_fn=eval_fn,
        eval_every=3,
        extra={"stage": "test"},
        progress=False,
    )
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4, 6]
    assert {"stage", "step", "loss", "ppl", "grad_norm", "lr", "tokens_per_s"} <= set(train_lines[0])
    assert train_lines[0]["ppl"] == pytest.approx(np.exp(train_lines[0]["loss"]))
    assert calls == [3, 6] and result.step == 6 and not result.stopped_early
    # A zero budget stops after the first step and still logs it.
    cut = run_training(train_step, *fresh_state(tx), batch_fn, num_steps=6, time_budget_s=0.0, progress=False)
    assert cut.stopped_early and cut.step == 1 and [r["step"] for r in cut.history] == [1]


def test_plot_curves(tmp_path):
    path = plot_curves({"a": [(0, 1.0), (1, 0.5)], "b": []}, tmp_path / "p.png", title="t", logy=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loop_argument_errors(setup):
    _, tx, train_step = setup
    with pytest.raises(ValueError, match="start_step <= num_steps"):
        run_training(train_step, *fresh_state(tx), batch_fn, num_steps=2, start_step=3, progress=False)
    with pytest.raises(ValueError, match="max_to_keep and save_every must be >= 1"):
        checkpoint_manager("/tmp/unused", save_every=0)
