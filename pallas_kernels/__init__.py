"""Pallas GPU kernels for InfLLM-V2 (jax only: never imports Flax or infllm_jax)."""
