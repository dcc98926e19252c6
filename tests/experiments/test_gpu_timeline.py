"""experiments/bench_attention.gpu_timeline: busy and idle GPU time per call from profiler events."""

from types import SimpleNamespace

import pytest


def _events(spans):
    return [SimpleNamespace(name=n, start_ns=s * 1000, end_ns=e * 1000) for n, s, e in spans]


def _profile(kernels, other_lines=(), host=()):
    """A stand-in for ``jax.profiler.ProfileData``: one GPU plane whose stream line holds ``kernels``
    (``(name, start_us, end_us)``), plus summary lines that must be ignored, and a host plane with
    the ``host`` events (and the kernels again, on a host line that must not count as a stream)."""
    events = _events(kernels)
    lines = [SimpleNamespace(name="Stream #13(Compute)", events=events)]
    lines += [SimpleNamespace(name=name, events=events) for name in other_lines]
    host_lines = [
        SimpleNamespace(name="python3", events=_events(host)),
        SimpleNamespace(name="Stream", events=events),
    ]
    return SimpleNamespace(
        planes=[
            SimpleNamespace(name="/host:CPU", lines=host_lines),
            SimpleNamespace(name="/device:GPU:0", lines=lines),
        ]
    )


@pytest.fixture
def gpu_timeline(experiment):
    return experiment("bench_attention").gpu_timeline


def test_two_calls_split_at_the_host_turnaround_and_gaps_inside_them_are_idle(gpu_timeline):
    # Call 1: a [0, 100), b [100, 160), a 90 us gap, c [250, 300). Host turnaround 5 ms.
    # Call 2: a [5300, 5400), b [5410, 5470), c [5470, 5600): a 10 us gap only.
    kernels = [
        ("a", 0, 100), ("b", 100, 160), ("c", 250, 300),
        ("a", 5300, 5400), ("b", 5410, 5470), ("c", 5470, 5600),
    ]  # fmt: skip
    host = [
        ("PjitFunction(jit(f))", -300, -100), ("PjitFunction(jit(f))", -299, -101),
        ("$api.py:2757 block_until_ready", -90, 500),
        ("PjitFunction(jit(f))", 5000, 5250), ("$api.py:2757 block_until_ready", 5260, 5800),
    ]  # fmt: skip
    got = gpu_timeline(_profile(kernels, other_lines=["XLA Ops"], host=host), calls=2, gap_ns=50_000)
    assert got["launches"] == 3
    assert got["span_ms"] == pytest.approx((300 + 300) / 2 / 1e3)
    assert got["busy_ms"] == pytest.approx((210 + 290) / 2 / 1e3)
    assert got["idle_ms"] == pytest.approx((90 + 10) / 2 / 1e3)
    # Only the gap above 50 us is listed, with the kernels on either side; not the turnaround.
    assert got["widest_gaps_us"] == [[90.0, "b", "c"]]
    # Host: the (inner) jitted call started 299 / 300 us before the first kernel, and
    # block_until_ready returned 200 us after the last one ended in both calls.
    assert got["dispatch_us"] == pytest.approx((299 + 300) / 2)
    assert got["sync_us"] == pytest.approx(200)


def test_overlapping_kernels_count_once(gpu_timeline):
    got = gpu_timeline(_profile([("a", 0, 100), ("copy", 50, 120), ("b", 150, 200)]), calls=1)
    assert got["span_ms"] == pytest.approx(0.2)
    assert got["busy_ms"] == pytest.approx(0.17)
    assert got["idle_ms"] == pytest.approx(0.03)
    assert got["widest_gaps_us"] == []
    # No host events: no host share.
    assert "dispatch_us" not in got and "sync_us" not in got


def test_fewer_events_than_calls_give_no_timeline(gpu_timeline):
    assert gpu_timeline(_profile([("a", 0, 100)]), calls=2) == {}


def test_kernel_totals_count_stream_launches_per_call_and_sum_the_rest(experiment):
    bench_attention = experiment("bench_attention")

    # Two calls of a 100 us, b 60 us and c 50 + 30 us; the "XLA Ops" summary line repeats them.
    kernels = [("a", 0, 100), ("b", 100, 160), ("c", 160, 210), ("c", 220, 250)]
    kernels += [(n, s + 1000, e + 1000) for n, s, e in kernels]
    data = _profile(kernels, other_lines=["XLA Ops"])
    assert bench_attention.kernel_totals(data, calls=2) == {"a": 0.1, "c": 0.08, "b": 0.06}
    assert bench_attention.kernel_totals(data, calls=2, top=1) == {"a": 0.1, "(2 other kernels)": 0.14}
