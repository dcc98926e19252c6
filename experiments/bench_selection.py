"""Benchmark: InfLLM-V2 block selection (Pallas) and sparse prefill attention vs cuDNN dense forward.

Rows (ANCHORS.md "How to report"), all measured in one run on one device:

- ``select``: block selection alone (key compression, fused scoring/pooling, top-k), Pallas with the
  default tiling (the Mosaic GPU scoring kernel on Hopper) and, where that is not Triton, with the
  Triton scoring kernel (``pallas_triton``), and at the shortest selection length the XLA reference
  (that row also records how often the two selections agree: bf16 near-ties may order differently).
  Paper anchor (A100, 16 blocks, LSE approximation): 3.93 / 14.07 / 32.44 / 56.59 ms at 32K / 64K /
  96K / 128K.
- ``prefill``: the whole sparse attention forward, ``infllmv2_attention(..., implementation="pallas")``
  (selection + block-sparse attention), and the dense baseline
  ``jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)``.
- ``select`` rows (``"sweep": true``) for other Triton tilings at 32K, to guide tuning; they stop
  once the run has used 120 s (``--no-sweep`` skips them).
- ``--profile-lens``: those lengths' Pallas and dense rows also record ``kernels``, the device time per
  call of the slowest GPU kernels, and ``gpu_timeline``, how much of a call's span the GPU sat idle
  between kernels and where, and the host's dispatch and synchronisation time (profiler; ``--trace-dir``
  keeps the traces). ``--select-lens`` / ``--prefill-lens`` choose the lengths.

Inputs (``--inputs``, every row says which in ``"inputs"``): ``random`` draws q and k i.i.d. normal,
so neighbouring tokens select unrelated blocks, the worst case for the sparse kernel's tiling (it
shares blocks between the tokens of a tile); ``smooth`` draws q and k from bench_attention's
``smooth_process`` (random-walk anchors every ``--corr`` tokens + white noise ``--noise``), which
varies smoothly along the sequence like real LLM queries and keys, so neighbouring tokens select
overlapping blocks. v is the same random tensor for both. Each kind gets its own Pallas rows; the
dense rows are measured once per length (dense attention does no value-dependent work) and are the
``speedup_vs_cudnn_dense`` baseline of every kind.

Timing: each function is jitted and compiled ahead (compile excluded), run twice to warm up, then
timed ``--iters`` times with ``block_until_ready``; the median is reported. Memory: the compiled
executable's ``memory_analysis()`` (arguments + outputs + temporaries - aliases), the device memory
the call needs at its peak; inputs count on both sides.

Usage::

    PYTHONPATH=. python3 experiments/bench_selection.py --out experiments/results   # GPU, ~3 min
    PYTHONPATH=. python3 experiments/bench_selection.py --smoke --out /tmp/bench    # CPU, interpret mode
"""

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# A sibling script, not a package module: importable because running experiments/<script>.py puts
# experiments/ first on sys.path (the documented way to run these benchmarks).
from bench_attention import kernel_times, smooth_process, write_report

from infllm_jax import SparseConfig, ops
from infllm_jax.ops import pallas_backend
from infllm_jax.ops.pallas_backend import selection_kwargs
from pallas_kernels import selection as pallas_selection
from pallas_kernels import sparse_attention
from pallas_kernels.selection_mgpu import MosaicScore

warnings.filterwarnings(
    "ignore", message=".*Pallas Triton backend is deprecated.*", category=DeprecationWarning
)

# Paper Tab. 5, A100, block selection only (16 selected blocks, with the LSE approximation), in ms.
PAPER_A100_SELECT_MS = {32768: 3.93, 65536: 14.07, 98304: 32.44, 131072: 56.59}
# Tilings tried besides the default (pallas_selection.BlockSizes()).
SWEEP = (
    pallas_selection.BlockSizes(block_k1=128, score_warps=8),
    pallas_selection.BlockSizes(score_rows=64),
    pallas_selection.BlockSizes(score_stages=3),
    pallas_selection.BlockSizes(score_rows=256, score_warps=8),
    pallas_selection.BlockSizes(topk_elems=8192, topk_warps=8),
    pallas_selection.BlockSizes(group_sum="reshape"),
)


# Named selection tilings for --select-variants (rows "pallas_<name>"), e.g. Mosaic scoring options.
SELECT_VARIANTS = {
    # Session 4's default: a 2-slot ring, two store buffers per warpgroup.
    "mosaic_st2": dataclasses.replace(
        pallas_selection.MOSAIC_SELECTION, mosaic=MosaicScore(stages=2, store_buffers=2, key_rows=False)
    ),
    # Session 6's default: the top-k's bitwise search always takes all 32 passes.
    "mosaic_topk_32_passes": dataclasses.replace(pallas_selection.MOSAIC_SELECTION, topk_early_exit=False),
    # Session 7's default: one top-k width (all block columns) for every query chunk.
    "mosaic_topk_one_band": dataclasses.replace(pallas_selection.MOSAIC_SELECTION, topk_bands=False),
    # The scoring kernel at every length: session 9's (token rows, the group sum as a second WGMMA,
    # E^T P), or keys as rows.
    "mosaic_token_rows": dataclasses.replace(
        pallas_selection.MOSAIC_SELECTION, mosaic=MosaicScore(key_rows=False)
    ),
    "mosaic_key_rows": dataclasses.replace(
        pallas_selection.MOSAIC_SELECTION, mosaic=MosaicScore(key_rows_from_blocks=0, persistent=True)
    ),
    # The default scoring with a 4-slot ring (keys as rows from 128 blocks on, token rows below).
    "mosaic_st4": dataclasses.replace(
        pallas_selection.MOSAIC_SELECTION, mosaic=MosaicScore(stages=4, persistent=True)
    ),
    # Pooled scores stored in float32 (the default stores bf16, as the official kernel does; session 13).
    "mosaic_f32_scores": dataclasses.replace(
        pallas_selection.MOSAIC_SELECTION, mosaic=MosaicScore(bf16_scores=False, persistent=True)
    ),
    # The scoring kernel with one tile per CTA (the default before session 14; now persistent).
    "mosaic_one_tile_per_cta": dataclasses.replace(pallas_selection.MOSAIC_SELECTION, mosaic=MosaicScore()),
    # The scoring kernel's warpgroups not staggered (the default before session 17).
    "mosaic_no_stagger": dataclasses.replace(
        pallas_selection.MOSAIC_SELECTION, mosaic=MosaicScore(persistent=True, stagger=False)
    ),
}


def _prefill_with_xla_lists(cfg: SparseConfig):
    """Session 8's prefill: selection, then the attention builds its block lists from the ids in XLA."""

    def prefill(q, k, v):
        idx = ops.select_blocks(q, k, cfg, implementation="pallas")
        return ops.sparse_attention(q, k, v, idx, block_size=cfg.block_size, implementation="pallas")

    return prefill


def _prefill_dense_head(cfg: SparseConfig):
    """The tokens before ``num_selected * block_size`` keep every block they see, so their sparse
    attention is dense causal attention: run them by ``ops.dense_attention`` (cuDNN on the GPU) and
    only the rest sparse (a query slice at a static offset)."""

    def prefill(q, k, v):
        head = min(q.shape[1], cfg.num_selected * cfg.block_size)
        dense = ops.dense_attention(q[:, :head], k[:, :head], v[:, :head])
        if head == q.shape[1]:
            return dense
        sparse = ops.infllmv2_attention(q[:, head:], k, v, cfg, implementation="pallas", q_offset=head)
        return jnp.concatenate([dense, sparse], axis=1)

    return prefill


def _prefill_tilings(select=None, attention=None):
    """The default prefill with fields of the default selection and attention ``BlockSizes`` changed
    (``select``: e.g. the block-lists kernel's ``list_elems``; ``attention``: e.g. ``fwd_chunk_bytes``)."""

    def make(cfg: SparseConfig):
        def prefill(q, k, v):
            on_cpu = jax.default_backend() == "cpu"
            group, pool = q.shape[2] // k.shape[2], cfg.block_size // cfg.kernel_stride
            tiling = pallas_selection.default_block_sizes(q.dtype, q.shape[-1], group, pool, on_cpu)
            config = pallas_backend.prefill_attention_tiling(q, k, cfg)
            return pallas_backend.infllmv2_attention_pallas(
                q,
                k,
                v,
                cfg,
                select_q=q,
                select_k=k,
                select_tiling=dataclasses.replace(tiling, **(select or {})),
                attention_tiling=dataclasses.replace(config, **(attention or {})),
            )

        return prefill

    return make


# Named prefill variants for --prefill-variants (rows "pallas_<name>"): functions of the config.
PREFILL_VARIANTS = {
    "xla_lists": _prefill_with_xla_lists,
    "dense_head": _prefill_dense_head,
    "lists_1024_elems": _prefill_tilings(select=dict(list_elems=1024)),
    "lists_2_stages": _prefill_tilings(select=dict(list_stages=2)),
    "lists_8_warps": _prefill_tilings(select=dict(list_warps=8)),
    # Whole rows in one walk with 8 warps: the Hopper default in session 24.
    "lists_whole_rows_8_warps": _prefill_tilings(select=dict(list_elems=16384, list_warps=8)),
    # The masks' dtype before session 9's last run (int32 since).
    "lists_int8_masks": _prefill_tilings(select=dict(list_mask_dtype="int8")),
    # Selection chunks of up to 8K tokens (the default before session 14, now 32K) and 64K (a chunk's
    # pooled scores within 512 MiB / 4 GiB as float32): session 14's 16K chunks took 51.90 ms at 128K,
    # 32K ones 51.44, 8K ones 52.19 (bench_selection_h200_chunks_session14.json).
    "select_chunks_8k": _prefill_tilings(select=dict(max_chunk=8192, chunk_bytes=512 << 20)),
    "select_chunks_64k": _prefill_tilings(select=dict(max_chunk=65536, chunk_bytes=4 << 30)),
    # The forward chunks before session 9: 256 MiB of fp32 state per chunk instead of 1 GiB.
    "fwd_chunks_256mib": _prefill_tilings(attention=dict(fwd_chunk_bytes=256 << 20)),
    # The scoring kernel at every length: session 9's (token rows, E^T P group sum), or keys as rows.
    "scoring_token_rows": _prefill_tilings(select=dict(mosaic=MosaicScore(key_rows=False))),
    "scoring_key_rows": _prefill_tilings(
        select=dict(mosaic=MosaicScore(key_rows_from_blocks=0, persistent=True))
    ),
    "scoring_f32_scores": _prefill_tilings(
        select=dict(mosaic=MosaicScore(bf16_scores=False, persistent=True))
    ),
    "scoring_one_tile_per_cta": _prefill_tilings(select=dict(mosaic=MosaicScore())),
    # The scoring kernel's warpgroups not staggered (the default before session 17), and a 4-slot ring.
    "scoring_no_stagger": _prefill_tilings(select=dict(mosaic=MosaicScore(persistent=True, stagger=False))),
    "scoring_st4": _prefill_tilings(select=dict(mosaic=MosaicScore(persistent=True, stages=4))),
    # Launch parameters of the small Triton kernels, last tuned before the Mosaic kernels, swept in
    # session 15 (bench_selection_h200_small_kernels.json): the top-k's warps and block scores per
    # program, the token phase's warps, pipelining depth, tokens per program and blocks per step.
    **{f"topk_{n}_warp{'s' * (n > 1)}": _prefill_tilings(select=dict(topk_warps=n)) for n in (1, 2, 8)},
    **{f"topk_{n}_elems": _prefill_tilings(select=dict(topk_elems=n)) for n in (1024, 4096, 8192)},
    # The top-k's full 16-pass search without the per-pass test whether every row already has exactly
    # k keys at its threshold (two block barriers a pass): with bfloat16 scores the early exit saves
    # little (15.6 of 16 passes on average in session 21's profile of the widest band).
    "topk_no_early_exit": _prefill_tilings(select=dict(topk_early_exit=False)),
    **{f"token_{n}_warp{'s' * (n > 1)}": _prefill_tilings(attention=dict(token_warps=n)) for n in (1, 4)},
    **{f"token_{n}_stage{'s' * (n > 1)}": _prefill_tilings(attention=dict(token_stages=n)) for n in (1, 3)},
    "token_batch_2": _prefill_tilings(attention=dict(token_batch=2)),
    "token_2_blocks": _prefill_tilings(attention=dict(token_kv_blocks=2)),
    # Blocks at least 3 tokens of an 8-token tile chose go to the tile kernel (default 2): with the
    # faster token phase, a block 2 tokens share costs about as much there as in the tile kernel.
    "min_share_3": _prefill_tilings(attention=dict(min_share=3)),
    # Every block in the tile phase (no token phase, no fp32 state between phases, one forward chunk):
    # phase_blocks_h200.json puts the tile kernel at ~470 SM-ns per 64-row group block and the token
    # phase at ~490 per block + ~450 per token. With 128-key steps (the default's) and with 64-key
    # ones, which let a warpgroup skip each block none of its tokens chose. Since session 23 the first
    # is the default up to 16K tokens (sparse_attention.UNION_KEY_BLOCKS_PER_SELECTED).
    "min_share_1": _prefill_tilings(attention=dict(min_share=1)),
    "min_share_1_64_key_steps": _prefill_tilings(
        attention=dict(
            min_share=1,
            mosaic=dataclasses.replace(sparse_attention.MOSAIC_BLOCK_SIZES.mosaic, blocks_per_step=1),
        )
    ),
    # Tile lists ascending (the default before session 24) instead of grouped by the halves of the tile
    # that chose each entry (sparse_attention.MOSAIC_BLOCK_SIZES.half_order), with the list kernel's
    # launch then (4 warps, 4096-element steps); and the grouped lists in whole rows with 4 warps.
    "lists_ascending": _prefill_tilings(
        attention=dict(half_order=False), select=dict(list_elems=4096, list_warps=4)
    ),
    "lists_half_order_4_warps": _prefill_tilings(select=dict(list_elems=16384, list_warps=4)),
    # The grouped lists built in 512-column steps (the list kernel then walks each row twice, the first
    # time to count the groups) with the launch of the ascending lists, instead of in whole rows (the
    # Hopper default since session 25, named as session 25's first run timed it); and in 1024-column
    # steps with 8 warps.
    "lists_half_order_two_walks": _prefill_tilings(select=dict(list_elems=4096, list_warps=4)),
    "lists_half_order_two_walks_8_warps": _prefill_tilings(select=dict(list_elems=8192, list_warps=8)),
    # Session 14's small-kernel launches (4096 top-k elements, a 3-stage token phase).
    "small_kernels_session14": _prefill_tilings(select=dict(topk_elems=4096), attention=dict(token_stages=3)),
    # The forward tile kernel with one tile per CTA (the default before session 14; now persistent).
    "fwd_one_tile_per_cta": _prefill_tilings(
        attention=dict(
            mosaic=dataclasses.replace(sparse_attention.MOSAIC_BLOCK_SIZES.mosaic, persistent=False)
        )
    ),
    # The persistent forward tile kernel's CTAs taking their tiles from an atomic counter
    # (MosaicTile.dynamic; the default in session 18's runs that name fwd_strided_tiles, its inverse).
    "fwd_dynamic_tiles": _prefill_tilings(
        attention=dict(mosaic=dataclasses.replace(sparse_attention.MOSAIC_BLOCK_SIZES.mosaic, dynamic=True))
    ),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int


# MiniCPM4-8B attention (ANCHORS.md) and the shipped sparse config, sparse at every length.
MINICPM4_SHAPE = Shape(batch=1, q_heads=32, kv_heads=2, head_dim=128)
SHIPPED = SparseConfig(dense_len=-1)
# --smoke: shapes small enough for the CPU's interpret mode.
SMOKE_SHAPE = Shape(batch=1, q_heads=16, kv_heads=1, head_dim=64)
SMOKE_CONFIG = SparseConfig(
    block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=4, dense_len=-1
)

INPUT_KINDS = ("random", "smooth")
# bench_attention's --corr / --noise defaults, so that "smooth" means the same inputs in both benchmarks.
DEFAULT_CORR, DEFAULT_NOISE = 256, 0.3


def dense_impl() -> str:
    """The dense baseline's ``implementation``: cuDNN on a GPU, XLA on the CPU (smoke runs)."""
    return "xla" if jax.default_backend() == "cpu" else "cudnn"


def dense_prefill(impl: str):
    """The dense causal forward ``(q, k, v) -> o`` with ``jax.nn.dot_product_attention``'s ``impl``."""
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def sparse_prefill(cfg: SparseConfig):
    """The default sparse prefill ``(q, k, v) -> o``: Pallas selection and attention."""
    return lambda q, k, v: ops.infllmv2_attention(q, k, v, cfg, implementation="pallas")


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _peak_bytes(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {"peak_bytes": None, "temp_bytes": None}
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return {"peak_bytes": int(peak), "temp_bytes": int(mem.temp_size_in_bytes)}


def _time_ms(compiled, args, iters: int) -> dict:
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def _visible_counts(t: int, cfg: SparseConfig) -> tuple[int, int, int]:
    """Sums over tokens of visible fine kernels, visible coarse kernels and selected blocks."""
    pos = np.arange(t, dtype=np.int64)
    fine = np.clip((pos + 1 - cfg.kernel_size) // cfg.kernel_stride + 1, 0, None)
    coarse = np.clip((pos + 1 - cfg.coarse_kernel_size) // cfg.coarse_kernel_stride + 1, 0, None)
    blocks = np.minimum(cfg.num_selected, pos // cfg.block_size + 1)
    return int(fine.sum()), int(coarse.sum()), int(blocks.sum())


def _flops(pass_: str, impl: str, t: int, shape: Shape, cfg: SparseConfig) -> float:
    heads = shape.batch * shape.q_heads
    fine, coarse, blocks = _visible_counts(t, cfg)
    select = 2.0 * heads * shape.head_dim * (fine + coarse)
    if pass_ == "select":
        return select
    if impl == "cudnn":
        return 2.0 * heads * t * t * shape.head_dim  # causal: half of 4 * T^2 * D per head
    return select + 4.0 * heads * shape.head_dim * blocks * cfg.block_size


def experiment_shapes(smoke: bool) -> tuple[Shape, SparseConfig]:
    """The shapes and sparse config of a prefill experiment: tiny ones for a CPU smoke run, else
    MiniCPM4-8B's attention with the shipped config."""
    return (SMOKE_SHAPE, SMOKE_CONFIG) if smoke else (MINICPM4_SHAPE, SHIPPED)


def write_experiment(out: Path, name: str, rows: list[dict], kinds, plot, **how) -> None:
    """``out/name.json`` (provenance, ``how`` the rows were measured, the input kinds' descriptions and
    ``rows``) and ``out/name.png``, drawn by ``plot(rows, path)``."""
    write_report(out, name, {**how, "inputs": {kind: describe_inputs(kind) for kind in kinds}, "rows": rows})
    plot(rows, out / f"{name}.png")


def describe_inputs(kind: str, corr: int = DEFAULT_CORR, noise: float = DEFAULT_NOISE) -> str:
    """One line for the JSON report: what q, k and v of an input kind are."""
    if kind == "random":
        return "q, k, v i.i.d. standard normal: neighbouring tokens select unrelated blocks"
    if kind == "smooth":
        return (
            f"q, k from bench_attention.smooth_process(corr={corr}, noise={noise}): unit-variance random "
            f"walk between anchors every {corr} tokens + white noise x{noise}, so neighbouring tokens "
            "select overlapping blocks; v i.i.d. standard normal"
        )
    raise ValueError(f"unknown input kind {kind!r}, expected one of {INPUT_KINDS}")


def _inputs(
    t: int,
    shape: Shape,
    dtype,
    kind: str = "random",
    corr: int = DEFAULT_CORR,
    noise: float = DEFAULT_NOISE,
    seed: int = 0,
):
    """q, k, v ``[B, T, H, D]`` of one input kind (see ``describe_inputs``).

    The keys are split the same way for every kind, so v is the same tensor and ``random`` is
    bit-identical to the inputs of earlier runs of this benchmark.
    """
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    v = jax.random.normal(kv, (shape.batch, t, shape.kv_heads, shape.head_dim), dtype)
    if kind == "random":
        q = jax.random.normal(kq, (shape.batch, t, shape.q_heads, shape.head_dim), dtype)
        k = jax.random.normal(kk, (shape.batch, t, shape.kv_heads, shape.head_dim), dtype)
        return q, k, v
    if kind != "smooth":
        raise ValueError(f"unknown input kind {kind!r}, expected one of {INPUT_KINDS}")

    def smooth(key, heads):
        # smooth_process draws one sequence ([1, T, H, D], float32): one independent draw per batch row.
        keys = jax.random.split(key, shape.batch)
        draws = [smooth_process(kb, t, heads, shape.head_dim, corr, noise) for kb in keys]
        return jnp.concatenate(draws).astype(dtype)

    return smooth(kq, shape.q_heads), smooth(kk, shape.kv_heads), v


def _pallas_select_fn(cfg: SparseConfig, block_sizes, interpret: bool):
    def select(q, k):
        return pallas_selection.select_blocks(
            q, k, **selection_kwargs(cfg), block_sizes=block_sizes, interpret=interpret
        )

    return select


def run(
    *,
    select_lens=(32768, 65536, 131072),
    prefill_lens=(8192, 16384, 32768, 65536, 131072),
    shape: Shape = MINICPM4_SHAPE,
    cfg: SparseConfig = SHIPPED,
    dtype=jnp.bfloat16,
    sweep_len: int | None = 32768,
    iters: int = 5,
    sweep_budget_s: float = 120.0,
    input_kinds=INPUT_KINDS,
    corr: int = DEFAULT_CORR,
    noise: float = DEFAULT_NOISE,
    profile_lens=(),
    profile_top: int = 12,
    trace_dir: Path | None = None,
    extra_select=(),
    extra_prefill=(),
    log=print,
    on_row=None,
) -> list[dict]:
    """Measures selection and prefill; returns one dict per row (errors are rows with ``error``).

    Args:
      select_lens: sequence lengths of the selection-only rows.
      prefill_lens: sequence lengths of the prefill rows (dense cuDNN and sparse Pallas).
      shape: batch, heads and head dim.
      cfg: sparse configuration (``dense_len=-1`` so that every length runs sparse).
      dtype: input dtype.
      sweep_len: length of the tiling sweep, or ``None`` to skip it.
      iters: timed calls per row.
      sweep_budget_s: sweep variants start only while the run has used less than this.
      input_kinds: input kinds (``INPUT_KINDS``) measured at every length, in this order; the dense
        rows and the sweep run on the first one.
      corr, noise: parameters of the ``smooth`` inputs (``smooth_process``).
      profile_lens: lengths whose Pallas and dense rows also get ``kernels``: device time per
        call of the ``profile_top`` slowest GPU kernels and the sum of the others (ms, from a profiler
        trace), and ``gpu_timeline``: the GPU's busy and idle time within a call
        (``bench_attention.gpu_timeline``).
      trace_dir: keep those rows' profiler traces there (``<implementation>_<pass>_<inputs>_<T>.xplane.pb``).
      extra_select: names in ``SELECT_VARIANTS`` also timed at every select length
        (``implementation`` ``pallas_<name>``).
      extra_prefill: names in ``PREFILL_VARIANTS`` also timed at every prefill length
        (``implementation`` ``pallas_<name>``); their rows record whether the output equals the
        default prefill's bit for bit, and the largest absolute difference.
      log: progress printer.
      on_row: called with the rows so far after each new row (the caller saves them, so that a run
        cut short keeps what it measured).
    """
    input_kinds = tuple(dict.fromkeys(input_kinds))  # drop repeats, keep the order
    if not input_kinds:
        raise ValueError("input_kinds is empty")
    for kind in input_kinds:
        describe_inputs(kind)
    started = time.perf_counter()
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
    on_cpu = jax.default_backend() == "cpu"
    dense = dense_impl()
    rows: list[dict] = []
    dense_ms: dict[int, float] = {}

    def record(impl: str, pass_: str, t: int, fn, args, inputs: str, **extra):
        row = {
            "implementation": impl,
            "pass": pass_,
            "inputs": inputs,
            "batch": shape.batch,
            "seq_len": t,
            "q_heads": shape.q_heads,
            "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim,
            "dtype": jnp.dtype(dtype).name,
            "num_selected": cfg.num_selected,
            **extra,
        }
        compiled = None
        try:
            compiled = _compile(fn, *args)
            row |= _peak_bytes(compiled) | _time_ms(compiled, args, iters)
            row["tflops"] = _flops(pass_, impl, t, shape, cfg) / row["median_ms"] / 1e9
        except Exception as err:  # a failed row is reported, the rest of the run continues
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
        if impl == dense and pass_ == "prefill" and "median_ms" in row:
            dense_ms[t] = row["median_ms"]
        if t in dense_ms and "median_ms" in row:
            row["speedup_vs_cudnn_dense"] = dense_ms[t] / row["median_ms"]
        if compiled is not None and (impl.startswith("pallas") or impl == dense) and t in profile_lens:
            keep = None if trace_dir is None else trace_dir / f"{impl}_{pass_}_{inputs}_{t}.xplane.pb"
            kernels, timeline = kernel_times(compiled, *args, top=profile_top, timeline=True, keep_trace=keep)
            row["kernels"], row["gpu_timeline"] = kernels, timeline
        if pass_ == "select" and t in PAPER_A100_SELECT_MS:
            row["paper_a100_select_ms"] = PAPER_A100_SELECT_MS[t]
        rows.append(row)
        log(_format_row(row))
        if "kernels" in row:
            # After its row's line (before it, a log read as if it belonged to the row above).
            log("    kernels (ms/call): " + ", ".join(f"{k} {v}" for k, v in row["kernels"].items()))
            if row.get("gpu_timeline"):
                log(f"    gpu timeline (per call): {row['gpu_timeline']}")
        if on_row is not None:
            on_row(rows)
        return row, compiled

    # The default tiling (the Mosaic GPU scoring kernel on Hopper) and, where that is not Triton, the
    # Triton scoring kernel for comparison; the top-k kernel is the same.
    group, pool = shape.q_heads // shape.kv_heads, cfg.block_size // cfg.kernel_stride
    default_tiling = pallas_selection.default_block_sizes(dtype, shape.head_dim, group, pool, on_cpu)
    select_variants = {"pallas": default_tiling}
    if default_tiling.mosaic is not None:
        select_variants["pallas_triton"] = pallas_selection.BlockSizes()
    select_variants |= {f"pallas_{name}": SELECT_VARIANTS[name] for name in extra_select}
    for t in sorted(set(select_lens) | set(prefill_lens)):
        for kind in input_kinds:
            q, k, v = _inputs(t, shape, dtype, kind, corr, noise)
            if kind == input_kinds[0]:
                # Dense attention does the same work whatever the values: one row per length is the
                # baseline (speedup_vs_cudnn_dense) of every input kind, recorded before their rows.
                record(dense, "prefill", t, dense_prefill(dense), (q, k, v), kind)
            if t in prefill_lens:
                # The default attention tiling depends on the length (the pure union up to 16K tokens
                # on Hopper): the row says which split between the tile and token phases it ran.
                min_share = pallas_backend.prefill_attention_tiling(q, k, cfg).min_share
                _, compiled = record(
                    "pallas",
                    "prefill",
                    t,
                    sparse_prefill(cfg),
                    (q, k, v),
                    kind,
                    attention_min_share=min_share,
                )
                out = None if compiled is None else np.asarray(compiled(q, k, v))
                for name in extra_prefill:
                    variant_row, variant = record(
                        f"pallas_{name}", "prefill", t, PREFILL_VARIANTS[name](cfg), (q, k, v), kind
                    )
                    if out is not None and variant is not None:
                        got = np.asarray(variant(q, k, v))
                        variant_row["output_identical_to_pallas"] = bool(np.array_equal(got, out))
                        variant_row["max_abs_diff_vs_pallas"] = float(
                            np.max(np.abs(got.astype(np.float32) - out.astype(np.float32)))
                        )
                        same, diff = (
                            variant_row["output_identical_to_pallas"],
                            variant_row["max_abs_diff_vs_pallas"],
                        )
                        log(f"    {name} vs pallas output: identical {same}, max |diff| {diff:.3g}")
                del out
            if t in select_lens:
                pallas_ids = None  # the default selection of these inputs, on the host, computed once
                for impl, tiling in select_variants.items():
                    variant_row, compiled = record(
                        impl,
                        "select",
                        t,
                        _pallas_select_fn(cfg, tiling, on_cpu),
                        (q, k),
                        kind,
                        block_sizes=dataclasses.asdict(tiling),
                    )
                    if impl == "pallas":
                        pallas_ids = None if compiled is None else np.asarray(compiled(q, k))
                    elif compiled is not None and pallas_ids is not None:
                        # Variants that change only the schedule (top-k search, bands, rings) must
                        # select bit-identically; other scoring kernels may order bf16 near-ties apart.
                        agreement = _agreement(compiled(q, k), pallas_ids)
                        variant_row |= agreement
                        log(f"    {impl} vs pallas selection ({kind}): {agreement}")
                if t == min(select_lens):
                    # Per kind: how often bf16 near-ties order differently depends on the score values.
                    xla_row, xla_compiled = record(
                        "xla", "select", t, lambda q, k: ops.select_blocks_reference(q, k, cfg), (q, k), kind
                    )
                    if pallas_ids is not None and xla_compiled is not None:
                        agreement = _agreement(pallas_ids, xla_compiled(q, k))
                        xla_row |= agreement
                        log(f"    xla vs pallas selection ({kind}): {agreement}")
            del q, k, v

    if sweep_len is not None:
        # One input kind suffices: the selection kernels' loop bounds depend on positions only, so their
        # work does not depend on the values (the select rows of each kind above show it).
        sweep_kind = input_kinds[0]
        q, k, _ = _inputs(sweep_len, shape, dtype, sweep_kind, corr, noise)
        for block_sizes in SWEEP:
            if time.perf_counter() - started > sweep_budget_s:
                log(f"sweep stopped: {sweep_budget_s:.0f} s budget used")
                break
            fn = _pallas_select_fn(cfg, block_sizes, on_cpu)
            record(
                "pallas",
                "select",
                sweep_len,
                fn,
                (q, k),
                sweep_kind,
                block_sizes=dataclasses.asdict(block_sizes),
                sweep=True,
            )
    return rows


def _agreement(got: jax.Array, want: jax.Array) -> dict:
    """How far two selections agree: identical (token, KV head) rows and the mean id overlap."""
    got, want = np.asarray(got), np.asarray(want)
    nb = int(max(got.max(), want.max())) + 1

    def mask(idx):
        out = np.zeros((*idx.shape[:-1], nb + 1), bool)
        np.put_along_axis(out, np.where(idx >= 0, idx, nb), True, axis=-1)
        return out[..., :nb]

    common = (mask(got) & mask(want)).sum(-1)
    return {
        "rows_identical_to_pallas": float(np.mean(np.all(got == want, axis=-1))),
        "id_overlap_with_pallas": float(common.sum() / max(1, (want >= 0).sum())),
    }


def _format_row(row: dict) -> str:
    def fmt(key, spec, scale=1.0):
        value = row.get(key)
        return format(value / scale, spec) if value is not None else "-"

    tiling = ""
    if row.get("sweep"):
        changed = {
            name: value
            for name, value in row["block_sizes"].items()
            if value != getattr(pallas_selection.BlockSizes(), name)
        }
        tiling = f" {changed}"
    text = (
        f"{row['implementation']:>7} {row['pass']:>8} {row.get('inputs', '-'):>6} T={row['seq_len']:>7} "
        f"{fmt('median_ms', '9.2f')} ms {fmt('tflops', '7.1f')} TFLOP/s "
        f"x{fmt('speedup_vs_cudnn_dense', '6.2f')} vs dense  "
        f"peak {fmt('peak_bytes', '7.2f', 2**30)} GiB{tiling}"
    )
    return text + (f"  ERROR {row['error']}" if "error" in row else "")


def summary(rows: list[dict]) -> str:
    """Side-by-side table: per (pass, length), the dense time and each input kind's Pallas time and
    speedup, so the effect of the inputs on the same kernels reads off one line (sweep rows left out;
    other Pallas tilings, e.g. ``pallas_triton``, get their own lines, ``select/triton``)."""
    kinds = list(dict.fromkeys(r["inputs"] for r in rows if r["implementation"] == "pallas"))
    dense = {
        r["seq_len"]: r
        for r in rows
        if r["pass"] == "prefill" and not r["implementation"].startswith("pallas")
    }

    def label(row):
        variant = row["implementation"].removeprefix("pallas").lstrip("_")
        return f"{row['pass']}/{variant}" if variant else row["pass"]

    pallas = {
        (label(r), r["seq_len"], r["inputs"]): r
        for r in rows
        if r["implementation"].startswith("pallas") and not r.get("sweep")
    }

    def cell(row, key, spec):
        return format(row[key], spec) if row is not None and key in row else "-"

    head = f"{'pass':>22} {'T':>7} {'dense ms':>10}" + "".join(
        f" | {kind + ' ms':>12} {'x dense':>7}" for kind in kinds
    )
    lines = [head, "-" * len(head)]
    for pass_, t in sorted({(p, t) for p, t, _ in pallas}, key=lambda pt: (pt[0] != "prefill", pt[1])):
        line = f"{pass_:>22} {t:>7} {cell(dense.get(t), 'median_ms', '10.2f'):>10}"
        for kind in kinds:
            row = pallas.get((pass_, t, kind))
            speedup = cell(row, "speedup_vs_cudnn_dense", "7.2f")
            line += f" | {cell(row, 'median_ms', '12.2f'):>12} {speedup:>7}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Time, speedup over dense and peak memory vs sequence length (log-log), from the rows of ``run``.

    Colour is the measurement (dense, sparse prefill, selection), line style and marker the input
    kind. Memory is drawn for the first kind only: it comes from the compiled executable, which is
    the same for every kind (same shapes and dtypes), so the other kinds' lines would coincide.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["inputs"] for r in rows if r["implementation"] == "pallas"))
    styles = {kind: (("-", "o"), ("--", "s"), (":", "^"))[i % 3] for i, kind in enumerate(kinds)}
    series = {  # label -> (colour, row filter)
        "dense fwd": (
            "C0",
            lambda r: r["pass"] == "prefill" and not r["implementation"].startswith("pallas"),
        ),
        "sparse prefill (Pallas select + attention)": (
            "C1",
            lambda r: r["pass"] == "prefill" and r["implementation"] == "pallas",
        ),
        "selection only (Pallas)": (
            "C2",
            lambda r: r["pass"] == "select" and r["implementation"] == "pallas" and not r.get("sweep"),
        ),
        "selection only (Pallas, Triton scoring)": (
            "C3",
            lambda r: r["pass"] == "select" and r["implementation"] == "pallas_triton",
        ),
    }
    fig, (ax_t, ax_s, ax_m) = plt.subplots(1, 3, figsize=(17, 4.8))
    for label, (colour, keep) in series.items():
        dense = label == "dense fwd"
        for kind in kinds[:1] if dense else kinds:  # one dense row per length, whatever the kind
            pts = sorted(
                (r["seq_len"], r)
                for r in rows
                if keep(r) and "median_ms" in r and (dense or r["inputs"] == kind)
            )
            if not pts:
                continue
            lens = [p[0] for p in pts]
            ls, marker = styles[kind]
            name = f"dense fwd ({pts[0][1]['implementation']})" if dense else f"{label} [{kind}]"
            style = dict(color=colour, ls="-" if dense else ls, marker=marker)
            ax_t.plot(lens, [p[1]["median_ms"] for p in pts], label=name, **style)
            if not dense and "selection" not in label:
                speedups = [p[1].get("speedup_vs_cudnn_dense", np.nan) for p in pts]
                ax_s.plot(lens, speedups, label=name, **style)
            if "selection" not in label and kind == kinds[0]:
                mem_name = name if dense else label
                ax_m.plot(lens, [p[1]["peak_bytes"] / 2**30 for p in pts], label=mem_name, **style)
    paper = sorted(PAPER_A100_SELECT_MS.items())
    ax_t.plot([p[0] for p in paper], [p[1] for p in paper], "k--", label="paper selection, A100 (16 blocks)")
    ax_s.axhline(1.0, color="gray", ls=":", label="dense")
    for ax, ylabel in (
        (ax_t, "median ms"),
        (ax_s, "speedup vs dense (prefill)"),
        (ax_m, "peak device memory, GiB"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    r = rows[0]
    ax_t.set_title(
        f"InfLLM-V2 prefill, batch {r['batch']}, {r['q_heads']}/{r['kv_heads']} heads, "
        f"hd {r['head_dim']}, {r['dtype']}, {r['num_selected']} blocks",
        fontsize=9,
    )
    ax_s.set_title(f"sparse prefill speedup, inputs: {', '.join(kinds)}", fontsize=9)
    ax_m.set_title("peak memory (compiled memory_analysis, same for all inputs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-sweep", action="store_true", help="skip the tiling sweep")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpret mode check)")
    parser.add_argument(
        "--inputs",
        nargs="+",
        choices=INPUT_KINDS,
        default=list(INPUT_KINDS),
        help="q/k input kinds, each with its own Pallas rows (dense rows and sweep use the first)",
    )
    parser.add_argument(
        "--select-lens", type=int, nargs="*", help="lengths of the select rows (none: no select rows)"
    )
    parser.add_argument("--prefill-lens", type=int, nargs="+", help="lengths of the prefill rows")
    parser.add_argument(
        "--profile-lens",
        type=int,
        nargs="*",
        default=[],
        help="lengths whose Pallas and dense rows also record per-kernel device times and a timeline",
    )
    parser.add_argument(
        "--profile-top", type=int, default=12, help="kernels listed by name in each profile (the rest summed)"
    )
    parser.add_argument(
        "--trace-dir", type=Path, help="keep the profiled rows' traces (.xplane.pb) in this directory"
    )
    parser.add_argument(
        "--select-variants",
        nargs="*",
        choices=sorted(SELECT_VARIANTS),
        default=[],
        help="selection tilings also timed at every select length (rows pallas_<name>)",
    )
    parser.add_argument(
        "--prefill-variants",
        nargs="*",
        choices=sorted(PREFILL_VARIANTS),
        default=[],
        help="prefill variants also timed at every prefill length (rows pallas_<name>)",
    )
    parser.add_argument("--corr", type=int, default=DEFAULT_CORR, help="smooth: tokens between anchors")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE, help="smooth: white-noise amplitude")
    args = parser.parse_args(argv)
    inputs = dict(
        input_kinds=tuple(dict.fromkeys(args.inputs)),
        corr=args.corr,
        noise=args.noise,
        profile_lens=tuple(args.profile_lens),
        profile_top=args.profile_top,
        trace_dir=args.trace_dir,
        extra_select=tuple(args.select_variants),
        extra_prefill=tuple(args.prefill_variants),
    )

    if args.smoke:
        kwargs = dict(
            select_lens=(512,),
            prefill_lens=(256, 512),
            shape=SMOKE_SHAPE,
            cfg=SMOKE_CONFIG,
            sweep_len=None if args.no_sweep else 512,
            iters=2,
            **inputs,
        )
        name = "bench_selection_smoke"
    else:
        kwargs = dict(sweep_len=None if args.no_sweep else 32768, iters=args.iters, **inputs)
        name = "bench_selection_h200"
    lens = {"select_lens": args.select_lens, "prefill_lens": args.prefill_lens}
    kwargs |= {key: tuple(value) for key, value in lens.items() if value is not None}
    shape, cfg = kwargs.get("shape", MINICPM4_SHAPE), kwargs.get("cfg", SHIPPED)
    device = jax.devices()[0]
    print(f"device: {device.device_kind}  jax {jax.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    # XLA_FLAGS change what is measured, so the command names them.
    xla_flags = [f"XLA_FLAGS={shlex.quote(os.environ['XLA_FLAGS'])}"] if os.environ.get("XLA_FLAGS") else []
    report = {
        "command": " ".join([*xla_flags, Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device.device_kind,
        "jax_version": jax.__version__,
        "config": dataclasses.asdict(cfg),
        "block_sizes_default": dataclasses.asdict(
            pallas_selection.default_block_sizes(
                jnp.bfloat16,
                shape.head_dim,
                shape.q_heads // shape.kv_heads,
                cfg.block_size // cfg.kernel_stride,
                device.platform == "cpu",
            )
        ),
        "inputs": {kind: describe_inputs(kind, args.corr, args.noise) for kind in inputs["input_kinds"]},
        "dense_baseline": (
            f"dense rows: measured once per length, on the {inputs['input_kinds'][0]!r} inputs (dense "
            "attention does no value-dependent work); speedup_vs_cudnn_dense of every kind divides by them"
        ),
        "rows": [],
    }

    def save(rows):
        (args.out / f"{name}.json").write_text(json.dumps(report | {"rows": rows}, indent=1))

    rows = run(**kwargs, on_row=save)
    save(rows)
    plot(rows, args.out / f"{name}.png")
    print(f"\n{summary(rows)}\n")
    print(f"wrote {args.out / f'{name}.json'} and {args.out / f'{name}.png'}")


if __name__ == "__main__":
    main()
