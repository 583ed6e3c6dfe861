r"""Deterministic, seeded train/val/test splits by prompt hash; dedup; the no-leak guarantee.

A record's split is a pure function of its NORMALIZED prompt (Unicode NFKC, casefold, runs of
whitespace collapsed to one space, stripped), the seed and the test and validation fractions:

    u = sha256(f"{seed}\x00{normalize(prompt)}") as a number in [0, 1)
    split = "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"

so the same prompt (exactly or after normalizing) lands in the same split in every source, and
the test split does not depend on val_frac (adding the validation split moved no test prompt).
Settings (lambda, steps, thresholds) are chosen on "val"; "test" is only ever reported.
Sources have one of three roles (`ROLES`):

    "split"       hashed as above (harmful prompts, benign instructions, judge data)
    "train_only"  "train", except a record whose normalized prompt is the prompt of any test
                  (val) record of a "split" source: that one is "test" ("val"), kept out of
                  training. Used for data nobody evaluates on (SafeInstr refusals, PyRIT's
                  harmful pairs).
    "eval"        "eval" (over-refusal prompts, I-Alpaca): never trained on.

Guarantee (tested): no prompt of a test or val split appears, exactly or normalized, in any
train split.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from semloss_jax.data.schema import Record
from semloss_jax.errors import DataError

ROLES = ("split", "train_only", "eval")
DEFAULT_SEED = 0
DEFAULT_TEST_FRAC = 0.2
DEFAULT_VAL_FRAC = 0.1
HELD_OUT = ("test", "val")

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The prompt key for splits and dedup: NFKC, casefold, whitespace collapsed, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def unit_hash(text: str, seed: int = DEFAULT_SEED) -> float:
    """A uniform number in [0, 1) from the normalized text and the seed (stable across runs)."""
    h = hashlib.sha256(f"{seed}\x00{normalize(text)}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def hash_split(prompt: str, *, seed: int = DEFAULT_SEED, test_frac: float = DEFAULT_TEST_FRAC,
               val_frac: float = DEFAULT_VAL_FRAC) -> str:
    """"test" below test_frac, "val" below test_frac + val_frac, else "train" (by unit_hash)."""
    if not (0.0 <= test_frac <= 1.0 and 0.0 <= val_frac <= 1.0):
        raise DataError(None, None, "split", f"test_frac and val_frac must be in [0, 1], got "
                        f"test_frac={test_frac}, val_frac={val_frac}")
    u = unit_hash(prompt, seed)
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def assign_splits(by_source: Mapping[str, Sequence[Record]], roles: Mapping[str, str], *,
                  seed: int = DEFAULT_SEED, test_frac: float = DEFAULT_TEST_FRAC,
                  val_frac: float = DEFAULT_VAL_FRAC) -> dict[str, list[Record]]:
    """Return the records of every source with `split` set according to the source's role."""
    for name in by_source:
        role = roles.get(name)
        if role not in ROLES:
            raise DataError(None, None, "role", f"source {name!r}: unknown split role {role!r}; "
                            f"expected one of {ROLES}")
    out: dict[str, list[Record]] = {}
    held_out: dict[str, str] = {}  # normalized prompt -> "test" | "val"
    for name, recs in by_source.items():
        if roles[name] != "split":
            continue
        res = []
        for r in recs:
            s = hash_split(r.prompt, seed=seed, test_frac=test_frac, val_frac=val_frac)
            if s != "train":
                held_out[normalize(r.prompt)] = s
            res.append(replace(r, split=s))
        out[name] = res
    for name, recs in by_source.items():
        role = roles[name]
        if role == "train_only":
            out[name] = [replace(r, split=held_out.get(normalize(r.prompt), "train")) for r in recs]
        elif role == "eval":
            out[name] = [replace(r, split="eval") for r in recs]
    return {name: out[name] for name in by_source}


def dedup(records: Iterable[Record], *, key: str = "prompt") -> tuple[list[Record], int]:
    """Keep the first record of each normalized prompt (key="prompt") or normalized
    (prompt, response) pair (key="pair"); returns (kept, number dropped)."""
    if key not in ("prompt", "pair"):
        raise DataError(None, None, "key", f"must be 'prompt' or 'pair', got {key!r}")
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
    """(train record, held-out record) pairs sharing a prompt, exactly or normalized, where the
    held-out record is in the test or the val split."""
    recs = list(records)
    held_exact: dict[str, Record] = {}
    held_norm: dict[str, Record] = {}
    for r in recs:
        if r.split in HELD_OUT:
            held_exact.setdefault(r.prompt, r)
            held_norm.setdefault(normalize(r.prompt), r)
    leaks = []
    for r in recs:
        if r.split != "train":
            continue
        hit = held_exact.get(r.prompt) or held_norm.get(normalize(r.prompt))
        if hit is not None:
            leaks.append((r, hit))
    return leaks


def assert_no_leak(records: Iterable[Record]) -> None:
    """Raise AssertionError if a train record shares a prompt with a test or val record."""
    leaks = find_leaks(records)
    if leaks:
        tr, te = leaks[0]
        raise AssertionError(f"{len(leaks)} train records share a {te.split} prompt, e.g. train "
                             f"{tr.id!r} / {te.split} {te.id!r}: {tr.prompt[:80]!r}")


_WORD = re.compile(r"\w+")


def word_set(text: str) -> frozenset[str]:
    """The normalized text's words (for near-duplicate checks)."""
    return frozenset(_WORD.findall(normalize(text)))


def near_duplicates(prompts: Sequence[str], others: Sequence[str], threshold: float = 0.6
                    ) -> list[int]:
    """Indices of `prompts` whose word sets have a Jaccard similarity >= threshold with some
    prompt of `others`. The splits hash exact normalized prompts, so a reworded twin ("Create a
    tutorial video on how to hack ..." / "Create a tutorial on how to hack ...") can sit on both
    sides; a test report can leave such prompts out as a check."""
    if not 0.0 < threshold <= 1.0:
        raise DataError(None, None, "threshold", f"must be in (0, 1], got {threshold}")
    pool = [w for w in (word_set(o) for o in others) if w]
    out = []
    for i, p in enumerate(prompts):
        a = word_set(p)
        if a and any(len(a & b) >= threshold * len(a | b) for b in pool):
            out.append(i)
    return out
