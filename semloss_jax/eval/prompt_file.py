"""A user's own prompts as an extra evaluation set (`eval.py run --prompts FILE`).

    records = read_prompt_file("my_prompts.jsonl")    # JSONL / JSON / CSV: a `prompt` column
    records = read_prompt_file("my_prompts.txt")      # TXT: one prompt per non-blank line

JSON / JSONL / CSV go through the project's reader (data.readers.read_records: errors name the
file, line and field; a `response` column is not needed); a TXT line is taken as it is. The
records get ids "<file stem>:<line or row>" and the set is judged like the others (the four
class rates), with no reference answers.
"""
from __future__ import annotations

from pathlib import Path

from semloss_jax.data.readers import read_records
from semloss_jax.data.schema import FieldMap, Record
from semloss_jax.errors import DataError, EvalError

PROMPTS_SET = "prompts"


def read_prompt_file(path: str | Path) -> list[Record]:
    """The prompts of a JSONL / JSON / CSV (column `prompt`) or TXT (one per line) file."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"--prompts {p}: no such file")
    if p.suffix.lower() == ".txt":
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(p, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        recs = [Record(id=f"{p.stem}:{i}", prompt=t.strip(), response="", source=f"file:{p.name}")
                for i, t in enumerate(lines, 1) if t.strip()]
    else:
        recs, _ = read_records(p, source=f"file:{p.name}", fields=FieldMap(response=None),
                               label="benign")
    if not recs:
        raise EvalError(f"--prompts {p}: no prompts in the file")
    return recs
