"""Benchmark: Pallas block-sparse attention vs dense cuDNN attention, one run on one GPU.

Shapes (ANCHORS.md): B=1, Hq=32, Hkv=2, D=128, bf16, 96 selected blocks of 64 tokens. In the same
process it times, at each T: dense cuDNN (``jax.nn.dot_product_attention(implementation="cudnn",
is_causal=True)``) forward and forward+backward, and the sparse kernels' forward and
forward+backward (``jax.grad`` of ``sum(out**2)`` w.r.t. q, k, v) on two selection patterns:

- ``per_token_random``: block 0 + the 33 local blocks + 62 distinct random past blocks drawn
  independently per token and KV head (no sharing between tokens beyond init + local);
- ``correlated``: ``select_blocks_reference`` (the library's stage-1 selection) on queries and keys
  that follow a smooth random process plus white noise (``--corr`` tokens, ``--noise`` relative
  amplitude); the selection is computed once at the longest T and its prefix is used for shorter T
  (a token's selection depends only on tokens before it).

Each pattern's sharing is reported (blocks per token, union and blocks shared by >= 2 tokens per
tile of 4 and 8 tokens). Times are medians of ``--reps`` calls after a warm-up, compile excluded;
per-kernel device times come from a ``jax.profiler`` trace. Optional stages: ``--check`` runs the
kernel tests (compiled) first, ``--sweep`` times tiling variants at the longest T, and the table
uses the fastest forward variant per pattern. Everything stops starting new work after
``--budget`` seconds and writes what it has: ``bench_attention_h200.json`` and ``.png`` in ``--out``.

Usage (GPU)::

    PYTHONPATH=. python3 experiments/bench_attention.py --check --sweep --out experiments/results

``--smoke`` runs the same code on a CPU in Pallas interpret mode with tiny shapes.
"""

import argparse
import dataclasses
import datetime
import functools
import glob
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from infllm_jax.config import SparseConfig
from infllm_jax.ops.selection import select_blocks_reference
from pallas_kernels._compat import silence_triton_deprecation
from pallas_kernels.sparse_attention import MOSAIC_BLOCK_SIZES, sparse_attention_pallas
from pallas_kernels.tiling import BlockSizes, MosaicDkdv, MosaicTile, canonical_blocks, tile_lists

warnings.filterwarnings("ignore", category=DeprecationWarning)
silence_triton_deprecation()

BLOCK = 64
# Session 2-4's per_token_random table config: blocks shared by >= 3 of 8 tokens, FA3 ping-pong.
MOSAIC_SHARE3_PP = dataclasses.replace(
    MOSAIC_BLOCK_SIZES, min_share=3, mosaic=MosaicTile(stages=3, pingpong=True, unmasked_path=False)
)
# Sessions 2-4's default forward tile phase: 64-key steps, no ping-pong.
MOSAIC_64KEY = dataclasses.replace(MOSAIC_BLOCK_SIZES, mosaic=MosaicTile())
# Tiling variants: name -> BlockSizes. "token_*" is the plain per-token kernel (the ANCHORS naive
# kernel is token_w2_s2); "tileN_shareM" runs blocks shared by >= M of N tokens on N * 16-row tiles;
# "_sK" = num_stages K, "_w8" = 8 warps. The default BlockSizes() is "tile4_share2_s3_nosplit".
VARIANTS = {
    "token_w2_s2": BlockSizes(tile_tokens=0, token_warps=2, num_stages=2),
    "token_w2_s3": BlockSizes(tile_tokens=0, token_warps=2, num_stages=3, mask_split=True),
    "tile4_share2_s3": BlockSizes(tile_tokens=4, min_share=2, tile_warps=4, num_stages=3, mask_split=True),
    "tile4_share2_s3_nosplit": BlockSizes(tile_tokens=4, min_share=2, tile_warps=4, num_stages=3),
    "tile4_share2_w8": BlockSizes(tile_tokens=4, min_share=2, tile_warps=8, num_stages=3, mask_split=True),
    "tile4_share2_s4": BlockSizes(tile_tokens=4, min_share=2, tile_warps=4, num_stages=4, mask_split=True),
    "tile4_share3_s3": BlockSizes(tile_tokens=4, min_share=3, tile_warps=4, num_stages=3, mask_split=True),
    "tile8_share2_s3": BlockSizes(tile_tokens=8, min_share=2, tile_warps=8, num_stages=3, mask_split=True),
    "tile8_share3_s3": BlockSizes(tile_tokens=8, min_share=3, tile_warps=8, num_stages=3, mask_split=True),
    "tile8_union_s3": BlockSizes(tile_tokens=8, min_share=1, tile_warps=8, num_stages=3, mask_split=True),
    # Mosaic GPU kernels (8-token tiles, two compute warpgroups of 4 tokens): "mosaic8_share2" is the
    # default on Hopper (MOSAIC_BLOCK_SIZES; since session 5 its forward takes 128-key steps with
    # ping-pong, 2-slot ring, skip path; since session 6 row masks and no unmasked path; Mosaic dQ
    # tile phase and dK/dV);
    # "_64key" = the sessions 2-4 default forward (64-key steps, no ping-pong); each JSON's "config"
    # field records the full tiling a name ran; "_pp" = FA3 ping-pong with a 3-slot ring, no unmasked path;
    # "_triton_dkdv" = the whole backward on the Triton kernels (the session-2 default); "_dq" names
    # (what the table of bench_attention_h200_session3.json ran) are the same configs as the defaults;
    # "_dkdv_r232": the dK/dV kernel's compute warpgroups get 232 registers, its memory warpgroup 40.
    "mosaic8_share2": MOSAIC_BLOCK_SIZES,
    "mosaic8_share2_64key": MOSAIC_64KEY,
    "mosaic8_share2_dq": MOSAIC_BLOCK_SIZES,
    "mosaic8_share2_triton_dkdv": dataclasses.replace(MOSAIC_BLOCK_SIZES, mosaic_dkdv=None, mosaic_dq=None),
    "mosaic8_share2_st3": dataclasses.replace(MOSAIC_BLOCK_SIZES, mosaic=MosaicTile(stages=3)),
    "mosaic8_share2_pp": dataclasses.replace(
        MOSAIC_BLOCK_SIZES, mosaic=MosaicTile(stages=3, pingpong=True, unmasked_path=False)
    ),
    "mosaic8_share3_pp": MOSAIC_SHARE3_PP,
    "mosaic8_share3_pp_dq": MOSAIC_SHARE3_PP,
    "mosaic8_share3_pp_triton_dkdv": dataclasses.replace(MOSAIC_SHARE3_PP, mosaic_dkdv=None, mosaic_dq=None),
    "mosaic8_share2_dkdv_r232": dataclasses.replace(
        MOSAIC_BLOCK_SIZES, mosaic_dkdv=MosaicDkdv(compute_registers=232, memory_registers=40)
    ),
    # "_pairs": the forward tile phase takes two list entries (128 keys) per step; "_pairs_pp" is the
    # session-5 default (with the unmasked path; row masks since session 6), kept so that
    # bench_attention_sweep_h200_pairs.json's command re-runs.
    "mosaic8_share2_pairs": dataclasses.replace(MOSAIC_BLOCK_SIZES, mosaic=MosaicTile(blocks_per_step=2)),
    "mosaic8_share2_pairs_pp": dataclasses.replace(
        MOSAIC_BLOCK_SIZES, mosaic=MosaicTile(blocks_per_step=2, pingpong=True)
    ),
    "mosaic8_share3_pairs_pp": dataclasses.replace(
        MOSAIC_SHARE3_PP, mosaic=MosaicTile(blocks_per_step=2, pingpong=True, unmasked_path=False)
    ),
    # "_scoremasks": row_masks=False in the forward and dQ tile phases (every block that is not whole
    # masks per score: the session-5 configs); "_nounmasked": whole blocks take the row-mask path in
    # the dQ tile phase too (the forward's default since session 6).
    "mosaic8_share2_scoremasks": dataclasses.replace(
        MOSAIC_BLOCK_SIZES,
        mosaic=MosaicTile(blocks_per_step=2, pingpong=True, row_masks=False),
        mosaic_dq=MosaicTile(row_masks=False),
    ),
    "mosaic8_share2_nounmasked": dataclasses.replace(
        MOSAIC_BLOCK_SIZES,
        mosaic=MosaicTile(blocks_per_step=2, pingpong=True, unmasked_path=False),
        mosaic_dq=MosaicTile(unmasked_path=False),
    ),
    # Every block in the tile phases (forward and dQ; no token phases): the prefill's forward is faster
    # so up to 16K tokens (interleaved_prefill_h200_*_min_share_1.json); this times the backward too.
    "mosaic8_union": dataclasses.replace(MOSAIC_BLOCK_SIZES, min_share=1),
    "mosaic8_share3_pairs_pp_scoremasks": dataclasses.replace(
        MOSAIC_SHARE3_PP,
        mosaic=MosaicTile(blocks_per_step=2, pingpong=True, unmasked_path=False, row_masks=False),
        mosaic_dq=MosaicTile(row_masks=False),
    ),
    # "_chunk1g": 1 GiB of tile -> token state per forward chunk (3 chunks at 128K instead of 9: fewer
    # kernel launches and tails, ~0.5 GiB more peak memory); the default since session 9, kept by this
    # name so that earlier sessions' commands still run.
    "mosaic8_share2_chunk1g": dataclasses.replace(MOSAIC_BLOCK_SIZES, fwd_chunk_bytes=1 << 30),
}


class Clock:
    """Wall-clock budget: work is skipped once ``left() <= 0``."""

    def __init__(self, budget):
        self.start, self.budget = time.time(), budget

    def left(self):
        return self.budget - (time.time() - self.start)


class ModuleProxy:
    """A module with some attributes replaced: diagnostics swap it in for a kernel module's import
    (``jnp``, ``plgpu``, ``lax``) while the kernel is traced, and put the module back after."""

    def __init__(self, module, **overrides):
        self._module, self._overrides = module, overrides

    def __getattr__(self, name):
        return self._overrides.get(name, getattr(self._module, name))


def write_report(out_dir, name: str, body: dict):
    """Writes ``out_dir/name.json``: the command, date, device and jax version, then ``body``; returns the
    path (the provenance every GPU results file carries)."""
    report = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        **body,
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    return path


def log(msg):
    print(msg, flush=True)


def timed(fn, *args, reps):
    """Compile (first call), warm up once, then the median of ``reps`` calls in ms."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, compile_s


def _trace(fn, args, calls, keep=None):
    """``jax.profiler.ProfileData`` of ``calls`` synchronised calls of ``fn``, or None (logged); with
    ``keep`` (a path) the trace file (``.xplane.pb``: TensorBoard, Perfetto via xprof) is copied there."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            jax.profiler.start_trace(tmp)
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
            jax.profiler.stop_trace()
            (path,) = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
            if keep is not None:
                shutil.copyfile(path, keep)
            return jax.profiler.ProfileData.from_file(path)
        except Exception as err:  # the profiler is an extra: never lose the timings for it
            log(f"  (profiler unavailable: {err!r:.200})")
            return None


def _stream_events(data):
    """Every kernel event ``(start_ns, end_ns, name)`` of the GPU planes, by start: their stream lines
    hold one event per kernel launch ("XLA Ops"/"XLA Modules" lines summarise them), or, in a trace
    without stream lines, every line."""
    events = []
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            lines = [line for line in plane.lines if "Stream" in line.name] or list(plane.lines)
            for line in lines:
                events += [(e.start_ns, e.end_ns, e.name) for e in line.events]
    return sorted(events)


def kernel_totals(data, calls, top=12):
    """Device time per call (ms) of the ``top`` slowest kernels of a trace and the sum of the others."""
    totals = {}
    for start, end, name in _stream_events(data):
        totals[name] = totals.get(name, 0.0) + (end - start) / 1e6 / calls
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    kept = {k: round(v, 3) for k, v in ranked[:top]}
    if len(ranked) > top:
        kept[f"({len(ranked) - top} other kernels)"] = round(sum(v for _, v in ranked[top:]), 3)
    return kept


def _host_events(data, marker):
    """``(start_ns, end_ns)`` of the host events whose name contains ``marker``, by start."""
    return sorted(
        (e.start_ns, e.end_ns)
        for plane in data.planes
        if plane.name == "/host:CPU"
        for line in plane.lines
        for e in line.events
        if marker in e.name
    )


def gpu_timeline(data, calls, gap_ns=50_000, widest=5):
    """How busy the GPU was during each call: per call (averaged) the span from the first kernel's
    start to the last one's end, the time some kernel ran, the idle rest, the number of launches, and
    the ``widest`` idle gaps longer than ``gap_ns`` with the kernels on either side. Calls are told
    apart as the ``calls`` runs of launches separated by the widest gaps (each call ends with a host
    synchronisation, so the gap between calls is the host's turnaround).

    Where the trace has the host's events, also the host's share of a synchronised call's wall time:
    ``dispatch_us`` from the start of the jitted call (``PjitFunction``) to its first kernel, and
    ``sync_us`` from its last kernel's end to the return of ``block_until_ready``."""
    events = _stream_events(data)
    if len(events) < calls:
        return {}
    # Idle gaps between consecutive kernels (overlapping kernels leave none).
    gaps, end = [], events[0][1]
    for i in range(1, len(events)):
        gaps.append((events[i][0] - end, i))
        end = max(end, events[i][1])
    cuts = sorted(i for _, i in sorted(gaps, reverse=True)[: calls - 1])
    bounds = [0, *cuts, len(events)]
    launches, waits = _host_events(data, "PjitFunction"), _host_events(data, "block_until_ready")
    span = busy = 0
    host = []  # per call: (dispatch, sync) ns, where the trace has the host events around it
    for lo, hi in itertools.pairwise(bounds):
        run = events[lo:hi]
        first, last = run[0][0], max(e for _, e, _ in run)
        span += last - first
        cover, cover_end = 0, first
        for s, e, _ in run:
            cover += max(0, e - max(s, cover_end))
            cover_end = max(cover_end, e)
        busy += cover
        started = [s for s, _ in launches if s <= first]
        returned = [e for _, e in waits if e >= last]
        if started and returned:
            host.append((first - started[-1], min(returned) - last))
    in_call = [(g, i) for g, i in gaps if i not in cuts and g > gap_ns]
    timeline = {
        "span_ms": round(span / calls / 1e6, 3),
        "busy_ms": round(busy / calls / 1e6, 3),
        "idle_ms": round((span - busy) / calls / 1e6, 3),
        "launches": len(events) // calls,
        "widest_gaps_us": [
            [round(g / 1e3, 1), events[i - 1][2], events[i][2]]
            for g, i in sorted(in_call, reverse=True)[:widest]
        ],
    }
    if len(host) == calls:
        dispatch, sync = (sum(x) for x in zip(*host, strict=True))
        timeline |= {"dispatch_us": round(dispatch / calls / 1e3, 1), "sync_us": round(sync / calls / 1e3, 1)}
    return timeline


def kernel_times(fn, *args, calls=2, top=12, timeline=False, keep_trace=None):
    """Device time per call of the ``top`` slowest GPU kernels and the sum of the others (ms), from a
    profiler trace; {} where unavailable. With ``timeline``: ``(kernels, gpu_timeline(...))``; with
    ``keep_trace`` (a path) the trace file is kept there."""
    data = _trace(fn, args, calls, keep_trace)
    if data is None:
        return ({}, {}) if timeline else {}
    kept = kernel_totals(data, calls, top)
    if not kept:
        log(f"  (no GPU kernel events; planes: {[plane.name for plane in data.planes][:8]})")
    return (kept, gpu_timeline(data, calls)) if timeline else kept


def random_selection(key, t, hkv, n_random=62, local=33, chunk=4096):
    """per_token_random: int32 ``[1, Hkv, T, 1 + local + n_random]``, sorted, -1 padded."""
    nb = -(-t // BLOCK)
    chunk = min(chunk, t)
    k_sel = min(n_random, nb)

    def one(args):
        key, start = args
        own = (start + jnp.arange(chunk, dtype=jnp.int32)) // BLOCK  # [C]
        j = jnp.arange(nb, dtype=jnp.int32)
        cand = (j[None, :] >= 1) & (j[None, :] <= own[:, None] - local)  # strictly before the local window
        u = jnp.where(cand[None], jax.random.uniform(key, (hkv, chunk, nb)), -1.0)
        vals, picks = lax.top_k(u, k_sel)
        picks = jnp.where(vals >= 0, picks, -1)
        loc = own[:, None] - local + 1 + jnp.arange(local, dtype=jnp.int32)[None, :]  # [C, local]
        loc = jnp.broadcast_to(jnp.where(loc >= 1, loc, -1)[None], (hkv, chunk, local))
        init = jnp.zeros((hkv, chunk, 1), jnp.int32)
        ids = jnp.concatenate([init, loc, picks.astype(jnp.int32)], axis=-1)
        ids = jnp.sort(jnp.where(ids >= 0, ids, jnp.iinfo(jnp.int32).max), axis=-1)
        return jnp.where(ids == jnp.iinfo(jnp.int32).max, -1, ids)

    n = -(-t // chunk)
    keys = jax.random.split(key, n)
    out = lax.map(one, (keys, jnp.arange(n, dtype=jnp.int32) * chunk))  # [n, Hkv, C, K]
    return out.transpose(1, 0, 2, 3).reshape(1, hkv, n * chunk, -1)[:, :, :t]


def smooth_process(key, t, h, d, corr, noise):
    """Unit-variance ``[1, T, H, D]``: a piecewise-linear random walk between anchors every ``corr``
    tokens (neighbouring tokens are correlated) plus white noise of relative amplitude ``noise``."""
    k_anchor, k_noise = jax.random.split(key)
    anchors = jax.random.normal(k_anchor, (t // corr + 2, h, d))
    pos = jnp.arange(t) / corr
    i0 = jnp.floor(pos).astype(jnp.int32)
    w = (pos - i0)[:, None, None]
    x = (anchors[i0] * (1 - w) + anchors[i0 + 1] * w) / jnp.sqrt((1 - w) ** 2 + w**2)
    x = (x + noise * jax.random.normal(k_noise, (t, h, d))) / np.sqrt(1 + noise**2)
    return x[None]


def correlated_selection(key, t, hq, hkv, d, corr, noise, chunk):
    kq, kk = jax.random.split(key)
    q = smooth_process(kq, t, hq, d, corr, noise)
    k = smooth_process(kk, t, hkv, d, corr, noise)
    cfg = SparseConfig(dense_len=-1)
    return select_blocks_reference(q, k, cfg, query_chunk=min(chunk, t))


@functools.partial(jax.jit, static_argnums=1)
def pattern_stats(idx, t):
    """Sharing statistics of a selection over the second half of the sequence (full lists there)."""
    ids, cnt = canonical_blocks(idx, padded_len=t, block_size=BLOCK)
    half = t // 2
    stats = {"blocks_per_token": cnt[..., half:].mean()}
    for tq in (4, 8):
        union = tile_lists(ids, BlockSizes(tile_tokens=tq, min_share=1), BLOCK).tile_cnt[..., 0]
        shared = tile_lists(ids, BlockSizes(tile_tokens=tq, min_share=2), BLOCK).tile_cnt[..., 0]
        stats[f"union_per_tile{tq}"] = union[..., half // tq :].mean()
        stats[f"shared2_per_tile{tq}"] = shared[..., half // tq :].mean()
    return stats


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def sparse_flops(idx, t, g, d):
    """Forward FLOPs counting only visible keys: 4 * D * G * sum over (b, kv, t) of visible keys."""
    ids, cnt = canonical_blocks(idx, padded_len=t, block_size=BLOCK)
    tok = jnp.arange(t, dtype=jnp.int32)[None, None, :, None]
    keys = jnp.clip(tok - ids * BLOCK + 1, 0, BLOCK)
    valid = jnp.arange(ids.shape[-1])[None, None, None, :] < cnt[..., None]
    return 4.0 * d * g * jnp.sum(jnp.where(valid, keys, 0), dtype=jnp.float32)


def make_fns(config, block_size, interpret):
    def fwd(q, k, v, idx):
        return sparse_attention_pallas(
            q, k, v, idx, block_size=block_size, config=config, interpret=interpret
        )

    def loss(q, k, v, idx):
        return jnp.sum(jnp.square(fwd(q, k, v, idx).astype(jnp.float32)))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def dense_fns(implementation):
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

    def loss(q, k, v):
        return jnp.sum(jnp.square(fwd(q, k, v).astype(jnp.float32)))

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run_tests(timeout):
    """Runs the kernel tests (compiled on a GPU) in a subprocess; returns its exit code and summary."""
    cmd = [sys.executable, "-m", "pytest", "-q"]
    cmd += ["tests/kernels/test_sparse_attention_pallas.py", "tests/kernels/test_sparse_attention_mgpu.py"]
    cmd += ["-p", "no:cacheprovider", "--durations=5"]
    log(f"$ {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        lines, code = (proc.stdout + proc.stderr).strip().splitlines(), proc.returncode
    except subprocess.TimeoutExpired as err:
        lines, code = (err.stdout or b"").decode(errors="replace").strip().splitlines(), None
        lines.append(f"timed out after {timeout}s")
    log("\n".join(lines[-40:]))
    return {"returncode": code, "summary": lines[-1] if lines else ""}


def plot(result, path):
    # Imported here: matplotlib is needed only for the figure.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(13, 5))
    series = {}
    for r in rows:
        label = f"{r['impl']} {r['pass']}" + (f" [{r['pattern']}]" if r["pattern"] else "")
        series.setdefault(label, []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["T"])
        style = "--" if rs[0]["impl"] == "cudnn_dense" else "-"
        ax_t.plot([r["T"] for r in rs], [r["median_ms"] for r in rs], style, marker="o", label=label)
        if rs[0]["impl"] != "cudnn_dense":
            ax_s.plot([r["T"] for r in rs], [r["speedup_vs_cudnn"] for r in rs], marker="o", label=label)
    for ax in (ax_t, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("median ms")
    ax_t.legend(fontsize=7)
    ax_s.axhline(6, color="gray", ls=":", label="fwd target 6x")
    ax_s.axhline(5, color="gray", ls="-.", label="fwd+bwd target 5x")
    ax_s.set_ylabel("speedup vs cuDNN dense (same pass)")
    ax_s.legend(fontsize=7)
    fig.suptitle(
        f"InfLLM-V2 sparse attention vs cuDNN, {result['device']}, B=1 Hq=32 Hkv=2 D=128 bf16, 96 blocks"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(result, args):
    """Writes the JSON (after every stage, so a run cut short keeps what it measured); returns its stem."""
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_attention_smoke" if args.smoke else "bench_attention_h200")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    return stem


def config_dict(config):
    return dataclasses.asdict(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="8192,16384,32768,65536,131072")
    parser.add_argument("--patterns", default="per_token_random,correlated")
    parser.add_argument("--check", action="store_true", help="run tests/kernels first")
    parser.add_argument("--test-timeout", type=int, default=110)
    parser.add_argument(
        "--config", default="auto", help="table variant (auto: fastest in the sweep), or pattern=variant,..."
    )
    parser.add_argument("--sweep", action="store_true", help="first time tiling variants at the longest T")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--compare", default="", help="variants also timed at every T in the table (impl pallas_<variant>)"
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-kernel device times from a profiler trace (sweep rows and the longest T)",
    )
    parser.add_argument("--corr", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--out", default="experiments/results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpret mode")
    args = parser.parse_args()
    if "auto" in args.config and not args.sweep:
        parser.error("--config auto needs --sweep")
    clock = Clock(args.budget)
    interpret = jax.default_backend() == "cpu"
    seqs = [int(s) for s in args.seqs.split(",")]
    hq, hkv, d = 32, 2, 128
    if args.smoke:
        seqs, hq, args.reps = [256, 512], 4, 1
    t_max = max(seqs)
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "shapes": {
            "B": 1,
            "Hq": hq,
            "Hkv": hkv,
            "D": d,
            "dtype": "bfloat16",
            "block_size": BLOCK,
            "blocks": 96,
        },
        "flops_convention": "dense causal fwd 2*Hq*T^2*D; sparse fwd 4*D*Hq*visible keys; fwd+bwd = 3.5x fwd",
        "timing": f"median of {args.reps} calls after compile + 1 warm-up, block_until_ready, host clock",
        "patterns": {},
        "rows": [],
        "variants": [],
        "kernels": {},
    }
    log(f"device {result['device']}, jax {jax.__version__}, backend {jax.default_backend()}")
    if args.check:
        result["tests"] = run_tests(args.test_timeout)
        save(result, args)

    key = jax.random.key(0)
    kq, kk, kv, ksel, kcor = jax.random.split(key, 5)
    q_all = jax.random.normal(kq, (1, t_max, hq, d), jnp.bfloat16)
    k_all = jax.random.normal(kk, (1, t_max, hkv, d), jnp.bfloat16)
    v_all = jax.random.normal(kv, (1, t_max, hkv, d), jnp.bfloat16)
    selections = {}
    for name in args.patterns.split(","):
        t0 = time.perf_counter()
        if name == "per_token_random":
            idx = jax.block_until_ready(random_selection(ksel, t_max, hkv))
            desc = "block 0 + 33 local + 62 distinct uniform random blocks before the local window, per token"
        elif name == "correlated":
            idx = jax.block_until_ready(
                correlated_selection(kcor, t_max, hq, hkv, d, args.corr, args.noise, 1024)
            )
            desc = (
                f"select_blocks_reference (96 = 1 init + 33 local + 62 top-k) on smooth q/k: random "
                f"walk anchors every {args.corr} tokens + white noise x{args.noise} (prefix of the T_max "
                "selection)"
            )
        else:
            raise ValueError(f"unknown pattern {name}")
        selections[name] = idx
        stats = {key: float(value) for key, value in pattern_stats(idx, t_max).items()}
        result["patterns"][name] = {
            "description": desc,
            "stats_at_T_max": stats,
            "build_s": time.perf_counter() - t0,
        }
        log(f"pattern {name}: {stats} ({time.perf_counter() - t0:.1f}s)")

    def sparse_inputs(t, name):
        return q_all[:, :t], k_all[:, :t], v_all[:, :t], selections[name][:, :, :t]

    # Tiling variants at the longest T (forward only); "--config auto" takes the fastest per pattern.
    fastest = {}
    if args.sweep:
        for vname in args.variants.split(","):
            if clock.left() < 100:
                log(f"budget: sweep stops before {vname}")
                break
            fwd, _ = make_fns(VARIANTS[vname], BLOCK, interpret)
            for name in selections:
                ms, comp = timed(fwd, *sparse_inputs(t_max, name), reps=args.reps)
                kern = kernel_times(fwd, *sparse_inputs(t_max, name)) if args.profile else {}
                row = {"variant": vname, "pattern": name, "T": t_max, "pass": "fwd", "median_ms": ms}
                row.update(compile_s=comp, kernels_ms=kern, config=config_dict(VARIANTS[vname]))
                result["variants"].append(row)
                log(f"sweep fwd {vname:24s} {name:17s} {ms:8.2f} ms  compile {comp:5.1f}s  {kern}")
                fastest[name] = min(fastest.get(name, (ms, vname)), (ms, vname))
            save(result, args)
    chosen = {}
    for item in args.config.split(","):
        name, _, variant = item.rpartition("=")
        for pattern in [name] if name else selections:
            chosen[pattern] = fastest[pattern][1] if variant == "auto" else variant
    result["config"] = {name: {"variant": v, **config_dict(VARIANTS[v])} for name, v in chosen.items()}
    log(f"table configs: {chosen}")

    # The table: dense cuDNN and the sparse kernels at each T (longest first: the headline numbers).
    dense_impl = "xla" if interpret else "cudnn"
    dense_fwd, dense_grad = dense_fns(dense_impl)
    for t in sorted(seqs, reverse=True):
        if clock.left() < 20:
            log(f"budget: table stops before T={t}")
            break
        q, k, v = q_all[:, :t], k_all[:, :t], v_all[:, :t]
        dense_flops = 2.0 * hq * t * t * d
        dense_ms = {}
        for pass_name, fn, mult in (("fwd", dense_fwd, 1.0), ("fwd_bwd", dense_grad, 3.5)):
            ms, _ = timed(fn, q, k, v, reps=args.reps)
            dense_ms[pass_name] = ms
            row = {"impl": f"{dense_impl}_dense", "pattern": None, "pass": pass_name, "T": t, "median_ms": ms}
            row.update(tflops=mult * dense_flops / ms / 1e9, speedup_vs_cudnn=1.0)
            result["rows"].append(row)
        for name in selections:
            inputs = sparse_inputs(t, name)
            flops = float(sparse_flops(inputs[3], t, hq // hkv, d))
            impls = [("pallas_sparse", chosen[name])]
            impls += [(f"pallas_{v}", v) for v in args.compare.split(",") if v and v != chosen[name]]
            for impl, variant in impls:
                # The chosen config always runs; comparisons and the profile only while the budget
                # lasts. The JSON is rewritten after each of them, so a run cut short keeps its rows.
                if impl != "pallas_sparse" and clock.left() < 30:
                    log(f"budget: skips {impl} [{name}] at T={t}")
                    continue
                fwd, grad = make_fns(VARIANTS[variant], BLOCK, interpret)
                for pass_name, fn, mult in (("fwd", fwd, 1.0), ("fwd_bwd", grad, 3.5)):
                    ms, _ = timed(fn, *inputs, reps=args.reps)
                    row = {"impl": impl, "variant": variant, "pattern": name, "pass": pass_name, "T": t}
                    row.update(median_ms=ms, tflops=mult * flops / ms / 1e9)
                    row.update(speedup_vs_cudnn=dense_ms[pass_name] / ms)
                    result["rows"].append(row)
                save(result, args)
            if t == t_max and args.profile and clock.left() < 30:
                log(f"budget: skips the profile [{name}]")
            elif t == t_max and args.profile:
                fwd, grad = make_fns(VARIANTS[chosen[name]], BLOCK, interpret)
                kern = {"fwd": kernel_times(fwd, *inputs), "fwd_bwd": kernel_times(grad, *inputs, calls=1)}
                result["kernels"][name] = kern
                log(f"kernels at T={t} [{name}]: {kern}")
                save(result, args)
        log(f"T={t} done ({clock.left():.0f}s left)")

    stem = save(result, args)
    if result["rows"]:
        plot(result, stem + ".png")
    log(f"\n{'impl':28s} {'pattern':17s} {'pass':8s} {'T':>7s} {'ms':>9s} {'TFLOP/s':>8s} {'vs cuDNN':>8s}")
    for r in sorted(result["rows"], key=lambda r: (r["T"], r["pass"], r["impl"], r["pattern"] or "")):
        log(
            f"{r['impl']:28s} {r['pattern'] or '-':17s} {r['pass']:8s} {r['T']:7d} {r['median_ms']:9.2f} "
            f"{r['tflops']:8.1f} {r['speedup_vs_cudnn']:7.2f}x"
        )
    log(f"wrote {stem}.json ({time.time() - clock.start:.0f}s total)")


if __name__ == "__main__":
    main()
