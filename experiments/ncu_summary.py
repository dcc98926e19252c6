"""Summarises the per-instruction SASS table that ``experiments/ncu_kernels.sh`` writes.

For each kernel in ``ncu_NAME_sass.csv.gz`` (``ncu --page source --csv --print-source sass``; one
table per profiled launch, launches of the same kernel added up): its code size, the share of each
warp stall reason in the sampled warp states, the opcodes that hold the most samples, and the
hottest instructions. Stall reasons, briefly (Nsight Compute's profiling guide has the rest):
``no_instruction`` is an instruction-cache miss, ``long_scoreboard`` a wait for memory (global,
local, or an mbarrier poll), ``barrier`` a wait for WGMMAs (``WARPGROUP.DEPBAR``) or a CTA barrier,
``wait`` a fixed-latency dependency, ``selected`` an issued instruction.

  python3 experiments/ncu_summary.py experiments/results/ncu_prefill_sass.csv.gz [--top 12]
"""

import argparse
import collections
import csv
import gzip
import re
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
SASS_BYTES = 16  # every Hopper SASS instruction is 128 bits


class Kernel:
    """Per-instruction sums over the launches of one kernel."""

    def __init__(self, header: list[str]):
        self.header = {name: i for i, name in enumerate(header)}
        self.stalls = [c for c in header if c.startswith("stall_") and "Not Issued" not in c]
        self.launches = 0
        self.source: list[str] = []
        self.samples: list[int] = []
        self.executed: list[int] = []
        self.reasons: list[collections.Counter] = []

    def add_launch(self, rows: list[list[str]]) -> None:
        if self.launches and len(rows) != len(self.source):
            raise ValueError(f"launches of one kernel with {len(rows)} and {len(self.source)} instructions")
        for i, row in enumerate(rows):
            samples, executed = _int(row[self.header[SAMPLES]]), _int(row[self.header[EXECUTED]])
            reasons = collections.Counter(
                {c[len("stall_") :]: _int(row[self.header[c]]) for c in self.stalls}
            )
            if self.launches == 0:
                self.source.append(row[self.header["Source"]].strip())
                self.samples.append(samples)
                self.executed.append(executed)
                self.reasons.append(reasons)
            else:
                self.samples[i] += samples
                self.executed[i] += executed
                self.reasons[i] += reasons
        self.launches += 1


def _int(text: str) -> int:
    return int(text) if text.strip() not in ("", "-") else 0


def _opcode(source: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", source).split(" ")[0]


def read_tables(path: Path) -> dict[str, Kernel]:
    """Kernel name -> its launches' tables, added up, from an (optionally gzipped) ncu source CSV; a second
    compilation of a name (another instruction count) is ``NAME #2``."""
    opener = gzip.open if path.suffix == ".gz" else open
    kernels: dict[str, Kernel] = {}
    with opener(path, "rt", newline="") as f:
        reader = csv.reader(f)
        name, header, rows = None, None, []

        def flush():
            if name is not None and rows:
                # Launches of one name can be different compilations (other static shapes).
                key = name if name not in kernels or len(kernels[name].source) == len(rows) else f"{name} #2"
                kernels.setdefault(key, Kernel(header)).add_launch(rows)

        for row in reader:
            if row and row[0] == "Kernel Name":
                flush()
                name, header, rows = row[1], next(reader), []
            elif header is not None and len(row) >= len(header) - 1:
                rows.append(row)
        flush()
    return kernels


def summary(kernels: dict[str, Kernel], top: int) -> str:
    lines = []
    for name, k in kernels.items():
        total = sum(k.samples)
        reasons = sum(k.reasons, collections.Counter())
        opcodes = collections.Counter()
        for source, samples in zip(k.source, k.samples, strict=True):
            opcodes[_opcode(source)] += samples
        lines += [
            f"{name}: {k.launches} launch(es), {len(k.source)} SASS instructions "
            f"({len(k.source) * SASS_BYTES / 1024:.0f} KiB of code), {total} warp samples",
            "  stall reasons (% of samples): "
            + ", ".join(f"{r} {100 * n / total:.1f}" for r, n in reasons.most_common(8)),
            "  opcodes (% of samples): "
            + ", ".join(f"{op} {100 * n / total:.1f}" for op, n in opcodes.most_common(8)),
            "  hottest instructions (index, % of samples, executions, top reasons):",
        ]
        hottest = sorted(range(len(k.source)), key=lambda i: -k.samples[i])[:top]
        for i in hottest:
            top_reasons = ", ".join(f"{r} {n}" for r, n in k.reasons[i].most_common(2) if n)
            lines.append(
                f"    {i:6d} {100 * k.samples[i] / total:5.1f}% {k.executed[i]:10d}  "
                f"{k.source[i][:56]:56s} {top_reasons}"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sass_csv", type=Path, help="ncu_NAME_sass.csv(.gz) from experiments/ncu_kernels.sh")
    parser.add_argument("--top", type=int, default=12, help="hottest instructions listed per kernel")
    args = parser.parse_args(argv)
    print(summary(read_tables(args.sass_csv), args.top))


if __name__ == "__main__":
    main()
