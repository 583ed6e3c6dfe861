"""Orbax checkpoints of the train state: save, verify, and resume from the newest good one.

A checkpoint at step s (directory `checkpoints/<s>/`) holds
- "state": the trainable params, the optimizer state, the step counter and the RNG key
  (an Orbax StandardSave pytree; restored directly into the target shardings);
- "meta":  JSON with the step, the data position of every stream ({"benign": {"epoch", "index"},
  ...}), a fingerprint of the config and a checksum of the saved arrays (`tree_checksum`), so
  `--resume` continues exactly where it stopped, from arrays known to be the ones saved.

The frozen part of the state (the base weights under LoRA / last-K training) is NOT saved: it is
rebuilt from the model source (pretrained weights or the seeded random init), which is what
the run started from. Saving it every N steps would only cost disk and time.

Atomicity: Orbax writes a step into a temporary directory (`<s>.orbax-checkpoint-tmp-*`) and
renames it to `<s>` only once every file is written (commit_success.txt is written on file
systems without atomic rename); `latest_step()` only ever sees finalized steps, so a process
killed mid-save leaves the previous checkpoint as the latest. tests/test_checkpoint.py checks it.

Damage: a finalized checkpoint can still be damaged afterwards (a truncated or edited file, a
lost meta). Orbax notices a truncated file or a broken index (its b-tree nodes carry CRC-32C
checksums) but not a changed byte inside an array chunk (zstd frames without a checksum), which
`tree_checksum` catches. `restore_newest` tries the checkpoints newest first and returns the
first that restores and verifies, with the ones it skipped and why; `set_aside` moves those
out of the way (into `damaged_checkpoints/` beside `checkpoints/`) so the run can save those
steps again.

Saving: with asynchronous saves a failure (a full disk) happens in Orbax's background thread;
`poll()` (called after every step) and the next `save()` turn it into one CheckpointError that
names the step whose save failed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from semloss_jax.errors import CheckpointError
from semloss_jax.paths import run_dir
from semloss_jax.train.sharding import to_host

log = logging.getLogger(__name__)

SAVED_KEYS = ("params", "opt_state", "step", "rng")
# What Orbax / TensorStore / json raise on a damaged checkpoint (measured: a truncated or
# edited state file -> ValueError (DATA_LOSS / OUT_OF_RANGE), bad meta JSON -> JSONDecodeError,
# a deleted meta file -> FileNotFoundError, a lost meta item or edited _METADATA -> KeyError).
DAMAGE = (ValueError, OSError, KeyError, TypeError, CheckpointError)
# ORBAX_READ_ERROR: an array chunk that cannot be read (a truncated data file) reaches us as a
# bare `Exception("Encountered error while reading array index ...")` raised by Orbax's
# serialization; restore_newest treats exactly that type (not its subclasses) as damage too.


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


# ---------------------------------------------------------------------------------------------
# Checksums of the saved arrays


def _words(x: jax.Array) -> jax.Array:
    """The bits of x as uint32 words, same shape (64-bit types: one more axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
                                        ).astype(jnp.uint32)


@jax.jit
def _leaf_sums(leaves: list) -> jax.Array:
    """[n_leaves, 2] uint32: the sum of each leaf's words and their sum weighted by position
    (wrapping integer sums: exact and independent of the reduction order and the sharding)."""
    rows = []
    for x in leaves:
        w = _words(x)
        pos = jnp.ones(w.shape, jnp.uint32)
        stride = 1
        for d in reversed(range(w.ndim)):  # 1 + the flat index, without flattening the shards
            pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
            stride *= w.shape[d]
        rows.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * pos, dtype=jnp.uint32)]))
    return jnp.stack(rows) if rows else jnp.zeros((0, 2), jnp.uint32)


def tree_checksum(tree) -> str:
    """16 hex digits that change with any bit of any array of tree (and with its structure).
    Call it on every process (the reduction is collective)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    sums = np.asarray(to_host(_leaf_sums([jnp.asarray(x) for x in leaves])), np.uint32)
    h = hashlib.sha256(str(treedef).encode())
    for x in leaves:
        h.update(f"{jnp.dtype(x.dtype).name}{tuple(np.shape(x))}".encode())
    h.update(sums.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Multi-process agreement


def all_processes_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return bool(ok)
    return bool(np.min(multihost_utils.process_allgather(np.int32(bool(ok)))))


def _reason(e: BaseException) -> str:
    """A short, one-line reason for a failed save or restore."""
    if type(e) is Exception and e.__cause__ is not None:  # ORBAX_READ_ERROR: its cause says why
        e = e.__cause__
    text = str(e)
    if (isinstance(e, OSError) and e.errno == 28) or "os_error_code='28'" in text \
            or "No space left on device" in text:
        return "no space left on device"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:200] if isinstance(e, CheckpointError) else f"{type(e).__name__}: {first[:200]}"


@contextlib.contextmanager
def _quiet_unraisable():
    """Orbax leaves failed read coroutines behind that Python reports as 'Exception ignored'
    (dozens of lines per damaged checkpoint): log them at debug level while a restore is tried."""
    old = sys.unraisablehook

    def hook(u):
        log.debug("ignored during restore: %s", u.exc_value)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = old


class Restored(NamedTuple):
    """What restore_newest found: the step used, its arrays and meta, and the damaged newer
    checkpoints it skipped as (step, reason)."""

    step: int
    state: dict
    meta: dict
    skipped: list[tuple[int, str]]


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager: save every N steps, keep the last K, verify."""

    def __init__(self, directory: str | Path, *, every: int, keep_last: int,
                 async_save: bool = True):
        self.directory = run_dir(directory)
        self.every = int(every)
        self.pending: int | None = None  # the step of an asynchronous save not yet confirmed
        self.failed = False              # a save failed (and was reported)
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
        """Start saving `state` (the saved part), `meta` and the arrays' checksum at `step`
        (asynchronously); CheckpointError when this save or the previous one fails."""
        if step in self.manager.all_steps():
            return False
        self.wait()
        part = saved_part(state)
        meta = dict(meta, step=int(step), checksum=tree_checksum(part))
        json.dumps(meta)  # fail now, not in the background thread
        try:
            started = self.manager.save(
                int(step), force=force,
                args=ocp.args.Composite(state=ocp.args.StandardSave(part),
                                        meta=ocp.args.JsonSave(meta)))
        except (ValueError, OSError) as e:
            self.failed = True
            raise CheckpointError(f"saving checkpoint {step} in {self.directory} failed: "
                                  f"{_reason(e)}") from e
        self.pending = int(step)
        return started

    def wait(self) -> None:
        """Block until the pending asynchronous save is written; CheckpointError if it failed."""
        step, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()
        except (ValueError, OSError) as e:
            self.failed = True
            raise CheckpointError(f"saving checkpoint {step} in {self.directory} failed: "
                                  f"{_reason(e)}") from e

    def poll(self) -> None:
        """Raise the failure of a finished asynchronous save now (CheckpointError); never blocks."""
        if self.pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    # -- restoring -------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest finalized checkpoint step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every finalized checkpoint step."""
        return list(self.manager.all_steps())

    def restore(self, state_template: Mapping[str, Any], shardings: Mapping[str, Any] | None = None,
                step: int | None = None) -> tuple[dict, dict]:
        """(saved part of the state, meta) of `step` (default: latest), placed per `shardings`
        and verified: the meta's step and checksum must match the arrays (CheckpointError)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no finalized checkpoint to resume from")
        target = saved_part(state_template)
        sh = None if shardings is None else {k: shardings[k] for k in SAVED_KEYS}
        out = self.manager.restore(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_of(target, sh)),
                                               meta=ocp.args.JsonRestore()))
        # keep the exact pytree node types of the template (optax namedtuples)
        restored = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target),
                                                jax.tree_util.tree_leaves(out["state"]))
        meta = _checked_meta(out["meta"], step)
        if "checksum" in meta and tree_checksum(restored) != meta["checksum"]:
            raise CheckpointError(f"checkpoint {step}: the arrays do not match their checksum "
                                  f"(a file was changed after saving)")
        return restored, meta

    def restore_newest(self, state_template: Mapping[str, Any],
                       shardings: Mapping[str, Any] | None = None,
                       verify: Callable[[int, dict, dict], None] | None = None) -> Restored | None:
        """The newest checkpoint that restores and verifies on every process (None: there is
        no checkpoint); CheckpointError naming each one when none does. verify(step, state,
        meta) may add checks of its own (raising CheckpointError)."""
        skipped: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            got, reason = None, "failed on another process"
            with _quiet_unraisable():
                try:
                    got = self.restore(state_template, shardings, step)
                    if verify is not None:
                        verify(step, *got)
                except DAMAGE as e:
                    reason = _reason(e)
                except Exception as e:  # noqa: BLE001 - only the bare Exception, see ORBAX_READ_ERROR
                    if type(e) is not Exception:
                        raise
                    reason = _reason(e)
            if all_processes_ok(got is not None):
                return Restored(step, got[0], got[1], skipped)
            skipped.append((step, reason))
        if skipped:
            raise CheckpointError(f"no checkpoint in {self.directory} restores: " + "; ".join(
                f"{s}: {r}" for s, r in skipped) + " (if the config changed, start a new "
                "run.output_dir; if the files are damaged, move them away to start over)")
        return None

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON meta of `step` (default: latest) without touching the arrays; None if none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return _checked_meta(out["meta"], step)

    def newest_meta(self) -> tuple[int | None, dict | None, list[tuple[int, str]]]:
        """(step, meta) of the newest checkpoint whose meta reads, and the newer ones skipped."""
        skipped = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, self.read_meta(step), skipped
            except DAMAGE as e:
                skipped.append((step, _reason(e)))
        return None, None, skipped

    def set_aside(self, steps) -> list[Path]:
        """Move damaged checkpoints to damaged_checkpoints/ beside this directory (process 0;
        the others wait), so that their steps can be saved again; returns the new paths."""
        dest_dir = self.directory.parent / "damaged_checkpoints"
        moved = []
        for step in steps:
            dest = dest_dir / str(step)
            n = 1
            while dest.exists():
                dest, n = dest_dir / f"{step}.{n}", n + 1
            if jax.process_index() == 0:
                dest_dir.mkdir(parents=True, exist_ok=True)
                os.replace(self.directory / str(step), dest)
            moved.append(dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("semloss_set_aside")
        self.manager.reload()
        return moved

    def close(self) -> None:
        """Finish any pending save and release the checkpoint manager (CheckpointError when the
        pending save failed; a failure already reported is not raised again)."""
        try:
            if not self.failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except (ValueError, OSError) as e:  # the failed save, re-raised by Orbax's close
                if not self.failed:
                    raise CheckpointError(f"closing {self.directory}: {_reason(e)}") from e
                log.debug("after a failed save: %s", e)


def _checked_meta(meta, step: int) -> dict:
    """The meta as a dict whose "step" is `step` (CheckpointError otherwise)."""
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"checkpoint {step}: meta is {type(meta).__name__}, not a mapping")
    if meta.get("step") != step:
        raise CheckpointError(f"checkpoint {step}: meta says step {meta.get('step')!r}")
    return dict(meta)
