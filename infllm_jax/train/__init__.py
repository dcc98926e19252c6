"""Functional training: pure jitted steps, AdamW schedules, and a loop with checkpoints and metrics."""

from infllm_jax.train.loop import (
    MetricsLogger,
    TrainResult,
    checkpoint_manager,
    plot_curves,
    restore_checkpoint,
    run_training,
    save_checkpoint,
)
from infllm_jax.train.steps import (
    TrainConfig,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    masked_cross_entropy,
    row_mean_cross_entropy,
    split_model,
)

__all__ = [
    "MetricsLogger",
    "TrainConfig",
    "TrainResult",
    "checkpoint_manager",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "masked_cross_entropy",
    "plot_curves",
    "restore_checkpoint",
    "row_mean_cross_entropy",
    "run_training",
    "save_checkpoint",
    "split_model",
]
