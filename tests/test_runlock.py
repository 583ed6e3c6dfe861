"""One run per output directory: the lock is exclusive, a second run fails at once naming the
holder's pid, a lock left by a killed process is taken over, a clean exit removes it, and a remote
(gs://) directory, which cannot be file-locked, is locked through a local file with a warning."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from semloss_jax.errors import TrainError
from semloss_jax.train.runlock import RunLock, lock_path, remote_lock_path

REPO = Path(__file__).resolve().parent.parent

HOLD = textwrap.dedent("""
    import sys, time
    from semloss_jax.train.runlock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _holder(d: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(TrainError) as ei:
            RunLock(tmp_path).acquire()
        msg = str(ei.value)
        assert f"pid {holder.pid}" in msg and "in use by another run" in msg and "\n" not in msg
        assert json.loads(lock_path(tmp_path).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock_path(tmp_path).exists()  # a killed process leaves its lock file behind
    with RunLock(tmp_path) as lock:
        assert lock.took_over is not None and f"pid {holder.pid}" in lock.took_over
        assert json.loads(lock_path(tmp_path).read_text())["pid"] == os.getpid()
    assert not lock_path(tmp_path).exists()  # a clean exit removes it
    with RunLock(tmp_path) as lock:
        assert lock.took_over is None


def test_each_process_of_a_multi_process_run_has_its_own_lock(tmp_path):
    with RunLock(tmp_path, 0), RunLock(tmp_path, 1) as one:
        assert one.path.name == "train.lock.1" and lock_path(tmp_path).exists()
        with pytest.raises(TrainError):
            RunLock(tmp_path, 1).acquire()


def test_second_train_py_on_the_same_directory_exits_at_once(tmp_path):
    holder = _holder(tmp_path)
    try:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "train.py", "--config", "configs/smoke.yaml",
                               f"run.output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        took = time.perf_counter() - t
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {holder.pid}" in lines[0], proc.stderr[-2000:]
    assert proc.stdout == ""  # nothing was set up (no data, no model, no config.yaml)
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
    print(f"second run refused in {took:.1f}s")


def test_remote_directory_is_locked_through_a_local_file_with_a_warning(tmp_path, caplog):
    url = "gs://bucket/runs/tasft"
    with caplog.at_level("WARNING", logger="semloss_jax.train.runlock"):
        with RunLock(url, local_dir=tmp_path) as lock:
            assert lock.path == remote_lock_path(url, 0, tmp_path) and lock.path.parent == tmp_path
            assert json.loads(lock.path.read_text())["directory"] == url
            with pytest.raises(TrainError) as ei:  # the same URL (a trailing slash is the same run)
                RunLock(url + "/", local_dir=tmp_path).acquire()
            msg = str(ei.value)
            assert url in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
            with RunLock("gs://bucket/runs/other", local_dir=tmp_path) as other:  # another URL: free
                assert other.path != lock.path
            with RunLock(url, 1, local_dir=tmp_path) as one:  # process 1 of the same run
                assert one.path.name.endswith(".lock.1")
    assert not lock.path.exists()  # a clean exit removes the local file
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(url in m and "no file locks" in m and "another host is not detected" in m for m in warned)


def test_remote_lock_defaults_to_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMLOSS_CACHE", str(tmp_path))
    path = RunLock("s3://b/run").path
    assert path.parent == tmp_path / "run_locks" and path == remote_lock_path("s3://b/run/")
