"""Orbax checkpoints: exact round trip, keep-last-K, and no half-written checkpoint as latest."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semloss_jax.errors import CheckpointError
from semloss_jax.train import checkpoint as CK

REPO = Path(__file__).resolve().parent.parent


def _state(seed: int = 0, n: int = 16):
    k = jax.random.PRNGKey(seed)
    params = {"w": jax.random.normal(k, (n, n)), "b": jnp.arange(n, dtype=jnp.float32)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    ost = opt.init(params)
    for i in range(2):  # non-trivial moments and count
        g = jax.tree_util.tree_map(lambda p, i=i: p * (i + 1), params)
        upd, ost = opt.update(g, ost, params)
        params = optax.apply_updates(params, upd)
    return {"params": params, "frozen": None, "opt_state": ost, "step": jnp.int32(2),
            "rng": jax.random.PRNGKey(seed + 7)}


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_exact_and_keep_last(tmp_path):
    ck = CK.Checkpointer(tmp_path / "ck", every=1, keep_last=2)
    states = {s: _state(s) for s in (1, 2, 3)}
    for s, st in states.items():
        ck.save(s, st, {"data": {"benign": {"epoch": 0, "index": 4 * s, "examples": 16}}})
    ck.wait()
    assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    template = _state(99)  # different values, same structure
    restored, meta = ck.restore(template)
    _assert_tree_equal(restored, CK.saved_part(states[3]))
    # optax state node types survive (ScaleByAdamState etc.), not plain tuples
    assert type(restored["opt_state"][1][0]) is type(states[3]["opt_state"][1][0])
    assert meta["step"] == 3 and meta["data"]["benign"]["index"] == 12
    restored2, meta2 = ck.restore(template, step=2)
    _assert_tree_equal(restored2, CK.saved_part(states[2]))
    ck.close()


def test_frozen_part_is_not_saved(tmp_path):
    st = dict(_state(0), frozen={"base": jnp.ones((1000, 100))})
    ck = CK.Checkpointer(tmp_path / "ck", every=1, keep_last=1, async_save=False)
    ck.save(1, st, {})
    size = sum(f.stat().st_size for f in (tmp_path / "ck").rglob("*") if f.is_file())
    assert size < 1000 * 100 * 4 / 2  # the 400 kB frozen array is not in it
    restored, _ = ck.restore(st)
    assert set(restored) == set(CK.SAVED_KEYS)
    ck.close()


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    ck = CK.Checkpointer(tmp_path / "ck", every=1, keep_last=1)
    with pytest.raises(CheckpointError, match="no finalized checkpoint"):
        ck.restore(_state(0))
    ck.close()


def test_tmp_directory_is_never_latest(tmp_path):
    d = tmp_path / "ck"
    ck = CK.Checkpointer(d, every=1, keep_last=3, async_save=False)
    ck.save(1, _state(1), {})
    ck.close()
    # what a save killed mid-way leaves behind: Orbax's temporary directory for step 2
    tmp = d / "2.orbax-checkpoint-tmp-1234567890"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\0" * 100)
    ck2 = CK.Checkpointer(d, every=1, keep_last=3)
    assert ck2.latest_step() == 1 and ck2.all_steps() == [1]
    restored, _ = ck2.restore(_state(5))
    _assert_tree_equal(restored, CK.saved_part(_state(1)))
    ck2.close()


KILL_SCRIPT = r"""
import os, signal, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "tests")
from semloss_jax.train import checkpoint as CK
from test_checkpoint import _state
d = sys.argv[1]
ck = CK.Checkpointer(d, every=1, keep_last=3, async_save=True)
ck.save(1, _state(1), {"n": 1})
ck.wait()
big = dict(_state(2), params={"w": jnp.ones((8192, 8192))})  # 256 MiB: the async write takes a while
ck.save(2, big, {"n": 2})
os.kill(os.getpid(), signal.SIGKILL)  # die while step 2 is being written
"""


def test_sigkill_during_async_save_keeps_previous_latest(tmp_path):
    d = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(d)], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # the kill did land mid-save: step 2 exists only as Orbax's temporary directory
    names = sorted(p.name for p in d.iterdir())
    assert "1" in names and "2" not in names, names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names
    ck = CK.Checkpointer(d, every=1, keep_last=3)
    assert ck.latest_step() == 1, sorted(p.name for p in d.iterdir())
    restored, meta = ck.restore(_state(0))
    _assert_tree_equal(restored, CK.saved_part(_state(1)))
    assert meta["n"] == 1
    ck.close()
