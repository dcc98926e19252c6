"""What the Mosaic forward's 8-token tile lists hold for the benchmark's q/k (CPU, no GPU needed).

Selects blocks with ``select_blocks_reference`` for the last ``--queries`` tokens of a ``--seq-len`` sequence
(``--inputs smooth``: ``bench_attention.smooth_process`` q/k; ``random``: ``bench_selection``'s i.i.d. ones;
the shipped config), builds the 8-token tile lists with
``tiling.tile_lists`` (shares of 2 and, for comparison, the pure union) and reports per tile:

- the list length, split into blocks that tokens of both compute warpgroups chose (tokens 0-3 and 4-7) and
  blocks only one warpgroup's tokens chose;
- the 2-block ring steps (``MosaicTile(blocks_per_step=2)``) that serve both warpgroups or one, with the
  lists ascending (shipped) or grouped by warpgroup;
- the share of the rows a warpgroup computes that belong to a token that chose the block;
- for the token phase (shares of 2): how many of a token's private blocks the token at the same place of the
  next tile (or of the next three) also has privately, i.e. what a token-phase program serving those tokens
  together would load once instead of twice;
- a model of tiles of 8 tokens on 2 compute warpgroups (the kernel) against 12 tokens on 3 (a design, not
  built): each tile's shared blocks grouped by the warpgroups whose tokens chose them, paired into 128-key
  steps, each step costing what session 21's synthetic kernel measured for that many warpgroups running the
  forward's step (``pipe_overlap_h200*.json``, role ``fa``), plus each private block at the token phase's
  fitted cost (``phase_blocks_h200.json``), in SM-ns per token and KV head.

  python3 experiments/tile_list_stats.py [--seq-len 131072] [--queries 2048] [--inputs random]
      [--out experiments/results]
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Sibling scripts, not package modules: importable because running experiments/<script>.py puts
# experiments/ first on sys.path (the documented way to run these benchmarks).
from bench_attention import BLOCK, smooth_process
from bench_selection import DEFAULT_CORR, DEFAULT_NOISE, MINICPM4_SHAPE, _inputs, describe_inputs

from infllm_jax.config import SparseConfig
from infllm_jax.ops.selection import select_blocks_reference
from pallas_kernels.tiling import BlockSizes, canonical_blocks, tile_lists

TILE_TOKENS = 8
HALF = TILE_TOKENS // 2
RESULTS = Path(__file__).resolve().parent / "results"
WARPGROUP_TOKENS = 4  # a compute warpgroup's 64 WGMMA rows: 4 tokens x 16 heads


def warpgroup_classes(bits: np.ndarray) -> np.ndarray:
    """0: tokens of both halves chose the block, 1: only the first half's, 2: only the second's."""
    first, second = (bits & ((1 << HALF) - 1)) != 0, (bits >> HALF) != 0
    return np.where(first & second, 0, np.where(first, 1, 2))


def step_counts(bits: np.ndarray, grouped: bool) -> tuple[int, int]:
    """Two-entry steps of one list (its entries' ``bits`` in list order) serving both warpgroups, and one."""
    if grouped:
        bits = bits[np.argsort(warpgroup_classes(bits), kind="stable")]
    if len(bits) % 2:
        bits = np.append(bits, 0)  # the kernel pairs an odd list's last entry with padding (no bits)
    # A step never has zero bits: padding only ever pairs with a listed block.
    both = int(np.sum(warpgroup_classes(bits[0::2] | bits[1::2]) == 0))
    return both, len(bits) // 2 - both


def list_stats(bits: np.ndarray, counts: np.ndarray) -> dict:
    """Per-tile means over the token bitmasks ``[..., L]`` of ``tile_lists`` with ``counts`` valid entries."""
    rows = [b[:n] for b, n in zip(bits.reshape(-1, bits.shape[-1]), counts.ravel(), strict=True)]
    classes = np.concatenate([warpgroup_classes(b) for b in rows])
    tiles = len(rows)
    out = {
        "list_blocks": float(np.mean(counts)),
        "both_warpgroups": float(np.sum(classes == 0) / tiles),
        "first_warpgroup_only": float(np.sum(classes == 1) / tiles),
        "second_warpgroup_only": float(np.sum(classes == 2) / tiles),
    }
    for grouped in (False, True):
        both, one = np.sum([step_counts(b, grouped) for b in rows], axis=0) / tiles
        key = "grouped" if grouped else "ascending"
        out[f"steps_both_{key}"], out[f"steps_one_{key}"] = float(both), float(one)
    # Token rows a warpgroup computes: its 4 per entry whose bits touch its half; useful: one per token
    # that chose the entry. Class 0 entries touch both halves.
    entries = np.concatenate(rows)
    computed = HALF * (len(classes) + np.sum(classes == 0))
    out["useful_row_share"] = float(np.sum(np.bitwise_count(entries)) / computed)
    return out


def block_membership(ids: np.ndarray, num_blocks: int) -> np.ndarray:
    """``[..., T, K]`` block ids (ids ``>= num_blocks`` are empty slots) -> ``[..., T, num_blocks]`` bool:
    which blocks each token lists."""
    member = np.zeros((*ids.shape[:-1], num_blocks + 1), bool)
    np.put_along_axis(member, np.minimum(ids, num_blocks), True, axis=-1)
    return member[..., :num_blocks]


def private_blocks_shared(token_ids: np.ndarray, token_cnt: np.ndarray, tiles: int, num_blocks: int) -> float:
    """Share of the token-phase block loads that tokens at the same place of ``tiles`` consecutive tiles
    have in common: ``1 - distinct / total`` over groups of such tokens.

    Args:
      token_ids: ``[..., T, K]`` the tokens' private block ids; token_cnt: ``[..., T]`` how many of each
        token's are valid.
      tiles: tiles per group; ``T`` a multiple of ``tiles * 8``.
    """
    *lead, t, k = token_ids.shape
    valid = np.arange(k) < token_cnt[..., None]
    member = block_membership(np.where(valid, token_ids, num_blocks), num_blocks).reshape(
        *lead, t // (tiles * TILE_TOKENS), tiles, TILE_TOKENS, num_blocks
    )
    total = int(np.sum(token_cnt))
    return 0.0 if total == 0 else 1.0 - int(np.sum(member.any(axis=-3))) / total


def measured_step_costs(results: Path = RESULTS) -> tuple[dict[int, float], float]:
    """Per-SM ns of one forward step (``pipe_overlap`` role ``fa``) with 1, 2 and 3 warpgroups running it,
    and the token phase's fitted SM-ns per private block, from the committed H200 results. Two and three
    warpgroups come from one run (the scoring-parts call), one warpgroup from the first call."""
    steps = {}
    for name in ("pipe_overlap_h200_scoring_parts.json", "pipe_overlap_h200.json"):
        data = json.loads((results / name).read_text())
        for row in data["rows"]:
            roles = [r for r in row["roles"] if r != "idle"]
            if set(roles) == {"fa"} and len(roles) not in steps:
                steps[len(roles)] = row["device_ms"] * 1e6 / (data["iters"] * data["waves"])
    fit = json.loads((results / "phase_blocks_h200.json").read_text())["token_phase_fit"]
    return steps, fit["per_token_block_sm_ns"]


def warpgroup_tile_model(
    ids: np.ndarray, tile_tokens: int, num_blocks: int, step_ns: dict[int, float], token_block_ns: float
) -> dict:
    """Modelled forward cost of tiles of ``tile_tokens`` tokens, one compute warpgroup per 4 of them.

    Args:
      ids: ``[..., T, K]`` canonical block ids (ids ``>= num_blocks`` are empty slots); ``T`` a multiple
        of ``tile_tokens``.
      step_ns: per-SM ns of a 128-key step run by 1, 2, ... warpgroups.
      token_block_ns: SM-ns per private block in the token phase.
    """
    groups = tile_tokens // WARPGROUP_TOKENS
    member = block_membership(ids, num_blocks).reshape(-1, tile_tokens, num_blocks)  # [tiles, tokens, blocks]
    counts = member.sum(axis=1)
    private = int(np.sum(member & (counts == 1)[:, None, :]))
    group_chose = member.reshape(-1, groups, WARPGROUP_TOKENS, num_blocks).any(axis=2)
    subsets = np.einsum("tgb,g->tb", group_chose.astype(np.int64), 1 << np.arange(groups))
    list_blocks = steps_ns = warpgroup_steps = 0.0
    for tile_subsets, shared in zip(subsets, counts >= 2, strict=True):
        entries = np.sort(tile_subsets[shared])  # grouped by the warpgroups that compute them
        if len(entries) % 2:
            entries = np.append(entries, 0)
        active = np.bitwise_count(entries[0::2] | entries[1::2])
        list_blocks += int(shared.sum())
        warpgroup_steps += int(active.sum())
        steps_ns += sum(step_ns[int(n)] for n in active)
    tokens = member.shape[0] * tile_tokens
    tile_ns, token_ns = steps_ns / tokens, private * token_block_ns / tokens
    return {
        "list_blocks": list_blocks / member.shape[0],
        "private_blocks_per_token": private / tokens,
        "warpgroup_steps_per_token": warpgroup_steps / tokens,
        "tile_sm_ns_per_token": tile_ns,
        "token_phase_sm_ns_per_token": token_ns,
        "sm_ns_per_token": tile_ns + token_ns,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument(
        "--queries", type=int, default=2048, help="the last tokens of the sequence to select for"
    )
    parser.add_argument("--inputs", choices=["smooth", "random"], default="smooth")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    t, s = args.seq_len, args.queries
    if s % TILE_TOKENS or not 24 <= s <= t:
        parser.error(f"--queries must be a multiple of {TILE_TOKENS} in [24, --seq-len]")
    if args.inputs == "smooth":
        kq, kk = jax.random.split(jax.random.PRNGKey(0))
        q = smooth_process(kq, t, 32, 128, DEFAULT_CORR, DEFAULT_NOISE)[:, t - s :]
        k = smooth_process(kk, t, 2, 128, DEFAULT_CORR, DEFAULT_NOISE)
        inputs = f"bench_attention.smooth_process(corr={DEFAULT_CORR}, noise={DEFAULT_NOISE}), seed 0"
    else:
        q, k, _ = _inputs(t, MINICPM4_SHAPE, jnp.bfloat16, "random")
        q = q[:, t - s :]
        inputs = f"bench_selection random inputs ({describe_inputs('random')}), seed 0"
    idx = select_blocks_reference(q, k, SparseConfig(dense_len=-1), query_chunk=256, q_offset=t - s)
    ids, cnt = canonical_blocks(idx, padded_len=s, block_size=BLOCK, q_offset=t - s)
    result = {
        "command": "python3 experiments/tile_list_stats.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": "CPU (no kernels run)",
        "jax_version": jax.__version__,
        "inputs": f"{inputs}, queries [{t - s}, {t}) of T = {t}, select_blocks_reference, shipped config",
        "blocks_per_token": float(np.mean(cnt)),
    }
    for share in (2, 1):
        lists = tile_lists(
            ids, BlockSizes(tile_tokens=TILE_TOKENS, min_share=share), BLOCK, t - s, num_key_blocks=t // BLOCK
        )
        stats = list_stats(np.asarray(lists.tile_bits), np.asarray(lists.tile_cnt)[..., 0])
        if lists.token_cnt is not None:
            token_ids, token_cnt = np.asarray(lists.token_ids), np.asarray(lists.token_cnt)[..., 0]
            stats["private_blocks_per_token"] = float(np.mean(token_cnt))
            for tiles in (2, 4):
                stats[f"private_shared_over_{tiles}_tiles"] = private_blocks_shared(
                    token_ids, token_cnt, tiles, t // BLOCK
                )
        result[f"min_share_{share}"] = stats
    # Both tilings over the same tokens: the last multiple of 24 (8-token tiles stay the kernel's).
    modelled = np.asarray(ids)[..., s % 24 :, :]
    step_ns, token_block_ns = measured_step_costs()
    result["warpgroup_tile_model"] = {
        "queries": modelled.shape[-2],
        "step_ns_by_warpgroups": {str(n): ns for n, ns in sorted(step_ns.items())},
        "token_phase_ns_per_block": token_block_ns,
    } | {
        f"{tokens}_token_tiles": warpgroup_tile_model(modelled, tokens, t // BLOCK, step_ns, token_block_ns)
        for tokens in (TILE_TOKENS, 3 * WARPGROUP_TOKENS)
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.inputs == "smooth" else f"_{args.inputs}"
    path = args.out / f"tile_list_stats_{t // 1024}k{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
