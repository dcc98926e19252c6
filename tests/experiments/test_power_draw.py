"""experiments/power_draw.py: the energy bookkeeping, the rotation, the summary and a CPU smoke run."""

import json

import jax.numpy as jnp
import pytest


@pytest.fixture
def power_draw(experiment):
    return experiment("power_draw")


class FakeSampler:
    """A ``ClockSampler`` stand-in: fixed clock and power, and the windows it was asked about."""

    def __init__(self, mhz=1500.0, watts=600.0):
        self.mean, self.windows = (mhz, watts), []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def mean_over(self, start, end):
        self.windows.append((start, end))
        return self.mean


def test_energy_per_call_is_mean_power_times_window_over_calls(power_draw):
    sampler = FakeSampler()
    row = power_draw.measure(lambda x: x + 1, (jnp.zeros(4),), seconds=0.05, sampler=sampler)
    [(start, end)] = sampler.windows
    assert end - start >= 0.05
    assert row["calls"] >= 1 and row["median_ms"] >= 0
    assert (row["sm_mhz"], row["watts"]) == (1500.0, 600.0)
    assert row["joules_per_call"] == pytest.approx(600.0 * (end - start) / row["calls"])


def test_without_a_sampler_there_is_one_call_at_least_and_no_energy(power_draw):
    calls = []
    row = power_draw.measure(lambda: calls.append(1), (), seconds=0.0, sampler=None, warmups=1)
    assert row["calls"] == 1 and len(calls) == 2  # one warm-up, one timed call
    assert row["sm_mhz"] is row["watts"] is row["joules_per_call"] is None


def test_summary_takes_medians_over_rounds_and_skips_missing_samples(power_draw):
    rounds = [
        {"calls": 3, "median_ms": 10.0, "sm_mhz": 1500.0, "watts": 600.0, "joules_per_call": 6.0},
        {"calls": 5, "median_ms": 30.0, "sm_mhz": None, "watts": None, "joules_per_call": None},
        {"calls": 4, "median_ms": 20.0, "sm_mhz": 1700.0, "watts": 650.0, "joules_per_call": 7.0},
    ]
    out = power_draw.summarise({"a": rounds})["a"]
    assert out["median_ms"] == 20.0
    assert (out["sm_mhz"], out["watts"], out["joules_per_call"]) == (1600.0, 625.0, 6.5)
    assert out["calls"] == 12 and out["rounds"] == rounds


def test_rounds_rotate_the_workloads(power_draw, monkeypatch):
    order = []

    def fake_workloads(q, k, v, cfg):
        return {name: (lambda name=name: order.append(name), ()) for name in "abc"}

    monkeypatch.setattr(power_draw, "workloads", fake_workloads)
    monkeypatch.setattr(
        power_draw,
        "measure",
        lambda fn, args, **kw: (
            fn() or {"calls": 1, "median_ms": 1.0, "sm_mhz": None, "watts": None, "joules_per_call": None}
        ),
    )
    shape, cfg = power_draw.experiment_shapes(smoke=True)
    rows = power_draw.run(
        seq_len=64,
        kinds=("smooth",),
        rounds=3,
        seconds=0.0,
        shape=shape,
        cfg=cfg,
        sampler=FakeSampler(),
    )
    assert order == [*"abc", *"bca", *"cab"]
    assert list(rows[0]["workloads"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="at least one"):
        power_draw.run(
            seq_len=64, kinds=("smooth",), rounds=0, seconds=0.0, shape=None, cfg=None, sampler=None
        )


def test_smoke_run_writes_provenance_and_plot(power_draw, tmp_path):
    power_draw.main(["--smoke", "--rounds", "1", "--seconds", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "power_draw_smoke.json").read_text())
    assert {"command", "date", "device", "jax_version", "method", "inputs"} <= set(report)
    [row] = report["rows"]
    assert list(row["workloads"]) == list(power_draw.WORKLOADS)
    assert all(w["calls"] >= 1 and w["joules_per_call"] is None for w in row["workloads"].values())
    assert (tmp_path / "power_draw_smoke.png").stat().st_size > 0
