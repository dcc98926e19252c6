"""Public InfLLM-V2 ops with ``implementation=`` dispatch.

Implementations live in two registries, ``SELECT_BLOCKS`` and ``SPARSE_ATTENTION``. ``"xla"`` is the
pure-JAX reference and runs everywhere. Accelerated backends register themselves under their
own name (``"pallas"``) and raise ``NotImplementedError`` for inputs they do not support. With
``implementation=None`` the preferred backends for the current platform are tried in order and
the reference is the last resort; an explicitly named implementation never falls back.
"""

from collections.abc import Callable

import jax

from infllm_jax.config import SparseConfig
from infllm_jax.ops import pallas_backend
from infllm_jax.ops._checks import check_block_idx, check_qk, check_qkv
from infllm_jax.ops.reference import dense_attention, sparse_attention_xla
from infllm_jax.ops.selection import select_blocks_reference

__all__ = [
    "SELECT_BLOCKS",
    "SPARSE_ATTENTION",
    "infllmv2_attention",
    "select_blocks",
    "sparse_attention",
]

# name -> fn(q, k, cfg) -> block_idx
SELECT_BLOCKS: dict[str, Callable] = {
    "xla": select_blocks_reference,
    "pallas": pallas_backend.select_blocks_pallas,
}
# name -> fn(q, k, v, block_idx, *, block_size) -> out
SPARSE_ATTENTION: dict[str, Callable] = {
    "xla": sparse_attention_xla,
    "pallas": pallas_backend.sparse_attention_pallas,
}
# Order in which implementation=None tries backends on each platform.
_PREFERENCE = {"gpu": ("pallas", "xla")}


def _offset_kwargs(q_offset) -> dict:
    # Backends that do not support query offsets never see the argument unless it is used.
    return {} if isinstance(q_offset, int) and q_offset == 0 else {"q_offset": q_offset}


def _dispatch(registry: dict[str, Callable], implementation: str | None, *args, **kwargs):
    if implementation is not None:
        if implementation not in registry:
            raise ValueError(f"unknown implementation {implementation!r}; available: {sorted(registry)}")
        return registry[implementation](*args, **kwargs)
    skipped = []
    for name in _PREFERENCE.get(jax.default_backend(), ("xla",)):
        if name not in registry:
            continue
        try:
            return registry[name](*args, **kwargs)
        except NotImplementedError as err:
            skipped.append(err)
    raise ExceptionGroup("no implementation supports these inputs", skipped)


def select_blocks(
    q: jax.Array,
    k: jax.Array,
    cfg: SparseConfig,
    *,
    implementation: str | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Selects the key blocks each query token attends to (InfLLM-V2 stage 1, no gradient).

    Args:
      q: ``[B, T, Hq, D]`` queries (post-RoPE, or pre-RoPE when ``cfg.use_nope``).
      k: ``[B, T, Hkv, D]`` keys, likewise.
      cfg: sparse configuration.
      implementation: ``None`` (best available), ``"xla"`` or a registered backend such as ``"pallas"``.
      q_offset: position of ``q[:, 0]`` among the keys when ``q`` holds only the contiguous slice
        ``[q_offset, q_offset + Tq)`` of the key positions (context parallelism); may be traced.

    Returns:
      int32 ``[B, Hkv, Tq, cfg.num_selected]``: selected block ids per token and KV head, ascending,
      ``-1`` in unused slots, never a block after the token's own block.

    Raises:
      ValueError / TypeError: on malformed shapes, dtypes or head ratios.
    """
    check_qk(q, k, shorter_q=True)
    return _dispatch(SELECT_BLOCKS, implementation, q, k, cfg, **_offset_kwargs(q_offset))


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    implementation: str | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Causal attention of each token over the union of its selected key blocks.

    Args:
      q: ``[B, T, Hq, D]`` queries; head ``h = kv * G + g`` uses the selection of KV head ``kv``.
      k, v: ``[B, T, Hkv, D]``.
      block_idx: int ``[B, Hkv, T, K]``, ascending ids with ``-1`` in unused slots (``select_blocks``).
      block_size: tokens per key block.
      implementation: ``None`` (best available), ``"xla"`` or a registered backend such as ``"pallas"``.
      q_offset: position of ``q[:, 0]`` among the keys (see ``select_blocks``).

    Returns:
      ``[B, T, Hq, D]`` in ``q.dtype``; differentiable w.r.t. q, k and v.
    """
    b, t, _, hkv, _ = check_qkv(q, k, v, shorter_q=True)
    check_block_idx(block_idx, b, hkv, t, block_size)
    offset = _offset_kwargs(q_offset)
    return _dispatch(SPARSE_ATTENTION, implementation, q, k, v, block_idx, block_size=block_size, **offset)


def infllmv2_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cfg: SparseConfig,
    *,
    implementation: str | None = None,
    select_q: jax.Array | None = None,
    select_k: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """InfLLM-V2 attention: dense causal below ``cfg.dense_len`` tokens, block-sparse at or above.

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]``.
      cfg: sparse configuration.
      implementation: backend for selection and sparse attention (``None``, ``"xla"``, ``"pallas"``).
        The Pallas backend runs both as one pipeline: its top-k also builds the sparse attention's
        block lists (``pallas_backend.infllmv2_attention_pallas``).
      select_q, select_k: queries/keys used only for block selection (the pre-RoPE ones when
        ``cfg.use_nope``); default ``q`` and ``k``.
      q_offset: position of ``q[:, 0]`` among the keys when ``q`` holds only a contiguous slice of the
        key positions (context parallelism: local queries against all-gathered keys). The dense/sparse
        switch looks at the key length, like the official ``kv_seq_len`` rule.

    Returns:
      ``[B, T, Hq, D]`` in ``q.dtype``; differentiable w.r.t. q, k and v (selection is not).
    """
    check_qkv(q, k, v, shorter_q=True)
    if not cfg.is_sparse(k.shape[1]):
        return dense_attention(q, k, v, q_offset=q_offset)
    if cfg.use_nope and (select_q is None or select_k is None):
        raise ValueError("cfg.use_nope=True: pass the pre-RoPE queries and keys as select_q and select_k")
    select_q = q if select_q is None else select_q
    select_k = k if select_k is None else select_k
    if select_q.shape != q.shape or select_k.shape != k.shape:
        raise ValueError(
            f"select_q/select_k must have the shapes of q/k: {select_q.shape} vs {q.shape}, "
            f"{select_k.shape} vs {k.shape}"
        )
    if implementation == "pallas" or (
        implementation is None and "pallas" in _PREFERENCE.get(jax.default_backend(), ())
    ):
        # Selection and attention by the Pallas kernels in one go (the top-k builds the attention's
        # block lists); with implementation=None, inputs it does not support take the path below.
        try:
            return pallas_backend.infllmv2_attention_pallas(
                q, k, v, cfg, select_q=select_q, select_k=select_k, q_offset=q_offset
            )
        except NotImplementedError:
            if implementation == "pallas":
                raise
    block_idx = select_blocks(select_q, select_k, cfg, implementation=implementation, q_offset=q_offset)
    return sparse_attention(
        q, k, v, block_idx, block_size=cfg.block_size, implementation=implementation, q_offset=q_offset
    )
