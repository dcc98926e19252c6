"""experiments/bench_attention.write_report: every results file starts with its provenance."""

import json
import sys
from pathlib import Path

import jax
import pytest


@pytest.fixture
def bench_attention(experiment):
    return experiment("bench_attention")


def test_writes_command_date_device_and_jax_version_before_the_body(bench_attention, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["experiments/x.py", "--out", str(tmp_path / "out")])
    path = bench_attention.write_report(tmp_path / "out", "x_h200", {"rows": [1, 2]})
    assert Path(path) == tmp_path / "out" / "x_h200.json"
    report = json.loads(Path(path).read_text())
    assert list(report) == ["command", "date", "device", "jax_version", "rows"]
    assert report["command"].endswith(f"experiments/x.py --out {tmp_path / 'out'}")
    assert report["device"] == jax.devices()[0].device_kind and report["jax_version"] == jax.__version__
    assert report["rows"] == [1, 2]
