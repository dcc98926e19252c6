"""Configuration of InfLLM-V2 sparse attention.

The defaults are the shipped MiniCPM4/4.1 ``sparse_config`` (see SPEC.md §12)::

    {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
     "window_size": 2048, "topk": 64, "use_nope": false, "dense_len": 8192}
"""

import dataclasses

__all__ = ["SparseConfig"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SparseConfig:
    """Hyperparameters of InfLLM-V2 block selection and block-sparse attention.

    Attributes:
      block_size: tokens per key block (the unit of selection). 64 in the official kernels.
      kernel_size: tokens per fine compressed key ("semantic kernel"), mean-pooled. The coarse
        keys used for the LSE approximation have 4x this size.
      kernel_stride: stride between fine compressed keys. The coarse stride is 4x this.
      init_blocks: number of leading blocks every token always attends to (attention sinks).
      window_size: local window in tokens; ``window_size // block_size`` blocks before the
        current one, plus the current block, are always selected.
      topk: number of blocks chosen by score on top of the local blocks. Following the
        official code (not the paper's text), a token draws ``topk + local_blocks`` blocks in
        total, of which ``init_blocks + local_blocks + 1`` are forced.
      dense_len: sequences shorter than this run plain dense causal attention; ``-1`` means
        always sparse. The boundary is inclusive: ``T == dense_len`` runs sparse.
      use_nope: score blocks with pre-RoPE queries and keys (the caller must supply them).
    """

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    use_nope: bool = False

    def __post_init__(self):
        for name in ("block_size", "kernel_size", "kernel_stride", "topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SparseConfig.{name} must be a positive int, got {value!r}")
        for name in ("init_blocks", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SparseConfig.{name} must be a non-negative int, got {value!r}")
        if not isinstance(self.dense_len, int) or (self.dense_len < 0 and self.dense_len != -1):
            raise ValueError(
                f"SparseConfig.dense_len must be >= 0 or -1 (always sparse), got {self.dense_len!r}"
            )
        if self.kernel_size != 2 * self.kernel_stride:
            # The official block max-pool (kernel block_size // kernel_stride + 1, padding 1) covers
            # exactly the windows that intersect a block only when windows overlap by half.
            raise ValueError(
                f"kernel_size={self.kernel_size} must equal 2 * kernel_stride={2 * self.kernel_stride} "
                "(InfLLM-V2 uses half-overlapping windows, e.g. 32/16)"
            )
        if self.block_size % self.kernel_stride:
            raise ValueError(
                f"block_size={self.block_size} must be a multiple of kernel_stride={self.kernel_stride} "
                "(block scores max-pool whole groups of compressed keys)"
            )
        if self.window_size % self.block_size:
            raise ValueError(
                f"window_size={self.window_size} must be a multiple of block_size={self.block_size}"
            )
        if self.topk <= self.init_blocks:
            raise ValueError(
                f"topk={self.topk} must exceed init_blocks={self.init_blocks}: otherwise the forced "
                "init + local blocks fill every slot and the current block can be dropped"
            )

    @property
    def local_blocks(self) -> int:
        """Blocks before the current one that are always selected (``window_size // block_size``)."""
        return self.window_size // self.block_size

    @property
    def num_selected(self) -> int:
        """Selected blocks per token and KV head: ``topk + local_blocks`` (96 by default)."""
        return self.topk + self.local_blocks

    @property
    def coarse_kernel_size(self) -> int:
        """Size of the coarse compressed keys used for the LSE approximation (4x kernel_size)."""
        return 4 * self.kernel_size

    @property
    def coarse_kernel_stride(self) -> int:
        """Stride of the coarse compressed keys (4x kernel_stride)."""
        return 4 * self.kernel_stride

    @property
    def pool_stride(self) -> int:
        """Fine compressed keys per block; the block max-pool has kernel ``pool_stride + 1``, padding 1."""
        return self.block_size // self.kernel_stride

    def is_sparse(self, seq_len: int) -> bool:
        """Whether a sequence of ``seq_len`` tokens runs the sparse path (``seq_len >= dense_len``)."""
        return self.dense_len == -1 or seq_len >= self.dense_len
