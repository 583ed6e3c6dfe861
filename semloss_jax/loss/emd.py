"""The per-position semantic EMD math of METHOD.md, written once. Pure and jittable.

Shapes: predictions are logits z [..., V] (usually [B, T, V]); Ê = E_hat [V, d] holds the
frozen unit token embeddings (cost.unit_embeddings). Per-position results have the
leading shape [...] (usually [B, T]).

    p = softmax(z)                       (fp32)
    μ(p) = Σ_v p_v ê_v = p @ Ê           (a d-vector; one [N, V] @ [V, d] product)
    LB(p, q) = ½ ||μ(p) - μ(q)||²        (Jensen)                  <= EMD(p, q)
    LB_G(p, q) = LB + ½ B²(ΠΣ_pΠᵀ, ΠΣ_qΠᵀ)  (Gelbrich; see below)  <= EMD(p, q)
    UB(p, q) = 1 - μ(p) · μ(q)           (independent coupling)    >= EMD(p, q)
    one-hot q = δ_y:  EMD = UB = 1 - μ(p) · ê_y,   LB = EMD - ½ (1 - ||μ(p)||²)

Nothing here is V x V: for one-hot targets only μ(p) and the gathered rows ê_y are needed;
for soft targets only μ(q) (another [N, V] @ [V, d] product, or given precomputed).

Targets (`kind`):
  "onehot"  int token ids [...]             μ(q) = ê_y  (a gather)
  "logits"  float [..., V]                  μ(q) = softmax(target) @ Ê
  "probs"   float [..., V], rows sum to 1   μ(q) = target @ Ê
  "mean"    float [..., d], μ(q) precomputed

Masks: every per-position function takes an optional boolean `mask` [...]; masked-out
positions return exactly 0 (and carry no gradient). Reduce with `masked_sum`, which
returns (sum, count) so callers form token means over non-masked tokens themselves.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from semloss_jax.errors import LossError
from semloss_jax.loss import bures

TARGET_KINDS = ("onehot", "logits", "probs", "mean")
DIVERGENCES = ("lower_bound", "exact_onehot", "upper_bound", "gelbrich")
GELBRICH_RANK = 16  # the default basis size r of the Gelbrich bound

# fp32 throughout; HIGHEST keeps accelerators from using reduced-precision matmuls,
# which would swamp small differences ||μ(p) - μ(q)||.
_PREC = jax.lax.Precision.HIGHEST


def _f32(x: jax.Array) -> jax.Array:
    """Cast to at least float32 (bf16/fp16 -> fp32; float64 stays float64 under x64, for tests)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_E(E_hat: jax.Array) -> None:
    if E_hat.ndim != 2:
        raise LossError(f"E_hat must be [V, d] (unit embeddings), got shape {E_hat.shape}")


def _apply_mask(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return values
    mask = jnp.asarray(mask)
    if mask.shape != values.shape:
        raise LossError(f"mask shape {mask.shape} does not match per-position shape {values.shape}")
    return jnp.where(mask.astype(bool), values, jnp.zeros_like(values))


def probs_from_logits(logits: jax.Array) -> jax.Array:
    """The probabilities p = softmax(z) over the last axis, computed in float32 (at least)."""
    return jax.nn.softmax(_f32(logits), axis=-1)


def mean_embedding_from_probs(probs: jax.Array, E_hat: jax.Array) -> jax.Array:
    """μ(p) = p @ Ê : [..., V] x [V, d] -> [..., d] (float32)."""
    _check_E(E_hat)
    probs = _f32(probs)
    if probs.shape[-1] != E_hat.shape[0]:
        raise LossError(f"distribution over {probs.shape[-1]} tokens but E_hat has "
                         f"V = {E_hat.shape[0]} rows")
    return jnp.einsum("...v,vd->...d", probs, _f32(E_hat), precision=_PREC)


def mean_embedding(logits: jax.Array, E_hat: jax.Array) -> jax.Array:
    """μ(p) = softmax(z) @ Ê, softmax in float32: logits [..., V] -> [..., d]."""
    return mean_embedding_from_probs(probs_from_logits(logits), E_hat)


def target_mean(target: jax.Array, E_hat: jax.Array, kind: str = "onehot",
                mask: jax.Array | None = None) -> jax.Array:
    """μ(q) for a target given as token ids, logits, probabilities or a precomputed mean.

    For one-hot ids at masked-out positions (e.g. padding with id -100) the id is replaced
    by 0 before the gather, so any value is allowed there.
    """
    _check_E(E_hat)
    target = jnp.asarray(target)
    if kind == "onehot":
        if not jnp.issubdtype(target.dtype, jnp.integer):
            raise LossError(f"one-hot targets must be integer token ids, got dtype {target.dtype}")
        if mask is not None:
            target = jnp.where(jnp.asarray(mask).astype(bool), target, 0)
        return _f32(E_hat)[target]
    if kind == "logits":
        return mean_embedding(target, E_hat)
    if kind == "probs":
        return mean_embedding_from_probs(target, E_hat)
    if kind == "mean":
        if target.shape[-1] != E_hat.shape[1]:
            raise LossError(f"precomputed μ(q) has dim {target.shape[-1]}, E_hat has d = {E_hat.shape[1]}")
        return _f32(target)
    raise LossError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")


def lower_bound_from_means(mu_p: jax.Array, mu_q: jax.Array) -> jax.Array:
    """LB = ½ ||μ(p) - μ(q)||²  (per position, over the last axis)."""
    diff = mu_p - mu_q
    return 0.5 * jnp.sum(diff * diff, axis=-1)


def upper_bound_from_means(mu_p: jax.Array, mu_q: jax.Array) -> jax.Array:
    """UB = 1 - μ(p) · μ(q)  (per position, over the last axis)."""
    return 1.0 - jnp.sum(mu_p * mu_q, axis=-1)


def _check_mask(logits: jax.Array, mask: jax.Array | None) -> None:
    if mask is not None and jnp.shape(mask) != logits.shape[:-1]:
        raise LossError(f"mask shape {jnp.shape(mask)} does not match per-position shape "
                         f"{logits.shape[:-1]}")


def _leading_shape_check(logits: jax.Array, mu_q: jax.Array) -> None:
    if logits.shape[:-1] != mu_q.shape[:-1]:
        raise LossError(f"logits positions {logits.shape[:-1]} and target positions "
                         f"{mu_q.shape[:-1]} differ")


def onehot_emd(logits: jax.Array, targets: jax.Array, E_hat: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """Exact EMD to a one-hot target q = δ_y (closed form): EMD = Σ_u p_u c(u, y) = 1 - μ(p) · ê_y.

    logits [..., V], targets int [...] -> [...]. Equal to UB for one-hot targets.
    """
    logits = jnp.asarray(logits)
    _check_mask(logits, mask)
    mu_p = mean_embedding(logits, E_hat)
    e_y = target_mean(targets, E_hat, "onehot", mask)
    _leading_shape_check(logits, e_y)
    return _apply_mask(upper_bound_from_means(mu_p, e_y), mask)


def lower_bound(logits: jax.Array, target: jax.Array, E_hat: jax.Array, *, kind: str = "onehot",
                mask: jax.Array | None = None) -> jax.Array:
    """LB(p, q) = ½ ||μ(p) - μ(q)||² <= EMD(p, q), with p = softmax(logits) and q given by `kind`.

    For one-hot q = δ_y this equals EMD - ½ (1 - ||μ(p)||²).
    """
    logits = jnp.asarray(logits)
    _check_mask(logits, mask)
    mu_q = target_mean(target, E_hat, kind, mask)
    _leading_shape_check(logits, mu_q)
    return _apply_mask(lower_bound_from_means(mean_embedding(logits, E_hat), mu_q), mask)


def upper_bound(logits: jax.Array, target: jax.Array, E_hat: jax.Array, *, kind: str = "onehot",
                mask: jax.Array | None = None) -> jax.Array:
    """UB(p, q) = 1 - μ(p) · μ(q) >= EMD(p, q) (the cost of the independent coupling p ⊗ q).

    For one-hot q = δ_y this IS the exact EMD (onehot_emd).
    """
    logits = jnp.asarray(logits)
    _check_mask(logits, mask)
    mu_q = target_mean(target, E_hat, kind, mask)
    _leading_shape_check(logits, mu_q)
    return _apply_mask(upper_bound_from_means(mean_embedding(logits, E_hat), mu_q), mask)


# --------------------------------------------------------------------------------------------
# Means plus covariances: the Gelbrich lower bound
#
# With c(u, v) = ½||ê_u - ê_v||², EMD(p, q) = ½ W2²(P, Q) for the measures P = Σ p_v δ(ê_v) and
# Q = Σ q_v δ(ê_v) on the unit embeddings. Five facts give a tighter lower bound than LB:
#   1. W2²(P, Q) = ||μ_P - μ_Q||² + W2²(P̃, Q̃), P̃ and Q̃ the measures centred at their means;
#   2. Gelbrich: W2²(P̃, Q̃) >= B²(Σ_P, Σ_Q), the Bures distance of the covariances (loss.bures);
#   3. a projection x -> Πx onto an r-dim subspace is 1-Lipschitz, so W2(ΠP̃, ΠQ̃) <= W2(P̃, Q̃),
#      and the covariance of ΠP̃ is Π Σ_P Πᵀ;
#   4. hence LB_G = ½ [||μ(p) - μ(q)||² + B²(Π Σ_p Πᵀ, Π Σ_q Πᵀ)] satisfies LB <= LB_G <= EMD;
#   5. nested subspaces give nested Gaussian projections, so a larger basis never lowers LB_G;
#      for a one-hot q (Σ_q = 0) and the full basis, B² = tr Σ_p = 1 - ||μ(p)||² and LB_G = EMD.
# Cost per position: one [V, d] product (μ) and one [V, r(r+1)/2] product (the projected second
# moments), then eigendecompositions of r x r matrices. Never d x d at full d unless asked.


def principal_basis(E_hat: jax.Array, r: int | None = None) -> jax.Array:
    """[r, d] orthonormal rows: the top-r principal directions of the (centred) rows of Ê.

    r=None or r >= d gives a complete orthonormal basis of R^d (the full-d bound). The bases
    for increasing r are nested (each is a prefix of the next), so LB_G is monotone in r.
    """
    _check_E(E_hat)
    E = _f32(E_hat)
    X = E - jnp.mean(E, axis=0)
    w, Q = jnp.linalg.eigh(jnp.einsum("vi,vj->ij", X, X, precision=_PREC) / E.shape[0])
    d = E.shape[1]
    r = d if r is None else min(int(r), d)
    if r < 1:
        raise LossError(f"principal_basis: r must be >= 1, got {r}")
    return Q[:, ::-1][:, :r].T


def projected_moments(probs: jax.Array, E_hat: jax.Array, basis: jax.Array,
                      mu: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(μ(p) [..., d], Π Σ_p Πᵀ [..., r, r]) for distributions probs [..., V] (mu: μ(p) when
    the caller has it already).

    Σ_p = Σ_v p_v ê_v ê_vᵀ - μ(p) μ(p)ᵀ is computed in the basis Π [r, d] only: with z_v = Π ê_v,
    Π Σ_p Πᵀ = Σ_v p_v z_v z_vᵀ - (Πμ)(Πμ)ᵀ, from one [..., V] @ [V, r(r+1)/2] product of the
    distinct entries of z_v z_vᵀ (never a d x d or V x V array).
    """
    _check_E(E_hat)
    probs, E = _f32(probs), _f32(E_hat)
    basis = jnp.asarray(basis, E.dtype)
    r = basis.shape[0]
    mu = mean_embedding_from_probs(probs, E) if mu is None else _f32(mu)
    Z = jnp.einsum("vd,rd->vr", E, basis, precision=_PREC)
    iu, ju = jnp.triu_indices(r)
    S = unpack_symmetric(jnp.einsum("...v,vk->...k", probs, Z[:, iu] * Z[:, ju], precision=_PREC), r)
    m = jnp.einsum("...d,rd->...r", mu, basis, precision=_PREC)
    return mu, S - m[..., :, None] * m[..., None, :]


def projected_trace(probs: jax.Array, E_hat: jax.Array, basis: jax.Array,
                    mu: jax.Array | None = None) -> jax.Array:
    """tr(Π Σ_p Πᵀ) [...] = Σ_v p_v ||z_v||² - ||Πμ(p)||²: the Bures term against a one-hot
    target (Σ_q = 0), from one [..., V] @ [V] product and μ(p) (given, or computed)."""
    probs, E = _f32(probs), _f32(E_hat)
    basis = jnp.asarray(basis, E.dtype)
    Z = jnp.einsum("vd,rd->vr", E, basis, precision=_PREC)
    mu = mean_embedding_from_probs(probs, E) if mu is None else _f32(mu)
    m = jnp.einsum("...d,rd->...r", mu, basis, precision=_PREC)
    return jnp.einsum("...v,v->...", probs, jnp.sum(Z * Z, axis=-1), precision=_PREC) - jnp.sum(m * m, -1)


def packed_size(r: int) -> int:
    """Entries of a symmetric r x r matrix stored as its upper triangle: r (r + 1) / 2."""
    return r * (r + 1) // 2


def pack_symmetric(M: jax.Array) -> jax.Array:
    """[..., r, r] symmetric -> [..., r(r+1)/2] (the upper triangle, row by row)."""
    iu, ju = jnp.triu_indices(M.shape[-1])
    return M[..., iu, ju]


def unpack_symmetric(v: jax.Array, r: int) -> jax.Array:
    """The inverse of pack_symmetric: [..., r(r+1)/2] -> [..., r, r]."""
    if v.shape[-1] != packed_size(r):
        raise LossError(f"a packed {r} x {r} symmetric matrix has {packed_size(r)} entries, got "
                        f"{v.shape[-1]}")
    iu, ju = jnp.triu_indices(r)
    S = jnp.zeros(v.shape[:-1] + (r, r), v.dtype).at[..., iu, ju].set(v)
    return S + jnp.swapaxes(S, -1, -2) - S * jnp.eye(r, dtype=v.dtype)


def gelbrich_from_moments(mu_p: jax.Array, cov_p: jax.Array, mu_q: jax.Array,
                          cov_q: jax.Array) -> jax.Array:
    """LB_G = ½ [||μ(p) - μ(q)||² + B²(Π Σ_p Πᵀ, Π Σ_q Πᵀ)], per position."""
    return lower_bound_from_means(mu_p, mu_q) + 0.5 * bures.bures_squared(cov_p, cov_q)


def gelbrich_bound(logits: jax.Array, target: jax.Array, E_hat: jax.Array, basis: jax.Array, *,
                   kind: str = "onehot", mask: jax.Array | None = None) -> jax.Array:
    """LB <= LB_G(p, q) <= EMD(p, q): means plus covariances in the basis Π [r, d]
    (`principal_basis`). kind "onehot" (Σ_q = 0), "logits" or "probs"; a precomputed mean
    alone ("mean") does not determine Σ_q: use gelbrich_from_moments with both moments."""
    logits = jnp.asarray(logits)
    _check_mask(logits, mask)
    mu_p, cov_p = projected_moments(probs_from_logits(logits), E_hat, basis)
    if kind == "onehot":
        mu_q = target_mean(target, E_hat, "onehot", mask)
        cov_q = jnp.zeros_like(cov_p)
    elif kind in ("logits", "probs"):
        q = probs_from_logits(target) if kind == "logits" else _f32(target)
        mu_q, cov_q = projected_moments(q, E_hat, basis)
    else:
        raise LossError(f"gelbrich_bound: target kind {kind!r} does not give Σ_q; use "
                        f"'onehot', 'logits' or 'probs' (or gelbrich_from_moments)")
    _leading_shape_check(logits, mu_q)
    return _apply_mask(gelbrich_from_moments(mu_p, cov_p, mu_q, cov_q), mask)


def divergence(name: str, logits: jax.Array, target: jax.Array, E_hat: jax.Array, *, kind: str = "onehot",
               mask: jax.Array | None = None, basis: jax.Array | None = None) -> jax.Array:
    """Per-position D(p, q), D in DIVERGENCES (lower_bound, exact_onehot, upper_bound, gelbrich).

    Returns values [...] in [0, 2], 0 at masked-out positions. "exact_onehot" needs
    kind="onehot" (the exact EMD to a soft target has no closed form: see ot_exact.py).
    "gelbrich" uses `basis` [r, d] (default: the top-GELBRICH_RANK principal directions of Ê).
    """
    if name == "gelbrich":
        basis = principal_basis(E_hat, GELBRICH_RANK) if basis is None else basis
        return gelbrich_bound(logits, target, E_hat, basis, kind=kind, mask=mask)
    if name == "lower_bound":
        return lower_bound(logits, target, E_hat, kind=kind, mask=mask)
    if name == "upper_bound":
        return upper_bound(logits, target, E_hat, kind=kind, mask=mask)
    if name == "exact_onehot":
        if kind != "onehot":
            raise LossError("divergence 'exact_onehot' needs one-hot targets (kind='onehot'), "
                             f"got kind={kind!r}")
        return onehot_emd(logits, target, E_hat, mask=mask)
    raise LossError(f"unknown divergence {name!r}; expected one of {DIVERGENCES}")


def masked_sum(values: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(Σ over non-masked positions of values, number of non-masked positions) as scalars
    (float32; float64 for float64 input).

    Masked-out positions contribute 0 to both, whatever their value (NaN included).
    """
    values = _f32(values)
    if mask is None:
        return jnp.sum(values), jnp.asarray(values.size, values.dtype)
    mask = jnp.asarray(mask).astype(bool)
    if mask.shape != values.shape:
        raise LossError(f"mask shape {mask.shape} does not match values shape {values.shape}")
    return jnp.sum(jnp.where(mask, values, 0.0)), jnp.sum(mask.astype(values.dtype))
