"""Input validation shared by the public ops: clear errors at the API boundary."""

import jax
import jax.numpy as jnp

__all__ = ["check_block_idx", "check_qk", "check_qkv"]


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_qk(q: jax.Array, k: jax.Array, *, shorter_q: bool = False) -> tuple[int, int, int, int, int]:
    """Validates ``q [B, T, Hq, D]`` and ``k [B, T, Hkv, D]``; returns ``(B, T, Hq, Hkv, D)``.

    With ``shorter_q`` the queries may be a contiguous slice of the key positions (``Tq <= Tk``, for
    context parallelism); ``T`` is then the query length.
    """
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, T, Hq, D] (rank 4), got shape {q.shape}")
    if k.ndim != 4:
        raise ValueError(f"k must have shape [B, T, Hkv, D] (rank 4), got shape {k.shape}")
    _check_float("q", q)
    _check_float("k", k)
    b, t, hq, d = q.shape
    if k.shape[0] != b or (k.shape[1] < t if shorter_q else k.shape[1] != t):
        relation = "at most the key length" if shorter_q else "the key length"
        raise ValueError(
            f"q and k must share batch and sequence length ({relation}): q {q.shape} vs k {k.shape}"
        )
    if k.shape[3] != d:
        raise ValueError(f"q and k must share the head dim: q {q.shape} vs k {k.shape}")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if t == 0:
        raise ValueError("sequence length must be positive, got T=0")
    return b, t, hq, hkv, d


def check_qkv(
    q: jax.Array, k: jax.Array, v: jax.Array, *, shorter_q: bool = False
) -> tuple[int, int, int, int, int]:
    """Validates ``q [B, T, Hq, D]``, ``k, v [B, T, Hkv, D]``; returns ``(B, T, Hq, Hkv, D)``."""
    dims = check_qk(q, k, shorter_q=shorter_q)
    if v.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {k.shape}, got {v.shape}")
    _check_float("v", v)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return dims


def check_block_idx(block_idx: jax.Array, b: int, hkv: int, t: int, block_size: int) -> int:
    """Validates ``block_idx [B, Hkv, T, K]`` (integer) and ``block_size``; returns K."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if block_idx.ndim != 4 or tuple(block_idx.shape[:3]) != (b, hkv, t):
        raise ValueError(
            f"block_idx must have shape [B, Hkv, T, K] = [{b}, {hkv}, {t}, K], got {block_idx.shape}"
        )
    if not jnp.issubdtype(block_idx.dtype, jnp.integer):
        raise TypeError(f"block_idx must be an integer array, got dtype {block_idx.dtype}")
    if block_idx.shape[3] == 0:
        raise ValueError("block_idx must select at least one slot per token (K >= 1)")
    return block_idx.shape[3]
