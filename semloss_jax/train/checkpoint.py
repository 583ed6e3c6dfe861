"""Orbax checkpoints of the train state.

A checkpoint at step s (directory `checkpoints/<s>/`) holds
- "state": the trainable params, the optimizer state, the step counter and the RNG key
  (an Orbax StandardSave pytree; restored directly into the target shardings);
- "meta":  JSON with the step, the data position of every stream ({"benign": {"epoch", "index"},
  ...}) and a fingerprint of the config, so `--resume` continues exactly where it stopped.

The frozen part of the state (the base weights under LoRA / last-K training) is NOT saved: it is
rebuilt from the model source (pretrained weights or the seeded random init), which is what
the run started from. Saving it every N steps would only cost disk and time.

Atomicity: Orbax writes a step into a temporary directory (`<s>.orbax-checkpoint-tmp-*`) and
renames it to `<s>` only once every file is written (commit_success.txt is written on file
systems without atomic rename); `latest_step()` only ever sees finalized steps, so a process
killed mid-save leaves the previous checkpoint as the latest. tests/test_checkpoint.py checks it.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from semloss_jax.errors import CheckpointError

log = logging.getLogger(__name__)

SAVED_KEYS = ("params", "opt_state", "step", "rng")


def saved_part(state: Mapping[str, Any]) -> dict:
    """The part of the train state that is checkpointed (everything but "frozen")."""
    missing = [k for k in SAVED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"train state lacks {missing} (keys: {sorted(state)})")
    return {k: state[k] for k in SAVED_KEYS}


def abstract_of(tree, shardings=None):
    """ShapeDtypeStructs (with target shardings when given) to restore into."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def config_fingerprint(cfg_yaml: str) -> str:
    """A short sha256 (16 hex digits) of a resolved config's YAML, kept in each checkpoint's meta."""
    return hashlib.sha256(cfg_yaml.encode("utf-8")).hexdigest()[:16]


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager: save every N steps, keep the last K."""

    def __init__(self, directory: str | Path, *, every: int, keep_last: int,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = int(every)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=int(keep_last), create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=bool(async_save)))

    # -- saving ----------------------------------------------------------------------------
    def should_save(self, step: int, last_step: int) -> bool:
        """Whether step is saved: the last step always, otherwise every `every` steps (0: never)."""
        return step == last_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any],
             force: bool = False) -> bool:
        """Start saving `state` (the saved part) and `meta` at `step` (asynchronously)."""
        if step in self.manager.all_steps():
            return False
        meta = dict(meta, step=int(step))
        json.dumps(meta)  # fail now, not in the background thread
        return self.manager.save(
            int(step), force=force,
            args=ocp.args.Composite(state=ocp.args.StandardSave(saved_part(state)),
                                    meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        """Block until the pending asynchronous save is written."""
        self.manager.wait_until_finished()

    # -- restoring -------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest finalized checkpoint step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every finalized checkpoint step."""
        return list(self.manager.all_steps())

    def restore(self, state_template: Mapping[str, Any], shardings: Mapping[str, Any] | None = None,
                step: int | None = None) -> tuple[dict, dict]:
        """(saved part of the state, meta) of `step` (default: latest), placed per `shardings`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no finalized checkpoint to resume from")
        target = saved_part(state_template)
        sh = None if shardings is None else {k: shardings[k] for k in SAVED_KEYS}
        abstract = abstract_of(target, sh)
        out = self.manager.restore(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               meta=ocp.args.JsonRestore()))
        restored = out["state"]
        # keep the exact pytree node types of the template (optax namedtuples)
        restored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target),
                                                jax.tree_util.tree_leaves(restored))
        return restored, dict(out["meta"])

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON meta of `step` (default: latest) without touching the arrays; None if none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self) -> None:
        """Finish any pending save and release the checkpoint manager."""
        self.manager.wait_until_finished()
        self.manager.close()
