"""Energy per call of the dense baseline and of each phase of the sparse prefill (GPU; NVML samples).

The H200 lowers its SM clock below the 1980 MHz boost when a workload would draw more than its 700 W limit,
so how fast a kernel runs in sustained use depends on its power as well as its cycles. This script measures
both: for each workload it runs back-to-back calls for ``--seconds`` (after two warm-ups), samples the SM
clock and the board's power every 2 ms (``ClockSampler``), and reports the calls, their median time, the
mean clock and power over the window and the energy per call (mean power x window / calls). The workloads
rotate over ``--rounds`` rounds, so that each meets the same drift.

Workloads (MiniCPM4 shapes, the shipped config, T = ``--seq-len``):
- ``cudnn_dense``: the dense causal forward (``bench_selection.dense_prefill``);
- ``prefill``: the sparse prefill (selection, then the sparse forward), ``bench_selection.sparse_prefill``;
- ``selection``: the Pallas selection with the forward's block lists (scoring, top-k, lists);
- ``forward``: the Pallas sparse forward from one selection's ids and lists (tile and token phases).

Usage::

    PYTHONPATH=experiments:. python3 experiments/power_draw.py --out experiments/results
"""

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from bench_selection import (
    INPUT_KINDS,
    _inputs,
    dense_impl,
    dense_prefill,
    experiment_shapes,
    sparse_prefill,
    write_experiment,
)
from interleaved_prefill import ClockSampler

from infllm_jax.ops import pallas_backend

WORKLOADS = ("cudnn_dense", "prefill", "selection", "forward")


def workloads(q, k, v, cfg) -> dict:
    """``name -> (jitted function, arguments)`` of the four workloads on ``q, k, v``: the selection and
    the forward are ``infllmv2_attention_pallas``'s two stages."""
    config = pallas_backend.prefill_attention_tiling(q, k, cfg)

    def select(q, k):
        return pallas_backend.prefill_selection_pallas(q, k, cfg, attention_tiling=config)

    def forward(q, k, v, idx, lists):
        return pallas_backend.prefill_attention_pallas(q, k, v, idx, lists, cfg, attention_tiling=config)

    select = jax.jit(select)
    idx, lists = select(q, k)
    return {
        "cudnn_dense": (jax.jit(dense_prefill(dense_impl())), (q, k, v)),
        "prefill": (jax.jit(sparse_prefill(cfg)), (q, k, v)),
        "selection": (select, (q, k)),
        "forward": (jax.jit(forward), (q, k, v, idx, lists)),
    }


def measure(fn, args, *, seconds: float, sampler, warmups: int = 2) -> dict:
    """Back-to-back calls of ``fn(*args)`` for ``seconds`` (at least one): their count and median time,
    and with a ``sampler`` the mean SM clock and power over the window and the energy per call."""
    for _ in range(warmups):
        jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    end = time.perf_counter()
    row = {
        "calls": len(times),
        "median_ms": statistics.median(times),
        "sm_mhz": None,
        "watts": None,
        "joules_per_call": None,
    }
    mean = None if sampler is None else sampler.mean_over(start, end)
    if mean is not None:
        row["sm_mhz"], row["watts"] = mean
        row["joules_per_call"] = row["watts"] * (end - start) / len(times)
    return row


def run(*, seq_len: int, kinds, rounds: int, seconds: float, shape, cfg, sampler) -> list[dict]:
    """Per input kind: each workload measured once per round, the order rotating each round; the medians
    over rounds of each measured quantity, and the rounds themselves."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least one, got {rounds}")
    rows = []
    for kind in kinds:
        q, k, v = _inputs(seq_len, shape, jnp.bfloat16, kind)
        loads = workloads(q, k, v, cfg)
        names = list(loads)
        per_round = {name: [] for name in names}
        with sampler if sampler is not None else contextlib.nullcontext():
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    fn, args = loads[name]
                    per_round[name].append(measure(fn, args, seconds=seconds, sampler=sampler))
                    print(f"T={seq_len} {kind} round {r} {name}: {per_round[name][-1]}", flush=True)
        rows.append({"seq_len": seq_len, "inputs": kind, "workloads": summarise(per_round)})
    return rows


def summarise(per_round: dict[str, list[dict]]) -> dict:
    """``name -> {the median over rounds of each quantity that was measured, "rounds": per_round}``."""
    out = {}
    for name, measured in per_round.items():
        medians = {}
        for key in ("median_ms", "sm_mhz", "watts", "joules_per_call"):
            values = [m[key] for m in measured if m[key] is not None]
            medians[key] = statistics.median(values) if values else None
        out[name] = {**medians, "calls": sum(m["calls"] for m in measured), "rounds": measured}
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Energy per call, power and SM clock of each workload, one group of bars per input kind."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    quantities = (
        ("joules_per_call", "J per call"),
        ("watts", "mean power (W)"),
        ("sm_mhz", "mean SM clock (MHz)"),
    )
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        names = list(row["workloads"])
        for ax, (key, label) in zip(axes, quantities, strict=True):
            values = [row["workloads"][n][key] or 0.0 for n in names]
            ax.bar([j + i * width for j in range(len(names))], values, width, label=row["inputs"])
            ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(names))], names, rotation=20)
            ax.set_title(label)
    axes[0].legend()
    fig.suptitle(f"T = {rows[0]['seq_len']}: back-to-back calls, NVML samples every 2 ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--inputs", nargs="+", choices=INPUT_KINDS, default=["smooth"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="back-to-back calls per workload and round"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, no NVML (CPU interpret mode check)"
    )
    parser.add_argument("--name", help="results file name (.json and .png added)")
    args = parser.parse_args(argv)
    shape, cfg = experiment_shapes(args.smoke)
    seq_len = 256 if args.smoke else args.seq_len
    name = args.name or ("power_draw_smoke" if args.smoke else "power_draw_h200")
    kinds = tuple(dict.fromkeys(args.inputs))
    rows = run(
        seq_len=seq_len,
        kinds=kinds,
        rounds=args.rounds,
        seconds=args.seconds,
        shape=shape,
        cfg=cfg,
        sampler=None if args.smoke else ClockSampler(),
    )
    write_experiment(
        args.out,
        name,
        rows,
        kinds,
        plot,
        method=f"{args.rounds} round(s) per input kind, each workload's back-to-back calls for "
        f"{args.seconds} s after 2 warm-ups, the order rotating per round; NVML SM clock and board power "
        "every 2 ms, averaged over the window; energy per call = mean power x window / calls; medians "
        "over rounds",
    )


if __name__ == "__main__":
    main()
