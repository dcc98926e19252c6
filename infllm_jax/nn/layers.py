"""Llama/MiniCPM building blocks as Flax NNX modules: RMSNorm, SwiGLU MLP and the decoder block.

Axis legend for shape-suffixed names: B batch, T tokens, E hidden size, F MLP width.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from infllm_jax.config import SparseConfig
from infllm_jax.nn.attention import _DEFAULT_INIT, AttentionMode, InfLLMv2Attention

__all__ = ["DecoderBlock", "RMSNorm", "SwiGLU"]


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm with a learned per-channel scale (initialised to 1), no bias."""

    def __init__(
        self, dim: int, *, eps: float = 1e-6, dtype: jnp.dtype | None = None, param_dtype=jnp.float32
    ):
        """Creates the scale.

        Args:
          dim: normalised (last) axis size.
          eps: added to the mean square before the reciprocal square root.
          dtype: output dtype; ``None`` keeps the input's dtype.
          param_dtype: storage dtype of the scale.
        """
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., dim] -> [..., dim]``; the statistics are computed in float32 even for bf16 inputs."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = jnp.broadcast_to(self.scale[...].astype(jnp.float32), x32.shape)
        return (x32 * scale).astype(self.dtype or x.dtype)


class SwiGLU(nnx.Module):
    """Gated MLP ``down(silu(gate(x)) * up(x))`` (Llama / MiniCPM), no biases."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype=jnp.float32,
        kernel_init: nnx.Initializer = _DEFAULT_INIT,
        out_kernel_init: nnx.Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        """Builds the three projections.

        Args:
          hidden_size: input and output width ``E``.
          intermediate_size: gated width ``F``.
          dtype: compute dtype (``None``: the input's).
          param_dtype: parameter storage dtype.
          kernel_init: initializer of the gate and up projections.
          out_kernel_init: initializer of the down projection (default: ``kernel_init``).
          rngs: random streams for initialisation.
        """
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        def proj(d_in, d_out, init):
            return nnx.Linear(
                d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs
            )

        self.gate_proj = proj(hidden_size, intermediate_size, kernel_init)
        self.up_proj = proj(hidden_size, intermediate_size, kernel_init)
        self.down_proj = proj(intermediate_size, hidden_size, out_kernel_init or kernel_init)

    def __call__(self, x_BTE: jax.Array) -> jax.Array:
        """``[..., E] -> [..., E]``."""
        h_BTF = jax.nn.silu(self.gate_proj(x_BTE)) * self.up_proj(x_BTE)
        return self.down_proj(h_BTF)


class DecoderBlock(nnx.Module):
    """Pre-norm decoder layer: ``x += r * attn(norm(x))``, then ``x += r * mlp(norm(x))``.

    ``r`` is MiniCPM's muP residual scale ``scale_depth / sqrt(num_layers)`` (1 for plain Llama).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        *,
        sparse_config: SparseConfig,
        mode: AttentionMode = "auto",
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        residual_scale: float = 1.0,
        implementation: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype=jnp.float32,
        kernel_init: nnx.Initializer = _DEFAULT_INIT,
        out_kernel_init: nnx.Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        """Builds the two norms, the attention and the MLP.

        Args:
          hidden_size, num_heads, num_kv_heads, head_dim, sparse_config, mode, rope_theta,
            implementation: as ``InfLLMv2Attention``.
          intermediate_size: SwiGLU width.
          norm_eps: RMSNorm epsilon.
          residual_scale: multiplier of both residual branches.
          dtype, param_dtype, kernel_init, out_kernel_init, rngs: as ``InfLLMv2Attention``.
        """
        self.residual_scale = residual_scale
        self.attn_norm = RMSNorm(hidden_size, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn = InfLLMv2Attention(
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            sparse_config=sparse_config,
            mode=mode,
            rope_theta=rope_theta,
            implementation=implementation,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            out_kernel_init=out_kernel_init,
            rngs=rngs,
        )
        self.mlp_norm = RMSNorm(hidden_size, eps=norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = SwiGLU(
            hidden_size,
            intermediate_size,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            out_kernel_init=out_kernel_init,
            rngs=rngs,
        )

    def __call__(self, x_BTE: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """``[B, T, E] -> [B, T, E]``; ``positions`` as in ``InfLLMv2Attention``."""
        x_BTE = x_BTE + self.residual_scale * self.attn(self.attn_norm(x_BTE), positions)
        return x_BTE + self.residual_scale * self.mlp(self.mlp_norm(x_BTE))
