"""experiments/scaling.py end to end on fake CPU devices: rows, efficiencies, JSON and figures."""

import json

import jax
import pytest

from experiments import scaling

needs_4 = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (fake CPU devices are set up)")


@needs_4
def test_scaling_writes_rows_relative_to_one_device_and_redraws(tmp_path):
    scaling.main(
        [
            "--preset",
            "tiny",
            "--seq-len",
            "128",
            "--steps",
            "1",
            "--meshes",
            "1x1",
            "2x1",
            "1x2",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "scaling_tiny.json").read_text())
    assert {"command", "date", "device", "jax_version"} <= result.keys()
    rows = {r["mesh"]: r for r in result["rows"]}
    assert rows.keys() == {"1x1", "2x1", "1x2"}
    assert rows["1x1"]["speedup_vs_1x1"] == 1.0
    assert rows["2x1"]["tokens_per_step"] == 2 * rows["1x1"]["tokens_per_step"]  # weak scaling over data
    assert rows["1x2"]["tokens_per_step"] == rows["1x1"]["tokens_per_step"]  # strong scaling over seq
    for row in rows.values():
        assert row["efficiency_vs_1x1"] == pytest.approx(row["speedup_vs_1x1"] / row["devices"])
    assert (tmp_path / "scaling_tiny.png").stat().st_size > 0

    redrawn = tmp_path / "redrawn"
    scaling.main(["--plot", str(tmp_path / "scaling_tiny.json"), "--out", str(redrawn)])
    assert (redrawn / "scaling_tiny.png").stat().st_size > 0


def test_mesh_labels_name_their_device_count():
    assert scaling.mesh_devices("2x4") == 8
    assert scaling.mesh_devices("2x1 fsdp") == 2
