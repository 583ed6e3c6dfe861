"""semloss_jax.loss.objective: values against numpy references, boundedness, masks, gradients, no V x V."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numeric import central_differences, jaxpr_shapes

from semloss_jax.errors import ConfigError, LossError
from semloss_jax.loss import cost
from semloss_jax.loss import objective as ob
from semloss_jax.models import llama as model_lib
from semloss_jax.train import optim
from semloss_jax.train import step as step_lib

V, D = 64, 32


def tiny_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    base.update(kw)
    return model_lib.tiny_config(**base)


def make_batch(rng, B, T, vocab=V, p_loss=0.6, pad_tail=0, d=None):
    """A batch dict [B, T]; the last `pad_tail` positions of each row are padding."""
    seg = np.ones((B, T), np.int32)
    if pad_tail:
        seg[:, T - pad_tail:] = 0
    b = dict(input_ids=rng.integers(0, vocab, (B, T)).astype(np.int32),
             targets=rng.integers(0, vocab, (B, T)).astype(np.int32),
             loss_mask=((rng.random((B, T)) < p_loss) & (seg != 0)).astype(np.float32),
             positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
             segment_ids=seg)
    if d is not None:
        q = rng.dirichlet(np.full(vocab, 0.3), size=(B, T))
        b["_q"] = q
    return b


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    E = np.asarray(model_lib.embedding_matrix(params), np.float64)
    E_hat64 = E / np.linalg.norm(E, axis=-1, keepdims=True)
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    return cfg, params, E_hat, E_hat64


# ------------------------------------------------------------------------------------------
# numpy reference


def np_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_reference(b_logits, benign, h_logits, harmful, E_hat64, obj, mu_q=None):
    """Direct float64 computation of every sum and of the loss."""
    mb = (benign["loss_mask"] != 0) & (benign["segment_ids"] != 0)
    pb = np_softmax(b_logits)
    ce = -np.log(np.take_along_axis(pb, benign["targets"][..., None], -1)[..., 0])
    out = {"ce_sum": ce[mb].sum(), "ce_count": mb.sum()}
    mh = (harmful["loss_mask"] != 0) & (harmful["segment_ids"] != 0)
    ph = np_softmax(h_logits)
    y = harmful["targets"]
    py = np.take_along_axis(ph, y[..., None], -1)[..., 0]
    mu = ph @ E_hat64
    e_y = E_hat64[y]
    # exact one-hot EMD from its definition: the only coupling is p ⊗ δ_y, cost c(u, y) = 1 - ê_u·ê_y
    C_col = 1.0 - np.einsum("vd,btd->btv", E_hat64, e_y)
    emd_exact = (ph * C_col).sum(-1)
    mq = e_y if mu_q is None else mu_q
    lb = 0.5 * ((mu - mq) ** 2).sum(-1)
    ub = 1.0 - (mu * mq).sum(-1)
    nll = -np.log(py)
    nll_c = nll if obj.nll_clip is None else np.minimum(nll, obj.nll_clip)
    ul = -np.log1p(-py)
    div = {"lower_bound": lb, "upper_bound": ub, "exact_onehot": emd_exact}[obj.divergence]
    out.update(harm_count=mh.sum(), div_sum=div[mh].sum(), lower_sum=lb[mh].sum(), upper_sum=ub[mh].sum(),
               emd_onehot_sum=emd_exact[mh].sum(), harm_nll_sum=nll[mh].sum(),
               harm_nll_clip_sum=nll_c[mh].sum(), ul_sum=ul[mh].sum())
    ce_mean = out["ce_sum"] / out["ce_count"]
    hc = out["harm_count"]
    loss = {"sft": ce_mean, "safeinstr": ce_mean + obj.lam * out["harm_nll_sum"] / hc,
            "tasft": ce_mean - obj.lam * out["div_sum"] / hc,
            "nll_ascent": ce_mean - obj.lam * out["harm_nll_clip_sum"] / hc,
            "unlikelihood": ce_mean + obj.lam * out["ul_sum"] / hc}[obj.kind]
    return out, loss


OBJECTIVES = [
    ob.ObjectiveConfig(kind="sft", lam=0.0),
    ob.ObjectiveConfig(kind="safeinstr", lam=0.0),
    ob.ObjectiveConfig(kind="safeinstr", lam=1.0),    # the refusal stream in the harmful slot
    ob.ObjectiveConfig(kind="tasft", lam=0.7, divergence="lower_bound"),
    ob.ObjectiveConfig(kind="tasft", lam=0.7, divergence="exact_onehot"),
    ob.ObjectiveConfig(kind="tasft", lam=0.7, divergence="upper_bound"),
    ob.ObjectiveConfig(kind="tasft", lam=0.7, divergence="lower_bound", target="soft"),
    ob.ObjectiveConfig(kind="tasft", lam=0.7, divergence="upper_bound", target="soft"),
    ob.ObjectiveConfig(kind="nll_ascent", lam=0.3),
    ob.ObjectiveConfig(kind="nll_ascent", lam=0.3, nll_clip=4.0),
    ob.ObjectiveConfig(kind="unlikelihood", lam=0.5),
]


@pytest.fixture(scope="module")
def model_case(setup):
    """Real tiny-model logits for a benign and a harmful batch (with padding), computed once."""
    cfg, params, E_hat, E_hat64 = setup
    rng = np.random.default_rng(1)
    benign = make_batch(rng, 3, 12, pad_tail=3)
    harmful = make_batch(rng, 2, 12, pad_tail=2)
    q = rng.dirichlet(np.full(V, 0.3), size=(2, 12))
    harmful["target_mu"] = (q @ np.asarray(E_hat, np.float64)).astype(np.float32)
    # make the harmful logits more peaked so nll_clip and unlikelihood are exercised
    params_sharp = dict(params, lm_head={"kernel": params["lm_head"]["kernel"] * 40.0})
    fwd = jax.jit(lambda p, ids, pos, seg: model_lib.forward(p, cfg, ids, positions=pos, segment_ids=seg))
    b_logits = fwd(params, benign["input_ids"], benign["positions"], benign["segment_ids"])
    h_logits = fwd(params_sharp, harmful["input_ids"], harmful["positions"], harmful["segment_ids"])
    return benign, harmful, b_logits, h_logits, params_sharp, fwd


@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: f"{o.kind}-{o.divergence}-{o.target}-{o.nll_clip}")
def test_values_match_numpy_reference(setup, model_case, obj):
    cfg, params, E_hat, E_hat64 = setup
    benign, harmful, b_logits, h_logits, _, _ = model_case
    obj.validate()
    sums = ob.sums_from_logits(b_logits, benign, h_logits, harmful, E_hat, obj)
    counts = ob.global_counts(benign, harmful)
    loss = float(ob.combine(sums, counts, obj))
    mu_q = np.asarray(harmful["target_mu"], np.float64) if obj.target == "soft" else None
    ref, ref_loss = np_reference(np.asarray(b_logits), benign, np.asarray(h_logits), harmful, E_hat64, obj,
                                 mu_q)
    assert set(sums) == set(ref) == set(ob.SUM_KEYS_BENIGN + ob.SUM_KEYS_HARMFUL)
    assert all(v.shape == () and v.dtype == jnp.float32 for v in sums.values())
    for k, v in ref.items():
        np.testing.assert_allclose(float(sums[k]), v, rtol=2e-5, atol=2e-5, err_msg=k)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-5)
    assert float(counts["ce_count"]) == ref["ce_count"] and float(counts["harm_count"]) == ref["harm_count"]
    # the case is non-trivial: clipping bites and bounds are ordered LB <= EMD = UB (one-hot)
    if obj.nll_clip is not None:
        assert ref["harm_nll_clip_sum"] < ref["harm_nll_sum"] - 1.0
    assert ref["lower_sum"] <= ref["emd_onehot_sum"] + 1e-9


def test_loss_sums_runs_the_model(setup, model_case):
    """loss_sums == sums_from_logits(forward(...)), for the one-forward (same T) and two-forward paths."""
    cfg, params, E_hat, _ = setup
    benign, harmful, _, h_logits, params_sharp, fwd_ids = model_case
    obj = ob.ObjectiveConfig(kind="tasft", lam=0.5)

    def fwd(p, b):
        return fwd_ids(p, b["input_ids"], b["positions"], b["segment_ids"])
    sums = jax.jit(lambda p, b, h: ob.loss_sums(p, cfg, b, h, E_hat, obj))
    bare = {k: v for k, v in harmful.items() if k != "target_mu"}
    b_logits = fwd(params_sharp, benign)
    ref = ob.sums_from_logits(b_logits, benign, h_logits, harmful, E_hat, obj)
    fused = sums(params_sharp, benign, bare)
    for k in ref:
        np.testing.assert_allclose(fused[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    short = {k: v[:, :7] for k, v in bare.items()}  # different T: two forwards
    ref2 = ob.sums_from_logits(b_logits, benign, fwd(params_sharp, short), short, E_hat, obj)
    two = sums(params_sharp, benign, short)
    for k in ref2:
        np.testing.assert_allclose(two[k], ref2[k], rtol=1e-5, atol=1e-5, err_msg=k)


# ------------------------------------------------------------------------------------------
# boundedness


def _logit_case(seed, B=2, T=6, v=V, d=16):
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(v, d))
    E_hat = jnp.asarray(E / np.linalg.norm(E, axis=-1, keepdims=True), jnp.float32)
    benign = make_batch(rng, B, T, vocab=v, p_loss=0.8)
    harmful = make_batch(rng, B, T, vocab=v, p_loss=0.8)
    return rng, E_hat, benign, harmful


def _loss_of_harmful_logits(obj, benign, harmful, E_hat, b_logits):
    counts = ob.global_counts(benign, harmful)

    def f(h_logits):
        sums = ob.sums_from_logits(b_logits, benign, h_logits, harmful, E_hat, obj)
        return ob.combine(sums, counts, obj), sums
    return jax.jit(f)


@pytest.mark.parametrize("divergence", ["lower_bound", "exact_onehot", "upper_bound"])
def test_tasft_bounded_below_random_and_adversarial(divergence):
    lam = 1.5
    rng, E_hat, benign, harmful = _logit_case(0)
    b_logits = jnp.asarray(rng.normal(size=(2, 6, V)) * 3, jnp.float32)
    obj = ob.ObjectiveConfig(kind="tasft", lam=lam, divergence=divergence).validate()
    f = _loss_of_harmful_logits(obj, benign, harmful, E_hat, b_logits)
    ce = float(ob.benign_sums(b_logits, benign)["ce_sum"]) / float(ob.global_counts(benign)["ce_count"])
    # random logits at several scales (peaked ones included)
    for scale in (0.1, 1.0, 10.0, 100.0, 1e4):
        z = jnp.asarray(rng.normal(size=(2, 6, V)) * scale, jnp.float32)
        loss, sums = f(z)
        assert np.isfinite(float(loss))
        assert float(loss) >= ce - 2 * lam - 1e-5
        assert 0.0 <= float(sums["div_sum"]) <= 2.0 * float(sums["harm_count"]) + 1e-4
    # adversarial 1: all mass on the token farthest (in cost) from each harmful target
    far = jnp.argmin(E_hat[harmful["targets"]] @ E_hat.T, axis=-1)
    z = 1e3 * jax.nn.one_hot(far, V)
    loss, _ = f(z)
    assert float(loss) >= ce - 2 * lam - 1e-5
    # adversarial 2: gradient descent on the loss w.r.t. the harmful logits
    g = jax.jit(jax.value_and_grad(lambda z: f(z)[0]))
    z = jnp.asarray(rng.normal(size=(2, 6, V)), jnp.float32)
    first = float(g(z)[0])
    for _ in range(300):
        val, grad = g(z)
        z = z - 50.0 * grad
    assert float(val) < first - 0.1  # the optimisation did push D up
    assert float(val) >= ce - 2 * lam - 1e-5


def test_nll_ascent_unbounded_but_clip_bounds_it():
    lam = 1.5
    rng, E_hat, benign, harmful = _logit_case(1)
    b_logits = jnp.asarray(rng.normal(size=(2, 6, V)), jnp.float32)
    ce = float(ob.benign_sums(b_logits, benign)["ce_sum"]) / float(ob.global_counts(benign)["ce_count"])
    y = jax.nn.one_hot(harmful["targets"], V)
    for clip, expect_unbounded in ((None, True), (5.0, False)):
        obj = ob.ObjectiveConfig(kind="nll_ascent", lam=lam, nll_clip=clip).validate()
        f = _loss_of_harmful_logits(obj, benign, harmful, E_hat, b_logits)
        losses = [float(f(-s * y)[0]) for s in (1.0, 100.0, 1e4)]  # push p(y) -> 0
        if expect_unbounded:
            assert losses[-1] < ce - 1000 * lam  # far below any bound, and still decreasing
            assert losses[0] > losses[1] > losses[2]
        else:
            assert min(losses) >= ce - lam * clip - 1e-4


def test_unlikelihood_stable_when_p_is_one():
    rng, E_hat, benign, harmful = _logit_case(2)
    b_logits = jnp.zeros((2, 6, V), jnp.float32)
    obj = ob.ObjectiveConfig(kind="unlikelihood", lam=1.0).validate()
    f = _loss_of_harmful_logits(obj, benign, harmful, E_hat, b_logits)
    y = jax.nn.one_hot(harmful["targets"], V)
    for s in (1.0, 10.0, 30.0, 1e3):  # p(y) from moderate to exactly 1.0 in float32
        (val, sums), grad = jax.value_and_grad(f, has_aux=True)(s * y)
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))
        per_tok = float(sums["ul_sum"]) / float(sums["harm_count"])
        assert per_tok <= -np.log(ob.UL_EPS) + 1e-3
    # moderate p: matches float64 -log(1-p) (checked in the reference test too), and grows with p
    lo = float(f(1.0 * y)[1]["ul_sum"])
    hi = float(f(5.0 * y)[1]["ul_sum"])
    assert hi > lo > 0


# ------------------------------------------------------------------------------------------
# gradients w.r.t. logits vs finite differences


@pytest.mark.parametrize("kind,divergence,target,clip", [
    ("tasft", "lower_bound", "onehot", None), ("tasft", "exact_onehot", "onehot", None),
    ("tasft", "upper_bound", "onehot", None), ("tasft", "lower_bound", "soft", None),
    ("tasft", "gelbrich", "onehot", None),
    ("nll_ascent", "lower_bound", "onehot", None), ("nll_ascent", "lower_bound", "onehot", 4.0),
    ("unlikelihood", "lower_bound", "onehot", None), ("safeinstr", "lower_bound", "onehot", None)])
def test_harmful_term_grad_matches_finite_differences(kind, divergence, target, clip):
    """The gradient of the whole objective w.r.t. benign and harmful logits, for every kind
    with a harmful term (the term that drives each kind must keep its gradient)."""
    v, d = 12, 5
    rng = np.random.default_rng(3)
    E = rng.normal(size=(v, d))
    E_hat = jnp.asarray(E / np.linalg.norm(E, axis=-1, keepdims=True), jnp.float32)
    benign = make_batch(rng, 1, 4, vocab=v, p_loss=0.7)
    harmful = make_batch(rng, 1, 4, vocab=v, p_loss=0.7)
    harmful["loss_mask"][0, 0] = 1.0
    harmful["target_mu"] = (rng.dirichlet(np.ones(v), size=(1, 4))
                            @ np.asarray(E_hat, np.float64)).astype(np.float32)
    obj = ob.ObjectiveConfig(kind=kind, lam=0.8, divergence=divergence, target=target,
                             nll_clip=clip, gelbrich_rank=3).validate()  # rank < d: a projection
    counts = ob.global_counts(benign, harmful)

    @jax.jit
    def f(zb, zh):
        return ob.combine(ob.sums_from_logits(zb, benign, zh, harmful, E_hat, obj), counts, obj)

    zb = jnp.asarray(rng.normal(size=(1, 4, v)), jnp.float32)
    zh = jnp.asarray(rng.normal(size=(1, 4, v)) * 2, jnp.float32)
    gb, gh = jax.grad(f, argnums=(0, 1))(zb, zh)
    assert float(jnp.abs(gh).max()) > 1e-3  # the harmful term does carry gradient
    if clip is not None:  # the clip cuts some harmful tokens and not others
        logp = np.asarray(jax.nn.log_softmax(zh))
        nll = -np.take_along_axis(logp, harmful["targets"][..., None], -1)[..., 0]
        on = nll[harmful["loss_mask"] > 0]
        assert (on > clip + 0.1).any() and (on < clip - 0.1).any()
    h = 1e-2
    for which, z, g in (("benign", zb, gb), ("harmful", zh, gh)):
        num = central_differences((lambda v: f(v, zh)) if which == "benign" else (lambda v: f(zb, v)), z, h)
        np.testing.assert_allclose(np.asarray(g).ravel(), num, atol=3e-4, rtol=1e-2, err_msg=which)


# ------------------------------------------------------------------------------------------
# masks


def test_masked_targets_change_nothing(setup):
    """Targets (and soft targets, and loss_mask on padding) at non-loss positions leave the loss
    and the gradient w.r.t. the params bit-identical."""
    cfg, params, E_hat, _ = setup
    rng = np.random.default_rng(4)
    benign = make_batch(rng, 2, 10, pad_tail=3)
    harmful = make_batch(rng, 2, 10, pad_tail=2)
    harmful["target_mu"] = rng.normal(size=(2, 10, D)).astype(np.float32)
    obj_soft = ob.ObjectiveConfig(kind="tasft", lam=0.9, target="soft")

    def perturb(b, rng):
        b = {k: np.array(v) for k, v in b.items()}
        off = (b["loss_mask"] == 0) | (b["segment_ids"] == 0)
        b["targets"] = np.where(off, rng.integers(0, V, off.shape), b["targets"]).astype(np.int32)
        b["targets"][off & (rng.random(off.shape) < 0.3)] = -100  # ignore-index style values are fine too
        if "target_mu" in b:
            b["target_mu"] = np.where(off[..., None], np.nan, b["target_mu"]).astype(np.float32)
        pad = b["segment_ids"] == 0
        b["loss_mask"] = np.where(pad, 1.0, b["loss_mask"]).astype(np.float32)  # pad: no loss
        b["input_ids"] = np.where(pad, rng.integers(0, V, off.shape), b["input_ids"]).astype(np.int32)
        return b

    for obj in (obj_soft, ob.ObjectiveConfig(kind="unlikelihood", lam=0.9)):
        def loss(p, b, h, obj=obj):
            return ob.combine(ob.loss_sums(p, cfg, b, h, E_hat, obj), ob.global_counts(b, h), obj)
        vg = jax.jit(jax.value_and_grad(loss))
        l0, g0 = vg(params, benign, harmful)
        l1, g1 = vg(params, perturb(benign, rng), perturb(harmful, rng))
        assert np.isfinite(float(l0))
        assert float(l0) == float(l1), obj
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               g0, g1)
    # ... while changing a target that DOES carry loss changes the loss
    h2 = {k: np.array(v) for k, v in harmful.items()}
    t, s = np.argwhere(h2["loss_mask"] != 0)[0]
    h2["targets"][t, s] = (h2["targets"][t, s] + 1) % V
    l2, g2 = vg(params, benign, h2)  # (unlikelihood)
    assert float(l2) != float(l0)
    assert not np.array_equal(np.asarray(g2["lm_head"]["kernel"]), np.asarray(g0["lm_head"]["kernel"]))


def test_global_counts_and_stacked_batches():
    rng = np.random.default_rng(5)
    bs = [make_batch(rng, 2, 8, pad_tail=i) for i in range(3)]
    stacked = {k: np.stack([b[k] for b in bs]) for k in bs[0]}
    want = sum(((b["loss_mask"] != 0) & (b["segment_ids"] != 0)).sum() for b in bs)
    assert float(ob.global_counts(bs)["ce_count"]) == want
    assert float(ob.global_counts(stacked, stacked)["harm_count"]) == want
    assert float(ob.global_counts(stacked, None)["harm_count"]) == 0.0


def test_sft_ignores_harmful_and_combine_errors():
    s = {"ce_sum": jnp.float32(6.0), "ce_count": jnp.float32(3.0)}
    sft = ob.ObjectiveConfig(kind="sft", lam=0.0)
    assert float(ob.combine(s, {"ce_count": jnp.float32(3.0)}, sft)) == 2.0
    with pytest.raises(LossError, match="harmful"):
        ob.combine(s, {"ce_count": jnp.float32(3.0)}, ob.ObjectiveConfig(kind="tasft", lam=1.0))


@pytest.mark.parametrize("kw,field", [
    (dict(kind="ppo"), "kind"), (dict(lam=-1.0), "lam"), (dict(lam=float("nan")), "lam"),
    (dict(divergence="kl"), "divergence"), (dict(target="probs"), "target"),
    (dict(divergence="exact_onehot", target="soft"), "divergence"), (dict(nll_clip=0.0), "nll_clip"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"objective\.{field}"):
        ob.ObjectiveConfig(**kw).validate()


def test_soft_target_requires_target_mu():
    rng, E_hat, benign, harmful = _logit_case(6, d=16)
    z = jnp.zeros((2, 6, V))
    with pytest.raises(LossError, match="target_mu"):
        ob.sums_from_logits(z, benign, z, harmful, E_hat, ob.ObjectiveConfig(target="soft"))


# ------------------------------------------------------------------------------------------
# no V x V array anywhere in the train step


def _max_vocab_dims(shapes, v):
    return max((sum(int(s) >= v for s in shape) for shape in shapes), default=0)


def test_jaxpr_walker_detects_vxv():
    """The checker itself can fail: a cost matrix Ê Ê^T is found."""
    E = jax.ShapeDtypeStruct((49152, 8), jnp.float32)
    jp = jax.make_jaxpr(lambda e: jnp.sum(1.0 - e @ e.T))(E)
    assert _max_vocab_dims(jaxpr_shapes(jp), 49152) == 2


@pytest.mark.parametrize("trainable,obj", [
    ("all", ob.ObjectiveConfig(kind="tasft", lam=1.0, divergence="lower_bound")),
    ("lora", ob.ObjectiveConfig(kind="tasft", lam=1.0, divergence="upper_bound", target="soft")),
    ("all", ob.ObjectiveConfig(kind="unlikelihood", lam=1.0)),
    ("all", ob.ObjectiveConfig(kind="tasft", lam=1.0, divergence="gelbrich", gelbrich_rank=4)),
])
def test_train_step_has_no_vxv_array(trainable, obj):
    v = 49_152
    cfg = tiny_cfg(vocab_size=v, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                   num_attention_heads=1, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    ocfg = optim.OptimConfig(trainable=trainable, grad_accum=2, lora_targets=("q_proj", "down_proj"))
    opt = optim.make_optimizer(ocfg)
    params = model_lib.abstract_params(cfg)
    state = jax.eval_shape(lambda k: step_lib.init_train_state(
        jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params), cfg, ocfg, opt, k),
        jax.random.PRNGKey(0))
    A, B, T = 2, 1, 4
    i32 = jax.ShapeDtypeStruct((A, B, T), jnp.int32)
    batch = dict(input_ids=i32, targets=i32, loss_mask=jax.ShapeDtypeStruct((A, B, T), jnp.float32),
                 positions=i32, segment_ids=i32)
    harmful = dict(batch, target_mu=jax.ShapeDtypeStruct((A, B, T, 8), jnp.float32))
    E_hat = jax.ShapeDtypeStruct((v, 8), jnp.float32)
    step = step_lib.make_train_step(cfg, obj, ocfg, opt)
    jp = jax.make_jaxpr(step)(state, batch, harmful, E_hat)
    shapes = jaxpr_shapes(jp)
    assert len(shapes) > 100
    assert _max_vocab_dims(shapes, v) == 1  # [.., V] arrays exist (logits, Ê) ...
    assert max(int(np.prod(s)) for s in shapes) < v * 64  # ... nothing V x V
