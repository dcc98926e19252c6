"""Key compression: parameter-free mean pooling of keys into "semantic kernels" (SPEC.md §3)."""

import functools

import jax
import jax.numpy as jnp

__all__ = ["compress_keys", "num_compressed"]


def num_compressed(seq_len: int, kernel_size: int, kernel_stride: int) -> int:
    """Number of complete windows: ``floor((seq_len - kernel_size) / kernel_stride) + 1``, or 0."""
    if seq_len < kernel_size:
        return 0
    return (seq_len - kernel_size) // kernel_stride + 1


@functools.partial(jax.jit, static_argnames=("kernel_size", "kernel_stride"))
def compress_keys(k: jax.Array, kernel_size: int, kernel_stride: int) -> jax.Array:
    """Mean-pools keys over complete windows; a partial tail window is dropped.

    ``out[:, c] = mean(k[:, c * kernel_stride : c * kernel_stride + kernel_size])``.

    Args:
      k: keys ``[B, T, H, D]`` (post-RoPE unless the config says ``use_nope``).
      kernel_size: window length; must be a multiple of ``kernel_stride``.
      kernel_stride: distance between window starts.

    Returns:
      ``[B, n, H, D]`` in ``k.dtype`` with ``n = num_compressed(T, kernel_size, kernel_stride)``;
      the sums are accumulated in float32.
    """
    if k.ndim != 4:
        raise ValueError(f"k must have shape [B, T, H, D], got {k.shape}")
    if kernel_size <= 0 or kernel_stride <= 0 or kernel_size % kernel_stride:
        raise ValueError(f"{kernel_size=} must be a positive multiple of {kernel_stride=}")
    b, t, h, d = k.shape
    n = num_compressed(t, kernel_size, kernel_stride)
    if n == 0:
        return jnp.zeros((b, 0, h, d), k.dtype)
    # Sum stride-sized chunks once, then add kernel_size // kernel_stride neighbouring chunks:
    # O(T) work instead of O(T * kernel_size / kernel_stride) for overlapping windows.
    r = kernel_size // kernel_stride
    n_chunks = n + r - 1
    chunks = k[:, : n_chunks * kernel_stride].astype(jnp.float32)
    chunks = chunks.reshape(b, n_chunks, kernel_stride, h, d).sum(axis=2)  # [B, n_chunks, H, D]
    windows = sum(chunks[:, i : i + n] for i in range(r))  # [B, n, H, D]
    return (windows / kernel_size).astype(k.dtype)
