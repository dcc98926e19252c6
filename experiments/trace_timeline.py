"""The GPU and host timeline of profiler traces kept by ``bench_selection.py --trace-dir``.

For each ``.xplane.pb`` (or ``.xplane.pb.gz``) trace of ``--calls`` synchronised calls, prints and
optionally writes ``bench_attention.gpu_timeline``: per call the GPU's span, busy and idle time and
widest gaps, and the host's share of the wall time (``dispatch_us``: jitted call to first kernel;
``sync_us``: last kernel to the return of ``block_until_ready``).

Usage::

    PYTHONPATH=. python3 experiments/trace_timeline.py experiments/results/traces/*.xplane.pb.gz \\
        --out experiments/results/trace_timeline_h200.json
"""

import argparse
import datetime
import gzip
import json
import sys
import tempfile
from pathlib import Path

import jax

# A sibling script, importable because running experiments/<script>.py puts experiments/ on sys.path.
from bench_attention import gpu_timeline


def load_trace(path: Path):
    """``jax.profiler.ProfileData`` of a trace file, gzipped or not."""
    if path.suffix != ".gz":
        return jax.profiler.ProfileData.from_file(str(path))
    with tempfile.NamedTemporaryFile(suffix=".xplane.pb") as tmp:
        tmp.write(gzip.decompress(path.read_bytes()))
        tmp.flush()
        return jax.profiler.ProfileData.from_file(tmp.name)


def traced_device(data) -> str:
    """The GPU the trace was recorded on (its device plane's ``gpu_device_name``), or "unknown"."""
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            return dict(plane.stats).get("gpu_device_name", "unknown")
    return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", type=Path, nargs="+", help=".xplane.pb or .xplane.pb.gz files")
    parser.add_argument("--calls", type=int, default=2, help="synchronised calls in each trace")
    parser.add_argument("--out", type=Path, help="also write the timelines to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for path in args.traces:
        data = load_trace(path)
        timeline = gpu_timeline(data, args.calls)
        rows.append({"trace": path.name, "device": traced_device(data), **timeline})
        print(f"{path.name}: {timeline}")
    if args.out is not None:
        given = sys.argv[1:] if argv is None else argv
        result = {
            "command": " ".join(["python3 experiments/trace_timeline.py", *given]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            # The GPUs the traces were recorded on (this run only reads them), and the jax that read them.
            "device": ", ".join(sorted({row["device"] for row in rows})),
            "jax_version": jax.__version__,
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
