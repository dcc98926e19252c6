"""Diagnostic: how evenly the persistent Mosaic GPU kernels' CTAs share the 128K prefill (GPU only).

The forward tile kernel and the keys-as-rows scoring kernel run one CTA per SM; CTA ``c`` of ``C``
takes tiles ``c, c + C, ...`` of its launch (or, with ``MosaicTile.dynamic``, the next tile from an
atomic counter). A launch lasts as long as its slowest CTA, so when the CTAs' sums of tile times
differ, SMs idle at its end. This script measures that with Mosaic GPU's on-device profiler: while the
kernels are traced, each persistent loop's body gets a named scope (one range per tile and
warpgroup) and the kernels are compiled with a profile buffer (names swapped in the kernel modules,
as ``scoring_anatomy.py`` does; the shipped kernels are not changed). One call of the 128K smooth
prefill then writes one trace per launch (launches that share a compiled kernel share a trace file
name, so only the first of those is kept: 3 of the selection's 4 scoring launches at 128K).

``--against VARIANT`` also profiles a ``bench_selection`` prefill variant, alternating with the
default ``--pairs`` times, and reports both kernels' device times per profile: a paired comparison
that run-to-run drift (~1% for the tile kernel) hits alike.

Per launch and compute warpgroup 0 it reports each CTA's busy span (its first tile's start to its last
tile's end, in SM clock cycles: the profiler's timestamps are cycles since the CTA's first event) and

- ``tail_fraction`` = 1 - mean span / max span: the share of the launch's SM time spent idle waiting
  for the slowest CTA, an upper bound on what any reordering of the tiles could save;
- ``tile_cycles``: mean, standard deviation and max of single tiles' spans.

Usage::

    PYTHONPATH=experiments:. python3 experiments/cta_balance.py --out experiments/results \
        [--against fwd_strided_tiles --pairs 5]
"""

import argparse
import contextlib
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

import jax
from bench_attention import ModuleProxy, kernel_times, write_report
from bench_selection import MINICPM4_SHAPE, PREFILL_VARIANTS, SHIPPED, _inputs, sparse_prefill

from pallas_kernels import mgpu_sync, selection_mgpu_keys, sparse_attention_mgpu

# Kernel module -> a part of its kernel's name (the profiler trace files' and the GPU trace's).
KERNELS = {
    "forward_tile": (sparse_attention_mgpu, "fwd_tile_mgpu"),
    "scoring": (selection_mgpu_keys, "select_scores_mgpu_keys"),
}
_SCOPE = "tile"
# Profiler ranges per warpgroup: one per tile, and a CTA takes at most ~85 tiles of a 128K launch.
_PROFILE_SPACE = 256


def _scoped_nd_loop(real):
    """``plgpu.nd_loop`` whose body runs in a named scope: one profiler range per loop iteration."""

    def nd_loop(*args, **kwargs):
        decorate = real.nd_loop(*args, **kwargs)

        def wrap(body):
            @functools.wraps(body)
            def scoped(*body_args, **body_kwargs):
                with jax.named_scope(_SCOPE):
                    return body(*body_args, **body_kwargs)

            return decorate(scoped)

        return wrap

    return nd_loop


def _scoped_while_loop(real):
    """``lax.while_loop`` whose body runs in a named scope (the kernels' work-queue loops)."""

    def while_loop(cond, body, init):
        def scoped(carry):
            with jax.named_scope(_SCOPE):
                return body(carry)

        return real.while_loop(cond, scoped, init)

    return while_loop


@contextlib.contextmanager
def profiled(trace_dir: Path):
    """Compiles the persistent kernels of ``KERNELS`` with a profile buffer and per-tile ranges: the
    bodies of their ``nd_loop``s (strided launches) and of ``mgpu_sync``'s ``lax.while_loop`` (the
    work-queue loop of dynamic ones; the kernels' inner loops are ``fori_loop``s, which do not go
    through a module's ``lax``)."""
    saved = {name: module.plgpu for name, (module, _) in KERNELS.items()}
    saved_lax = mgpu_sync.lax
    jax.clear_caches()
    for name, (module, _) in KERNELS.items():
        real = saved[name]
        params = functools.partial(
            real.CompilerParams,
            profile_space=_PROFILE_SPACE,
            profile_dir=str(trace_dir),
            profile_bounds_check=True,
        )
        module.plgpu = ModuleProxy(real, CompilerParams=params, nd_loop=_scoped_nd_loop(real))
    mgpu_sync.lax = ModuleProxy(saved_lax, while_loop=_scoped_while_loop(saved_lax))
    try:
        yield
    finally:
        for name, (module, _) in KERNELS.items():
            module.plgpu = saved[name]
        mgpu_sync.lax = saved_lax
        jax.clear_caches()


def launch_stats(trace: dict, warpgroup: int = 0, warpgroups: int = 3) -> dict:
    """Balance of one launch from a Mosaic GPU profiler trace (``{"traceEvents": [...]}``, events with
    ``ph`` B/E, ``ts`` and ``tid = 1 + warpgroup + warpgroups * cta``). Timestamps are treated as
    cycles since each CTA's first event (the profiler adds the CTA's start time in ns, the same for
    all of its events, which the spans below cancel)."""
    opened: dict[int, float] = {}
    per_cta: dict[int, list[tuple[float, float]]] = {}
    for event in trace["traceEvents"]:
        if event.get("name") != _SCOPE:
            continue
        cta, wg = divmod(event["tid"] - 1, warpgroups)
        if wg != warpgroup:
            continue
        if event["ph"] == "B":
            opened[cta] = event["ts"]
        elif event["ph"] == "E" and cta in opened:
            per_cta.setdefault(cta, []).append((opened.pop(cta), event["ts"]))
    if not per_cta:
        return {"ctas": 0}
    # ts is in microseconds of (start ns + cycles): x 1e3 gives cycles within one CTA.
    spans = [1e3 * (ranges[-1][1] - ranges[0][0]) for ranges in per_cta.values()]
    tiles = [1e3 * (end - start) for ranges in per_cta.values() for start, end in ranges]
    counts = [len(ranges) for ranges in per_cta.values()]
    return {
        "ctas": len(per_cta),
        "tiles": sum(counts),
        "tiles_per_cta": [min(counts), max(counts)],
        "span_cycles": {
            "mean": round(statistics.fmean(spans)),
            "min": round(min(spans)),
            "max": round(max(spans)),
        },
        "tail_fraction": round(1 - statistics.fmean(spans) / max(spans), 4),
        "tile_cycles": {
            "mean": round(statistics.fmean(tiles)),
            "std": round(statistics.pstdev(tiles)),
            "max": round(max(tiles)),
        },
    }


def _kernel_ms(kernels: dict, kernel_name: str) -> float:
    """Summed device time (ms per call) of the profiled kernels whose name contains ``kernel_name``."""
    return sum(t for name, t in kernels.items() if kernel_name in name)


def paired_kernel_times(prefills: dict, args, pairs: int) -> dict:
    """Device times of the persistent kernels in ``pairs`` alternating profiles of each prefill
    (``{name: compiled}``; two calls per profile): run-to-run drift hits both alike."""
    times = {name: {kernel: [] for kernel in KERNELS} for name in prefills}
    for _ in range(pairs):
        for name, compiled in prefills.items():
            kernels = kernel_times(compiled, *args, top=20)
            for kernel, (_, kernel_name) in KERNELS.items():
                times[name][kernel].append(round(_kernel_ms(kernels, kernel_name), 3))

    def summary(ms):
        return {"ms": ms, "median_ms": round(statistics.median(ms), 3)}

    return {name: {kernel: summary(ms) for kernel, ms in per.items()} for name, per in times.items()}


def run(seq_len: int, inputs: str, against: str | None = None, pairs: int = 5) -> dict:
    q, k, v = _inputs(seq_len, MINICPM4_SHAPE, jax.numpy.bfloat16, inputs)

    prefill = sparse_prefill(SHIPPED)
    # Kernel times of the unprofiled kernels: the launches' lengths the tail fractions apply to.
    compiled = jax.jit(prefill).lower(q, k, v).compile()
    kernels = kernel_times(compiled, q, k, v, top=20)
    report: dict = {"seq_len": seq_len, "inputs": inputs, "kernel_ms": kernels, "launches": {}}
    with tempfile.TemporaryDirectory() as tmp, profiled(Path(tmp)):
        profiled_fn = jax.jit(prefill).lower(q, k, v).compile()
        jax.block_until_ready(profiled_fn(q, k, v))
        traces = sorted(Path(tmp).glob("*-trace.json"), key=lambda p: int(p.name.split("-")[-2]))
        for name, (_, kernel_name) in KERNELS.items():
            files = [p for p in traces if kernel_name in p.name]
            stats = [launch_stats(json.loads(p.read_text())) for p in files]
            report["launches"][name] = stats
            ms = _kernel_ms(kernels, kernel_name)
            # Time the SMs idle at the launches' ends, were the unprofiled launches' tails the same.
            tails = [s["tail_fraction"] for s in stats if s.get("ctas")]
            idle = ms * statistics.fmean(tails) if tails else None
            report.setdefault("summary", {})[name] = {
                "kernel_ms": round(ms, 3),
                "launches": len(files),
                "mean_tail_fraction": None if not tails else round(statistics.fmean(tails), 4),
                "idle_ms_estimate": None if idle is None else round(idle, 3),
            }
            print(f"{name}: {len(files)} launches, {report['summary'][name]}", flush=True)
            for s in stats:
                print(f"    {s}", flush=True)
    if against is not None:
        variant = jax.jit(PREFILL_VARIANTS[against](SHIPPED)).lower(q, k, v).compile()
        report["paired"] = paired_kernel_times({"default": compiled, against: variant}, (q, k, v), pairs)
        for name, by_kernel in report["paired"].items():
            print(f"{name}: {by_kernel}", flush=True)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--inputs", default="smooth", choices=("smooth", "random"))
    parser.add_argument("--name", default="cta_balance_h200", help="results file name (.json added)")
    parser.add_argument(
        "--against",
        choices=sorted(PREFILL_VARIANTS),
        help="also profile this bench_selection prefill variant, alternating with the default",
    )
    parser.add_argument("--pairs", type=int, default=5, help="alternations of --against's profiles")
    args = parser.parse_args(argv)
    if jax.devices()[0].platform != "gpu":
        sys.exit("cta_balance.py profiles the Mosaic GPU kernels: it needs a Hopper GPU")
    write_report(args.out, args.name, run(args.seq_len, args.inputs, args.against, args.pairs))


if __name__ == "__main__":
    main()
