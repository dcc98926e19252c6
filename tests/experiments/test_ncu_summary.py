"""experiments/ncu_summary.py on a small table in the layout of ``ncu --page source --csv``."""

import csv
import gzip

import pytest

from experiments import ncu_summary

HEADER = [
    "Address",
    "Source",
    "Warp Stall Sampling (All Samples)",
    "Instructions Executed",
    "stall_barrier",
    "stall_no_inst",
    "stall_barrier (Not Issued)",
]


def _write(path, tables):
    """``tables``: (kernel name, rows of (source, samples, executed, barrier, no_inst))."""
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.writer(f)
        for name, rows in tables:
            writer.writerow(["Kernel Name", name, ""])
            writer.writerow(HEADER)
            for i, (source, samples, executed, barrier, no_inst) in enumerate(rows):
                writer.writerow([hex(i * 16), source, samples, executed, barrier, no_inst, 0])


def test_launches_of_a_kernel_add_up_and_other_compilations_stay_apart(tmp_path):
    path = tmp_path / "ncu_x_sass.csv.gz"
    scores = [("  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4]", 3, 10, 1, 2), ("@!P1  BRA 0x10", 1, 5, 1, 0)]
    _write(
        path,
        [
            ("scores_kernel", scores),
            ("scores_kernel", scores),
            ("scores_kernel", scores[:1]),  # another compilation: one instruction
        ],
    )
    kernels = ncu_summary.read_tables(path)
    assert list(kernels) == ["scores_kernel", "scores_kernel #2"]
    first = kernels["scores_kernel"]
    assert first.launches == 2
    assert first.samples == [6, 2] and first.executed == [20, 10]
    assert first.reasons[0] == {"barrier": 2, "no_inst": 4}
    text = ncu_summary.summary(kernels, top=1)
    assert "scores_kernel: 2 launch(es), 2 SASS instructions (0 KiB of code), 8 warp samples" in text
    # Shares of all samples: barrier 4 of 8, no_inst 4 of 8; the predicate does not name the opcode.
    assert "stall reasons (% of samples): barrier 50.0, no_inst 50.0" in text
    assert "HGMMA.64x128x16.F32.BF16 75.0, BRA 25.0" in text


def test_a_launch_whose_instruction_count_changes_under_one_key_is_an_error():
    kernel = ncu_summary.Kernel(HEADER)
    kernel.add_launch([["0x0", "NOP", "1", "1", "0", "0", "0"]])
    with pytest.raises(ValueError, match="launches of one kernel with 2 and 1 instructions"):
        kernel.add_launch([["0x0", "NOP", "1", "1", "0", "0", "0"]] * 2)
