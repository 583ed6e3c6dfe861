"""The study's plots, drawn from its committed results only (docs/study/).

Any clone redraws them without a run folder:

    frontier_val.png   validation harmful rate (judge v2, 95% Wilson interval) against benign
                       validation reference CE (95% bootstrap interval), one line per method
                       across its sweep, base and SFT as single points, the selection's CE bound
                       (1.05 x SFT) dashed, each method's choice ringed once select has run;
                       beside it the degenerate share of the same replies against the same CE
                       (a model can look safe by breaking its replies), and the share of the
                       benign validation instructions it refuses (or by refusing everything)
    frontier_val_paired.png
                       the same frontier as differences from SFT on the same prompts: harmful
                       rate minus SFT's and benign CE minus SFT's, each with its paired bootstrap
                       interval (the prompt-to-prompt spread that both models share cancels, so
                       a gap that the unpaired intervals hide shows); SFT at (0, 0), the CE bound
                       at +5% of SFT's CE
    harm_vs_n_val.png  the data-efficiency claim: validation harmful rate against the number of
                       training examples of the unsafe side, TA-SFT LB at its chosen λ (N harmful
                       replies, once the selection's N-efficiency models exist) beside SafeInstr
                       (N refusals, its sweep)
    frontier_test.png, frontier_test_paired.png, harm_vs_n_test.png
                       the same on the TEST split once test/ parts exist (harmful prompts,
                       benign test reference CE), the frontier with a third panel: the
                       over-refusal rate on the over-refusal prompts against the same CE. The
                       dashed line there is 1.05 x SFT's test CE, a guide only: the rule read
                       validation
    curves.png         training curves: benign CE and harmful NLL per step (moving mean over 10
                       steps), one line per trained model, coloured by method

The study command redraws them when an input changes (the `plots` part); by hand:

    python experiments/study_plots.py [--results docs/study]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

from semloss_jax.eval.metrics import wilson_interval
from semloss_jax.paths import atomic_write_bytes, atomic_write_text, read_jsonl_objects

FILES = ("frontier_val.png", "frontier_val_paired.png", "harm_vs_n_val.png", "curves.png",
         "frontier_test.png", "frontier_test_paired.png", "harm_vs_n_test.png")
COLORS = {"tasft_lb": "tab:blue", "tasft_exact": "tab:cyan", "nll_ascent": "tab:orange",
          "unlikelihood": "tab:green", "dpo": "tab:red", "safeinstr": "tab:purple",
          "sft": "black", "base": "gray"}


def point(res: Path, name: str) -> dict | None:
    """One model's validation figures from its committed files, or None while they are missing:
    harmful k of n (judged harmful_val) with its Wilson interval, the degenerate share of the
    same replies with its interval, benign CE with its interval, the count of each judged label,
    and (when its judged benign_val rows are committed) the share of the benign instructions it
    refused (refusal detector) with its interval."""
    d = res / "models" / name
    judged, ev = d / "judged_harmful_val.jsonl", d / "val_eval.json"
    if not (judged.exists() and ev.exists()):
        return None
    rows = read_jsonl_objects(judged)
    ce = json.loads(ev.read_text())["sets"]["benign_val"]["reference_ce"]
    k, n = sum(int(r["harmful"]) for r in rows), len(rows)
    dk = sum(r.get("label") == "degenerate" for r in rows)
    out = {"name": name, "k": k, "n": n, "rate": k / n, "wilson": list(wilson_interval(k, n, 0.95)),
           "degenerate": dk / n, "degenerate_wilson": list(wilson_interval(dk, n, 0.95)),
           "ce": ce["ce"], "ce_ci": ce["ci"], "classes": dict(Counter(r.get("label") for r in rows))}
    if (benign := d / "judged_benign_val.jsonl").exists():
        b = read_jsonl_objects(benign)
        rk = sum(bool(r["refusal"]) for r in b)
        out |= {"benign_refusal": rk / len(b), "benign_refused": rk, "benign_n": len(b),
                "benign_refusal_wilson": list(wilson_interval(rk, len(b), 0.95))}
    return out


def test_figures(res: Path, name: str) -> dict | None:
    """A model's TEST figures from its committed test_eval.json (judge v2, as the test part ran
    it), or None while it is missing: the one reader of that file's field names. Each value is
    eval.json's own summary (rates: k, n, rate, wilson; the CE: ce, ci)."""
    f = res / "models" / name / "test_eval.json"
    if not f.exists():
        return None
    sets = json.loads(f.read_text())["sets"]
    cr = sets["harmful"]["class_rates"]
    return {"harmful": cr["harmful"], "degenerate": cr["degenerate"],
            "overrefusal": sets["overrefusal"]["overrefusal_rate"],
            "benign_refusal": sets["benign"]["refusal_rate"], "ce": sets["benign"]["reference_ce"],
            "i_alpaca_refusal": sets["i_alpaca"]["refusal_rate"]}


def test_point(res: Path, name: str) -> dict | None:
    """One model's test_figures as a plot point, or None while they are missing: the harmful
    rate and degenerate share of the harmful test replies, the over-refusal rate, each with its
    Wilson interval; the benign test CE with its interval."""
    t = test_figures(res, name)
    if t is None:
        return None
    h, d, o = t["harmful"], t["degenerate"], t["overrefusal"]
    return {"name": name, "k": h["k"], "n": h["n"], "rate": h["rate"], "wilson": h["wilson"],
            "degenerate": d["rate"], "degenerate_wilson": d["wilson"],
            "overrefusal": o["rate"], "overrefusal_wilson": o["wilson"],
            "ce": t["ce"]["ce"], "ce_ci": t["ce"]["ci"]}


def files_digest(res: Path, names: list[str], files: tuple[str, ...],
                 extra: tuple[str, ...] = ()) -> str:
    """A sha256 over each model's `files` (by name, "-" for a missing one), then over the study
    files `extra`: a part that draws from them is done while this is unchanged."""
    h = hashlib.sha256()
    for name in sorted(names):
        for f in files:
            p = res / "models" / name / f
            h.update(f"{name}/{f}:".encode())
            h.update(p.read_bytes() if p.exists() else b"-")
    for f in extra:
        p = res / f
        h.update(p.read_bytes() if p.exists() else b"-")
    return h.hexdigest()


def inputs_digest(res: Path, names: list[str]) -> str:
    """A digest of every file the plots read (the plots part is done while it is unchanged)."""
    return files_digest(res, names, ("judged_harmful_val.jsonl", "judged_benign_val.jsonl",
                                     "val_eval.json", "metrics.jsonl", "test_eval.json",
                                     "test_harmful_labels.jsonl", "test_benign_rows.jsonl"),
                        extra=("selection.json",))


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _errorbar(ax, p: dict, color: str, y: str = "rate", **kw) -> None:
    lo, hi = p["wilson" if y == "rate" else f"{y}_wilson"]
    ax.errorbar([p["ce"]], [p[y]], xerr=[[p["ce"] - p["ce_ci"][0]], [p["ce_ci"][1] - p["ce"]]],
                yerr=[[p[y] - lo], [hi - p[y]]], color=color, capsize=2, lw=0.8, **kw)


PANELS = {"rate": "harmful rate, {split} prompts (judge v2)",
          "degenerate": "degenerate share of the same replies (judge v2)",
          "overrefusal": "over-refusal rate, over-refusal prompts",
          "benign_refusal": "refusal rate, benign {split} instructions (refusal detector)"}
TITLES = {"degenerate": "...and how many of those replies are broken text",
          "overrefusal": "...and what it costs on prompts that only look harmful",
          "benign_refusal": "...and how often it refuses a benign instruction"}
SPLITS = {"val": "validation", "test": "test"}


XMAX_OVER_SFT = 1.5


def _on_axis(p: dict, xmax: float | None) -> dict:
    """p, or for a CE past xmax a copy placed on xmax (its CE kept as ce_off_axis)."""
    if xmax is None or p["ce"] <= xmax:
        return p
    return {**p, "ce": xmax, "ce_ci": [xmax, xmax], "ce_off_axis": p["ce"]}


def _by_family(points: dict[str, dict], families: dict[str, tuple[str, float | None]]
               ) -> dict[str, list[tuple[float, str, dict]]]:
    """The points grouped by method, each group sorted by its swept setting."""
    by_fam: dict[str, list] = {}
    for name, p in points.items():
        fam, setting = families[name]
        by_fam.setdefault(fam, []).append((setting if setting is not None else 0.0, name, p))
    return {fam: sorted(pts, key=lambda t: t[0]) for fam, pts in sorted(by_fam.items())}


def _draw_methods(ax, by_fam: dict[str, list[tuple[float, str, dict]]], chosen: set[str],
                  y: str) -> None:
    """One line per method through its sweep (x: p["ce"], y: p[y]) with both intervals, each
    point labelled by its setting, a point past the CE axis as a triangle with its CE written,
    each chosen model ringed."""
    for fam, pts in by_fam.items():
        color = COLORS.get(fam, "tab:brown")
        ax.plot([p["ce"] for _, _, p in pts], [p[y] for _, _, p in pts], "-o", color=color,
                label=fam, ms=4)
        for setting, name, p in pts:
            _errorbar(ax, p, color, y, fmt="none", alpha=0.5)
            label = name if fam in ("base", "sft") else f"{setting:g}"
            if "ce_off_axis" in p:
                ax.plot([p["ce"]], [p[y]], ">", ms=8, color=color)
                label += f" (CE {p['ce_off_axis']:+.1f})" if p.get("paired") else \
                    f" (CE {p['ce_off_axis']:.1f})"
            ax.annotate(label, (p["ce"], p[y]), textcoords="offset points", fontsize=7,
                        xytext=(-60, 6) if "ce_off_axis" in p else (3, 3), color=color)
            if name in chosen:
                ax.plot([p["ce"]], [p[y]], "o", ms=11, mfc="none", mec=color, mew=1.5)


def plot_frontier(points: dict[str, dict], families: dict[str, tuple[str, float | None]],
                  chosen: set[str], path: Path, split: str = "val",
                  panels: tuple[str, ...] = ("rate", "degenerate")) -> int:
    """frontier_{split}.png (see the module docstring), one panel per key of `panels` against
    the benign CE; returns the number of points drawn. The CE axis ends at XMAX_OVER_SFT x
    SFT's CE: a model past it (a diverged run) sits on that edge as a triangle, its CE written
    beside it, so that it does not squeeze the models that matter into one corner."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    word = SPLITS[split]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), sharex=True)
    xmax = XMAX_OVER_SFT * points["sft"]["ce"] if "sft" in points else None
    points = {n: _on_axis(p, xmax) for n, p in points.items()}
    by_fam = _by_family(points, families)
    for ax, y in zip(axes, panels):
        _draw_methods(ax, by_fam, chosen, y)
        if "sft" in points:
            bound = 1.05 * points["sft"]["ce"]
            note = "CE bound (1.05 x SFT)" if split == "val" else "1.05 x SFT's test CE (guide)"
            ax.axvline(bound, ls="--", lw=1, color="gray")
            ax.annotate(note, (bound, 0.02), fontsize=7, color="gray", rotation=90, va="bottom",
                        ha="right")
        ax.set_xlabel(f"benign {word} reference CE, nats/token (lower = more fluent)")
        ax.set_ylabel(PANELS[y].format(split=word))
        ax.set_ylim(-0.02, 1.02)
        if any("ce_off_axis" in p for p in points.values()):
            ax.set_xlim(right=xmax * 1.03)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set_title(f"{word.capitalize()} frontier ({len(points)} models; best: bottom left)",
                      fontsize=10)
    for ax, y in zip(axes[1:], panels[1:]):
        ax.set_title(TITLES[y], fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return len(points)


PAIRED_FILES = {"val": ("judged_harmful_val.jsonl", "judged_benign_val.jsonl"),
                "test": ("test_harmful_labels.jsonl", "test_benign_rows.jsonl")}


def _rows_by_id(path: Path) -> dict[str, dict] | None:
    if not path.exists():
        return None
    rows = read_jsonl_objects(path)
    return {r["id"]: r for r in rows}


def paired_points(res: Path, names: list[str], split: str = "val", ref: str = "sft") -> dict[str, dict]:
    """Per model whose harmful and benign rows of `split` are committed: its harmful rate and
    benign reference CE as differences from model `ref`'s (SFT's) on the SAME prompts, each
    with its paired bootstrap interval (metrics.paired_rate_difference, paired_ce_difference),
    as plot points (ce, ce_ci: the CE difference; rate, wilson: the harmful-rate difference).
    Both models' intervals share the prompt-to-prompt spread, which these cancel. Empty
    without ref's rows; an EvalError names the file whose prompts are not ref's."""
    from semloss_jax.errors import EvalError
    from semloss_jax.eval.metrics import paired_ce_difference, paired_rate_difference
    harm_f, ben_f = PAIRED_FILES[split]
    ref_h, ref_b = (_rows_by_id(res / "models" / ref / f) for f in (harm_f, ben_f))
    if ref_h is None or ref_b is None:
        return {}
    out = {}
    for name in names:
        d = res / "models" / name
        h, b = _rows_by_id(d / harm_f), _rows_by_id(d / ben_f)
        if h is None or b is None:
            continue
        for rows, ref_rows, f in ((h, ref_h, harm_f), (b, ref_b, ben_f)):
            if rows.keys() != ref_rows.keys():
                raise EvalError(f"{d / f}: its prompts are not those of {ref} "
                                f"({len(rows.keys() ^ ref_rows.keys())} ids in one file only): no paired "
                                "difference")
        ids_h, ids_b = list(ref_h), list(ref_b)
        rate = paired_rate_difference([float(h[i]["harmful"]) for i in ids_h],
                                      [float(ref_h[i]["harmful"]) for i in ids_h])
        ce = paired_ce_difference(*([float(rows[i][k]) for i in ids_b]
                                    for rows in (b, ref_b) for k in ("ref_nll", "ref_tokens")))
        out[name] = {"name": name, "paired": True, "rate": rate["diff"], "wilson": rate["ci"],
                     "ce": ce["diff"], "ce_ci": ce["ci"], "n_harmful": rate["n_examples"],
                     "n_benign": ce["n_examples"]}
    return out


def plot_paired_frontier(points: dict[str, dict], families: dict[str, tuple[str, float | None]],
                         chosen: set[str], path: Path, sft_ce: float, split: str = "val") -> int:
    """frontier_{split}_paired.png: the frontier as differences from SFT on the same prompts
    (paired_points), so that a gap the unpaired intervals of frontier_{split}.png hide shows;
    SFT sits at (0, 0). The dashed line is the selection's CE bound, 0.05 x SFT's CE over it
    (on test a guide only). A CE difference past XMAX_OVER_SFT - 1 times SFT's CE sits on the
    edge as a triangle. Returns the number of points drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    word = SPLITS[split]
    xmax = (XMAX_OVER_SFT - 1.0) * sft_ce
    points = {n: _on_axis(p, xmax) for n, p in points.items()}
    fig, ax = plt.subplots(figsize=(7, 5))
    _draw_methods(ax, _by_family(points, families), chosen, "rate")
    bound = 0.05 * sft_ce
    ax.axvline(bound, ls="--", lw=1, color="gray")
    ax.axhline(0.0, ls=":", lw=1, color="gray")
    ax.annotate("CE bound (+5% of SFT's CE)" if split == "val" else "+5% of SFT's test CE (guide)",
                (bound, ax.get_ylim()[0]), fontsize=7, color="gray", rotation=90, va="bottom",
                ha="right")
    if any("ce_off_axis" in p for p in points.values()):
        ax.set_xlim(right=xmax * 1.05)
    ax.set_xlabel(f"benign {word} reference CE minus SFT's, nats/token (paired 95%)")
    ax.set_ylabel(f"harmful rate minus SFT's, {word} prompts (paired 95%)")
    ax.set_title(f"{word.capitalize()} frontier against SFT on the same prompts "
                 f"({len(points)} models; best: bottom left)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)
    plt.close(fig)
    return len(points)


def plot_harm_vs_n(series: dict[str, list[tuple[int, dict]]], path: Path, split: str = "val",
                   sft: dict | None = None) -> int:
    """harm_vs_n_{split}.png: one line per series (label -> [(N, point)], coloured by the
    method its label starts with) of the harmful rate against N, SFT's rate (no data of the
    unsafe side) dotted with its interval shaded; returns the points drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    drawn = 0
    for label, points in series.items():
        pts = sorted(points, key=lambda t: t[0])
        color = COLORS["safeinstr" if label.startswith("SafeInstr") else "tasft_lb"]
        err = [[p["rate"] - p["wilson"][0] for _, p in pts], [p["wilson"][1] - p["rate"] for _, p in pts]]
        ax.errorbar([n for n, _ in pts], [p["rate"] for _, p in pts], yerr=err, marker="o",
                    capsize=3, color=color, label=label)
        drawn += len(pts)
    if sft is not None:
        ax.axhline(sft["rate"], ls=":", color=COLORS["sft"], lw=1, label="SFT (N = 0)")
        ax.axhspan(*sft["wilson"], color=COLORS["sft"], alpha=0.08, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("training examples of the unsafe side (N harmful replies; SafeInstr: N refusals)")
    ax.set_ylabel(f"harmful rate, {SPLITS[split]} prompts (judge v2)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return drawn


def n_series(points: dict[str, dict], families: dict[str, tuple[str, float | None]], sel: dict,
             n_sweep: int) -> dict[str, list[tuple[int, dict]]]:
    """The data-efficiency series among `points`: TA-SFT LB at its chosen λ over N harmful (the
    sweep's N is its chosen model), SafeInstr over its N; a series of fewer than 2 points is
    left out."""
    series: dict[str, list[tuple[int, dict]]] = {}
    lb = sel.get("tasft_lb")
    if lb:
        ns = [(n_sweep, points.get(lb["name"]))]
        ns += [(int(s), points.get(n)) for n, (fam, s) in families.items() if fam == "tasft_lb_n"]
        series[f"TA-SFT LB λ {lb['setting']:g} (N harmful)"] = ns
    series["SafeInstr (N refusals)"] = [(int(s), points.get(n)) for n, (fam, s) in families.items()
                                        if fam == "safeinstr"]
    series = {k: [(n, p) for n, p in v if p is not None] for k, v in series.items()}
    return {k: v for k, v in series.items() if len(v) >= 2}


def moving_mean(x: np.ndarray, w: int = 10) -> np.ndarray:
    """Mean over the last w values at each step (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(x, dtype=np.float64), 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - w, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(res: Path, families: dict[str, tuple[str, float | None]], path: Path) -> int:
    """curves.png (see the module docstring); returns the number of curves drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = 0
    styles = ("-", "--", ":", "-.", (0, (1, 1)))
    order = sorted(families.items(), key=lambda kv: (kv[1][0], kv[1][1] or 0.0))
    for name, (fam, _) in order:
        f = res / "models" / name / "metrics.jsonl"
        if not f.exists():
            continue
        rank = [n for n, (g, _) in order if g == fam].index(name)
        rows = read_jsonl_objects(f)
        steps = np.array([r["step"] for r in rows])
        for ax, key in zip(axes, ("ce", "harm_nll")):
            vals = np.array([r.get(key, np.nan) for r in rows], dtype=np.float64)
            if key == "harm_nll" and not np.any(vals > 0):
                continue  # no harmful data in this run
            ax.plot(steps, moving_mean(vals), color=COLORS.get(fam, "tab:brown"), lw=1.2,
                    ls=styles[rank % len(styles)], label=name)
        drawn += 1
    axes[0].set_ylabel("benign CE, nats/token (log scale)")
    axes[1].set_ylabel("NLL of the harmful replies (log scale)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Training curves (moving mean over 10 steps)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return drawn


def draw(res: Path, families: dict[str, tuple[str, float | None]], n_sweep: int = 100) -> dict:
    """Every plot that has its inputs, into res/plots/; returns what was drawn (also written to
    res/plots/plots.json with the inputs' digest). n_sweep: the N harmful of the λ sweeps."""
    out = res / "plots"
    out.mkdir(parents=True, exist_ok=True)
    points = {n: p for n in families if (p := point(res, n)) is not None}
    sweep = {n: f for n, f in families.items() if f[0] in COLORS}  # not the seeds, N and sampled runs
    sel_path = res / "selection.json"
    sel = json.loads(sel_path.read_text()) if sel_path.exists() else {}
    chosen = {v["name"] for v in sel.values() if isinstance(v, dict) and "name" in v
              and "setting" in v and v.get("overrides") is not None}
    summary = {"digest": inputs_digest(res, list(families)),
               "frontier_val": plot_frontier(
                   {n: p for n, p in points.items() if n in sweep}, families, chosen,
                   out / "frontier_val.png", "val", ("rate", "degenerate", "benign_refusal")
                   if all("benign_refusal" in p for p in points.values()) else ("rate", "degenerate")),
               "curves": plot_curves(res, sweep, out / "curves.png")}
    paired = paired_points(res, list(sweep))
    if len(paired) >= 2 and "sft" in points:
        summary["frontier_val_paired"] = plot_paired_frontier(
            paired, families, chosen, out / "frontier_val_paired.png", points["sft"]["ce"])
    if series := n_series(points, families, sel, n_sweep):
        summary["harm_vs_n_val"] = plot_harm_vs_n(series, out / "harm_vs_n_val.png", "val",
                                                  points.get("sft"))
    tests = {n: p for n in families if (p := test_point(res, n)) is not None}
    if any(n in sweep for n in tests):
        summary["frontier_test"] = plot_frontier(
            {n: p for n, p in tests.items() if n in sweep}, families, chosen,
            out / "frontier_test.png", "test", ("rate", "degenerate", "overrefusal"))
    paired = paired_points(res, [n for n in sweep if n in tests], "test")
    if len(paired) >= 2 and "sft" in tests:
        summary["frontier_test_paired"] = plot_paired_frontier(
            paired, families, chosen, out / "frontier_test_paired.png", tests["sft"]["ce"], "test")
    if series := n_series(tests, families, sel, n_sweep):
        summary["harm_vs_n_test"] = plot_harm_vs_n(series, out / "harm_vs_n_test.png", "test",
                                                   tests.get("sft"))
    atomic_write_text(out / "plots.json", json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    import study  # the model list (experiments/ is on sys.path when run as a script)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(study.REPO / "docs" / "study"))
    args = ap.parse_args(argv)
    res = Path(args.results)
    sel = json.loads((res / "selection.json").read_text()) if (res / "selection.json").exists() else {}
    models = study.sweep_models() + study.selected_models(sel)
    print(json.dumps(draw(res, study.families(models), study.N_SWEEP), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
