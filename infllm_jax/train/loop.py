"""The training loop around the pure steps: progress bar, JSONL metrics, orbax checkpoints, plots.

The loop never waits for the device on its own account: a step's metrics are read only after the
next step has been dispatched (one step of lag), so the device queue stays full. Batches come from
``batch_fn(step)``, a deterministic function of the step index; together with the checkpointed
``params`` and ``opt_state`` this makes a resumed run bit-identical to an uninterrupted one.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

__all__ = [
    "MetricsLogger",
    "TrainResult",
    "checkpoint_manager",
    "plot_curves",
    "restore_checkpoint",
    "run_training",
    "save_checkpoint",
]


def checkpoint_manager(
    directory: str | os.PathLike, *, max_to_keep: int = 3, save_every: int = 100
) -> ocp.CheckpointManager:
    """An orbax manager that saves every ``save_every`` steps and keeps the newest ``max_to_keep``.

    Raises:
      ValueError: if ``max_to_keep`` or ``save_every`` is not positive.
    """
    if max_to_keep < 1 or save_every < 1:
        raise ValueError(f"max_to_keep and save_every must be >= 1, got {max_to_keep} and {save_every}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every, create=True
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(
    mngr: ocp.CheckpointManager, step: int, params, opt_state, *, force: bool = False
) -> bool:
    """Saves ``(params, opt_state)`` as the state after ``step`` completed steps.

    The device-to-host copy finishes before this returns, so the arrays may be donated right after;
    the write to disk continues in the background (``mngr.wait_until_finished()`` joins it).

    Returns:
      Whether a checkpoint was written (the manager skips steps off its interval unless ``force``).
    """
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)
    )
    return mngr.save(step, args=args, force=force)


def restore_checkpoint(mngr: ocp.CheckpointManager, params, opt_state, *, step: int | None = None):
    """Restores ``(step, params, opt_state)``; the given pytrees are templates (structure, shapes, dtypes).

    Args:
      mngr: the manager.
      params, opt_state: pytrees (or ``jax.ShapeDtypeStruct`` trees) shaped like the saved ones.
      step: which checkpoint (default: the latest).

    Raises:
      FileNotFoundError: if the manager holds no checkpoint (or not ``step``).
    """
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {mngr.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (params, opt_state))
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract[0]), opt_state=ocp.args.StandardRestore(abstract[1])
    )
    restored = mngr.restore(step, args=args)
    return step, restored.params, restored.opt_state


class MetricsLogger:
    """Appends one JSON object per line to a file (``None``: keep records in memory only)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: Mapping[str, Any]) -> None:
        """Stores ``record`` and appends it to the file (numpy scalars become floats/ints)."""
        record = {k: v.item() if isinstance(v, np.generic | np.ndarray) else v for k, v in record.items()}
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


@dataclasses.dataclass
class TrainResult:
    """What ``run_training`` hands back.

    Attributes:
      params, opt_state: the final state (the inputs were donated).
      step: completed steps, counted from the start of the run (resumed steps included).
      history: the logged training records.
      stopped_early: whether the time budget ended the run before ``num_steps``.
      seconds: wall time of this call, compilation included.
    """

    params: Any
    opt_state: Any
    step: int
    history: list[dict[str, Any]]
    stopped_early: bool
    seconds: float


def _to_record(step, metrics, *, tokens_per_step, seconds, schedule, extra):
    loss = float(metrics["loss"])
    record = {**extra, "step": step, "loss": loss, "ppl": math.exp(min(loss, 50.0))}
    record["grad_norm"] = float(metrics["grad_norm"])
    if schedule is not None:
        record["lr"] = float(schedule(step - 1))
    if seconds > 0:
        record["tokens_per_s"] = tokens_per_step / seconds
    return record


def run_training(
    train_step: Callable,
    params,
    opt_state,
    batch_fn: Callable[[int], Mapping[str, Any]],
    *,
    num_steps: int,
    start_step: int = 0,
    tokens_per_step: int = 0,
    log_every: int = 10,
    logger: MetricsLogger | None = None,
    schedule: Callable[[int], Any] | None = None,
    ckpt: ocp.CheckpointManager | None = None,
    eval_fn: Callable[[Any, int], Mapping[str, Any]] | None = None,
    eval_every: int = 0,
    time_budget_s: float | None = None,
    extra: Mapping[str, Any] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Runs ``train_step`` from ``start_step`` to ``num_steps``.

    Args:
      train_step: ``(params, opt_state, batch) -> (params, opt_state, metrics)`` (``make_train_step``).
      params, opt_state: initial (or restored) state; donated.
      batch_fn: ``step -> batch``; deterministic in ``step`` for exact resumption.
      num_steps: total steps of the run (the loop stops at this step count).
      start_step: completed steps already in ``params``/``opt_state`` (after a restore).
      tokens_per_step: tokens per batch, for the throughput column.
      log_every: log one training record every this many steps (and at the last step).
      logger: destination of the records (each carries ``extra``, ``step``, ``loss``, ``ppl``,
        ``grad_norm``, ``lr`` and ``tokens_per_s``).
      schedule: learning-rate schedule, for the ``lr`` column.
      ckpt: checkpoint manager; saves on its interval and always at the end.
      eval_fn: ``(params, step) -> record``, called every ``eval_every`` steps and at the end; its
        record is logged with ``extra`` and ``step``.
      eval_every: evaluation interval in steps (0: only at the end).
      time_budget_s: stop after this many seconds (wall clock, compilation included).
      extra: fields added to every record (e.g. ``{"stage": "long", "arm": "sparse"}``).
      desc: progress-bar label.
      progress: show a tqdm bar; without one, a line is printed every tenth of the run.

    Returns:
      A ``TrainResult``.
    """
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"need 0 <= start_step <= num_steps, got {start_step=} and {num_steps=}")
    logger = logger or MetricsLogger(None)
    extra = dict(extra or {})
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    t_last, step_last = t_start, start_step
    pending = None  # (step, device metrics) of the last dispatched step, read one step later
    stopped_early = False
    done = start_step

    def flush(step_done, metrics, now):
        nonlocal t_last, step_last
        seconds = (now - t_last) / max(step_done - step_last, 1)
        record = _to_record(
            step_done,
            metrics,
            tokens_per_step=tokens_per_step,
            seconds=seconds,
            schedule=schedule,
            extra=extra,
        )
        t_last, step_last = now, step_done
        logger.log(record)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}")
        # Without a bar (logs, batch jobs), one plain line per tenth of the run.
        if not progress and (step_done * 10 // num_steps > (step_done - log_every) * 10 // num_steps):
            tqdm.write(
                f"{desc}: step {step_done}/{num_steps} loss {record['loss']:.4f} "
                f"{record.get('tokens_per_s', 0):.0f} tok/s {now - t_start:.0f}s"
            )

    def evaluate(step_done):
        logger.log({**extra, "step": step_done, **eval_fn(params, step_done)})

    with tqdm(
        total=num_steps, initial=start_step, desc=desc, disable=not progress, dynamic_ncols=True
    ) as bar:
        for step in range(start_step, num_steps):
            params, opt_state, metrics = train_step(params, opt_state, batch_fn(step))
            # Reading the previous step's metrics now blocks only until that step is done, while
            # this one is already queued behind it.
            if pending is not None:
                flush(*pending, time.perf_counter())
                pending = None
            done = step + 1
            if done % log_every == 0 or done == num_steps:
                pending = (done, metrics)
            if ckpt is not None:
                save_checkpoint(ckpt, done, params, opt_state)
            if eval_fn is not None and eval_every and done % eval_every == 0 and done != num_steps:
                evaluate(done)
            bar.update(1)
            if (
                time_budget_s is not None
                and time.perf_counter() - t_start > time_budget_s
                and done < num_steps
            ):
                stopped_early = True
                pending = (done, metrics)
                bar.write(f"{desc}: time budget of {time_budget_s:.0f}s reached at step {done}/{num_steps}")
                break
        if pending is not None:
            flush(*pending, time.perf_counter())
    if ckpt is not None:
        if ckpt.latest_step() != done:
            save_checkpoint(ckpt, done, params, opt_state, force=True)
        ckpt.wait_until_finished()
    if eval_fn is not None:
        evaluate(done)
    return TrainResult(params, opt_state, done, history, stopped_early, time.perf_counter() - t_start)


def plot_curves(
    series: Mapping[str, Iterable[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = False,
) -> Path:
    """Draws named ``(x, y)`` curves into one PNG (matplotlib, no display needed).

    Args:
      series: ``{label: [(x, y), ...]}``.
      path: output PNG.
      title, xlabel, ylabel: labels.
      logy: logarithmic y axis.

    Returns:
      The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in series.items():
        points = list(points)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 12 else None, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
