r"""Deterministic, seeded train/test splits by prompt hash; dedup; the no-leak guarantee.

A record's split is a pure function of its NORMALIZED prompt (Unicode NFKC, casefold, runs of
whitespace collapsed to one space, stripped), the seed and the test fraction:

    u = sha256(f"{seed}\x00{normalize(prompt)}") as a number in [0, 1)
    split = "test" if u < test_frac else "train"

so the same prompt (exactly or after normalizing) lands in the same split in every source.
Sources have one of three roles (`ROLES`):

    "split"       hashed as above (harmful prompts, benign instructions, judge data)
    "train_only"  "train", except a record whose normalized prompt is the prompt of any test
                  record of a "split" source: that one is "test" (kept out of training). Used for
                  data nobody evaluates on (SafeInstr refusals, PyRIT's harmful pairs).
    "eval"        "eval" (over-refusal prompts, I-Alpaca): never trained on.

Guarantee (tested): no prompt of a test split appears, exactly or normalized, in any train split.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from semloss_jax.data.schema import Record

ROLES = ("split", "train_only", "eval")
DEFAULT_SEED = 0
DEFAULT_TEST_FRAC = 0.2

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The prompt key for splits and dedup: NFKC, casefold, whitespace collapsed, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def unit_hash(text: str, seed: int = DEFAULT_SEED) -> float:
    """A uniform number in [0, 1) from the normalized text and the seed (stable across runs)."""
    h = hashlib.sha256(f"{seed}\x00{normalize(text)}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def hash_split(prompt: str, *, seed: int = DEFAULT_SEED,
               test_frac: float = DEFAULT_TEST_FRAC) -> str:
    """"test" if the prompt's unit_hash falls below test_frac, else "train"."""
    if not 0.0 <= test_frac <= 1.0:
        raise ValueError(f"test_frac must be in [0, 1], got {test_frac}")
    return "test" if unit_hash(prompt, seed) < test_frac else "train"


def assign_splits(by_source: Mapping[str, Sequence[Record]], roles: Mapping[str, str], *,
                  seed: int = DEFAULT_SEED, test_frac: float = DEFAULT_TEST_FRAC,
                  ) -> dict[str, list[Record]]:
    """Return the records of every source with `split` set according to the source's role."""
    for name in by_source:
        role = roles.get(name)
        if role not in ROLES:
            raise ValueError(f"source {name!r}: unknown split role {role!r}; expected one of "
                             f"{ROLES}")
    out: dict[str, list[Record]] = {}
    test_keys: set[str] = set()
    for name, recs in by_source.items():
        if roles[name] != "split":
            continue
        res = []
        for r in recs:
            s = hash_split(r.prompt, seed=seed, test_frac=test_frac)
            if s == "test":
                test_keys.add(normalize(r.prompt))
            res.append(replace(r, split=s))
        out[name] = res
    for name, recs in by_source.items():
        role = roles[name]
        if role == "train_only":
            out[name] = [replace(r, split="test" if normalize(r.prompt) in test_keys else "train")
                         for r in recs]
        elif role == "eval":
            out[name] = [replace(r, split="eval") for r in recs]
    return {name: out[name] for name in by_source}


def dedup(records: Iterable[Record], *, key: str = "prompt") -> tuple[list[Record], int]:
    """Keep the first record of each normalized prompt (key="prompt") or normalized
    (prompt, response) pair (key="pair"); returns (kept, number dropped)."""
    if key not in ("prompt", "pair"):
        raise ValueError(f"key must be 'prompt' or 'pair', got {key!r}")
    seen: set = set()
    kept: list[Record] = []
    dropped = 0
    for r in records:
        k = normalize(r.prompt) if key == "prompt" else (normalize(r.prompt),
                                                          normalize(r.response))
        if k in seen:
            dropped += 1
            continue
        seen.add(k)
        kept.append(r)
    return kept, dropped


def find_leaks(records: Iterable[Record]) -> list[tuple[Record, Record]]:
    """(train record, test record) pairs sharing a prompt, exactly or normalized."""
    recs = list(records)
    test_exact: dict[str, Record] = {}
    test_norm: dict[str, Record] = {}
    for r in recs:
        if r.split == "test":
            test_exact.setdefault(r.prompt, r)
            test_norm.setdefault(normalize(r.prompt), r)
    leaks = []
    for r in recs:
        if r.split != "train":
            continue
        hit = test_exact.get(r.prompt) or test_norm.get(normalize(r.prompt))
        if hit is not None:
            leaks.append((r, hit))
    return leaks


def assert_no_leak(records: Iterable[Record]) -> None:
    """Raise AssertionError if any train record shares a prompt (exactly or normalized) with a test one."""
    leaks = find_leaks(records)
    if leaks:
        tr, te = leaks[0]
        raise AssertionError(f"{len(leaks)} train records share a test prompt, e.g. train "
                             f"{tr.id!r} / test {te.id!r}: {tr.prompt[:80]!r}")
