"""Exact EMD between next-token distributions on a small top-k support (validation only).

METHOD.md: the exact EMD to a soft target is a V x V transport problem, infeasible inside
a training step. Here it is computed only to check the bounds of emd.py:

  support S = top-k(p) ∪ top-k(q)  (k configurable; duplicates get zero weight)
  a = p|S / p(S),  b = q|S / q(S)   (mass renormalized on S)
  C = [1 - ê_s · ê_t]_{s,t in S}    (cost.cost_matrix)
  EMD(a, b) = min_{π in Π(a, b)} <π, C>

solved with OTT-JAX's Sinkhorn (log-domain, small absolute epsilon, annealed in warm-started
stages); each stage's plan is rounded onto Π(a, b) (Altschuler, Weed & Rigollet 2017, Alg. 2)
and the plan that leaves min(a, b) in place is a candidate too, so the value returned is the
cost of a FEASIBLE coupling: never below the true EMD on S, and above it by the entropic blur
of the last stage only (measured against the LP in the tests and in the report).
For a one-hot target q = δ_y the support is top-k(p) ∪ {y} and the only coupling is
a ⊗ δ_y, so the result must equal the closed form 1 - μ(a) · ê_y (emd.onehot_emd).

`emd_lp` is the exact reference: the same linear program solved by scipy's HiGHS.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from semloss_jax.errors import LossError
from semloss_jax.loss import emd
from semloss_jax.loss.cost import cost_matrix


@dataclass(frozen=True)
class SinkhornConfig:
    """Sinkhorn settings. epsilon is absolute (costs lie in [0, 2], typical token-pair costs
    0.5 - 1); threshold is the L1 marginal error at which Sinkhorn stops. Measured on 64 real
    SmolLM2 positions (top-32 union supports): epsilon 1e-2 converged on 95% of positions with
    the rounded cost within 6.4e-5 of the LP on average (max 6.9e-4); epsilon 3e-3 was no more
    accurate after rounding (mean 6.1e-5, max 8.7e-4) but converged on only 66% within 10k
    iterations; 1e-3 converged on 34% (mean error 4.1e-4).

    final_epsilon: a second Sinkhorn run at this smaller epsilon, warm-started from the first
    run's potentials (two-stage epsilon annealing; None = one stage); the smaller of the two
    rounded (feasible, hence >= EMD) plan costs is kept. It removes most of the
    entropic bias: on 2,700 random tiny problems (6-point supports) one stage at 1e-2 was off
    the LP by more than 1e-3 in 0.8% of cases (up to 1.4e-3), two stages (1e-2 -> 2e-3) in none.

    polish_epsilons: further warm-started stages. Token pairs closer than epsilon in cost
    (near-duplicate tokens, cost ~1e-3) are blurred together at 2e-3. `python
    bench/sinkhorn_stages.py` (2026-11-28, load ~13 on 2 cores): on 100 random 6-point problems
    made of 3 near-duplicate pairs (tests/test_ot_exact.py's generator), moving each pair's mass
    to its twin came out above the LP by 9.3e-5 on average (max 2.6e-4; 32% of the value) with
    two stages, 1.2e-5 (max 7.3e-5; 6%) with a third at 4e-4, 8.7e-7 with a fourth at 1e-4. On
    64 real SmolLM2 positions (top-32 supports) |OTT - LP| was 7.3e-6, 6.6e-6, 6.5e-6 on average
    at 1.00x, 1.67x, 2.10x the time: the default is three stages.

    diagonal: also try the plan that leaves min(a, b) in place (`diagonal_plan`, square C),
    so EMD(p, p) is 0 up to fp32 (same bench: at most 1.4e-7; the Sinkhorn plans alone, two
    stages, up to 4.8e-4 on the near-duplicate problems).
    """
    epsilon: float = 1e-2
    final_epsilon: float | None = 2e-3
    polish_epsilons: tuple[float, ...] = (4e-4,)
    diagonal: bool = True
    threshold: float = 1e-5
    max_iterations: int = 10000
    # positions per vmapped chunk: bounds memory; a chunk runs as long as its slowest position
    batch_size: int = 32


# ----------------------------------------------------------------------------- supports

class SinkhornResult(NamedTuple):
    """One Sinkhorn EMD: cost (<π, C> of the rounded feasible plan), converged (OTT's flag:
    marginal error below threshold within max_iterations, any stage), n_iters (all stages),
    marginal_error (L1 error of the unrounded plan's marginals)."""

    cost: jax.Array
    converged: jax.Array
    n_iters: jax.Array
    marginal_error: jax.Array


class TopkProblem(NamedTuple):
    """One truncated soft-target problem: ids/valid [2k] (the support S = top-k(p) ∪ top-k(q)),
    a/b [2k] (p and q renormalized on S), mass_p/mass_q (mass kept by the truncation), and the
    bounds LB (lower) / UB (upper) of emd.py on the same a, b."""

    ids: jax.Array
    valid: jax.Array
    a: jax.Array
    b: jax.Array
    mass_p: jax.Array
    mass_q: jax.Array
    lower: jax.Array
    upper: jax.Array


class TopkEMD(NamedTuple):
    """Exact EMD (OTT) on a TopkProblem's support with its bounds; per position, or [N] arrays
    from batched_topk_emd."""

    exact: jax.Array
    lower: jax.Array
    upper: jax.Array
    mass_p: jax.Array
    mass_q: jax.Array
    converged: jax.Array
    n_iters: jax.Array
    marginal_error: jax.Array


class OnehotEMD(NamedTuple):
    """One-hot target δ_y: exact (OTT on top-k(p) ∪ {y}), closed (1 - μ(a)·ê_y on the same
    truncated a), closed_full / lower_full (emd.py's closed form and LB on the full
    vocabulary), mass_p and the solver's flags."""

    exact: jax.Array
    closed: jax.Array
    closed_full: jax.Array
    lower_full: jax.Array
    mass_p: jax.Array
    converged: jax.Array
    n_iters: jax.Array
    marginal_error: jax.Array


class TopkBounds(NamedTuple):
    """LB / UB on the top-k union support (no OT), with the mass kept by the truncation."""

    lower: jax.Array
    upper: jax.Array
    mass_p: jax.Array
    mass_q: jax.Array


def union_support(*id_lists: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Union of token-id lists as a fixed-size array: (ids [n], valid [n] bool), n = total length.

    The ids are sorted; repeats are kept (static shape under jit/vmap) but marked invalid,
    so each token of the union is counted exactly once.
    """
    ids = jnp.sort(jnp.concatenate([jnp.asarray(x).reshape(-1) for x in id_lists]))
    valid = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    return ids, valid


def restrict(probs: jax.Array, ids: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Distribution restricted to the support and renormalized: (weights [n], retained mass)."""
    w = jnp.where(valid, probs[ids], 0.0)
    mass = jnp.sum(w)
    return w / mass, mass


# ----------------------------------------------------------------------------- solvers

def round_to_coupling(P: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Project an approximate plan onto the couplings of (a, b) (Altschuler et al. 2017, Alg. 2).

    Scale rows then columns down to at most the target marginals, then add the rank-one
    correction err_a err_bᵀ / ||err_a||₁. The result has marginals exactly a and b.
    """
    r = P.sum(1)
    X = P * jnp.where(r > 0, jnp.minimum(a / jnp.where(r > 0, r, 1.0), 1.0), 0.0)[:, None]
    c = X.sum(0)
    X = X * jnp.where(c > 0, jnp.minimum(b / jnp.where(c > 0, c, 1.0), 1.0), 0.0)[None, :]
    err_a = a - X.sum(1)
    err_b = b - X.sum(0)
    norm = jnp.sum(err_a)
    return X + jnp.where(norm > 0, jnp.outer(err_a, err_b) / jnp.where(norm > 0, norm, 1.0), 0.0)


def diagonal_plan(a: jax.Array, b: jax.Array) -> jax.Array:
    """A coupling of (a, b) on one support [n, n] that leaves min(a, b) in place and spreads the
    rest as err_a err_bᵀ / ||err_a||₁ (its cost is 0 when a == b)."""
    keep = jnp.minimum(a, b)
    ra, rb = a - keep, b - keep
    norm = jnp.sum(ra)
    return jnp.diag(keep) + jnp.where(norm > 0, jnp.outer(ra, rb) / jnp.where(norm > 0, norm, 1.0), 0.0)


def sinkhorn_emd(a: jax.Array, b: jax.Array, C: jax.Array,
                 cfg: SinkhornConfig = SinkhornConfig()) -> SinkhornResult:
    """EMD(a, b) on cost C [n, m] with OTT Sinkhorn + rounding. Jittable and vmappable."""
    solver = sinkhorn.Sinkhorn(threshold=cfg.threshold, max_iterations=cfg.max_iterations)

    def rounded(out):
        P = out.matrix
        err = jnp.sum(jnp.abs(P.sum(1) - a)) + jnp.sum(jnp.abs(P.sum(0) - b))
        return jnp.sum(round_to_coupling(P, a, b) * C), err

    geom = geometry.Geometry(cost_matrix=C, epsilon=cfg.epsilon)
    out = solver(linear_problem.LinearProblem(geom, a=a, b=b))
    cost_, marg_err = rounded(out)
    converged, n_iters = out.converged, out.n_iters
    later = ((cfg.final_epsilon,) if cfg.final_epsilon is not None else ()) + tuple(cfg.polish_epsilons)
    for eps in later:  # anneal: warm start each smaller epsilon from the previous potentials
        geom = geometry.Geometry(cost_matrix=C, epsilon=eps)
        out = solver(linear_problem.LinearProblem(geom, a=a, b=b), init=(out.f, out.g))
        cost2, err2 = rounded(out)
        # every rounded plan is feasible, so each cost is >= the true EMD: keep the smallest
        better = cost2 <= cost_
        cost_, marg_err = jnp.where(better, cost2, cost_), jnp.where(better, err2, marg_err)
        converged, n_iters = converged | out.converged, n_iters + out.n_iters
    if cfg.diagonal and C.shape[0] == C.shape[1]:  # one support: the plan that moves nothing shared
        cost_ = jnp.minimum(cost_, jnp.sum(diagonal_plan(a, b) * C))
    return SinkhornResult(cost=cost_, converged=jnp.asarray(converged, bool),
                          n_iters=jnp.asarray(n_iters, jnp.int32), marginal_error=marg_err)


def emd_lp(a: np.ndarray, b: np.ndarray, C: np.ndarray) -> float:
    """Exact EMD by linear programming (scipy.optimize.linprog, HiGHS), float64. Small n, m only.

    HiGHS runs without presolve: its presolve drops weights below its feasibility tolerance
    (1e-7) and then declares feasible problems infeasible (e.g. a = [1], b = [8.56e-8, 0.455,
    0.545, 6.29e-8]); tests/test_ot_exact.py checks that example and random tiny-weight ones."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    C = np.asarray(C, np.float64)
    n, m = C.shape
    if a.shape != (n,) or b.shape != (m,):
        raise LossError(f"emd_lp: marginals {a.shape}, {b.shape} do not match cost {C.shape}")
    b = b * (a.sum() / b.sum())  # equal totals up to round-off, else the LP is infeasible
    rows = np.concatenate([np.repeat(np.arange(n), m), n + np.tile(np.arange(m), n)])
    cols = np.concatenate([np.arange(n * m), np.arange(n * m)])
    A_eq = coo_matrix((np.ones(2 * n * m), (rows, cols)), shape=(n + m, n * m)).tocsr()
    res = linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs",
                  options={"presolve": False, "primal_feasibility_tolerance": 1e-10})
    if res.status != 0:
        raise LossError(f"emd_lp: HiGHS failed: {res.message}")
    return float(res.fun)


# ----------------------------------------------------------------------------- per position

def topk_problem(p_logits: jax.Array, q_logits: jax.Array, E_hat: jax.Array, k: int) -> TopkProblem:
    """One position, soft target (p_logits, q_logits [V]): the truncated problem on
    S = top-k(p) ∪ top-k(q) and the bounds LB / UB of emd.py on these SAME truncated
    (renormalized) distributions."""
    p = emd.probs_from_logits(p_logits)
    q = emd.probs_from_logits(q_logits)
    ids, valid = union_support(jax.lax.top_k(p, k)[1], jax.lax.top_k(q, k)[1])
    a, mass_p = restrict(p, ids, valid)
    b, mass_q = restrict(q, ids, valid)
    E_s = E_hat[ids]
    mu_a = emd.mean_embedding_from_probs(a, E_s)
    mu_b = emd.mean_embedding_from_probs(b, E_s)
    return TopkProblem(ids=ids, valid=valid, a=a, b=b, mass_p=mass_p, mass_q=mass_q,
                       lower=emd.lower_bound_from_means(mu_a, mu_b),
                       upper=emd.upper_bound_from_means(mu_a, mu_b))


def topk_emd(p_logits: jax.Array, q_logits: jax.Array, E_hat: jax.Array, k: int,
             cfg: SinkhornConfig = SinkhornConfig()) -> TopkEMD:
    """One position, soft target: exact EMD (OTT) on the topk_problem support, plus its bounds."""
    prob = topk_problem(p_logits, q_logits, E_hat, k)
    out = sinkhorn_emd(prob.a, prob.b, cost_matrix(E_hat, prob.ids), cfg)
    return TopkEMD(exact=out.cost, lower=prob.lower, upper=prob.upper, mass_p=prob.mass_p,
                   mass_q=prob.mass_q, converged=out.converged, n_iters=out.n_iters,
                   marginal_error=out.marginal_error)


def topk_onehot_emd(p_logits: jax.Array, y: jax.Array, E_hat: jax.Array, k: int,
                    cfg: SinkhornConfig = SinkhornConfig()) -> OnehotEMD:
    """One position, one-hot target δ_y: OTT EMD on S = top-k(p) ∪ {y} (p renormalized on S)
    versus the closed form 1 - μ(a) · ê_y on the same truncated a; also the full-vocabulary
    closed form (emd.onehot_emd, no truncation).
    """
    p = emd.probs_from_logits(p_logits)
    ids, valid = union_support(jax.lax.top_k(p, k)[1], jnp.reshape(y, (1,)))
    a, mass_p = restrict(p, ids, valid)
    b = jnp.where(valid & (ids == y), 1.0, 0.0).astype(jnp.float32)
    E_s = E_hat[ids]
    mu_a = emd.mean_embedding_from_probs(a, E_s)
    # the closed form for the truncated distribution, via the same emd.py formula
    closed = emd.upper_bound_from_means(mu_a, E_hat[y])
    out = sinkhorn_emd(a, b, cost_matrix(E_hat, ids), cfg)
    return OnehotEMD(exact=out.cost, closed=closed, closed_full=emd.onehot_emd(p_logits, y, E_hat),
                     lower_full=emd.lower_bound(p_logits, y, E_hat, kind="onehot"), mass_p=mass_p,
                     converged=out.converged, n_iters=out.n_iters, marginal_error=out.marginal_error)


# ----------------------------------------------------------------------------- batched

@partial(jax.jit, static_argnames=("k", "cfg"))
def batched_topk_emd(p_logits: jax.Array, q_logits: jax.Array, E_hat: jax.Array, *, k: int,
                     cfg: SinkhornConfig = SinkhornConfig()) -> TopkEMD:
    """topk_emd over positions: p_logits, q_logits [N, V] -> TopkEMD of [N] arrays.

    Mapped in vmapped chunks of cfg.batch_size positions (jax.lax.map with batch_size; OTT
    0.6.0's own ott.utils.batched_vmap calls an API that JAX 0.10 removed).
    """
    return jax.lax.map(lambda args: topk_emd(args[0], args[1], E_hat, k, cfg), (p_logits, q_logits),
                       batch_size=cfg.batch_size)


@partial(jax.jit, static_argnames=("k", "cfg"))
def batched_topk_onehot_emd(p_logits: jax.Array, y: jax.Array, E_hat: jax.Array, *, k: int,
                            cfg: SinkhornConfig = SinkhornConfig()) -> OnehotEMD:
    """topk_onehot_emd over positions: p_logits [N, V], y int [N] -> OnehotEMD of [N] arrays."""
    def one(args):
        return topk_onehot_emd(args[0], args[1], E_hat, k, cfg)
    return jax.lax.map(one, (p_logits, y), batch_size=cfg.batch_size)


@partial(jax.jit, static_argnames=("k",))
def batched_topk_bounds(p_logits: jax.Array, q_logits: jax.Array, E_hat: jax.Array, *, k: int) -> TopkBounds:
    """LB / UB on the top-k union support only (no OT): p_logits, q_logits [N, V] -> [N] each."""
    def one(pl, ql):
        r = topk_problem(pl, ql, E_hat, k)
        return TopkBounds(lower=r.lower, upper=r.upper, mass_p=r.mass_p, mass_q=r.mass_q)
    return jax.vmap(one)(p_logits, q_logits)


def support_basis(E_s: jax.Array, a: jax.Array, b: jax.Array, r: int) -> jax.Array:
    """[r, d]: the top-r principal directions of the pooled covariance of (a + b) / 2 on the
    support points E_s [n, d], computed in the support's span (an n x n eigendecomposition).
    Directions with (numerically) zero variance come back as zero rows: Π then projects onto
    fewer dimensions, still a 1-Lipschitz map, so LB_G stays a lower bound. "Numerically zero"
    is below 10 n eps of the top eigenvalue: eigh's error is O(eps |λ_max|), and a direction
    kept from that noise would give a row that is neither unit nor orthogonal to the others."""
    w = 0.5 * (a + b)
    X = (E_s - w @ E_s) * jnp.sqrt(w)[:, None]                  # [n, d]
    lam, U = jnp.linalg.eigh(X @ X.T)                           # ascending
    lam, U = lam[::-1][:r], U[:, ::-1][:, :r]
    rel = 10 * X.shape[0] * jnp.finfo(lam.dtype).eps
    keep = lam > rel * jnp.maximum(lam[0], jnp.finfo(lam.dtype).tiny)
    V = (X.T @ U) / jnp.sqrt(jnp.where(keep, lam, 1.0))         # [d, r], orthonormal columns
    return jnp.where(keep[None, :], V, 0.0).T


def topk_gelbrich(p_logits: jax.Array, q_logits: jax.Array, E_hat: jax.Array, basis: jax.Array,
                  k: int, adaptive_r: int = 0) -> jax.Array:
    """One position: the Gelbrich bound LB_G (emd.gelbrich_from_moments) of the SAME truncated
    distributions a, b that topk_emd solves exactly (comparable to its value), in the fixed
    basis [r, d], or with adaptive_r > 0 in this position's own support_basis of that size."""
    prob = topk_problem(p_logits, q_logits, E_hat, k)
    E_s = E_hat[prob.ids]
    if adaptive_r:
        basis = support_basis(E_s, prob.a, prob.b, adaptive_r)
    mu_a, cov_a = emd.projected_moments(prob.a, E_s, basis)
    mu_b, cov_b = emd.projected_moments(prob.b, E_s, basis)
    return emd.gelbrich_from_moments(mu_a, cov_a, mu_b, cov_b)


@partial(jax.jit, static_argnames=("k", "adaptive_r", "batch_size"))
def batched_topk_gelbrich(p_logits: jax.Array, q_logits: jax.Array, E_hat: jax.Array,
                          basis: jax.Array, *, k: int, adaptive_r: int = 0,
                          batch_size: int = 16) -> jax.Array:
    """topk_gelbrich over positions: p_logits, q_logits [N, V] -> [N] (chunks of batch_size
    positions bound the memory of the r x r eigendecompositions at large r)."""
    return jax.lax.map(lambda args: topk_gelbrich(args[0], args[1], E_hat, basis, k, adaptive_r),
                       (p_logits, q_logits), batch_size=batch_size)


def lp_from_problem(prob: TopkProblem, E_hat: jax.Array) -> float:
    """The exact LP value of one truncated problem (topk_problem of one position)."""
    keep = np.asarray(prob.valid)
    ids = np.asarray(prob.ids)[keep]
    E_s = np.asarray(E_hat[jnp.asarray(ids)], np.float64)
    C = np.clip(1.0 - E_s @ E_s.T, 0.0, 2.0)  # c(u, v) = 1 - ê_u·ê_v, as cost.cost_matrix
    return emd_lp(np.asarray(prob.a)[keep], np.asarray(prob.b)[keep], C)


_topk_problem_jit = jax.jit(topk_problem, static_argnames=("k",))


def lp_on_support(p_logits, q_logits, E_hat, k: int) -> float:
    """The exact LP value on the same truncated problem topk_emd solves (for cross-checks)."""
    prob = _topk_problem_jit(jnp.asarray(p_logits), jnp.asarray(q_logits), E_hat, k)
    return lp_from_problem(prob, E_hat)
