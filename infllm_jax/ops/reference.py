"""Pure-JAX attention: the gather-based block-sparse reference and dense causal attention.

``sparse_attention_xla`` is both the specification the Pallas kernels are tested against and the
production fallback on any backend: each query token gathers the keys/values of its selected
blocks and runs one float32 softmax over them, with token-level causal masking (SPEC.md §7).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["dense_attention", "sparse_attention_xla", "valid_block_slots"]

_HIGHEST = lax.Precision.HIGHEST
# Elements of the gathered K (or V) tile of one chunk ([B, Hkv, C, K * block_size, D]) when the caller
# does not choose a chunk: 2**23 floats = 32 MiB, so memory is bounded at any sequence length.
_GATHER_BUDGET = 1 << 23


def valid_block_slots(block_idx: jax.Array) -> jax.Array:
    """Which slots of sorted block ids count: ``id >= 0`` and not a repeat of the previous slot.

    Dropping adjacent repeats makes a token attend to the *union* of its blocks even if a caller
    passes the same id twice (ids are sorted, so repeats are adjacent).

    Args:
      block_idx: ``[..., K]`` integer block ids, ascending, ``-1`` for unused slots.

    Returns:
      ``[..., K]`` bool.
    """
    prev = jnp.concatenate([jnp.full_like(block_idx[..., :1], -1), block_idx[..., :-1]], axis=-1)
    return (block_idx >= 0) & (block_idx != prev)


def _gather_rows(x, pos):
    """``x [B, H, T, D]``, ``pos [B, H, C, N]`` -> ``[B, H, C, N, D]``."""
    return jax.vmap(jax.vmap(lambda xs, ps: xs[ps]))(x, pos)


@functools.partial(jax.jit, static_argnames=("block_size", "query_chunk"))
def sparse_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_idx: jax.Array,
    *,
    block_size: int,
    query_chunk: int | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Block-sparse causal attention by gathering each token's selected blocks (float32 math).

    Args:
      q: ``[B, T, Hq, D]`` queries; head ``h = kv * G + g`` shares the selection of KV head ``kv``.
      k, v: ``[B, T, Hkv, D]`` keys and values.
      block_idx: int ``[B, Hkv, T, K]`` selected block ids per token, ascending, ``-1`` padded.
      block_size: tokens per key block.
      query_chunk: tokens processed at once (default: bounded by a 32 MiB gather tile).
      q_offset: position of ``q[:, 0]`` among the keys when ``q`` (and ``block_idx``) hold only the
        slice ``[q_offset, q_offset + Tq)`` of the key positions (context parallelism); may be traced.

    Returns:
      ``[B, T, Hq, D]`` in ``q.dtype``. A token attends to keys ``p <= t`` inside its blocks; a token
      with no such key gets a zero output. Differentiable w.r.t. q, k, v (not ``block_idx``).
    """
    b, t, hq, d = q.shape
    t_k, hkv, n_slots = k.shape[1], k.shape[2], block_idx.shape[-1]
    g = hq // hkv
    scale = d**-0.5
    span = n_slots * block_size
    chunk = query_chunk or max(1, min(t, _GATHER_BUDGET // max(1, b * hkv * span * d)))
    n_chunks = -(-t // chunk)
    t_pad = n_chunks * chunk

    block_idx = lax.stop_gradient(block_idx).astype(jnp.int32)
    slot_ok = valid_block_slots(block_idx)
    kh = k.astype(jnp.float32).swapaxes(1, 2)  # [B, Hkv, T, D]
    vh = v.astype(jnp.float32).swapaxes(1, 2)
    qg = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    qg = jnp.pad(qg, ((0, 0), (0, t_pad - t), (0, 0), (0, 0), (0, 0)))
    qg = qg.reshape(b, n_chunks, chunk, hkv, g, d).transpose(1, 0, 3, 2, 4, 5)  # [n, B, Hkv, C, G, D]

    def pad_t(x):
        x = jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
        return x.reshape(b, hkv, n_chunks, chunk, n_slots).transpose(2, 0, 1, 3, 4)

    idx_c, ok_c = pad_t(block_idx), pad_t(slot_ok)  # [n, B, Hkv, C, K]

    @jax.checkpoint
    def one_chunk(args):
        q_chunk, idx, ok, start = args
        t_c = start + jnp.arange(chunk)
        offsets = jnp.arange(block_size)[None, None, None, None, :]
        pos = (jnp.maximum(idx, 0) * block_size)[..., None] + offsets  # [B, Hkv, C, K, bs]
        valid = ok[..., None] & (pos <= t_c[None, None, :, None, None])
        pos = jnp.minimum(pos, t_k - 1).reshape(b, hkv, chunk, span)
        valid = valid.reshape(b, hkv, chunk, span)
        kg, vg = _gather_rows(kh, pos), _gather_rows(vh, pos)  # [B, Hkv, C, span, D]
        s = jnp.einsum("bhcgd,bhcnd->bhcgn", q_chunk, kg, precision=_HIGHEST) * scale
        s = jnp.where(valid[:, :, :, None, :], s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhcgn,bhcnd->bhcgd", p, vg, precision=_HIGHEST)
        return jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)  # [B, Hkv, C, G, D]

    starts = q_offset + jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    out = lax.map(one_chunk, (qg, idx_c, ok_c, starts))  # [n, B, Hkv, C, G, D]
    out = out.transpose(1, 0, 3, 2, 4, 5).reshape(b, t_pad, hq, d)[:, :t]
    return out.astype(q.dtype)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: str | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Dense causal GQA attention through ``jax.nn.dot_product_attention``.

    On a GPU with bf16/fp16 inputs and a head dim cuDNN supports, ``implementation=None`` picks cuDNN
    (flash attention); otherwise XLA.

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]``.
      implementation: ``None``, ``"xla"`` or ``"cudnn"``.
      q_offset: position of ``q[:, 0]`` among the keys when ``q`` holds only a slice of the key
        positions (context parallelism); then an explicit causal mask is used (XLA).

    Returns:
      ``[B, T, Hq, D]`` in ``q.dtype``.
    """
    if not (isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]):
        causal = jnp.arange(k.shape[1])[None, :] <= q_offset + jnp.arange(q.shape[1])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=causal[None, None], implementation=implementation)
    if implementation is None:
        d = q.shape[-1]
        cudnn_ok = q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128
        implementation = "cudnn" if cudnn_ok and jax.default_backend() == "gpu" else "xla"
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
