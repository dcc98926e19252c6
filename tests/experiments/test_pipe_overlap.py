"""experiments/pipe_overlap.py: every role's loop computes what it claims (interpret mode), the overlap
arithmetic, bad roles, and the refusal without a GPU."""

import argparse
import json

import jax
import numpy as np
import pytest


@pytest.fixture
def overlap(experiment):
    return experiment("pipe_overlap")


@pytest.mark.parametrize(
    "roles",
    [
        ("mma", "exp"),
        ("step", "idle"),
        ("idle", "exp16"),
        ("pstep", "step", "mma"),
        ("fa", "idle"),
        ("coarse", "fine"),
        ("tok", "tokfix"),
        ("fa", "mma", "exp", "mem"),
    ],
    ids=lambda r: "+".join(r),
)
def test_each_role_computes_its_loop(overlap, roles):
    a, b = overlap.operands(seed=3)
    iters = 3
    out = np.asarray(overlap.overlap_kernel(roles, iters, n_ctas=2, interpret=True)(a, b))
    assert out.shape == (2, len(roles), overlap.ROWS, overlap.COLS)
    # float32 accumulation of bf16 products, float16 exponentials: 1e-3 separates right from wrong
    # (a missing iteration is off by a third).
    assert overlap.check(roles, out, a, b, iters) < 1e-3
    assert overlap.check(roles, out, a, b, iters + 1) > 1e-2


def test_mem_warpgroups_give_their_registers_to_the_others(overlap):
    assert overlap.compute_registers(("fa", "fa")) is None  # nobody changes budgets
    # 3 compute warpgroups and a memory one: (512 - 24) / 3 = 162.7 -> 160 per thread.
    assert overlap.compute_registers(("fa", "fa", "fa", "mem")) == 160
    assert overlap.compute_registers(("fa", "fa", "mem")) == 240
    assert overlap.compute_registers(("fa", "mem")) == 256  # setmaxnreg's maximum
    assert overlap.compute_registers(("mem", "mem")) is None


def test_overlap_is_one_when_the_slower_role_hides_the_other_and_zero_when_they_add(overlap):
    rows = [
        {"roles": ["mma", "idle"], "device_ms": 2.0},
        {"roles": ["idle", "exp"], "device_ms": 1.0},
        {"roles": ["mma", "exp"], "device_ms": 2.0},
        {"roles": ["mma", "exp16"], "device_ms": 2.5},
        {"roles": ["idle", "exp16"], "device_ms": 0.5},
    ]
    by_pair = {s["pair"]: s["overlap"] for s in overlap.overlaps(rows)}
    assert by_pair == {"mma+exp": 1.0, "mma+exp16": 0.0}  # step rows missing: no step overlap row


def test_unknown_role_and_empty_loops_are_refused(overlap):
    with pytest.raises(ValueError, match="unknown role 'fma'"):
        overlap.overlap_kernel(("mma", "fma"), 4, 2)
    with pytest.raises(ValueError, match="iters and n_ctas must be >= 1"):
        overlap.overlap_kernel(("mma", "exp"), 0, 2)
    with pytest.raises(ValueError, match="1 to 4 warpgroups"):
        overlap.overlap_kernel(("mma",) * 5, 4, 2)


def test_combos_parse_from_the_command_line(overlap):
    assert overlap.parse_combo("step+step+idle") == ("step", "step", "idle")
    with pytest.raises(argparse.ArgumentTypeError, match="'mma\\+fma'"):
        overlap.parse_combo("mma+fma")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal on a machine without a GPU")
def test_main_refuses_to_run_without_a_gpu(overlap, tmp_path):
    with pytest.raises(SystemExit, match="needs one"):
        overlap.main(["--out", str(tmp_path)])


def test_replot_draws_a_results_file_without_a_gpu(overlap, tmp_path):
    results = tmp_path / "pipe_overlap_test.json"
    rows = [
        {"roles": ["mma", "idle"], "device_ms": 2.0},
        {"roles": ["step", "step", "step"], "device_ms": 3.5},
    ]
    results.write_text(json.dumps({"rows": rows}))
    overlap.main(["--out", str(tmp_path), "--replot", str(results)])
    assert (tmp_path / "pipe_overlap_test.png").stat().st_size > 0
