"""infllm-jax: InfLLM-V2 trainable dense/sparse switchable attention in JAX, Flax NNX and Pallas."""

from infllm_jax import ops
from infllm_jax.config import SparseConfig
from infllm_jax.nn import InfLLMv2Attention
from infllm_jax.ops import infllmv2_attention, select_blocks, sparse_attention

__all__ = [
    "InfLLMv2Attention",
    "SparseConfig",
    "infllmv2_attention",
    "ops",
    "select_blocks",
    "sparse_attention",
]
__version__ = "0.1.0"
