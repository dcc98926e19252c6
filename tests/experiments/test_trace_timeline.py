"""experiments/trace_timeline.py on a real (CPU) profiler trace, gzipped as committed traces are."""

import gzip
import json

import jax
import jax.numpy as jnp


def test_a_gzipped_cpu_trace_has_no_gpu_timeline_and_an_unknown_device(tmp_path, experiment):
    bench_attention, trace_timeline = experiment("bench_attention"), experiment("trace_timeline")

    raw = tmp_path / "cpu.xplane.pb"
    fn = jax.jit(lambda x: jnp.sin(x) @ x.T)
    assert bench_attention.kernel_times(fn, jnp.ones((64, 64)), keep_trace=raw) == {}
    packed = tmp_path / "cpu.xplane.pb.gz"
    packed.write_bytes(gzip.compress(raw.read_bytes()))

    out = tmp_path / "timeline.json"
    trace_timeline.main([str(packed), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["command"].startswith("python3 experiments/trace_timeline.py ")
    # No GPU plane: no kernels, so no timeline, and no device name to report.
    assert result["rows"] == [{"trace": "cpu.xplane.pb.gz", "device": "unknown"}]
