"""Flax model vs transformers' PyTorch model on the same weights (tiny random configs and the
real SmolLM2)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from numeric import central_differences

from semloss_jax.models import hf_config
from semloss_jax.models.llama import (
    LlamaConfig,
    forward,
    hidden_at_layers,
    init_params,
    param_logical_axes,
    swiglu,
    tiny_config,
)
from semloss_jax.models.weights import export_hf, load_hf

# jit once per config (configs are frozen, hashable dataclasses)
jforward = jax.jit(forward, static_argnums=1, static_argnames=("return_hidden",))

TINY_VARIANTS = {
    "llama-gqa-untied": dict(),
    "llama-tied": dict(tie_word_embeddings=True),
    "qwen2-bias": dict(model_type="qwen2", qkv_bias=True),
    "llama3-rope-scaling": dict(rope_scaling=("llama3", 8.0, 1.0, 4.0, 64), rope_theta=500000.0),
    "mistral-mha": dict(model_type="mistral", num_key_value_heads=4),
}


def _torch_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.numpy()


def _randomize(params, key):
    """Random norms and biases too, so that a swapped or ignored parameter shows."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_tiny_logits_match_transformers(tmp_path, variant):
    cfg = tiny_config(**TINY_VARIANTS[variant])
    params = _randomize(init_params(cfg, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
    export_hf(params, cfg, tmp_path / "hf")
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 40))
    ours = np.asarray(jforward(params, cfg, jnp.asarray(ids)))
    ref = _torch_logits(tmp_path / "hf", ids)
    # measured 2.4e-6 to 5.5e-6 (logits up to ~3.4) over the variants: fp32 rounding only
    assert np.abs(ours - ref).max() <= 5e-5, np.abs(ours - ref).max()
    # and the export round-trips exactly
    cfg2, params2 = load_hf(tmp_path / "hf")
    assert hf_config.to_hf_dict(cfg2) == hf_config.to_hf_dict(cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, jax.tree_util.tree_map(np.asarray, params))


def test_left_padding_and_packing_are_exact():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    a, b = rng.randint(0, cfg.vocab_size, 7), rng.randint(0, cfg.vocab_size, 5)
    alone_a = np.asarray(jforward(params, cfg, jnp.asarray(a[None])))[0]
    alone_b = np.asarray(jforward(params, cfg, jnp.asarray(b[None])))[0]
    # left padding
    ids = np.concatenate([np.zeros(3, int), b])[None]
    mask = np.concatenate([np.zeros(3, int), np.ones(5, int)])[None]
    padded = np.asarray(jforward(params, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))[0, 3:]
    np.testing.assert_allclose(padded, alone_b, atol=1e-5)
    # packing two sequences in one row
    ids = np.concatenate([a, b])[None]
    seg = np.array([[1] * 7 + [2] * 5])
    pos = np.array([list(range(7)) + list(range(5))])
    packed = np.asarray(jforward(params, cfg, jnp.asarray(ids), segment_ids=jnp.asarray(seg),
                                positions=jnp.asarray(pos)))[0]
    np.testing.assert_allclose(packed[:7], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[7:], alone_b, atol=1e-5)


def test_every_param_has_logical_axes():
    cfg = tiny_config(qkv_bias=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    axes = param_logical_axes(cfg)
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    for path, leaf in flat_p:
        spec = flat_a[path]
        assert len(spec) == leaf.ndim and all(isinstance(n, str) for n in spec), (path, spec)
        if "layers" in jax.tree_util.keystr(path):
            assert spec[0] == "layers"


def test_remat_and_scan_give_same_logits_and_grads():
    cfg = tiny_config()
    cfg_r = LlamaConfig(**{**cfg.__dict__, "remat": "full"})
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 16)))

    def loss(p, c):
        return jnp.mean(forward(p, c, ids) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g1, g2 = grad(params, cfg), grad(params, cfg_r)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


@pytest.mark.real_model
def test_real_smollm2_logits_match_transformers(tmp_path, real_model, real_tokenizer):
    cfg, params = real_model
    export_hf(params, cfg, tmp_path / "hf", tokenizer=real_tokenizer)
    ids = np.array([real_tokenizer.prompt_ids("What is the capital of France?")])
    ours = np.asarray(jax.jit(lambda p, i: forward(p, cfg, i))(params, jnp.asarray(ids)))
    ref = _torch_logits(tmp_path / "hf", ids)
    # measured 1.3e-4 with logits up to 38 (30 layers of fp32 rounding)
    assert np.abs(ours - ref).max() <= 5e-4, np.abs(ours - ref).max()
    assert real_tokenizer.decode([int(ours[0, -1].argmax())]).strip() == "The"


def test_frozen_layers_skip_gradients_but_not_values():
    cfg = tiny_config(num_hidden_layers=3)
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 12)))

    def loss(p, n):
        return jnp.mean(forward(p, cfg, ids, frozen_layers=n) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_all, g_frozen = grad(params, 0), grad(params, 2)
    np.testing.assert_array_equal(np.asarray(jforward(params, cfg, ids)),
                                  np.asarray(jax.jit(lambda p: forward(p, cfg, ids, frozen_layers=2))(
                                      params)))
    for path, g in jax.tree_util.tree_leaves_with_path(g_frozen["layers"]):
        full = dict(jax.tree_util.tree_leaves_with_path(g_all["layers"]))[path]
        assert np.all(np.asarray(g[:2]) == 0), path                       # frozen prefix: no gradient
        np.testing.assert_allclose(g[2], full[2], rtol=1e-5, atol=1e-8)  # the rest: unchanged
        assert np.any(np.asarray(g[2]) != 0)
    assert np.all(np.asarray(g_frozen["embed"]["embedding"]) == 0)        # untied: embedding frozen too


def test_hidden_at_layers_equals_cut_models():
    """One pass gives each cut model's final hidden states (the last equals forward's)."""
    cfg = tiny_config(num_hidden_layers=4)
    p = init_params(cfg, jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    seg = jnp.ones((2, 12), jnp.int32).at[1, 8:].set(0)
    h = hidden_at_layers(p, cfg, x, (1, 3, 4), segment_ids=seg)
    assert h.shape == (3, 2, 12, cfg.hidden_size)
    for i, k in enumerate((1, 3, 4)):
        cut = {**p, "layers": jax.tree_util.tree_map(lambda a, k=k: a[:k], p["layers"])}
        ref = forward(cut, dataclasses.replace(cfg, num_hidden_layers=k), x, segment_ids=seg,
                      return_hidden=True)
        np.testing.assert_allclose(np.asarray(h[i]), np.asarray(ref), atol=1e-5)
    with pytest.raises(ValueError):
        hidden_at_layers(p, cfg, x, (3, 1))


def test_swiglu_backward_equals_autodiff_of_silu_times_up():
    """The hand-written backward (sigmoid recomputed from gate) against autodiff of the plain
    expression, saturated gates included, and against central differences."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    gate = jnp.concatenate([3 * jax.random.normal(k1, (2, 5, 7)), jnp.full((2, 1, 7), 40.0),
                            jnp.full((2, 1, 7), -40.0)], axis=1)
    up = jax.random.normal(k2, gate.shape)
    cot = jax.random.normal(k3, gate.shape)
    out, vjp = jax.vjp(swiglu, gate, up)
    ref_out, ref_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    for got, want in zip(vjp(cot), ref_vjp(cot)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    g0, u0 = gate[0, 0, :3], up[0, 0, :3]
    dg = jax.grad(lambda g: jnp.sum(swiglu(g, u0)))(g0)
    np.testing.assert_allclose(dg, central_differences(lambda g: jnp.sum(swiglu(g, u0)), g0, 1e-2),
                               rtol=2e-3, atol=1e-3)
