"""The pure train step: micro-batch accumulation, masked AdamW update, metrics.

`init_train_state` / `make_train_step`: Batches carry a leading micro-batch
  axis [grad_accum, B, T]; the step scans over it (lax.scan), normalising every micro-batch
  by the GLOBAL token counts of the whole batch (objective.global_counts), so the summed
  gradient is exactly the gradient of one large batch.

state = {"params": trainable tree (full params, or LoRA params), "frozen": base params for
LoRA else None, "opt_state", "step": int32 scalar, "rng": a jax.random.PRNGKey (uint32[2])}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from semloss_jax.errors import TrainError
from semloss_jax.loss import objective as obj_lib
from semloss_jax.models import lora as lora_lib
from semloss_jax.train.optim import (
    OptimConfig,
    apply_updates,
    full_params,
    make_schedule,
    mask_grads,
    stop_frozen,
    trainable_mask,
)


def init_train_state(params, model_cfg, ocfg: OptimConfig, optimizer: optax.GradientTransformation,
                     key: jax.Array) -> dict:
    """The initial state = {"params", "frozen", "opt_state", "step": int32 0, "rng"} (see the module doc).

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


METRIC_KEYS = ("loss", "ce", "emd_lower", "emd_upper", "emd_onehot", "div", "harm_nll", "ul",
               "dpo", "dpo_acc", "grad_norm", "lr", "tokens", "ce_tokens", "harm_tokens")


def _leading(batch, name):
    n = {jnp.shape(v)[0] for k, v in batch.items() if v is not None and k != "target_mu"} | (
        {jnp.shape(batch["target_mu"])[0]} if batch.get("target_mu") is not None else set())
    if len(n) != 1 or any(jnp.ndim(v) < 3 for k, v in batch.items() if v is not None and k != "target_mu"):
        raise TrainError(f"{name} batch: every field needs a leading micro-batch axis [grad_accum, B, T]; "
                         f"got shapes { {k: jnp.shape(v) for k, v in batch.items() if v is not None} }")
    return n.pop()


def make_train_step(model_cfg, obj: obj_lib.ObjectiveConfig, ocfg: OptimConfig,
                    optimizer: optax.GradientTransformation, basis: jax.Array | None = None, *,
                    batch_shards: int = 1):
    """A pure step(state, benign_micro, harmful_micro, E_hat) -> (state, metrics).

    benign_micro / harmful_micro: batch dicts whose fields have a leading micro-batch axis
    [grad_accum, B, T] (harmful_micro may be None, e.g. for sft). E_hat [V, d]: frozen unit
    embeddings (cost.unit_embeddings of the INITIAL embedding matrix), passed explicitly.
    metrics: dict of float32 scalars with METRIC_KEYS (loss of the whole batch, token means of
    its parts, grad_norm before clipping, lr of this update, token counts).
    No sharding code here: jit it with in/out shardings and donate_argnums outside;
    batch_shards (the data x fsdp mesh size) only lays the benign and harmful rows out so that
    their concatenation keeps every row on its device (objective.loss_sums).
    basis: for objective.divergence=gelbrich, emd.principal_basis(E_hat, r) computed once
    (a small [r, d] constant of the step); None computes it inside every step (V x d² work).
    """
    obj.validate()
    ocfg.validate()
    schedule = make_schedule(ocfg)
    train = ocfg.trainable != "none"
    # last_k: the layers below the trainable ones run without a backward pass at all
    frozen_layers = model_cfg.num_hidden_layers - ocfg.last_k if ocfg.trainable == "last_k" else 0

    def loss_fn(trainable, frozen, b, h, E_hat, counts, mask):
        params = full_params(stop_frozen(trainable, mask), frozen, ocfg)
        sums = obj_lib.loss_sums(params, model_cfg, b, h, E_hat, obj, frozen_layers=frozen_layers,
                                 basis=basis, batch_shards=batch_shards)
        return obj_lib.combine(sums, counts, obj), sums

    def step(state, benign_micro, harmful_micro, E_hat):
        _check_micro(benign_micro, harmful_micro, obj, ocfg)
        params, frozen = state["params"], state["frozen"]
        mask = trainable_mask(params, model_cfg, ocfg)
        counts = obj_lib.global_counts(benign_micro, harmful_micro)
        E_hat = jax.lax.stop_gradient(E_hat) if E_hat is not None else None

        sum_keys = obj_lib.SUM_KEYS_BENIGN + (obj_lib.SUM_KEYS_HARMFUL if harmful_micro is not None else ())
        if obj_lib.chosen_part(harmful_micro) is not None:
            sum_keys += obj_lib.SUM_KEYS_PAIRS
        zero_sums = {k: jnp.zeros((), jnp.float32) for k in sum_keys}

        if train:
            def body(carry, xs):
                g_acc, s_acc = carry
                b, h = xs
                (_, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, b, h, E_hat,
                                                                         counts, mask)
                g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
                s_acc = jax.tree_util.tree_map(jnp.add, s_acc, sums)
                return (g_acc, s_acc), None

            g0 = jax.tree_util.tree_map(jnp.zeros_like, params)
            (grads, sums), _ = jax.lax.scan(body, (g0, zero_sums), (benign_micro, harmful_micro))
            grads = mask_grads(grads, mask)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state["opt_state"], params)
            new_params = apply_updates(params, updates, mask)
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


def _check_micro(benign_micro, harmful_micro, obj: obj_lib.ObjectiveConfig, ocfg: OptimConfig) -> None:
    """The micro-batch axes agree with each other and with optim.grad_accum (trace time)."""
    A = _leading(benign_micro, "benign")
    if harmful_micro is not None and _leading(harmful_micro, "harmful") != A:
        raise TrainError(f"benign and harmful batches have different micro-batch counts "
                         f"({A} vs {_leading(harmful_micro, 'harmful')})")
    if A != ocfg.grad_accum:
        raise TrainError(f"batches carry {A} micro-batches but optim.grad_accum = {ocfg.grad_accum}")
    if obj.uses_harmful and harmful_micro is None:
        raise TrainError(f"objective kind {obj.kind!r} with lam={obj.lam} needs a harmful batch")


def _real_tokens(batch) -> jax.Array:
    """Non-padding input tokens (segment_ids != 0; all tokens without segment_ids)."""
    if batch is None:
        return jnp.float32(0.0)
    if batch.get("segment_ids") is not None:
        return jnp.sum((jnp.asarray(batch["segment_ids"]) != 0).astype(jnp.float32))
    return jnp.float32(np.prod(jnp.shape(batch["input_ids"])))
