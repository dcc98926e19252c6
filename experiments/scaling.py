"""Training throughput from 1 to N devices: data parallel and context parallel (issue: scale out).

For each mesh ``DATAxSEQ`` it builds the preset model, shards parameters (replicated, or FSDP with
``--fsdp``), the batch over ``"data"`` and the sequence over ``"seq"``, and times jitted train steps
(compilation and two warm-up steps excluded, ``block_until_ready`` after the timed loop). Each data
shard holds ``--batch-per-replica`` sequences of ``--seq-len`` tokens, so data parallelism is weak
scaling (more tokens per step) and context parallelism is strong scaling (the same sequence split
over more devices). Tokens are random: throughput does not depend on them.

    python experiments/scaling.py --preset small --seq-len 16384 --meshes 1x1 2x1 1x2 --out DIR

Writes ``scaling_<preset>.json`` (rows: mesh, devices, tokens/step, median step ms, tokens/s, tokens/s
per device, efficiency vs the 1x1 row) with the command, date, device and jax version, and
``scaling_<preset>.png``. ``--plot A.json B.json ...`` redraws one figure from several results files
(e.g. two sequence lengths) without running anything:

    python experiments/scaling.py --plot results/scaling_small.json results/scaling_small_64k.json \
        --out experiments/results
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from infllm_jax.model import Transformer, get_config, param_count
from infllm_jax.parallel import make_mesh, train_shardings
from infllm_jax.train import TrainConfig, make_optimizer, make_train_step, split_model


def _parse_mesh(text: str) -> tuple[int, int]:
    data, seq = (int(x) for x in text.lower().split("x"))
    return data, seq


def time_mesh(
    preset: str, data: int, seq: int, *, seq_len: int, batch_per_replica: int, steps: int, fsdp: bool
) -> dict:
    """Times ``steps`` train steps on a ``data x seq`` mesh of the first ``data * seq`` devices."""
    devices = jax.devices()[: data * seq]
    if len(devices) < data * seq:
        raise ValueError(f"mesh {data}x{seq} needs {data * seq} devices, have {len(jax.devices())}")
    mesh = make_mesh(seq=seq, devices=devices)
    config = get_config(preset)
    model = Transformer(config, rngs=nnx.Rngs(0))
    graphdef, params = split_model(model)
    tx = make_optimizer(TrainConfig(total_steps=1000, warmup_steps=10))
    opt_state = tx.init(params)
    shardings = train_shardings(mesh, params, opt_state, fsdp=fsdp)
    params, opt_state = jax.device_put((params, opt_state), (shardings.params, shardings.opt_state))
    train_step = make_train_step(graphdef, tx, shardings=shardings)
    b = data * batch_per_replica
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, seq_len + 1), 0, config.vocab_size)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": jnp.ones((b, seq_len), jnp.float32),
    }
    batch = jax.device_put(batch, shardings.batch)
    for _ in range(2):  # compile + warm-up
        params, opt_state, metrics = train_step(params, opt_state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, opt_state, metrics = train_step(params, opt_state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_step = b * seq_len
    return {
        "mesh": f"{data}x{seq}",
        "devices": data * seq,
        "data": data,
        "seq": seq,
        "fsdp": fsdp,
        "batch": b,
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "median_step_ms": step_s * 1e3,
        "tokens_per_s": tokens_per_step / step_s,
        "tokens_per_s_per_device": tokens_per_step / step_s / (data * seq),
        "loss": float(metrics["loss"]),
        "params": param_count(model),
    }


def _label(row: dict) -> str:
    return row["mesh"] + (" fsdp" if row["fsdp"] else "")


def plot(results: list[dict], path: Path) -> None:
    """Speedup over one device per mesh (bars, one colour per sequence length) against the ideal N.

    Rows of all files are grouped by sequence length; each group's baseline is its 1-device row, which
    may come from another file (an ``--fsdp`` run, say, that timed no 1x1 mesh).

    Args:
      results: results dicts as written by ``main``.
      path: where the PNG goes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for res in results for r in res["rows"]]
    meshes = list(dict.fromkeys(_label(r) for r in rows))
    lengths = sorted({r["seq_len"] for r in rows})
    width = 0.8 / len(lengths)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(meshes), 4.2))
    for i, seq_len in enumerate(lengths):
        group = {_label(r): r for r in rows if r["seq_len"] == seq_len}
        base = next((r for r in group.values() if r["devices"] == 1), None)
        if base is None:
            continue
        shown = [(j, group[m]) for j, m in enumerate(meshes) if m in group]
        speedups = [r["tokens_per_s"] / base["tokens_per_s"] for _, r in shown]
        xs = [j + (i - (len(lengths) - 1) / 2) * width for j, _ in shown]
        bars = ax.bar(xs, speedups, width, label=f"T = {seq_len:,}")
        efficiency = [sp / r["devices"] for sp, (_, r) in zip(speedups, shown, strict=True)]
        ax.bar_label(bars, [f"{e:.0%}" for e in efficiency], fontsize=8)
    for j, m in enumerate(meshes):
        ax.hlines(mesh_devices(m), j - 0.45, j + 0.45, colors="k", linestyles=":", lw=1)
    ax.set_xticks(range(len(meshes)), [f"{m}\n(data x seq)" for m in meshes])
    ax.set_ylabel("training tokens/s vs 1 device")
    first = results[0]
    ax.set_title(
        f"{first['preset']} preset, {first['device']} x{first['device_count']} "
        "(labels: efficiency; dotted: ideal)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mesh_devices(mesh_label: str) -> int:
    """Devices of a ``DATAxSEQ[ fsdp]`` mesh label."""
    data, seq = _parse_mesh(mesh_label.split()[0])
    return data * seq


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--batch-per-replica", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--meshes", nargs="+", default=["1x1", "2x1", "1x2"], help="DATAxSEQ meshes")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state over data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--plot", type=Path, nargs="+", metavar="JSON", help="only redraw a figure from these results files"
    )
    args = parser.parse_args(argv)
    if args.plot:
        results = [json.loads(p.read_text()) for p in args.plot]
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"scaling_{results[0]['preset']}.png"
        plot(results, path)
        print(f"wrote {path}")
        return
    rows = []
    for text in args.meshes:
        data, seq = _parse_mesh(text)
        row = time_mesh(
            args.preset,
            data,
            seq,
            seq_len=args.seq_len,
            batch_per_replica=args.batch_per_replica,
            steps=args.steps,
            fsdp=args.fsdp,
        )
        rows.append(row)
        print(
            f"mesh {row['mesh']:>5}  devices {row['devices']}  batch {row['batch']}  T {row['seq_len']}  "
            f"step {row['median_step_ms']:8.1f} ms  {row['tokens_per_s']:10.0f} tok/s  "
            f"{row['tokens_per_s_per_device']:10.0f} tok/s/device",
            flush=True,
        )
    base = next((r for r in rows if r["devices"] == 1), None)
    for row in rows:
        if base is not None:
            row["speedup_vs_1x1"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["efficiency_vs_1x1"] = row["speedup_vs_1x1"] / row["devices"]
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind,
        "device_count": len(jax.devices()),
        "jax_version": jax.__version__,
        "preset": args.preset,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scaling_{args.preset}.json"
    path.write_text(json.dumps(result, indent=1))
    plot([result], path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    for row in rows:
        if "speedup_vs_1x1" in row:
            print(
                f"{row['mesh']:>5}: {row['speedup_vs_1x1']:.2f}x of 1 device "
                f"({row['efficiency_vs_1x1']:.0%} efficiency)"
            )


if __name__ == "__main__":
    main()
