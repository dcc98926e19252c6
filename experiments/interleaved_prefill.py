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

Timing as in ``bench_selection.py``: each function jitted and compiled ahead (compile excluded), two
warm-up calls each, every timed call ended by ``block_until_ready``, host clock.

Usage::

    PYTHONPATH=experiments:. python3 experiments/interleaved_prefill.py --lens 131072 --rounds 30 --out $OUT
    PYTHONPATH=experiments:. python3 experiments/interleaved_prefill.py --smoke --out /tmp/bench   # CPU
"""

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_attention import write_report
from bench_selection import (
    INPUT_KINDS,
    MINICPM4_SHAPE,
    PREFILL_VARIANTS,
    SHIPPED,
    SMOKE_CONFIG,
    SMOKE_SHAPE,
    Shape,
    _compile,
    _inputs,
    describe_inputs,
)
from tqdm.auto import tqdm

from infllm_jax import SparseConfig, ops


def time_interleaved(
    fns: dict, args, rounds: int, *, block: int = 1, warmups: int = 2, progress=None
) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Times ``rounds`` rounds of ``block`` consecutive calls of each function of ``fns`` (name ->
    callable of ``args``).

    Round ``r`` runs the functions in ``fns``'s order rotated left by ``r % len(fns)``. Each function
    first gets ``warmups`` untimed calls. Returns name -> the call times in ms in call order
    (``rounds * block``), and name -> the name of the function called just before each of them
    (``None`` for the first timed call).
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
                times[name].append((time.perf_counter() - start) * 1e3)
                before[name].append(previous)
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


def run(
    *, lens, kinds, rounds: int, block: int = 1, variants=(), shape: Shape, cfg: SparseConfig, log=print
) -> list[dict]:
    """One row per (length, input kind): the dense forward (cuDNN on a GPU, XLA on the CPU), the
    default sparse prefill (``pallas``) and ``variants`` (``pallas_<name>``) timed in alternation,
    ``block`` calls of each per round."""
    dense = "xla" if jax.default_backend() == "cpu" else "cudnn"
    rows = []
    for t in lens:
        for kind in kinds:
            q, k, v = _inputs(t, shape, jnp.bfloat16, kind)
            fns = {
                f"{dense}_dense": lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, implementation=dense
                ),
                "pallas": lambda q, k, v: ops.infllmv2_attention(q, k, v, cfg, implementation="pallas"),
                **{f"pallas_{name}": PREFILL_VARIANTS[name](cfg) for name in variants},
            }
            compiled = {name: _compile(fn, q, k, v) for name, fn in fns.items()}
            with tqdm(total=rounds, desc=f"T={t} {kind}", leave=False) as bar:
                times, before = time_interleaved(compiled, (q, k, v), rounds, block=block, progress=bar)
            row = {
                "seq_len": t,
                "inputs": kind,
                "rounds": rounds,
                "block": block,
                **summarise(times, before, f"{dense}_dense", block),
                "call_ms": {name: [round(x, 3) for x in ms] for name, ms in times.items()},
            }
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
            del q, k, v, compiled
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
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpret mode check)")
    parser.add_argument("--name", help="results file name (.json and .png added)")
    args = parser.parse_args(argv)
    shape, cfg = (SMOKE_SHAPE, SMOKE_CONFIG) if args.smoke else (MINICPM4_SHAPE, SHIPPED)
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
    )
    body = {
        "timing": f"rounds of {args.block} consecutive call(s) per implementation, order rotating per "
        "round; compile excluded, 2 warm-ups each, block_until_ready, host clock",
        "inputs": {kind: describe_inputs(kind) for kind in kinds},
        "rows": rows,
    }
    write_report(args.out, name, body)
    plot(rows, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
