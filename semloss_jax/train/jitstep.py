"""The train step of a config, jitted with its shardings: what the loop runs and what
bench/memory_plan.py compiles ahead of time on fake devices.

    parts = batch_parts(cfg, has_harmful=True)                  # {"benign": rows, "harmful": rows}
    shapes = batch_shapes(cfg, model_cfg, parts)                # global [grad_accum, rows, seq_len]
    js = jit_train_step(cfg, model_cfg, plan, mesh, shapes)
    js.fn.lower(*abstract_inputs(js, plan, model_cfg)).compile()

The step is traced inside the activation rules of `semloss_jax.train.sharding` (the model's
activation names become sharding constraints), the benign and harmful rows are concatenated
shard-aligned for the data x fsdp row blocks of the mesh, the state is donated, and the
activation-rule fallbacks met while tracing are collected in `fallbacks` (or stop the trace
with mesh.strict).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.loss.objective import CHOSEN
from semloss_jax.train import sharding
from semloss_jax.train import step as step_lib

BATCH_FIELDS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")
FIELD_DTYPES = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32,
                "positions": np.int32, "segment_ids": np.int32, "target_mu": np.float32,
                "ref_logp": np.float32}


class JittedStep(NamedTuple):
    """The jitted step, the shardings of each batch part and the activation fallbacks met."""

    fn: Callable
    shapes: dict[str, dict[str, jax.ShapeDtypeStruct]]
    batch_shardings: dict[str, dict[str, Any]]
    E_sharding: Any
    fallbacks: list


def batch_parts(cfg, has_harmful: bool) -> dict[str, int]:
    """Rows per micro-batch of each part of a step: benign, and harmful when the run has it."""
    parts = {"benign": cfg.data.benign_batch}
    if has_harmful:
        parts["harmful"] = cfg.data.harmful_batch
    return parts


def batch_shapes(cfg, model_cfg, parts: dict[str, int]) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """Global shapes and dtypes of every field: [grad_accum, rows, seq_len] (target_mu with the
    model width, for soft targets). For dpo the harmful part also carries ref_logp and the chosen
    rows (every field again, prefixed objective.CHOSEN)."""
    A, T = cfg.optim.grad_accum, cfg.data.seq_len
    out = {}
    for name, rows in parts.items():
        fields = {k: jax.ShapeDtypeStruct((A, rows, T), FIELD_DTYPES[k]) for k in BATCH_FIELDS}
        if name == "harmful" and cfg.objective.target == "soft":
            fields["target_mu"] = jax.ShapeDtypeStruct((A, rows, T, model_cfg.hidden_size), np.float32)
        if name == "harmful" and cfg.objective.kind == "dpo":  # rejected + reference, chosen + reference
            fields["ref_logp"] = jax.ShapeDtypeStruct((A, rows, T), FIELD_DTYPES["ref_logp"])
            fields.update({CHOSEN + k: v for k, v in fields.items()})
        out[name] = fields
    return out


def jit_train_step(cfg, model_cfg, plan, mesh, shapes: dict[str, dict[str, jax.ShapeDtypeStruct]],
                   on_trace: Callable[[], None] | None = None, activation_rules: bool = True,
                   basis=None) -> JittedStep:
    """step(state, benign, harmful, E_hat) -> (state, metrics), jitted once with the plan's state
    shardings, batch shardings over data x fsdp, and the activation rules in force while traced.
    on_trace is called every time the step is traced (compile counting). activation_rules=False
    (ablations of the memory plan) leaves activations to XLA and concatenates benign and harmful
    rows without regard to the shards. basis: the Gelbrich divergence's basis, a constant of the
    step (step.make_train_step)."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"] if activation_rules else 1
    raw = step_lib.make_train_step(model_cfg, cfg.objective, cfg.optim, plan.optimizer, basis,
                                   batch_shards=batch_shards)
    fallbacks: list[str] = []
    resolve = sharding.activation_resolver(mesh, fallbacks=fallbacks, strict=cfg.mesh.strict)
    traced = sharding.traced_with_activation_rules(raw, resolve) if activation_rules else raw

    def step(state, benign, harmful, E_hat):
        if on_trace is not None:
            on_trace()
        return traced(state, benign, harmful, E_hat)

    shardings = {name: sharding.batch_shardings(mesh, fields, leading=1) for name, fields in shapes.items()}
    E_sh = plan.param_shardings["embed"]["embedding"]
    fn = jax.jit(step, in_shardings=(plan.state_shardings, shardings["benign"], shardings.get("harmful"),
                                     E_sh),
                 out_shardings=(plan.state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return JittedStep(fn, shapes, shardings, E_sh, fallbacks)


def abstract_inputs(js: JittedStep, plan, model_cfg) -> tuple:
    """(state, benign, harmful, E_hat) as ShapeDtypeStructs carrying their shardings (for .lower)."""
    def sds(a, sh):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)

    state = jax.tree_util.tree_map(sds, plan.abstract_state, plan.state_shardings)
    parts = {name: {k: sds(v, js.batch_shardings[name][k]) for k, v in fields.items()}
             for name, fields in js.shapes.items()}
    E_hat = jax.ShapeDtypeStruct((model_cfg.vocab_size, model_cfg.hidden_size), jnp.float32,
                                 sharding=js.E_sharding)
    return state, parts["benign"], parts.get("harmful"), E_hat
