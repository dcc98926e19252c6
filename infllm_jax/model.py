"""MiniCPM4-style decoder-only Transformer with InfLLM-V2 attention (SPEC.md §17).

Llama layers (RMSNorm, GQA + RoPE, SwiGLU) plus MiniCPM's three optional muP scalings: embeddings
times ``scale_emb``, each residual branch times ``scale_depth / sqrt(num_layers)``, and the final
hidden state divided by ``hidden_size / dim_model_base`` before the LM head.

Print a preset's summary with ``python -m infllm_jax.model --preset small``.

Axis legend for shape-suffixed names: B batch, T tokens, E hidden size, V vocabulary, L layers,
K KV heads, S selected block slots.
"""

import argparse
import dataclasses
import math
from typing import get_args

import jax
import jax.numpy as jnp
from flax import nnx

from infllm_jax.config import SparseConfig
from infllm_jax.nn import AttentionMode, DecoderBlock, RMSNorm

__all__ = ["PRESETS", "ModelConfig", "Transformer", "get_config", "param_count", "summary"]

_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Shape and numerics of a ``Transformer``.

    Attributes:
      vocab_size: token vocabulary ``V``.
      num_layers: decoder blocks ``L``.
      hidden_size: model width ``E``.
      num_heads: query heads per layer.
      num_kv_heads: key/value heads per layer (GQA); divides ``num_heads``.
      head_dim: per-head width; even (RoPE).
      intermediate_size: SwiGLU width.
      rope_theta: RoPE base.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: reuse the token embedding as the LM head.
      scale_emb: muP embedding multiplier (MiniCPM: 12; 1 disables).
      scale_depth: muP residual multiplier numerator, branch scale ``scale_depth / sqrt(L)``
        (MiniCPM: 1.4; ``None`` disables).
      dim_model_base: muP base width; the last hidden state is divided by
        ``hidden_size / dim_model_base`` (MiniCPM: 256; ``None`` disables).
      init_std: standard deviation of every weight matrix at initialisation.
      attention_mode: ``"dense"``, ``"sparse"`` or ``"auto"`` (see ``InfLLMv2Attention``).
      sparse: InfLLM-V2 selection hyperparameters, shared by all layers.
      implementation: backend for selection and sparse attention (``None`` = best available).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; parameters, the residual stream,
        norms and logits stay float32.
    """

    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: int | None = None
    init_std: float = 0.02
    attention_mode: AttentionMode = "auto"
    sparse: SparseConfig = dataclasses.field(default_factory=SparseConfig)
    implementation: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates channel pairs)")
        for name in ("rope_theta", "norm_eps", "scale_emb", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.scale_depth is not None and not self.scale_depth > 0:
            raise ValueError(f"scale_depth must be positive or None, got {self.scale_depth!r}")
        if self.dim_model_base is not None and not (
            isinstance(self.dim_model_base, int) and self.dim_model_base > 0
        ):
            raise ValueError(f"dim_model_base must be a positive int or None, got {self.dim_model_base!r}")
        if self.attention_mode not in get_args(AttentionMode):
            raise ValueError(
                f"attention_mode must be one of {get_args(AttentionMode)}, got {self.attention_mode!r}"
            )
        if not isinstance(self.sparse, SparseConfig):
            raise ValueError(f"sparse must be a SparseConfig, got {type(self.sparse).__name__}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")

    @property
    def residual_scale(self) -> float:
        """Multiplier of each residual branch: ``scale_depth / sqrt(L)``, or 1 without muP."""
        return 1.0 if self.scale_depth is None else self.scale_depth / math.sqrt(self.num_layers)

    @property
    def logit_divisor(self) -> float:
        """Divisor of the last hidden state: ``hidden_size / dim_model_base``, or 1 without muP."""
        return 1.0 if self.dim_model_base is None else self.hidden_size / self.dim_model_base

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype`` as a numpy dtype."""
        return jnp.dtype(self.dtype)


# MiniCPM's muP multipliers (SPEC.md §17).
_MINICPM_MUP = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256}

PRESETS: dict[str, ModelConfig] = {
    # ~0.8M parameters with a byte vocabulary: a CPU-sized model. The small blocks make selection
    # genuinely sparse at 1K tokens: (topk 4 + 2 local) blocks x 16 = 96 visible keys per token.
    "tiny": ModelConfig(
        vocab_size=512,
        num_layers=4,
        hidden_size=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=384,
        sparse=SparseConfig(
            block_size=16,
            kernel_size=8,
            kernel_stride=4,
            init_blocks=1,
            window_size=32,
            topk=4,
            dense_len=256,
        ),
        **_MINICPM_MUP,
    ),
    # ~92M parameters with an 8K vocabulary, for one H200. G = 16 query heads per KV head as in the
    # paper's kernels; 64-token blocks with a 512-token window and top-16, i.e. 24 blocks = 1,536
    # visible keys per token.
    "small": ModelConfig(
        vocab_size=8192,
        num_layers=8,
        hidden_size=1024,
        num_heads=16,
        num_kv_heads=1,
        head_dim=64,
        intermediate_size=2816,
        sparse=SparseConfig(window_size=512, topk=16, dense_len=4096),
        dtype="bfloat16",
        **_MINICPM_MUP,
    ),
    # MiniCPM4-8B shapes (SPEC.md §17) with the shipped sparse_config: for summaries and planning.
    "minicpm4_8b": ModelConfig(
        vocab_size=73448,
        num_layers=32,
        hidden_size=4096,
        num_heads=32,
        num_kv_heads=2,
        head_dim=128,
        intermediate_size=16384,
        tie_embeddings=False,
        init_std=0.1,
        dtype="bfloat16",
        **_MINICPM_MUP,
    ),
}


def get_config(preset: str, **overrides) -> ModelConfig:
    """A preset with fields replaced, e.g. ``get_config("tiny", vocab_size=260)``.

    Raises:
      ValueError: for an unknown preset or an invalid override.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


class Transformer(nnx.Module):
    """Decoder-only language model: embed, ``L`` decoder blocks, final RMSNorm, LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        """Initialises every parameter eagerly (use ``nnx.eval_shape`` for shapes only).

        Args:
          config: model configuration.
          rngs: random streams for initialisation.
        """
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        init = nnx.initializers.normal(config.init_std)
        dtype = config.compute_dtype
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, embedding_init=init, rngs=rngs)
        self.layers = nnx.List(
            DecoderBlock(
                config.hidden_size,
                config.num_heads,
                config.num_kv_heads,
                config.head_dim,
                config.intermediate_size,
                sparse_config=config.sparse,
                mode=config.attention_mode,
                rope_theta=config.rope_theta,
                norm_eps=config.norm_eps,
                residual_scale=config.residual_scale,
                implementation=config.implementation,
                dtype=dtype,
                kernel_init=init,
                rngs=rngs,
            )
            for _ in range(config.num_layers)
        )
        self.final_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                kernel_init=init,
                rngs=rngs,
            )

    def _embed(self, tokens_BT):
        if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an integer [B, T] array, got {tokens_BT.dtype}{tokens_BT.shape}"
            )
        return self.embed(tokens_BT) * self.config.scale_emb  # [B, T, E] float32 residual stream

    def __call__(self, tokens_BT: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Next-token logits.

        Args:
          tokens_BT: integer ``[B, T]`` token ids.
          positions: integer ``[T]`` or ``[B, T]`` RoPE positions; default ``arange(T)``.

        Returns:
          float32 ``[B, T, V]`` logits; position ``t`` depends only on tokens ``<= t``.
        """
        x_BTE = self._embed(tokens_BT)
        for layer in self.layers:
            x_BTE = layer(x_BTE, positions)
        h_BTE = self.final_norm(x_BTE) / self.config.logit_divisor
        dtype = self.config.compute_dtype
        if self.config.tie_embeddings:
            w_VE = self.embed.embedding[...].astype(dtype)
            return jnp.einsum("bte,ve->btv", h_BTE.astype(dtype), w_VE, preferred_element_type=jnp.float32)
        return self.lm_head(h_BTE).astype(jnp.float32)

    def block_selections(self, tokens_BT: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Each layer's InfLLM-V2 block selection on these tokens, whatever the attention mode.

        Runs the forward pass and, at every layer, the selection the sparse path would use on that
        layer's attention input. For inspection and for measuring sparsity (``visible_fraction``).

        Args:
          tokens_BT: integer ``[B, T]`` token ids.
          positions: as in ``__call__``.

        Returns:
          int32 ``[L, B, K, T, S]`` ascending block ids, ``-1`` padded.
        """
        x_BTE = self._embed(tokens_BT)
        selections = []
        for layer in self.layers:
            selections.append(layer.attn.select(layer.attn_norm(x_BTE), positions))
            x_BTE = layer(x_BTE, positions)
        return jnp.stack(selections)


def _abstract(config: ModelConfig) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def param_count(model_or_config: Transformer | ModelConfig) -> int:
    """Number of parameters of a model, or of the model a config describes (nothing is allocated)."""
    model = _abstract(model_or_config) if isinstance(model_or_config, ModelConfig) else model_or_config
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def summary(config: ModelConfig) -> str:
    """A human-readable description: shapes, muP scalings, sparsity and parameter counts."""
    model = _abstract(config)
    sp = config.sparse

    def count(node) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(node, nnx.Param)))

    block = model.layers[0]
    rows = [
        ("layers x hidden", f"{config.num_layers} x {config.hidden_size}"),
        (
            "heads (q / kv x dim)",
            f"{config.num_heads} / {config.num_kv_heads} x {config.head_dim} "
            f"(G = {config.num_heads // config.num_kv_heads})",
        ),
        ("SwiGLU width", str(config.intermediate_size)),
        ("vocab (tied)" if config.tie_embeddings else "vocab", str(config.vocab_size)),
        (
            "muP",
            f"emb x{config.scale_emb:g}, residual x{config.residual_scale:.3f}, "
            f"logits / {config.logit_divisor:g}",
        ),
        ("compute dtype", config.dtype),
        ("attention mode", config.attention_mode),
        (
            "InfLLM-V2",
            f"block {sp.block_size}, kernel {sp.kernel_size}/{sp.kernel_stride}, init {sp.init_blocks}, "
            f"window {sp.window_size}, topk {sp.topk} -> {sp.num_selected} blocks = "
            f"{sp.num_selected * sp.block_size} keys/token, dense_len {sp.dense_len}",
        ),
        ("params: embedding", _fmt(count(model.embed))),
        ("params: attention / layer", _fmt(count(block.attn))),
        ("params: MLP / layer", _fmt(count(block.mlp))),
        ("params: norms (all)", _fmt(sum(count(b.attn_norm) + count(b.mlp_norm) for b in model.layers))),
        ("params: total", f"{_fmt(param_count(model))} ({param_count(model):,})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m infllm_jax.model --preset small [--vocab-size N]``."""
    parser = argparse.ArgumentParser(description="Print a Transformer preset's summary.")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary")
    args = parser.parse_args(argv)
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    print(f"preset {args.preset}")
    print(summary(get_config(args.preset, **overrides)))


if __name__ == "__main__":
    main()
