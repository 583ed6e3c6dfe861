"""Training objectives: TA-SFT and the paper's baselines, as SUMS and COUNTS.

    sft          L = CE_benign                                   (λ ignored)
    safeinstr    L = CE_benign + λ · mean_{refusal tokens} NLL_t    (the N refusal examples as a
                 second stream, in the harmful batch's place: data.harmful_batch > 0); with
                 data.harmful_batch = 0 they are mixed into the benign data and L = CE_benign
    tasft        L = CE_benign - λ · mean_{harmful tokens} D(p_t, q_t),  D in {LB, exact one-hot EMD, UB}
    nll_ascent   L = CE_benign - λ · mean_{harmful tokens} min(NLL_t, nll_clip)
    unlikelihood L = CE_benign + λ · mean_{harmful tokens} -log(1 - p_t(y_t))
    dpo          L = CE_benign + λ · mean_{pairs} -log σ(β [(log π(y_w|x) - log π_ref(y_w|x))
                                                      - (log π(y_l|x) - log π_ref(y_l|x))])
                 (Rafailov et al. 2023; y_l = the harmful reply, y_w = a safe reply to the same
                 prompt x, π_ref = the frozen initial model; log π(y|x) = Σ_response log p_t(y_t))

CE_benign = Σ_benign-response-tokens -log p_t(y_t) / (number of such tokens). The EMD math
comes from semloss_jax/loss/emd.py (written once there). D lies in [0, 2], so the TA-SFT loss is
bounded below by CE - 2λ; NLL ascent is not (unless clipped).

Token means are formed by `combine` from sums (`loss_sums`, per micro-batch) and GLOBAL
counts (`global_counts`, over the whole accumulated / all-device batch, known from the
masks before the forward): the loss of a micro-batch is then a fixed linear share of the
loss of the full batch, so gradient accumulation and data sharding give exactly the update
of one large batch.

Batches are dicts of [B, T] arrays: input_ids, targets (the loss at t predicts targets[t]),
loss_mask (1 on response tokens), positions, segment_ids (0 = padding); a harmful batch for
soft targets also carries target_mu [B, T, d] (μ(q) precomputed from the reference model).
For dpo the harmful batch holds the rejected replies plus `ref_logp` [B, T] (the reference
model's log p_t(y_t), precomputed once per example by the data layer: semloss_jax.data.reference)
and the same five fields and ref_logp of the chosen reply of each row under CHOSEN + name
(row i of both is one pair).
A position carries loss iff loss_mask != 0 and (when present) segment_ids != 0.

Nothing here builds a V x V array: CE is a log_softmax and a gather, the bounds need one
[N, V] @ [V, d] product (μ(p) = softmax(z) @ Ê), computed once and shared by every
divergence. Softmax and log_softmax run in float32.

The loss head: with a large vocabulary (`ObjectiveConfig.head_tile`), `loss_sums` never forms
the [B, T, V] logits: loss/head.py gives log p(y) and μ(p) from the final hidden states and the
LM head in vocabulary tiles (online logsumexp, custom VJP), and the same per-token math below
(`benign_from_logprob`, `harmful_from_stats`) turns them into sums. Benign and harmful rows go
through one forward, laid out so that each of the `batch_shards` row blocks of the batch holds
its own benign rows followed by its own harmful rows (and, for dpo, its chosen rows: no row
moves between devices). The Gelbrich divergence and dpo keep the untiled head.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from semloss_jax.errors import ConfigError, LossError
from semloss_jax.loss import emd, head
from semloss_jax.models import llama as model_lib
from semloss_jax.models.axes import constrain

KINDS = ("sft", "tasft", "nll_ascent", "unlikelihood", "safeinstr", "dpo")
CHOSEN = "chosen_"  # prefix of the chosen reply's fields in a dpo harmful batch
DIVERGENCES = emd.DIVERGENCES  # lower_bound, exact_onehot, upper_bound, gelbrich
TARGETS = ("onehot", "soft")

# -log(1 - p) is clamped at -log(UL_EPS) (about 13.8) so a token with p == 1 in float32
# gives a finite loss and gradient (Welleck et al. clamp 1 - p at 1e-5 the same way).
UL_EPS = 1e-6

# head_tile's automatic choice: vocabularies of at least AUTO_MIN_VOCAB tokens are tiled, in
# tiles of about AUTO_TILE columns
AUTO_MIN_VOCAB = 16384
AUTO_TILE = 8192

BENIGN_KEYS = ("input_ids", "targets", "loss_mask")
SUM_KEYS_BENIGN = ("ce_sum", "ce_count")
SUM_KEYS_HARMFUL = ("harm_count", "div_sum", "lower_sum", "upper_sum", "emd_onehot_sum",
                    "harm_nll_sum", "harm_nll_clip_sum", "ul_sum")
SUM_KEYS_PAIRS = ("pair_count", "dpo_sum", "dpo_acc_sum")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Which objective (KINDS), its weight lam, and for TA-SFT the divergence D and the target
    form (one-hot or soft); nll_clip caps the per-token NLL of nll_ascent; beta is DPO's
    inverse temperature.

    vocab_tile: the loss head in vocabulary tiles of about this many columns (no [B, T, V]
    logits); 0 = materialize the logits; -1 = automatic (tiles of AUTO_TILE when the vocabulary
    has at least AUTO_MIN_VOCAB tokens, except for divergence="gelbrich", whose covariance term
    needs the full distributions, and for kind="dpo", whose pairs are scored from the logits).
    token_tile: tokens per chunk inside a tile (0 = all).
    """

    kind: str = "tasft"
    lam: float = 1.0
    divergence: str = "lower_bound"
    gelbrich_rank: int = emd.GELBRICH_RANK  # r of divergence="gelbrich" (emd.principal_basis)
    target: str = "onehot"
    nll_clip: float | None = None
    vocab_tile: int = -1
    token_tile: int = 0
    beta: float = 0.1

    def validate(self, where: str = "objective") -> "ObjectiveConfig":
        """Check every field (ConfigError keyed under `where`); returns self."""
        if self.kind not in KINDS:
            raise ConfigError(key=f"{where}.kind", message=f"{self.kind!r} is not one of {KINDS}")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(key=f"{where}.divergence",
                              message=f"{self.divergence!r} is not one of {DIVERGENCES}")
        if self.target not in TARGETS:
            raise ConfigError(key=f"{where}.target", message=f"{self.target!r} is not one of {TARGETS}")
        if (isinstance(self.lam, bool) or not isinstance(self.lam, (int, float))
                or not math.isfinite(self.lam)):
            raise ConfigError(key=f"{where}.lam", message=f"expected a finite number, got {self.lam!r}")
        if self.lam < 0:
            raise ConfigError(key=f"{where}.lam",
                              message=f"must be >= 0 (the sign is fixed by the objective), got {self.lam}")
        r = self.gelbrich_rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(key=f"{where}.gelbrich_rank", message=f"expected an integer >= 1, got {r!r}")
        if self.divergence == "exact_onehot" and self.target != "onehot":
            raise ConfigError(key=f"{where}.divergence",
                              message=f"'exact_onehot' needs target='onehot' (the exact EMD to a soft "
                                      f"target has no closed form), got target={self.target!r}")
        if self.nll_clip is not None:
            if isinstance(self.nll_clip, bool) or not isinstance(self.nll_clip, (int, float)) \
                    or not self.nll_clip > 0 or not math.isfinite(self.nll_clip):
                raise ConfigError(key=f"{where}.nll_clip",
                                  message=f"expected a positive finite number or null, got {self.nll_clip!r}")
        for f in ("vocab_tile", "token_tile"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < (-1 if f == "vocab_tile" else 0):
                raise ConfigError(key=f"{where}.{f}", message=f"expected an int >= "
                                  f"{-1 if f == 'vocab_tile' else 0}, got {v!r}")
        if self.divergence == "gelbrich" and self.vocab_tile > 0:
            raise ConfigError(key=f"{where}.vocab_tile",
                              message="divergence 'gelbrich' needs the [tokens, V] distributions (its "
                                      "covariance term), which the tiled head does not form: set 0 or -1")
        if self.kind == "dpo" and self.vocab_tile > 0:
            raise ConfigError(key=f"{where}.vocab_tile",
                              message="kind 'dpo' scores its pairs from the [B, T, V] logits (dpo_sums); "
                                      "the tiled head has no dpo path: set 0 or -1")
        if (isinstance(self.beta, bool) or not isinstance(self.beta, (int, float))
                or not math.isfinite(self.beta) or self.beta <= 0):
            raise ConfigError(key=f"{where}.beta",
                              message=f"expected a positive finite number, got {self.beta!r}")
        if self.kind == "dpo" and self.target != "onehot":
            raise ConfigError(key=f"{where}.target",
                              message=f"dpo scores the replies' own tokens: target must be 'onehot', "
                                      f"got {self.target!r}")
        return self

    def head_tile(self, vocab_size: int) -> int:
        """Columns per vocabulary tile of the loss head for this vocabulary (0 = untiled logits)."""
        if self.vocab_tile == -1:
            auto = vocab_size >= AUTO_MIN_VOCAB and self.divergence != "gelbrich" and self.kind != "dpo"
            return AUTO_TILE if auto else 0
        return self.vocab_tile

    @property
    def uses_harmful(self) -> bool:
        """Whether the harmful batch drives the gradient (else it is only logged)."""
        return self.kind in ("tasft", "nll_ascent", "unlikelihood", "dpo", "safeinstr") and self.lam != 0


# --------------------------------------------------------------------------------------------
# masks and counts


def token_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Boolean [..., T]: positions that carry loss (loss_mask != 0 and not padding)."""
    if "loss_mask" not in batch:
        raise LossError(f"batch has no 'loss_mask' (keys: {sorted(batch)})")
    mask = jnp.asarray(batch["loss_mask"]) != 0
    if "segment_ids" in batch and batch["segment_ids"] is not None:
        mask = mask & (jnp.asarray(batch["segment_ids"]) != 0)
    return mask


def _total(batches, per_batch) -> jax.Array:
    """Sum of per_batch(b) over a batch, a list of batches, or None (0)."""
    if batches is None:
        return jnp.float32(0.0)
    if isinstance(batches, Mapping):
        batches = [batches]
    total = jnp.float32(0.0)
    for b in batches:
        total = total + per_batch(b)
    return total


def _count(batches) -> jax.Array:
    return _total(batches, lambda b: jnp.sum(token_mask(b).astype(jnp.float32)))


def chosen_part(batch: Mapping) -> dict | None:
    """The chosen replies of a dpo harmful batch (its CHOSEN-prefixed fields, prefix removed), or None."""
    if batch is None or CHOSEN + "input_ids" not in batch:
        return None
    return {k[len(CHOSEN):]: v for k, v in batch.items() if k.startswith(CHOSEN)}


def pair_valid(rejected: Mapping, chosen: Mapping) -> jax.Array:
    """Boolean [..., B]: rows whose rejected and chosen replies both carry loss tokens (real pairs)."""
    return jnp.any(token_mask(rejected), axis=-1) & jnp.any(token_mask(chosen), axis=-1)


def _count_pairs(batches) -> jax.Array:
    def pairs(b):
        c = chosen_part(b)
        return jnp.float32(0.0) if c is None else jnp.sum(pair_valid(b, c).astype(jnp.float32))
    return _total(batches, pairs)


def global_counts(benign_batches, harmful_batches=None) -> dict[str, jax.Array]:
    """Token counts over a whole (accumulated, all-device) batch, from the masks only.

    Each argument is a batch dict (any leading shape, e.g. [grad_accum, B, T]), a sequence
    of batch dicts, or None. Returns {"ce_count", "harm_count", "pair_count"} as float32
    scalars (pair_count: rows of dpo pairs, 0 without chosen replies); works on numpy or
    (sharded) jax arrays, inside or outside jit.
    """
    return {"ce_count": _count(benign_batches), "harm_count": _count(harmful_batches),
            "pair_count": _count_pairs(harmful_batches)}


# --------------------------------------------------------------------------------------------
# per-position pieces


def token_logprob(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Log p_t(targets[t]) via float32 log_softmax and a gather; 0 at masked-out positions.

    targets at masked-out positions may hold anything (e.g. -100): they are replaced by 0
    before the gather and the result there is exactly 0 with zero gradient.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(mask, targets, 0).astype(jnp.int32)
    lp = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(mask, lp, 0.0)


def log1m_exp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler 2012), NaN-free gradients."""
    x = jnp.minimum(x, 0.0)
    near_zero = x > -math.log(2.0)
    x_a = jnp.where(near_zero, x, -1.0)   # log(-expm1(x)) branch
    x_b = jnp.where(near_zero, -1.0, x)   # log1p(-exp(x)) branch
    return jnp.where(near_zero, jnp.log(-jnp.expm1(x_a)), jnp.log1p(-jnp.exp(x_b)))


def unlikelihood_terms(logp_y: jax.Array, mask: jax.Array) -> jax.Array:
    """-log(1 - p(y)) from log p(y), clamped at -log(UL_EPS); 0 at masked-out positions."""
    capped = jnp.minimum(logp_y, math.log1p(-UL_EPS))
    return jnp.where(mask, -log1m_exp(capped), 0.0)


def _check_batch(batch: Mapping, name: str, need: Sequence[str]) -> None:
    missing = [k for k in need if k not in batch]
    if missing:
        raise LossError(f"{name} batch is missing {missing} (keys: {sorted(batch)})")
    shape = jnp.shape(batch["input_ids"])
    for k in ("targets", "loss_mask", "positions", "segment_ids"):
        if k in batch and batch[k] is not None and jnp.shape(batch[k]) != shape:
            raise LossError(f"{name} batch: field {k!r} has shape {jnp.shape(batch[k])}, "
                                 f"input_ids has {shape}")


def benign_from_logprob(lp: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """{"ce_sum", "ce_count"} from log p_t(y_t) [B, T] (0 off the mask) and the loss mask."""
    return {"ce_sum": -jnp.sum(lp), "ce_count": jnp.sum(mask.astype(jnp.float32))}


def benign_sums(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{"ce_sum", "ce_count"} of the benign batch from its logits [B, T, V]."""
    mask = token_mask(batch)
    return benign_from_logprob(token_logprob(logits, jnp.asarray(batch["targets"]), mask), mask)


def harmful_sums(logits: jax.Array, batch: Mapping[str, jax.Array], E_hat: jax.Array,
                 obj: ObjectiveConfig, basis: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sums over the harmful response tokens, from the harmful logits [B, T, V].

    div_sum      Σ D(p_t, q_t), D = obj.divergence, q_t one-hot on targets or soft (target_mu)
    lower_sum    Σ LB(p_t, q_t)          upper_sum  Σ UB(p_t, q_t)
    emd_onehot_sum  Σ exact EMD(p_t, δ_{y_t}) = Σ 1 - μ(p_t)·ê_{y_t}  (always to the one-hot y_t)
    harm_nll_sum Σ -log p_t(y_t)         harm_nll_clip_sum  Σ min(-log p_t(y_t), nll_clip)
    ul_sum       Σ -log(1 - p_t(y_t))    harm_count  number of harmful response tokens

    Only the term that drives the gradient for obj.kind keeps its gradient; the logged ones
    go through stop_gradient. μ(p) is computed once (one [N, V] @ [V, d] product).
    basis: the [r, d] basis of divergence="gelbrich" (emd.principal_basis(E_hat, r), which a
    train step computes once, outside the step); None computes it here.
    """
    mask = token_mask(batch)
    logits = logits.astype(jnp.float32)
    probs = emd.probs_from_logits(logits)
    lp = token_logprob(logits, jnp.asarray(batch["targets"]), mask)
    return harmful_from_stats(lp, emd.mean_embedding_from_probs(probs, E_hat), batch, E_hat, obj,
                              probs=probs, basis=basis)


def harmful_from_stats(lp: jax.Array, mu_p: jax.Array, batch: Mapping[str, jax.Array], E_hat: jax.Array,
                       obj: ObjectiveConfig, *, probs: jax.Array | None = None,
                       basis: jax.Array | None = None) -> dict[str, jax.Array]:
    """The sums of `harmful_sums` from log p_t(y_t) [B, T] (0 off the mask) and μ(p_t) [B, T, d];
    divergence="gelbrich" also needs the distributions p_t [B, T, V] (probs: its covariance term)."""
    mask = token_mask(batch)
    targets = jnp.asarray(batch["targets"])
    e_y = emd.target_mean(targets, E_hat, "onehot", mask)      # [B, T, d]
    target_extra = None
    if obj.target == "soft":
        mu_q, target_extra = _soft_target(batch, E_hat, mask)
    else:
        mu_q = e_y
    mu_q = jax.lax.stop_gradient(mu_q)
    sg_mu = jax.lax.stop_gradient(mu_p)

    def msum(v):
        return jnp.sum(jnp.where(mask, v, 0.0))

    train_div = obj.kind == "tasft"
    mu_div = mu_p if train_div else sg_mu
    if obj.divergence == "lower_bound":
        div = emd.lower_bound_from_means(mu_div, mu_q)
    elif obj.divergence == "gelbrich":
        if probs is None:
            raise LossError("divergence 'gelbrich' needs the [tokens, V] distributions, which the "
                            "tiled loss head does not form: set objective.vocab_tile=0")
        div = _gelbrich(probs if train_div else jax.lax.stop_gradient(probs), mu_div, mu_q,
                        target_extra, E_hat, obj, basis)
    else:  # upper_bound, or exact_onehot (== UB to the one-hot target; validate() enforces onehot)
        div = emd.upper_bound_from_means(mu_div, mu_q)

    nll = -lp
    nll_clip = nll if obj.nll_clip is None else jnp.minimum(nll, obj.nll_clip)
    ul = unlikelihood_terms(lp, mask)
    sg = jax.lax.stop_gradient
    return {
        "harm_count": jnp.sum(mask.astype(jnp.float32)),
        "div_sum": msum(div),
        "lower_sum": msum(emd.lower_bound_from_means(sg_mu, mu_q)),
        "upper_sum": msum(emd.upper_bound_from_means(sg_mu, mu_q)),
        "emd_onehot_sum": msum(emd.upper_bound_from_means(sg_mu, jax.lax.stop_gradient(e_y))),
        "harm_nll_sum": msum(nll) if obj.kind == "safeinstr" else sg(msum(nll)),
        "harm_nll_clip_sum": msum(nll_clip) if obj.kind == "nll_ascent" else sg(msum(nll_clip)),
        "ul_sum": msum(ul) if obj.kind == "unlikelihood" else sg(msum(ul)),
    }


def _soft_target(batch: Mapping, E_hat: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """μ(q) [B, T, d] from the batch's target_mu, and whatever the harvest stored after it (the
    packed covariance Π Σ_q Πᵀ for the Gelbrich divergence; [B, T, 0] when nothing)."""
    if "target_mu" not in batch or batch["target_mu"] is None:
        raise LossError("objective.target='soft' needs harmful batches with 'target_mu' [B, T, d]")
    tm = jnp.asarray(batch["target_mu"], jnp.float32)
    d = E_hat.shape[1]
    if tm.shape[:-1] != mask.shape or tm.shape[-1] < d:
        raise LossError(f"harmful batch: field 'target_mu' has shape {tm.shape}, expected "
                        f"{mask.shape + (d,)} (or wider, with a packed covariance after μ(q))")
    tm = jnp.where(mask[..., None], tm, 0.0)  # anything (NaN included) allowed off-mask
    return tm[..., :d], tm[..., d:]


def _gelbrich(probs, mu_p, mu_q, target_extra, E_hat, obj: ObjectiveConfig, basis) -> jax.Array:
    """Per-token LB_G (emd.gelbrich_from_moments) in the top-r principal basis of Ê: for a
    one-hot target Σ_q = 0 and the Bures term is tr(Π Σ_p Πᵀ) (no eigendecomposition); a soft
    target needs its covariance stored after μ(q) (harvest --soft-targets --gelbrich-rank r)."""
    r = obj.gelbrich_rank
    basis = emd.principal_basis(E_hat, r) if basis is None else basis
    if basis.shape != (r, E_hat.shape[1]):
        raise LossError(f"gelbrich basis has shape {basis.shape}, expected {(r, E_hat.shape[1])}")
    basis = jax.lax.stop_gradient(basis)
    if obj.target == "onehot":
        return emd.lower_bound_from_means(mu_p, mu_q) + 0.5 * emd.projected_trace(
            probs, E_hat, basis, mu=mu_p)
    if target_extra is None or target_extra.shape[-1] != emd.packed_size(r):
        got = None if target_extra is None else target_extra.shape[-1]
        raise LossError(f"divergence 'gelbrich' with soft targets needs target_mu = μ(q) followed by "
                        f"the packed {r} x {r} covariance ({emd.packed_size(r)} values; got {got}): "
                        f"harvest with --soft-targets --gelbrich-rank {r}")
    _, cov_p = emd.projected_moments(probs, E_hat, basis, mu=mu_p)
    cov_q = jax.lax.stop_gradient(emd.unpack_symmetric(target_extra, r))
    return emd.gelbrich_from_moments(mu_p, cov_p, mu_q, cov_q)


def sequence_logprob(logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(log π(y|x) [B] under the logits, log π_ref(y|x) [B] from batch["ref_logp"]): sums over the
    response tokens."""
    if "ref_logp" not in batch or batch["ref_logp"] is None:
        raise LossError("dpo needs 'ref_logp' [B, T] in the rejected and chosen batches (the data "
                        "layer precomputes it: semloss_jax.data.reference)")
    mask = token_mask(batch)
    lp = token_logprob(logits, jnp.asarray(batch["targets"]), mask)
    ref = jnp.where(mask, jnp.asarray(batch["ref_logp"], jnp.float32), 0.0)
    return jnp.sum(lp, axis=-1), jnp.sum(ref, axis=-1)


def dpo_sums(rejected_logits: jax.Array, rejected: Mapping, chosen_logits: jax.Array, chosen: Mapping,
             obj: ObjectiveConfig) -> dict[str, jax.Array]:
    """{"pair_count", "dpo_sum", "dpo_acc_sum"} over the pairs (row i of rejected and chosen).

    dpo_sum = Σ_pairs softplus(-m), m = β[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]
    (= Σ -log σ(m)); dpo_acc_sum counts the pairs with m > 0 (logged). A row without loss tokens
    on either side is not a pair.
    """
    pol_w, ref_w = sequence_logprob(chosen_logits, chosen)
    pol_l, ref_l = sequence_logprob(rejected_logits, rejected)
    margin = obj.beta * ((pol_w - ref_w) - (pol_l - ref_l))
    valid = pair_valid(rejected, chosen)
    loss = jax.nn.softplus(-margin)
    if obj.kind != "dpo":
        loss = jax.lax.stop_gradient(loss)
    return {"pair_count": jnp.sum(valid.astype(jnp.float32)),
            "dpo_sum": jnp.sum(jnp.where(valid, loss, 0.0)),
            "dpo_acc_sum": jax.lax.stop_gradient(jnp.sum((valid & (margin > 0)).astype(jnp.float32)))}


def sums_from_logits(benign_logits: jax.Array, benign: Mapping, harmful_logits: jax.Array | None,
                     harmful: Mapping | None, E_hat: jax.Array | None, obj: ObjectiveConfig,
                     basis: jax.Array | None = None, chosen_logits: jax.Array | None = None) -> dict:
    """loss_sums without the model: the objective as a function of the logits (chosen_logits:
    those of the chosen replies of a dpo harmful batch)."""
    out = benign_sums(benign_logits, benign)
    if harmful is not None:
        if E_hat is None:
            raise LossError("a harmful batch needs E_hat (cost.unit_embeddings of the frozen embeddings)")
        out.update(harmful_sums(harmful_logits, harmful, E_hat, obj, basis))
        chosen = chosen_part(harmful)
        if chosen is not None:
            out.update(dpo_sums(harmful_logits, harmful, chosen_logits, chosen, obj))
        elif obj.kind == "dpo":
            raise LossError(f"objective kind 'dpo' needs the chosen replies in the harmful batch "
                            f"({CHOSEN}input_ids, ...; keys: {sorted(harmful)})")
    return out


def _hidden(params, model_cfg, batch, frozen_layers):
    return model_lib.forward(params, model_cfg, jnp.asarray(batch["input_ids"]),
                             positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                             frozen_layers=frozen_layers, return_hidden=True)


def _concat_ok(a: Mapping, b: Mapping) -> bool:
    keys = ("input_ids", "positions", "segment_ids")
    if any((k in a) != (k in b) for k in keys):
        return False
    return all(jnp.shape(a[k])[1:] == jnp.shape(b[k])[1:] for k in keys if k in a)


def shard_aligned_concat(a: jax.Array, b: jax.Array, blocks: int) -> jax.Array:
    """Rows of a and b in one array whose i-th of `blocks` row blocks holds a's i-th block, then
    b's i-th block: with the batch sharded in `blocks` contiguous blocks, no row changes device."""
    if blocks == 1:
        return jnp.concatenate([a, b], axis=0)
    ra, rb = a.reshape(blocks, -1, *a.shape[1:]), b.reshape(blocks, -1, *b.shape[1:])
    return jnp.concatenate([ra, rb], axis=1).reshape(a.shape[0] + b.shape[0], *a.shape[1:])


def shard_aligned_split(x: jax.Array, rows_a: int, blocks: int) -> tuple[jax.Array, jax.Array]:
    """The inverse of shard_aligned_concat: (the a rows, the b rows)."""
    if blocks == 1:
        return x[:rows_a], x[rows_a:]
    r = x.reshape(blocks, -1, *x.shape[1:])
    ka = rows_a // blocks
    return (r[:, :ka].reshape(rows_a, *x.shape[1:]),
            r[:, ka:].reshape(x.shape[0] - rows_a, *x.shape[1:]))


def _hidden_states(params, model_cfg, parts: Sequence[Mapping], frozen_layers: int,
                   batch_shards: int) -> list[jax.Array]:
    """Final hidden states [B, T, d] of each batch part (benign, harmful, and a dpo batch's
    chosen replies).

    Same-shape parts run as ONE forward, concatenated shard-aligned (each row block holds its
    own rows of every part, in part order) when every row count divides by batch_shards;
    otherwise one forward per part."""
    if len(parts) == 1 or not all(_concat_ok(parts[0], p) for p in parts[1:]):
        return [_hidden(params, model_cfg, p, frozen_layers) for p in parts]
    rows = [jnp.shape(p["input_ids"])[0] for p in parts]
    blocks = batch_shards if all(n % batch_shards == 0 for n in rows) else 1
    keys = [k for k in ("input_ids", "positions", "segment_ids") if k in parts[0]]
    both = {}
    for k in keys:
        x = jnp.asarray(parts[0][k])
        for p in parts[1:]:
            x = shard_aligned_concat(x, jnp.asarray(p[k]), blocks)
        both[k] = constrain(x, ("batch", "seq"))
    h, out = _hidden(params, model_cfg, both, frozen_layers), []
    for n in reversed(rows[1:]):   # peel the last part off until the first is left
        h, last = shard_aligned_split(h, h.shape[0] - n, blocks)
        out.append(last)
    return [h] + out[::-1]


def sums_from_hidden(hb: jax.Array, benign: Mapping, hh: jax.Array | None, harmful: Mapping | None,
                     W: jax.Array, E_hat: jax.Array | None, obj: ObjectiveConfig, tile: int) -> dict:
    """The sums of sums_from_logits from the final hidden states [B, T, d] and the head W [d, V] in
    vocabulary tiles of about `tile` columns (loss/head.py): no [B, T, V] array. The dpo
    objective's pairs are scored from the logits only (LossError here)."""
    if obj.kind == "dpo" or chosen_part(harmful) is not None:
        raise LossError("objective kind 'dpo' scores its pairs from the [B, T, V] logits (dpo_sums); the "
                        "tiled loss head has no dpo path: set objective.vocab_tile=0")

    def stats(h, batch, with_mu):
        mask = token_mask(batch)
        y = jnp.where(mask, jnp.asarray(batch["targets"]), 0)
        lse, zy, mu = head.head_stats(h, W, y, E_hat if with_mu else None, vocab_tile=tile,
                                      token_tile=obj.token_tile)
        return jnp.where(mask, zy - lse, 0.0), mu, mask

    lp, _, mask = stats(hb, benign, False)
    out = benign_from_logprob(lp, mask)
    if harmful is not None:
        lp_h, mu_p, _ = stats(hh, harmful, True)
        out.update(harmful_from_stats(lp_h, mu_p, harmful, E_hat, obj))
    return out


def loss_sums(params, model_cfg, benign: Mapping, harmful: Mapping | None, E_hat: jax.Array | None,
              obj: ObjectiveConfig, *, frozen_layers: int = 0, batch_shards: int = 1,
              basis: jax.Array | None = None) -> dict[str, jax.Array]:
    """Forward the model on the benign (and harmful, and chosen) batch and return SUMS and COUNTS.

    Keys: ce_sum, ce_count; with a harmful batch also harm_count, div_sum, lower_sum,
    upper_sum, emd_onehot_sum, harm_nll_sum, harm_nll_clip_sum, ul_sum (see harmful_sums);
    with chosen replies in it also pair_count, dpo_sum, dpo_acc_sum (see dpo_sums).
    Batches with the same sequence length go through ONE forward (concatenated along the
    batch axis, shard-aligned for `batch_shards` row blocks: the data x fsdp mesh size);
    otherwise one each. frozen_layers: the first n decoder layers get no gradient and skip
    their backward pass (model.forward). The head is tiled or not as obj.head_tile says; both
    give the same sums. basis: the Gelbrich divergence's basis (harmful_sums).
    """
    _check_batch(benign, "benign", BENIGN_KEYS)
    chosen = None
    if harmful is not None:
        _check_batch(harmful, "harmful", BENIGN_KEYS)
        if E_hat is None:
            raise LossError("a harmful batch needs E_hat (cost.unit_embeddings of the frozen embeddings)")
        chosen = chosen_part(harmful)
        if chosen is not None:
            _check_batch(chosen, "chosen", BENIGN_KEYS)
    hs = _hidden_states(params, model_cfg, [p for p in (benign, harmful, chosen) if p is not None],
                        frozen_layers, batch_shards)
    hs = hs + [None] * (3 - len(hs))
    W = model_lib.lm_head_matrix(params, model_cfg).astype(hs[0].dtype)
    tile = obj.head_tile(model_cfg.vocab_size)
    if tile:
        return sums_from_hidden(hs[0], benign, hs[1], harmful, W, E_hat, obj, tile)
    zb, zh, zc = (None if h is None else model_lib.lm_logits(h, W) for h in hs)
    return sums_from_logits(zb, benign, zh, harmful, E_hat, obj, basis, chosen_logits=zc)


def _safe_div(num, den):
    return num / jnp.maximum(den, 1.0)


def combine(sums: Mapping[str, jax.Array], counts: Mapping[str, jax.Array],
            obj: ObjectiveConfig) -> jax.Array:
    """The scalar loss from sums and (GLOBAL) counts; a count of 0 divides by 1 (its sum is 0).

    tasft:        ce_sum/ce_count - lam * div_sum/harm_count
    unlikelihood: ce_sum/ce_count + lam * ul_sum/harm_count
    nll_ascent:   ce_sum/ce_count - lam * harm_nll_clip_sum/harm_count
    dpo:          ce_sum/ce_count + lam * dpo_sum/pair_count
    safeinstr:    ce_sum/ce_count + lam * harm_nll_sum/harm_count  (the refusal stream; without
                  one, ce_sum/ce_count)
    sft:          ce_sum/ce_count
    """
    loss = _safe_div(sums["ce_sum"], counts["ce_count"])
    if obj.kind == "sft" or obj.lam == 0 or (obj.kind == "safeinstr" and "harm_count" not in sums):
        return loss
    if "harm_count" not in sums:
        raise LossError(f"objective kind {obj.kind!r} with lam={obj.lam} needs a harmful batch")
    hc = counts["harm_count"]
    if obj.kind == "tasft":
        return loss - obj.lam * _safe_div(sums["div_sum"], hc)
    if obj.kind == "unlikelihood":
        return loss + obj.lam * _safe_div(sums["ul_sum"], hc)
    if obj.kind == "nll_ascent":
        return loss - obj.lam * _safe_div(sums["harm_nll_clip_sum"], hc)
    if obj.kind == "safeinstr":
        return loss + obj.lam * _safe_div(sums["harm_nll_sum"], hc)
    if obj.kind == "dpo":
        if "dpo_sum" not in sums:
            raise LossError("objective kind 'dpo' needs the chosen replies in the harmful batch")
        return loss + obj.lam * _safe_div(sums["dpo_sum"], counts["pair_count"])
    raise LossError(f"unknown objective kind {obj.kind!r}")


def metrics_from_sums(sums: Mapping[str, jax.Array],
                      counts: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Token means for logging: ce, emd_lower, emd_upper, emd_onehot, div, harm_nll, ul
    (0 without harmful); pair means dpo (the DPO loss) and dpo_acc (share of pairs whose
    margin is > 0), 0 without chosen replies."""
    hc = counts.get("harm_count", jnp.float32(0.0))
    pc = counts.get("pair_count", jnp.float32(0.0))

    def hm(key, den=hc):
        return _safe_div(sums[key], den) if key in sums else jnp.float32(0.0)

    return {"ce": _safe_div(sums["ce_sum"], counts["ce_count"]), "emd_lower": hm("lower_sum"),
            "emd_upper": hm("upper_sum"), "emd_onehot": hm("emd_onehot_sum"), "div": hm("div_sum"),
            "harm_nll": hm("harm_nll_sum"), "ul": hm("ul_sum"), "dpo": hm("dpo_sum", pc),
            "dpo_acc": hm("dpo_acc_sum", pc)}
