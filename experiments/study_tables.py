"""The study's tables, written from its committed results only (docs/study/), like its plots.

    python experiments/study_tables.py [--results docs/study] [--update docs/STUDY.md]

docs/study/tables.md gets:

    val    one row per judged model: validation harmful rate (judged harmful_val replies, 95%
           Wilson interval), the refusal / safe / degenerate counts of the same replies, and the
           benign validation reference CE (95% bootstrap interval), flagged where it is over the
           selection's bound (1 + selection.CE_MARGIN) x SFT's, and how many benign validation
           instructions it refused (refusal detector; the rule does not read it)
    sensitivity  the rule's alternatives of docs/STUDY.md amendment 3, reported beside it and
           never used to choose: per model the paired benign CE difference to SFT (the same 122
           instructions resampled together), the harmful + degenerate share, the benign
           early-stop rate and degenerate share; per method the setting each alternative would
           pick (ranking by harmful + degenerate; a stricter eligibility that also holds the
           benign early-stop rate and degenerate share within SFT's Wilson upper bound; a 2.5%
           CE margin)
    labelcheck  once labelcheck/report.json exists: per checked model (and over all of them)
           the blind hand-labelled and the judged harmful rate on the same validation replies
           (95% Wilson intervals), judged minus hand, the judge's AUC, and the flag of amendment
           4 (the judged rate outside the hand-labelled interval); then the agreement of the
           relabel batch (two blind readings by different labelling sessions)
    test   once test/ parts exist: per model, the TEST harmful rate (also without the test prompts
           that have a near-duplicate among D_harmful's, amendment 5) and degenerate share, the
           over-refusal rate, the benign refusal rate and reference CE, the I-Alpaca refusal
           rate; then per seeded setting (seed 0 plus the selection's seeds 1 and 2) the mean
           and the spread (min to max) of the harmful rate and the CE over its seeds

With --update FILE, the region of FILE between `<!-- study_tables:NAME -->` and
`<!-- /study_tables:NAME -->` is replaced by table NAME (the hand-written text around it stays),
so docs/STUDY.md cannot drift from the files. The study command does both (its `tables` part)
whenever an input changes.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from study_plots import files_digest, point, test_figures

from semloss_jax.data.splits import near_duplicates
from semloss_jax.errors import EvalError
from semloss_jax.eval.metrics import paired_ce_difference, wilson_interval
from semloss_jax.eval.selection import CE_MARGIN, ranked, select_setting
from semloss_jax.paths import atomic_write_text, read_jsonl_objects

NAMES = {"base": "base", "sft": "SFT", "tasft_lb": "TA-SFT LB", "tasft_exact": "TA-SFT exact one-hot",
         "nll_ascent": "NLL ascent", "unlikelihood": "unlikelihood", "dpo": "DPO",
         "safeinstr": "SafeInstr"}
INPUTS = ("judged_harmful_val.jsonl", "judged_benign_val.jsonl", "val_eval.json", "test_eval.json",
          "test_harmful_labels.jsonl")


def display(name: str, family: str, setting: float | None) -> str:
    """A model's row label: 'TA-SFT LB λ 1', 'SafeInstr N 300', 'SFT'; the run name otherwise
    (the selection's N-efficiency, sampled-reply and seed runs)."""
    if family in ("base", "sft"):
        return NAMES[family]
    if family in NAMES and setting is not None:
        return f"{NAMES[family]} {'N' if family == 'safeinstr' else 'λ'} {setting:g}"
    return f"`{name}`"


def label_of(name: str, families: dict[str, tuple[str, float | None]]) -> str:
    """display() for a model of `families`; the run name in backticks for any other."""
    return display(name, *families[name]) if name in families else f"`{name}`"


def _rate(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n, 0.95)
    return f"{k} / {n} = {k / n:.3f} [{lo:.3f}, {hi:.3f}]"


def _ce(ce: dict) -> str:
    return f"{ce['ce']:.3f} [{ce['ci'][0]:.3f}, {ce['ci'][1]:.3f}]"


def val_table(res: Path, families: dict[str, tuple[str, float | None]]) -> str:
    """The validation table (module docstring); models without validation results are left out."""
    points = {n: p for n in families if (p := point(res, n)) is not None}
    bound = (1 + CE_MARGIN) * points["sft"]["ce"] if "sft" in points else None
    lines = ["| model | harmful (val) | refusal | safe | degenerate | benign val reference CE "
             "| benign instructions refused |", "|---|---|---|---|---|---|---|"]
    for name, p in points.items():
        c = p["classes"]
        over = bound is not None and p["ce"] > bound
        refused = f"{p['benign_refused']} / {p['benign_n']}" if "benign_n" in p else "-"
        lines.append(f"| {display(name, *families[name])} | {_rate(p['k'], p['n'])} | "
                     f"{c.get('refusal', 0)} | {c.get('safe', 0)} | {c.get('degenerate', 0)} | "
                     f"{_ce({'ce': p['ce'], 'ci': p['ce_ci']})}"
                     f"{f' (over the {bound:.4f} bound)' if over else ''} | {refused} |")
    if bound is not None:
        lines.append(f"\nThe CE bound of the selection rule: {1 + CE_MARGIN:.2f} x SFT's "
                     f"{points['sft']['ce']:.4f} = {bound:.4f}.")
    return "\n".join(lines)


def _benign_rows(res: Path, name: str) -> list[dict] | None:
    f = res / "models" / name / "judged_benign_val.jsonl"
    return read_jsonl_objects(f) if f.exists() else None


def sensitivity_rows(res: Path, families: dict[str, tuple[str, float | None]]) -> dict[str, dict]:
    """Per judged model: the figures the alternative rules read (module docstring)."""
    sft_b = _benign_rows(res, "sft")
    out = {}
    for name in families:
        p, b = point(res, name), _benign_rows(res, name)
        if p is None or b is None or sft_b is None:
            continue
        if [r["id"] for r in b] != [r["id"] for r in sft_b]:
            raise EvalError(f"{name}: its benign_val rows are not SFT's (ids differ): no paired CE")
        d = paired_ce_difference([r["ref_nll"] for r in b], [r["ref_tokens"] for r in b],
                                 [r["ref_nll"] for r in sft_b], [r["ref_tokens"] for r in sft_b])
        n = len(b)
        out[name] = {"point": p, "ce_diff": d, "n_benign": n,
                     "harm_or_degenerate": (p["k"] + p["classes"].get("degenerate", 0)) / p["n"],
                     "early_stop": sum(bool(r["early_stop"]) for r in b),
                     "benign_degenerate": sum(r["label"] == "degenerate" for r in b)}
    return out


def strict_limits(rows: dict[str, dict]) -> dict[str, int]:
    """The strict eligibility's limits (amendment 3): SFT's Wilson upper bounds on the benign
    early stops and degenerate replies, as counts of its benign instructions."""
    sft, n = rows["sft"], rows["sft"]["n_benign"]
    return {"early_stop": int(wilson_interval(sft["early_stop"], n, 0.95)[1] * n),
            "degenerate": int(wilson_interval(sft["benign_degenerate"], n, 0.95)[1] * n)}


def _alternatives(rows: dict[str, dict], names: list[str], families, ref: float, strict: dict) -> dict:
    """The setting each rule picks among `names` (one method's judged settings)."""
    def sel_row(n, rate):
        return {"name": n, "setting": families[n][1], "val_harmful_rate": rate,
                "val_benign_ce": rows[n]["point"]["ce"]}

    fixed = [sel_row(n, rows[n]["point"]["rate"]) for n in names]
    ok_strict = [r for r in fixed if rows[r["name"]]["early_stop"] <= strict["early_stop"]
                 and rows[r["name"]]["benign_degenerate"] <= strict["degenerate"]]
    strict_pick = ranked(ok_strict, ref)
    return {"rule": select_setting(fixed, ref)["name"],
            "harm+degenerate": select_setting([sel_row(n, rows[n]["harm_or_degenerate"]) for n in names],
                                              ref)["name"],
            "strict": strict_pick[0]["name"] if strict_pick else "none eligible",
            "margin 2.5%": select_setting(fixed, ref, margin=0.025)["name"]}


def sensitivity_table(res: Path, families: dict[str, tuple[str, float | None]]) -> str | None:
    """The sensitivity tables (module docstring), or None before SFT's validation exists."""
    rows = sensitivity_rows(res, families)
    if "sft" not in rows:
        return None
    ref = rows["sft"]["point"]["ce"]
    n = rows["sft"]["n_benign"]
    strict = strict_limits(rows)
    lines = ["| model | benign CE - SFT's [paired 95%] | harmful + degenerate (val) | benign early "
             "stops | benign degenerate | eligible: 5% / 2.5% / strict |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        d, ce = r["ce_diff"], r["point"]["ce"]
        elig = [ce <= (1 + m) * ref for m in (CE_MARGIN, 0.025)]
        elig.append(elig[0] and r["early_stop"] <= strict["early_stop"]
                    and r["benign_degenerate"] <= strict["degenerate"])
        lines.append(f"| {display(name, *families[name])} | {d['diff']:+.3f} [{d['ci'][0]:+.3f}, "
                     f"{d['ci'][1]:+.3f}] | {r['harm_or_degenerate']:.3f} | {r['early_stop']} / {n} | "
                     f"{r['benign_degenerate']} / {n} | {' / '.join('yes' if e else 'no' for e in elig)} |")
    lines += ["", f"Strict eligibility: CE within 5% and at most {strict['early_stop']} early stops and "
              f"{strict['degenerate']} degenerate replies of {n} benign ones (SFT's Wilson upper bounds).",
              "", "| method (settings judged) | the rule | harmful + degenerate | strict | margin 2.5% |",
              "|---|---|---|---|---|"]
    for fam in NAMES:
        names = [m for m, (f, _) in families.items() if f == fam and m in rows]
        if fam in ("base", "sft") or not names:
            continue
        alt = _alternatives(rows, names, families, ref, strict)
        lines.append(f"| {NAMES[fam]} ({len(names)}) | " + " | ".join(
            v if v == "none eligible" else display(v, *families[v]) for v in alt.values()) + " |")
    return "\n".join(lines)


LABELCHECK = "labelcheck/report.json"


def read_labelcheck(res: Path) -> dict | None:
    """labelcheck/report.json, or None before it exists."""
    f = res / LABELCHECK
    return json.loads(f.read_text()) if f.exists() else None


def labelcheck_rows(res: Path, rep: dict | None = None) -> dict[str, dict] | None:
    """Per checked model, then "all": n, the hand-labelled and judged harmful rate summaries,
    judged minus hand, the judge's AUC and `outside` (amendment 4's flag: the judged rate outside
    the hand-labelled 95% Wilson interval); None before labelcheck/report.json exists. `rep`: the
    report when the caller has read it already."""
    rep = rep if rep is not None else read_labelcheck(res)
    if rep is None:
        return None
    out = {}
    for name, c in {**rep["per_model"], "all": rep["all"]}.items():
        hand, judge = c["hand_harmful"], c["judge_harmful"]
        lo, hi = hand["wilson"]
        out[name] = {"n": c["n"], "hand": hand, "judge": judge, "auc": c["auc"],
                     "diff": judge["rate"] - hand["rate"], "outside": not lo <= judge["rate"] <= hi}
    return out


def labelcheck_table(res: Path, families: dict[str, tuple[str, float | None]]) -> str | None:
    """The label check table (module docstring), or None before its report."""
    rep = read_labelcheck(res)
    if rep is None:
        return None
    rows = labelcheck_rows(res, rep)
    lines = ["| model | rows | harmful, hand-labelled (blind) | harmful, judged | judged - hand | "
             "judge AUC | judged rate outside the hand interval |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        label = "all checked models" if name == "all" else label_of(name, families)
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f}"
        lines.append(f"| {label} | {r['n']} | {_rate(r['hand']['k'], r['hand']['n'])} | "
                     f"{_rate(r['judge']['k'], r['judge']['n'])} | {r['diff']:+.3f} | {auc} | "
                     f"{'**yes**' if r['outside'] else 'no'} |")
    agree = rep["relabel_agreement"]
    parts = [f"{a['observed_agreement']:.1%} (kappa {a['kappa']:.3f}) on {what}"
             for key, what in (("four_class", "four classes"), ("harmful_yes_no", "harmful yes / no"))
             if (a := agree.get(key)) and a.get("n")]
    if parts:
        lines.append(f"\nTwo blind readings of the relabel batch's {agree['pairs']} rows (by different "
                     f"labelling sessions) agree {' and '.join(parts)}.")
    return "\n".join(lines)


def near_duplicate_prompts(res: Path, prompts: list[str]) -> set[str] | None:
    """The prompts among `prompts` with a near-duplicate (word Jaccard >= 0.6) among the
    study's D_harmful prompts (docs/study/data/d_harmful.jsonl; amendment 5); None while that
    file is missing (the table then says n/a rather than the unfiltered rate)."""
    f = res / "data" / "d_harmful.jsonl"
    if not f.exists():
        return None
    train = [r["prompt"] for r in read_jsonl_objects(f)]
    return {prompts[i] for i in near_duplicates(prompts, train, 0.6)}


def test_row(res: Path, name: str) -> dict | None:
    """A model's TEST figures (study_plots.test_figures), or None while they are missing; with
    its test_harmful_labels.jsonl also the harmful rate without the near-duplicate prompts."""
    t = test_figures(res, name)
    if t is None:
        return None
    labels = res / "models" / name / "test_harmful_labels.jsonl"
    clean = None
    rows = read_jsonl_objects(labels) if labels.exists() else []
    if rows and (dup := near_duplicate_prompts(res, [r["prompt"] for r in rows])) is not None:
        kept = [r for r in rows if r["prompt"] not in dup]
        k, n = sum(r["harmful"] for r in kept), len(kept)
        clean = {"k": k, "n": n, "rate": k / n, "wilson": list(wilson_interval(k, n, 0.95))}
    return {**t, "harmful_no_near_dup": clean}


def seed_groups(families: dict[str, tuple[str, float | None]]) -> dict[str, list[str]]:
    """Seed 0's run name -> its runs over seeds (itself, then NAME_s1, NAME_s2 where they exist)."""
    groups: dict[str, list[str]] = {}
    for name, (fam, _) in families.items():
        if fam.endswith("_seed"):
            base = re.sub(r"_s\d+$", "", name)
            groups.setdefault(base, [base]).append(name)
    return groups


def test_table(res: Path, families: dict[str, tuple[str, float | None]]) -> str | None:
    """The test table and the seed summary (module docstring), or None before any test/ part."""
    rows = {n: r for n in families if (r := test_row(res, n)) is not None}
    if not rows:
        return None
    k = lambda r: f"{r['k']} / {r['n']} = {r['rate']:.3f} [{r['wilson'][0]:.3f}, {r['wilson'][1]:.3f}]"  # noqa: E731
    lines = ["| model | harmful (test) | without near-duplicates of D_harmful | degenerate | "
             "over-refusal | benign refusal | benign test CE | I-Alpaca refusal |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        clean = "n/a" if r["harmful_no_near_dup"] is None else k(r["harmful_no_near_dup"])
        lines.append(f"| {display(name, *families[name])} | {k(r['harmful'])} | {clean} | "
                     f"{r['degenerate']['rate']:.3f} | {k(r['overrefusal'])} | "
                     f"{r['benign_refusal']['rate']:.3f} | {_ce(r['ce'])} | "
                     f"{r['i_alpaca_refusal']['rate']:.3f} |")
    groups = {b: [n for n in g if n in rows] for b, g in seed_groups(families).items()}
    groups = {b: g for b, g in groups.items() if len(g) >= 2}
    if groups:
        lines += ["", "| setting (seeds) | harmful (test): mean [min, max] | benign test CE: mean "
                  "[min, max] |", "|---|---|---|"]
        for base, names in groups.items():
            h = [rows[n]["harmful"]["rate"] for n in names]
            c = [rows[n]["ce"]["ce"] for n in names]
            lines.append(f"| {display(base, *families[base])} ({len(names)}) | "
                         f"{statistics.mean(h):.3f} [{min(h):.3f}, {max(h):.3f}] | "
                         f"{statistics.mean(c):.3f} [{min(c):.3f}, {max(c):.3f}] |")
    return "\n".join(lines)


def inputs_digest(res: Path, names: list[str]) -> str:
    """A digest of every file the tables read (the tables part is done while it is unchanged)."""
    return files_digest(res, names, INPUTS, extra=("data/d_harmful.jsonl", LABELCHECK))


def replace_region(text: str, name: str | None, body: str, where: str = "",
                   tag: str = "study_tables") -> str:
    """Text with the region between the markers of table `name` (`<!-- TAG:NAME -->` ...
    `<!-- /TAG:NAME -->`; `<!-- TAG -->` ... without a name) replaced by body."""
    label = f"{tag}:{name}" if name else tag
    start, end = f"<!-- {label} -->", f"<!-- /{label} -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise EvalError(f"{where or 'the file'}: no region {start} ... {end} to update")
    return text[:i + len(start)] + "\n" + body + "\n" + text[j:]


def write(res: Path, families: dict[str, tuple[str, float | None]], update: Path | None = None) -> dict:
    """res/tables.md (and the regions of `update`); returns the tables by name."""
    tables = {"val": val_table(res, families)}
    if (t := sensitivity_table(res, families)) is not None:
        tables["sensitivity"] = t
    if (t := labelcheck_table(res, families)) is not None:
        tables["labelcheck"] = t
    if (t := test_table(res, families)) is not None:
        tables["test"] = t
    digest = inputs_digest(res, list(families))
    md = [f"<!-- inputs digest: {digest} -->", "# The study's tables (written by "
          "experiments/study_tables.py from docs/study/; do not edit by hand)", ""]
    for name, body in tables.items():
        md += [f"## {name}", "", body, ""]
    atomic_write_text(res / "tables.md", "\n".join(md))
    if update is not None:
        text = update.read_text()
        for name, body in tables.items():
            if f"<!-- study_tables:{name} -->" in text:
                text = replace_region(text, name, body, str(update))
        atomic_write_text(update, text)
    return tables


def is_current(res: Path, families: dict[str, tuple[str, float | None]]) -> bool:
    """Whether res/tables.md was written from the files as they are now."""
    f = res / "tables.md"
    return f.exists() and f.read_text().startswith(
        f"<!-- inputs digest: {inputs_digest(res, list(families))} -->")


def main(argv: list[str] | None = None) -> int:
    import study  # the model list (experiments/ is on sys.path when run as a script)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(study.REPO / "docs" / "study"))
    ap.add_argument("--update", default=None, help="a Markdown file whose study_tables regions to refresh")
    args = ap.parse_args(argv)
    res = Path(args.results)
    sel = json.loads((res / "selection.json").read_text()) if (res / "selection.json").exists() else {}
    fams = study.families(study.sweep_models() + study.selected_models(sel))
    for name, body in write(res, fams, Path(args.update) if args.update else None).items():
        print(f"## {name}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
