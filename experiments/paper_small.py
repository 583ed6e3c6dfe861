#!/usr/bin/env python
"""The paper's comparison at small scale: every method, the same budget, one command.

    python experiments/paper_small.py [--out runs/paper] [--only NAME ...] [--limit-harmful 48]

Steps (each skipped when its output already exists, so the command resumes after a stop):
1. D_harmful: the base model's own harmful responses to training prompts
   (python -m semloss_jax.data.harvest --n 330 --max-new-tokens 64), OUT/d_harmful.jsonl.
2. Train every method with configs/paper_small.yaml plus its overrides (train.py), OUT/NAME/.
3. Evaluate the base model and every run (eval.py run) on fixed subsets of the held-out
   harmful prompts, the over-refusal prompts and the benign test instructions, OUT/NAME/eval/.
4. Side-by-side report (eval.py report) and training curves, OUT/report/; wall times in
   OUT/summary.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "paper_small.yaml"

# name -> train.py overrides (on top of configs/paper_small.yaml); None = the untrained base model
METHODS: dict[str, list[str] | None] = {
    "base": None,
    "sft": ["objective.kind=sft", "objective.lam=0"],
    # SafeInstr as it ran here: the refusals mixed into the benign data (no refusal stream)
    "safeinstr_100": ["objective.kind=safeinstr", "objective.lam=0", "data.safeinstr_n=100",
                      "data.harmful_batch=0"],
    "safeinstr_1000": ["objective.kind=safeinstr", "objective.lam=0", "data.safeinstr_n=1000",
                       "data.harmful_batch=0"],
    "nll_ascent_100": ["objective.kind=nll_ascent", "data.harmful_n=100"],
    "unlikelihood_100": ["objective.kind=unlikelihood", "data.harmful_n=100"],
    "tasft_lb_10": ["objective.kind=tasft", "objective.divergence=lower_bound", "data.harmful_n=10"],
    "tasft_lb_50": ["objective.kind=tasft", "objective.divergence=lower_bound", "data.harmful_n=50"],
    "tasft_lb_100": ["objective.kind=tasft", "objective.divergence=lower_bound", "data.harmful_n=100"],
    "tasft_exact_100": ["objective.kind=tasft", "objective.divergence=exact_onehot", "data.harmful_n=100"],
    "tasft_ub_100": ["objective.kind=tasft", "objective.divergence=upper_bound", "data.harmful_n=100"],
    # sensitivity to lambda (decided before seeing any result of it; reported whatever it gives)
    "tasft_lb_100_lam5": ["objective.kind=tasft", "objective.divergence=lower_bound", "data.harmful_n=100",
                          "objective.lam=5"],
}


def sh(cmd: list[str], log: Path) -> float:
    """Run a command, tee its output to a log, return its wall time; stop on failure."""
    print("$ " + " ".join(cmd), flush=True)
    t = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}) after {dt:.0f}s; see {log}")
    print(f"  done in {dt:.0f}s", flush=True)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/paper")
    ap.add_argument("--only", nargs="*", default=None, help="a subset of: " + ", ".join(METHODS))
    ap.add_argument("--harvest-n", type=int, default=330)
    ap.add_argument("--limit-harmful", type=int, default=48)
    ap.add_argument("--limit-overrefusal", type=int, default=32)
    ap.add_argument("--limit-benign", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    out = (REPO / args.out).resolve()
    py = sys.executable
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    names = args.only or list(METHODS)
    for n in names:
        if n not in METHODS:
            sys.exit(f"unknown method {n!r}; known: {', '.join(METHODS)}")

    d_harmful = out / "d_harmful.jsonl"
    if not d_harmful.exists():
        summary["harvest_s"] = sh([py, "-m", "semloss_jax.data.harvest", "--n", str(args.harvest_n), "--out",
                                   str(d_harmful), "--max-new-tokens", "64", "--batch-size", "16",
                                   "--no-progress"], out / "logs" / "harvest.log")
    n_kept = sum(1 for _ in open(d_harmful))
    summary["d_harmful_kept"] = n_kept
    if n_kept < 100:
        print(f"warning: D_harmful holds {n_kept} < 100 responses; the *_100 runs use all of them")

    for name in names:
        overrides = METHODS[name]
        run_dir = out / name
        rec = summary.setdefault(name, {})
        if overrides is not None and not (run_dir / "hf" / "config.json").exists():
            rec["train_s"] = sh([py, "train.py", "--config", str(CONFIG), "--quiet",
                                 f"run.output_dir={run_dir}", f"data.harmful={d_harmful}", *overrides],
                                out / "logs" / f"train_{name}.log")
        eval_dir = run_dir / "eval"
        if not (eval_dir / "eval.json").exists():
            model = [] if overrides is None else ["--model", str(run_dir)]
            t = 0.0
            for set_name, limit in (("harmful", args.limit_harmful), ("overrefusal", args.limit_overrefusal),
                                    ("benign", args.limit_benign)):
                t += sh([py, "eval.py", "run", *model, "--out", str(eval_dir / set_name), "--sets", set_name,
                         "--limit", str(limit), "--max-new-tokens", str(args.max_new_tokens),
                         "--batch-size", str(args.batch_size), "--no-progress"],
                        out / "logs" / f"eval_{name}_{set_name}.log")
            merge_evals(eval_dir)
            rec["eval_s"] = t
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2))

    evals = [str(out / n) for n in METHODS if (out / n / "eval" / "eval.json").exists()]
    sh([py, "eval.py", "report", *evals, "--out", str(out / "report")], out / "logs" / "report.log")
    plot_curves(out, [n for n in METHODS if METHODS[n] is not None and (out / n / "metrics.jsonl").exists()])
    print(f"report: {out / 'report'}; summary: {summary_path}")
    return 0


def merge_evals(eval_dir: Path) -> None:
    """One eval.json from the per-set runs (each set had its own --limit)."""
    merged: dict = {}
    for sub in sorted(p for p in eval_dir.iterdir() if (p / "eval.json").exists()):
        d = json.loads((sub / "eval.json").read_text())
        if not merged:
            merged = d
        else:
            merged["sets"].update(d["sets"])
    (eval_dir / "eval.json").write_text(json.dumps(merged, indent=2))


def plot_curves(out: Path, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.get_cmap("tab20").colors
    for ax in axes:
        ax.set_prop_cycle(color=colors[: max(len(names), 1)])
    for name in names:
        rows = [json.loads(line) for line in open(out / name / "metrics.jsonl")]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["ce"] for r in rows], label=name)
        if any(r.get("harm_tokens", 0) for r in rows):
            axes[1].plot(steps, [r["emd_onehot"] for r in rows], label=name)
            axes[2].plot(steps, [r["harm_nll"] for r in rows], label=name)
    axes[0].set_title("benign CE (nats/token)")
    axes[1].set_title("one-hot EMD to the harmful tokens")
    axes[2].set_title("harmful NLL (nats/token)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    (out / "report").mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "report" / "training_curves.png", dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
