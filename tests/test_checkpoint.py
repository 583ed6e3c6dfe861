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


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: verification, fallback to the newest good one, setting aside


def _three_steps(d: Path) -> CK.Checkpointer:
    ck = CK.Checkpointer(d, every=1, keep_last=5, async_save=False)
    for s in (1, 2, 3):
        ck.save(s, _state(s, n=64), {"n": s})
    ck.close()
    return CK.Checkpointer(d, every=1, keep_last=5, async_save=False)


def _largest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0x01
    path.write_bytes(bytes(b))


DAMAGES = {
    "truncated array file": lambda d: _largest_data_file(d).write_bytes(b"\0" * 10),
    "changed array byte": lambda d: _flip_byte(_largest_data_file(d)),
    "bad meta json": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "missing meta": lambda d: (d / "meta" / "metadata").unlink(),
    "meta of another step": lambda d: (d / "meta" / "metadata").write_text('{"step": 2}'),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_restore_newest_skips_a_damaged_latest_checkpoint(tmp_path, damage):
    d = tmp_path / "ck"
    _three_steps(d).close()
    DAMAGES[damage](d / "3")
    ck = CK.Checkpointer(d, every=1, keep_last=5)
    with pytest.raises(Exception) as ei:  # noqa: PT011 - which type depends on the damage
        ck.restore(_state(0, n=64), step=3)
    assert isinstance(ei.value, CK.DAMAGE) or type(ei.value) is Exception, repr(ei.value)
    if damage == "changed array byte":  # Orbax reads it without complaint: only the checksum sees it
        assert isinstance(ei.value, CheckpointError) and "checksum" in str(ei.value)
    got = ck.restore_newest(_state(0, n=64))
    assert got.step == 2 and [s for s, _ in got.skipped] == [3] and got.meta["n"] == 2
    _assert_tree_equal(got.state, CK.saved_part(_state(2, n=64)))
    assert "\n" not in got.skipped[0][1] and len(got.skipped[0][1]) < 300
    moved = ck.set_aside([3])
    assert moved == [d.parent / "damaged_checkpoints" / "3"] and moved[0].is_dir()
    assert ck.all_steps() == [1, 2]
    ck.save(3, _state(3, n=64), {"n": 3})  # the step can be saved again
    ck.wait()
    restored, meta = ck.restore(_state(0, n=64))
    assert meta["n"] == 3
    _assert_tree_equal(restored, CK.saved_part(_state(3, n=64)))
    ck.close()


def test_checksum_sees_every_bit_and_the_structure():
    st = CK.saved_part(_state(1))
    c = CK.tree_checksum(st)
    assert c == CK.tree_checksum(CK.saved_part(_state(1))) and len(c) == 16
    w = np.asarray(st["params"]["w"]).copy()
    for idx in [(0, 0), (7, 3), (15, 15)]:
        for bit in (0, 17, 31):
            flipped = w.view(np.uint32).copy()
            flipped[idx] ^= np.uint32(1 << bit)
            other = dict(st, params=dict(st["params"], w=jnp.asarray(flipped.view(np.float32))))
            assert CK.tree_checksum(other) != c, (idx, bit)
    swapped = w.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    assert CK.tree_checksum(dict(st, params=dict(st["params"], w=jnp.asarray(swapped)))) != c
    bf = {"x": jnp.arange(6, dtype=jnp.bfloat16), "k": jnp.ones((2, 3), bool)}
    assert CK.tree_checksum(bf) != CK.tree_checksum({"x": bf["x"], "k": ~bf["k"]})


def test_no_checkpoint_restores_is_one_clear_error(tmp_path):
    d = tmp_path / "ck"
    _three_steps(d).close()
    for s in (1, 2, 3):
        (d / str(s) / "meta" / "metadata").write_text("[")
    ck = CK.Checkpointer(d, every=1, keep_last=5)
    with pytest.raises(CheckpointError, match="no checkpoint in .* restores: 3: .*; 2: .*; 1: ") as ei:
        ck.restore_newest(_state(0, n=64))
    assert "\n" not in str(ei.value)
    assert ck.all_steps() == [1, 2, 3]  # nothing is moved when nothing restores
    ck.close()
    assert CK.Checkpointer(tmp_path / "empty", every=1, keep_last=1).restore_newest(_state(0)) is None


def test_a_failed_asynchronous_save_is_reported_by_poll(tmp_path, monkeypatch):
    """A save that fails in Orbax's background thread (a full disk) is one CheckpointError naming
    its step, raised at the next poll; closing afterwards does not raise it again."""
    ck = CK.Checkpointer(tmp_path / "ck", every=1, keep_last=3, async_save=True)
    ck.save(1, _state(1), {})
    ck.wait()

    def full_disk():
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": Failed to write 8 bytes: "
                         "No space left on device [os_error_code='28']\n(more lines)")

    ck.save(2, _state(2), {})
    ck.manager.wait_until_finished()
    monkeypatch.setattr(ck.manager, "wait_until_finished", full_disk)
    with pytest.raises(CheckpointError) as ei:
        ck.poll()
    assert str(ei.value) == f"saving checkpoint 2 in {tmp_path / 'ck'} failed: no space left on device"
    ck.poll()  # reported once
    monkeypatch.undo()
    ck.close()
