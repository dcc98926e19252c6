"""Short→long training with InfLLM-V2 (SPEC.md §15), dense vs sparse, on packaged text.

Stage 1 pretrains a dense model on short windows. Stage 2 continues from the same weights on long
windows in two arms that see identical batches: ``dense`` (dense attention) and ``sparse``
(InfLLM-V2 block-sparse attention; the parameters are the same, only the attention pattern
changes). Both arms are then evaluated at several lengths on held-out text (perplexity) and on
synthetic retrieval tasks (teacher-forced exact match of the answer), and the script prints a table
and writes ``experiments/results/short_to_long_<preset>.json`` plus PNG plots.

Synthetic tasks in training: a tiny model does not learn retrieval from text alone, so a fixed
number of rows of every batch are passkey / NIAH examples at the batch's length (loss on the
answer tokens only, each row weighted like a text row). Stage 1 mixes in the tasks that fit its
short windows (passkey), stage 2 all training tasks at the long length, identically in both arms.
Evaluation uses other seeds, and lengths beyond the training length test extrapolation.

Usage::

    python experiments/short_to_long.py --preset tiny      # CPU, a few minutes (make demo)
    python experiments/short_to_long.py --preset h200      # one H200, about 6 minutes

Checkpoints and the JSONL metrics go to ``runs/short_to_long_<preset>/``; ``--resume`` continues
from them (a finished stage is restored, not retrained).
"""

import argparse
import dataclasses
import datetime
import json
import math
import shutil
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infllm_jax.data import corpus, packing, tasks
from infllm_jax.data.tokenizer import ByteTokenizer, load_or_train_bpe
from infllm_jax.model import Transformer, get_config, param_count
from infllm_jax.nn import visible_fraction
from infllm_jax.train import (
    MetricsLogger,
    TrainConfig,
    checkpoint_manager,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    plot_curves,
    restore_checkpoint,
    run_training,
    split_model,
)

ROOT = Path(__file__).resolve().parents[1]


def _passkey(tok, n, length, seed, essays):
    return tasks.passkey(tok, num_examples=n, seq_len=length, seed=seed)


def _niah_single(tok, n, length, seed, essays):
    return tasks.niah_single(tok, num_examples=n, seq_len=length, seed=seed)


def _niah_essay(tok, n, length, seed, essays):
    return tasks.niah_single(tok, num_examples=n, seq_len=length, haystack=essays, seed=seed)


def _niah_multikey(tok, n, length, seed, essays):
    return tasks.niah_multikey(tok, num_examples=n, seq_len=length, seed=seed)


def _mqar(tok, n, length, seed, essays):
    # Zoology's MQAR needs vocab_size > seq_len, so with bytes it only fits windows below 259 tokens.
    return tasks.mqar(
        num_examples=n, seq_len=length, vocab_size=tok.vocab_size, num_kv_pairs=length // 16, seed=seed
    )


# name -> (tokenizer, num_examples, seq_len, seed, essay sentences) -> tasks.LabelledTokens
TASKS: dict[str, Callable] = {
    "passkey": _passkey,
    "niah_single": _niah_single,
    "niah_essay": _niah_essay,
    "niah_multikey": _niah_multikey,
    "mqar": _mqar,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Experiment:
    """One preset of the experiment (every field can be overridden from the command line).

    Attributes:
      model: ``infllm_jax.model`` preset name.
      tokenizer: ``"byte"`` or ``"bpe"`` (8K BPE trained on the training split and cached).
      sources: corpus sources; training text comes from their train split, held-out text from
        their validation split.
      short_len, long_len: stage-1 and stage-2 window lengths.
      short_batch, long_batch: rows per batch in each stage.
      short_task_rows, long_task_rows: of those rows, how many are synthetic-task examples.
      stage1_steps, stage2_steps: optimizer steps per stage (each stage-2 arm runs ``stage2_steps``).
      stage1_lr, stage2_lr: peak learning rates (stage 1 cosine, stage 2 linear decay, as in §15).
      warmup_frac: warmup as a fraction of each stage's steps.
      train_tasks, eval_tasks: synthetic tasks (keys of ``TASKS``).
      eval_lengths: evaluation lengths.
      eval_windows: held-out text windows per length.
      eval_examples: examples per task and length.
      eval_tokens: tokens per evaluation batch (rows = eval_tokens // length).
      stage1_minutes, stage2_minutes: wall-clock caps per stage and per arm (None: none).
      eval_stage1: also evaluate the stage-1 model (dense) as a reference row.
      cross_eval: also evaluate each stage-2 arm in the other arm's attention mode.
      implementation: backend of selection and sparse attention (``None``: Pallas on GPU where it
        supports the shapes, else the XLA reference; ``"xla"`` forces the reference).
      seed: initialisation and data seed.
    """

    model: str
    tokenizer: str
    sources: tuple[str, ...]
    short_len: int
    long_len: int
    short_batch: int
    long_batch: int
    short_task_rows: int
    long_task_rows: int
    stage1_steps: int
    stage2_steps: int
    stage1_lr: float
    stage2_lr: float
    warmup_frac: float = 0.1
    train_tasks: tuple[str, ...] = ("passkey", "niah_single")
    eval_tasks: tuple[str, ...] = ("passkey", "niah_single")
    eval_lengths: tuple[int, ...]
    eval_windows: int
    eval_examples: int
    eval_tokens: int
    stage1_minutes: float | None = None
    stage2_minutes: float | None = None
    eval_stage1: bool = True
    cross_eval: bool = False
    implementation: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.tokenizer not in ("byte", "bpe"):
            raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {self.tokenizer!r}")
        if not 0 <= self.short_task_rows < self.short_batch or not 0 <= self.long_task_rows < self.long_batch:
            raise ValueError("task rows must be fewer than the batch rows (text rows are needed)")
        if self.long_len <= self.short_len:
            raise ValueError(f"long_len={self.long_len} must exceed short_len={self.short_len}")
        unknown = sorted(set(self.train_tasks + self.eval_tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; available: {sorted(TASKS)}")
        if "niah_essay" in self.train_tasks:
            raise ValueError("niah_essay is evaluation-only: the essays are held-out text")


PRESETS = {
    # 2-core CPU in about 5 minutes, byte-level text: KJV (Genesis-3 John) + Python docs to train,
    # the held-out KJV books Jude and Revelation to evaluate. 0.8M parameters; sparse selection
    # keeps 96 of up to 2048 keys. At this budget retrieval stays near chance (token accuracy is in
    # the JSON): the tiny preset exercises the pipeline and compares perplexity.
    "tiny": Experiment(
        model="tiny",
        tokenizer="byte",
        sources=("kjv", "python_docs"),
        short_len=256,
        long_len=1024,
        short_batch=16,
        long_batch=4,
        short_task_rows=4,
        long_task_rows=1,
        stage1_steps=150,
        stage2_steps=30,
        stage1_lr=3e-3,
        stage2_lr=1e-3,
        eval_lengths=(512, 1024, 2048),
        eval_windows=8,
        eval_examples=8,
        eval_tokens=8192,
        stage1_minutes=3.0,
        stage2_minutes=2.0,
    ),
    # One H200: the ~95M "small" model (G = 16, head dim 64: the Pallas kernels' shapes), 8K BPE,
    # 1K -> 8K windows. Each stage stops at its wall-clock cap (compilation included), so the whole
    # run stays near 6 minutes even if throughput is below expectations; the JSON records whether a
    # cap cut a stage short.
    "h200": Experiment(
        model="small",
        tokenizer="bpe",
        sources=("kjv", "python_docs", "linux_docs", "perl_pod", "essays"),
        short_len=1024,
        long_len=8192,
        short_batch=64,
        long_batch=8,
        short_task_rows=16,
        long_task_rows=2,
        stage1_steps=600,
        stage2_steps=120,
        stage1_lr=2e-3,
        stage2_lr=5e-4,
        eval_tasks=("passkey", "niah_single", "niah_essay", "niah_multikey"),
        eval_lengths=(4096, 8192, 16384),
        eval_windows=16,
        eval_examples=32,
        eval_tokens=65536,
        stage1_minutes=1.25,
        stage2_minutes=0.85,
        cross_eval=True,
    ),
}


class TaskMix:
    """Deterministic training batches: packed text rows plus synthetic-task rows, both keyed by step."""

    def __init__(self, stream, tok, *, batch: int, length: int, task_rows: int, task_names, seed: int):
        # Only tasks whose prompt fits the window take part (the passkey fits 256 bytes, NIAH does not).
        self.tasks = [t for t in task_names if _fits(TASKS[t], tok, length)] if task_rows else []
        self.task_rows = task_rows if self.tasks else 0
        self.text = packing.PackedBatches(
            stream, batch_size=batch - self.task_rows, seq_len=length, seed=seed
        )
        self.tok, self.length, self.seed = tok, length, seed

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        text = self.text[step]
        if not self.task_rows:
            return text
        name = self.tasks[step % len(self.tasks)]
        ex = TASKS[name](self.tok, self.task_rows, self.length, (self.seed, step), None).to_batch()
        return {k: np.concatenate([text[k], ex[k].astype(text[k].dtype)]) for k in text}


def _fits(task, tok, length, essays=None) -> bool:
    try:
        task(tok, 1, length, 0, essays)
    except ValueError:
        return False
    return True


def _graphdef(model_cfg, mode):
    abstract = nnx.eval_shape(
        lambda: Transformer(dataclasses.replace(model_cfg, attention_mode=mode), rngs=nnx.Rngs(0))
    )
    return split_model(abstract)[0]


def _train_config(steps: int, lr: float, decay: str, warmup_frac: float) -> TrainConfig:
    return TrainConfig(
        learning_rate=lr,
        total_steps=steps,
        warmup_steps=max(1, int(warmup_frac * steps)),
        decay=decay,
        end_lr_ratio=0.1,
    )


def train_stage(
    name,
    graphdef,
    params,
    tcfg,
    batch_fn,
    *,
    tokens_per_step,
    run_dir,
    logger,
    minutes,
    resume,
    progress,
    num_steps=None,
):
    """Trains one stage, resuming from its checkpoints if asked; returns (params, summary dict).

    ``num_steps`` (default ``tcfg.total_steps``) can stop the stage before its schedule ends.
    """
    num_steps = tcfg.total_steps if num_steps is None else num_steps
    tx = make_optimizer(tcfg)
    opt_state = tx.init(params)
    ckpt_dir = run_dir / "ckpt" / name
    mngr = checkpoint_manager(ckpt_dir, max_to_keep=2, save_every=max(tcfg.total_steps // 4, 1))
    start = 0
    if resume and mngr.latest_step() is not None:
        start, params, opt_state = restore_checkpoint(mngr, params, opt_state)
        print(f"[{name}] resumed from step {start}")
    result = run_training(
        make_train_step(graphdef, tx),
        params,
        opt_state,
        batch_fn,
        num_steps=num_steps,
        start_step=start,
        tokens_per_step=tokens_per_step,
        log_every=max(1, tcfg.total_steps // 50),
        logger=logger,
        schedule=make_schedule(tcfg),
        ckpt=mngr,
        time_budget_s=None if minutes is None else 60 * minutes,
        extra={"stage": name},
        desc=name,
        progress=progress,
    )
    mngr.close()
    summary = {
        "steps": result.step,
        "planned_steps": tcfg.total_steps,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 1),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in result.history[1:]] or [0.0])),
    }
    return result.params, summary


class Evaluator:
    """Held-out perplexity and task accuracy of a parameter set under a given attention mode."""

    def __init__(self, exp: Experiment, model_cfg, tok, val_stream, essays):
        self.exp, self.model_cfg, self.tok = exp, model_cfg, tok
        self.rows = {length: max(1, exp.eval_tokens // length) for length in exp.eval_lengths}
        self.text, self.task_batches = {}, {}
        for length, rows in self.rows.items():
            windows = min(
                -(-exp.eval_windows // rows) * rows, ((len(val_stream) - 1) // length) // rows * rows
            )
            self.text[length] = packing.eval_batches(
                val_stream, seq_len=length, batch_size=rows, num_windows=windows
            )
            for name in exp.eval_tasks:
                n = -(-exp.eval_examples // rows) * rows
                if _fits(TASKS[name], tok, length, essays):
                    # Seeds far from the training ones (which are (seed, step) pairs).
                    ex = TASKS[name](tok, n, length, 10_000 + length, essays).to_batch()
                    self.task_batches[name, length] = [
                        {k: v[i : i + rows] for k, v in ex.items()} for i in range(0, n, rows)
                    ]
        self._steps = {}

    def _step(self, mode):
        if mode not in self._steps:
            graphdef = _graphdef(self.model_cfg, mode)
            sel = jax.jit(lambda p, t: nnx.merge(graphdef, p).block_selections(t))
            self._steps[mode] = (make_eval_step(graphdef), sel)
        return self._steps[mode]

    def __call__(self, params, mode: str, label: str) -> list[dict]:
        eval_step, select = self._step(mode)
        rows = []
        for length in self.exp.eval_lengths:
            t0 = time.perf_counter()
            sums = [eval_step(params, b) for b in self.text[length]]
            sums = jax.device_get(sums)
            loss = sum(s["loss_sum"] for s in sums) / max(sum(s["tokens"] for s in sums), 1.0)
            row = {"arm": label, "mode": mode, "length": length, "loss": float(loss), "ppl": math.exp(loss)}
            for name in self.exp.eval_tasks:
                if (name, length) not in self.task_batches:
                    continue
                res = jax.device_get([eval_step(params, b) for b in self.task_batches[name, length]])
                exact = float(sum(r["exact"] for r in res) / max(sum(r["examples"] for r in res), 1.0))
                token_acc = float(sum(r["correct"] for r in res) / max(sum(r["tokens"] for r in res), 1.0))
                # MQAR is scored per query (Zoology), the retrieval tasks per answer (exact match).
                row[name] = token_acc if name == "mqar" else exact
                row[f"{name}_token_acc"] = token_acc
            if mode == "sparse":
                block_idx = select(params, self.text[length][0]["tokens"])  # [L, B, K, T, S]
                row["visible"] = float(
                    visible_fraction(
                        block_idx.reshape(-1, *block_idx.shape[2:]), self.model_cfg.sparse.block_size
                    )
                )
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(
                f"  eval {label:>7s} ({mode}) L={length}: ppl {row['ppl']:.3f}  "
                + "  ".join(f"{t} {row[t]:.2f}" for t in self.exp.eval_tasks if t in row)
                + (f"  visible {row['visible']:.3f}" if "visible" in row else ""),
                flush=True,
            )
            rows.append(row)
        return rows


def format_table(rows: list[dict], task_names) -> str:
    """The comparison table: one line per (arm, eval mode, length); tasks as ``score / token acc``."""
    header = ["arm", "mode", "length", "ppl", *task_names, "visible"]
    lines = [header]
    for r in rows:
        lines.append(
            [r["arm"], r["mode"], str(r["length"]), f"{r['ppl']:.3f}"]
            + [f"{r[t]:.2f} / {r[t + '_token_acc']:.2f}" if t in r else "-" for t in task_names]
            + [f"{r['visible']:.3f}" if "visible" in r else "1.000"]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(
            c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def make_plots(out_prefix: Path, logger: MetricsLogger, rows: list[dict], exp: Experiment) -> list[str]:
    """Loss curves of both stages and arms; task accuracy and perplexity against length."""
    curves = {}
    stage1_end = 0
    for r in logger.records:
        if "loss" in r and "grad_norm" in r:
            if r["stage"] == "stage1":
                stage1_end = max(stage1_end, r["step"])
            curves.setdefault(r["stage"], []).append((r["step"], r["loss"]))
    # Stage-2 arms continue the stage-1 step axis.
    series = {k: [(s + (stage1_end if k != "stage1" else 0), v) for s, v in pts] for k, pts in curves.items()}
    paths = [
        plot_curves(series, f"{out_prefix}_loss.png", title="training loss (stage 1 short, stage 2 long)")
    ]
    main_rows = [
        r
        for r in rows
        if (r["arm"], r["mode"]) in {("dense", "dense"), ("sparse", "sparse"), ("stage1", "dense")}
    ]
    acc = {}
    for r in main_rows:
        for t in exp.eval_tasks:
            if t in r:
                acc.setdefault(f"{r['arm']}: {t}", []).append((r["length"], r[t]))
    paths.append(
        plot_curves(
            acc,
            f"{out_prefix}_tasks.png",
            title="task accuracy (teacher-forced exact match)",
            xlabel="sequence length",
            ylabel="accuracy",
        )
    )
    ppl = {}
    for r in main_rows:
        ppl.setdefault(r["arm"], []).append((r["length"], r["ppl"]))
    paths.append(
        plot_curves(
            ppl,
            f"{out_prefix}_ppl.png",
            title="held-out perplexity",
            xlabel="sequence length",
            ylabel="perplexity",
        )
    )
    return [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths]


def load_data(exp: Experiment, data_dir, progress: bool):
    """Tokenizer, train/validation token streams and the essay haystack sentences (or None)."""
    if exp.tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        tok = load_or_train_bpe(data_dir, exp.sources, progress=progress)
    train = packing.ensure_token_stream(
        tok, "train", data_dir=data_dir, sources=exp.sources, progress=progress
    )
    val = packing.ensure_token_stream(
        tok, "validation", data_dir=data_dir, sources=exp.sources, progress=progress
    )
    essays = None
    if "niah_essay" in exp.eval_tasks:
        path = corpus.ensure_corpus(data_dir, ["essays"], progress=progress)["essays"]
        essays = tasks.haystack_sentences(tok, path.read_text(encoding="utf-8"))
    return tok, np.asarray(train), np.asarray(val), essays


def run(
    exp: Experiment, *, preset: str, out_dir: Path, run_dir: Path, data_dir, resume: bool, progress: bool
):
    """Runs both stages and the evaluation; returns the results dict (also written as JSON)."""
    t_start = time.perf_counter()
    timings = {}
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(run_dir / "metrics.jsonl")

    tok, train_stream, val_stream, essays = load_data(exp, data_dir, progress)
    timings["data"] = time.perf_counter() - t_start
    model_cfg = get_config(
        exp.model, vocab_size=tok.vocab_size, attention_mode="dense", implementation=exp.implementation
    )
    print(
        f"[data] {exp.tokenizer} tokenizer (vocab {tok.vocab_size}); train {len(train_stream):,} tokens, "
        f"held-out {len(val_stream):,} tokens ({timings['data']:.1f}s)"
    )
    model = Transformer(model_cfg, rngs=nnx.Rngs(exp.seed))
    _, params = split_model(model)
    n_params = param_count(model)
    sp = model_cfg.sparse
    print(
        f"[model] {exp.model}: {n_params / 1e6:.2f}M parameters; sparse arm: {sp.num_selected} blocks x "
        f"{sp.block_size} = {sp.num_selected * sp.block_size} keys per token"
    )

    dense_g, sparse_g = _graphdef(model_cfg, "dense"), _graphdef(model_cfg, "sparse")
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"short_to_long_{preset}"
    rows, stage2 = [], {}
    results = {
        "preset": preset,
        "command": " ".join(["python", *sys.argv]),
        "complete": False,
        "experiment": dataclasses.asdict(exp),
        "model": {
            "preset": exp.model,
            "params": n_params,
            "vocab_size": tok.vocab_size,
            "sparse_config": dataclasses.asdict(model_cfg.sparse),
        },
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "stage1": None,
        "stage2": stage2,
        "eval": rows,
        "timings_s": timings,
    }

    def dump(complete=False):
        # Rewritten after every phase, so a run killed by an outer timeout still leaves its numbers.
        results["complete"] = complete
        text = json.dumps({**results, "timings_s": {k: round(v, 1) for k, v in timings.items()}}, indent=2)
        prefix.with_suffix(".json").write_text(text + "\n")

    common = dict(run_dir=run_dir, logger=logger, resume=resume, progress=progress)
    short_mix = TaskMix(
        train_stream,
        tok,
        batch=exp.short_batch,
        length=exp.short_len,
        task_rows=exp.short_task_rows,
        task_names=exp.train_tasks,
        seed=exp.seed,
    )
    long_mix = TaskMix(
        train_stream,
        tok,
        batch=exp.long_batch,
        length=exp.long_len,
        task_rows=exp.long_task_rows,
        task_names=exp.train_tasks,
        seed=exp.seed + 1,
    )
    print(
        f"[stage1] dense, {exp.short_batch} x {exp.short_len} tokens/step "
        f"(tasks {short_mix.tasks or 'none'} in {short_mix.task_rows} rows), {exp.stage1_steps} steps"
    )
    t0 = time.perf_counter()
    params, stage1 = train_stage(
        "stage1",
        dense_g,
        params,
        _train_config(exp.stage1_steps, exp.stage1_lr, "cosine", exp.warmup_frac),
        short_mix,
        tokens_per_step=exp.short_batch * exp.short_len,
        minutes=exp.stage1_minutes,
        **common,
    )
    timings["stage1"] = time.perf_counter() - t0
    results["stage1"] = stage1
    dump()

    evaluator = Evaluator(exp, model_cfg, tok, val_stream, essays)
    if exp.eval_stage1:
        t0 = time.perf_counter()
        rows += evaluator(params, "dense", "stage1")
        timings["eval_stage1"] = time.perf_counter() - t0
        dump()

    arms = {}
    tcfg2 = _train_config(exp.stage2_steps, exp.stage2_lr, "linear", exp.warmup_frac)
    arm_steps = exp.stage2_steps
    # Sparse first: it is the arm more likely to hit the time cap on a GPU (its kernels are slower
    # per token than cuDNN's dense attention), and the second arm is matched to the first's steps.
    for arm, graphdef in (("sparse", sparse_g), ("dense", dense_g)):
        print(
            f"[stage2:{arm}] {exp.long_batch} x {exp.long_len} tokens/step "
            f"(tasks {long_mix.tasks or 'none'} in {long_mix.task_rows} rows), {exp.stage2_steps} steps"
        )
        t0 = time.perf_counter()
        # Both arms start from the same stage-1 weights; copies, because the train step donates them.
        arms[arm], stage2[arm] = train_stage(
            arm,
            graphdef,
            jax.tree.map(jnp.copy, params),
            tcfg2,
            long_mix,
            tokens_per_step=exp.long_batch * exp.long_len,
            minutes=exp.stage2_minutes,
            num_steps=arm_steps,
            **common,
        )
        timings[f"stage2_{arm}"] = time.perf_counter() - t0
        # If the time cap cut the first arm short, the second stops at the same step: both arms then
        # see the same batches under the same (truncated) learning-rate schedule.
        arm_steps = min(arm_steps, stage2[arm]["steps"])
        dump()
    for arm in ("dense", "sparse"):
        t0 = time.perf_counter()
        rows += evaluator(arms[arm], arm, arm)
        if exp.cross_eval:
            rows += evaluator(arms[arm], "sparse" if arm == "dense" else "dense", arm)
        timings[f"eval_{arm}"] = time.perf_counter() - t0
        dump()
    timings["total"] = time.perf_counter() - t_start
    results["plots"] = make_plots(prefix, logger, rows, exp)
    dump(complete=True)
    return results


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def _parse(argv) -> tuple[argparse.Namespace, Experiment]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/short_to_long_<preset>")
    parser.add_argument("--data-dir", default=None, help="corpus cache (default: $INFLLM_DATA_DIR or data/)")
    parser.add_argument("--resume", action="store_true", help="continue from the run dir's checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for field in dataclasses.fields(Experiment):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, type=_boolean, default=None, metavar="{true,false}")
        elif typing.get_origin(field.type) is tuple:
            parser.add_argument(flag, type=typing.get_args(field.type)[0], nargs="+", default=None)
        else:
            # float | None -> float
            kind = next(t for t in (typing.get_args(field.type) or (field.type,)) if t is not type(None))
            parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args(argv)
    overrides = {}
    for field in dataclasses.fields(Experiment):
        value = getattr(args, field.name)
        if value is not None:
            overrides[field.name] = tuple(value) if isinstance(value, list) else value
    return args, dataclasses.replace(PRESETS[args.preset], **overrides)


def main(argv=None) -> None:
    """Command line entry point."""
    args, exp = _parse(argv)
    print(f"short_to_long --preset {args.preset} on {jax.devices()[0].platform}: {exp}")
    run_dir = args.run_dir or ROOT / "runs" / f"short_to_long_{args.preset}"
    results = run(
        exp,
        preset=args.preset,
        out_dir=args.out_dir,
        run_dir=run_dir,
        data_dir=args.data_dir,
        resume=args.resume,
        progress=not args.no_progress,
    )
    print()
    print(
        f"Short -> long ({args.preset}): stage 1 dense on {exp.short_len}-token windows, stage 2 on "
        f"{exp.long_len}-token windows.\nppl: held-out text; tasks: teacher-forced exact match / "
        "answer-token accuracy (MQAR: query accuracy); visible: mean fraction of the causal prefix attended"
    )
    print(format_table(results["eval"], exp.eval_tasks))
    for stage, s in [("stage 1", results["stage1"]), *sorted(results["stage2"].items())]:
        note = " (stopped early by the time cap)" if s["stopped_early"] else ""
        if not note and s["steps"] < s["planned_steps"]:
            note = " (matched to the first arm's steps)"
        loss = "-" if s["final_loss"] is None else f"{s['final_loss']:.3f}"
        print(
            f"{stage:>7s}: {s['steps']}/{s['planned_steps']} steps in {s['seconds']:.0f}s, "
            f"final train loss {loss}, {s['tokens_per_s']:.0f} tok/s{note}"
        )
    out_json = args.out_dir / f"short_to_long_{args.preset}.json"
    print(f"total {results['timings_s']['total']:.0f}s; results in {out_json}")


if __name__ == "__main__":
    main()
