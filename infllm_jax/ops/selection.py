"""Stage 1 of InfLLM-V2: which key blocks each query token attends to (SPEC.md §4-§6).

Pure-JAX reference, written to match the official code (OpenBMB/infllmv2_cuda_impl and the
MiniCPM4.1 HF modeling code) rather than the paper where the two differ:

1. Keys are mean-pooled into fine kernels K1 (``kernel_size``/``kernel_stride``, 32/16) and coarse
   kernels K2 (4x both, 128/64). A kernel is visible to token ``t`` iff its whole window lies at or
   before ``t`` (``c * stride + size <= t + 1``), not merely its start.
2. ``lse2 = logsumexp_c2(scale * q . K2[c2])`` over visible coarse kernels (pass 1), then
   ``p = exp(scale * q . K1[c] - lse2)`` over visible fine kernels (pass 2): the coarse-LSE
   approximation, so ``p`` is not a normalised softmax. Invisible kernels score 0; a token with no
   visible coarse kernel scores 0 everywhere (the official kernel produces NaN/inf there and the
   wrapper zeroes it).
3. ``S = sum over the G query heads of the KV group`` (the paper and the kernel sum; the MiniCPM4
   report says "average", which ranks identically).
4. Block scores: max-pool with kernel ``r + 1``, stride ``r = block_size // kernel_stride``, padding 1
   (fine kernels ``r*j - 1 .. r*j + r - 1`` for block ``j``); zero entries of invisible kernels take
   part in the max, so future blocks score 0 and blocks without any kernel score -inf.
5. Forcing to +inf: blocks ``j < init_blocks`` and the local blocks ``b(t) - local_blocks <= j <= b(t)``
   (33 with the shipped config; the paper's text says 32 -- we follow the code).
6. ``top_k(min(num_selected, nb))``, sorted ascending, ids ``> b(t)`` replaced by -1, padded with -1
   to ``num_selected`` slots.

Scores are kept in float32 (the official kernel rounds them to bf16 before pooling; SPEC.md §13.4
calls fp32 a legitimate alternative that can change selections among near-ties). ``lax.top_k``
breaks ties towards the lower block id. No gradient flows through selection.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from infllm_jax.config import SparseConfig
from infllm_jax.ops._checks import check_qk
from infllm_jax.ops.compression import compress_keys

__all__ = [
    "block_scores",
    "num_blocks",
    "select_blocks_reference",
    "stage1_scores",
]

_HIGHEST = lax.Precision.HIGHEST
# Elements of the largest per-chunk intermediate ([B, Hkv, C, G, n1] fp32) when the caller does
# not pick a chunk: 2**24 floats = 64 MiB, which keeps 32K tokens comfortable on a laptop CPU.
_CHUNK_BUDGET = 1 << 24


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of key blocks, ``ceil(seq_len / block_size)``."""
    return -(-seq_len // block_size)


def _compressed(k: jax.Array, cfg: SparseConfig) -> tuple[jax.Array, jax.Array]:
    k32 = k.astype(jnp.float32)
    k1 = compress_keys(k32, cfg.kernel_size, cfg.kernel_stride)  # [B, n1, Hkv, D]
    k2 = compress_keys(k32, cfg.coarse_kernel_size, cfg.coarse_kernel_stride)  # [B, n2, Hkv, D]
    return k1, k2


def _stage1_chunk(q_c, t_c, k1, k2, cfg: SparseConfig):
    """Group-summed stage-1 scores of a chunk of tokens.

    Args:
      q_c: ``[B, C, Hkv, G, D]`` float32 queries of the chunk.
      t_c: ``[C]`` int32 token positions of the chunk.
      k1, k2: ``[B, n1, Hkv, D]`` and ``[B, n2, Hkv, D]`` float32 compressed keys.

    Returns:
      ``[B, Hkv, C, n1]`` float32 scores ``S``.
    """
    scale = q_c.shape[-1] ** -0.5
    n1, n2 = k1.shape[1], k2.shape[1]
    vis2 = jnp.arange(n2)[None, :] * cfg.coarse_kernel_stride + cfg.coarse_kernel_size <= t_c[:, None] + 1
    vis1 = jnp.arange(n1)[None, :] * cfg.kernel_stride + cfg.kernel_size <= t_c[:, None] + 1  # [C, n1]
    logits2 = jnp.einsum("bchgd,bnhd->bhcgn", q_c, k2, precision=_HIGHEST) * scale
    logits2 = jnp.where(vis2[None, None, :, None, :], logits2, -jnp.inf)
    lse2 = jax.nn.logsumexp(logits2, axis=-1)  # [B, Hkv, C, G]; -inf when nothing is visible
    logits1 = jnp.einsum("bchgd,bnhd->bhcgn", q_c, k1, precision=_HIGHEST) * scale
    has_coarse = jnp.isfinite(lse2)[..., None]
    safe_lse2 = jnp.where(has_coarse, lse2[..., None], 0.0)
    p = jnp.where(vis1[None, None, :, None, :] & has_coarse, jnp.exp(logits1 - safe_lse2), 0.0)
    return p.sum(axis=3)


def _pool_and_force(s, t_c, nb: int, cfg: SparseConfig):
    """Max-pools ``S [B, Hkv, C, n1]`` into block scores ``[B, Hkv, C, nb]`` and forces init/local."""
    r = cfg.pool_stride
    n1 = s.shape[-1]
    # padded[x] = S[x - 1] for 1 <= x <= n1, else -inf; block j = max(padded[r*j : r*j + r + 1]).
    padded = jnp.full((*s.shape[:-1], r * nb + 1), -jnp.inf, jnp.float32)
    padded = padded.at[..., 1 : n1 + 1].set(s)  # n1 <= r * nb always
    body = padded[..., : r * nb].reshape(*s.shape[:-1], nb, r).max(axis=-1)
    blk = jnp.maximum(body, padded[..., r : r * nb + 1 : r])
    j = jnp.arange(nb)[None, :]
    q_block = (t_c // cfg.block_size)[:, None]  # [C, 1]
    forced = (j < cfg.init_blocks) | ((j >= q_block - cfg.local_blocks) & (j <= q_block))  # [C, nb]
    return jnp.where(forced[None, None], jnp.inf, blk)


def _top_blocks(blk, t_c, cfg: SparseConfig):
    """Top-k of block scores ``[B, Hkv, C, nb]`` -> sorted, -1-padded ids ``[B, Hkv, C, num_selected]``."""
    nb = blk.shape[-1]
    k_sel = min(cfg.num_selected, nb)
    _, idx = lax.top_k(blk, k_sel)
    idx = jnp.sort(idx.astype(jnp.int32), axis=-1)
    q_block = (t_c // cfg.block_size)[None, None, :, None]
    idx = jnp.where(idx > q_block, -1, idx)
    pad = cfg.num_selected - k_sel
    if pad:
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=-1)
    return idx


def _default_chunk(b: int, hq: int, n1: int, t: int) -> int:
    per_token = max(1, b * hq * max(n1, 1))
    chunk = max(16, _CHUNK_BUDGET // per_token)
    chunk = 1 << (chunk.bit_length() - 1)  # a power of two, so chunk grids stay regular
    return min(chunk, 1 << (t - 1).bit_length())


def stage1_scores(q: jax.Array, k: jax.Array, cfg: SparseConfig) -> jax.Array:
    """Group-summed stage-1 scores for every token, materialised (small inputs and tests only).

    Args:
      q: ``[B, T, Hq, D]`` queries (head ``h = kv * G + g``).
      k: ``[B, T, Hkv, D]`` keys.
      cfg: sparse configuration.

    Returns:
      ``[B, Hkv, T, n1]`` float32 scores ``S`` over the fine compressed keys.
    """
    b, t, hq, hkv, d = check_qk(q, k)
    k1, k2 = _compressed(k, cfg)
    q_c = q.astype(jnp.float32).reshape(b, t, hkv, hq // hkv, d)
    return _stage1_chunk(q_c, jnp.arange(t), k1, k2, cfg)


def block_scores(q: jax.Array, k: jax.Array, cfg: SparseConfig) -> jax.Array:
    """Pooled and forced block scores for every token (small inputs and tests only).

    Returns:
      ``[B, Hkv, T, nb]`` float32, ``nb = ceil(T / block_size)``; forced blocks are ``+inf``.
    """
    s = stage1_scores(q, k, cfg)
    t = q.shape[1]
    return _pool_and_force(s, jnp.arange(t), num_blocks(t, cfg.block_size), cfg)


@functools.partial(jax.jit, static_argnames=("cfg", "query_chunk"))
def select_blocks_reference(
    q: jax.Array,
    k: jax.Array,
    cfg: SparseConfig,
    *,
    query_chunk: int | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Reference block selection, chunked over query tokens so memory stays bounded.

    Args:
      q: ``[B, T, Hq, D]`` queries.
      k: ``[B, T, Hkv, D]`` keys.
      cfg: sparse configuration.
      query_chunk: tokens scored at once (default: sized so the largest intermediate is ~64 MiB).
      q_offset: position of ``q[:, 0]`` among the keys, when ``q`` holds only the contiguous slice
        ``[q_offset, q_offset + Tq)`` of the key positions (context parallelism); may be traced.

    Returns:
      int32 ``[B, Hkv, Tq, cfg.num_selected]``: per token and KV head, selected block ids in
      ascending order, ``-1`` in unused slots; never a block after the token's own.
    """
    b, t, hq, hkv, d = check_qk(q, k, shorter_q=True)
    g = hq // hkv
    q = lax.stop_gradient(q)
    k1, k2 = _compressed(lax.stop_gradient(k), cfg)
    nb = num_blocks(k.shape[1], cfg.block_size)
    chunk = query_chunk or _default_chunk(b, hq, k1.shape[1], t)
    n_chunks = -(-t // chunk)
    q_c = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, n_chunks * chunk - t), (0, 0), (0, 0)))
    q_c = q_c.reshape(b, n_chunks, chunk, hkv, g, d).swapaxes(0, 1)  # [n_chunks, B, C, Hkv, G, D]

    def one_chunk(args):
        q_chunk, start = args
        t_c = start + jnp.arange(chunk)
        s = _stage1_chunk(q_chunk, t_c, k1, k2, cfg)
        return _top_blocks(_pool_and_force(s, t_c, nb, cfg), t_c, cfg)

    starts = q_offset + jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    idx = lax.map(one_chunk, (q_c, starts))  # [n_chunks, B, Hkv, C, K]
    idx = idx.transpose(1, 2, 0, 3, 4).reshape(b, hkv, n_chunks * chunk, cfg.num_selected)
    return idx[:, :, :t]
