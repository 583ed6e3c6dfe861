"""Readers that turn local files (and `datasets` hub names) into schema Records.

`read_records(path, source=..., fields=FieldMap(...))` reads local JSON, JSONL, CSV or Parquet
through `datasets.load_dataset("json"|"csv"|"parquet", data_files=...)` and maps columns onto
the schema; `read_hub(name, ...)` does the same for a `datasets` hub name, a save_to_disk
directory or a local file (training configs use it for data.benign / data.harmful entries
"hf:<name>"; tests use local directories, never the network). Chat-style rows
({"messages": [{"role", "content"}, ...]}) are read with `FieldMap(messages="messages")`.

Bad input raises `DataError`, whose message names the file, the line (JSONL/CSV: the physical
line number; JSON arrays: the record index; Parquet: the row index) and the field: malformed
line, missing field, empty prompt, empty response (when `require_response=True`), unknown role,
unknown label. With `on_error="skip"` the bad rows are skipped instead and counted, with the
first few locations, in the returned `ReadSummary`: nothing is dropped silently.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from semloss_jax.data.schema import LABELS, ROLES, SPLITS, FieldMap, Record
from semloss_jax.errors import ConfigError, DataError
from semloss_jax.paths import atomic_write_bytes, atomic_write_text, cache_dir

FORMATS: tuple[str, ...] = ("json", "jsonl", "csv", "parquet")
DEFAULT_FIELDS = FieldMap()  # the schema's own column names (FieldMap is frozen: safe to share)


@dataclass
class ReadSummary:
    """What a reader kept and what it skipped (reason -> count, with the first locations)."""

    file: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, err: DataError, reason: str) -> None:
        """Count a skipped row under reason; keep the error text of the first 20."""
        self.skipped[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(str(err))

    @property
    def total_skipped(self) -> int:
        """Number of rows skipped, all reasons together."""
        return sum(self.skipped.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.file}: kept {self.kept}, skipped {self.total_skipped} ({parts})"


OnError = Literal["raise", "skip"]


def check_utf8(path: Path) -> None:
    """DataError naming the first line that is not valid UTF-8 (read line by line, in binary)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, None, _utf8_message(raw, e)) from None


def _utf8_message(raw: bytes, e: UnicodeDecodeError) -> str:
    return (f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-save the "
            f"file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _fmt_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(path, None, None, f"unknown format {fmt!r}; expected one of {FORMATS}")
        return fmt
    suf = path.suffix.lower()
    if suf in (".jsonl", ".ndjson"):
        return "jsonl"
    if suf == ".json":
        # A JSON file whose first non-blank character is not '[' / '{' then '{' per line is JSONL.
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("{"):
            first = head.split("\n", 1)[0].strip()
            try:
                json.loads(first)
                return "jsonl"
            except json.JSONDecodeError:
                return "json"
        return "json"
    if suf in (".csv", ".tsv"):
        return "csv"
    if suf in (".parquet", ".pq"):
        return "parquet"
    raise DataError(path, None, None, f"cannot tell the format from the suffix {suf!r}; "
                    f"pass fmt= one of {FORMATS}")


def _hf_cache() -> str:
    return str(cache_dir() / "hf_datasets")


def _load_dataset(kind: str, data_file: Path, **kw):
    """datasets.load_dataset of one local file, its progress bars off for this call only (the
    caller's setting is restored: no process-wide side effect)."""
    import datasets
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(kind, data_files=str(data_file), split="train",
                                     cache_dir=_hf_cache(), **kw)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _prevalidate_jsonl(path: Path, on_error: OnError, summary: ReadSummary
                       ) -> tuple[list[int], list[set], Path | None]:
    """Check every JSONL line parses to an object; return the line numbers and key sets of the
    good lines and, when bad lines were skipped, a temporary file holding only the good lines."""
    good: list[int] = []
    keys: list[set] = []
    bad = False
    lines_out: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError(f"a JSONL line must be an object, got {type(obj).__name__}")
            except ValueError as e:  # JSONDecodeError is a ValueError
                err = DataError(path, lineno, None, f"malformed JSON line: {e}")
                if on_error == "raise":
                    raise err from None
                summary.skip(err, "malformed line")
                bad = True
                continue
            good.append(lineno)
            keys.append(set(obj))
            lines_out.append(raw if raw.endswith("\n") else raw + "\n")
    if not bad:
        return good, keys, None
    return good, keys, _temp_file(".jsonl", lines_out)


def _temp_file(suffix: str, lines: list[str]) -> Path:
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="semloss_valid_")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.writelines(lines)
    return Path(tmp)


def _jsonl_type_conflict(path: Path, lines: list[int]) -> tuple[int, str, str] | None:
    """The first (line, field, message) whose JSON type differs from the field's first type."""
    first: dict[str, tuple[str, int]] = {}
    wanted = set(lines)
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno not in wanted:
                continue
            for k, v in json.loads(raw).items():
                if v is None:
                    continue
                t = type(v).__name__
                if k not in first:
                    first[k] = (t, lineno)
                elif first[k][0] != t and {first[k][0], t} != {"int", "float"}:
                    return lineno, k, (f"{t} value where line {first[k][1]} has "
                                       f"{first[k][0]}")
    return None


def _csv_layout(path: Path, on_error: OnError, summary: ReadSummary
                ) -> tuple[int, list[str], list[int], Path | None]:
    """Leading '#' comment lines to skip, the header, the line where each good data row starts,
    and (when rows with the wrong number of fields were skipped) a temporary cleaned file."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    skip = 0
    while skip < len(lines) and lines[skip].lstrip().startswith("#"):
        skip += 1
    starts: list[int] = []
    reader = csv.reader(lines[skip:])
    prev_end = skip  # physical line count consumed so far (0-based)
    header: list[str] = []
    first = True
    bad = False
    keep: list[list[str]] = []
    try:
        for row in reader:
            start = prev_end + 1
            prev_end = skip + reader.line_num
            if first:
                header = row
                first = False
                continue
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                err = DataError(path, start, None, f"malformed CSV row: {len(row)} fields, the "
                                f"header has {len(header)}")
                if on_error == "raise":
                    raise err
                summary.skip(err, "malformed line")
                bad = True
                continue
            starts.append(start)
            keep.append(row)
    except csv.Error as e:
        raise DataError(path, prev_end + 1, None, f"malformed CSV: {e}") from None
    if not bad:
        return skip, header, starts, None
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(keep)
    return 0, header, starts, _temp_file(".csv", [buf.getvalue()])


class _Rows:
    """Dataset rows with the keys a JSONL line did not have removed (so they read as missing)."""

    def __init__(self, ds, keys: list[set]):
        self.ds, self.keys = ds, keys
        self.column_names = ds.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self):
        for row, k in zip(self.ds, self.keys):
            yield {c: v for c, v in row.items() if c in k}


def read_table(path: str | os.PathLike, fmt: str | None = None, *, on_error: OnError = "raise",
               summary: ReadSummary | None = None) -> tuple[Any, list[str]]:
    """Load a JSON/JSONL/CSV/Parquet file through `datasets`: (rows, one location per row).

    Locations are physical line numbers for JSONL and CSV ('#' comment lines before the header
    are skipped), "record i" for JSON arrays, "row i" for Parquet."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    if path.suffix.lower() not in (".parquet", ".pq") and fmt != "parquet":
        check_utf8(path)
    fmt = _fmt_of(path, fmt)
    summary = summary if summary is not None else ReadSummary(file=str(path))
    if fmt == "jsonl":
        good, keys, tmp = _prevalidate_jsonl(path, on_error, summary)
        if not good:
            return [], []
        try:
            ds = _load_dataset("json", tmp or path)
        except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types; reported as DataError
            # arrow type errors carry no line number: find it ourselves
            hit = _jsonl_type_conflict(path, good)
            if hit is not None:
                raise DataError(path, hit[0], hit[1], hit[2]) from None
            raise DataError(path, None, None, f"datasets could not read the file: {e}") from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        return _Rows(ds, keys), [str(n) for n in good]
    if fmt == "json":
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except ValueError as e:
            raise DataError(path, getattr(e, "lineno", None), None, f"malformed JSON: {e}") from None
        if not isinstance(obj, list):
            raise DataError(path, None, None, "a .json file must hold a list of objects "
                            f"(got {type(obj).__name__}); convert it or use a JSONL file")
        for i, item in enumerate(obj):
            if not isinstance(item, dict):
                raise DataError(path, f"record {i}", None,
                                f"expected an object, got {type(item).__name__}")
        if not obj:
            return [], []
        try:
            ds = _load_dataset("json", path)
        except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types; reported as DataError
            raise DataError(path, None, None, f"datasets could not read the file: {e}") from None
        return _Rows(ds, [set(item) for item in obj]), [f"record {i}" for i in range(len(ds))]
    if fmt == "csv":
        import datasets
        skip, header, starts, tmp = _csv_layout(path, on_error, summary)
        if not header:
            raise DataError(path, skip + 1, None, "empty CSV (no header line)")
        if len(set(header)) != len(header) or any(not h.strip() for h in header):
            raise DataError(path, skip + 1, None, f"bad CSV header {header!r} (empty or repeated "
                            "column names)")
        if not starts:
            return [], []
        feats = datasets.Features({h: datasets.Value("string") for h in header})
        try:
            ds = _load_dataset("csv", tmp or path, skiprows=skip, features=feats,
                               keep_default_na=False)
        except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types; reported as DataError
            raise DataError(path, None, None, f"datasets could not read the file: {e}") from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if len(starts) != len(ds):
            raise DataError(path, None, None, f"datasets read {len(ds)} rows where the CSV "
                            f"parser found {len(starts)}")
        return ds, [str(n) for n in starts]
    if fmt == "parquet":
        try:
            ds = _load_dataset("parquet", path)
        except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types; reported as DataError
            raise DataError(path, None, None, f"datasets could not read the file: {e}") from None
        return ds, [f"row {i}" for i in range(len(ds))]
    raise DataError(path, None, None, f"unknown format {fmt!r}")


def _text(row: dict, col: str, file: Path | str, loc: str, *, required: bool) -> str:
    if col not in row:
        raise DataError(file, loc, col, "missing field")
    v = row[col]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        v = ""
    if not isinstance(v, str):
        raise DataError(file, loc, col, f"expected text, got {type(v).__name__}")
    if required and not v.strip():
        raise DataError(file, loc, col, "empty value")
    return v


def _from_messages(msgs: Any, col: str, file: Path | str, loc: str) -> tuple[str, str]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(file, loc, col, "expected a non-empty list of {role, content} messages")
    user: list[str] = []
    assistant: list[str] = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(file, loc, f"{col}[{j}]", "expected an object with role and content")
        role = m["role"]
        if role not in ROLES:
            raise DataError(file, loc, f"{col}[{j}].role",
                            f"unknown role {role!r}; expected one of {ROLES}")
        if role == "user":
            if assistant:
                raise DataError(file, loc, f"{col}[{j}]", "multi-turn conversations are not "
                                "supported (a user turn after an assistant turn)")
            user.append(m["content"] or "")
        elif role == "assistant":
            assistant.append(m["content"] or "")
    if not user:
        raise DataError(file, loc, col, "no user message")
    if len(assistant) > 1:
        raise DataError(file, loc, col, "more than one assistant message")
    return "\n\n".join(user), (assistant[0] if assistant else "")


def row_to_record(row: dict, *, source: str, fields: FieldMap, file: Path | str, loc: str,
                  index: int, label: str | None, require_response: bool,
                  split: str = "unsplit") -> Record:
    """Map one input row onto the schema; raises DataError naming file, line and field."""
    if fields.messages is not None:
        if fields.messages not in row:
            raise DataError(file, loc, fields.messages, "missing field")
        prompt, response = _from_messages(row[fields.messages], fields.messages, file, loc)
        if not prompt.strip():
            raise DataError(file, loc, f"{fields.messages}.user", "empty value")
    else:
        prompt = _text(row, fields.prompt, file, loc, required=True)
        if fields.input is not None and fields.input in row:
            extra = _text(row, fields.input, file, loc, required=False)
            if extra.strip():
                prompt = f"{prompt}\n\n{extra}"
        response = ("" if fields.response is None
                    else _text(row, fields.response, file, loc, required=False))
    if require_response and not response.strip():
        raise DataError(file, loc, fields.messages or fields.response or "response",
                        "empty response")
    lab = label
    if fields.label is not None:
        lab = _text(row, fields.label, file, loc, required=True).strip()
    if lab is None:
        raise DataError(file, loc, "label", "no label column and no default label given")
    if lab not in LABELS:
        raise DataError(file, loc, fields.label or "label",
                        f"unknown label {lab!r}; expected one of {LABELS}")
    rid = f"{source}:{index}"
    if fields.id is not None:
        rid = str(row[fields.id]) if row.get(fields.id) not in (None, "") else rid
    score = None
    if fields.score is not None:
        raw = row.get(fields.score)
        try:
            score = None if raw in (None, "") else float(raw)
        except (TypeError, ValueError):
            raise DataError(file, loc, fields.score, f"not a number: {raw!r}") from None
    cat = ""
    if fields.category is not None and row.get(fields.category) is not None:
        cat = str(row[fields.category])
    return Record(id=rid, prompt=prompt, response=response, source=source, split=split,
                  label=lab, score=score, category=cat)


def records_from_rows(rows: Iterable[dict], locs: list[str], *, file: Path | str, source: str,
                      fields: FieldMap, label: str | None, require_response: bool,
                      on_error: OnError, summary: ReadSummary) -> list[Record]:
    """Convert rows (with one location each) into Records, raising on the first bad row or,
    with on_error="skip", counting it in summary; adds the kept count to summary."""
    out: list[Record] = []
    for i, (row, loc) in enumerate(zip(rows, locs)):
        try:
            out.append(row_to_record(row, source=source, fields=fields, file=file, loc=loc,
                                     index=i, label=label, require_response=require_response))
        except DataError as e:
            if on_error == "raise":
                raise
            summary.skip(e, _reason(e))
    summary.kept += len(out)
    return out


def _reason(e: DataError) -> str:
    msg = str(e)
    for key in ("missing field", "empty response", "empty value", "unknown role", "unknown label",
                "malformed", "not a number", "multi-turn", "more than one assistant",
                "no user message", "expected"):
        if key in msg:
            return key
    return "invalid"


def read_records(path: str | os.PathLike, *, source: str, fields: FieldMap = DEFAULT_FIELDS,
                 label: str | None = "benign", fmt: str | None = None,
                 require_response: bool = False, on_error: OnError = "raise",
                 ) -> tuple[list[Record], ReadSummary]:
    """Read a local JSON / JSONL / CSV / Parquet file into Records (through `datasets`).

    label: the label of every row, unless fields.label names a column.
    require_response: an empty response is an error (or a counted skip).
    on_error: "raise" (DataError naming file, line and field) or "skip" (skip and count).
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"must be 'raise' or 'skip', got {on_error!r}", key="on_error")
    p = Path(path)
    if not p.exists():
        raise DataError(p, None, None, "file not found")
    kind = _fmt_of(p, fmt)
    summary = ReadSummary(file=str(p))
    ds, locs = read_table(p, kind, on_error=on_error, summary=summary)
    if len(locs) and fields.messages is None and fields.prompt is not None:
        cols = set(ds.column_names)
        for col in (fields.prompt, fields.response, fields.label):
            if col is not None and col not in cols:
                err = DataError(p, locs[0], col, f"missing field (columns: {sorted(cols)})")
                if on_error == "raise":
                    raise err
    recs = records_from_rows(ds, locs, file=p, source=source, fields=fields, label=label,
                             require_response=require_response, on_error=on_error,
                             summary=summary)
    return recs, summary


def _hub_table(name: str, split: str, config: str | None):
    """A datasets.Dataset: a save_to_disk directory (its split, for a DatasetDict) or a hub name."""
    import datasets  # lazy: `datasets` takes seconds to import and only hub sources need it

    p = Path(name).expanduser()
    if p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(p, None, "split", f"no split {split!r} (splits: {sorted(ds)})")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:  # what load_dataset raises for these
        raise DataError(f"hf:{name}", None, None, f"cannot load the dataset (split {split!r}, config "
                        f"{config!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ) from None


def read_hub(name: str, *, source: str | None = None, split: str = "train",
             config: str | None = None, fields: FieldMap = DEFAULT_FIELDS,
             label: str | None = "benign", require_response: bool = False,
             on_error: OnError = "raise") -> tuple[list[Record], ReadSummary]:
    """A `datasets` dataset mapped onto the schema by `fields` (column names): a hub name (needs
    the network or a populated HF cache), a directory written by Dataset(Dict).save_to_disk, or a
    local JSON/JSONL/CSV/Parquet file (read_records). A column that `fields` names and the data
    lacks is a DataError naming it and the columns there are."""
    p = Path(name).expanduser()
    src = source or name.replace("/", "__")
    if p.is_file():
        return read_records(p, source=src, fields=fields, label=label, require_response=require_response,
                            on_error=on_error)
    ds = _hub_table(name, split, config)
    summary = ReadSummary(file=f"hf:{name}[{split}]")
    if fields.messages is None:
        for col in (fields.prompt, fields.response, fields.id):
            if col is not None and col not in ds.column_names:
                raise DataError(summary.file, None, col, f"missing column (columns: {ds.column_names})")
    locs = [f"row {i}" for i in range(len(ds))]
    recs = records_from_rows(ds, locs, file=summary.file, source=src, fields=fields, label=label,
                             require_response=require_response, on_error=on_error,
                             summary=summary)
    return recs, summary


# ---------------------------------------------------------------------------------------------
# The project's own JSONL files (built sources, harvested D_harmful and its μ(q) side files)
# ---------------------------------------------------------------------------------------------

def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records as schema JSONL, atomically; returns the count."""
    lines = [json.dumps(r.to_dict(), ensure_ascii=False) for r in records]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike, *, on_error: OnError = "raise"
               ) -> tuple[list[Record], ReadSummary]:
    """Read a schema JSONL file (as written by write_jsonl), validating every line and field."""
    p = Path(path)
    if not p.exists():
        raise DataError(p, None, None, "file not found")
    summary = ReadSummary(file=str(p))
    out: list[Record] = []
    with open(p, "rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(p, lineno, None, _utf8_message(raw_bytes, e)) from None
            if not raw.strip():
                continue
            try:
                try:
                    d = json.loads(raw)
                except ValueError as e:
                    raise DataError(p, lineno, None, f"malformed JSON line: {e}") from None
                if not isinstance(d, dict):
                    raise DataError(p, lineno, None, "malformed line: not an object")
                for k in ("id", "prompt", "response", "source", "split", "label"):
                    if k not in d:
                        raise DataError(p, lineno, k, "missing field")
                if d["label"] not in LABELS:
                    raise DataError(p, lineno, "label", f"unknown label {d['label']!r}")
                if d["split"] not in SPLITS:
                    raise DataError(p, lineno, "split", f"unknown split {d['split']!r}")
                if not isinstance(d["prompt"], str) or not d["prompt"].strip():
                    raise DataError(p, lineno, "prompt", "empty value")
                out.append(_record_at(d, p, lineno))
            except DataError as e:
                if on_error == "raise":
                    raise
                summary.skip(e, _reason(e))
    summary.kept = len(out)
    return out, summary


def _record_at(d: dict, file: Path, lineno: int) -> Record:
    """Record.from_dict(d), its errors placed at the file and line the dict came from."""
    try:
        return Record.from_dict(d)
    except DataError as e:
        if e.file is not None:
            raise
        raise DataError(file, lineno, e.field, e.message) from None


def save_response_mu(out: str | Path, mus: Sequence[np.ndarray]) -> None:
    """Write per-record μ(q) arrays [n_response_tokens, d] beside the JSONL `out`:
    OUT.mu.npy (all rows, float32) and OUT.mu_index.npy (record offsets), atomically."""
    out = Path(out)
    index = np.zeros(len(mus) + 1, np.int64)
    index[1:] = np.cumsum([m.shape[0] for m in mus])
    d = mus[0].shape[1] if mus else 0
    flat = np.concatenate(mus, 0).astype(np.float32) if mus else np.zeros((0, d), np.float32)
    for suffix, arr in ((".mu.npy", flat), (".mu_index.npy", index)):
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(out.with_name(out.name + suffix), buf.getvalue())


def load_response_mu(out: str | Path) -> list[np.ndarray]:
    """The per-record mu(q) arrays [n_response_tokens, d] saved beside a harvested JSONL."""
    out = Path(out)
    arrays = []
    for suffix in (".mu.npy", ".mu_index.npy"):
        f = out.with_name(out.name + suffix)
        try:
            arrays.append(np.load(f))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f, None, None, f"unreadable ({type(e).__name__}: {e}); harvest again") from e
    flat, index = arrays
    n = len(read_jsonl(out)[0])
    if len(index) != n + 1 or index[-1] != flat.shape[0]:
        raise DataError(out, None, "mu", f"mu index has {len(index) - 1} records / {index[-1]} "
                        f"rows but the JSONL has {n} records and mu {flat.shape[0]} rows")
    return [flat[index[i]:index[i + 1]] for i in range(n)]
