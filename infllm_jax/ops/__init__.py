"""Pure-JAX InfLLM-V2 ops (no Flax): compression, selection, sparse and dense attention."""

from infllm_jax.ops.attention import (
    SELECT_BLOCKS,
    SPARSE_ATTENTION,
    infllmv2_attention,
    select_blocks,
    sparse_attention,
)
from infllm_jax.ops.compression import compress_keys, num_compressed
from infllm_jax.ops.reference import dense_attention, sparse_attention_xla, valid_block_slots
from infllm_jax.ops.selection import block_scores, num_blocks, select_blocks_reference, stage1_scores

__all__ = [
    "SELECT_BLOCKS",
    "SPARSE_ATTENTION",
    "block_scores",
    "compress_keys",
    "dense_attention",
    "infllmv2_attention",
    "num_blocks",
    "num_compressed",
    "select_blocks",
    "select_blocks_reference",
    "sparse_attention",
    "sparse_attention_xla",
    "stage1_scores",
    "valid_block_slots",
]
