"""Transformer: shapes and dtypes, causality in both modes, muP scalings, configs, summary."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infllm_jax import SparseConfig
from infllm_jax.data.tokenizer import ByteTokenizer
from infllm_jax.model import PRESETS, ModelConfig, Transformer, get_config, main, param_count, summary
from infllm_jax.nn import RMSNorm

# 2 layers, G = 2; with T = 128 there are 8 blocks of 16 and each token selects at most 3 of them.
CONFIG = ModelConfig(
    vocab_size=259,
    num_layers=2,
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    scale_emb=12.0,
    scale_depth=1.4,
    dim_model_base=16,
    sparse=SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=16, topk=2, dense_len=64),
)
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void; "


def byte_tokens(t=128, b=2):
    ids = ByteTokenizer().encode(TEXT * (t // len(TEXT) + 2))
    return jnp.stack([jnp.asarray(ids[i : i + t]) for i in range(b)])


def jitted(model):
    """``tokens -> logits`` compiled once (eager NNX calls dispatch op by op and are slow)."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens))
    return lambda tokens: forward(params, tokens)


@pytest.fixture(scope="module")
def models():
    return {
        m: Transformer(dataclasses.replace(CONFIG, attention_mode=m), rngs=nnx.Rngs(0))
        for m in ("dense", "sparse")
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
    model = Transformer(dataclasses.replace(CONFIG, dtype=dtype), rngs=nnx.Rngs(0))
    logits = model(byte_tokens(t=80))
    assert logits.shape == (2, 80, 259) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    # Parameters stay float32 whatever the compute dtype.
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}


def test_untied_head_and_param_count():
    tied = Transformer(CONFIG, rngs=nnx.Rngs(0))
    untied = Transformer(dataclasses.replace(CONFIG, tie_embeddings=False), rngs=nnx.Rngs(0))
    e, v, f, l = 32, 259, 64, 2
    per_layer = e * 32 + 2 * e * 16 + 32 * e + 3 * e * f + 2 * e
    assert param_count(tied) == v * e + l * per_layer + e == param_count(CONFIG)
    assert param_count(untied) == param_count(tied) + v * e
    assert untied(byte_tokens(t=16)).shape == (2, 16, 259)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_causality(models, mode):
    """Logits at t do not depend on tokens after t; they do depend on tokens at or before t."""
    model = jitted(models[mode])
    tokens = byte_tokens()
    base = model(tokens)
    for t in (0, 37, 64, 100):
        noise = jax.random.randint(jax.random.key(t), (2, 127 - t), 0, 256)
        changed = tokens.at[:, t + 1 :].set(noise)
        out = model(changed)
        np.testing.assert_allclose(
            np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]), rtol=0, atol=1e-5
        )
        assert float(jnp.max(jnp.abs(out[:, t + 1 :] - base[:, t + 1 :]))) > 1e-3
    # Changing token t itself changes the logits at t.
    flipped = tokens.at[:, 50].set((tokens[:, 50] + 1) % 256)
    assert float(jnp.max(jnp.abs(model(flipped)[:, 50] - base[:, 50]))) > 1e-4


def test_causality_gradient(models):
    """nanodo-style: the gradient of logits at t with respect to the input embeddings is 0 after t."""
    model = models["sparse"]
    tokens = byte_tokens()
    t = 90
    graphdef, params = nnx.split(model)

    def logit_at_t(x_emb):
        m = nnx.merge(graphdef, params)
        x = x_emb
        for layer in m.layers:
            x = layer(x)
        return jnp.sum(m.final_norm(x)[:, t])

    grads = jax.jit(jax.grad(logit_at_t))(model._embed(tokens))
    norms = jnp.sqrt(jnp.sum(grads**2, axis=(0, 2)))
    assert float(jnp.max(norms[t + 1 :])) == 0.0
    assert float(jnp.min(norms[t - 2 : t + 1])) > 0.0


def test_dense_and_sparse_models_agree_when_every_block_is_selected():
    # topk 7 + 1 local block = 8 slots >= the 8 blocks of 128 tokens.
    cfg = dataclasses.replace(CONFIG, sparse=dataclasses.replace(CONFIG.sparse, topk=7))
    dense = jitted(Transformer(dataclasses.replace(cfg, attention_mode="dense"), rngs=nnx.Rngs(0)))
    sparse = jitted(Transformer(dataclasses.replace(cfg, attention_mode="sparse"), rngs=nnx.Rngs(0)))
    tokens = byte_tokens()
    assert cfg.sparse.num_selected >= 8
    np.testing.assert_allclose(np.asarray(sparse(tokens)), np.asarray(dense(tokens)), rtol=1e-4, atol=1e-4)


def test_block_selections(models):
    sel = models["dense"].block_selections(byte_tokens())
    assert sel.shape == (2, 2, 2, 128, CONFIG.sparse.num_selected) and sel.dtype == jnp.int32
    # Never a block after the token's own block.
    assert bool(jnp.all(sel <= (jnp.arange(128) // 16)[None, None, None, :, None]))


def test_mup_scalings():
    cfg = CONFIG
    assert cfg.residual_scale == pytest.approx(1.4 / np.sqrt(2))
    assert cfg.logit_divisor == pytest.approx(2.0)
    plain = dataclasses.replace(cfg, scale_emb=1.0, scale_depth=None, dim_model_base=None)
    assert plain.residual_scale == 1.0 and plain.logit_divisor == 1.0
    # Same weights: the embedding scale acts before the first norm, the divisor scales the logits.
    m = Transformer(dataclasses.replace(cfg, num_layers=1, scale_depth=None), rngs=nnx.Rngs(0))
    x = m._embed(byte_tokens(t=8))
    np.testing.assert_allclose(np.asarray(x), np.asarray(m.embed(byte_tokens(t=8)) * 12.0), rtol=1e-6)
    no_div = Transformer(
        dataclasses.replace(cfg, num_layers=1, scale_depth=None, dim_model_base=None), rngs=nnx.Rngs(0)
    )
    np.testing.assert_allclose(
        np.asarray(m(byte_tokens(t=8)) * 2.0), np.asarray(no_div(byte_tokens(t=8))), rtol=1e-5, atol=1e-5
    )


def test_rmsnorm():
    norm = RMSNorm(8, eps=1e-6)
    x = jax.random.normal(jax.random.key(0), (3, 8)) * 5
    y = norm(x)
    np.testing.assert_allclose(np.asarray(jnp.mean(y**2, -1)), 1.0, rtol=1e-4)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(num_heads=3), "num_heads=3 must be a multiple of num_kv_heads=2"),
        (dict(head_dim=9), "head_dim=9 must be even"),
        (dict(attention_mode="flash"), "attention_mode must be one of"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(scale_depth=0.0), "scale_depth must be positive or None"),
        (dict(dim_model_base=0), "dim_model_base must be a positive int or None"),
        (dict(init_std=-1.0), "init_std must be positive"),
        (dict(sparse={"topk": 4}), "sparse must be a SparseConfig"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(CONFIG, **overrides)


def test_presets_and_summary(capsys):
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
    assert get_config("tiny", vocab_size=300).vocab_size == 300
    assert 50e6 <= param_count(PRESETS["small"]) <= 120e6
    text = summary(PRESETS["tiny"])
    assert "params: total" in text and "96 keys/token" in text
    main(["--preset", "tiny", "--vocab-size", "259"])
    assert "params: total" in capsys.readouterr().out
