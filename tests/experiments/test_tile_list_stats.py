"""experiments/tile_list_stats.py: the step counts on hand-made lists, and a small run end to end."""

import json

import numpy as np
import pytest


@pytest.fixture
def stats(experiment):
    return experiment("tile_list_stats")


def test_steps_pair_list_entries_in_list_order_or_grouped_by_warpgroup(stats):
    # Tokens 0 and 1 (first warpgroup) and 4 and 5 (second), one block each, alternating.
    bits = np.array([0x01, 0x10, 0x02, 0x20])
    np.testing.assert_array_equal(stats.warpgroup_classes(np.array([0x11, 0x0F, 0xF0])), [0, 1, 2])
    assert stats.step_counts(bits, grouped=False) == (2, 0)  # each step serves both warpgroups
    assert stats.step_counts(bits, grouped=True) == (0, 2)  # each step serves one
    # An odd list: the last entry pairs with padding (no bits).
    assert stats.step_counts(np.array([0xFF, 0x01, 0x10]), grouped=True) == (1, 1)
    got = stats.list_stats(bits[None], np.array([4]))
    assert got["first_warpgroup_only"] == got["second_warpgroup_only"] == 2
    # A warpgroup computes 4 token rows per entry it touches; one of them chose the block.
    assert got["useful_row_share"] == 0.25


def test_private_blocks_shared_counts_the_loads_tokens_of_neighbouring_tiles_have_in_common(stats):
    # One KV head, 4 tiles of 8 tokens, 4 key blocks; only token 0 of each tile has private blocks.
    ids = np.zeros((1, 32, 2), np.int32)
    cnt = np.zeros((1, 32), np.int32)
    for tile, blocks in enumerate([[0, 1], [1, 2], [3], []]):
        ids[0, 8 * tile, : len(blocks)], cnt[0, 8 * tile] = blocks, len(blocks)
    # Pairs of tiles: {0, 1} | {1, 2} loads 3 of 4 blocks, {3} | {} 1 of 1: 1 - 4/5.
    assert stats.private_blocks_shared(ids, cnt, tiles=2, num_blocks=4) == pytest.approx(0.2)
    # All four tiles: blocks 0-3 once each of 5 loads.
    assert stats.private_blocks_shared(ids, cnt, tiles=4, num_blocks=4) == pytest.approx(0.2)
    # Different places in the tile never share (token 1 of tile 1 instead of token 0).
    ids[0, 9], cnt[0, 9], cnt[0, 8] = ids[0, 8], 2, 0
    assert stats.private_blocks_shared(ids, cnt, tiles=2, num_blocks=4) == pytest.approx(0.0)


def test_the_warpgroup_tile_model_pairs_shared_blocks_into_steps_of_the_warpgroups_that_chose_them(stats):
    step_ns, token_block_ns = {1: 1.0, 2: 1.5, 3: 2.0}, 10.0
    # 24 tokens of one KV head, each choosing blocks 0 and 1 of 4 (id 4 would be an empty slot).
    ids = np.tile(np.array([0, 1], np.int32), (1, 24, 1))
    got = {n: stats.warpgroup_tile_model(ids, n, 4, step_ns, token_block_ns) for n in (8, 12)}
    # 8-token tiles: two shared entries, one step of both warpgroups per tile (3 tiles).
    assert got[8]["list_blocks"] == 2 and got[8]["warpgroup_steps_per_token"] == pytest.approx(2 / 8)
    assert got[8]["sm_ns_per_token"] == pytest.approx(3 * 1.5 / 24)
    # 12-token tiles: one step of three warpgroups per tile (2 tiles).
    assert got[12]["sm_ns_per_token"] == pytest.approx(2 * 2.0 / 24)
    # Token 5 takes block 2 instead of 1: a private block (token phase), the steps unchanged.
    ids[0, 5, 1] = 2
    got = stats.warpgroup_tile_model(ids, 8, 4, step_ns, token_block_ns)
    assert got["private_blocks_per_token"] == pytest.approx(1 / 24)
    assert got["token_phase_sm_ns_per_token"] == pytest.approx(10 / 24)
    assert got["tile_sm_ns_per_token"] == pytest.approx(3 * 1.5 / 24)
    # Tokens 0 and 1 (first warpgroup only) take block 3 instead of 1: tile 0 lists [first only, both,
    # both] -> steps (first | both) and (both | padding), two steps of both warpgroups.
    ids[0, :2, 1] = 3
    got = stats.warpgroup_tile_model(ids, 8, 4, step_ns, token_block_ns)
    assert got["tile_sm_ns_per_token"] == pytest.approx((2 * 1.5 + 2 * 1.5) / 24)


def test_the_model_reads_the_measured_step_costs(stats):
    step_ns, token_block_ns = stats.measured_step_costs()
    assert sorted(step_ns) == [1, 2, 3]
    # More warpgroups take longer per step but less per warpgroup.
    assert step_ns[1] < step_ns[2] < step_ns[3] and step_ns[3] / 3 < step_ns[2] / 2 < step_ns[1]
    assert token_block_ns > 0


@pytest.mark.parametrize("inputs", ["smooth", "random"])
def test_a_small_run_writes_consistent_statistics(stats, tmp_path, inputs):
    stats.main(["--seq-len", "2048", "--queries", "64", "--inputs", inputs, "--out", str(tmp_path)])
    suffix = "" if inputs == "smooth" else "_random"
    result = json.loads((tmp_path / f"tile_list_stats_2k{suffix}.json").read_text())
    assert result["inputs"].startswith("bench_attention" if inputs == "smooth" else "bench_selection random")
    assert {"command", "date", "device", "jax_version", "inputs"} <= result.keys()
    for share in ("min_share_2", "min_share_1"):
        got = result[share]
        parts = got["both_warpgroups"] + got["first_warpgroup_only"] + got["second_warpgroup_only"]
        assert parts == pytest.approx(got["list_blocks"])
        for order in ("ascending", "grouped"):
            steps = got[f"steps_both_{order}"] + got[f"steps_one_{order}"]
            assert got["list_blocks"] / 2 <= steps <= got["list_blocks"] / 2 + 0.5
        assert 0 < got["useful_row_share"] <= 1
    # The union lists every block the share-2 lists do, and the tokens' private ones.
    assert result["min_share_1"]["list_blocks"] >= result["min_share_2"]["list_blocks"]
    assert "private_blocks_per_token" in result["min_share_2"]
    shared = [result["min_share_2"][f"private_shared_over_{n}_tiles"] for n in (2, 4)]
    assert 0 <= shared[0] <= shared[1] < 1
    model = result["warpgroup_tile_model"]
    assert model["queries"] == 48  # the last multiple of 24 of the 64 queries
    narrow, wide = model["8_token_tiles"], model["12_token_tiles"]
    # Wider tiles share more: fewer private blocks per token.
    assert wide["private_blocks_per_token"] <= narrow["private_blocks_per_token"]
    for got in (narrow, wide):
        assert got["sm_ns_per_token"] == pytest.approx(
            got["tile_sm_ns_per_token"] + got["token_phase_sm_ns_per_token"]
        )
