"""What the sparse forward's two phases compute for the benchmark's inputs, and what each unit costs.

For each length and input kind (``bench_selection``'s inputs and seeds) the Pallas selection builds the
attention's lists (``pallas_backend.prefill_selection_pallas``, the prefill's first stage; the default
tiling, with the token phase also where the default is the pure union, ``two_phase_tiling``) and this
script counts per forward chunk (``sparse_attention.fwd_chunk_len``, one launch of each phase):

- ``tokens``; ``tile_entries``: the tile lists' blocks; ``group_blocks``: the blocks the tile phase's
  64-row groups (4 tokens x 16 heads: a Mosaic compute warpgroup) compute, i.e. each entry once per
  group of its tile with a token that chose it (the tile kernels skip the other groups);
  ``tile_token_blocks``: the (token, block) pairs the tile phase serves (its entries' token bits);
- ``token_blocks``: the token phase's blocks (those fewer than ``min_share`` tokens of the tile
  chose), and ``tokens_with_token_blocks``.

On a GPU it also profiles the prefill (``bench_attention.kernel_times``) and fits the token phase's
launches as ``ms = a * tokens + b * token_blocks`` (least squares over every chunk of every length and
input; the token kernels of one call are taken in the order of their profiler names, ``..._token``,
``..._token__1``, ..., which is the chunk order if XLA names them as it emits them: the fit's residuals
say whether that holds), and divides the tile kernel's time by its group blocks. Costs are reported in
SM-nanoseconds (time x SMs), comparable with ``pipe_overlap.py``'s per-step times.

  PYTHONPATH=experiments:. python3 experiments/phase_blocks.py --out experiments/results          # GPU
  PYTHONPATH=experiments:. python3 experiments/phase_blocks.py --smoke --out /tmp/phase_blocks    # CPU
"""

import argparse
import dataclasses
import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_attention import kernel_times, write_report
from bench_selection import INPUT_KINDS, _inputs, describe_inputs, experiment_shapes
from jax import lax

from infllm_jax.ops import pallas_backend
from pallas_kernels import sparse_attention
from pallas_kernels.tiling import persistent_ctas

# Tokens per 64-row group of the tile phase (4 x 16 heads).
GROUP_TOKENS = 4
_TOKEN_KERNEL = re.compile(r"^sparse_attn_fwd_token(__(\d+))?$")
_TILE_KERNEL = "sparse_attn_fwd_tile"


def chunk_counts(block_idx: jax.Array, lists, *, chunk: int, tile_tokens: int) -> list[dict]:
    """Per forward chunk of ``chunk`` tokens: the counts of the module docstring (``block_idx [B, Hkv,
    T, K]``, ``lists`` a ``tiling.TileLists`` with tile and token phases)."""
    t = block_idx.shape[2]
    entry = lax.broadcasted_iota(jnp.int32, lists.tile_ids.shape, 3)
    valid = entry < lists.tile_cnt[..., :1]  # [B, Hkv, tiles, L]
    bits = jnp.where(valid, lists.tile_bits, 0)
    groups = sum(
        (((bits >> (g * GROUP_TOKENS)) & ((1 << GROUP_TOKENS) - 1)) != 0).astype(jnp.int32)
        for g in range(max(1, tile_tokens // GROUP_TOKENS))
    )
    token_cnt = lists.token_cnt[:, :, :t, 0]
    rows = []
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        tiles = slice(start // tile_tokens, -(-stop // tile_tokens))
        row = {
            "first_token": start,
            "tokens": int(np.prod(block_idx.shape[:2])) * (stop - start),
            "selected_blocks": int(jnp.sum(block_idx[:, :, start:stop] >= 0)),
            "tile_entries": int(jnp.sum(valid[:, :, tiles])),
            "group_blocks": int(jnp.sum(groups[:, :, tiles])),
            "tile_token_blocks": int(jnp.sum(lax.population_count(bits[:, :, tiles]))),
            "token_blocks": int(jnp.sum(token_cnt[:, :, start:stop])),
            "tokens_with_token_blocks": int(jnp.sum(token_cnt[:, :, start:stop] > 0)),
        }
        rows.append(row)
    return rows


def launch_times(kernels: dict[str, float]) -> tuple[list[float], float]:
    """The token phase's launches in profiler-name order and the tile kernel's total (ms per call)."""
    token = sorted(
        ((int(m.group(2) or 0), ms) for name, ms in kernels.items() if (m := _TOKEN_KERNEL.match(name))),
    )
    tile = sum(ms for name, ms in kernels.items() if name.startswith(_TILE_KERNEL))
    return [ms for _, ms in token], tile


def fit_token_phase(rows: list[dict], n_sm: int) -> dict:
    """Least-squares ``token_ms = a * tokens + b * token_blocks`` over the chunk rows with a
    ``token_ms``; ``a`` and ``b`` in SM-nanoseconds, and each row's residual."""
    timed = [r for r in rows if "token_ms" in r]
    x = np.array([[r["tokens"], r["token_blocks"]] for r in timed], np.float64)
    y = np.array([r["token_ms"] for r in timed], np.float64)
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    to_sm_ns = 1e6 * n_sm
    return {
        "per_token_sm_ns": round(float(a) * to_sm_ns, 1),
        "per_token_block_sm_ns": round(float(b) * to_sm_ns, 1),
        "residuals_ms": [round(float(v), 4) for v in y - x @ np.array([a, b])],
    }


def two_phase_tiling(q, k, cfg):
    """The prefill's default tiling for ``q``, ``k``, with ``min_share=2`` where the default has no token
    phase (on Hopper the pure union up to 16K tokens, ``sparse_attention.UNION_KEY_BLOCKS_PER_SELECTED``): the
    split this script measures, as the default runs it on longer inputs."""
    tiling = pallas_backend.prefill_attention_tiling(q, k, cfg)
    if tiling.tile_tokens == 0:
        raise SystemExit(f"the default tiling {tiling} has no tile phase to count")
    return tiling if tiling.has_token_phase else dataclasses.replace(tiling, min_share=2)


def _prefill(q, k, v, *, cfg, tiling):
    """The benchmark's prefill: selection on the attention's own q, k, then the sparse forward."""
    return pallas_backend.infllmv2_attention_pallas(
        q, k, v, cfg, select_q=q, select_k=k, attention_tiling=tiling
    )


def run(lens, kinds, *, smoke: bool, log=print) -> dict:
    """The counts (and on a GPU the profile and fit) of every length and input kind."""
    shape, cfg = experiment_shapes(smoke)
    on_gpu = jax.default_backend() == "gpu"
    rows = []
    for t in lens:
        fns = None  # jitted once per length: the input kinds share shapes and dtypes
        for kind in kinds:
            q, k, v = _inputs(t, shape, jnp.bfloat16, kind)
            if fns is None:
                tiling = two_phase_tiling(q, k, cfg)
                select = functools.partial(
                    pallas_backend.prefill_selection_pallas, cfg=cfg, attention_tiling=tiling
                )
                fns = jax.jit(select), jax.jit(functools.partial(_prefill, cfg=cfg, tiling=tiling))
            select, prefill = fns
            idx, lists = select(q, k)
            b, d = q.shape[0], q.shape[-1]
            tp = lists.token_cnt.shape[2]
            chunk = sparse_attention.fwd_chunk_len(b, k.shape[2], d, tp, tiling)
            counts = chunk_counts(idx, lists, chunk=chunk, tile_tokens=tiling.tile_tokens)
            if on_gpu:
                token_ms, tile_ms = launch_times(kernel_times(prefill, q, k, v, calls=3))
                if len(token_ms) != len(counts):
                    raise RuntimeError(f"{len(token_ms)} token-phase kernels for {len(counts)} chunks")
                for row, ms in zip(counts, token_ms, strict=True):
                    row["token_ms"] = round(ms, 4)
            group_blocks = sum(r["group_blocks"] for r in counts)
            entry = {"seq_len": t, "inputs": kind, "min_share": tiling.min_share, "chunk_tokens": chunk}
            entry["chunks"] = counts
            if on_gpu:
                entry["tile_ms"] = round(tile_ms, 4)
                entry["tile_sm_ns_per_group_block"] = round(
                    tile_ms * 1e6 * persistent_ctas(False) / group_blocks, 1
                )
            log(
                f"T={t:>7} {kind:>6}: {len(counts)} chunk(s); tile entries "
                f"{sum(r['tile_entries'] for r in counts)}, group blocks {group_blocks}, token blocks "
                f"{sum(r['token_blocks'] for r in counts)} for {sum(r['tokens'] for r in counts)} tokens"
                + (f"; tile {tile_ms:.2f} ms, token {[r['token_ms'] for r in counts]} ms" if on_gpu else "")
            )
            rows.append(entry)
    body = {"config": dataclasses.asdict(cfg), "rows": rows}
    if on_gpu:
        body["token_phase_fit"] = fit_token_phase(
            [c for r in rows for c in r["chunks"]], persistent_ctas(False)
        )
        log(f"token phase: {body['token_phase_fit']}")
    return body


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lens", type=int, nargs="+", default=[16384, 131072])
    parser.add_argument("--inputs", nargs="+", choices=INPUT_KINDS, default=list(INPUT_KINDS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpret mode, no profile")
    parser.add_argument("--name", default="phase_blocks_h200", help="results file name (.json added)")
    args = parser.parse_args(argv)
    if not args.smoke and jax.default_backend() != "gpu":
        raise SystemExit("phase_blocks.py profiles the H200's kernels: run it on a GPU, or with --smoke")
    lens = [256, 512] if args.smoke else args.lens
    body = run(lens, args.inputs, smoke=args.smoke)
    body["inputs"] = {kind: describe_inputs(kind) for kind in args.inputs}
    write_report(args.out, "phase_blocks_smoke" if args.smoke else args.name, body)


if __name__ == "__main__":
    main()
