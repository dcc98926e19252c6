"""Flax NNX modules: InfLLM-V2 attention and the Llama/MiniCPM layers around it."""

from infllm_jax.nn.attention import AttentionMode, InfLLMv2Attention, apply_rope, visible_fraction
from infllm_jax.nn.layers import DecoderBlock, RMSNorm, SwiGLU

__all__ = [
    "AttentionMode",
    "DecoderBlock",
    "InfLLMv2Attention",
    "RMSNorm",
    "SwiGLU",
    "apply_rope",
    "visible_fraction",
]
