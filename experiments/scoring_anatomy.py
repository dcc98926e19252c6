"""Diagnostic: where the keys-as-rows scoring kernel's time goes (GPU only; not a benchmark of results).

The kernel's ring step is one ``64 x 128 x 128`` WGMMA per compute warpgroup followed by 8,192
exponentials (and the group sum's adds). Both units alone need ~1,000 cycles per step on an H200, and
the kernel takes ~2,100-2,300, as if they never overlapped. This script times the scoring kernel of the
128K selection with parts of the step removed, by swapping names in the kernel's module while it is
traced (the selections of the stripped variants are meaningless and not checked):

- ``default``: the shipped kernel;
- ``no_exp2``: every ``exp2`` of the module is the identity (no ``MUFU.EX2``; adds, maxima and stores stay);
- ``no_wgmma``: every WGMMA of the module is dropped (the accumulators are read uninitialised; no
  tensor-core or shared-memory operand traffic; the key ring still streams);
- ``neither``: both;
- ``no_copies``: the memory warpgroup arrives on each ring slot's barrier instead of copying keys into
  it (no L2 reads or SMEM writes of keys; every handshake stays): what streaming the keys costs, i.e.
  what a CTA of more tokens sharing one key stream could save at most.

``--no-stagger`` runs them on the kernel with ``MosaicScore(stagger=False)`` (the default before session 17).

If ``default`` is about ``no_exp2 + no_wgmma - neither``, the two halves of a step run one after the other.
Caveat: without the WGMMA the accumulator is a constant, so the compiler may fold or hoist exponentials
of ``no_wgmma``; ``no_exp2`` is the reliable half.

Usage::

    PYTHONPATH=experiments:. python3 experiments/scoring_anatomy.py --out experiments/results
"""

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_attention import ModuleProxy, kernel_times, write_report
from bench_selection import MINICPM4_SHAPE, SHIPPED, _inputs, _time_ms

from infllm_jax.ops.pallas_backend import selection_kwargs
from pallas_kernels import selection as pallas_selection
from pallas_kernels import selection_mgpu, selection_mgpu_keys

VARIANTS = ("default", "no_exp2", "no_wgmma", "neither", "no_copies")
_SCORING = "select_scores_mgpu_keys"


@contextlib.contextmanager
def _stripped(variant: str):
    saved = selection_mgpu_keys.jnp, selection_mgpu_keys.plgpu, selection_mgpu.plgpu
    # select_blocks is jitted: its traces (and the kernel's) must not carry over between variants.
    jax.clear_caches()
    if variant in ("no_exp2", "neither"):
        selection_mgpu_keys.jnp = ModuleProxy(jnp, exp2=lambda x: x)
    if variant in ("no_wgmma", "neither"):
        selection_mgpu_keys.plgpu = ModuleProxy(saved[1], wgmma=lambda *args, **kwargs: None)
    if variant == "no_copies":
        # copy_key_tiles (selection_mgpu) streams the keys; the queries are loaded by the keys module.
        selection_mgpu.plgpu = ModuleProxy(
            saved[2], copy_gmem_to_smem=lambda src, dst, barrier, **kwargs: saved[2].barrier_arrive(barrier)
        )
    try:
        yield
    finally:
        selection_mgpu_keys.jnp, selection_mgpu_keys.plgpu, selection_mgpu.plgpu = saved
        jax.clear_caches()


def run(seq_len: int, iters: int, stagger: bool, variants=VARIANTS) -> list[dict]:
    shape = MINICPM4_SHAPE
    tiling = dataclasses.replace(
        pallas_selection.MOSAIC_SELECTION,
        mosaic=dataclasses.replace(pallas_selection.MOSAIC_SELECTION.mosaic, stagger=stagger),
    )
    q, k, _ = _inputs(seq_len, shape, jnp.bfloat16, "smooth")
    rows = []
    for variant in variants:
        with _stripped(variant):

            def select(q, k):
                return pallas_selection.select_blocks(q, k, **selection_kwargs(SHIPPED), block_sizes=tiling)

            compiled = jax.jit(select).lower(q, k).compile()
            timing = _time_ms(compiled, (q, k), iters)
            kernels = kernel_times(compiled, q, k, top=20)
        scoring = sum(ms for name, ms in kernels.items() if _SCORING in name)
        row = {
            "variant": variant,
            "stagger": stagger,
            "seq_len": seq_len,
            **timing,
            "scoring_ms": round(scoring, 3),
            "kernels": kernels,
        }
        print(
            f"{variant:>9}: select {timing['median_ms']:.2f} ms, scoring kernel {scoring:.2f} ms", flush=True
        )
        rows.append(row)
    by = {row["variant"]: row["scoring_ms"] for row in rows}
    if {"default", "no_exp2", "no_wgmma", "neither"} <= by.keys():
        print(
            f"default {by['default']:.2f} vs no_exp2 + no_wgmma - neither = "
            f"{by['no_exp2'] + by['no_wgmma'] - by['neither']:.2f} ms",
            flush=True,
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--no-stagger", action="store_true", help="the kernel with MosaicScore(stagger=False)"
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--name", default="scoring_anatomy_h200", help="results file name (.json added)")
    args = parser.parse_args(argv)
    if jax.devices()[0].platform != "gpu":
        sys.exit("scoring_anatomy.py times the Mosaic GPU scoring kernel: it needs a Hopper GPU")
    rows = run(args.seq_len, args.iters, stagger=not args.no_stagger, variants=args.variants)
    write_report(args.out, args.name, {"rows": rows})


if __name__ == "__main__":
    main()
