r"""Blind hand labels against the judge, on a sample of the judged replies being reported.

Does the judge's harmful rate hold on these models' outputs? (docs/EVAL.md: an instrument is
only as good as its check on the data it measures.)

    python -m semloss_jax.eval.label_check pool --judged NAME=FILE [NAME=FILE ...] --out DIR \
        [--per-model 40] [--seed 0] [--size 60] [--paired]
    python -m semloss_jax.eval.label show --batch DIR/batches/batch_01.jsonl ...   (blind)
    python -m semloss_jax.eval.label_check report --dir DIR

pool: from each judged JSONL (`eval.py judge` output: prompt, response, harm_prob, harmful,
label; or `eval.py run`'s generations/harmful.jsonl, whose harm_score is the same judge
probability), a seeded sample of --per-model rows (all rows if fewer), written to
DIR/pool.jsonl with the judge's fields renamed judge_harm_prob / judge_harmful / judge_label
(provenance: the label tool never shows them), and DIR/batches/ (`label batches`: the models
interleaved, batches of at most --size rows, a 15% relabel batch). Each model's sample is drawn
on its own, unless --paired: then one seeded sample of the prompts every file answers (matched
by the prompt's text) is taken from every model, so two models' labels compare prompt by prompt.
report: once every batch is labelled, per model and over all rows: the hand-labelled harmful
rate and the judge's on the same rows (metrics.rate_summary: bootstrap and Wilson 95%
intervals), the judge's AUC, accuracy, precision and recall against the hand labels, and the
relabel batch's self-agreement; for a --paired pool also each pair of models' difference in
hand-labelled and in judged harmful rate on the same prompts (metrics.paired_rate_difference);
written to DIR/report.json (or --out) and summarized on stdout.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from semloss_jax.errors import DataError, EvalError, cli_main
from semloss_jax.eval import label
from semloss_jax.eval.judges import binary_auc
from semloss_jax.eval.metrics import paired_rate_difference, rate_summary
from semloss_jax.paths import atomic_write_text, read_jsonl_rows

JUDGED_FIELDS = {"prompt": str, "response": str, "harmful": (int, bool), "label": str}
PROB_FIELDS = ("harm_prob", "harm_score")  # `eval.py judge` output; `eval.py run` generations


def read_judged(path: Path) -> list[dict]:
    """The rows of an `eval.py judge` output (or `eval.py run` generations), checked field by
    field (file and line named); the judge's probability is returned as harm_prob."""
    rows = []
    for i, row in read_jsonl_rows(path):
        for f, t in JUDGED_FIELDS.items():
            if not isinstance(row.get(f), t):
                raise DataError(path, i, f, "missing or of the wrong type (is this `eval.py "
                                            "judge` output?)")
        prob = next((row[f] for f in PROB_FIELDS if f in row), None)
        if isinstance(prob, bool) or not isinstance(prob, (int, float)):
            raise DataError(path, i, "harm_prob", f"missing or not a number (one of {PROB_FIELDS})")
        rows.append({**row, "harm_prob": float(prob)})
    if not rows:
        raise DataError(path, None, None, "no judged rows")
    return rows


def _pool_row(name: str, path: Path, i: int, r: dict) -> dict:
    uid = hashlib.sha256(f"{name}\0{i}\0{r['prompt']}".encode()).hexdigest()[:12]
    return {"uid": uid, "kind": "harmful", "prompt": r["prompt"], "response": r["response"],
            "model": name, "source_file": str(path), "source_line": int(i) + 1,
            "judge_harm_prob": float(r["harm_prob"]), "judge_harmful": int(r["harmful"]),
            "judge_label": r["label"]}


def _prompt_index(path: Path, rows: Sequence[dict]) -> dict[str, int]:
    """The row position of each prompt (by its text); a prompt answered twice is an error."""
    index: dict[str, int] = {}
    for i, r in enumerate(rows):
        key = r["prompt"]
        if key in index:
            raise DataError(path, i + 1, "prompt", f"repeats line {index[key] + 1}: a paired "
                            "sample needs each prompt once per file")
        index[key] = i
    return index


def sample_pool(judged: Mapping[str, Path], per_model: int, seed: int,
                paired: bool = False) -> list[dict]:
    """Pool rows, kind harmful, uid = a hash of the model and the row's position, the judge's
    fields renamed. Unpaired: a seeded sample of per_model rows of each model (in file order).
    Paired: one seeded sample of per_model prompts among those every file answers, the same
    for every model; each row carries `pair` (the prompt's position in that sample)."""
    if per_model < 1:
        raise EvalError(f"--per-model must be >= 1, got {per_model}")
    files = {name: (Path(path), read_judged(Path(path))) for name, path in sorted(judged.items())}
    if not paired:
        pool = []
        for k, (name, (path, rows)) in enumerate(files.items()):
            rng = np.random.default_rng([seed, k])
            keep = sorted(rng.choice(len(rows), size=min(per_model, len(rows)), replace=False))
            pool += [_pool_row(name, path, int(i), rows[int(i)]) for i in keep]
        return pool
    index = {name: _prompt_index(path, rows) for name, (path, rows) in files.items()}
    first = next(iter(index.values()))
    common = [key for key in first if all(key in ix for ix in index.values())]  # first file's order
    if not common:
        raise EvalError(f"--paired: the files {[str(p) for p, _ in files.values()]} share no prompt")
    rng = np.random.default_rng(seed)
    chosen = [common[int(i)] for i in sorted(rng.choice(len(common), size=min(per_model, len(common)),
                                                        replace=False))]
    pool = []
    for name, (path, rows) in files.items():
        for pair, key in enumerate(chosen):
            i = index[name][key]
            pool.append({**_pool_row(name, path, i, rows[i]), "pair": pair})
    return pool


def write_pool(out: Path, pool: Sequence[dict], *, size: int, seed: int) -> list[Path]:
    """DIR/pool.jsonl and DIR/batches/ (refuses a folder that already has a pool)."""
    out = Path(out)
    if (out / "pool.jsonl").exists():
        raise EvalError(f"{out / 'pool.jsonl'} exists: its batches may be labelled already; "
                        "choose another --out")
    label.write_jsonl_rows(out / "pool.jsonl", pool)
    batches, relabel = label.make_batches(pool, size=size, seed=seed)
    manifest = {"pool": "pool.jsonl", "pool_sha256": label.file_sha256(out / "pool.jsonl"),
                "pool_rows": len(pool), "size": size, "seed": seed,
                "relabel_fraction": label.RELABEL_FRACTION}
    return label.write_batches(out / "batches", batches, relabel, manifest)


def unlabelled_count(out: Path) -> int:
    """Rows of DIR/batches/*.jsonl (relabel batch included) that have no label yet."""
    batch_files = [p for p in sorted((Path(out) / "batches").glob("*.jsonl"))
                   if not p.name.endswith(label.LABELS_SUFFIX)]
    if not batch_files:
        raise EvalError(f"{out}/batches: no batches (run `label_check pool` first)")
    left = 0
    for b in batch_files:
        done = label.read_labels(label.labels_path(b))  # no labels file yet: {}
        left += len(label.unlabelled(label.read_batch(b), done))
    return left


def compare(rows: Sequence[dict]) -> dict:
    """Hand labels against the judge on the same rows."""
    hand = [int(r["label"] == "harmful") for r in rows]
    judge = [int(r["judge_harmful"]) for r in rows]
    tp = sum(h and j for h, j in zip(hand, judge))
    auc = binary_auc(hand, [r["judge_harm_prob"] for r in rows]) if 0 < sum(hand) < len(hand) \
        else None
    return {"n": len(rows), "hand_harmful": rate_summary(hand), "judge_harmful": rate_summary(judge),
            "judge_minus_hand": (sum(judge) - sum(hand)) / len(rows),
            "auc": auc, "accuracy": sum(h == j for h, j in zip(hand, judge)) / len(rows),
            "precision": tp / sum(judge) if sum(judge) else None,
            "recall": tp / sum(hand) if sum(hand) else None,
            "hand_classes": {c: sum(r["label"] == c for r in rows) for c in label.CLASSES},
            "judge_classes": {c: sum(r["judge_label"] == c for r in rows) for c in label.CLASSES}}


def report(out: Path) -> dict:
    """The comparison, per model and pooled, plus the relabel agreement; needs every label."""
    out = Path(out)
    left = unlabelled_count(out)
    if left:
        raise EvalError(f"{out}/batches: {left} rows are not labelled yet")
    pool = label.read_pool(out / "pool.jsonl")
    for i, r in enumerate(pool, 1):  # the judge's side, which `label` pools do not carry
        for f, t in (("model", str), ("judge_harmful", (int, bool)), ("judge_harm_prob", (int, float)),
                     ("judge_label", str)):
            if not isinstance(r.get(f), t):
                raise DataError(out / "pool.jsonl", f"row {i}", f, "missing or of the wrong type (not a "
                                "`label_check pool` file?)")
    first, relabel = label.read_label_dir(out / "batches")
    merged, _ = label.merge(pool, first, relabel, where=str(out / "batches"))
    models = sorted({r["model"] for r in merged})
    rep = {"pool": str(out / "pool.jsonl"), "pool_sha256": label.file_sha256(out / "pool.jsonl"),
           "all": compare(merged),
           "per_model": {m: compare([r for r in merged if r["model"] == m]) for m in models},
           "relabel_agreement": label.agreement(first, relabel)}
    if all("pair" in r for r in merged):
        rep["paired"] = paired_differences(out / "pool.jsonl", merged, models)
    return rep


def paired_differences(where: Path, rows: Sequence[dict], models: Sequence[str]) -> dict:
    """For each two models (a before b, by name): a's harmful rate minus b's on the same prompts,
    hand-labelled and judged, with paired bootstrap intervals."""
    by_model = {m: {r["pair"]: r for r in rows if r["model"] == m} for m in models}
    pairs = sorted(next(iter(by_model.values())))
    for m, got in by_model.items():
        if sorted(got) != pairs:
            raise DataError(where, None, "pair", f"model {m!r} does not answer the same prompts "
                            "as the others (not a `label_check pool --paired` file?)")
    out = {}
    for ia, a in enumerate(models):
        for b in models[ia + 1:]:
            ra, rb = ([by_model[m][p] for p in pairs] for m in (a, b))
            out[f"{a} - {b}"] = {
                "hand": paired_rate_difference([int(r["label"] == "harmful") for r in ra],
                                               [int(r["label"] == "harmful") for r in rb]),
                "judge": paired_rate_difference([int(r["judge_harmful"]) for r in ra],
                                                [int(r["judge_harmful"]) for r in rb])}
    return {"n_prompts": len(pairs), "differences": out}


def summary_lines(rep: dict) -> list[str]:
    """One line per model: hand vs judge harmful rate and the judge's AUC."""
    def line(name: str, c: dict) -> str:
        h, j = c["hand_harmful"], c["judge_harmful"]
        auc = "n/a" if c["auc"] is None else f"{c['auc']:.3f}"
        return (f"{name:28s} n {c['n']:3d}  hand {h['rate']:.2f} [{h['wilson'][0]:.2f}, "
                f"{h['wilson'][1]:.2f}]  judge {j['rate']:.2f} [{j['wilson'][0]:.2f}, "
                f"{j['wilson'][1]:.2f}]  AUC {auc}")
    lines = [line(m, c) for m, c in rep["per_model"].items()] + [line("all", rep["all"])]
    for what, d in rep.get("paired", {}).get("differences", {}).items():
        h, j = d["hand"], d["judge"]
        lines.append(f"{what}: hand {h['diff']:+.3f} [{h['ci'][0]:+.3f}, {h['ci'][1]:+.3f}]  "
                     f"judge {j['diff']:+.3f} [{j['ci'][0]:+.3f}, {j['ci'][1]:+.3f}]  "
                     f"({h['n_examples']} prompts)")
    return lines


def parse_judged(items: Sequence[str]) -> dict[str, Path]:
    """NAME=FILE pairs; a missing '=' or a repeated name is an error."""
    out: dict[str, Path] = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--judged takes NAME=FILE, got {it!r}")
        if name in out:
            raise EvalError(f"--judged: model name {name!r} given twice")
        out[name] = Path(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`pool` or `report`."""
    ap = argparse.ArgumentParser(prog="python -m semloss_jax.eval.label_check",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pool", help="sample judged replies into blind label batches")
    p.add_argument("--judged", nargs="+", required=True,
                   help="NAME=FILE (eval.py judge output or eval.py run generations)")
    p.add_argument("--out", required=True)
    p.add_argument("--per-model", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=60, help="rows per label batch")
    p.add_argument("--paired", action="store_true",
                   help="the same prompts from every model (those every file answers)")
    r = sub.add_parser("report", help="hand labels against the judge, once labelled")
    r.add_argument("--dir", required=True)
    r.add_argument("--out", default=None, help="default: DIR/report.json")
    args = ap.parse_args(argv)
    if args.cmd == "pool":
        pool = sample_pool(parse_judged(args.judged), args.per_model, args.seed, args.paired)
        paths = write_pool(Path(args.out), pool, size=args.size, seed=args.seed)
        print(f"{len(pool)} rows -> {Path(args.out) / 'pool.jsonl'}; label these blind:")
        print("\n".join(f"  {p}" for p in paths))
        return 0
    rep = report(Path(args.dir))
    dest = Path(args.out) if args.out else Path(args.dir) / "report.json"
    atomic_write_text(dest, json.dumps(rep, indent=1) + "\n")
    print("\n".join(summary_lines(rep)))
    print(f"[label_check] wrote {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main("python -m semloss_jax.eval.label_check", main))
