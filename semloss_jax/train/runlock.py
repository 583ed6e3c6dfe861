"""One training run per output directory: an exclusive lock held for the whole run.

    with RunLock(output_dir, process_index=jax.process_index()) as lock:
        ...                       # lock.took_over: the stale holder's description, or None

The lock is `output_dir/train.lock` (process 0; process i of a multi-process run locks
`train.lock.<i>`: every process holds a lock of its own, so on a shared file system each
process of a second run fails at once instead of some of them waiting at a collective, and on
host-local disks each host still guards its own directory). It is an OS file lock
(`fcntl.flock`) on a file that records the holder (pid, host, start time):

- a second run on the same directory raises TrainError at once, naming the holder's pid;
- the OS drops the lock when its process dies (SIGKILL, crash, power loss of a local disk), so a
  lock file left behind by a dead process is stale: the next run takes it over and says whose it
  was;
- a clean exit removes the file.

On a file system without `flock` (some network or FUSE mounts) the lock falls back to the
recorded pid: held while a process with that pid runs on the same host.

A remote run directory (gs://, s3://, az://) cannot be locked: an object store has no file locks.
The lock then degrades, with a warning that says so, to a local file named by the URL's hash
(`<cache>/run_locks/<sha256 of the URL>.lock`, `local_dir` to choose the folder): a second run on
the same URL from the same host still fails at once, a run from another host is not detected.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from semloss_jax import paths as paths_lib
from semloss_jax.errors import TrainError

log = logging.getLogger(__name__)


def lock_path(directory: Path, process_index: int = 0) -> Path:
    """The lock file of one process of a run in `directory`."""
    return Path(directory) / ("train.lock" if process_index == 0 else f"train.lock.{process_index}")


def remote_lock_path(url: str, process_index: int = 0, local_dir: Path | None = None) -> Path:
    """The local lock file standing in for a remote run directory's (see the module docstring):
    named by the SHA-256 of the URL without trailing slashes, under local_dir (default
    <cache>/run_locks)."""
    folder = Path(local_dir) if local_dir is not None else paths_lib.cache_dir() / "run_locks"
    digest = hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:32]
    return folder / (f"{digest}.lock" if process_index == 0 else f"{digest}.lock.{process_index}")


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    return (f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started "
            f"{h.get('started', '?')}") if h else "an unknown process"


def _pid_alive(h: dict) -> bool:
    """Whether the recorded holder still runs (knowable on its own host only: a holder on
    another host is taken to be alive)."""
    if h.get("host") != socket.gethostname():
        return True
    if not isinstance(h.get("pid"), int):
        return False
    try:
        os.kill(h["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The exclusive lock of a run directory (see the module docstring); a context manager."""

    def __init__(self, directory: str | Path, process_index: int = 0, local_dir: Path | None = None):
        self.remote = str(directory).rstrip("/") if paths_lib.is_remote(directory) else None
        if self.remote is not None:
            self.path = remote_lock_path(self.remote, process_index, local_dir)
            self.directory = self.remote
        else:
            self.path = lock_path(Path(directory).absolute(), process_index)
            self.directory = str(self.path.parent)
        self.fd: int | None = None
        self.took_over: str | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise TrainError naming the holder; a stale lock is taken over."""
        if self.remote is not None:
            log.warning("run.output_dir %s is remote and an object store has no file locks: locking %s "
                        "on this host instead (a second run on this host fails; a run on another host "
                        "is not detected)", self.remote, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            if held is not None:
                os.close(fd)
                raise TrainError(f"{self.directory} is in use by another run ({_describe(held)}; "
                                 f"lock {self.path}): wait for it to end, or choose another "
                                 f"run.output_dir")
            try:  # the file may have been removed (a clean exit) between open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        old = _read_holder(self.path)
        if old:
            self.took_over = _describe(old)
            log.warning("took over the stale lock %s of %s (no longer running)", self.path,
                        self.took_over)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "directory": self.directory}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return self

    def _flock(self, fd: int) -> dict | None:
        """None when this process now holds the lock, else the holder's record."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return _read_holder(self.path)
        except OSError as e:  # no flock on this file system: judge by the recorded pid
            log.warning("%s: no file locks here (%s); using the recorded pid", self.path, e.strerror)
            h = _read_holder(self.path)
            return h if (h and h.get("pid") != os.getpid() and _pid_alive(h)) else None

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
