"""Naive loop implementations of InfLLM-V2, written independently of the library (float64 numpy).

They follow SPEC.md §3-§7 literally, one token and one head at a time, and are the ground truth
for the library's reference ops on small shapes.
"""

import math

import numpy as np


def compress(k, kernel_size, stride):
    """k [B, T, H, D] -> [B, n, H, D]: means of complete windows."""
    k = np.asarray(k, np.float64)
    t = k.shape[1]
    starts = range(0, t - kernel_size + 1, stride) if t >= kernel_size else []
    windows = [k[:, s : s + kernel_size].mean(axis=1) for s in starts]
    if not windows:
        return np.zeros((k.shape[0], 0, *k.shape[2:]))
    return np.stack(windows, axis=1)


def stage1(q, k, cfg):
    """Group-summed scores S [B, Hkv, T, n1] by explicit loops."""
    q = np.asarray(q, np.float64)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    k1 = compress(k, cfg.kernel_size, cfg.kernel_stride)
    k2 = compress(k, 4 * cfg.kernel_size, 4 * cfg.kernel_stride)
    n1, n2 = k1.shape[1], k2.shape[1]
    scale = 1 / math.sqrt(d)
    out = np.zeros((b, hkv, t, n1))
    for bi in range(b):
        for h in range(hkv):
            for ti in range(t):
                coarse = [c for c in range(n2) if c * 4 * cfg.kernel_stride + 4 * cfg.kernel_size <= ti + 1]
                fine = [c for c in range(n1) if c * cfg.kernel_stride + cfg.kernel_size <= ti + 1]
                if not coarse:
                    continue
                for gi in range(g):
                    qv = q[bi, ti, h * g + gi]
                    logits2 = np.array([scale * qv @ k2[bi, c, h] for c in coarse])
                    lse2 = logits2.max() + math.log(np.exp(logits2 - logits2.max()).sum())
                    for c in fine:
                        out[bi, h, ti, c] += math.exp(scale * qv @ k1[bi, c, h] - lse2)
    return out


def pool_and_force(s, t, cfg):
    """S [B, Hkv, T, n1] -> block scores [B, Hkv, T, nb] with +inf forcing."""
    nb = -(-t // cfg.block_size)
    r = cfg.block_size // cfg.kernel_stride
    n1 = s.shape[-1]
    out = np.full((*s.shape[:3], nb), -np.inf)
    for ti in range(t):
        qb = ti // cfg.block_size
        for j in range(nb):
            if j < cfg.init_blocks or qb - cfg.window_size // cfg.block_size <= j <= qb:
                out[:, :, ti, j] = np.inf
                continue
            kernels = [c for c in range(r * j - 1, r * j + r) if 0 <= c < n1]
            if kernels:
                out[:, :, ti, j] = s[:, :, ti, kernels].max(axis=-1)
    return out


def top_blocks(blk, cfg):
    """Block scores [B, Hkv, T, nb] -> ids [B, Hkv, T, num_selected]; ties go to the lower id."""
    b, h, t, nb = blk.shape
    k_total = cfg.topk + cfg.window_size // cfg.block_size
    k_sel = min(k_total, nb)
    out = np.full((b, h, t, k_total), -1, np.int64)
    for idx in np.ndindex(b, h, t):
        row = blk[idx]
        order = sorted(range(nb), key=lambda j: (-row[j], j))[:k_sel]
        chosen = sorted(j for j in order if j <= idx[2] // cfg.block_size)
        out[idx][: len(chosen)] = chosen
    return out


def select(q, k, cfg):
    """Full naive selection [B, Hkv, T, num_selected]."""
    t = q.shape[1]
    return top_blocks(pool_and_force(stage1(q, k, cfg), t, cfg), cfg)


def sparse_attention(q, k, v, block_idx, block_size):
    """Per token and head: softmax over keys p <= t in the union of its selected blocks."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            kv = h // g
            for ti in range(t):
                blocks = {int(j) for j in np.asarray(block_idx)[bi, kv, ti] if j >= 0}
                keys = [
                    p for j in sorted(blocks) for p in range(j * block_size, (j + 1) * block_size) if p <= ti
                ]
                if not keys:
                    continue
                logits = k[bi, keys, kv] @ q[bi, ti, h] / math.sqrt(d)
                w = np.exp(logits - logits.max())
                out[bi, ti, h] = (w / w.sum()) @ v[bi, keys, kv]
    return out


def dense_causal(q, k, v):
    """Dense causal GQA attention, float64."""
    t = q.shape[1]
    all_blocks = np.broadcast_to(np.arange(t), (q.shape[0], k.shape[2], t, t))
    return sparse_attention(q, k, v, all_blocks, 1)
