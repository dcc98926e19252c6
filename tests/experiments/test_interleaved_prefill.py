"""experiments/interleaved_prefill.py: the rotation of the timed calls, the summary, and a CPU smoke run."""

import json

import jax.numpy as jnp
import pytest


@pytest.fixture
def interleaved(experiment):
    return experiment("interleaved_prefill")


def _recorders(names, calls):
    """Functions that append their name to ``calls`` and return their argument."""

    def recorder(name):
        def fn(x):
            calls.append(name)
            return x

        return fn

    return {name: recorder(name) for name in names}


def test_each_round_calls_every_function_in_rotated_order(interleaved):
    calls = []
    fns = _recorders("abc", calls)
    times, before = interleaved.time_interleaved(fns, (jnp.zeros(2),), rounds=4, warmups=1)
    assert calls[:3] == ["a", "b", "c"]  # the warm-ups, untimed
    assert calls[3:] == [*"abc", *"bca", *"cab", *"abc"]
    assert {name: len(ms) for name, ms in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ms in times.values() for t in ms)
    # The call before each (rounds a b c | b c a | c a b | a b c).
    assert before == {"a": [None, "c", "c", "b"], "b": ["a", "c", "a", "a"], "c": ["b", "b", "a", "b"]}


def test_blocks_repeat_each_call(interleaved):
    calls = []
    fns = _recorders("ab", calls)
    times, before = interleaved.time_interleaved(fns, (jnp.zeros(2),), rounds=2, block=3, warmups=0)
    assert calls == [*"aaabbb", *"bbbaaa"]
    assert before == {"a": [None, "a", "a", "b", "a", "a"], "b": ["a", "b", "b", "b", "b", "b"]}
    assert {name: len(ms) for name, ms in times.items()} == {"a": 6, "b": 6}


def test_time_interleaved_refuses_no_rounds(interleaved):
    with pytest.raises(ValueError, match="at least one round"):
        interleaved.time_interleaved({"a": lambda: None}, (), rounds=0)


def test_summary_pairs_each_round_with_its_dense_calls(interleaved):
    times = {"dense": [10.0, 30.0, 20.0, 12.0], "sparse": [2.0, 4.0, 5.0, 3.0]}
    before = {"dense": [None, "dense", "sparse", "dense"], "sparse": ["dense", "sparse", "dense", "sparse"]}
    out = interleaved.summarise(times, before, "dense", block=2)
    dense = out["implementations"]["dense"]
    assert (dense["median_ms"], dense["min_ms"], dense["max_ms"]) == (16.0, 10.0, 30.0)
    assert dense["after"] == {
        "None": {"calls": 1, "median_ms": 10.0},
        "dense": {"calls": 2, "median_ms": 21.0},
        "sparse": {"calls": 1, "median_ms": 20.0},
    }
    assert out["speedup_of_medians"] == {"sparse": pytest.approx(16.0 / 3.5)}
    # Rounds of two calls: medians 20 / 3 and 16 / 4.
    assert out["round_speedups"]["sparse"] == pytest.approx({"median": 16 / 3, "min": 4.0, "max": 20 / 3})
    assert "dense" not in out["round_speedups"]


def test_smoke_run_writes_rows_with_provenance_and_a_plot(interleaved, tmp_path):
    argv = [
        "--smoke",
        "--rounds",
        "2",
        "--block",
        "2",
        "--variants",
        "xla_lists",
        "--inputs",
        "smooth",
        "random",
    ]
    interleaved.main([*argv, "--out", str(tmp_path)])
    result = json.loads((tmp_path / "interleaved_prefill_smoke.json").read_text())
    assert {"command", "date", "device", "jax_version", "timing", "rows"} <= result.keys()
    # Both input kinds of a length run the executables compiled once for it.
    assert [row["inputs"] for row in result["rows"]] == ["smooth", "random"]
    for row in result["rows"]:
        assert (row["seq_len"], row["rounds"], row["block"]) == (256, 2, 2)
        assert row["pallas_attention_min_share"] == 2  # the CPU's Triton tiling keeps the token phase
        assert list(row["call_ms"]) == ["xla_dense", "pallas", "pallas_xla_lists"]
        assert all(len(ms) == 4 for ms in row["call_ms"].values())
        assert set(row["speedup_of_medians"]) == {"pallas", "pallas_xla_lists"}
    assert (tmp_path / "interleaved_prefill_smoke.png").stat().st_size > 0


class _FakeSampler:
    """``ClockSampler``'s interface without NVML: a call's clock is 1000 MHz plus its length in ms."""

    def __init__(self):
        self.samples, self.entered = [], 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc):
        return None

    def mean_over(self, start, end):
        return 1000.0 + (end - start) * 1e3, 500.0


def test_clocks_are_grouped_by_the_call_before(interleaved):
    clocks = {
        "a": [(1000.0, 300.0), (1200.0, 500.0), None],
        "b": [(900.0, 200.0), (1100.0, 400.0), (1300.0, 600.0)],
    }
    before = {"a": [None, "b", "b"], "b": ["a", "a", "b"]}
    got = interleaved.clocks_after(clocks, before)
    assert got["a"] == {
        "None": {"calls": 1, "sm_mhz": 1000.0, "watts": 300.0},
        "b": {"calls": 1, "sm_mhz": 1200.0, "watts": 500.0},
    }
    assert got["b"] == {
        "a": {"calls": 2, "sm_mhz": 1000.0, "watts": 300.0},
        "b": {"calls": 1, "sm_mhz": 1300.0, "watts": 600.0},
    }


def test_a_run_with_a_sampler_gives_each_call_its_clock(interleaved):
    from bench_selection import SMOKE_CONFIG, SMOKE_SHAPE

    sampler = _FakeSampler()
    (row,) = interleaved.run(
        lens=(256,),
        kinds=("smooth",),
        rounds=2,
        shape=SMOKE_SHAPE,
        cfg=SMOKE_CONFIG,
        sampler=sampler,
        log=lambda _: None,
    )
    assert sampler.entered == 1
    for name, ms in row["call_ms"].items():
        assert sum(group["calls"] for group in row["clocks_after"][name].values()) == len(ms) == 2
        # The fake clock is 1000 + the call's ms: per predecessor, 1000 + the median call time after it.
        for prev, group in row["clocks_after"][name].items():
            after_ms = row["implementations"][name]["after"][prev]["median_ms"]
            assert group["sm_mhz"] == pytest.approx(1000.0 + after_ms) and group["watts"] == 500.0
