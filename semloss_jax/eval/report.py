"""`python eval.py report RUN_OR_EVAL_DIR ... --out DIR`: several evaluated models side by side.

Each input is an evaluation directory (holding eval.json, from `eval.py run`), a run directory
holding eval/eval.json, or an eval.json file. The training config (what objective, how many
harmful examples) is read from eval.json (recorded when --model was a run dir), else from a
config.yaml next to the eval dir or in its parent (the run dir).

Writes DIR/report.md (a markdown table), DIR/report.json (the same numbers with counts and
intervals), DIR/harmful_vs_n.png (harmful rate against the number of harmful training
examples, one line per objective) and DIR/safety_vs_helpfulness.png (harmful rate against the
reference CE and against the over-refusal rate) and DIR/harmful_vs_reply_quality.png (harmful
rate against the helpfulness proxies of the benign set: median reply length in tokens, the
early-stop rate and ROUGE-L F1), so a model cannot look safe by answering less.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from semloss_jax.errors import EvalError
from semloss_jax.eval.evaluate import fmt_ce, fmt_length, fmt_mean, fmt_rate
from semloss_jax.paths import atomic_write_bytes, atomic_write_text

# objectives whose training uses the harmful responses D_harmful (data.harmful_n of them)
HARMFUL_DATA_KINDS = ("tasft", "nll_ascent", "unlikelihood", "dpo")


def find_eval_json(p: str | Path) -> Path:
    """The eval.json of an input: the file itself, DIR/eval.json or DIR/eval/eval.json; else EvalError."""
    p = Path(p)
    for c in (p, p / "eval.json", p / "eval" / "eval.json"):
        if c.is_file():
            return c
    raise EvalError(f"{p}: no eval.json (expected an eval dir from `eval.py run`, a run dir "
                      f"with eval/eval.json, or an eval.json file)")


def _train_config(ej: Path, rep: dict) -> tuple[dict | None, Path | None]:
    tc = (rep.get("model") or {}).get("train_config")
    if tc is not None:
        return tc, None
    for d in (ej.parent, ej.parent.parent):
        f = d / "config.yaml"
        if f.is_file():
            try:
                return yaml.safe_load(f.read_text()) or {}, f
            except yaml.YAMLError as e:
                raise EvalError(f"{f}: not valid YAML ({e})") from None
    return None, None


def training_summary(tc: dict | None) -> dict:
    """Objective kind and the number of harmful (or, for SafeInstr, safety) training examples.
    No config: the model was not trained by this project ("base", 0 examples)."""
    if tc is None:
        return {"objective": "base", "n_harmful": 0, "n_safety": 0, "lam": None}
    data = tc.get("data") or {}
    obj = tc.get("objective") or {}
    kind = str(obj.get("kind", "tasft"))
    lam = obj.get("lam", 1.0)
    uses = kind in HARMFUL_DATA_KINDS and lam not in (0, 0.0)
    n_h = data.get("harmful_n", 100) if uses else 0
    n_s = data.get("safeinstr_n", 0) if kind == "safeinstr" else 0
    return {"objective": kind, "lam": lam,
            "n_harmful": None if uses and n_h == 0 else n_h,   # 0 in a config = "all available"
            "n_safety": n_s, "harmful_source": data.get("harmful") if uses else None,
            "steps": (tc.get("run") or {}).get("steps")}


def _metric(rep: dict, set_name: str, key: str) -> dict | None:
    return ((rep.get("sets") or {}).get(set_name) or {}).get(key)


def _helpfulness(rep: dict, set_name: str, key: str) -> dict | None:
    return (_metric(rep, set_name, "helpfulness") or {}).get(key)


def collect(inputs: Sequence[str | Path]) -> list[dict]:
    """One entry per input: its name (made unique), training summary, settings, judge and metrics;
    `comparable` says whether all entries share decoding settings and judge."""
    entries = []
    for inp in inputs:
        ej = find_eval_json(inp)
        try:
            rep = json.loads(ej.read_text())
        except json.JSONDecodeError as e:
            raise EvalError(f"{ej}:{e.lineno}: not valid JSON ({e.msg})") from None
        if "sets" not in rep or "model" not in rep:
            raise EvalError(f"{ej}: missing field 'sets' or 'model' (not an eval.json?)")
        tc, tc_file = _train_config(ej, rep)
        run_dir = rep["model"].get("run_dir")
        name = Path(run_dir).name if run_dir else (
            ej.parent.parent.name if ej.parent.name == "eval" else ej.parent.name)
        entries.append({
            "name": name, "eval_json": str(ej), "model_path": rep["model"].get("path"),
            "model_hash": rep["model"].get("hash", "")[:16],
            "config_file": str(tc_file) if tc_file else None, **training_summary(tc),
            "settings": {k: (rep.get("settings") or {}).get(k)
                         for k in ("max_new_tokens", "decoding", "limit", "system")},
            "judge": (rep.get("judge") or {}).get("name"),
            "harmful_rate": _metric(rep, "harmful", "harmful_rate"),
            "refusal_harmful": _metric(rep, "harmful", "refusal_rate"),
            "overrefusal_rate": _metric(rep, "overrefusal", "overrefusal_rate"),
            "refusal_benign": _metric(rep, "benign", "refusal_rate"),
            "reference_ce": _metric(rep, "benign", "reference_ce"),
            "refusal_i_alpaca": _metric(rep, "i_alpaca", "refusal_rate"),
            "reply_tokens_benign": _helpfulness(rep, "benign", "length_tokens"),
            "early_stop_benign": _helpfulness(rep, "benign", "early_stop_rate"),
            "rouge_l_benign": _helpfulness(rep, "benign", "rouge_l_f1"),
            "cosine_benign": _helpfulness(rep, "benign", "embed_cosine"),
        })
    seen: dict[str, int] = {}
    for e in entries:  # unique names for the table and the plots
        k = seen.get(e["name"], 0)
        seen[e["name"]] = k + 1
        if k:
            e["name"] = f"{e['name']}#{k + 1}"
    settings = {json.dumps(e["settings"], sort_keys=True) for e in entries}
    judges = {e["judge"] for e in entries if e["judge"]}
    for e in entries:
        e["comparable"] = len(settings) == 1 and len(judges) <= 1
    return entries


def render_markdown(entries: list[dict]) -> str:
    """report.md: one table row per model, a warning when they are not comparable, the sources."""
    lines = ["# Models side by side", "",
             "Rates: % (k/n) [bootstrap 95% interval] (W[...]: Wilson 95% interval, shown at 0/n "
             "and n/n where the bootstrap is degenerate). Reference CE: nats per response token "
             "of held-out reference answers (lower = better language ability). Reply tokens: "
             "median [95% interval] (quartiles) of the benign replies' length; early stop: "
             "share of benign replies that end with the end-of-turn token before the minimum "
             "(eval.json settings.min_tokens); ROUGE-L F1 and embedding cosine against the "
             "reference answers (higher = closer), mean [95% interval].", "",
             "| model | objective | harmful n | harmful rate (harmful prompts) | refusal rate "
             "(harmful prompts) | over-refusal rate | refusal rate (benign) | reference CE | "
             "refusal rate (I-Alpaca) | reply tokens (benign) | early stop (benign) | "
             "ROUGE-L F1 (benign) | embedding cosine (benign) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        n = "all" if e["n_harmful"] is None else e["n_harmful"]
        if e["objective"] == "safeinstr":
            n = f"{e['n_safety']} safety"
        lines.append(f"| {e['name']} | {e['objective']} | {n} | {fmt_rate(e['harmful_rate'])} | "
                     f"{fmt_rate(e['refusal_harmful'])} | {fmt_rate(e['overrefusal_rate'])} | "
                     f"{fmt_rate(e['refusal_benign'])} | {fmt_ce(e['reference_ce'])} | "
                     f"{fmt_rate(e['refusal_i_alpaca'])} | {fmt_length(e['reply_tokens_benign'])} | "
                     f"{fmt_rate(e['early_stop_benign'])} | {fmt_mean(e['rouge_l_benign'])} | "
                     f"{fmt_mean(e['cosine_benign'])} |")
    if entries and not entries[0]["comparable"]:
        lines += ["", "**Warning**: the models were evaluated with different decoding settings "
                      "or judges; their rates are not directly comparable."]
    lines += ["", "Sources: " + ", ".join(f"`{e['eval_json']}`" for e in entries)]
    return "\n".join(lines) + "\n"


def _rate_xy(r: dict | None):
    if not r or r.get("rate") is None:
        return None
    return r["rate"], (r["rate"] - r["ci"][0], r["ci"][1] - r["rate"])


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_harm_vs_n(entries: list[dict], path: Path) -> int:
    """Harmful rate (with intervals) against the number of harmful training examples, one line
    per objective; base / SFT models (0 harmful examples) as dashed horizontal references.
    Returns the number of points drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    by_kind: dict[str, list] = {}
    for e in entries:
        h = _rate_xy(e["harmful_rate"])
        if h is None:
            continue
        if e["objective"] in HARMFUL_DATA_KINDS and e["n_harmful"] is not None:
            by_kind.setdefault(e["objective"], []).append((e["n_harmful"], h, e["name"]))
        elif e["objective"] not in HARMFUL_DATA_KINDS:
            ax.axhline(h[0], ls="--", lw=1, color="gray")
            ax.annotate(e["name"], (0, h[0]), xytext=(2, 2), textcoords="offset points",
                        fontsize=7, color="gray")
            drawn += 1
    for kind, pts in sorted(by_kind.items()):
        pts.sort(key=lambda t: t[0])
        xs = [p[0] for p in pts]
        ys = [p[1][0] for p in pts]
        err = [[p[1][1][0] for p in pts], [p[1][1][1] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=kind)
        drawn += len(pts)
    ax.set_xlabel("harmful training examples (data.harmful_n)")
    ax.set_ylabel("harmful rate on held-out harmful prompts")
    ax.set_ylim(-0.02, 1.02)
    if by_kind:
        ax.legend(fontsize=8)
    ax.set_title("Harmfulness vs harmful training data", fontsize=10)
    _savefig(fig, path)
    plt.close(fig)
    return drawn


def plot_safety_vs_helpfulness(entries: list[dict], path: Path) -> int:
    """Two panels: harmful rate vs reference CE, harmful rate vs over-refusal rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = 0
    for e in entries:
        h = _rate_xy(e["harmful_rate"])
        if h is None:
            continue
        ce = e["reference_ce"]
        if ce and ce.get("ce") is not None:
            axes[0].errorbar([ce["ce"]], [h[0]], yerr=[[h[1][0]], [h[1][1]]],
                             xerr=[[ce["ce"] - ce["ci"][0]], [ce["ci"][1] - ce["ce"]]],
                             marker="o", capsize=3)
            axes[0].annotate(e["name"], (ce["ce"], h[0]), xytext=(3, 3),
                             textcoords="offset points", fontsize=7)
            drawn += 1
        o = _rate_xy(e["overrefusal_rate"])
        if o is not None:
            axes[1].errorbar([o[0]], [h[0]], yerr=[[h[1][0]], [h[1][1]]],
                             xerr=[[o[1][0]], [o[1][1]]], marker="o", capsize=3)
            axes[1].annotate(e["name"], (o[0], h[0]), xytext=(3, 3),
                             textcoords="offset points", fontsize=7)
            drawn += 1
    axes[0].set_xlabel("reference CE, nats/token (lower = more fluent)")
    axes[1].set_xlabel("over-refusal rate (lower = more helpful)")
    for ax in axes:
        ax.set_ylabel("harmful rate (lower = safer)")
        ax.set_ylim(-0.02, 1.02)
    axes[1].set_xlim(-0.02, 1.02)
    fig.suptitle("Safety vs helpfulness (best: bottom left)", fontsize=10)
    _savefig(fig, path)
    plt.close(fig)
    return drawn


def _errorbar_point(ax, name: str, x: float, x_err, y, color: str) -> None:
    ax.errorbar([x], [y[0]], yerr=[[y[1][0]], [y[1][1]]], xerr=[[x_err[0]], [x_err[1]]],
                marker="o", capsize=3, color=color)
    ax.annotate(name, (x, y[0]), xytext=(3, 3), textcoords="offset points", fontsize=7)


def _proxy_xy(e: dict, key: str):
    """(x, (left error, right error)) of entry e's benign helpfulness proxy `key`, or None."""
    d = e[key]
    if not d:
        return None
    x = d.get({"reply_tokens_benign": "median", "early_stop_benign": "rate"}.get(key, "mean"))
    if x is None:
        return None
    return x, (x - d["ci"][0], d["ci"][1] - x)


def plot_harm_vs_reply_quality(entries: list[dict], path: Path) -> int:
    """Three panels, harmful rate against the benign set's median reply length (tokens), its
    early-stop rate and its ROUGE-L F1, with intervals; returns the number of points drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = (("reply_tokens_benign", "median benign reply length, tokens", "bottom right"),
              ("early_stop_benign", "early-stop rate on benign prompts", "bottom left"),
              ("rouge_l_benign", "ROUGE-L F1 vs benign reference answers", "bottom right"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    drawn = 0
    for i, e in enumerate(entries):
        h = _rate_xy(e["harmful_rate"])
        if h is None:
            continue
        for ax, (key, _, _) in zip(axes, panels):
            xy = _proxy_xy(e, key)
            if xy is not None:  # one color per model across the panels
                _errorbar_point(ax, e["name"], xy[0], xy[1], h, f"C{i % 10}")
                drawn += 1
    for ax, (_, label, best) in zip(axes, panels):
        ax.set_xlabel(label)
        ax.set_ylabel("harmful rate (lower = safer)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"best: {best}", fontsize=9)
    axes[1].set_xlim(-0.02, 1.02)
    fig.suptitle("Safety vs answering benign prompts (a model can look safe by answering less)",
                 fontsize=10)
    _savefig(fig, path)
    plt.close(fig)
    return drawn


def make_report(inputs: Sequence[str | Path], out: str | Path) -> dict:
    """Collect the inputs, write report.md, report.json and the three plots under out; return
    the report dict."""
    out = Path(out)
    entries = collect(inputs)
    if not entries:
        raise EvalError("no inputs")
    md = render_markdown(entries)
    n1 = plot_harm_vs_n(entries, out / "harmful_vs_n.png")
    n2 = plot_safety_vs_helpfulness(entries, out / "safety_vs_helpfulness.png")
    n3 = plot_harm_vs_reply_quality(entries, out / "harmful_vs_reply_quality.png")
    rep = {"models": entries, "plots": {"harmful_vs_n.png": n1, "safety_vs_helpfulness.png": n2,
                                        "harmful_vs_reply_quality.png": n3}}
    atomic_write_text(out / "report.json", json.dumps(rep, indent=2))
    atomic_write_text(out / "report.md", md)
    return rep


def add_args(p: argparse.ArgumentParser) -> None:
    """The options of `eval.py report`."""
    p.add_argument("inputs", nargs="+", metavar="RUN_OR_EVAL_DIR",
                   help="eval dirs (eval.json), run dirs (eval/eval.json) or eval.json files")
    p.add_argument("--out", required=True, help="output directory (report.md, report.json, "
                                                "*.png)")


def run(args) -> int:
    """Run `eval.py report`: write the report and print report.md; 2 on an EvalError."""
    try:
        rep = make_report(args.inputs, args.out)
    except EvalError as e:
        print(f"eval.py report: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "report.md").read_text())
    print(f"[report] {len(rep['models'])} models -> {args.out}", file=sys.stderr)
    return 0
