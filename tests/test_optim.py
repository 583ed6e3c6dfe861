"""semloss_jax.train.optim: schedule, exact gradient accumulation, last_k freezing, validation, state axes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from semloss_jax.errors import ConfigError, TrainError
from semloss_jax.loss import cost
from semloss_jax.loss import objective as ob
from semloss_jax.models import llama as model_lib
from semloss_jax.train import optim
from semloss_jax.train import sharding as S
from semloss_jax.train import state as state_lib
from semloss_jax.train import step as step_lib

V = 64


def tiny_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    base.update(kw)
    return model_lib.tiny_config(**base)


def micro_batches(rng, A, B, T, p_loss):
    """[A, B, T] batch; p_loss[a] is the loss-token rate of micro-batch a (uneven on purpose)."""
    seg = np.ones((A, B, T), np.int32)
    seg[:, :, T - 2:] = 0  # two padding slots per row
    mask = np.stack([rng.random((B, T)) < p for p in p_loss]) & (seg != 0)
    return dict(input_ids=rng.integers(0, V, (A, B, T)).astype(np.int32),
                targets=rng.integers(0, V, (A, B, T)).astype(np.int32),
                loss_mask=mask.astype(np.float32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (A, B, T)).copy(),
                segment_ids=seg)


def merge_micro(batch):
    """[A, B, T] -> [1, A*B, T]: the same examples as one large batch."""
    return {k: v.reshape((1, -1) + v.shape[2:]) for k, v in batch.items()}


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    return cfg, params, E_hat


def _path_name(path):
    return str(getattr(path[-1], "key", path[-1]))


def _tree_max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                               jax.tree_util.tree_leaves(b)))


# ------------------------------------------------------------------------------------------
# schedule


def test_schedule_warmup_then_cosine():
    oc = optim.OptimConfig(lr=2e-3, warmup_steps=4, total_steps=20, final_lr_ratio=0.1)
    s = optim.make_schedule(oc)
    got = np.array([float(s(i)) for i in range(25)])
    for i in range(4):
        assert got[i] == pytest.approx(2e-3 * (i + 1) / 4, rel=1e-6)
    for i in range(4, 25):
        t = min((i - 4) / 16, 1.0)
        assert got[i] == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))), rel=1e-5)
    assert got[0] > 0  # the first update is not wasted
    assert np.all(np.diff(got[:4]) > 0) and np.all(np.diff(got[4:21]) < 0)
    assert got[3] == pytest.approx(2e-3) and got[4] == pytest.approx(2e-3)
    assert got[24] == pytest.approx(2e-4, rel=1e-5)
    no_warm = optim.make_schedule(optim.OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10))
    assert float(no_warm(0)) == pytest.approx(1e-3)


def test_optimizer_matches_reference_adamw_with_clipping():
    """make_optimizer == a hand-written clip -> AdamW (decoupled decay on matrices only)."""
    oc = optim.OptimConfig(lr=1e-2, weight_decay=0.3, b1=0.8, b2=0.95, eps=1e-6, warmup_steps=2,
                           total_steps=5, clip_norm=0.5)
    opt = optim.make_optimizer(oc)
    sched = optim.make_schedule(oc)
    rng = np.random.default_rng(0)
    params = {"k": {"kernel": rng.normal(size=(3, 4))}, "n": {"scale": rng.normal(size=(4,))}}
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = opt.init(params)
    p_ref = jax.tree_util.tree_map(np.asarray, params)
    m = jax.tree_util.tree_map(np.zeros_like, p_ref)
    v = jax.tree_util.tree_map(np.zeros_like, p_ref)
    for t in range(4):
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), params)
        upd, state = opt.update(g, state, params)
        params = optax.apply_updates(params, upd)
        gn = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree_util.tree_leaves(g)))
        c = min(1.0, 0.5 / gn)
        lr = 1e-2 * min((t + 1) / 2, 1.0) if t < 2 else float(sched(t))
        for name, leaf, decay in (("k", "kernel", True), ("n", "scale", False)):
            gi = np.asarray(g[name][leaf], np.float64) * c
            m[name][leaf] = 0.8 * m[name][leaf] + 0.2 * gi
            v[name][leaf] = 0.95 * v[name][leaf] + 0.05 * gi * gi
            mh, vh = m[name][leaf] / (1 - 0.8 ** (t + 1)), v[name][leaf] / (1 - 0.95 ** (t + 1))
            u = mh / (np.sqrt(vh) + 1e-6) + (0.3 * p_ref[name][leaf] if decay else 0.0)
            p_ref[name][leaf] = p_ref[name][leaf] - lr * u
    for name, leaf in (("k", "kernel"), ("n", "scale")):
        np.testing.assert_allclose(np.asarray(params[name][leaf]), p_ref[name][leaf], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# gradient accumulation


def test_grad_accum_equals_one_large_batch(setup):
    """grad_accum=4 micro-batches (uneven token counts, one without harmful tokens) == one batch.

    The params after one AdamW step (+ clipping, weight decay) with grad_accum=4 and with one
    [4B] batch agree to 1e-6, and both equal the first AdamW step computed by hand from
    jax.grad of the whole-batch loss. (Adam's first step is lr * g / (|g| + eps): float32
    round-off in a gradient entry near 0 moves the update by up to lr * 1e-9 / eps, so this
    check uses lr = 1e-4, a fine-tuning learning rate.)
    """
    cfg, params, E_hat = setup
    obj = ob.ObjectiveConfig(kind="tasft", lam=0.8)
    rng = np.random.default_rng(1)
    benign = micro_batches(rng, 4, 2, 10, p_loss=(0.9, 0.1, 0.5, 0.7))
    harmful = micro_batches(rng, 4, 1, 10, p_loss=(0.0, 0.8, 0.3, 1.0))
    big_b, big_h = merge_micro(benign), merge_micro(harmful)
    lr, wd, eps, clip = 1e-4, 0.1, 1e-8, 1.0
    base = dict(lr=lr, weight_decay=wd, eps=eps, warmup_steps=0, total_steps=10, clip_norm=clip)

    def run(A, b, h):
        oc = optim.OptimConfig(grad_accum=A, **base)
        opt = optim.make_optimizer(oc)
        state = step_lib.init_train_state(params, cfg, oc, opt, jax.random.PRNGKey(0))
        return jax.jit(step_lib.make_train_step(cfg, obj, oc, opt))(state, b, h, E_hat)

    # the reference: the gradient of the loss of the whole batch, by jax.grad directly
    def one(x):
        return {k: v[0] for k, v in x.items()}

    counts = ob.global_counts(big_b, big_h)

    def loss_fn(p):
        return ob.combine(ob.loss_sums(p, cfg, one(big_b), one(big_h), E_hat, obj), counts, obj)

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(loss_fn))(params)
    ref_norm = float(optax.tree.norm(ref_grad))
    assert ref_norm > clip  # clipping is active

    def first_adamw_step(path, p, g):
        g = np.asarray(g, np.float64) * clip / ref_norm
        decay = _path_name(path) in ("kernel", "embedding")
        return np.asarray(p, np.float64) - lr * (g / (np.abs(g) + eps)
                                                 + (wd * np.asarray(p) if decay else 0.0))
    want = jax.tree_util.tree_map_with_path(first_adamw_step, params, ref_grad)

    s4, m4 = run(4, benign, harmful)
    s1, m1 = run(1, big_b, big_h)
    assert float(m4["loss"]) == pytest.approx(float(ref_loss), rel=1e-6, abs=1e-6)
    assert float(m1["loss"]) == pytest.approx(float(ref_loss), rel=1e-6, abs=1e-6)
    for k in ("ce", "emd_lower", "emd_upper", "emd_onehot", "harm_nll", "ul", "grad_norm", "lr",
              "ce_tokens", "harm_tokens", "tokens"):
        assert float(m4[k]) == pytest.approx(float(m1[k]), rel=1e-6, abs=1e-6), k
    assert float(m4["grad_norm"]) == pytest.approx(ref_norm, rel=1e-5)
    assert _tree_max_abs_diff(s4["params"], s1["params"]) < 1e-6
    assert _tree_max_abs_diff(s4["params"], want) < 1e-6
    assert _tree_max_abs_diff(s4["params"], params) > 5e-5  # and the step did move the params
    # token counts really are uneven across micro-batches (a mean of per-micro-batch means would differ)
    ce_sums = np.array([((benign["loss_mask"][a] != 0) & (benign["segment_ids"][a] != 0)).sum()
                        for a in range(4)])
    assert ce_sums.min() * 3 < ce_sums.max()


# ------------------------------------------------------------------------------------------
# last_k


def test_last_k_freezes_other_layers_bit_identical(setup):
    cfg = tiny_cfg(num_hidden_layers=3)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(5))
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    oc = optim.OptimConfig(lr=1e-2, weight_decay=0.5, trainable="last_k", last_k=1, grad_accum=2,
                           total_steps=10)
    opt = optim.make_optimizer(oc)
    state = step_lib.init_train_state(params, cfg, oc, opt, jax.random.PRNGKey(0))
    # frozen leaves (embedding, lm_head) carry no optimizer state
    adam_state = state["opt_state"][1].inner_state[0]
    assert isinstance(adam_state.mu["embed"]["embedding"], optax.MaskedNode)
    assert adam_state.mu["layers"]["attn"]["q_proj"]["kernel"].shape == (3, 32, 2, 16)
    step = jax.jit(step_lib.make_train_step(cfg, ob.ObjectiveConfig(kind="tasft", lam=0.5), oc, opt))
    rng = np.random.default_rng(2)
    for _ in range(3):
        b = micro_batches(rng, 2, 2, 8, (0.7, 0.7))
        h = micro_batches(rng, 2, 1, 8, (0.7, 0.7))
        state, metrics = step(state, b, h, E_hat)
        assert np.isfinite(float(metrics["loss"]))
    new = state["params"]
    for path, old in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [getattr(k, "key", k) for k in path]
        got = new
        for n in names:
            got = got[n]
        got, old = np.asarray(got), np.asarray(old)
        if names[0] == "layers":
            np.testing.assert_array_equal(got[:2], old[:2], err_msg=f"{names} frozen layers moved")
            assert np.abs(got[2] - old[2]).max() > 1e-3, f"{names} last layer did not train"
        elif names[0] == "final_norm":
            assert np.abs(got - old).max() > 1e-3
        else:
            np.testing.assert_array_equal(got, old, err_msg=f"{names} frozen leaf moved")


def test_trainable_mask_shapes_and_errors(setup):
    cfg, params, _ = setup
    m = optim.trainable_mask(params, cfg, optim.OptimConfig(trainable="last_k", last_k=1))
    assert m["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 1, 1, 1)
    assert m["layers"]["attn"]["q_proj"]["kernel"].ravel().tolist() == [False, True]
    assert m["embed"]["embedding"] is False and m["final_norm"]["scale"] is True
    with pytest.raises(ConfigError, match="last_k"):
        optim.trainable_mask(params, cfg, optim.OptimConfig(trainable="last_k", last_k=3))
    all_m = optim.trainable_mask(params, cfg, optim.OptimConfig(trainable="all"))
    assert all(x is True for x in jax.tree_util.tree_leaves(all_m))


def test_trainable_none_only_evaluates(setup):
    cfg, params, E_hat = setup
    oc = optim.OptimConfig(trainable="none", grad_accum=1)
    opt = optim.make_optimizer(oc)
    state = step_lib.init_train_state(params, cfg, oc, opt, jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    b = micro_batches(rng, 1, 2, 8, (0.7,))
    new, metrics = jax.jit(step_lib.make_train_step(cfg, ob.ObjectiveConfig(kind="sft", lam=0.0), oc, opt))(
        state, b, None, E_hat)
    assert _tree_max_abs_diff(new["params"], params) == 0.0
    assert float(metrics["loss"]) == pytest.approx(float(metrics["ce"])) and float(metrics["loss"]) > 1.0
    assert int(new["step"]) == 1 and not np.array_equal(np.asarray(new["rng"]), np.asarray(state["rng"]))


# ------------------------------------------------------------------------------------------
# validation and state layout


@pytest.mark.parametrize("kw,field", [
    (dict(lr=-1.0), "lr"), (dict(grad_accum=0), "grad_accum"), (dict(grad_accum=2.0), "grad_accum"),
    (dict(trainable="some"), "trainable"), (dict(trainable="last_k", last_k=0), "last_k"),
    (dict(trainable="lora", lora_targets=("qproj",)), "lora_targets"), (dict(eps=0.0), "eps"),
    (dict(b2=1.5), "b2"), (dict(clip_norm=0.0), "clip_norm"), (dict(total_steps=0), "total_steps"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"optim\.{field}"):
        optim.OptimConfig(**kw).validate()


def test_step_rejects_wrong_micro_batch_count(setup):
    cfg, params, E_hat = setup
    oc = optim.OptimConfig(grad_accum=2)
    opt = optim.make_optimizer(oc)
    state = step_lib.init_train_state(params, cfg, oc, opt, jax.random.PRNGKey(0))
    step = step_lib.make_train_step(cfg, ob.ObjectiveConfig(kind="sft", lam=0.0), oc, opt)
    b = micro_batches(np.random.default_rng(0), 3, 1, 4, (0.5,) * 3)
    with pytest.raises(TrainError, match="grad_accum"):
        step(state, b, None, E_hat)
    with pytest.raises(TrainError, match="harmful"):
        step_lib.make_train_step(cfg, ob.ObjectiveConfig(kind="tasft", lam=1.0), oc, opt)(
            state, micro_batches(np.random.default_rng(0), 2, 1, 4, (0.5,) * 2), None, E_hat)


@pytest.mark.parametrize("trainable", ["all", "last_k", "lora"])
def test_state_plan_shards_adam_moments_like_their_params(setup, trainable):
    """The train state's shardings (state.plan_state, via sharding.state_specs) match the state
    tree, and Adam's moments take exactly the specs of the params they mirror."""
    cfg, _, _ = setup
    oc = optim.OptimConfig(trainable=trainable, last_k=1, lora_targets=("q_proj", "o_proj", "up_proj"))
    plan = state_lib.plan_state(cfg, oc, AbstractMesh((1, 2, 2), S.MESH_AXES))
    state, specs = plan.abstract_state, plan.state_specs

    def is_spec(x):
        return isinstance(x, PartitionSpec)

    s_leaves, s_def = jax.tree_util.tree_flatten(state)
    a_leaves, a_def = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    assert s_def == a_def
    for s, a in zip(s_leaves, a_leaves):
        assert len(a) <= len(s.shape), (s.shape, a)

    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)

    (adam,) = [x for x in jax.tree_util.tree_leaves(specs["opt_state"], is_leaf=is_adam) if is_adam(x)]
    p_specs = dict(jax.tree_util.tree_flatten_with_path(specs["params"], is_leaf=is_spec)[0])
    moments = [jax.tree_util.tree_flatten_with_path(m, is_leaf=is_spec)[0] for m in (adam.mu, adam.nu)]
    for flat in moments:
        for path, spec in flat:
            assert spec == p_specs[path], (path, spec, p_specs[path])
    n_trainable = len(jax.tree_util.tree_leaves(state["params"]))
    # Adam mu and nu follow the params (last_k: no state for the frozen embedding and lm_head)
    assert sum(len(f) for f in moments) == 2 * n_trainable - (4 if trainable == "last_k" else 0)
    assert any(len(spec) > 0 for flat in moments for _, spec in flat)  # something is sharded
