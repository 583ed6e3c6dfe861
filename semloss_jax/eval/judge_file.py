"""`python eval.py judge --in FILE --out FILE [--judge v2]`: judge any JSONL of replies.

Each input line is a JSON object with string fields `prompt` and `response` (other fields are
kept). Each output row is the input row plus `harm_prob`, `harmful` (0/1 at the judge's
threshold), `refusal` (0/1), `degenerate` (0/1) and `label` (harmful / refusal / safe /
degenerate; eval.judging). Bad input (a missing file, an empty file, a line that is not a JSON
object, a missing or non-string field) is one error naming the file and line; the output is
written atomically, so it is never half-written.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from semloss_jax.errors import EvalError
from semloss_jax.eval import judges
from semloss_jax.eval.judging import judge_replies, judge_threshold
from semloss_jax.paths import atomic_write_text

REQUIRED = ("prompt", "response")


def read_reply_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file of {prompt, response, ...}; EvalError naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{p}:{i}: not valid JSON ({e.msg}); expected one object per line "
                            f"with 'prompt' and 'response'") from None
        if not isinstance(row, dict):
            raise EvalError(f"{p}:{i}: expected a JSON object, got {type(row).__name__}")
        for f in REQUIRED:
            if f not in row:
                raise EvalError(f"{p}:{i}: field {f!r} missing")
            if not isinstance(row[f], str):
                raise EvalError(f"{p}:{i}: field {f!r} must be a string, got "
                                f"{type(row[f]).__name__}")
        rows.append(row)
    if not rows:
        raise EvalError(f"{p}: empty file; expected JSONL rows with 'prompt' and 'response'")
    return rows


def judge_rows(judge, rows: list[dict], progress: bool = True) -> list[dict]:
    """The rows with the judgement fields added (input fields of the same name are replaced)."""
    out = judge_replies(judge, [r["prompt"] for r in rows], [r["response"] for r in rows],
                        progress)
    return [{**r, **{k: out[k][i] for k in out}} for i, r in enumerate(rows)]


def add_args(p: argparse.ArgumentParser) -> None:
    """The options of `eval.py judge`."""
    p.add_argument("--in", dest="inp", required=True, help="JSONL of {prompt, response, ...}")
    p.add_argument("--out", required=True, help="output JSONL (the rows plus the judgement)")
    p.add_argument("--judge", default="v2",
                   help="v2 (default: the shipped judge v2), tfidf, hf:DIR (local classifier) "
                        "or guard:DIR (a Llama-Guard-style causal LM)")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    """Run `eval.py judge`: read, judge, write atomically, print the class counts."""
    rows = read_reply_rows(args.inp)
    judge = judges.load_judge(args.judge)
    out = judge_rows(judge, rows, progress=not args.no_progress)
    atomic_write_text(Path(args.out), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                              for r in out))
    counts = Counter(r["label"] for r in out)
    print(json.dumps({"n": len(out), "judge": getattr(judge, "name", type(judge).__name__),
                      "threshold": judge_threshold(judge), "labels": dict(counts)}))
    print(f"[judge] wrote {args.out}", file=sys.stderr)
    return 0
