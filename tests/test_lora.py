"""semloss_jax.models.lora: exact no-op at B = 0, merge formula, gradients only to adapters, frozen base."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from semloss_jax.errors import ConfigError
from semloss_jax.loss import cost
from semloss_jax.loss import objective as ob
from semloss_jax.models import llama as model_lib
from semloss_jax.models import lora
from semloss_jax.train import optim
from semloss_jax.train import step as step_lib

V = 64
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    base.update(kw)
    return model_lib.tiny_config(**base)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    return cfg, params


def ocfg(**kw):
    base = dict(trainable="lora", lora_rank=4, lora_alpha=8.0, lora_targets=ALL, lr=1e-2, total_steps=10)
    base.update(kw)
    return optim.OptimConfig(**base)


def init(params, cfg, oc, key):
    return jax.jit(lora.init_lora, static_argnums=(1, 2))(params, cfg, oc, key)


def merge(params, lp, oc):
    return jax.jit(lora.merge_lora, static_argnums=2)(params, lp, oc)


def _randomize_b(lp, key):
    leaves, tdef = jax.tree_util.tree_flatten(lp)
    rng = np.random.default_rng(int(key[-1]))
    return jax.tree_util.tree_unflatten(
        tdef, [jnp.asarray(rng.normal(size=x.shape) * 0.1, jnp.float32) for x in leaves])


def test_shapes_follow_stacked_kernels(setup):
    cfg, params = setup
    oc = ocfg()
    lp = init(params, cfg, oc, jax.random.PRNGKey(1))
    L, d, f, H, KV, hd, r = 2, 32, 48, 4, 2, 8, 4
    want = {"q_proj": ((L, d, r), (L, r, H, hd)), "k_proj": ((L, d, r), (L, r, KV, hd)),
            "v_proj": ((L, d, r), (L, r, KV, hd)), "o_proj": ((L, H, hd, r), (L, r, d)),
            "gate_proj": ((L, d, r), (L, r, f)), "up_proj": ((L, d, r), (L, r, f)),
            "down_proj": ((L, f, r), (L, r, d))}
    for name, (sa, sb) in want.items():
        group = lora.TARGETS[name][0]
        ab = lp["layers"][group][name]
        assert ab["lora_a"].shape == sa and ab["lora_b"].shape == sb, name
        assert not np.any(np.asarray(ab["lora_b"])) and np.std(np.asarray(ab["lora_a"])) > 0
    axes = lora.lora_logical_axes(cfg, oc)
    assert jax.tree_util.tree_structure(axes, is_leaf=lambda x: isinstance(x, PartitionSpec)) == \
        jax.tree_util.tree_structure(lp)
    assert axes["layers"]["attn"]["q_proj"]["lora_a"] == PartitionSpec("layers", "embed", "lora")
    attn = axes["layers"]["attn"]
    assert attn["q_proj"]["lora_b"] == PartitionSpec("layers", "lora", "q_heads", "head_dim")
    assert attn["o_proj"]["lora_a"] == PartitionSpec("layers", "q_heads", "head_dim", "lora")
    assert axes["layers"]["mlp"]["down_proj"]["lora_b"] == PartitionSpec("layers", "lora", "embed")


def test_merge_with_b_zero_is_exactly_the_base(setup):
    cfg, params = setup
    oc = ocfg()
    lp = init(params, cfg, oc, jax.random.PRNGKey(1))
    merged = merge(params, lp, oc)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           merged, params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 7)), jnp.int32)
    fwd = jax.jit(lambda p: model_lib.forward(p, cfg, ids))
    np.testing.assert_array_equal(np.asarray(fwd(merged)), np.asarray(fwd(params)))


def test_merge_formula_against_numpy(setup):
    cfg, params = setup
    oc = ocfg(lora_alpha=6.0, lora_rank=3)
    lp = _randomize_b(init(params, cfg, oc, jax.random.PRNGKey(1)), jax.random.PRNGKey(2))
    merged = merge(params, lp, oc)
    s = 6.0 / 3
    for name in ALL:
        group, n_in = lora.TARGETS[name]
        W = np.asarray(params["layers"][group][name]["kernel"], np.float64)
        A = np.asarray(lp["layers"][group][name]["lora_a"], np.float64)
        B = np.asarray(lp["layers"][group][name]["lora_b"], np.float64)
        for layer in range(2):
            a2 = A[layer].reshape(-1, 3)
            b2 = B[layer].reshape(3, -1)
            want = W[layer] + s * (a2 @ b2).reshape(W[layer].shape)
            np.testing.assert_allclose(np.asarray(merged["layers"][group][name]["kernel"][layer]), want,
                                       rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(merged["layers"]["attn_norm"]["scale"]),
                                  np.asarray(params["layers"]["attn_norm"]["scale"]))
    assert not np.array_equal(np.asarray(merged["layers"]["attn"]["q_proj"]["kernel"]),
                              np.asarray(params["layers"]["attn"]["q_proj"]["kernel"]))


def test_gradient_at_b_zero_reaches_b_only(setup):
    """dL/dA = s dL/dW B^T = 0 at B = 0, dL/dB = s A^T dL/dW != 0; against the base-weight gradient."""
    cfg, params = setup
    oc = ocfg(lora_targets=("q_proj", "down_proj"))
    lp = init(params, cfg, oc, jax.random.PRNGKey(1))
    rng = np.random.default_rng(3)
    batch = dict(input_ids=rng.integers(0, V, (2, 8)).astype(np.int32),
                 targets=rng.integers(0, V, (2, 8)).astype(np.int32), loss_mask=np.ones((2, 8), np.float32))
    obj = ob.ObjectiveConfig(kind="sft", lam=0.0)

    def loss_w(p):
        return ob.combine(ob.loss_sums(p, cfg, batch, None, None, obj), ob.global_counts(batch), obj)

    g_lora = jax.jit(jax.grad(lambda lora_params: loss_w(lora.merge_lora(params, lora_params, oc))))(lp)
    g_w = jax.jit(jax.grad(loss_w))(params)
    s = oc.lora_alpha / oc.lora_rank
    for group, name in (("attn", "q_proj"), ("mlp", "down_proj")):
        ga = np.asarray(g_lora["layers"][group][name]["lora_a"])
        gb = np.asarray(g_lora["layers"][group][name]["lora_b"])
        assert not np.any(ga)
        A = np.asarray(lp["layers"][group][name]["lora_a"], np.float64)
        GW = np.asarray(g_w["layers"][group][name]["kernel"], np.float64)
        for layer in range(2):
            A_l = A[layer].reshape(-1, A.shape[-1])
            want = s * A_l.T @ GW[layer].reshape(A_l.shape[0], -1)
            np.testing.assert_allclose(gb[layer].reshape(want.shape), want, rtol=1e-4, atol=1e-7)
        assert np.abs(gb).max() > 1e-6


def test_lora_steps_train_adapters_and_keep_base_frozen(setup):
    cfg, params = setup
    oc = ocfg(lora_targets=("q_proj", "v_proj", "o_proj", "up_proj"), weight_decay=0.1, grad_accum=2)
    opt = optim.make_optimizer(oc)
    base_copy = jax.tree_util.tree_map(np.array, params)
    state = step_lib.init_train_state(params, cfg, oc, opt, jax.random.PRNGKey(0))
    lora0 = jax.tree_util.tree_map(np.array, state["params"])
    assert set(state["params"]) == {"layers"}  # only adapters are trainable
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    rng = np.random.default_rng(4)
    A, B, T = 2, 2, 8
    b = dict(input_ids=rng.integers(0, V, (A, B, T)).astype(np.int32),
             targets=rng.integers(0, V, (A, B, T)).astype(np.int32),
             loss_mask=np.ones((A, B, T), np.float32), segment_ids=np.ones((A, B, T), np.int32),
             positions=np.broadcast_to(np.arange(T, dtype=np.int32), (A, B, T)).copy())
    h = {k: v[:, :1] for k, v in b.items()}
    step = jax.jit(step_lib.make_train_step(cfg, ob.ObjectiveConfig(kind="tasft", lam=0.3), oc, opt))
    losses = []
    for _ in range(4):
        state, metrics = step(state, b, h, E_hat)
        losses.append(float(metrics["loss"]))
    jax.tree_util.tree_map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), c), state["frozen"],
                           base_copy)
    jax.tree_util.tree_map(lambda a, c: np.testing.assert_array_equal(np.asarray(a), c), params, base_copy)
    for group, projs in state["params"]["layers"].items():
        for name, ab in projs.items():
            assert np.abs(np.asarray(ab["lora_b"])).max() > 1e-4, name
            a0 = lora0["layers"][group][name]["lora_a"]
            assert np.abs(np.asarray(ab["lora_a"]) - a0).max() > 1e-5, name
    assert losses[-1] < losses[0]  # fitting a fixed batch
    merged = optim.export_params(state, oc)
    assert not np.array_equal(np.asarray(merged["layers"]["attn"]["q_proj"]["kernel"]),
                              base_copy["layers"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(np.asarray(merged["layers"]["attn"]["k_proj"]["kernel"]),
                                  base_copy["layers"]["attn"]["k_proj"]["kernel"])


def test_bad_targets_are_rejected(setup):
    cfg, params = setup
    with pytest.raises(ConfigError, match="lora_targets"):
        lora.init_lora(params, cfg, ocfg(lora_targets=("q_proj", "qkv")), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="lora_targets"):
        lora.init_lora(params, cfg, ocfg(lora_targets=()), jax.random.PRNGKey(0))
