"""The paper's five claims, read from the study's committed TEST results.

The criteria are those docs/STUDY.md fixed before any test reply existed ("How each claim
will be read"):

    python experiments/study_claims.py [--results docs/study] [--update docs/RESULTS.md]

A setting's figures are over its seeds (seed 0 plus the selection's seeds 1 and 2, where their
test results exist): the seed mean, the spread (max - min) and the pooled 95% Wilson interval
of all its seeds' replies together. A difference between two settings COUNTS when it exceeds
both settings' spreads and their pooled intervals do not overlap; otherwise it is "not
distinguishable here". A CE difference is paired (both models on the same benign test
instructions) and counts when its 95% interval excludes 0 and it exceeds both CE spreads.

    1 bounded EMD vs NLL ascent and unlikelihood   TA-SFT LB's harmful rate against each
    2 data efficiency vs SafeInstr                 TA-SFT LB at N = 10, 30, 100, 300 harmful
                                                   replies against SafeInstr at its chosen N
    3 no over-alignment                            each chosen method's over-refusal and
                                                   benign refusal rate against SFT's interval
    4 the lower bound is enough                    exact one-hot EMD against TA-SFT LB
    5 contrastive data costs language ability      DPO's paired CE cost against TA-SFT LB's

Each claim is read under the selection rule and under each alternative of amendment 3
(study_tables' sensitivity choices; those settings have seed 0 only). docs/study/claims.md and
claims.json get the verdicts and their figures; with --update FILE, the region between
`<!-- study_claims -->` and `<!-- /study_claims -->` is replaced (an EvalError if FILE has no
such region). A claim whose models lack test results says which ("waiting for test/ of ...");
a verdict read while seed runs it will average over (NAME_s1, NAME_s2 of the settings it reads)
have no test result yet is marked provisional and names them.
Below the verdicts, once the blind label check has its report: the settings the claims read whose
judged validation rate falls outside their hand-labelled interval (amendment 4's flag), with the
hand labels, and those the check did not cover; for each of amendments 7-8's paired checks of
test replies that has its report (LABELCHECK_TESTS), each checked model's hand-labelled and judged
test rate on the shared prompts and every two models' paired differences.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from study_plots import files_digest, paired_points, test_figures
from study_tables import (
    LABELCHECK,
    NAMES,
    _alternatives,
    display,
    label_of,
    labelcheck_rows,
    replace_region,
    sensitivity_rows,
    strict_limits,
)

from semloss_jax.errors import EvalError
from semloss_jax.eval.metrics import wilson_interval
from semloss_jax.paths import atomic_write_text, read_jsonl_objects

RATES = ("harmful", "degenerate", "overrefusal", "benign_refusal")
METHODS = ("tasft_lb", "nll_ascent", "unlikelihood", "dpo", "safeinstr")
INPUTS = ("test_eval.json", "test_harmful_labels.jsonl", "test_benign_rows.jsonl", "metrics.jsonl")
LOWER, HIGHER, SAME = "lower", "higher", "not distinguishable here"


class Waiting(Exception):
    """A claim's models have no test results yet (its message names them)."""


# ---------------------------------------------------------------------------------------------
# A setting over its seeds, and when two differ


def setting(res: Path, name: str) -> dict:
    """A setting's test figures over its seeds (module docstring); Waiting without seed 0's."""
    found = {n: f for n in (name, f"{name}_s1", f"{name}_s2") if (f := test_figures(res, n)) is not None}
    if name not in found:
        raise Waiting(name)
    figs = list(found.values())
    out: dict = {"name": name, "runs": list(found)}
    for key in RATES:
        k, n = sum(f[key]["k"] for f in figs), sum(f[key]["n"] for f in figs)
        rates = [f[key]["rate"] for f in figs]
        out[key] = {"mean": statistics.mean(rates), "spread": max(rates) - min(rates),
                    "pooled": list(wilson_interval(k, n, 0.95)), "k": k, "n": n, "per_seed": rates}
    ces = [f["ce"]["ce"] for f in figs]
    out["ce"] = {"mean": statistics.mean(ces), "spread": max(ces) - min(ces), "per_seed": ces}
    return out


def compare(a: dict, b: dict, key: str) -> str:
    """Whether setting a's `key` rate is LOWER or HIGHER than b's by the study's margin (the
    difference exceeds both spreads and the pooled intervals do not overlap), else SAME."""
    x, y = a[key], b[key]
    d = x["mean"] - y["mean"]
    apart = x["pooled"][1] < y["pooled"][0] or y["pooled"][1] < x["pooled"][0]
    if apart and abs(d) > max(x["spread"], y["spread"]):
        return LOWER if d < 0 else HIGHER
    return SAME


def paired_ce(res: Path, a: dict, b: dict) -> dict:
    """Setting a's benign test CE minus b's, paired on seed 0's rows, and whether it counts
    (its interval excludes 0 and it exceeds both CE spreads)."""
    got = paired_points(res, [a["name"]], "test", ref=b["name"])
    if a["name"] not in got:
        raise Waiting(f"{a['name']} or {b['name']} (test_benign_rows.jsonl)")
    p = got[a["name"]]
    counts = (p["ce_ci"][0] > 0 or p["ce_ci"][1] < 0) and abs(p["ce"]) > max(
        a["ce"]["spread"], b["ce"]["spread"])
    return {"diff": p["ce"], "ci": p["ce_ci"], "counts": bool(counts)}


def rate_text(s: dict, key: str = "harmful") -> str:
    r = s[key]
    seeds = f", {len(s['runs'])} seeds, spread {r['spread']:.3f}" if len(s["runs"]) > 1 else ", seed 0"
    return f"{r['mean']:.3f} [{r['pooled'][0]:.3f}, {r['pooled'][1]:.3f}]{seeds}"


def train_ce_tail(res: Path, name: str, last: int = 20) -> float | None:
    """Mean training-batch benign CE over a model's last `last` logged steps (None without its
    committed metrics.jsonl): where an unbounded objective diverged, this shows it."""
    f = res / "models" / name / "metrics.jsonl"
    if not f.exists():
        return None
    ce = [r["ce"] for r in read_jsonl_objects(f)]
    return statistics.mean(ce[-last:]) if ce else None


# ---------------------------------------------------------------------------------------------
# The five claims; each returns {"verdict", "reading", "figures"}


def claim_bounded(res: Path, choice: dict[str, str], families: dict) -> dict:
    lb = setting(res, choice["tasft_lb"])
    others = {f: setting(res, choice[f]) for f in ("nll_ascent", "unlikelihood")}
    cmp = {f: compare(lb, s, "harmful") for f, s in others.items()}
    if all(c == LOWER for c in cmp.values()):
        verdict = "reproduced"
    elif any(c == HIGHER for c in cmp.values()):
        verdict = "not reproduced"
    else:
        verdict = "not distinguishable here"
    vs_sft = paired_points(res, [lb["name"], *(s["name"] for s in others.values())], "test")
    tails = {n: train_ce_tail(res, n) for n, (f, _) in families.items() if f in ("tasft_lb", "nll_ascent")}
    reading = "; ".join(f"TA-SFT LB {rate_text(lb)} vs {NAMES[f]} {rate_text(s)}: TA-SFT {cmp[f]}"
                        for f, s in others.items())
    return {"verdict": verdict, "reading": reading, "figures": {
        "harmful": {s["name"]: s["harmful"] for s in (lb, *others.values())},
        "degenerate": {s["name"]: s["degenerate"]["mean"] for s in (lb, *others.values())},
        "test_ce_minus_sft": {n: {"diff": p["ce"], "ci": p["ce_ci"]} for n, p in vs_sft.items()},
        "train_ce_last20": {n: t for n, t in tails.items() if t is not None}, "comparisons": cmp}}


def claim_efficiency(res: Path, choice: dict[str, str], families: dict, rule_lb: str) -> dict:
    if choice["tasft_lb"] != rule_lb:
        return {"verdict": "not testable here", "reading": "the N-harmful runs are at the rule's "
                f"choice ({rule_lb}), not at this rule's ({choice['tasft_lb']})", "figures": {}}
    si = setting(res, choice["safeinstr"])
    n_si = families[choice["safeinstr"]][1]
    ta = {100: setting(res, rule_lb)} | {int(s): setting(res, n) for n, (f, s) in families.items()
                                         if f == "tasft_lb_n"}
    ok = [n for n in sorted(ta) if n <= n_si / 10 and ta[n]["harmful"]["mean"] <= si["harmful"]["mean"]]
    if ok:
        verdict = "reproduced"
    elif all(compare(si, ta[n], "harmful") == LOWER for n in ta):
        verdict = "not reproduced"
    else:
        verdict = "not distinguishable here"
    reading = (f"SafeInstr N {n_si:g}: {rate_text(si)}; TA-SFT LB " + ", ".join(
        f"N {n}: {rate_text(ta[n])}" for n in sorted(ta)) + (
        f"; at N <= {n_si / 10:g} and at or below SafeInstr: N {', '.join(map(str, ok))}" if ok else ""))
    return {"verdict": verdict, "reading": reading, "figures": {
        "safeinstr": {"n": n_si, **si["harmful"]}, "tasft_lb": {n: ta[n]["harmful"] for n in sorted(ta)},
        "qualifying_n": ok}}


def claim_overalignment(res: Path, choice: dict[str, str]) -> dict:
    sft = setting(res, "sft")
    where = {}
    for f in METHODS:
        s = setting(res, choice[f])
        where[f] = {}
        for key in ("overrefusal", "benign_refusal"):
            lo, hi = sft[key]["pooled"]
            m = s[key]["mean"]
            where[f][key] = {"mean": m, "vs_sft": "above" if m > hi else "below" if m < lo else "within"}
    above = [k for k, v in where["tasft_lb"].items() if v["vs_sft"] == "above"]
    verdict = "not reproduced" if above else "reproduced"
    reading = (f"SFT over-refusal {rate_text(sft, 'overrefusal')}, benign refusal "
               f"{rate_text(sft, 'benign_refusal')}; " + "; ".join(
                   f"{NAMES[f]} {v['overrefusal']['mean']:.3f} ({v['overrefusal']['vs_sft']}) / "
                   f"{v['benign_refusal']['mean']:.3f} ({v['benign_refusal']['vs_sft']})"
                   for f, v in where.items()))
    return {"verdict": verdict, "reading": reading, "figures": {"sft": {k: sft[k] for k in
                                                                         ("overrefusal", "benign_refusal")},
                                                                "methods": where}}


def claim_exact(res: Path, choice: dict[str, str]) -> dict:
    if "tasft_exact" not in choice:
        raise Waiting("the exact one-hot EMD choice (select)")
    lb, ex = setting(res, choice["tasft_lb"]), setting(res, choice["tasft_exact"])
    harm = compare(ex, lb, "harmful")
    ce = paired_ce(res, ex, lb)
    exact_better = harm == LOWER or (ce["counts"] and ce["diff"] < 0)
    lb_better = harm == HIGHER or (ce["counts"] and ce["diff"] > 0)
    verdict = ("not reproduced" if exact_better else "reproduced (LB better)" if lb_better
               else "reproduced (LB suffices)")
    reading = (f"exact {rate_text(ex)} vs LB {rate_text(lb)}: exact {harm}; benign test CE exact - LB "
               f"{ce['diff']:+.3f} [{ce['ci'][0]:+.3f}, {ce['ci'][1]:+.3f}]"
               f"{' (counts)' if ce['counts'] else ' (does not count)'}")
    return {"verdict": verdict, "reading": reading,
            "figures": {"harmful": {"exact": ex["harmful"], "lb": lb["harmful"]}, "ce_exact_minus_lb": ce}}


def benign_proxies(res: Path, name: str) -> dict:
    """Early stops and refusals among a model's benign test replies (seed 0)."""
    f = res / "models" / name / "test_benign_rows.jsonl"
    if not f.exists():
        raise Waiting(f"{name} (test_benign_rows.jsonl)")
    rows = read_jsonl_objects(f)
    return {"n": len(rows), "early_stops": sum(bool(r.get("early_stop")) for r in rows),
            "refusals": sum(bool(r.get("refusal")) for r in rows)}


def claim_contrastive(res: Path, choice: dict[str, str]) -> dict:
    dpo, lb = setting(res, choice["dpo"]), setting(res, choice["tasft_lb"])
    vs_sft = paired_points(res, [dpo["name"], lb["name"]], "test")
    if len(vs_sft) < 2:
        raise Waiting(f"{dpo['name']}, {lb['name']} or sft (test rows)")
    d, t = vs_sft[dpo["name"]], vs_sft[lb["name"]]
    costlier = d["ce_ci"][0] > t["ce_ci"][1]
    harm = compare(dpo, lb, "harmful")
    verdict = "reproduced" if costlier and harm != LOWER else "not reproduced"
    ci = lambda p: f"{p['ce']:+.3f} [{p['ce_ci'][0]:+.3f}, {p['ce_ci'][1]:+.3f}]"  # noqa: E731
    reading = (f"benign test CE minus SFT's: DPO {ci(d)}, TA-SFT LB {ci(t)}"
               f"{' (DPO costlier, intervals apart)' if costlier else ''}; harmful DPO {rate_text(dpo)} "
               f"vs TA-SFT LB {rate_text(lb)}: DPO {harm}")
    return {"verdict": verdict, "reading": reading, "figures": {
        "ce_minus_sft": {"dpo": {"diff": d["ce"], "ci": d["ce_ci"]},
                         "tasft_lb": {"diff": t["ce"], "ci": t["ce_ci"]}},
        "harmful": harm,
        "benign_proxies": {n: benign_proxies(res, n) for n in (dpo["name"], lb["name"], "sft")}}}


CLAIMS = {"1 bounded EMD beats NLL ascent and unlikelihood at equal CE": "bounded",
          "2 data efficiency against SafeInstr": "efficiency",
          "3 no over-alignment": "overalignment",
          "4 the lower bound is enough": "exact",
          "5 contrastive data costs language ability": "contrastive"}


# the settings each claim's verdict reads (SFT where the verdict compares with it)
VERDICT_READS = {"bounded": ("tasft_lb", "nll_ascent", "unlikelihood"),
                 "efficiency": ("tasft_lb", "safeinstr"),
                 "overalignment": ("sft", *METHODS),
                 "exact": ("tasft_lb", "tasft_exact"),
                 "contrastive": ("sft", "dpo", "tasft_lb")}


def seeds_to_come(res: Path, names: list[str], families: dict) -> list[str]:
    """The planned seed runs (NAME_s1, NAME_s2 in the study's model list) of these settings that
    have no test result yet: until they have, a verdict rests on seed 0 alone."""
    return [run for n in names for run in (f"{n}_s1", f"{n}_s2")
            if run in families and test_figures(res, run) is None]


def read_claims(res: Path, choice: dict[str, str], families: dict, rule_lb: str) -> dict[str, dict]:
    """Every claim under one choice of settings (method -> model name). A verdict read before
    the seeds it will average over are tested carries `provisional`: those seed runs."""
    run = {"bounded": lambda: claim_bounded(res, choice, families),
           "efficiency": lambda: claim_efficiency(res, choice, families, rule_lb),
           "overalignment": lambda: claim_overalignment(res, choice),
           "exact": lambda: claim_exact(res, choice),
           "contrastive": lambda: claim_contrastive(res, choice)}
    out = {}
    for title, key in CLAIMS.items():
        try:
            out[title] = run[key]()
        except Waiting as e:
            out[title] = {"verdict": "waiting", "reading": f"waiting for test/ of {e}", "figures": {}}
            continue
        if out[title]["verdict"] != "not testable here":
            names = [choice.get(m, m) for m in VERDICT_READS[key] if m in choice or m == "sft"]
            if pending := seeds_to_come(res, names, families):
                out[title]["provisional"] = pending
    return out


# ---------------------------------------------------------------------------------------------
# The rules, the files


def choices(res: Path, families: dict, sel: dict) -> dict[str, dict[str, str]]:
    """Rule name -> method -> chosen model: the selection's rule (with the exact-EMD choice),
    then each alternative of amendment 3 among the validated settings."""
    rule = {f: sel[f]["name"] for f in (*METHODS, "tasft_exact") if isinstance(sel.get(f), dict)}
    out = {"the rule": rule}
    rows = sensitivity_rows(res, families)
    if "sft" not in rows:
        return out
    ref, strict = rows["sft"]["point"]["ce"], strict_limits(rows)
    for f in METHODS:
        names = [m for m, (fam, _) in families.items() if fam == f and m in rows]
        if not names:
            continue
        for alt, name in _alternatives(rows, names, families, ref, strict).items():
            if alt != "rule" and name != "none eligible":
                out.setdefault(alt, {k: v for k, v in rule.items() if k == "tasft_exact"})[f] = name
    return {k: v for k, v in out.items() if all(f in v for f in METHODS)}


def inputs_digest(res: Path, names: list[str]) -> str:
    return files_digest(res, names, INPUTS + ("judged_benign_val.jsonl", "val_eval.json",
                                              "judged_harmful_val.jsonl"),
                        extra=("selection.json", LABELCHECK, *LABELCHECK_TESTS))


def table(claims: dict[str, dict[str, dict]]) -> str:
    lines = ["| claim | rule | settings | verdict | reading |", "|---|---|---|---|---|"]
    for rule, got in claims.items():
        for title, c in got["claims"].items():
            verdict = f"**{c['verdict']}**" + (
                f" (provisional: seed runs {', '.join(c['provisional'])} not tested yet)"
                if c.get("provisional") else "")
            lines.append(f"| {title} | {rule} | {got['settings']} | {verdict} | {c['reading']} |")
    return "\n".join(lines)


def label_check_text(res: Path, families: dict, out: dict) -> str | None:
    """What the blind label check says of the settings the claims read (SFT and every rule's
    choices): those whose judged rate is outside the hand-labelled interval, with both rates,
    and those it did not cover; None before its report or any claim."""
    rows = labelcheck_rows(res)
    if rows is None or not out:
        return None
    names = sorted({"sft", *(n for got in out.values() for n in got["choice"].values())})
    a = rows["all"]
    text = (f"**The judge against blind hand labels** (validation replies, {a['n']} rows of "
            f"{len(rows) - 1} models; docs/study/tables.md, \"labelcheck\"): judged harmful "
            f"{a['judge']['rate']:.3f}, hand-labelled {a['hand']['rate']:.3f} ({a['diff']:+.3f}), "
            f"AUC {a['auc']:.3f}.")
    flagged = [n for n in names if n in rows and rows[n]["outside"]]
    if flagged:
        text += " Judged rate outside the hand-labelled 95% interval, among the settings read here: " + \
            "; ".join(f"{label_of(n, families)} (judged {rows[n]['judge']['rate']:.3f}, hand "
                      f"{rows[n]['hand']['rate']:.3f} [{rows[n]['hand']['wilson'][0]:.3f}, "
                      f"{rows[n]['hand']['wilson'][1]:.3f}])" for n in flagged) + \
            ": a verdict that turns on its judged test rate is to be read with its hand labels."
    else:
        text += " No setting read here has its judged rate outside its hand-labelled interval."
    if unchecked := [n for n in names if n not in rows]:
        text += " Not covered by the check: " + ", ".join(label_of(n, families) for n in unchecked) + "."
    return text


# the paired blind label checks of test replies: report -> (the claim it serves, its amendment)
LABELCHECK_TESTS = {"labelcheck_test/report.json": ("claim 1", 7),
                    "labelcheck_c5/report.json": ("claim 5", 8),
                    "labelcheck_c4/report.json": ("claim 4", 8),
                    "labelcheck_c2/report.json": ("claim 2", 8)}


def paired_check_text(res: Path, families: dict) -> str | None:
    """Amendments 7-8's paired blind label checks of test replies whose reports exist, one
    paragraph each: each model's hand-labelled and judged rate on the shared prompts, then
    every pair's paired differences (hand and judged); None before any report."""
    paras = []
    for rel, (claim, amendment) in LABELCHECK_TESTS.items():
        f = res / rel
        if not f.exists():
            continue
        rep = json.loads(f.read_text())
        if "paired" not in rep:
            raise EvalError(f"{f}: not a paired report (`label_check pool --paired`)")
        n = rep["paired"]["n_prompts"]
        rate = lambda r: f"{r['k']} / {r['n']} = {r['rate']:.3f}"  # noqa: E731
        per = "; ".join(f"{label_of(m, families)} hand {rate(c['hand_harmful'])}, judged "
                        f"{rate(c['judge_harmful'])}" for m, c in rep["per_model"].items())
        ci = lambda d: f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"  # noqa: E731
        diffs = "; ".join(
            f"{' minus '.join(label_of(m, families) for m in what.split(' - '))}: hand "
            f"{ci(d['hand'])}, judged {ci(d['judge'])}" for what, d in rep["paired"]["differences"].items())
        paras.append(f"**Test replies on blind hand labels, paired, for {claim}** (amendment {amendment}: "
                     f"the same {n} test harmful prompts for each model; docs/study/{rel}): {per}. "
                     f"Paired differences in harmful rate (95% paired bootstrap): {diffs}.")
    return "\n\n".join(paras) if paras else None


def write(res: Path, families: dict, sel: dict, update: Path | None = None) -> dict:
    """res/claims.json and res/claims.md (and the study_claims region of `update`), once the
    selection is complete; returns the claims by rule."""
    out = {}
    if sel.get("complete"):
        rule_lb = sel["tasft_lb"]["name"]
        for rule, choice in choices(res, families, sel).items():
            settings = ", ".join(display(choice[f], *families[choice[f]]) for f in METHODS)
            out[rule] = {"choice": choice, "settings": settings,
                         "claims": read_claims(res, choice, families, rule_lb)}
    digest = inputs_digest(res, list(families))
    body = table(out) if out else "No claims yet: the selection is not complete."
    if (note := label_check_text(res, families, out)) is not None:
        body += "\n\n" + note
    if (paired := paired_check_text(res, families)) is not None:
        body += "\n\n" + paired
    atomic_write_text(res / "claims.json", json.dumps({"digest": digest, "rules": out,
                                                          "label_check": note,
                                                          "label_check_test": paired}, indent=1) + "\n")
    atomic_write_text(res / "claims.md", f"<!-- inputs digest: {digest} -->\n# The paper's claims "
                      "(written by experiments/study_claims.py; do not edit by hand)\n\n" + body + "\n")
    if update is not None:
        atomic_write_text(update, replace_region(update.read_text(), None, body, str(update),
                                                 tag="study_claims"))
    return out


def is_current(res: Path, families: dict) -> bool:
    f = res / "claims.json"
    return f.exists() and json.loads(f.read_text()).get("digest") == inputs_digest(res, list(families))


def main(argv: list[str] | None = None) -> int:
    import study  # the model list (experiments/ is on sys.path when run as a script)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(study.REPO / "docs" / "study"))
    ap.add_argument("--update", default=None, help="a Markdown file whose study_claims region to refresh")
    args = ap.parse_args(argv)
    res = Path(args.results)
    sel = json.loads((res / "selection.json").read_text()) if (res / "selection.json").exists() else {}
    fams = study.families(study.sweep_models() + study.selected_models(sel))
    write(res, fams, sel, Path(args.update) if args.update else None)
    print((res / "claims.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
