"""InfLLM-V2 attention as a Flax NNX module: GQA + RoPE with a dense/sparse switch.

The module owns exactly the parameters of dense GQA attention (q/k/v/o projections, no bias) and
nothing else: InfLLM-V2 selects key blocks from mean-pooled keys with no extra weights (SPEC.md §1),
so a dense-pretrained checkpoint loads unchanged into the sparse mode.

Axis legend for shape-suffixed names: B batch, T tokens, E hidden size, N query heads, K KV heads,
H head dim, S selected block slots.
"""

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx

from infllm_jax.config import SparseConfig
from infllm_jax.ops import infllmv2_attention, select_blocks, valid_block_slots
from infllm_jax.parallel import attention_runs_per_shard, context_parallel_attention

__all__ = ["AttentionMode", "InfLLMv2Attention", "apply_rope", "visible_fraction"]

AttentionMode = Literal["dense", "sparse", "auto"]
_MODES = get_args(AttentionMode)
# nnx.Linear's own default (LeCun normal), as a module-level singleton for argument defaults.
_DEFAULT_INIT = nnx.initializers.lecun_normal()


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding, half-split ("rotate_half", Llama/HF) convention.

    Channel ``i < H/2`` is paired with channel ``i + H/2`` and rotated by ``positions * theta**(-2i/H)``.
    The angles are computed in float32 so positions of 64K+ tokens stay exact.

    Args:
      x: ``[B, T, heads, H]`` queries or keys; ``H`` must be even.
      positions: integer ``[T]`` or ``[B, T]`` token positions.
      theta: RoPE base.

    Returns:
      ``[B, T, heads, H]`` in ``x.dtype``.
    """
    h = x.shape[-1]
    if h % 2:
        raise ValueError(f"RoPE needs an even head dim, got {h}")
    inv_freq_F = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
    positions = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)  # [B, T]
    angles_BTF = positions[..., None] * inv_freq_F[None, None, :]
    cos_BT1F = jnp.cos(angles_BTF)[:, :, None, :]
    sin_BT1F = jnp.sin(angles_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
    return out.astype(x.dtype)


def visible_fraction(block_idx: jax.Array, block_size: int) -> jax.Array:
    """Mean fraction of its causal prefix that a token attends to under a block selection.

    Token ``t`` sees ``t + 1`` keys under dense causal attention; under the selection it sees the
    keys ``p <= t`` of its (distinct) selected blocks. The ratio is averaged over batch, KV heads and
    tokens, so 1.0 means the selection is dense.

    Args:
      block_idx: int ``[B, K, T, S]`` ascending block ids, ``-1`` padded (``select_blocks``).
      block_size: tokens per key block.

    Returns:
      Scalar float32 in ``(0, 1]``.
    """
    t_11T1 = jnp.arange(block_idx.shape[2])[None, None, :, None]
    valid = valid_block_slots(block_idx)
    start = block_idx * block_size
    # Keys of block b visible to t: [b * bs, min((b + 1) * bs, t + 1)), empty for future blocks.
    seen = jnp.clip(t_11T1 + 1 - start, 0, block_size)
    seen_BKT1 = jnp.where(valid, seen, 0).sum(axis=-1, keepdims=True)
    return jnp.mean(seen_BKT1 / (t_11T1 + 1))


class InfLLMv2Attention(nnx.Module):
    """Causal GQA self-attention with RoPE and InfLLM-V2's dense/sparse switch.

    Modes:
      * ``"dense"``: always dense causal attention.
      * ``"sparse"``: always InfLLM-V2 block-sparse attention (``dense_len`` is ignored).
      * ``"auto"``: dense below ``sparse_config.dense_len`` tokens, sparse at or above (SPEC.md §8).

    Block selection uses the post-RoPE queries and keys, or the pre-RoPE ones when
    ``sparse_config.use_nope``.

    Example::

        attn = InfLLMv2Attention(512, 8, 2, 64, sparse_config=SparseConfig(dense_len=4096),
                                 rngs=nnx.Rngs(0))
        y = attn(x)  # x, y: [B, T, 512]
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        sparse_config: SparseConfig,
        mode: AttentionMode = "auto",
        rope_theta: float = 10000.0,
        implementation: str | None = None,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        kernel_init: nnx.Initializer = _DEFAULT_INIT,
        out_kernel_init: nnx.Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        """Builds the four projections.

        Args:
          hidden_size: model width ``E``.
          num_heads: query heads ``N``; must be a multiple of ``num_kv_heads``.
          num_kv_heads: key/value heads ``K`` (GQA groups of ``N // K`` query heads).
          head_dim: per-head width ``H``; even, for RoPE.
          sparse_config: InfLLM-V2 hyperparameters (block size, top-k, window, ``dense_len``, ...).
          mode: ``"dense"``, ``"sparse"`` or ``"auto"``.
          rope_theta: RoPE base.
          implementation: backend of selection and sparse attention (``None`` = best available,
            ``"xla"``, ``"pallas"``).
          dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` computes in the input's dtype.
          param_dtype: parameter storage dtype.
          kernel_init: initializer of the q/k/v projection kernels.
          out_kernel_init: initializer of the output projection (default: ``kernel_init``).
          rngs: random streams for initialisation.

        Raises:
          ValueError: on non-positive sizes, a head count that is not a multiple of the KV heads,
            an odd head dim, an unknown mode or a ``sparse_config`` of the wrong type.
        """
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even (RoPE rotates channel pairs)")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not isinstance(sparse_config, SparseConfig):
            raise ValueError(f"sparse_config must be a SparseConfig, got {type(sparse_config).__name__}")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sparse_config = sparse_config
        self.mode = mode
        self.rope_theta = rope_theta
        self.implementation = implementation
        self.dtype = dtype

        def proj(d_in, d_out, init):
            return nnx.Linear(
                d_in, d_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs
            )

        self.q_proj = proj(hidden_size, num_heads * head_dim, kernel_init)
        self.k_proj = proj(hidden_size, num_kv_heads * head_dim, kernel_init)
        self.v_proj = proj(hidden_size, num_kv_heads * head_dim, kernel_init)
        self.o_proj = proj(num_heads * head_dim, hidden_size, out_kernel_init or kernel_init)

    def _qkv(self, x_BTE, positions):
        """Projects and rotates; returns post-RoPE q, k, v and the pre-RoPE q, k."""
        b, t, _ = x_BTE.shape
        if positions is None:
            positions = jnp.arange(t)
        q_BTNH = self.q_proj(x_BTE).reshape(b, t, self.num_heads, self.head_dim)
        k_BTKH = self.k_proj(x_BTE).reshape(b, t, self.num_kv_heads, self.head_dim)
        v_BTKH = self.v_proj(x_BTE).reshape(b, t, self.num_kv_heads, self.head_dim)
        q_rot = apply_rope(q_BTNH, positions, theta=self.rope_theta)
        k_rot = apply_rope(k_BTKH, positions, theta=self.rope_theta)
        return q_rot, k_rot, v_BTKH, q_BTNH, k_BTKH

    def _check_input(self, x_BTE):
        if x_BTE.ndim != 3 or x_BTE.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape [B, T, {self.hidden_size}], got {x_BTE.shape}")

    def __call__(self, x_BTE: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Causal self-attention.

        Args:
          x_BTE: ``[B, T, E]`` inputs.
          positions: integer ``[T]`` or ``[B, T]`` RoPE positions; default ``arange(T)``. They only
            rotate q/k: causality and block ids always follow the token index.

        Returns:
          ``[B, T, E]``, in ``dtype`` if set, else in the input's dtype.
        """
        self._check_input(x_BTE)
        b, t, _ = x_BTE.shape
        q_BTNH, k_BTKH, v_BTKH, q_nope, k_nope = self._qkv(x_BTE, positions)
        cfg = self.sparse_config
        if self.mode == "dense":
            cfg = dataclasses.replace(cfg, dense_len=t + 1)
        elif self.mode == "sparse":
            cfg = dataclasses.replace(cfg, dense_len=-1)
        # use_nope scores blocks with the un-rotated projections (SPEC.md §3); the attention itself
        # always uses the rotated ones.
        select = {"select_q": q_nope, "select_k": k_nope} if cfg.use_nope else {}
        # Under a mesh of several devices attention runs per shard (shard_map): XLA cannot partition
        # the Pallas kernels and would replicate them. A "seq" axis (context parallelism) shards the
        # sequence: the local queries attend to all-gathered keys.
        attend = context_parallel_attention if attention_runs_per_shard() else infllmv2_attention
        o_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, cfg, implementation=self.implementation, **select)
        return self.o_proj(o_BTNH.reshape(b, t, self.num_heads * self.head_dim))

    def select(self, x_BTE: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """The key blocks the sparse path would attend to, for inspection (no gradient).

        Args:
          x_BTE: ``[B, T, E]`` inputs.
          positions: as in ``__call__``.

        Returns:
          int32 ``[B, K, T, S]`` ascending block ids, ``-1`` padded, ``S = sparse_config.num_selected``.
        """
        self._check_input(x_BTE)
        q_BTNH, k_BTKH, _, q_nope, k_nope = self._qkv(x_BTE, positions)
        if self.sparse_config.use_nope:
            q_BTNH, k_BTKH = q_nope, k_nope
        return select_blocks(q_BTNH, k_BTKH, self.sparse_config, implementation=self.implementation)
