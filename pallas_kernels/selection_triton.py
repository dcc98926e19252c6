"""Stage-1 scoring of the block selection as a Triton kernel (any CUDA GPU; interpret mode on CPU).

The scoring half of ``selection``'s pipeline where the Mosaic GPU kernel (``selection_mgpu``, Hopper)
does not apply: for ``tq`` tokens x the group's heads of one KV head per program it computes the
coarse log-sum-exp, the fine scores ``p``, their group sum and each block's pooled maximum, and writes
``body`` / ``halo`` for the top-k kernel (``selection`` describes both outputs). The per-token score
matrix never leaves the program.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import pl, pltriton, triton_params
from pallas_kernels.selection_mgpu import HALO_SHIFT, visible_kernels

__all__ = ["score_tiles_triton"]


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


def _dot(a, b, exact: bool):
    """``a [M, K] @ b [K, N]`` with float32 accumulation (IEEE float32 products when ``exact``)."""
    return lax.dot_general(
        a,
        b,
        (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST if exact else None,
        preferred_element_type=jnp.float32,
    )


def _score_kernel(
    pos_ref,
    q_ref,
    k1_ref,
    k2_ref,
    body_ref,
    halo_ref,
    *,
    tq: int,
    g: int,
    gp: int,
    n1: int,
    n2: int,
    stride: int,
    pool: int,
    block_k1: int,
    block_k2: int,
    qk_scale: float,
    exact: bool,
    group_sum: str,
):
    """Pooled stage-1 scores of ``tq`` tokens of one KV group.

    Scores are computed transposed, ``[keys, rows]`` (``k @ q.T``), so that ``p`` can feed the
    group-sum dot as its left operand straight from registers, as P does in flash attention.

    Refs (leading batch / KV-head dims squeezed):
      pos_ref: ``[2]`` int32: key position of the chunk's first query, and of the last query.
      q_ref: ``[tq * gp, Dp]`` queries, row ``t * gp + g``.
      k1_ref, k2_ref: ``[n1_pad, Dp]`` / ``[n2_pad, Dp]`` fine / coarse keys (zero rows past n1 / n2).
      body_ref: ``[tq, width]`` float32 out: column ``j`` holds the max of ``S`` over kernels
        ``pool*j .. pool*j + pool - 1`` (``width = nb_pad + 32``; the last column is spare).
      halo_ref: ``[tq, width]`` float32 out: column ``j + HALO_SHIFT`` holds ``S[pool*j + pool - 1]``.
    Columns of blocks no token of the program can see are left unwritten.
    """
    rows = tq * gp
    nbt = block_k1 // pool  # blocks per fine-key tile
    size1, size2, stride2 = 2 * stride, 8 * stride, 4 * stride  # kernel sizes are 2x the strides
    tile_first = pos_ref[0] + pl.program_id(0) * tq
    # Rows past the queries (padding of the last chunk) repeat the last query; they are discarded.
    t_first = jnp.minimum(tile_first, pos_ref[1])
    t_last = jnp.minimum(tile_first + tq - 1, pos_ref[1])
    col = lax.broadcasted_iota(jnp.int32, (1, rows), 1)
    t_col = jnp.minimum(tile_first + lax.div(col, gp), pos_ref[1])  # [1, rows]
    q_t = q_ref[...].T  # [Dp, rows], transposed once

    # Pass 1: lse2 over the visible coarse keys. Tiles every token of the program sees need no mask.
    def coarse_step(j, carry, masked):
        m, l = carry
        s = _dot(k2_ref[pl.ds(j * block_k2, block_k2), :], q_t, exact) * qk_scale  # [block_k2, rows], base 2
        if masked:
            c2 = j * block_k2 + lax.broadcasted_iota(jnp.int32, (block_k2, 1), 0)
            s = jnp.where(c2 * stride2 + size2 <= t_col + 1, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=0, keepdims=True))
        # Columns that have seen no visible key yet keep m = -inf; shift by 0 there to avoid inf - inf.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        l = l * jnp.exp2(m - m_safe) + jnp.sum(jnp.exp2(s - m_safe), axis=0, keepdims=True)
        return m_new, l

    carry = (jnp.full((1, rows), -jnp.inf, jnp.float32), jnp.zeros((1, rows), jnp.float32))
    n_all = lax.div(visible_kernels(t_first, size2, stride2, n2), block_k2)
    carry = lax.fori_loop(0, n_all, functools.partial(coarse_step, masked=False), carry)
    n_any = _cdiv(visible_kernels(t_last, size2, stride2, n2), block_k2)
    m, l = lax.fori_loop(n_all, n_any, functools.partial(coarse_step, masked=True), carry)
    # A token with no visible coarse kernel scores 0 everywhere (the official wrapper zeroes its NaNs),
    # and padded group rows (g >= G) never count: lse = +inf makes their p exactly 0 without a mask.
    ok = (l > 0.0) & (lax.rem(col, gp) < g)
    lse = jnp.where(ok, m + jnp.log2(jnp.where(ok, l, 1.0)), jnp.inf)  # [1, rows]

    # Pass 2: p over the visible fine keys, summed over the group, pooled per block.
    if group_sum == "mma" and gp > 1:
        tok_p = max(tq, 16)  # MMA N >= 16; token columns >= tq stay 0 and are not stored
        member = lax.div(lax.broadcasted_iota(jnp.int32, (rows, tok_p), 0), gp)
        sum_dtype = jnp.float32 if exact else jnp.bfloat16
        summation = (member == lax.broadcasted_iota(jnp.int32, (rows, tok_p), 1)).astype(sum_dtype)
    else:
        tok_p = tq
    lane = lax.broadcasted_iota(jnp.int32, (nbt, pool, tok_p), 1)
    tok = lax.broadcasted_iota(jnp.int32, (nbt, tok_p), 1)
    tok_ok = tok < tq
    # Masked lanes (token columns >= tq) address the spare last column. Compiled, they write nothing;
    # the interpreter writes back the value it read, which must not collide with a real write.
    tok = jnp.minimum(tok, tq - 1)
    spare = body_ref.shape[-1] - 1

    def fine_step(jt, carry, masked):
        s = _dot(k1_ref[pl.ds(jt * block_k1, block_k1), :], q_t, exact) * qk_scale  # [block_k1, rows]
        p = jnp.exp2(s - lse)
        if masked:
            c = jt * block_k1 + lax.broadcasted_iota(jnp.int32, (block_k1, 1), 0)
            p = jnp.where(c * stride + size1 <= t_col + 1, p, 0.0)
        if gp == 1:
            s_tok = p
        elif group_sum == "mma":
            # bf16 p (as flash attention's P) into a 0/1 [rows, tokens] matrix: the MMA sums the group.
            s_tok = _dot(p.astype(sum_dtype), summation, exact)
        else:
            s_tok = p.reshape(block_k1, tq, gp).sum(axis=2)  # exact float32 sum
        groups = s_tok.reshape(nbt, pool, tok_p)  # [blocks, kernels of the block, tokens]
        # S >= 0, so masking the other lanes with 0 extracts each block's last kernel exactly.
        last = jnp.max(jnp.where(lane == pool - 1, groups, 0.0), axis=1)
        blk = jt * nbt + lax.broadcasted_iota(jnp.int32, (nbt, tok_p), 0)
        pltriton.store(body_ref.at[tok, jnp.where(tok_ok, blk, spare)], jnp.max(groups, axis=1), mask=tok_ok)
        pltriton.store(halo_ref.at[tok, jnp.where(tok_ok, blk + HALO_SHIFT, spare)], last, mask=tok_ok)
        return carry

    n_all = lax.div(visible_kernels(t_first, size1, stride, n1), block_k1)
    lax.fori_loop(0, n_all, functools.partial(fine_step, masked=False), 0)
    n_any = _cdiv(visible_kernels(t_last, size1, stride, n1), block_k1)
    lax.fori_loop(n_all, n_any, functools.partial(fine_step, masked=True), 0)


def score_tiles_triton(
    *,
    tq,
    g,
    gp,
    dp,
    n1,
    n2,
    stride,
    pool,
    qk_scale,
    exact,
    shapes,
    block_k1,
    block_k2,
    group_sum,
    warps,
    stages,
    interpret,
):
    """The Triton ``_score_kernel`` over one chunk, as a function ``(pos, q rows, k1, k2) -> (body, halo)``.

    ``shapes`` is ``(B, Hkv, C, width, n1_pad, n2_pad)``; ``warps`` and ``stages`` are the Triton launch
    parameters; the other arguments as in ``_score_kernel``.
    """
    b, hkv, chunk, width, n1_pad, n2_pad = shapes
    out = jax.ShapeDtypeStruct((b, hkv, chunk, width), jnp.float32)
    out_spec = pl.BlockSpec((None, None, tq, width), lambda i, bi, h: (bi, h, i, 0))
    return pl.pallas_call(
        functools.partial(
            _score_kernel,
            tq=tq,
            g=g,
            gp=gp,
            n1=n1,
            n2=n2,
            stride=stride,
            pool=pool,
            block_k1=block_k1,
            block_k2=block_k2,
            qk_scale=qk_scale,
            exact=exact,
            group_sum=group_sum,
        ),
        grid=(chunk // tq, b, hkv),
        in_specs=[
            pl.BlockSpec((2,), lambda i, bi, h: (0,)),
            pl.BlockSpec((None, None, tq * gp, dp), lambda i, bi, h: (bi, h, i, 0)),
            pl.BlockSpec((None, None, n1_pad, dp), lambda i, bi, h: (bi, h, 0, 0)),
            pl.BlockSpec((None, None, n2_pad, dp), lambda i, bi, h: (bi, h, 0, 0)),
        ],
        out_specs=[out_spec, out_spec],
        out_shape=[out, out],
        compiler_params=triton_params(warps, stages),
        interpret=interpret,
        name="infllmv2_select_scores",
    )
