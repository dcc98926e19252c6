"""Pallas block-sparse attention against the XLA gather reference.

On a CPU backend the kernels run in Pallas interpret mode on tiny shapes; on a GPU the same cases
run compiled, plus larger shapes marked ``gpu``. The reference runs in float32 at HIGHEST precision
on float32-upcast inputs. Errors are RMS-relative (fla's check).

Tolerance policy (never relaxed to make a kernel pass): float32 inputs get IEEE float32 dots in the
kernels, so the forward must agree to 1e-5 and the gradients to 2e-5; bf16 inputs round q, k, v,
the probabilities and the output to bf16, so 1e-2 and 2e-2.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllm_jax.ops import attention
from infllm_jax.ops.reference import sparse_attention_xla
from pallas_kernels.sparse_attention import BlockSizes, canonical_blocks, sparse_attention_pallas, tile_lists
from pallas_kernels.sparse_attention_bwd import build_csr

warnings.filterwarnings(
    "ignore", message=".*Pallas Triton backend is deprecated.*", category=DeprecationWarning
)

INTERPRET = jax.default_backend() == "cpu"
TOLERANCE = {jnp.float32: (1e-5, 2e-5), jnp.bfloat16: (1e-2, 2e-2)}
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
    g: int
    d: int
    t: int
    b: int = 1
    hkv: int = 2
    block_size: int = 16
    k: int = 4
    dtype: type = jnp.float32
    config: BlockSizes = SPLIT

    def __str__(self):
        cfg = self.config
        mode = "token" if cfg.tile_tokens == 0 else f"tile{cfg.tile_tokens}-share{cfg.min_share}"
        if cfg.tile_kv_blocks > 1 or cfg.token_kv_blocks > 1:
            mode += f"-kv{cfg.tile_kv_blocks}x{cfg.token_kv_blocks}"
        if cfg.mask_split:
            mode += "-split"
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
GPU_CASES = [
    Case(g=16, d=128, t=8192 + 37, block_size=64, k=24, dtype=jnp.bfloat16, config=BlockSizes()),
    Case(g=16, d=128, t=32768, hkv=1, block_size=64, k=8, dtype=jnp.bfloat16, config=BlockSizes()),
    Case(g=2, d=64, t=4096 + 5, block_size=64, k=16, dtype=jnp.float32, config=BlockSizes()),
]


def _inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    hq = case.hkv * case.g
    q = rng.standard_normal((case.b, case.t, hq, case.d), np.float32)
    k = rng.standard_normal((case.b, case.t, case.hkv, case.d), np.float32)
    v = rng.standard_normal((case.b, case.t, case.hkv, case.d), np.float32)
    do = rng.standard_normal((case.b, case.t, hq, case.d), np.float32)
    idx = random_block_idx(rng, case.b, case.hkv, case.t, case.k, case.block_size)
    return [jnp.asarray(x, case.dtype) for x in (q, k, v, do)], idx


def _run(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)


def _check(case):
    (q, k, v, do), idx = _inputs(case)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    ref_fn = jax.jit(
        lambda *a: _run(lambda q, k, v: sparse_attention_xla(q, k, v, idx, block_size=case.block_size), *a)
    )
    out_ref, grads_ref = ref_fn(*f32)

    def pallas(q, k, v):
        return sparse_attention_pallas(
            q, k, v, idx, block_size=case.block_size, config=case.config, interpret=INTERPRET
        )

    fn = jax.jit(lambda *a: _run(pallas, *a))
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
    _check(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference_large(case):
    _check(case)


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


@pytest.mark.parametrize("unsupported", ["head_dim_96", "query_slice"])
def test_unsupported_inputs_raise_or_fall_back(monkeypatch, unsupported):
    rng = np.random.default_rng(3)
    d, tq, offset = (96, 32, 0) if unsupported == "head_dim_96" else (64, 16, 16)
    q = jnp.asarray(rng.standard_normal((1, tq, 2, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 32, 1, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 32, 1, d)), jnp.float32)
    idx = random_block_idx(rng, 1, 1, 32, 2, 16)[:, :, 32 - tq :]
    with pytest.raises(NotImplementedError):
        attention.sparse_attention(q, k, v, idx, block_size=16, implementation="pallas", q_offset=offset)
    # implementation=None tries "pallas" first (as on GPU) and falls back to the reference.
    monkeypatch.setitem(attention._PREFERENCE, jax.default_backend(), ("pallas", "xla"))
    out = attention.sparse_attention(q, k, v, idx, block_size=16, q_offset=offset)
    want = attention.sparse_attention(q, k, v, idx, block_size=16, implementation="xla", q_offset=offset)
    np.testing.assert_array_equal(out, want)


def test_registered_backend_runs():
    case = Case(g=2, d=64, t=40, hkv=1, k=2)
    (q, k, v, _), idx = _inputs(case, seed=4)
    out = attention.sparse_attention(q, k, v, idx, block_size=16, implementation="pallas")
    ref = sparse_attention_xla(q, k, v, idx, block_size=16)
    assert rms_rel(out, ref) < TOLERANCE[jnp.float32][0]
