"""The Mosaic GPU tile phase (``BlockSizes(mosaic=...)``) against the XLA gather reference.

Same checks and tolerances as ``test_sparse_attention_pallas`` (forward, dq/dk/dv, the empty token's
zero rows, bit-identical reruns). On CPU the Mosaic kernel runs in the Mosaic GPU interpreter, which
simulates its warpgroups, TMA copies and barriers; the token phase and the backward run in the
Triton interpreter. The interpreter runs each warpgroup as a thread that blocks inside XLA callbacks
while it waits on a barrier, so it needs more XLA CPU threads than a 2-core host gives one device:
``tests/conftest.py`` splits the host into 8 devices, which provides them.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.sparse_attention import (
    MOSAIC_BLOCK_SIZES,
    default_block_sizes,
    sparse_attention_pallas,
)
from pallas_kernels.sparse_attention_mgpu import TILE_TOKENS, tile_phase_mgpu
from pallas_kernels.tiling import BlockSizes, MosaicTile
from tests.kernels.test_sparse_attention_pallas import (
    INTERPRET,
    Case,
    check_against_reference,
    check_chunked_bit_identical,
)

# Every Mosaic option: FA3 ping-pong, 3-slot ring, no skipping, and the pure union (no token phase).
PINGPONG_UNION = BlockSizes(
    tile_tokens=8,
    min_share=1,
    mosaic=MosaicTile(stages=3, pingpong=True, skip_unselected=False, unmasked_path=False),
)
CASES = [
    Case(g=16, d=64, t=192, hkv=1, block_size=64, k=4, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES),
    Case(g=1, d=64, t=130, b=2, hkv=1, block_size=64, k=3, dtype=jnp.float16, config=PINGPONG_UNION),
    # A query slice (context parallelism) with a traced offset, padded rows (G=3) and a tail.
    Case(
        g=3,
        d=128,
        t=100,
        hkv=1,
        block_size=64,
        k=3,
        offset=70,
        keys=230,
        dtype=jnp.bfloat16,
        config=MOSAIC_BLOCK_SIZES,
        traced=True,
    ),
]
GPU_CASES = [
    Case(g=16, d=128, t=8192 + 37, block_size=64, k=24, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES),
    Case(g=2, d=64, t=4096 + 5, block_size=64, k=16, dtype=jnp.bfloat16, config=PINGPONG_UNION),
    Case(g=16, d=128, t=32768, hkv=1, block_size=64, k=8, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES),
]


def _ids(case):
    return f"{case}-mosaic-{'union' if case.config.min_share == 1 else 'share2'}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference(case):
    check_against_reference(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids)
def test_matches_reference_large(case):
    check_against_reference(case)


def test_chunked_forward_is_bit_identical():
    """Mosaic tile phase per chunk (3 chunks, the last shorter) == one chunk, outputs and gradients."""
    case = Case(g=16, d=64, t=150, hkv=1, block_size=64, k=3, dtype=jnp.bfloat16, config=MOSAIC_BLOCK_SIZES)
    check_chunked_bit_identical(case, chunk_tokens=56)


def test_config_needs_8_token_tiles():
    with pytest.raises(ValueError, match="8-token tiles"):
        BlockSizes(tile_tokens=4, mosaic=MosaicTile())


@pytest.mark.parametrize(("dtype", "block_size"), [(jnp.float32, 64), (jnp.bfloat16, 32)], ids=str)
def test_unsupported_inputs_raise(dtype, block_size):
    q = jnp.zeros((1, 64, 16, 64), dtype)
    k = jnp.zeros((1, 64, 1, 64), dtype)
    idx = jnp.zeros((1, 1, 64, 2), jnp.int32)
    with pytest.raises(NotImplementedError, match="Mosaic GPU tile phase"):
        sparse_attention_pallas(
            q, k, k, idx, block_size=block_size, config=MOSAIC_BLOCK_SIZES, interpret=INTERPRET
        )


def test_default_tiling():
    """Interpret mode and non-Hopper backends default to the Triton tiling; fp32 never gets Mosaic."""
    assert default_block_sizes(jnp.bfloat16, 128, 64, interpret=True) == BlockSizes()
    assert default_block_sizes(jnp.float32, 128, 64, interpret=INTERPRET) == BlockSizes()
    hopper = jax.default_backend() == "gpu" and str(jax.devices()[0].compute_capability).startswith("9")
    want = MOSAIC_BLOCK_SIZES if hopper else BlockSizes()
    assert default_block_sizes(jnp.bfloat16, 128, 64, interpret=INTERPRET) == want


@pytest.mark.parametrize(
    "mosaic",
    [MOSAIC_BLOCK_SIZES.mosaic, PINGPONG_UNION.mosaic, MosaicTile(stages=3, pingpong=True)],
    ids=["default", "pingpong-union", "pingpong-skip-unmasked"],
)
def test_lowers_for_cuda(mosaic):
    """The compiled path (register P operand, real Mosaic lowering and layout inference), which the
    interpreter does not take, lowers for a CUDA target without a GPU (D=128, bf16, fp32 state)."""
    b, t, hkv, d = 1, 256, 2, 128
    args = (
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.ShapeDtypeStruct((b, t, hkv, 16, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, hkv, t // TILE_TOKENS, 1, 128), jnp.int32),
        jax.ShapeDtypeStruct((b, hkv, t // TILE_TOKENS, 2), jnp.int32),
    )

    def tile_phase(*a):
        return tile_phase_mgpu(*a, start=0, length=t, out_dtype=jnp.float32, config=mosaic)

    text = jax.jit(tile_phase).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
