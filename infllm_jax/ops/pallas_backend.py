"""Pallas GPU backends of the public ops, registered as ``implementation="pallas"``.

``pallas_kernels`` is imported on first use, so importing ``infllm_jax`` stays cheap and never
needs the Pallas GPU modules. On a CPU backend the kernels run in Pallas interpret mode (tests);
on GPU they are compiled (Triton, plus a Mosaic GPU tile phase on Hopper). Unsupported inputs
raise ``NotImplementedError``, which lets ``implementation=None`` fall back to the XLA reference.
"""

import jax

from infllm_jax.config import SparseConfig

__all__ = [
    "infllmv2_attention_pallas",
    "prefill_attention_pallas",
    "prefill_attention_tiling",
    "prefill_selection_pallas",
    "select_blocks_pallas",
    "selection_kwargs",
    "sparse_attention_pallas",
]


def sparse_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Block-sparse attention by the Pallas kernels (the signature of ``sparse_attention_xla``).

    A query slice (``q_offset``, possibly traced, and ``Tq <= Tk``) runs in the kernels.

    Raises:
      NotImplementedError: on a backend other than CPU/GPU, or for inputs the kernels do not support
        (head dim not 64/128, GQA group > 16, dtype not bf16/fp16/fp32, block size not 16..128).
    """
    interpret = _interpret_mode("sparse attention")
    from pallas_kernels import sparse_attention

    return sparse_attention.sparse_attention_pallas(
        q, k, v, block_idx, block_size=block_size, q_offset=q_offset, interpret=interpret
    )


def select_blocks_pallas(
    q: jax.Array, k: jax.Array, cfg: SparseConfig, *, q_offset: int | jax.Array = 0
) -> jax.Array:
    """Block selection by the fused Pallas kernels (the signature of ``select_blocks_reference``).

    bf16/fp16 inputs score with bf16/fp16 dots (float32 accumulation), so near-tied blocks may be
    chosen differently from the float32 reference; float32 inputs select exactly as the reference
    up to float32 rounding.

    Raises:
      NotImplementedError: on a backend other than CPU/GPU, or for inputs the kernels do not support
        (``block_size / kernel_stride`` not a power of two, head dim > 256, more than 16384 blocks).
    """
    interpret = _interpret_mode("block selection")
    from pallas_kernels import selection

    return selection.select_blocks(q, k, **selection_kwargs(cfg), q_offset=q_offset, interpret=interpret)


def infllmv2_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cfg: SparseConfig,
    *,
    select_q: jax.Array,
    select_k: jax.Array,
    q_offset: int | jax.Array = 0,
    select_tiling=None,
    attention_tiling=None,
) -> jax.Array:
    """Selection + sparse attention by the Pallas kernels, the sparse branch of ``infllmv2_attention``.

    The same result as ``select_blocks_pallas`` followed by ``sparse_attention_pallas``, but the
    selection's top-k also hands the attention its tile and token lists (built by a Pallas kernel
    from the top-k's masks), so the attention skips building them from the ids in XLA. Its two
    stages are ``prefill_selection_pallas`` and ``prefill_attention_pallas``.

    ``select_tiling`` / ``attention_tiling``: the ``BlockSizes`` of ``pallas_kernels.selection`` /
    ``pallas_kernels.tiling`` (default: each module's ``default_block_sizes``; benchmarks vary them).

    Raises:
      NotImplementedError: as ``select_blocks_pallas`` and ``sparse_attention_pallas`` do.
    """
    config = prefill_attention_tiling(q, k, cfg, attention_tiling)
    block_idx, lists = prefill_selection_pallas(
        select_q, select_k, cfg, attention_tiling=config, q_offset=q_offset, select_tiling=select_tiling
    )
    return prefill_attention_pallas(
        q, k, v, block_idx, lists, cfg, attention_tiling=config, q_offset=q_offset
    )


def prefill_attention_tiling(q: jax.Array, k: jax.Array, cfg: SparseConfig, attention_tiling=None):
    """The ``pallas_kernels.tiling.BlockSizes`` of ``infllmv2_attention_pallas``'s sparse attention:
    ``attention_tiling``, else the default for ``q`` (``[B, Tq, Hq, D]``) on this backend.

    Raises:
      NotImplementedError: on a backend other than CPU/GPU, or for inputs the attention kernels do not
        support.
    """
    interpret = _interpret_mode("InfLLM-V2 attention")
    from pallas_kernels import sparse_attention

    reason = sparse_attention.supported(q.shape, k.shape, q.dtype, cfg.block_size)
    if reason is not None:
        raise NotImplementedError(f"Pallas sparse attention does not support {reason}")
    return attention_tiling or sparse_attention.default_block_sizes(
        q.dtype, q.shape[-1], cfg.block_size, interpret, num_keys=k.shape[1], num_selected=cfg.num_selected
    )


def prefill_selection_pallas(
    select_q: jax.Array,
    select_k: jax.Array,
    cfg: SparseConfig,
    *,
    attention_tiling,
    q_offset: int | jax.Array = 0,
    select_tiling=None,
):
    """The first stage of ``infllmv2_attention_pallas``: ``(block_idx [B, Hkv, Tq, K] int32, lists)``,
    the selected blocks and, when ``attention_tiling`` (``prefill_attention_tiling``) takes lists, the
    attention's tile and token lists built from the top-k's masks (else ``None``)."""
    interpret = _interpret_mode("block selection")
    from pallas_kernels import block_lists, selection

    tiling = block_lists.list_tiling(attention_tiling)
    kwargs = dict(q_offset=q_offset, block_sizes=select_tiling, interpret=interpret, **selection_kwargs(cfg))
    if tiling is None:
        return selection.select_blocks(select_q, select_k, **kwargs), None
    return selection.select_blocks(select_q, select_k, lists_for=tiling, **kwargs)


def prefill_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    lists,
    cfg: SparseConfig,
    *,
    attention_tiling,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """The second stage of ``infllmv2_attention_pallas``: the sparse attention ``[B, Tq, Hq, D]`` over
    ``prefill_selection_pallas``'s ``block_idx`` and ``lists`` with the same ``attention_tiling``."""
    interpret = _interpret_mode("sparse attention")
    from pallas_kernels import sparse_attention

    return sparse_attention.sparse_attention_pallas(
        q,
        k,
        v,
        block_idx,
        block_size=cfg.block_size,
        q_offset=q_offset,
        config=attention_tiling,
        lists=lists,
        interpret=interpret,
    )


def _interpret_mode(what: str) -> bool:
    """Whether the kernels run in interpret mode (CPU) or compiled (GPU); other backends raise
    ``NotImplementedError``. Also hides the Triton backend's deprecation warning."""
    backend = jax.default_backend()
    if backend not in ("cpu", "gpu"):
        raise NotImplementedError(f"Pallas {what} runs on GPU (or CPU in interpret mode), not {backend}")
    from pallas_kernels import _compat

    _compat.silence_triton_deprecation()
    return backend == "cpu"


def selection_kwargs(cfg: SparseConfig) -> dict:
    """The keyword arguments of ``pallas_kernels.selection.select_blocks`` that a ``SparseConfig`` fixes."""
    return {
        "block_size": cfg.block_size,
        "kernel_size": cfg.kernel_size,
        "kernel_stride": cfg.kernel_stride,
        "init_blocks": cfg.init_blocks,
        "local_blocks": cfg.local_blocks,
        "num_selected": cfg.num_selected,
    }
