"""The Gelbrich lower bound (means plus covariances, loss.emd) and the Bures distance (loss.bures).

The exact EMD comes from the LP (ot_exact.emd_lp, float64 HiGHS) on small V.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from numeric import central_differences, jaxpr_shapes

from semloss_jax.errors import ConfigError, LossError
from semloss_jax.loss import bures, cost, emd
from semloss_jax.loss import objective as ob
from semloss_jax.loss.ot_exact import emd_lp
from semloss_jax.train import config as C
from semloss_jax.train import loop as train_loop

TOL = 3e-5  # fp32 bounds vs float64 LP
SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"

_bound = jax.jit(emd.gelbrich_bound, static_argnames=("kind",))
_lower = jax.jit(emd.lower_bound, static_argnames=("kind",))


def _embeddings(rng, V, d):
    return cost.unit_embeddings(rng.normal(size=(V, d)))


def _lp(p, q, E_hat):
    E = np.asarray(E_hat, np.float64)
    return emd_lp(np.asarray(p, np.float64), np.asarray(q, np.float64), np.clip(1.0 - E @ E.T, 0, 2))


def _rand_psd(rng, r, rank=None, ridge=0.0):
    X = rng.normal(size=(r, rank or r))
    return jnp.asarray(X @ X.T + ridge * np.eye(r))


# ----------------------------------------------------------------------------- Bures


def test_fidelity_matches_scipy_sqrtm_and_bures_is_a_distance():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for r in (1, 3, 6):
            A, B = _rand_psd(rng, r, ridge=0.1), _rand_psd(rng, r, ridge=0.1)
            sA = scipy.linalg.sqrtm(np.asarray(A))
            ref = np.trace(scipy.linalg.sqrtm(sA @ np.asarray(B) @ sA)).real
            assert float(bures.fidelity(A, B)) == pytest.approx(ref, rel=1e-10)
            assert float(bures.fidelity(A, B)) == pytest.approx(float(bures.fidelity(B, A)), rel=1e-10)
            assert float(bures.bures_squared(A, A)) == pytest.approx(0.0, abs=1e-10)
            assert float(bures.bures_squared(A, jnp.zeros_like(A))) == pytest.approx(float(jnp.trace(A)))
        # commuting (diagonal) case: B² = Σ (√a - √b)²
        a, b = rng.uniform(0, 2, 5), rng.uniform(0, 2, 5)
        got = float(bures.bures_squared(jnp.diag(a), jnp.diag(b)))
        assert got == pytest.approx(float(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)), rel=1e-10)


def test_fidelity_gradient_matches_central_differences():
    """The custom JVP against central differences along symmetric directions (well conditioned)."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        for r in (1, 2, 5):
            A, B = _rand_psd(rng, r, ridge=0.5), _rand_psd(rng, r, ridge=0.5)
            dA, dB = (jnp.asarray((x + x.T) / 2) for x in (rng.normal(size=(r, r)),
                                                          rng.normal(size=(r, r))))
            _, tangent = jax.jvp(bures.fidelity, (A, B), (dA, dB))
            h = 1e-6
            fd = (bures.fidelity(A + h * dA, B + h * dB) - bures.fidelity(A - h * dA, B - h * dB)) / (2 * h)
            assert float(tangent) == pytest.approx(float(fd), rel=1e-7, abs=1e-9)
            g = jax.grad(bures.fidelity, argnums=(0, 1))(A, B)
            assert float(jnp.sum(g[0] * dA) + jnp.sum(g[1] * dB)) == pytest.approx(float(tangent), rel=1e-9)


def test_bures_gradient_is_finite_for_rank_deficient_covariances():
    """Low-rank covariances (peaked distributions) have repeated zero eigenvalues: eigh's own
    derivative divides by eigenvalue gaps; the custom JVP must stay finite."""
    rng = np.random.default_rng(2)
    A, B = _rand_psd(rng, 6, rank=2), _rand_psd(rng, 6, rank=1)
    for fn in (lambda a: bures.bures_squared(a, B), lambda a: bures.bures_squared(a, jnp.zeros_like(a)),
               lambda a: bures.bures_squared(a, a + 0.0)):
        g = jax.grad(fn)(A)
        assert bool(jnp.all(jnp.isfinite(g)))
    # against zero: B²(A, 0) = tr A, whose gradient is the identity
    np.testing.assert_allclose(np.asarray(jax.grad(lambda a: bures.bures_squared(a, jnp.zeros((6, 6))))(A)),
                               np.eye(6), atol=1e-6)


# ----------------------------------------------------------------------------- the bound


def test_projected_moments_match_a_dense_computation():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        E = _embeddings(rng, 11, 6)
        p = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 11))), axis=-1)
        for r in (1, 4, 6):
            Pi = emd.principal_basis(E, r)
            np.testing.assert_allclose(np.asarray(Pi @ Pi.T), np.eye(r), atol=1e-10)
            mu, cov = emd.projected_moments(p, E, Pi)
            En, pn, Pn = np.asarray(E), np.asarray(p), np.asarray(Pi)
            mu_ref = pn @ En
            full = np.einsum("...v,vi,vj->...ij", pn, En, En) - mu_ref[..., :, None] * mu_ref[..., None, :]
            np.testing.assert_allclose(np.asarray(mu), mu_ref, atol=1e-12)
            np.testing.assert_allclose(np.asarray(cov), Pn @ full @ Pn.T, atol=1e-12)
    # nested bases: each basis is a prefix of the larger ones
    np.testing.assert_allclose(np.asarray(emd.principal_basis(E, 3)),
                               np.asarray(emd.principal_basis(E, 5))[:3])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.sampled_from([2, 5, 8]), d=st.sampled_from([2, 3, 6]),
       temp=st.sampled_from([0.3, 1.0, 3.0, 10.0]))
def test_lb_le_gelbrich_le_emd_and_monotone_in_r(seed, V, d, temp):
    rng = np.random.default_rng(seed)
    E = _embeddings(rng, V, d)
    zp, zq = (jnp.asarray(rng.normal(size=V) * temp, jnp.float32) for _ in range(2))
    p, q = emd.probs_from_logits(zp), emd.probs_from_logits(zq)
    exact = _lp(p, q, E)
    prev = float(_lower(zp, zq, E, kind="logits"))
    for r in range(1, d + 1):
        g = float(_bound(zp, zq, E, emd.principal_basis(E, r), kind="logits"))
        assert g >= prev - TOL, (r, g, prev)  # LB <= LB_G(1) <= LB_G(2) <= ...
        assert g <= exact + TOL, (r, g, exact)
        prev = g


@pytest.mark.parametrize("V,d", [(40, 3), (64, 32), (200, 16)])
def test_bound_in_low_and_high_dimension_with_near_onehot_identical_and_disjoint_supports(V, d):
    rng = np.random.default_rng(V + d)
    E = _embeddings(rng, V, d)
    full, low = emd.principal_basis(E), emd.principal_basis(E, max(1, d // 4))
    peaked = jnp.zeros(V, jnp.float32).at[5].set(12.0) + jnp.asarray(rng.normal(size=V), jnp.float32)
    cases = {
        "near one-hot": (peaked, jnp.asarray(rng.normal(size=V), jnp.float32)),
        "identical": (peaked, peaked),
        "disjoint": (jnp.where(jnp.arange(V) < V // 2, 0.0, -1e4).astype(jnp.float32),
                     jnp.where(jnp.arange(V) < V // 2, -1e4, 0.0).astype(jnp.float32)),
    }
    for name, (zp, zq) in cases.items():
        exact = _lp(emd.probs_from_logits(zp), emd.probs_from_logits(zq), E)
        lb = float(emd.lower_bound(zp, zq, E, kind="logits"))
        g_low = float(emd.gelbrich_bound(zp, zq, E, low, kind="logits"))
        g_full = float(emd.gelbrich_bound(zp, zq, E, full, kind="logits"))
        assert lb - TOL <= g_low <= g_full + TOL <= exact + 2 * TOL, (name, lb, g_low, g_full, exact)
        if name == "identical":
            assert abs(g_full) < 1e-5 and abs(exact) < 1e-6


def test_equality_cases():
    rng = np.random.default_rng(4)
    E = _embeddings(rng, 30, 8)
    full = emd.principal_basis(E)
    # both covariances vanish (one-hot p and q): LB_G = LB, for any basis
    p1, q1 = jax.nn.one_hot(3, 30), jax.nn.one_hot(17, 30)
    for Pi in (full, emd.principal_basis(E, 2)):
        mu_p, cov_p = emd.projected_moments(p1, E, Pi)
        mu_q, cov_q = emd.projected_moments(q1, E, Pi)
        assert float(jnp.abs(cov_p).max()) < 1e-6 and float(jnp.abs(cov_q).max()) < 1e-6
        assert float(emd.gelbrich_from_moments(mu_p, cov_p, mu_q, cov_q)) == pytest.approx(
            float(emd.lower_bound_from_means(mu_p, mu_q)), abs=1e-6)
    # a one-hot target with the full basis: B² = tr Σ_p = 1 - ||μ(p)||², so LB_G is the exact EMD
    z = jnp.asarray(rng.normal(size=(4, 30)) * 2, jnp.float32)
    y = jnp.asarray([0, 7, 7, 29])
    np.testing.assert_allclose(np.asarray(emd.gelbrich_bound(z, y, E, full)),
                               np.asarray(emd.onehot_emd(z, y, E)), atol=2e-6)
    # masks: zero (and no gradient) off-mask
    mask = jnp.asarray([True, False, True, False])
    v = emd.gelbrich_bound(z, y, E, full, mask=mask)
    assert float(v[1]) == 0.0 and float(v[3]) == 0.0
    g = jax.grad(lambda z: jnp.sum(emd.gelbrich_bound(z, y, E, full, mask=mask)))(z)
    assert float(jnp.abs(g[1]).max()) == 0.0 and float(jnp.abs(g[0]).max()) > 0


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        E = _embeddings(rng, 9, 5)
        zp = jnp.asarray(rng.normal(size=(3, 9)))
        targets = (("logits", jnp.asarray(rng.normal(size=(3, 9)))), ("onehot", jnp.asarray([1, 4, 7])))
        for kind, tgt in targets:
            for r in (2, 5):
                Pi = emd.principal_basis(E, r)
                check_grads(lambda z, Pi=Pi, kind=kind, tgt=tgt: jnp.sum(
                    emd.gelbrich_bound(z, tgt, E, Pi, kind=kind)), (zp,), order=1, modes=["rev"],
                    atol=1e-6, rtol=1e-6)
    # fp32, a very peaked p against a soft q: finite gradients
    E32 = _embeddings(rng, 50, 8)
    z = jnp.zeros((50,), jnp.float32).at[3].set(40.0)
    q = jnp.asarray(rng.normal(size=50), jnp.float32)
    g = jax.grad(lambda z: emd.gelbrich_bound(z, q, E32, emd.principal_basis(E32, 4), kind="logits"))(z)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_no_large_intermediate_in_the_jaxpr():
    """At r < d nothing is V x V, d x d per position, or [positions, V, r]."""
    V, d, r, N = 4096, 64, 8, 32
    rng = np.random.default_rng(6)
    E = _embeddings(rng, V, d)
    Pi = emd.principal_basis(E, r)
    z = jnp.zeros((N, V), jnp.float32)
    # forward and backward, every nested jaxpr (jit, custom_jvp) included
    f = jax.value_and_grad(lambda z, t: jnp.sum(emd.gelbrich_bound(z, t, E, Pi, kind="logits")))
    sizes = [int(np.prod(s)) for s in jaxpr_shapes(jax.make_jaxpr(f)(z, z))]
    assert max(sizes) <= max(N * V, V * d, V * r * (r + 1) // 2), max(sizes)
    with pytest.raises(Exception, match="does not give"):
        emd.gelbrich_bound(z, jnp.zeros((N, d)), E, Pi, kind="mean")


# ----------------------------------------------------------------------------- as a training divergence


def _harmful_batch(rng, B, T, V):
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[0, 0] = 1.0
    return {"input_ids": rng.integers(0, V, (B, T)).astype(np.int32),
            "targets": rng.integers(0, V, (B, T)).astype(np.int32), "loss_mask": mask}


def test_objective_gelbrich_onehot_is_lb_plus_half_projected_trace_and_exact_at_full_rank():
    rng = np.random.default_rng(7)
    V, d, B, T = 40, 8, 2, 5
    E = _embeddings(rng, V, d)
    logits = jnp.asarray(rng.normal(size=(B, T, V)) * 2, jnp.float32)
    batch = _harmful_batch(rng, B, T, V)
    m = np.asarray(batch["loss_mask"]) > 0
    p = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    En = np.asarray(E, np.float64)
    for r in (3, d):
        obj = ob.ObjectiveConfig(kind="tasft", divergence="gelbrich", gelbrich_rank=r).validate()
        sums = ob.harmful_sums(logits, batch, E, obj)
        Pi = np.asarray(emd.principal_basis(E, r), np.float64)
        mu = p @ En
        cov = np.einsum("btv,vi,vj->btij", p, En, En) - mu[..., :, None] * mu[..., None, :]
        tr = np.trace(Pi @ cov @ Pi.T, axis1=-2, axis2=-1)
        lb = 0.5 * np.sum((mu - En[np.asarray(batch["targets"])]) ** 2, -1)
        assert float(sums["div_sum"]) == pytest.approx(float(np.sum((lb + 0.5 * tr)[m])), rel=1e-4)
        assert float(sums["lower_sum"]) <= float(sums["div_sum"]) + 1e-5
        assert float(sums["div_sum"]) <= float(sums["emd_onehot_sum"]) + 1e-4
    # r = d: the Gelbrich divergence to a one-hot target IS the exact EMD
    assert float(sums["div_sum"]) == pytest.approx(float(sums["emd_onehot_sum"]), rel=1e-5)


def test_objective_gelbrich_soft_target_reads_the_packed_covariance_and_trains():
    rng = np.random.default_rng(8)
    V, d, B, T, r = 30, 6, 2, 4, 3
    E = _embeddings(rng, V, d)
    basis = emd.principal_basis(E, r)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32), -1)
    mu_q, cov_q = emd.projected_moments(q, E, basis)
    batch = _harmful_batch(rng, B, T, V)
    batch["target_mu"] = np.asarray(jnp.concatenate([mu_q, emd.pack_symmetric(cov_q)], -1))
    logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    obj = ob.ObjectiveConfig(kind="tasft", divergence="gelbrich", target="soft", gelbrich_rank=r).validate()
    sums = ob.harmful_sums(logits, batch, E, obj)
    want = emd.gelbrich_bound(logits, q, E, basis, kind="probs", mask=jnp.asarray(batch["loss_mask"]) > 0)
    assert float(sums["div_sum"]) == pytest.approx(float(jnp.sum(want)), rel=1e-4)
    # the same file read as plain μ(q) by LB: the covariance columns are ignored
    lb = ob.harmful_sums(logits, batch, E, ob.ObjectiveConfig(kind="tasft", target="soft"))
    assert float(lb["div_sum"]) <= float(sums["div_sum"])
    f = jax.jit(lambda z: ob.harmful_sums(z, batch, E, obj)["div_sum"])
    g = jax.grad(f)(logits)
    assert float(jnp.abs(g).max()) > 1e-3                      # mean and covariance terms train
    np.testing.assert_allclose(np.asarray(g).ravel(), central_differences(f, logits, 1e-2),
                               atol=3e-4, rtol=1e-2)
    bad = dict(batch, target_mu=np.asarray(mu_q))
    with pytest.raises(LossError, match="gelbrich-rank 3"):
        ob.harmful_sums(logits, bad, E, obj)
    with pytest.raises(ConfigError, match="gelbrich_rank"):
        ob.ObjectiveConfig(divergence="gelbrich", gelbrich_rank=0).validate()


@pytest.mark.slow
def test_train_py_runs_the_gelbrich_divergence(tmp_path):
    """objective.divergence=gelbrich through the trainer (smoke config): the logged divergence
    lies between LB and the one-hot EMD at every step, and the step compiles once."""
    cfg = C.load_config(SMOKE, [f"run.output_dir={tmp_path}", "run.steps=3", "run.progress=false",
                                "run.tensorboard=false", "run.export_hf=false",
                                "objective.divergence=gelbrich", "objective.gelbrich_rank=8"])
    res = train_loop.train(cfg, echo=lambda s: None)
    assert res.compiles == 1 and len(res.metrics) == 3
    for m in res.metrics:
        assert m["emd_lower"] - 1e-5 <= m["div"] <= m["emd_onehot"] + 1e-5, m
        assert m["div"] > m["emd_lower"] + 1e-6  # the covariance term is not zero
