"""Optimizer, trainable-parameter choice and the masked update that the train step (step.py) applies.

- `OptimConfig`: AdamW + linear warmup + cosine decay + global-norm clipping, gradient
  accumulation, and the trainable set: "all", "last_k" (the last K decoder layers plus the
  final norm), "lora" (adapters of semloss_jax/models/lora.py on chosen projections) or "none".
- `make_optimizer(ocfg)`: the optax transformation (clip -> AdamW with schedule).
- `trainable_mask(params, model_cfg, ocfg)`: which entries of state["params"] train.
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
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semloss_jax.errors import ConfigError, TrainError
from semloss_jax.models import lora as lora_lib

TRAINABLE = ("all", "last_k", "lora", "none")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine decay, clipping, gradient accumulation and the trainable set
    (see the module docstring)."""

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
        """Check every field (ConfigError keyed under `where`, LoRA fields included); returns self."""
        def num(name, lo=None, lo_strict=False, hi=None, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"expected a finite number, got {v!r}", key=f"{where}.{name}")
            if lo is not None and (v <= lo if lo_strict else v < lo):
                raise ConfigError(f"must be {'>' if lo_strict else '>='} {lo}, got {v}",
                                  key=f"{where}.{name}")
            if hi is not None and v > hi:
                raise ConfigError(f"must be <= {hi}, got {v}", key=f"{where}.{name}")

        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ConfigError(f"expected an integer, got {v!r}", key=f"{where}.{name}")
            if v < lo:
                raise ConfigError(f"must be >= {lo}, got {v}", key=f"{where}.{name}")

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
            raise ConfigError(f"{self.trainable!r} is not one of {TRAINABLE}", key=f"{where}.trainable")
        if self.trainable == "last_k" and self.last_k < 1:
            raise ConfigError(f"must be >= 1 with trainable='last_k', got {self.last_k}",
                              key=f"{where}.last_k")
        if self.trainable == "lora":
            lora_lib.lora_targets(self)
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
        raise ConfigError(f"must be in [1, num_hidden_layers={L}], got {ocfg.last_k}", key="optim.last_k")
    layer_on = np.arange(L) >= L - ocfg.last_k

    def leaf(path, x):
        top = _path_names(path)[0]
        if top == "layers":
            if x.shape[0] != L:
                raise TrainError(f"params leaf {'/'.join(_path_names(path))} has leading dim {x.shape[0]}, "
                                 f"expected num_hidden_layers={L}")
            return layer_on.reshape((L,) + (1,) * (len(x.shape) - 1))
        return top == "final_norm"

    return jax.tree_util.tree_map_with_path(leaf, params)


def _is_all(m) -> bool:
    return isinstance(m, (bool, np.bool_)) and bool(m)


def _is_none(m) -> bool:
    return isinstance(m, (bool, np.bool_)) and not bool(m)


def mask_grads(grads, mask):
    """Gradients with the frozen entries zeroed (before clipping: the norm counts trainable ones)."""
    def f(g, m):
        if _is_all(m):
            return g
        if _is_none(m):
            return jnp.zeros_like(g)
        return jnp.where(m, g, jnp.zeros_like(g))
    return jax.tree_util.tree_map(f, grads, mask)


def stop_frozen(params, mask):
    """Fully frozen leaves enter the loss through stop_gradient (no wasted cotangents)."""
    return jax.tree_util.tree_map(lambda p, m: jax.lax.stop_gradient(p) if _is_none(m) else p, params, mask)


def apply_updates(params, updates, mask):
    """The new params: p + update where the mask is on; frozen entries are copied bit for bit."""
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
            raise TrainError("trainable='lora' needs the base params in state['frozen']")
        return lora_lib.merge_lora(frozen, trainable, ocfg)
    return trainable


def export_params(state: Mapping, ocfg: OptimConfig):
    """Model params for export / evaluation (LoRA merged into the base)."""
    return full_params(state["params"], state["frozen"], ocfg)
