"""Pure, jitted training and evaluation steps on a split NNX model (STYLE.md §6).

The model is split once into a static ``graphdef`` and a ``params`` pytree; every step merges them
inside the traced function, so the jitted steps are functions of pytrees only and the parameter and
optimizer buffers can be donated.

A batch is a dict of ``[B, T]`` arrays: ``tokens`` (int inputs), ``targets`` (int next tokens) and
``loss_mask`` (0/1, which targets count), optionally ``positions`` (int RoPE positions).
"""

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from infllm_jax.parallel import TrainShardings

__all__ = [
    "TrainConfig",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "masked_cross_entropy",
    "row_mean_cross_entropy",
    "split_model",
]

Decay = Literal["cosine", "linear", "constant"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Optimizer and schedule of one training run (AdamW, linear warmup, then decay).

    Attributes:
      learning_rate: peak learning rate, reached after ``warmup_steps``.
      warmup_steps: linear warmup from 0.
      total_steps: steps of the whole run, warmup included; the decay ends here.
      decay: ``"cosine"`` or ``"linear"`` to ``end_lr_ratio * learning_rate``, or ``"constant"``.
      end_lr_ratio: final learning rate as a fraction of the peak.
      weight_decay: decoupled AdamW weight decay, applied to matrices only (not norms).
      grad_clip: global gradient-norm clip.
      b1, b2, eps: Adam moments.
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    decay: Decay = "cosine"
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not isinstance(self.total_steps, int) or self.total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int, got {self.total_steps!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be an int in [0, total_steps={self.total_steps}], "
                f"got {self.warmup_steps!r}"
            )
        if self.decay not in get_args(Decay):
            raise ValueError(f"decay must be one of {get_args(Decay)}, got {self.decay!r}")
        if not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio!r}")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise ValueError(
                f"need weight_decay >= 0 and grad_clip > 0, got {self.weight_decay!r} and {self.grad_clip!r}"
            )
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
            raise ValueError(f"need 0 <= b1, b2 < 1 and eps > 0, got {self.b1!r}, {self.b2!r}, {self.eps!r}")


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then the configured decay until ``total_steps``."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    if cfg.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.total_steps, end)
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    rest = max(cfg.total_steps - cfg.warmup_steps, 1)
    after = optax.linear_schedule(peak, end, rest) if cfg.decay == "linear" else optax.constant_schedule(peak)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on ``make_schedule(cfg)``; weight decay skips vectors (norms)."""

    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            make_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """Splits a model into its static graph and its parameters.

    Raises:
      ValueError: if the model holds non-parameter state (RNG streams, batch statistics): the steps
        here carry parameters only.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the model holds non-Param state, which these steps do not carry: {rest}")
    return graphdef, params


def masked_cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over masked positions.

    Args:
      logits_BTV: ``[B, T, V]`` logits (computed in float32).
      targets_BT: integer ``[B, T]`` target ids.
      mask_BT: ``[B, T]`` 0/1 weights.

    Returns:
      ``(loss_sum, weight_sum)``, float32 scalars.
    """
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)


def row_mean_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Training loss: the mean over rows of each row's mean masked cross-entropy.

    Every row with at least one target weighs the same, so a synthetic-task row whose mask covers a
    few answer tokens is not drowned by full language-modelling rows in a mixed batch. When all
    masks have equal sums (plain LM batches) this is the token mean.

    Args:
      logits_BTV: ``[B, T, V]`` logits.
      targets_BT: integer ``[B, T]`` target ids.
      mask_BT: ``[B, T]`` 0/1 weights.

    Returns:
      float32 scalar.
    """
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    mask_BT = mask_BT.astype(jnp.float32)
    count_B = jnp.sum(mask_BT, axis=-1)
    row_loss_B = jnp.sum(nll_BT * mask_BT, axis=-1) / jnp.maximum(count_B, 1.0)
    has_target_B = (count_B > 0).astype(jnp.float32)
    return jnp.sum(row_loss_B * has_target_B) / jnp.maximum(jnp.sum(has_target_B), 1.0)


def _forward(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    return model(batch["tokens"], batch.get("positions"))


def _on_mesh(step: Callable, shardings: TrainShardings | None) -> Callable:
    """Runs a jitted step under ``jax.set_mesh`` so attention layers see the mesh and run per shard."""
    if shardings is None:
        return step

    def on_mesh(*args):
        with jax.set_mesh(shardings.mesh):
            return step(*args)

    return on_mesh


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, shardings: TrainShardings | None = None
) -> Callable:
    """Returns ``train_step(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

    ``params`` and ``opt_state`` are donated: the caller must use the returned ones. The loss is
    ``row_mean_cross_entropy``. ``metrics`` holds device scalars (``loss``, ``tokens``,
    ``grad_norm``); reading them is the caller's choice.

    Args:
      graphdef: static part of the model (``split_model``); it fixes the attention mode.
      tx: optimizer (``make_optimizer``).
      shardings: where parameters, optimizer state and batch live on a device mesh
        (``infllm_jax.parallel.train_shardings``): data parallelism over ``"data"``, context
        parallelism over ``"seq"``. ``None`` runs on one device.
    """

    def loss_fn(params, batch):
        logits = _forward(graphdef, params, batch)
        loss = row_mean_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return loss, jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def train_step(params, opt_state, batch):
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}

    if shardings is None:
        return jax.jit(train_step, donate_argnums=(0, 1))
    step = jax.jit(
        train_step,
        in_shardings=(shardings.params, shardings.opt_state, shardings.batch),
        out_shardings=(shardings.params, shardings.opt_state, shardings.replicated),
        donate_argnums=(0, 1),
    )
    return _on_mesh(step, shardings)


def make_eval_step(graphdef: nnx.GraphDef, *, shardings: TrainShardings | None = None) -> Callable:
    """Returns ``eval_step(params, batch) -> sums``, jitted (nothing donated).

    The sums add up across batches: ``loss_sum`` and ``tokens`` (masked targets), ``correct``
    (masked targets whose argmax prediction is right), ``exact`` and ``examples`` (rows with at least
    one masked target, and those whose masked targets are all right: teacher-forced exact match).
    """

    def eval_step(params, batch):
        logits = _forward(graphdef, params, batch)
        mask = batch["loss_mask"].astype(jnp.float32)
        loss_sum, count = masked_cross_entropy(logits, batch["targets"], mask)
        right = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32) * mask
        has_target = jnp.sum(mask, axis=-1) > 0
        all_right = jnp.sum(right, axis=-1) == jnp.sum(mask, axis=-1)
        return {
            "loss_sum": loss_sum,
            "tokens": count,
            "correct": jnp.sum(right),
            "exact": jnp.sum(has_target & all_right).astype(jnp.float32),
            "examples": jnp.sum(has_target).astype(jnp.float32),
        }

    if shardings is None:
        return jax.jit(eval_step)
    step = jax.jit(
        eval_step, in_shardings=(shardings.params, shardings.batch), out_shardings=shardings.replicated
    )
    return _on_mesh(step, shardings)
