"""experiments/bench_selection.py on CPU (interpret mode): prefill variants and their comparison rows."""

import json

import pytest


def test_prefill_variant_rows_compare_with_the_default_and_the_dense_baseline(tmp_path, experiment):
    bench_selection = experiment("bench_selection")

    argv = ["--smoke", "--no-sweep", "--select-lens", "--prefill-lens", "256", "--inputs", "smooth"]
    bench_selection.main([*argv, "--prefill-variants", "xla_lists", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench_selection_smoke.json").read_text())
    assert {"command", "date", "device", "jax_version"} <= result.keys()
    rows = {r["implementation"]: r for r in result["rows"]}
    assert rows.keys() == {"xla", "pallas", "pallas_xla_lists"}
    assert not [r for r in rows.values() if "error" in r]
    # The default prefill row names its attention tiling's split (CPU: the Triton tiling, min_share 2).
    assert rows["pallas"]["attention_min_share"] == 2
    variant = rows["pallas_xla_lists"]
    # Same selection, same kernels, lists built two ways: the same output bit for bit.
    assert variant["output_identical_to_pallas"] is True and variant["max_abs_diff_vs_pallas"] == 0.0
    assert variant["speedup_vs_cudnn_dense"] == pytest.approx(rows["xla"]["median_ms"] / variant["median_ms"])
    # The summary's dense column is the dense row, not a Pallas variant's prefill row.
    line = next(x for x in bench_selection.summary(result["rows"]).splitlines() if "prefill/xla_lists" in x)
    assert f"{rows['xla']['median_ms']:.2f}" in line
    assert (tmp_path / "bench_selection_smoke.png").stat().st_size > 0
