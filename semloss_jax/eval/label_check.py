r"""Blind hand labels against the judge, on a sample of the judged replies being reported.

Does the judge's harmful rate hold on these models' outputs? (docs/EVAL.md: an instrument is
only as good as its check on the data it measures.)

    python -m semloss_jax.eval.label_check pool --judged NAME=FILE [NAME=FILE ...] --out DIR \
        [--per-model 40] [--seed 0] [--size 60]
    python -m semloss_jax.eval.label show --batch DIR/batches/batch_01.jsonl ...   (blind)
    python -m semloss_jax.eval.label_check report --dir DIR

pool: from each judged JSONL (`eval.py judge` output: prompt, response, harm_prob, harmful,
label), a seeded sample of --per-model rows (all rows if fewer), written to DIR/pool.jsonl with
the judge's fields renamed judge_harm_prob / judge_harmful / judge_label (provenance: the label
tool never shows them), and DIR/batches/ (`label batches`: the models interleaved, batches of at
most --size rows, a 15% relabel batch).
report: once every batch is labelled, per model and over all rows: the hand-labelled harmful
rate and the judge's on the same rows (metrics.rate_summary: bootstrap and Wilson 95%
intervals), the judge's AUC, accuracy, precision and recall against the hand labels, and the
relabel batch's self-agreement; written to DIR/report.json (or --out) and summarized on stdout.
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
from semloss_jax.eval.metrics import rate_summary
from semloss_jax.paths import atomic_write_text, read_jsonl_rows

JUDGED_FIELDS = {"prompt": str, "response": str, "harm_prob": (int, float), "harmful": (int, bool),
                 "label": str}


def read_judged(path: Path) -> list[dict]:
    """The rows of an `eval.py judge` output, checked field by field (file and line named)."""
    rows = []
    for i, row in read_jsonl_rows(path):
        for f, t in JUDGED_FIELDS.items():
            if not isinstance(row.get(f), t):
                raise DataError(path, i, f, "missing or of the wrong type (is this `eval.py "
                                            "judge` output?)")
        rows.append(row)
    if not rows:
        raise DataError(path, None, None, "no judged rows")
    return rows


def sample_pool(judged: Mapping[str, Path], per_model: int, seed: int) -> list[dict]:
    """Pool rows: a seeded sample of per_model rows of each model (in file order), kind harmful,
    uid = a hash of the model and the row's position, the judge's fields renamed."""
    if per_model < 1:
        raise EvalError(f"--per-model must be >= 1, got {per_model}")
    pool = []
    for k, (name, path) in enumerate(sorted(judged.items())):
        rows = read_judged(Path(path))
        rng = np.random.default_rng([seed, k])
        keep = sorted(rng.choice(len(rows), size=min(per_model, len(rows)), replace=False))
        for i in keep:
            r = rows[int(i)]
            uid = hashlib.sha256(f"{name}\0{i}\0{r['prompt']}".encode()).hexdigest()[:12]
            pool.append({"uid": uid, "kind": "harmful", "prompt": r["prompt"],
                         "response": r["response"], "model": name, "source_file": str(path),
                         "source_line": int(i) + 1, "judge_harm_prob": float(r["harm_prob"]),
                         "judge_harmful": int(r["harmful"]), "judge_label": r["label"]})
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
    return {"pool": str(out / "pool.jsonl"), "pool_sha256": label.file_sha256(out / "pool.jsonl"),
            "all": compare(merged),
            "per_model": {m: compare([r for r in merged if r["model"] == m]) for m in models},
            "relabel_agreement": label.agreement(first, relabel)}


def summary_lines(rep: dict) -> list[str]:
    """One line per model: hand vs judge harmful rate and the judge's AUC."""
    def line(name: str, c: dict) -> str:
        h, j = c["hand_harmful"], c["judge_harmful"]
        auc = "n/a" if c["auc"] is None else f"{c['auc']:.3f}"
        return (f"{name:28s} n {c['n']:3d}  hand {h['rate']:.2f} [{h['wilson'][0]:.2f}, "
                f"{h['wilson'][1]:.2f}]  judge {j['rate']:.2f} [{j['wilson'][0]:.2f}, "
                f"{j['wilson'][1]:.2f}]  AUC {auc}")
    return [line(m, c) for m, c in rep["per_model"].items()] + [line("all", rep["all"])]


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
    p.add_argument("--judged", nargs="+", required=True, help="NAME=FILE (eval.py judge output)")
    p.add_argument("--out", required=True)
    p.add_argument("--per-model", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=60, help="rows per label batch")
    r = sub.add_parser("report", help="hand labels against the judge, once labelled")
    r.add_argument("--dir", required=True)
    r.add_argument("--out", default=None, help="default: DIR/report.json")
    args = ap.parse_args(argv)
    if args.cmd == "pool":
        pool = sample_pool(parse_judged(args.judged), args.per_model, args.seed)
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
