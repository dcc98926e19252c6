"""Pallas block-sparse attention against the XLA gather reference.

On a CPU backend the kernels run in Pallas interpret mode on tiny shapes; on a GPU the same cases
run compiled, plus larger shapes marked ``gpu``. The reference runs in float32 at HIGHEST precision
on float32-upcast inputs. Errors are RMS-relative (fla's check).

Tolerance policy (never relaxed to make a kernel pass): float32 inputs get IEEE float32 dots in the
kernels, so the forward must agree to 1e-5 and the gradients to 2e-5; bf16 inputs round q, k, v,
the probabilities and the output to bf16, so 1e-2 and 2e-2; fp16 keeps 3 more mantissa bits than
bf16, so 2e-3 and 4e-3.
"""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllm_jax.ops import attention
from infllm_jax.ops.reference import sparse_attention_xla
from pallas_kernels.sparse_attention import fwd_chunk_len, sparse_attention_pallas
from pallas_kernels.sparse_attention_bwd import build_csr
from pallas_kernels.tiling import EMPTY_BLOCK, BlockSizes, TileLists, canonical_blocks, tile_lists
from tests.kernels.cuda_lowering import lower_for_h200

warnings.filterwarnings(
    "ignore", message=".*Pallas Triton backend is deprecated.*", category=DeprecationWarning
)

INTERPRET = jax.default_backend() == "cpu"
TOLERANCE = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1e-2, 2e-2), jnp.float16: (2e-3, 4e-3)}
SPLIT = BlockSizes(tile_tokens=4, min_share=2, mask_split=True)
UNION = BlockSizes(tile_tokens=4, min_share=1)
TOKEN = BlockSizes(tile_tokens=0, mask_split=True)


def random_block_idx(rng, b, hkv, t, k, block_size, empty_token=3):
    """Random causal selections: sorted, -1 padded, always the token's own block, usually block 0
    (so that whole tiles share a wholly visible block, the kernels' mask-free path), some short lists.

    Token ``empty_token`` selects nothing (every slot -1), so its rows must come out 0, NaN-free.
    """
    idx = np.full((b, hkv, t, k), -1, np.int32)
    for bi in range(b):
        for h in range(hkv):
            for ti in range(t):
                own = ti // block_size
                n = rng.integers(1, k + 1)
                picks = {own, *rng.choice(own + 1, size=min(n, own + 1), replace=False).tolist()}
                if rng.random() < 0.8:
                    picks.add(0)
                picks = sorted(picks)[-k:]
                idx[bi, h, ti, : len(picks)] = picks
    if empty_token < t:
        idx[:, :, empty_token] = -1
    return jnp.asarray(idx)


def rms_rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.mean((x - ref) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30))


@dataclasses.dataclass(frozen=True)
class Case:
    """``t`` queries at key positions ``[offset, offset + t)`` of ``keys`` keys (default ``offset + t``);
    ``traced``: the offset reaches the kernels as a traced jit argument."""

    g: int
    d: int
    t: int
    b: int = 1
    hkv: int = 2
    block_size: int = 16
    k: int = 4
    dtype: type = jnp.float32
    config: BlockSizes = SPLIT
    offset: int = 0
    keys: int | None = None
    traced: bool = False

    @property
    def key_len(self):
        return self.offset + self.t if self.keys is None else self.keys

    def __str__(self):
        cfg = self.config
        mode = "token" if cfg.tile_tokens == 0 else f"tile{cfg.tile_tokens}-share{cfg.min_share}"
        if cfg.tile_kv_blocks > 1 or cfg.token_kv_blocks > 1:
            mode += f"-kv{cfg.tile_kv_blocks}x{cfg.token_kv_blocks}"
        if cfg.mask_split:
            mode += "-split"
        if self.offset or self.keys is not None:
            mode += f"-off={self.offset}-Tk={self.key_len}{'-traced' if self.traced else ''}"
        return (
            f"G={self.g}-D={self.d}-T={self.t}-B={self.b}-Hkv={self.hkv}-bs={self.block_size}-K={self.k}-"
            f"{jnp.dtype(self.dtype).name}-{mode}"
        )


# Every supported G and head dim, tails (T not a multiple of the block size or tile), batch > 1,
# every tiling mode (per-token, tile + token phases, pure union), fp32 and bf16.
CASES = [
    Case(g=1, d=64, t=64, b=2, hkv=1, k=3, dtype=jnp.bfloat16),
    Case(g=2, d=128, t=45),
    Case(g=3, d=64, t=96, k=5, config=TOKEN),
    Case(g=4, d=128, t=70, b=2, hkv=1, config=UNION),
    Case(
        g=8, d=64, t=150, block_size=64, k=3, config=BlockSizes(tile_tokens=8, min_share=3, mask_split=True)
    ),
    Case(
        g=16,
        d=128,
        t=100,
        block_size=32,
        k=5,
        config=BlockSizes(tile_tokens=2, min_share=2, token_batch=2, tile_kv_blocks=2, token_kv_blocks=2),
    ),
    Case(g=16, d=128, t=140, block_size=64, k=3, dtype=jnp.bfloat16, config=BlockSizes(tile_tokens=8)),
]
# Query slices (context parallelism): offsets that are not multiples of the block size or of the
# tile, slices whose length is not a multiple of the block, keys past the slice, traced offsets.
SLICE_CASES = [
    Case(g=2, d=64, t=45, offset=37, keys=92),
    Case(g=2, d=64, t=40, offset=0, keys=72, traced=True),
    Case(g=4, d=64, t=40, offset=50, keys=90, config=TOKEN, traced=True),
    Case(g=2, d=128, t=30, hkv=1, offset=19, config=UNION, traced=True),
    Case(
        g=16,
        d=128,
        t=36,
        block_size=32,
        k=5,
        offset=45,
        keys=100,
        config=BlockSizes(
            tile_tokens=2, min_share=2, token_batch=2, tile_kv_blocks=2, token_kv_blocks=2, mask_split=True
        ),
        traced=True,
    ),
    Case(
        g=8,
        d=64,
        t=50,
        b=2,
        hkv=1,
        offset=66,
        dtype=jnp.bfloat16,
        config=BlockSizes(tile_tokens=8, min_share=3, mask_split=True),
    ),
]
GPU_CASES = [
    Case(g=16, d=128, t=8192 + 37, block_size=64, k=24, dtype=jnp.bfloat16, config=BlockSizes()),
    Case(g=16, d=128, t=32768, hkv=1, block_size=64, k=8, dtype=jnp.bfloat16, config=BlockSizes()),
    Case(g=2, d=64, t=4096 + 5, block_size=64, k=16, dtype=jnp.float32, config=BlockSizes()),
]


def _inputs(case, seed=0):
    """q, k, v, do in ``case.dtype`` and the selection of the query slice (its local token 3 empty)."""
    rng = np.random.default_rng(seed)
    hq, tk = case.hkv * case.g, case.key_len
    q = rng.standard_normal((case.b, case.t, hq, case.d), np.float32)
    k = rng.standard_normal((case.b, tk, case.hkv, case.d), np.float32)
    v = rng.standard_normal((case.b, tk, case.hkv, case.d), np.float32)
    do = rng.standard_normal((case.b, case.t, hq, case.d), np.float32)
    idx = random_block_idx(rng, case.b, case.hkv, tk, case.k, case.block_size, empty_token=case.offset + 3)
    idx = idx[:, :, case.offset : case.offset + case.t]
    return [jnp.asarray(x, case.dtype) for x in (q, k, v, do)], idx


def _run(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)


def _pallas_fn(case, idx, config=None):
    """jitted ``(q, k, v, do) -> (out, (dq, dk, dv))`` of the kernels; the offset is traced when
    ``case.traced``."""

    def run(q, k, v, do, offset):
        def pallas(q, k, v):
            return sparse_attention_pallas(
                q,
                k,
                v,
                idx,
                block_size=case.block_size,
                q_offset=offset,
                config=config or case.config,
                interpret=INTERPRET,
            )

        return _run(pallas, q, k, v, do)

    if case.traced:
        return lambda *a: jax.jit(run)(*a, jnp.int32(case.offset))
    return jax.jit(lambda *a: run(*a, case.offset))


def check_against_reference(case):
    (q, k, v, do), idx = _inputs(case)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]

    def reference(q, k, v):
        return sparse_attention_xla(q, k, v, idx, block_size=case.block_size, q_offset=case.offset)

    out_ref, grads_ref = jax.jit(lambda *a: _run(reference, *a))(*f32)
    fn = _pallas_fn(case, idx)
    out, grads = fn(q, k, v, do)
    fwd_tol, bwd_tol = TOLERANCE[case.dtype]
    assert out.dtype == q.dtype
    assert not any(bool(jnp.isnan(x).any()) for x in (out, *grads)), "NaN in output or gradients"
    # Token 3 selected nothing: zero output, and no gradient flows through it.
    np.testing.assert_array_equal(np.asarray(out[:, 3], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][:, 3], np.float32), 0.0)
    assert rms_rel(out, out_ref) < fwd_tol, f"forward error {rms_rel(out, out_ref):.2e}"
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert rms_rel(got, want) < bwd_tol, f"{name} error {rms_rel(got, want):.2e}"
    out2, grads2 = fn(q, k, v, do)
    for got, again in zip((out, *grads), (out2, *grads2), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(again))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    check_against_reference(case)


@pytest.mark.parametrize("case", SLICE_CASES, ids=str)
def test_query_slice_matches_reference(case):
    check_against_reference(case)


@pytest.mark.parametrize(
    "case",
    [
        Case(g=2, d=64, t=50, offset=21, keys=80, traced=True),
        Case(
            g=4,
            d=64,
            t=45,
            config=BlockSizes(tile_tokens=2, min_share=2, token_batch=2, token_kv_blocks=2, mask_split=True),
        ),
    ],
    ids=str,
)
def test_chunked_forward_is_bit_identical(case):
    check_chunked_bit_identical(case, chunk_tokens=20)


def check_chunked_bit_identical(case, chunk_tokens):
    """Three chunks of ``chunk_tokens`` (the last one shorter) give exactly the unchunked output and
    gradients."""
    per_token = case.b * case.hkv * 16 * (case.d + 1) * 4  # fp32 state of one query token
    chunked = dataclasses.replace(case.config, fwd_chunk_bytes=chunk_tokens * per_token)
    padded = -(-case.t // chunked.align) * chunked.align
    chunk = fwd_chunk_len(case.b, case.hkv, case.d, padded, chunked)
    assert -(-padded // chunk) == 3 and padded % chunk, (padded, chunk)
    (q, k, v, do), idx = _inputs(case, seed=5)
    whole = _pallas_fn(case, idx, dataclasses.replace(case.config, fwd_chunk_bytes=1 << 40))(q, k, v, do)
    parts = _pallas_fn(case, idx, chunked)(q, k, v, do)
    for name, got, want in zip(
        ("out", "dq", "dk", "dv"), jax.tree.leaves(parts), jax.tree.leaves(whole), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


@pytest.mark.slow
def test_chunked_forward_bounds_the_fp32_state():
    """The compiled forward holds the tile phase's fp32 state for one chunk only.

    T=4096, Hkv=2, D=64: the unchunked state is 32.5 MiB; 16 chunks hold 2 MiB each. On CPU the
    interpreted kernels copy their operands (q5, the aliased output) into loop carries, so the test
    compiles with XLA's memory-minimising CPU scheduler and asks for most of the state to be saved;
    the state's full-length shape must not appear in the chunked program at all.
    """
    b, t, hkv, d, bs = 1, 4096, 2, 64, 16
    state_bytes = b * t * hkv * 16 * (d + 1) * 4
    q = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((b, hkv, t, 4), jnp.int32)
    options = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"} if INTERPRET else {}
    full_state = f"f32[{b},{t},{hkv},16,{d}]"

    def compiled(chunk_bytes):
        config = BlockSizes(fwd_chunk_bytes=chunk_bytes)
        fn = jax.jit(
            lambda q, k, v, i: sparse_attention_pallas(
                q, k, v, i, block_size=bs, config=config, interpret=INTERPRET
            )
        )
        return fn.lower(q, k, k, idx).compile(compiler_options=options)

    whole, chunked = compiled(1 << 40), compiled(state_bytes // 16)
    assert full_state in whole.as_text()
    assert full_state not in chunked.as_text()
    saved = whole.memory_analysis().temp_size_in_bytes - chunked.memory_analysis().temp_size_in_bytes
    assert saved > state_bytes / 2, f"saved {saved / 2**20:.1f} MiB of a {state_bytes / 2**20:.1f} MiB state"


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference_large(case):
    check_against_reference(case)


@pytest.mark.parametrize(
    "config", [SPLIT, BlockSizes(tile_tokens=8, min_share=5, mask_split=True), UNION, TOKEN], ids=str
)
def test_tile_lists_partition_each_selection(config):
    """Tile-phase blocks (per their token bitmask) plus token-phase blocks = each token's selection,
    and the entries flagged mask-free are selected by every token of the tile and wholly visible."""
    rng = np.random.default_rng(1)
    t, k, bs, tq = 64, 6, 4, max(config.tile_tokens, 1)
    idx = random_block_idx(rng, 1, 2, t, k, bs)
    ids, cnt = canonical_blocks(idx, padded_len=t, block_size=bs)
    lists = jax.device_get(jax.jit(tile_lists, static_argnums=(1, 2))(ids, config, bs))
    ids, cnt = np.asarray(ids), np.asarray(cnt)
    for h in range(2):
        for ti in range(t):
            want = sorted(ids[0, h, ti, : cnt[0, h, ti]].tolist())
            got = []
            if lists.tile_ids is not None:
                tile = ti // tq
                n, free = lists.tile_cnt[0, h, tile]
                for j in range(n):
                    blk, bits = int(lists.tile_ids[0, h, tile, j]), int(lists.tile_bits[0, h, tile, j])
                    if j < free:
                        assert bits == (1 << tq) - 1 and blk * bs + bs - 1 <= tile * tq, (h, ti, j)
                    if bits >> (ti % tq) & 1:
                        got.append(blk)
            if lists.token_ids is not None:
                n, free = lists.token_cnt[0, h, ti]
                mine = lists.token_ids[0, h, ti, :n].tolist()
                assert all(blk * bs + bs - 1 <= ti for blk in mine[:free]), (h, ti)
                assert all(blk * bs + bs - 1 > ti for blk in mine[free:]), (h, ti)
                got += mine
            assert sorted(got) == want, (h, ti)


@pytest.mark.parametrize("min_share", [1, 2], ids=["union", "share-2"])
def test_half_order_groups_the_ascending_lists_by_the_halves_that_chose_them(min_share):
    """With ``half_order`` a tile's list holds the ascending list's (block, bits) entries: first those
    only tokens of the tile's first half chose, then those both halves chose, then those only the second
    half chose, each group ascending; the counts and token lists stay the same."""
    rng = np.random.default_rng(2)
    t, k, bs, tq = 64, 6, 4, 8
    ids, _ = canonical_blocks(random_block_idx(rng, 1, 2, t, k, bs), padded_len=t, block_size=bs)
    build = jax.jit(tile_lists, static_argnums=(1, 2))
    plain = BlockSizes(tile_tokens=tq, min_share=min_share)
    want = jax.device_get(build(ids, plain, bs))
    got = jax.device_get(build(ids, dataclasses.replace(plain, half_order=True), bs))
    for name in ("tile_cnt", "token_ids", "token_cnt"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)

    def entries(lists, h, tile, n):
        return list(
            zip(
                lists.tile_ids[0, h, tile, :n].tolist(), lists.tile_bits[0, h, tile, :n].tolist(), strict=True
            )
        )

    def group(entry):  # 0: first half only, 1: both halves, 2: second half only
        first, second = (entry[1] & 0x0F) != 0, (entry[1] & 0xF0) != 0
        return 0 if not second else 1 if first else 2

    orders = set()
    for h in range(2):
        for tile in range(t // tq):
            n = want.tile_cnt[0, h, tile, 0]
            ascending, ordered = entries(want, h, tile, n), entries(got, h, tile, n)
            assert ordered == sorted(ascending, key=lambda e: (group(e), e[0])), (h, tile)
            assert (got.tile_ids[0, h, tile, n:] == 0).all() and (got.tile_bits[0, h, tile, n:] == 0).all()
            orders.add(ordered == ascending)
    assert orders == {True, False}  # some lists were reordered, some were ascending already


def test_half_order_needs_halves_and_no_mask_split():
    with pytest.raises(ValueError, match="half_order"):
        BlockSizes(tile_tokens=0, half_order=True)
    with pytest.raises(ValueError, match="half_order"):
        BlockSizes(tile_tokens=8, mask_split=True, half_order=True)


def test_canonical_blocks_keep_valid_distinct_visible_ids_in_order():
    """-1 slots (leading or trailing), repeats and ids past the token's own block are dropped; the
    rest keep their ascending order, then EMPTY_BLOCK; padded tokens get nothing."""
    rng = np.random.default_rng(4)
    t, k, bs, offset, padded = 40, 7, 4, 6, 48
    raw = rng.integers(-1, (offset + t) // bs + 3, size=(1, 2, t, k), dtype=np.int32)
    last = np.sort(np.where(raw < 0, 1 << 20, raw), axis=-1)
    # KV head 0: -1 slots first (a plain ascending sort); head 1: ascending ids, then the -1 slots.
    idx = np.concatenate([np.sort(raw[:, :1], axis=-1), np.where(last == 1 << 20, -1, last)[:, 1:]], axis=1)
    ids, cnt = canonical_blocks(jnp.asarray(idx), padded_len=padded, block_size=bs, q_offset=offset)
    for h in range(2):
        for ti in range(padded):
            row = idx[0, h, ti] if ti < t else []
            want = sorted({int(x) for x in row if 0 <= x <= (offset + ti) // bs})
            assert cnt[0, h, ti] == len(want), (h, ti)
            got = np.asarray(ids[0, h, ti])
            assert got[: len(want)].tolist() == want and (got[len(want) :] == EMPTY_BLOCK).all(), (h, ti)


@pytest.mark.parametrize("config", [SPLIT, UNION], ids=str)
def test_tile_lists_do_not_depend_on_the_sort_key(config):
    """The packed one-key sort (a block-id bound that fits int32) and the two-array sort it falls back
    to (no bound, or one too large to pack) give the same lists."""
    rng = np.random.default_rng(3)
    t, k, bs = 64, 6, 4
    ids, _ = canonical_blocks(random_block_idx(rng, 1, 2, t, k, bs), padded_len=t, block_size=bs)
    build = jax.jit(tile_lists, static_argnums=(1, 2), static_argnames="num_key_blocks")
    want = jax.device_get(build(ids, config, bs))
    for bound in (t // bs, 2**30):
        got = jax.device_get(build(ids, config, bs, num_key_blocks=bound))
        for name, w, g in zip(TileLists._fields, want, got, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=f"{name}, num_key_blocks={bound}")


@pytest.mark.parametrize("pair_sort", [False, True])
def test_csr_inverts_selection(pair_sort):
    rng = np.random.default_rng(2)
    t, k, bs = 48, 5, 8
    ids, _ = canonical_blocks(random_block_idx(rng, 2, 1, t, k, bs), padded_len=t, block_size=bs)
    tokens, spans, order = jax.device_get(
        build_csr(ids, block_size=bs, pad=4, mask_split=True, pair_sort=pair_sort)
    )
    ids = np.asarray(ids)
    for b in range(2):
        counts = spans[b, 0, :, 1] - spans[b, 0, :, 0]
        assert list(order[b, 0]) == sorted(range(t // bs), key=lambda j: (-counts[j], j))
        for blk in range(t // bs):
            lo, hi, n_partial = spans[b, 0, blk]
            want = [ti for ti in range(t) if blk in ids[b, 0, ti]]
            assert tokens[b, 0, lo:hi].tolist() == want
            assert n_partial == sum(ti < blk * bs + bs - 1 for ti in want)


@pytest.mark.parametrize("unsupported", ["head_dim_96", "block_size_8"])
def test_unsupported_inputs_raise_or_fall_back(monkeypatch, unsupported):
    rng = np.random.default_rng(3)
    d, bs = (96, 16) if unsupported == "head_dim_96" else (64, 8)
    tq, offset = 16, 16
    q = jnp.asarray(rng.standard_normal((1, tq, 2, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 32, 1, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 32, 1, d)), jnp.float32)
    idx = random_block_idx(rng, 1, 1, 32, 2, bs)[:, :, 32 - tq :]
    with pytest.raises(NotImplementedError):
        attention.sparse_attention(q, k, v, idx, block_size=bs, implementation="pallas", q_offset=offset)
    # implementation=None tries "pallas" first (as on GPU) and falls back to the reference.
    monkeypatch.setitem(attention._PREFERENCE, jax.default_backend(), ("pallas", "xla"))
    out = attention.sparse_attention(q, k, v, idx, block_size=bs, q_offset=offset)
    want = attention.sparse_attention(q, k, v, idx, block_size=bs, implementation="xla", q_offset=offset)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("offset", [-1, 9])
def test_static_offset_outside_the_keys_raises(offset):
    q = jnp.zeros((1, 24, 2, 64), jnp.float32)
    k = jnp.zeros((1, 32, 1, 64), jnp.float32)
    idx = jnp.zeros((1, 1, 24, 2), jnp.int32)
    with pytest.raises(ValueError, match="outside the 32 keys"):
        sparse_attention_pallas(q, k, k, idx, block_size=16, q_offset=offset, interpret=INTERPRET)


def test_registered_backend_runs():
    case = Case(g=2, d=64, t=40, hkv=1, k=2)
    (q, k, v, _), idx = _inputs(case, seed=4)
    out = attention.sparse_attention(q, k, v, idx, block_size=16, implementation="pallas")
    ref = sparse_attention_xla(q, k, v, idx, block_size=16)
    assert rms_rel(out, ref) < TOLERANCE[jnp.float32][0]


def test_token_phase_takes_its_own_pipeline_depth():
    """``token_stages`` reaches the forward's token-phase kernel and ``num_stages`` the tile phase
    (Triton IR lowered for the H200; interpret mode ignores both)."""
    config = BlockSizes(tile_tokens=8, tile_warps=8, num_stages=4, token_stages=2)
    q = jax.ShapeDtypeStruct((1, 256, 16, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 256, 1, 64), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((1, 1, 256, 3), jnp.int32)

    def forward(q, k, v, idx):
        return sparse_attention_pallas(q, k, v, idx, block_size=64, config=config)

    text = lower_for_h200(forward, q, k, k, idx)
    assert sorted(re.findall(r"num_stages = (\d+) : i32", text)) == ["2", "4"]


@pytest.mark.parametrize("field", ["num_stages", "token_stages"])
def test_pipeline_depths_must_be_positive(field):
    with pytest.raises(ValueError, match=f"{field} must be >= 1"):
        BlockSizes(**{field: 0})
