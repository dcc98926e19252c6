"""Diagnostic: do WGMMAs and exponentials of different warpgroups overlap on a Hopper SM?

Both big Mosaic kernels show tensor-pipe and XU-pipe use that add up to ~100% (session 12's Nsight
Compute profile: scoring 51% + 51%, forward tile 65% + 34%), and every schedule meant to overlap the
two (FlashAttention-3's ping-pong, the stagger, an intra-warpgroup pipeline) was no faster. This
script asks the hardware with a synthetic kernel instead: one CTA per SM, two to four warpgroups, each
given a role that it repeats ``--iters`` times:

- ``mma``: a ``64 x 128 x 128`` bf16 WGMMA with both operands in SMEM (the scoring kernel's fine
  step), waited for, then added into a float32 register array (64 ``FADD`` per thread);
- ``exp``: ``x = exp2(-2 x)`` on a ``[64, 128]`` float32 register array (8,192 ``ex2.approx.ftz.f32``);
- ``exp16``: the same in float16 pairs (``ex2.approx.f16x2``: 4,096 packed ops for 8,192 results);
- ``step``: ``mma``, then the exponentials of its result added into the register array (one
  warpgroup's scoring step without the group sum);
- ``pstep``: ``step`` pipelined inside the warpgroup: each iteration issues its WGMMA, then computes
  the previous iteration's exponentials while it runs (a second accumulator's worth of registers);
- ``fa``: one warpgroup's attention step as the forward tile kernel runs it: ``S = A B^T`` (``mma``),
  the online softmax (row maximum, ``exp2``, row sum, rescale), ``O += P V`` with ``P`` in bf16 from
  registers and ``V = B``;
- ``coarse``: the scoring kernel's coarse step: ``S = A B^T``, then the row maxima and the online
  log-sum-exp's exponentials and row sums;
- ``fine``: the scoring kernel's fine step: ``S = A B^T``, ``exp2(S - lse)`` with a per-column ``lse``,
  and the group sum of the 16 eight-column slices (``[64, 8]`` sums per step, added up);
- ``tok``: one token's attention step over one 64-key block with the *keys* as the WGMMA rows (a
  design for blocks only one token of a tile selected, which the forward now sends to a Triton kernel
  with 16 query rows): ``S^T = K Q^T`` (``64 x 16 x 128``, ``K = A``, the 16 heads of one token =
  the first 16 rows of ``B``), the online softmax down the columns (a cross-warp column maximum),
  ``P^T`` to SMEM in bf16, and ``O^T += V^T P^T`` as two ``64 x 16 x 64`` WGMMAs (``V = A``);
- ``tokfix``: ``tok`` with a fixed per-column reference instead of the running maximum (no cross-warp
  reduction: the lower bound of what such a step can cost);
- ``idle``;
- ``mem``: idle after giving up its registers (``setmaxnreg`` down to 24), as a memory warpgroup does;
  with one in the combination every other warpgroup raises its budget to an equal share of the rest
  (``compute_registers``), as the kernels' compute warpgroups do: ``fa+fa+fa+mem`` is the forward's step
  in a kernel of 3 compute warpgroups and a memory one, under the registers such a kernel would have.

Each role alone needs ~512 cycles per iteration at the datasheet rates (2.1 MFLOP at 4,096 dense bf16
FLOP per cycle and SM; 8,192 ``exp2`` at 16 per cycle and SM). If the pipes overlap, ``mma + exp``
takes about as long as the slower of ``mma + idle`` and ``idle + exp``; if they exclude each other,
about the sum. ``overlap`` in the table is ``(t_a + t_b - t_ab) / min(t_a, t_b)``: 1 for full
overlap, 0 for none. Times are the kernel's device time from a profiler trace.

Every run checks each role's output against numpy (``max_rel_error`` in the results; the CPU test
does the same in interpret mode), so the loops time real work.

Usage (GPU)::

    PYTHONPATH=experiments:. python3 experiments/pipe_overlap.py --out experiments/results
"""

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_attention import kernel_times, write_report
from jax import lax
from jax.experimental.mosaic import gpu as mgpu

from pallas_kernels._compat import SWIZZLED_128B, pl, plgpu
from pallas_kernels.tiling import persistent_ctas

ROWS, COLS, DEPTH = 64, 128, 128  # the WGMMA: [ROWS, DEPTH] x [COLS, DEPTH]^T
ROLES = ("idle", "mma", "exp", "exp16", "step", "pstep", "fa", "coarse", "fine", "tok", "tokfix", "mem")
# The roles of warpgroups 0, 1, ... of the combinations timed by default.
COMBOS = (
    ("mma", "idle"),
    ("idle", "exp"),
    ("mma", "exp"),
    ("mma", "mma"),
    ("exp", "exp"),
    ("idle", "exp16"),
    ("mma", "exp16"),
    ("step", "idle"),
    ("step", "step"),
    ("mma", "mma", "mma"),
    ("step", "step", "step"),
    ("pstep", "idle"),
    ("pstep", "pstep"),
    ("fa", "idle"),
    ("fa", "fa"),
    ("fa", "fa", "fa"),
    ("coarse", "coarse"),
    ("fine", "fine"),
    ("fine", "fine", "fine"),
    ("tok", "idle"),
    ("tok", "tok"),
    ("tok", "tok", "tok"),
    ("tokfix", "tokfix"),
    ("tokfix", "tokfix", "tokfix"),
)
MAX_WARPGROUPS = 4
# Registers per SM and warpgroup size; what a mem warpgroup keeps (setmaxnreg's minimum).
_SM_REGISTERS, _WG_THREADS, MEMORY_REGISTERS = 65536, 128, 24
# Overlap rows: (pair, the two pairs whose times add up to "no overlap").
OVERLAPS = (
    (("mma", "exp"), ("mma", "idle"), ("idle", "exp")),
    (("mma", "exp16"), ("mma", "idle"), ("idle", "exp16")),
    (("step", "step"), ("step", "idle"), ("step", "idle")),
)
# Scale of the step role's scores: keeps exp2 of them near 1 for the inputs below.
_STEP_SCALE = 0.25
# The fine role: columns 8 h + t as in the scoring kernel (head h, token t), an lse per column.
_SLICE, _FINE_LSE_STEP = 8, 0.125
# The tok roles: one token's 16 heads (the first rows of B), their output O^T [128, 16] in columns
# 0:16 (rows 0-63) and 16:32 (rows 64-127) of the register array, the softmax's per-key sums in 32:48.
_TOK_HEADS = 16
# The exp roles iterate x -> 2^(-2 x) from 0.1: it oscillates towards 0.5 slowly (a factor ~0.69 per
# iteration), so every iteration changes the result (which the CPU test checks) and nothing overflows.
_EXP_FACTOR, _EXP_START = -2.0, 0.1
# A run whose roles compute values this far from numpy's times the wrong work and stops: rounding stays
# near 1e-4 on the H200, dropped or wrong work is off by far more (single missing iterations are the CPU
# test's to catch, at a few iterations).
_MAX_REL_ERROR = 1e-3
# SMEM per CTA at least (operands, output staging, padding): two CTAs never share an SM.
_SMEM_MIN = 120 * 1024


def _exp2_f16x2(x, *, interpret: bool):
    """``2^x`` of a float16 ``[64, 128]`` WGMMA-layout array: one ``ex2.approx.f16x2`` per register
    pair (the interpreter cannot run ``inline_mgpu``: there, ``exp2`` in float32 rounded to float16)."""
    if interpret:
        return jnp.exp2(x.astype(jnp.float32)).astype(jnp.float16)
    layout = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(
        arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float16, layout=layout)
    )
    def ex2(_, a):
        return a._pointwise(
            mgpu.FragmentedArray._lift_fast_packed_instr("ex2.approx.f16x2", "ex2.approx.f16")
        )

    return ex2(x)


def _run_role(role: str, a_smem, b_smem, p_smem, iters: int, interpret: bool):
    """The role's loop; returns its final ``[64, 128]`` float32 register array (zeros when idle).
    ``p_smem``: this warpgroup's ``[64, 128]`` bf16 staging of ``P`` for the interpreter, which takes
    SMEM operands only."""
    layout = plgpu.Layout.WGMMA

    def full(value, dtype=jnp.float32):
        return plgpu.layout_cast(jnp.full((ROWS, COLS), value, dtype), layout)

    def mma():
        def issue(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, b_smem.T)
            return acc_ref[...]

        return pl.run_scoped(issue, plgpu.ACC((ROWS, COLS), jnp.float32))

    if role == "idle":
        return full(0.0)
    if role == "mma":
        return lax.fori_loop(0, iters, lambda i, acc: acc + mma(), full(0.0))
    if role == "exp":
        return lax.fori_loop(0, iters, lambda i, x: jnp.exp2(x * _EXP_FACTOR), full(_EXP_START))
    if role == "exp16":
        factor = jnp.float16(_EXP_FACTOR)
        x = lax.fori_loop(
            0,
            iters,
            lambda i, x: _exp2_f16x2(x * factor, interpret=interpret),
            full(_EXP_START, jnp.float16),
        )
        return x.astype(jnp.float32)
    if role == "step":
        return lax.fori_loop(0, iters, lambda i, acc: acc + jnp.exp2(mma() * _STEP_SCALE), full(0.0))
    if role == "pstep":

        def pipelined(i, carry):
            total, previous = carry

            def issue(acc_ref):
                plgpu.wgmma(acc_ref, a_smem, b_smem.T)
                # The previous iteration's exponentials while this WGMMA runs; reading the
                # accumulator afterwards waits for it.
                return total + jnp.exp2(previous * _STEP_SCALE), acc_ref[...]

            return pl.run_scoped(issue, plgpu.ACC((ROWS, COLS), jnp.float32))

        # The first iteration adds 2^0 = 1 for the "previous" zeros: start the sum at -1.
        total, last = lax.fori_loop(0, iters, pipelined, (full(-1.0), full(0.0)))
        return total + jnp.exp2(last * _STEP_SCALE)
    if role == "fa":
        row_layout = layout.reduce(1)

        def attend(i, carry):
            o, m, l = carry
            s = mma() * _STEP_SCALE
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            alpha = jnp.exp2(m - m_new)
            p16 = p.astype(jnp.bfloat16)
            if interpret:
                p_smem[...] = p16
                plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem if interpret else p16, b_smem)
                return acc_ref[...]

            pv_out = pl.run_scoped(pv, plgpu.ACC((ROWS, DEPTH), jnp.float32))
            o = o * lax.broadcast_in_dim(alpha, o.shape, [0]) + pv_out
            return o, m_new, l * alpha + p.sum(axis=1)

        m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout)
        l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
        o, _, l = lax.fori_loop(0, iters, attend, (full(0.0), m0, l0))
        return o + lax.broadcast_in_dim(l, o.shape, [0])
    if role == "coarse":
        row_layout = layout.reduce(1)

        def online_lse(i, carry):
            m, l = carry
            s = mma() * _STEP_SCALE
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            return m_new, l * jnp.exp2(m - m_new) + p.sum(axis=1)

        m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_layout)
        l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row_layout)
        m, l = lax.fori_loop(0, iters, online_lse, (m0, l0))
        return lax.broadcast_in_dim(m + jnp.log2(l), (ROWS, COLS), [0])
    if role == "fine":
        col = plgpu.broadcasted_iota(jnp.int32, (ROWS, COLS), 1, layout=layout)
        lse = (col % _SLICE).astype(jnp.float32) * _FINE_LSE_STEP

        def group_sum(i, total):
            x = mma() * _STEP_SCALE - lse
            slices = [jnp.exp2(x[:, g * _SLICE : (g + 1) * _SLICE]) for g in range(COLS // _SLICE)]
            return total + functools.reduce(jnp.add, slices)

        zeros = plgpu.layout_cast(jnp.zeros((ROWS, _SLICE), jnp.float32), layout)
        total = lax.fori_loop(0, iters, group_sum, zeros)
        return jnp.concatenate([total] * (COLS // _SLICE), axis=1)
    if role in ("tok", "tokfix"):
        return _token_step_role(role, a_smem, b_smem, p_smem, iters)
    raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")


# The fixed per-column reference of the tokfix role (log2 units, near the scores' maxima).
_TOK_REFERENCE = 0.5


def _token_step_role(role: str, a_smem, b_smem, p_smem, iters: int):
    """The ``tok`` / ``tokfix`` loop: keys ``K = V = A`` ([64 keys, 128]), one token's queries ``Q =
    B[:16]``; ``P^T`` staged in ``p_smem[:16, :64]``. Returns ``[O^T[:64], O^T[64:], L, 0]`` as a
    ``[64, 128]`` array, ``L`` the per-key partial sums of the softmax denominators (each thread's share,
    not summed down the keys).

    ``tok``'s column maximum reduces across the 4 warps through Pallas's reduction scratch, which
    every warpgroup of the kernel shares (jax 0.11.2). That is harmless here only because all
    warpgroups reduce the same values in every iteration; a sum at the end through the same scratch
    (while another warpgroup still took maxima) computed wrong values with three warpgroups on the
    H200, hence ``L`` unsummed. A real kernel would need one scratch per warpgroup."""
    layout = plgpu.Layout.WGMMA
    col_layout = layout.reduce(0)
    shape = (ROWS, _TOK_HEADS)
    q_token = b_smem.at[pl.ds(0, _TOK_HEADS)]
    p_staging = p_smem.at[pl.ds(0, _TOK_HEADS), pl.ds(0, ROWS)]  # [16 heads, 64 keys]: B = its .T

    def product(a, b):
        def issue(acc_ref):
            plgpu.wgmma(acc_ref, a, b)
            return acc_ref[...]

        return pl.run_scoped(issue, plgpu.ACC(shape, jnp.float32))

    def columns(x):
        return lax.broadcast_in_dim(x, shape, [1])

    def attend(i, carry):
        o_lo, o_hi, m, l_part = carry
        s = product(a_smem, q_token.T) * _STEP_SCALE  # S^T [64 keys, 16 heads]
        if role == "tok":
            m_new = jnp.maximum(m, s.max(axis=0))  # down the keys: across the 4 warps
            alpha = columns(jnp.exp2(m - m_new))
        else:
            m_new, alpha = m, None
        p = jnp.exp2(s - columns(m_new))
        p_staging.T[...] = plgpu.layout_cast(p.astype(jnp.bfloat16), plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()
        # O^T [128, 16] += V^T [128, 64 keys] P^T [64 keys, 16]: V^T's two 64-row halves are the
        # transposed 64-column halves of A.
        pv_lo = product(a_smem.at[:, pl.ds(0, 64)].T, p_staging.T)
        pv_hi = product(a_smem.at[:, pl.ds(64, 64)].T, p_staging.T)
        if alpha is None:
            return o_lo + pv_lo, o_hi + pv_hi, m_new, l_part + p
        return o_lo * alpha + pv_lo, o_hi * alpha + pv_hi, m_new, l_part * alpha + p

    zeros = plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout)
    m_init = -jnp.inf if role == "tok" else _TOK_REFERENCE
    m0 = plgpu.layout_cast(jnp.full((_TOK_HEADS,), m_init, jnp.float32), col_layout)
    o_lo, o_hi, _, l_part = lax.fori_loop(0, iters, attend, (zeros, zeros, m0, zeros))
    filler = plgpu.layout_cast(jnp.zeros((ROWS, COLS - 3 * _TOK_HEADS), jnp.float32), layout)
    return jnp.concatenate([o_lo, o_hi, l_part, filler], axis=1)


def compute_registers(roles: tuple[str, ...]) -> int | None:
    """Per-thread register budget of the non-``mem`` warpgroups of a combination with ``mem`` ones: an
    equal share of what the ``mem`` warpgroups give up, a multiple of 8, at most 256 (``None`` without
    ``mem``: no warpgroup changes its budget)."""
    n_mem = roles.count("mem")
    if n_mem == 0 or n_mem == len(roles):
        return None
    per_thread = _SM_REGISTERS // _WG_THREADS - n_mem * MEMORY_REGISTERS
    return min(per_thread // (len(roles) - n_mem) // 8 * 8, 256)


def overlap_kernel(roles: tuple[str, ...], iters: int, n_ctas: int, *, interpret: bool = False):
    """``(a [64, 128], b [128, 128]) bf16 -> out [n_ctas, W, 64, 128] float32``: warpgroup ``w < W`` of
    every CTA runs ``roles[w]`` for ``iters`` iterations on ``a @ b.T`` and writes its register array."""
    if not 1 <= len(roles) <= MAX_WARPGROUPS:
        raise ValueError(f"1 to {MAX_WARPGROUPS} warpgroups, got roles {roles}")
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    if iters < 1 or n_ctas < 1:
        raise ValueError(f"iters and n_ctas must be >= 1, got {iters}, {n_ctas}")

    staged = [w for w, role in enumerate(roles) if role != "mem"]  # warpgroups with output staging
    n_staged = max(len(staged), 1)

    def body(a_ref, b_ref, out_ref, a_smem, b_smem, out_smem, p_smem, _pad, bar):
        wg, cta = lax.axis_index("wg"), lax.axis_index("cta")

        @pl.when(wg == 0)
        def _():
            plgpu.copy_gmem_to_smem(a_ref, a_smem, bar)
            plgpu.copy_gmem_to_smem(b_ref, b_smem, bar)

        plgpu.barrier_wait(bar)
        budget = compute_registers(roles)
        for w, role in enumerate(roles):

            @pl.when(wg == w)
            def _(w=w, role=role):
                if budget is not None:
                    if role == "mem":
                        plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
                    else:
                        plgpu.set_max_registers(budget, action="increase")
                if role == "mem":
                    return  # no staging (SMEM) and no output: check() skips it
                slot = staged.index(w)
                value = _run_role(role, a_smem, b_smem, p_smem.at[slot], iters, interpret)
                out_smem.at[slot][...] = value
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[slot], out_ref.at[cta, w])
                plgpu.wait_smem_to_gmem(0)

    n_wg = len(roles)
    used = 2 * (ROWS + COLS) * DEPTH + 4 * n_staged * ROWS * COLS + 2 * n_staged * ROWS * COLS
    scratch = (
        plgpu.SMEM((ROWS, DEPTH), jnp.bfloat16, transforms=SWIZZLED_128B),
        plgpu.SMEM((COLS, DEPTH), jnp.bfloat16, transforms=SWIZZLED_128B),
        plgpu.SMEM((n_staged, ROWS, COLS), jnp.float32),
        plgpu.SMEM((n_staged, ROWS, COLS), jnp.bfloat16, transforms=SWIZZLED_128B),
        plgpu.SMEM((max(_SMEM_MIN - used, 4) // 4,), jnp.float32),
        plgpu.Barrier(num_arrivals=2),
    )

    # The profiler names the kernel after this function.
    def pipe_overlap(*refs):
        pl.run_scoped(lambda *allocs: body(*refs, *allocs), *scratch, collective_axes="wg")

    return plgpu.kernel(
        pipe_overlap,
        out_type=jax.ShapeDtypeStruct((n_ctas, n_wg, ROWS, COLS), jnp.float32),
        grid=(n_ctas,),
        grid_names=("cta",),
        num_threads=n_wg,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )


def expected(role: str, a: np.ndarray, b: np.ndarray, iters: int) -> np.ndarray:
    """numpy (float64) value of ``role``'s register array after ``iters`` iterations."""
    s = a.astype(np.float64) @ b.astype(np.float64).T
    if role == "idle":
        return np.zeros((ROWS, COLS))
    if role == "mma":
        return iters * s
    if role in ("exp", "exp16"):
        x = np.full((ROWS, COLS), _EXP_START)
        for _ in range(iters):
            x = np.exp2(_EXP_FACTOR * x)
        return x
    if role in ("step", "pstep"):
        return iters * np.exp2(s * _STEP_SCALE)
    if role == "fa":
        # Every iteration sees the same scores: after the first the maximum stays, so O and l grow by
        # the same amounts each time. P enters the second product rounded to bf16, as in the kernel.
        p = np.exp2(s * _STEP_SCALE - (s * _STEP_SCALE).max(axis=1, keepdims=True))
        p16 = np.asarray(jnp.asarray(p, jnp.float32).astype(jnp.bfloat16), np.float64)
        return iters * (p16 @ b + p.sum(axis=1, keepdims=True))
    if role == "coarse":
        x = s * _STEP_SCALE
        m = x.max(axis=1, keepdims=True)
        lse = m + np.log2(iters * np.exp2(x - m).sum(axis=1, keepdims=True))
        return np.broadcast_to(lse, (ROWS, COLS))
    if role in ("tok", "tokfix"):
        # Every iteration sees the same scores, as for fa: O^T and l grow by the same amounts.
        x = (a.astype(np.float64) @ b[:_TOK_HEADS].astype(np.float64).T) * _STEP_SCALE  # [64 keys, 16]
        reference = x.max(axis=0, keepdims=True) if role == "tok" else _TOK_REFERENCE
        p = np.exp2(x - reference)
        p16 = np.asarray(jnp.asarray(p, jnp.float32).astype(jnp.bfloat16), np.float64)
        o_t = iters * (a.astype(np.float64).T @ p16)  # [128, 16]
        filler = np.zeros((ROWS, COLS - 3 * _TOK_HEADS))
        return np.concatenate([o_t[:ROWS], o_t[ROWS:], iters * p, filler], axis=1)
    if role == "fine":
        lse = (np.arange(COLS) % _SLICE) * _FINE_LSE_STEP
        p = np.exp2(s * _STEP_SCALE - lse[None, :])
        sums = p.reshape(ROWS, COLS // _SLICE, _SLICE).sum(axis=1)
        return np.tile(iters * sums, (1, COLS // _SLICE))
    raise ValueError(role)


def operands(seed: int = 0):
    """Random bf16 operands whose products stay O(1)."""
    ka, kb = jax.random.split(jax.random.key(seed))
    a = (jax.random.normal(ka, (ROWS, DEPTH)) * 0.1).astype(jnp.bfloat16)
    b = (jax.random.normal(kb, (COLS, DEPTH)) * 0.1).astype(jnp.bfloat16)
    return a, b


def check(roles, out: np.ndarray, a, b, iters: int) -> float:
    """Largest relative error of the kernel's arrays (``out[:, w]``) against ``expected`` (``mem``
    warpgroups write nothing)."""
    worst = 0.0
    for w, role in enumerate(roles):
        if role == "mem":
            continue
        want = expected(role, np.asarray(a, np.float32), np.asarray(b, np.float32), iters)
        got = out[:, w].astype(np.float64)
        scale = max(np.abs(want).max(), 1e-30)
        worst = max(worst, float(np.abs(got - want[None]).max() / scale))
    return worst


def run(iters: int, waves: int, reps: int, combos=COMBOS) -> list[dict]:
    n_ctas = waves * persistent_ctas(interpret=False)  # SMs of the device
    a, b = operands()
    rows = []
    for roles in combos:
        fn = jax.jit(overlap_kernel(roles, iters, n_ctas))
        out = np.asarray(fn(a, b))
        error = check(roles, out, a, b, iters)
        if error > _MAX_REL_ERROR:
            raise RuntimeError(f"{'+'.join(roles)} computed the wrong values: relative error {error:.2e}")
        host = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn(a, b))
            host.append((time.perf_counter() - start) * 1e3)
        device = sum(kernel_times(fn, a, b, calls=3).values())
        row = {
            "roles": list(roles),
            "device_ms": round(device, 4),
            "host_median_ms": round(statistics.median(host), 4),
            "max_rel_error": error,
            "compute_registers": compute_registers(roles),
        }
        print(f"{' + '.join(roles):>22} {device:8.3f} ms  (rel. error {error:.1e})", flush=True)
        rows.append(row)
    return rows


def overlaps(rows: list[dict]) -> list[dict]:
    """The ``OVERLAPS`` rows: ``(t_a + t_b - t_ab) / min(t_a, t_b)`` from the rows' device times."""
    t = {tuple(r["roles"]): r["device_ms"] for r in rows}
    result = []
    for pair, first, second in OVERLAPS:
        if pair in t and first in t and second in t:
            ta, tb, tab = t[first], t[second], t[pair]
            result.append(
                {
                    "pair": "+".join(pair),
                    "alone_ms": [ta, tb],
                    "together_ms": tab,
                    "overlap": round((ta + tb - tab) / min(ta, tb), 3),
                }
            )
    return result


def plot(rows: list[dict], path: Path) -> None:
    """A bar of device time per combination of roles (written to ``path``)."""
    # Imported here: matplotlib is needed only for the figure.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [" + ".join(r["roles"]) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["device_ms"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(r["device_ms"], i, f" {r['device_ms']:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("kernel device time (ms)")
    ax.set_title("WGMMA and exp2 per warpgroup role (one CTA per SM)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_combo(text: str) -> tuple[str, ...]:
    """``"step+step+idle"`` -> ``("step", "step", "idle")`` (roles of warpgroups 0, 1, ...)."""
    roles = tuple(text.split("+"))
    if not 1 <= len(roles) <= MAX_WARPGROUPS or any(role not in ROLES for role in roles):
        raise argparse.ArgumentTypeError(f"{text!r}: 1 to {MAX_WARPGROUPS} of {ROLES} joined by '+'")
    return roles


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=8192, help="iterations of each role per CTA")
    parser.add_argument("--waves", type=int, default=2, help="CTAs per SM, one at a time")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument(
        "--combos", nargs="+", type=parse_combo, default=list(COMBOS), help="e.g. mma+exp step+step+step"
    )
    parser.add_argument("--name", default="pipe_overlap_h200", help="results file name (.json added)")
    parser.add_argument(
        "--replot", type=Path, help="redraw the figure of a results file (next to it) and exit; no GPU needed"
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return
    if jax.devices()[0].platform != "gpu":
        sys.exit("pipe_overlap.py times WGMMA and exp2 on a Hopper GPU: it needs one")
    rows = run(args.iters, args.waves, args.reps, args.combos)
    summary = overlaps(rows)
    for s in summary:
        alone, together = s["alone_ms"], s["together_ms"]
        print(f"overlap {s['pair']:>11}: alone {alone} ms, together {together} ms -> {s['overlap']}")
    body = {"iters": args.iters, "waves": args.waves, "rows": rows, "overlaps": summary}
    write_report(args.out, args.name, body)
    plot(rows, args.out / f"{args.name}.png")


if __name__ == "__main__":
    main()
