"""experiments/phase_blocks.py: the per-chunk counts add up to the selection, the launch order and the
fit, and a smoke run end to end (CPU interpret mode)."""

import json

import jax
import numpy as np
import pytest

from infllm_jax.config import SparseConfig
from infllm_jax.ops.selection import select_blocks_reference
from pallas_kernels.tiling import BlockSizes, canonical_blocks, tile_lists


@pytest.fixture
def phase(experiment):
    return experiment("phase_blocks")


def test_every_selected_block_is_counted_once_in_one_phase(phase):
    t, block = 512, 16
    cfg = SparseConfig(block_size=block, kernel_size=8, kernel_stride=4, window_size=32, topk=6, dense_len=-1)
    kq, kk = jax.random.split(jax.random.key(5))
    q = jax.random.normal(kq, (1, t, 4, 32))
    k = jax.random.normal(kk, (1, t, 2, 32))
    idx = select_blocks_reference(q, k, cfg)
    ids, _ = canonical_blocks(idx, padded_len=t, block_size=block)
    tiling = BlockSizes(tile_tokens=8, min_share=2)
    lists = tile_lists(ids, tiling, block, 0, num_key_blocks=t // block)
    rows = phase.chunk_counts(idx, lists, chunk=128, tile_tokens=8)
    assert [r["first_token"] for r in rows] == [0, 128, 256, 384]
    for r in rows:
        assert r["tokens"] == 2 * 128
        assert r["tile_token_blocks"] + r["token_blocks"] == r["selected_blocks"]
        # Each entry costs one or both 4-token groups of its 8-token tile.
        assert r["tile_entries"] <= r["group_blocks"] <= 2 * r["tile_entries"]
        assert r["tokens_with_token_blocks"] <= r["tokens"]
    # Random q/k at this length leave some blocks to the token phase, and share others.
    assert sum(r["token_blocks"] for r in rows) > 0
    assert sum(r["group_blocks"] for r in rows) > sum(r["tile_entries"] for r in rows)


def test_token_launches_are_taken_in_profiler_name_order(phase):
    kernels = {
        "sparse_attn_fwd_token__2": 3.0,
        "sparse_attn_fwd_token": 1.0,
        "sparse_attn_fwd_token__1": 2.0,
        "sparse_attn_fwd_tile_mgpu_mosaic_gpu_kernel": 20.0,
        "infllmv2_select_topk": 5.0,
    }
    assert phase.launch_times(kernels) == ([1.0, 2.0, 3.0], 20.0)


def test_the_fit_recovers_per_token_and_per_block_costs(phase):
    a, b, n_sm = 2e-6, 3e-7, 100  # ms per token and per block
    rows = [
        {"tokens": n, "token_blocks": m, "token_ms": a * n + b * m}
        for n, m in [(1000, 6000), (1000, 60000), (2000, 9000), (500, 40000)]
    ]
    fit = phase.fit_token_phase(rows, n_sm)
    assert fit["per_token_sm_ns"] == pytest.approx(a * 1e6 * n_sm, rel=1e-6)
    assert fit["per_token_block_sm_ns"] == pytest.approx(b * 1e6 * n_sm, rel=1e-6)
    np.testing.assert_allclose(fit["residuals_ms"], 0, atol=1e-4)


def test_a_smoke_run_writes_counts_that_add_up(phase, tmp_path):
    phase.main(["--smoke", "--out", str(tmp_path), "--inputs", "random"])
    result = json.loads((tmp_path / "phase_blocks_smoke.json").read_text())
    assert {"command", "date", "device", "jax_version", "config", "inputs"} <= result.keys()
    assert [r["seq_len"] for r in result["rows"]] == [256, 512]
    for row in result["rows"]:
        for c in row["chunks"]:
            assert c["tile_token_blocks"] + c["token_blocks"] == c["selected_blocks"] > 0


def test_the_pure_union_is_counted_with_the_token_phase_it_would_have(phase, monkeypatch):
    from infllm_jax.ops import pallas_backend

    union = BlockSizes(tile_tokens=8, min_share=1)
    monkeypatch.setattr(pallas_backend, "prefill_attention_tiling", lambda q, k, cfg: union)
    assert phase.two_phase_tiling(None, None, None) == BlockSizes(tile_tokens=8, min_share=2)
    monkeypatch.setattr(
        pallas_backend, "prefill_attention_tiling", lambda q, k, cfg: BlockSizes(tile_tokens=0)
    )
    with pytest.raises(SystemExit, match="no tile phase"):
        phase.two_phase_tiling(None, None, None)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal on a machine without a GPU")
def test_main_refuses_to_profile_without_a_gpu(phase, tmp_path):
    with pytest.raises(SystemExit, match="run it on a GPU"):
        phase.main(["--out", str(tmp_path)])
