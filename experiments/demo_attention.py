"""InfLLM-V2 attention on random inputs: selection statistics and exactness against dense attention.

Runs the pure-JAX reference (or ``--implementation pallas`` on a GPU) with the shipped sparse config
at a few sequence lengths and prints, per length: how many blocks each token selects, the fraction
of causal keys it attends to, how much of the selection is forced (init + local), and the maximum
error against dense causal attention of a run in which every past block is selected.

    python experiments/demo_attention.py [--lengths 2048 8192 16384] [--heads 8 2] [--head-dim 64]
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from infllm_jax import SparseConfig, ops


def _inputs(seed: int, t: int, hq: int, hkv: int, d: int):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    # Slowly varying queries/keys (a random walk plus noise): neighbouring tokens look alike, as in
    # real text, so the top-k choices are not pure noise.
    walk = (
        jnp.cumsum(jax.random.normal(kq, (1, t, 1, d)), axis=1)
        / jnp.sqrt(jnp.arange(1, t + 1))[None, :, None, None]
    )
    q = walk + jax.random.normal(kk, (1, t, hq, d))
    k = walk + jax.random.normal(kv, (1, t, hkv, d))
    v = jax.random.normal(jax.random.fold_in(kv, 1), (1, t, hkv, d))
    return q, k, v


def _selection_stats(idx: np.ndarray, t: int, cfg: SparseConfig) -> dict:
    pos = np.arange(t)
    q_block = pos // cfg.block_size
    n_sel = (idx >= 0).sum(-1)  # [B, Hkv, T]
    # The current block is always selected and only partly visible; every other selected block is whole.
    seen = (n_sel - 1) * cfg.block_size + (pos - q_block * cfg.block_size + 1)
    local_lo = np.maximum(0, q_block - cfg.local_blocks)
    n_init = np.minimum(cfg.init_blocks, q_block + 1)
    forced = (q_block - local_lo + 1) + n_init - np.maximum(0, n_init - local_lo)
    return {
        "blocks/token": float(n_sel.mean()),
        "dynamic blocks": float((n_sel - forced).mean()),
        "keys seen": float((seen / (pos + 1)).mean()),
        "keys seen (last token)": float(seen[..., -1].mean() / t),
        "sparse tokens": float((q_block >= cfg.num_selected).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument(
        "--exact-max-len",
        type=int,
        default=4096,
        help="longest T for the all-blocks check (dense XLA attention is O(T^2) in memory)",
    )
    parser.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--implementation", default=None, help="xla (default on CPU) or pallas (GPU)")
    args = parser.parse_args()
    hq, hkv = args.heads
    cfg = SparseConfig(dense_len=-1)  # the shipped config, forced sparse at every length
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {cfg}")
    print(f"shapes: B=1, Hq={hq}, Hkv={hkv}, D={args.head_dim}\n")
    header = (
        f"{'T':>7} {'blocks/token':>12} {'dyn blocks':>10} {'keys seen':>9} {'last tok':>8} "
        f"{'sparse tok':>10} {'max|err| all-blocks':>19} {'time s':>7}"
    )
    print(header)
    print("-" * len(header))
    for t in args.lengths:
        q, k, v = _inputs(t, t, hq, hkv, args.head_dim)
        start = time.perf_counter()
        idx = ops.select_blocks(q, k, cfg, implementation=args.implementation)
        out = ops.sparse_attention(
            q, k, v, idx, block_size=cfg.block_size, implementation=args.implementation
        )
        out.block_until_ready()
        elapsed = time.perf_counter() - start
        stats = _selection_stats(np.asarray(idx), t, cfg)
        err = float("nan")
        if t <= args.exact_max_len:
            # Enough slots for every past block: InfLLM-V2 must then reproduce dense attention exactly.
            full = dataclasses.replace(cfg, topk=max(cfg.topk, ops.num_blocks(t, cfg.block_size)))
            exact = ops.infllmv2_attention(q, k, v, full, implementation=args.implementation)
            dense = ops.dense_attention(q, k, v, implementation="xla")
            err = float(jnp.max(jnp.abs(exact.astype(jnp.float32) - dense.astype(jnp.float32))))
        print(
            f"{t:>7} {stats['blocks/token']:>12.1f} {stats['dynamic blocks']:>10.1f} "
            f"{stats['keys seen']:>9.1%} {stats['keys seen (last token)']:>8.1%} "
            f"{stats['sparse tokens']:>10.1%} {err:>19.2e} {elapsed:>7.1f}"
        )
    print(
        "\nkeys seen: mean over tokens of (selected keys / causal keys); "
        "last tok: the same for the final token;"
    )
    print(f"sparse tok: tokens past {cfg.num_selected} blocks, which no longer see every past block;")
    print("max|err| all-blocks: InfLLM-V2 with a slot for every block vs dense attention (nan: not run).")


if __name__ == "__main__":
    main()
