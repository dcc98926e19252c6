"""experiments/interleaved_prefill.py: the rotation of the timed calls, the summary, and a CPU smoke run."""

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture
def interleaved(monkeypatch):
    # The script imports its siblings, as when run as experiments/interleaved_prefill.py.
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    import interleaved_prefill

    return interleaved_prefill


def test_each_round_calls_every_function_once_in_rotated_order(interleaved):
    calls = []

    def recorder(name):
        def fn(x):
            calls.append(name)
            return x

        return fn

    fns = {name: recorder(name) for name in "abc"}
    times = interleaved.time_interleaved(fns, (jnp.zeros(2),), rounds=4, warmups=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-ups, untimed
    assert calls[3:] == [*"abc", *"bca", *"cab", *"abc"]
    assert {name: len(ms) for name, ms in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ms in times.values() for t in ms)


def test_time_interleaved_refuses_no_rounds(interleaved):
    with pytest.raises(ValueError, match="at least one round"):
        interleaved.time_interleaved({"a": lambda: None}, (), rounds=0)


def test_summary_ratios_pair_each_round_with_its_dense_call(interleaved):
    times = {"dense": [10.0, 20.0, 12.0], "sparse": [2.0, 5.0, 3.0]}
    out = interleaved.summarise(times, "dense")
    assert out["implementations"]["dense"] == {"median_ms": 12.0, "min_ms": 10.0, "max_ms": 20.0}
    assert out["speedup_of_medians"] == {"sparse": pytest.approx(12.0 / 3.0)}
    # Per round: 10 / 2, 20 / 5, 12 / 3.
    assert out["round_speedups"]["sparse"] == pytest.approx({"median": 4.0, "min": 4.0, "max": 5.0})
    assert "dense" not in out["round_speedups"]


def test_smoke_run_writes_rows_with_provenance_and_a_plot(interleaved, tmp_path):
    interleaved.main(["--smoke", "--rounds", "2", "--variants", "xla_lists", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "interleaved_prefill_smoke.json").read_text())
    assert {"command", "date", "device", "jax_version", "timing", "rows"} <= result.keys()
    (row,) = result["rows"]
    assert (row["seq_len"], row["inputs"], row["rounds"]) == (256, "smooth", 2)
    assert list(row["round_ms"]) == ["xla_dense", "pallas", "pallas_xla_lists"]
    assert all(len(ms) == 2 for ms in row["round_ms"].values())
    assert set(row["speedup_of_medians"]) == {"pallas", "pallas_xla_lists"}
    assert (tmp_path / "interleaved_prefill_smoke.png").stat().st_size > 0
