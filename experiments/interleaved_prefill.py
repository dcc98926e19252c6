"""Benchmark: the sparse prefill and the dense forward timed in alternating rounds.

``bench_selection.py`` times each row's calls back to back, the dense row of a length first and the
Pallas rows after it, so every row meets the GPU in the state the previous one left it in, and the
two sides' medians move by ~1-2% between runs. Here each round runs ``--block`` consecutive calls of
every implementation, in an order that rotates from round to round (round ``r`` starts with the
``r % n``-th), so all of them meet the same drifts. Per length and input kind the report gives each
implementation's median, minimum and maximum over its calls and its median by the implementation
called just before (``after``: with ``--block 1`` a call right after a dense one shows what the
dense call's load leaves behind), the ratio of the medians to the dense one
(``speedup_of_medians``), and the distribution over rounds of the ratio of the rounds' medians
(``round_speedups``); every call's time is kept, in call order (``call_ms``). ``--variants`` adds
``bench_selection``'s prefill variants to the rotation, for an A/B under the same conditions.
``--clocks`` samples the SM clock and the power draw through NVML during the rounds and gives each
implementation's median of its calls' mean clock and power by the implementation called before
(``clocks_after``).

Timing as in ``bench_selection.py``: each function jitted and compiled ahead (compile excluded), two
warm-up calls each, every timed call ended by ``block_until_ready``, host clock.

Usage::

    PYTHONPATH=experiments:. python3 experiments/interleaved_prefill.py --lens 131072 --rounds 30 --out $OUT
    PYTHONPATH=experiments:. python3 experiments/interleaved_prefill.py --smoke --out /tmp/bench   # CPU
"""

import argparse
import contextlib
import statistics
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_selection import (
    INPUT_KINDS,
    PREFILL_VARIANTS,
    Shape,
    _compile,
    _inputs,
    dense_impl,
    dense_prefill,
    experiment_shapes,
    sparse_prefill,
    write_experiment,
)
from tqdm.auto import tqdm

from infllm_jax import SparseConfig
from infllm_jax.ops import pallas_backend


def time_interleaved(
    fns: dict, args, rounds: int, *, block: int = 1, warmups: int = 2, progress=None, on_call=None
) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Times ``rounds`` rounds of ``block`` consecutive calls of each function of ``fns`` (name ->
    callable of ``args``).

    Round ``r`` runs the functions in ``fns``'s order rotated left by ``r % len(fns)``. Each function
    first gets ``warmups`` untimed calls. Returns name -> the call times in ms in call order
    (``rounds * block``), and name -> the name of the function called just before each of them
    (``None`` for the first timed call). ``on_call(name, start, end)`` (``time.perf_counter``
    seconds) follows every timed call.
    """
    if rounds < 1 or block < 1 or not fns:
        raise ValueError(f"need at least one round, call and function, got {rounds} x {block} of {list(fns)}")
    names = list(fns)
    for name in names:
        for _ in range(warmups):
            jax.block_until_ready(fns[name](*args))
    times = {name: [] for name in names}
    before = {name: [] for name in names}
    previous = None
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(block):
                start = time.perf_counter()
                jax.block_until_ready(fns[name](*args))
                end = time.perf_counter()
                times[name].append((end - start) * 1e3)
                before[name].append(previous)
                if on_call is not None:
                    on_call(name, start, end)
                previous = name
        if progress is not None:
            progress.update(1)
    return times, before


def summarise(
    times: dict[str, list[float]], before: dict[str, list[str]], dense: str, block: int = 1
) -> dict:
    """Per implementation: median / min / max ms over all calls and the median by the implementation
    called just before (``after``); against ``dense``: the ratio of the medians and the median /
    min / max over rounds of the ratio of the rounds' medians (one block of calls each)."""

    def rounds_of(ms):
        return np.median(np.asarray(ms).reshape(-1, block), axis=1)

    base = rounds_of(times[dense])
    out = {"implementations": {}, "speedup_of_medians": {}, "round_speedups": {}}
    for name, ms in times.items():
        after = {}
        for prev, t in zip(before[name], ms, strict=True):
            after.setdefault(str(prev), []).append(t)
        out["implementations"][name] = {
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
            "after": {
                prev: {"calls": len(x), "median_ms": statistics.median(x)} for prev, x in after.items()
            },
        }
        if name != dense:
            ratios = base / rounds_of(ms)
            out["speedup_of_medians"][name] = statistics.median(times[dense]) / statistics.median(ms)
            out["round_speedups"][name] = {
                "median": float(np.median(ratios)),
                "min": float(ratios.min()),
                "max": float(ratios.max()),
            }
    return out


class ClockSampler:
    """Samples GPU 0's SM clock (MHz) and power draw (W) through NVML every ``period_s`` in a thread,
    while used as a context manager; ``mean_over(start, end)`` averages the samples taken between two
    ``time.perf_counter`` instants (``None`` if there are none)."""

    def __init__(self, period_s: float = 0.002):
        import pynvml  # the nvidia-ml-py package; GPU machines only

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self._read = lambda: (
            pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
        )
        self._period, self._stop, self.samples = period_s, threading.Event(), []

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), *self._read()))
            time.sleep(self._period)

    def __enter__(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mean_over(self, start: float, end: float):
        inside = [(mhz, watts) for t, mhz, watts in self.samples if start <= t <= end]
        if not inside:
            return None
        return tuple(float(np.mean(x)) for x in zip(*inside, strict=True))


def clocks_after(clocks: dict[str, list], before: dict[str, list[str]]) -> dict:
    """Per implementation and implementation called just before: the median over calls of each
    call's mean SM clock and power draw (``clocks``: name -> per call ``(mhz, watts)`` or ``None``)."""
    out = {}
    for name, per_call in clocks.items():
        groups = {}
        for prev, sample in zip(before[name], per_call, strict=True):
            if sample is not None:
                groups.setdefault(str(prev), []).append(sample)
        out[name] = {
            prev: {
                "calls": len(x),
                "sm_mhz": statistics.median(s[0] for s in x),
                "watts": statistics.median(s[1] for s in x),
            }
            for prev, x in groups.items()
        }
    return out


def run(
    *,
    lens,
    kinds,
    rounds: int,
    block: int = 1,
    variants=(),
    shape: Shape,
    cfg: SparseConfig,
    sampler=None,
    log=print,
) -> list[dict]:
    """One row per (length, input kind): the dense forward (cuDNN on a GPU, XLA on the CPU), the
    default sparse prefill (``pallas``) and ``variants`` (``pallas_<name>``) timed in alternation,
    ``block`` calls of each per round. With a ``sampler`` (``ClockSampler``) each row also gives the
    calls' SM clock and power by the implementation called before (``clocks_after``)."""
    dense = dense_impl()
    fns = {
        f"{dense}_dense": dense_prefill(dense),
        "pallas": sparse_prefill(cfg),
        **{f"pallas_{name}": PREFILL_VARIANTS[name](cfg) for name in variants},
    }
    rows = []
    for t in lens:
        compiled = None  # one compilation per length: the input kinds share shapes and dtypes
        for kind in kinds:
            q, k, v = _inputs(t, shape, jnp.bfloat16, kind)
            if compiled is None:
                compiled = {name: _compile(fn, q, k, v) for name, fn in fns.items()}
            # With a sampler: each timed call's (start, end), to average the clock samples over.
            spans = {name: [] for name in compiled}

            def on_call(name, start, end, spans=spans):
                spans[name].append((start, end))

            with tqdm(total=rounds, desc=f"T={t} {kind}", leave=False) as bar:
                with sampler if sampler is not None else contextlib.nullcontext():
                    times, before = time_interleaved(
                        compiled,
                        (q, k, v),
                        rounds,
                        block=block,
                        progress=bar,
                        on_call=None if sampler is None else on_call,
                    )
            row = {
                "seq_len": t,
                "inputs": kind,
                # The default's split between the tile and token phases (the pure union up to 16K
                # tokens on Hopper).
                "pallas_attention_min_share": pallas_backend.prefill_attention_tiling(q, k, cfg).min_share,
                "rounds": rounds,
                "block": block,
                **summarise(times, before, f"{dense}_dense", block),
                "call_ms": {name: [round(x, 3) for x in ms] for name, ms in times.items()},
            }
            if sampler is not None:
                clocks = {name: [sampler.mean_over(*span) for span in calls] for name, calls in spans.items()}
                row["clocks_after"] = clocks_after(clocks, before)
                sampler.samples.clear()
            rows.append(row)
            for name, stats in row["implementations"].items():
                line = f"T={t:>7} {kind:>6} {name:>28} median {stats['median_ms']:9.2f} ms"
                if name in row["round_speedups"]:
                    spread = row["round_speedups"][name]
                    line += (
                        f"  x{row['speedup_of_medians'][name]:.3f} of medians, per round "
                        f"x{spread['median']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"
                    )
                log(line)
                for prev, clock in row.get("clocks_after", {}).get(name, {}).items():
                    log(f"{'':>46} after {prev}: {clock['sm_mhz']:.0f} MHz, {clock['watts']:.0f} W")
            del q, k, v
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Per (length, kind): each implementation's call times over its median, in call order (left),
    and per round the dense median over each sparse median (right), so drifts and outliers show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 3.6 * len(rows)), squeeze=False)
    for (ax_t, ax_s), row in zip(axes, rows, strict=True):
        names = list(row["call_ms"])
        per_round = {
            name: np.median(np.asarray(ms).reshape(-1, row["block"]), axis=1)
            for name, ms in row["call_ms"].items()
        }
        for name in names:
            ms = np.asarray(row["call_ms"][name])
            ax_t.plot(ms / np.median(ms), marker=".", label=f"{name} (median {np.median(ms):.2f} ms)")
            if name != names[0]:
                label = f"{name}: x{row['speedup_of_medians'][name]:.3f} of medians"
                ax_s.plot(per_round[names[0]] / per_round[name], marker=".", label=label)
        ax_t.set_xlabel(f"call ({row['block']} per implementation and round)")
        ax_t.set_ylabel("call time / its median")
        ax_s.set_xlabel("round")
        ax_s.set_ylabel(f"{names[0]} / sparse, round medians")
        for ax in (ax_t, ax_s):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        ax_t.set_title(f"T={row['seq_len']}, {row['inputs']} inputs, {row['rounds']} rounds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lens", type=int, nargs="+", default=[131072])
    parser.add_argument("--inputs", nargs="+", choices=INPUT_KINDS, default=["smooth"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--block", type=int, default=1, help="consecutive calls of each implementation per round"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(PREFILL_VARIANTS),
        default=[],
        help="bench_selection prefill variants",
    )
    parser.add_argument(
        "--clocks", action="store_true", help="sample the SM clock and power draw during the calls (NVML)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpret mode check)")
    parser.add_argument("--name", help="results file name (.json and .png added)")
    args = parser.parse_args(argv)
    shape, cfg = experiment_shapes(args.smoke)
    lens = (256,) if args.smoke else tuple(args.lens)
    name = args.name or ("interleaved_prefill_smoke" if args.smoke else "interleaved_prefill_h200")
    kinds = tuple(dict.fromkeys(args.inputs))
    rows = run(
        lens=lens,
        kinds=kinds,
        rounds=args.rounds,
        block=args.block,
        variants=tuple(args.variants),
        shape=shape,
        cfg=cfg,
        sampler=ClockSampler() if args.clocks else None,
    )
    write_experiment(
        args.out,
        name,
        rows,
        kinds,
        plot,
        timing=f"rounds of {args.block} consecutive call(s) per implementation, order rotating per round; "
        "compile excluded, 2 warm-ups each, block_until_ready, host clock",
    )


if __name__ == "__main__":
    main()
