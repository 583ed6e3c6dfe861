"""Optimizer, trainable-parameter choice and the pure train step of issue 5.

- `OptimConfig`: AdamW + linear warmup + cosine decay + global-norm clipping, gradient
  accumulation, and the trainable set: "all", "last_k" (the last K decoder layers plus the
  final norm), "lora" (adapters of semloss_jax/lora.py on chosen projections) or "none".
- `make_optimizer(ocfg)`: the optax transformation (clip -> AdamW with schedule).
- `trainable_mask(params, model_cfg, ocfg)`: which entries of state["params"] train.
- `init_train_state` / `make_train_step`: the pure step. Batches carry a leading micro-batch
  axis [grad_accum, B, T]; the step scans over it (lax.scan), normalising every micro-batch
  by the GLOBAL token counts of the whole batch (objective.global_counts), so the summed
  gradient is exactly the gradient of one large batch.

last_k design (documented choice): the model's decoder layers are stacked along a leading
[L, ...] axis, so freezing is a per-layer MASK, not a split of the tree. The mask of a
layers leaf is a boolean array of shape [L, 1, ..., 1] (True for the last K layers); the
embedding and (untied) lm_head are False; final_norm is True. In the step:
  * fully frozen leaves enter the loss through stop_gradient (no wasted cotangents) and get
    no optimizer state (optax.masked);
  * gradients are multiplied by the mask before clipping, so the global norm (and the
    logged grad_norm) only counts trainable entries;
  * the new params are `where(mask, p + update, p)`: frozen entries are copied bit for bit,
    whatever AdamW's decoupled weight decay would have done to them.

Weight decay applies to matrices only (kernels, embeddings, LoRA A/B), not to RMSNorm
scales or biases.

state = {"params": trainable tree (full params, or LoRA params), "frozen": base params for
LoRA else None, "opt_state", "step": int32 scalar, "rng": a jax.random.PRNGKey (uint32[2])}.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

from semloss_jax import lora as lora_lib
from semloss_jax import model as model_lib
from semloss_jax import objective as obj_lib

TRAINABLE = ("all", "last_k", "lora", "none")


class OptimError(ValueError):
    """An invalid optimizer / trainable-set configuration or step input."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int = 1000
    final_lr_ratio: float = 0.1
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    trainable: str = "all"
    last_k: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def validate(self, where: str = "optim") -> "OptimConfig":
        def num(name, lo=None, lo_strict=False, hi=None, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise OptimError(f"{where}.{name}: expected a finite number, got {v!r}")
            if lo is not None and (v <= lo if lo_strict else v < lo):
                raise OptimError(f"{where}.{name}: must be {'>' if lo_strict else '>='} {lo}, got {v}")
            if hi is not None and v > hi:
                raise OptimError(f"{where}.{name}: must be <= {hi}, got {v}")

        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise OptimError(f"{where}.{name}: expected an integer, got {v!r}")
            if v < lo:
                raise OptimError(f"{where}.{name}: must be >= {lo}, got {v}")

        num("lr", 0.0)
        num("weight_decay", 0.0)
        num("b1", 0.0, hi=1.0)
        num("b2", 0.0, hi=1.0)
        num("eps", 0.0, lo_strict=True)
        num("final_lr_ratio", 0.0, hi=1.0)
        num("clip_norm", 0.0, lo_strict=True, allow_none=True)
        num("lora_alpha", 0.0, lo_strict=True)
        integer("warmup_steps", 0)
        integer("total_steps", 1)
        integer("grad_accum", 1)
        integer("last_k", 0)
        integer("lora_rank", 1)
        if self.trainable not in TRAINABLE:
            raise OptimError(f"{where}.trainable: {self.trainable!r} is not one of {TRAINABLE}")
        if self.trainable == "last_k" and self.last_k < 1:
            raise OptimError(f"{where}.last_k: must be >= 1 with trainable='last_k', got {self.last_k}")
        if self.trainable == "lora":
            try:
                lora_lib._targets(self)
            except lora_lib.LoraError as e:
                raise OptimError(str(e)) from None
        return self


# --------------------------------------------------------------------------------------------
# schedule and optimizer


def make_schedule(ocfg: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """lr(step), step = number of updates already applied (0 for the first update).

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps (the first update is not 0);
    then cosine from lr to final_lr_ratio * lr over the remaining total_steps - warmup_steps
    updates, constant at final_lr_ratio * lr afterwards.
    """
    lr, W, T, fr = float(ocfg.lr), int(ocfg.warmup_steps), int(ocfg.total_steps), float(ocfg.final_lr_ratio)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = lr * (s + 1.0) / max(W, 1)
        t = jnp.clip((s - W) / max(T - W, 1), 0.0, 1.0)
        cos = lr * (fr + (1.0 - fr) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)))
        return jnp.where(s < W, warm, cos)

    return schedule


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _decay_mask(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _path_names(path)[-1] in ("kernel", "embedding", "lora_a", "lora_b"), tree)


def _touched_mask(tree):
    """For last_k: leaves that are at least partly trainable (layers, final_norm)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _path_names(path)[0] in ("layers", "final_norm"), tree)


def make_optimizer(ocfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule, b1, b2, eps, weight_decay on matrices).

    For trainable="last_k", fully frozen leaves (embedding, lm_head) get no optimizer state;
    for "none" the updates are zero.
    """
    ocfg.validate()
    if ocfg.trainable == "none":
        return optax.set_to_zero()
    adamw = optax.adamw(learning_rate=make_schedule(ocfg), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                        weight_decay=ocfg.weight_decay, mask=_decay_mask)
    if ocfg.trainable == "last_k":
        adamw = optax.masked(adamw, _touched_mask)
    parts = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm is not None else []
    return optax.chain(*parts, adamw)


# --------------------------------------------------------------------------------------------
# trainable set


def trainable_mask(params, model_cfg, ocfg: OptimConfig):
    """A tree like `params` (the TRAINABLE tree of the state) of masks: True / False (Python
    bools, the whole leaf) or, for layers leaves under last_k, a numpy bool array [L, 1, ...]
    True on the last K layers. For "all" and "lora" (params = the LoRA tree) everything is True.
    """
    if ocfg.trainable in ("all", "lora"):
        return jax.tree_util.tree_map(lambda _: True, params)
    if ocfg.trainable == "none":
        return jax.tree_util.tree_map(lambda _: False, params)
    L = int(model_cfg.num_hidden_layers)
    if not 1 <= ocfg.last_k <= L:
        raise OptimError(f"optim.last_k: must be in [1, num_hidden_layers={L}], got {ocfg.last_k}")
    layer_on = np.arange(L) >= L - ocfg.last_k

    def leaf(path, x):
        top = _path_names(path)[0]
        if top == "layers":
            if x.shape[0] != L:
                raise OptimError(f"params leaf {'/'.join(_path_names(path))} has leading dim {x.shape[0]}, "
                                 f"expected num_hidden_layers={L}")
            return layer_on.reshape((L,) + (1,) * (len(x.shape) - 1))
        return top == "final_norm"

    return jax.tree_util.tree_map_with_path(leaf, params)


def _is_all(m) -> bool:
    return isinstance(m, (bool, np.bool_)) and bool(m)


def _is_none(m) -> bool:
    return isinstance(m, (bool, np.bool_)) and not bool(m)


def _mask_grads(grads, mask):
    def f(g, m):
        if _is_all(m):
            return g
        if _is_none(m):
            return jnp.zeros_like(g)
        return jnp.where(m, g, jnp.zeros_like(g))
    return jax.tree_util.tree_map(f, grads, mask)


def _stop_frozen(params, mask):
    return jax.tree_util.tree_map(lambda p, m: jax.lax.stop_gradient(p) if _is_none(m) else p, params, mask)


def _apply(params, updates, mask):
    def f(p, u, m):
        new = (p + u).astype(p.dtype)
        if _is_all(m):
            return new
        if _is_none(m):
            return p
        return jnp.where(m, new, p)
    return jax.tree_util.tree_map(f, params, updates, mask)


def full_params(trainable, frozen, ocfg: OptimConfig):
    """The model params the loss sees: merged LoRA for trainable="lora", else the trainable tree."""
    if ocfg.trainable == "lora":
        if frozen is None:
            raise OptimError("trainable='lora' needs the base params in state['frozen']")
        return lora_lib.merge_lora(frozen, trainable, ocfg)
    return trainable


def export_params(state: Mapping, ocfg: OptimConfig):
    """Model params for export / evaluation (LoRA merged into the base)."""
    return full_params(state["params"], state["frozen"], ocfg)


# --------------------------------------------------------------------------------------------
# state and step


def init_train_state(params, model_cfg, ocfg: OptimConfig, optimizer: optax.GradientTransformation,
                     key: jax.Array) -> dict:
    """state = {"params", "frozen", "opt_state", "step": int32 0, "rng"} (see the module doc).

    key: a jax.random.PRNGKey (raw uint32[2]); for LoRA it is split to initialise A.
    """
    ocfg.validate()
    if ocfg.trainable == "lora":
        k_lora, key = jax.random.split(key)
        trainable, frozen = lora_lib.init_lora(params, model_cfg, ocfg, k_lora), params
    else:
        trainable, frozen = params, None
    if ocfg.trainable == "last_k":
        trainable_mask(trainable, model_cfg, ocfg)  # validates last_k against the model
    return {"params": trainable, "frozen": frozen, "opt_state": optimizer.init(trainable),
            "step": jnp.zeros((), jnp.int32), "rng": key}


def train_state_logical_axes(model_cfg, ocfg: OptimConfig, optimizer: optax.GradientTransformation) -> dict:
    """PartitionSpecs of logical axis names for every leaf of the train state (same tree as
    init_train_state's): params-shaped parts of the optimizer state follow the params, scalars
    (counts, step, rng) are replicated, PartitionSpec()."""
    ocfg.validate()
    p_axes = model_lib.param_logical_axes(model_cfg)
    abstract = model_lib.abstract_params(model_cfg)
    if ocfg.trainable == "lora":
        t_axes = lora_lib.lora_logical_axes(model_cfg, ocfg)
        t_abstract = jax.eval_shape(lambda k: lora_lib.init_lora(abstract, model_cfg, ocfg, k),
                                    jax.random.PRNGKey(0))
        frozen_axes = p_axes
    else:
        t_axes, t_abstract, frozen_axes = p_axes, abstract, None
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    by_path = {_path_names(path): (ax, tuple(a.shape)) for (path, ax), a in zip(
        jax.tree_util.tree_flatten_with_path(t_axes, is_leaf=is_spec)[0], jax.tree_util.tree_leaves(t_abstract))}
    n_max = max(len(k) for k in by_path)

    def leaf_axes(path, x):
        names = _path_names(path)
        for n in range(min(n_max, len(names)), 0, -1):  # a param path that ends this path, same shape
            hit = by_path.get(names[-n:])
            if hit is not None and hit[1] == tuple(x.shape):
                return hit[0]
        return PartitionSpec()

    opt_abstract = jax.eval_shape(optimizer.init, t_abstract)
    opt_axes = jax.tree_util.tree_map_with_path(leaf_axes, opt_abstract)
    return {"params": t_axes, "frozen": frozen_axes, "opt_state": opt_axes,
            "step": PartitionSpec(), "rng": PartitionSpec()}


METRIC_KEYS = ("loss", "ce", "emd_lower", "emd_upper", "emd_onehot", "div", "harm_nll", "ul",
               "grad_norm", "lr", "tokens", "ce_tokens", "harm_tokens")


def _leading(batch, name):
    n = {jnp.shape(v)[0] for k, v in batch.items() if v is not None and k != "target_mu"} | (
        {jnp.shape(batch["target_mu"])[0]} if batch.get("target_mu") is not None else set())
    if len(n) != 1 or any(jnp.ndim(v) < 3 for k, v in batch.items() if v is not None and k != "target_mu"):
        raise OptimError(f"{name} batch: every field needs a leading micro-batch axis [grad_accum, B, T]; "
                         f"got shapes { {k: jnp.shape(v) for k, v in batch.items() if v is not None} }")
    return n.pop()


def make_train_step(model_cfg, obj: obj_lib.ObjectiveConfig, ocfg: OptimConfig,
                    optimizer: optax.GradientTransformation):
    """A pure step(state, benign_micro, harmful_micro, E_hat) -> (state, metrics).

    benign_micro / harmful_micro: batch dicts whose fields have a leading micro-batch axis
    [grad_accum, B, T] (harmful_micro may be None, e.g. for sft). E_hat [V, d]: frozen unit
    embeddings (cost.unit_embeddings of the INITIAL embedding matrix), passed explicitly.
    metrics: dict of float32 scalars with METRIC_KEYS (loss of the whole batch, token means of
    its parts, grad_norm before clipping, lr of this update, token counts).
    No sharding code here: jit it with in/out shardings and donate_argnums outside.
    """
    obj.validate()
    ocfg.validate()
    schedule = make_schedule(ocfg)
    train = ocfg.trainable != "none"
    # last_k: the layers below the trainable ones run without a backward pass at all
    frozen_layers = model_cfg.num_hidden_layers - ocfg.last_k if ocfg.trainable == "last_k" else 0

    def loss_fn(trainable, frozen, b, h, E_hat, counts, mask):
        params = full_params(_stop_frozen(trainable, mask), frozen, ocfg)
        sums = obj_lib.loss_sums(params, model_cfg, b, h, E_hat, obj, frozen_layers=frozen_layers)
        return obj_lib.combine(sums, counts, obj), sums

    def step(state, benign_micro, harmful_micro, E_hat):
        A = _leading(benign_micro, "benign")
        if harmful_micro is not None and _leading(harmful_micro, "harmful") != A:
            raise OptimError(f"benign and harmful batches have different micro-batch counts "
                             f"({A} vs {_leading(harmful_micro, 'harmful')})")
        if A != ocfg.grad_accum:
            raise OptimError(f"batches carry {A} micro-batches but optim.grad_accum = {ocfg.grad_accum}")
        if obj.uses_harmful and harmful_micro is None:
            raise OptimError(f"objective kind {obj.kind!r} with lam={obj.lam} needs a harmful batch")
        params, frozen = state["params"], state["frozen"]
        mask = trainable_mask(params, model_cfg, ocfg)
        counts = obj_lib.global_counts(benign_micro, harmful_micro)
        E_hat = jax.lax.stop_gradient(E_hat) if E_hat is not None else None

        sum_keys = obj_lib.SUM_KEYS_BENIGN + (obj_lib.SUM_KEYS_HARMFUL if harmful_micro is not None else ())
        zero_sums = {k: jnp.zeros((), jnp.float32) for k in sum_keys}

        if train:
            def body(carry, xs):
                g_acc, s_acc = carry
                b, h = xs
                (_, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, b, h, E_hat, counts, mask)
                g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
                s_acc = jax.tree_util.tree_map(jnp.add, s_acc, sums)
                return (g_acc, s_acc), None

            g0 = jax.tree_util.tree_map(jnp.zeros_like, params)
            (grads, sums), _ = jax.lax.scan(body, (g0, zero_sums), (benign_micro, harmful_micro))
            grads = _mask_grads(grads, mask)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state["opt_state"], params)
            new_params = _apply(params, updates, mask)
        else:
            def body(s_acc, xs):
                b, h = xs
                _, sums = loss_fn(params, frozen, b, h, E_hat, counts, mask)
                return jax.tree_util.tree_map(jnp.add, s_acc, sums), None

            sums, _ = jax.lax.scan(body, zero_sums, (benign_micro, harmful_micro))
            grad_norm, opt_state, new_params = jnp.float32(0.0), state["opt_state"], params

        loss = obj_lib.combine(sums, counts, obj)
        metrics = {"loss": loss, **obj_lib.metrics_from_sums(sums, counts), "grad_norm": grad_norm,
                   "lr": schedule(state["step"]) if train else jnp.float32(0.0),
                   "tokens": _real_tokens(benign_micro) + _real_tokens(harmful_micro),
                   "ce_tokens": counts["ce_count"], "harm_tokens": counts["harm_count"]}
        metrics = {k: jnp.asarray(metrics[k], jnp.float32) for k in METRIC_KEYS}
        new_rng = jax.random.split(state["rng"])[0]
        new_state = {"params": new_params, "frozen": frozen, "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": new_rng}
        return new_state, metrics

    return step


def _real_tokens(batch) -> jax.Array:
    """Non-padding input tokens (segment_ids != 0; all tokens without segment_ids)."""
    if batch is None:
        return jnp.float32(0.0)
    if batch.get("segment_ids") is not None:
        return jnp.sum((jnp.asarray(batch["segment_ids"]) != 0).astype(jnp.float32))
    return jnp.float32(np.prod(jnp.shape(batch["input_ids"])))
