"""How well the automatic helpfulness proxies agree with human helpfulness labels.

    python -m semloss_jax.eval.helpfulness_agreement --labels FILE [--out agreement.json]
    python -m semloss_jax.eval.helpfulness_agreement --own-reference GENERATIONS.jsonl

FILE (JSONL, JSON, CSV or Parquet) holds labelled replies: `prompt`, `response`, and a
helpfulness label (`--label-field`, default `helpfulness`): `helpful`, `partly` or `unhelpful`.
Rows whose label is missing or empty (e.g. replies to harmful prompts) are skipped. Optional
per row: `reference` (the prompt's reference answer; else it is looked up by prompt text in
the `--references` named set, all splits), `n_tokens` and `stop` (as written by `eval.py run`;
else the reply is re-tokenized, see semloss_jax.eval.helpfulness), the generation limit
(`max_new_tokens`, or `decoding.max_new_tokens`) and a group (`--group-field`, default `kind`:
benign / overrefusal), for which the agreement is also reported group by group.

For each proxy (reply length in tokens, "did not stop early" = 1 - early_stop, ROUGE-L F1 and
embedding cosine where a reference exists) on the rows where it is defined:
    Spearman's rho against the label as a score (helpful 2, partly 1, unhelpful 0), and
    the ROC AUC of the proxy for helpful vs partly-or-unhelpful,
each with a paired bootstrap 95% interval (semloss_jax.eval.rank_stats).

--own-reference checks that the reference-based proxies see the reply and not only the topic
or the style: on a generations file of `eval.py run` (rows with `response` and `reference`),
for each reply i the share of other rows' references j for which proxy(reply i, reference i)
> proxy(reply i, reference j) (ties count one half); the mean over replies is the AUC of own vs
other references (0.5: the proxy ignores which prompt the reply answers), with a bootstrap
interval over replies.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semloss_jax.data import registry
from semloss_jax.data.readers import read_table
from semloss_jax.errors import DataError, EvalError, cli_main
from semloss_jax.eval.embedding import TextEmbedder, cosine_rows, embed_texts, pair_cosines
from semloss_jax.eval.helpfulness import (
    DEFAULT_MIN_TOKENS,
    early_stops,
    mean_summary,
    rouge_l_f1,
    token_lengths,
)
from semloss_jax.eval.rank_stats import auc_summary, spearman_summary
from semloss_jax.models import loading
from semloss_jax.models.tokenizer import load_tokenizer
from semloss_jax.paths import atomic_write_text

LABEL_SCORES = {"helpful": 2, "partly": 1, "unhelpful": 0}
PROXIES = ("reply_tokens", "not_early_stop", "rouge_l", "embed_cosine")


@dataclass(frozen=True)
class LabelledReply:
    """One labelled reply: its generation row fields, reference (or None) and label score."""

    row: dict
    reference: str | None
    score: int
    group: str | None = None


def _text(row: dict, key: str, path: Path, loc: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise DataError(path, loc, key, f"missing or not a string (got {type(v).__name__})")
    return v


def _max_new_tokens(row: dict) -> int | None:
    """The row's generation limit: `max_new_tokens`, else `decoding.max_new_tokens`, else None."""
    v = row.get("max_new_tokens")
    if v is None and isinstance(row.get("decoding"), dict):
        v = row["decoding"].get("max_new_tokens")
    return None if v is None else int(v)


def read_labelled(path: str | Path, *, label_field: str = "helpfulness",
                  references: dict[str, str] | None = None, group_field: str | None = "kind"
                  ) -> tuple[list[LabelledReply], int]:
    """The labelled rows of FILE and the number of rows skipped (no label); DataError names the
    file, line and field of a bad row."""
    path = Path(path)
    rows, locs = read_table(path)
    out: list[LabelledReply] = []
    skipped = 0
    for row, loc in zip(rows, locs):
        lab = row.get(label_field)
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            skipped += 1
            continue
        if lab not in LABEL_SCORES:
            raise DataError(path, loc, label_field, f"unknown label {lab!r}; expected one of "
                                                    f"{', '.join(LABEL_SCORES)}")
        prompt = _text(row, "prompt", path, loc)
        r = {"prompt": prompt, "response": _text(row, "response", path, loc),
             "n_tokens": row.get("n_tokens"), "stop": row.get("stop"),
             "max_new_tokens": _max_new_tokens(row)}
        ref = row.get("reference")
        if not (isinstance(ref, str) and ref.strip()):
            ref = (references or {}).get(prompt)
        group = row.get(group_field) if group_field else None
        out.append(LabelledReply(r, ref, LABEL_SCORES[lab], None if group is None else str(group)))
    if not out:
        raise DataError(path, None, label_field, "no labelled rows (is --label-field right?)")
    return out, skipped


def reference_map(set_name: str) -> dict[str, str]:
    """Map prompt -> reference answer over every split of a named set (empty answers left out)."""
    return {r.prompt: r.response for r in registry.load_set(set_name, "all") if r.response.strip()}


def proxy_values(items: Sequence[LabelledReply], *, tok, embedder: TextEmbedder | None,
                 max_new_tokens: int, min_tokens: int = DEFAULT_MIN_TOKENS
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Map proxy name -> (values [N], defined [N] bool). A row's own max_new_tokens (if recorded)
    decides its stop reason when it has to be re-tokenized."""
    n = len(items)
    n_tok = np.zeros(n, np.float64)
    not_early = np.zeros(n, np.float64)
    for i, it in enumerate(items):
        mnt = int(it.row.get("max_new_tokens") or max_new_tokens)
        k, stops, _ = token_lengths([it.row], tok, mnt)
        n_tok[i] = k[0]
        not_early[i] = 1.0 - float(early_stops(k, stops, min_tokens)[0])
    has_ref = np.array([it.reference is not None for it in items], bool)
    idx = np.flatnonzero(has_ref)
    replies = [items[i].row["response"] for i in idx]
    refs = [items[i].reference for i in idx]
    rouge = np.zeros(n, np.float64)
    rouge[idx] = rouge_l_f1(replies, refs)
    out = {"reply_tokens": (n_tok, np.ones(n, bool)), "not_early_stop": (not_early, np.ones(n, bool)),
           "rouge_l": (rouge, has_ref)}
    if embedder is not None:
        cos = np.zeros(n, np.float64)
        cos[idx] = pair_cosines(embedder, replies, refs)
        out["embed_cosine"] = (cos, has_ref)
    return out


def agreement(proxies: dict[str, tuple[np.ndarray, np.ndarray]], scores: np.ndarray, *,
              n_boot: int = 2000, seed: int = 0) -> dict:
    """Per proxy: Spearman's rho against the label scores and the AUC for helpful (score 2)
    vs not, each on the rows where the proxy is defined."""
    scores = np.asarray(scores, np.float64)
    out = {}
    for name, (v, defined) in proxies.items():
        s = scores[defined]
        out[name] = {"n": int(defined.sum()),
                     "labels": {k: int((s == c).sum()) for k, c in LABEL_SCORES.items()},
                     "spearman": spearman_summary(v[defined], s, n_boot=n_boot, seed=seed),
                     "auc_helpful": auc_summary(v[defined], s == 2, n_boot=n_boot, seed=seed)}
    return out


def _fmt(d: dict, key: str) -> str:
    if d.get(key) is None:
        return "n/a"
    return f"{d[key]:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"


def render_markdown(result: dict) -> str:
    """A table: one row per proxy with n, label counts, Spearman's rho and the AUC."""
    lines = [f"Agreement of the helpfulness proxies with the labels of `{result['labels_file']}` "
             f"({result['n_labelled']} labelled rows, {result['n_skipped']} without a label; "
             f"early stop: end-of-turn before {result['min_tokens']} tokens)", "",
             f"| rows ({result['group_field']}) | proxy | n | helpful / partly / unhelpful | "
             "Spearman rho [95%] | AUC helpful vs not [95%] |",
             "|---|---|---|---|---|---|"]
    for group, proxies in [("all", result["proxies"]), *result["groups"].items()]:
        for name, a in proxies.items():
            if a["n"] == 0:
                continue
            c = a["labels"]
            lines.append(f"| {group} | {name} | {a['n']} | {c['helpful']} / {c['partly']} / "
                         f"{c['unhelpful']} | {_fmt(a['spearman'], 'rho')} | "
                         f"{_fmt(a['auc_helpful'], 'auc')} |")
    return "\n".join(lines) + "\n"


def run_agreement(labels: str | Path, *, tok, embedder: TextEmbedder | None,
                  label_field: str = "helpfulness", references: dict[str, str] | None = None,
                  group_field: str | None = "kind",
                  max_new_tokens: int = 128, min_tokens: int = DEFAULT_MIN_TOKENS,
                  n_boot: int = 2000, seed: int = 0) -> dict:
    """Read the labelled rows, compute every proxy and its agreement with the labels."""
    items, skipped = read_labelled(labels, label_field=label_field, references=references,
                                   group_field=group_field)
    proxies = proxy_values(items, tok=tok, embedder=embedder, max_new_tokens=max_new_tokens,
                           min_tokens=min_tokens)
    scores = np.array([it.score for it in items], np.float64)
    groups = sorted({it.group for it in items if it.group is not None})
    by_group = {}
    for g in groups:
        sel = np.array([it.group == g for it in items])
        by_group[g] = agreement({k: (v[sel], d[sel]) for k, (v, d) in proxies.items()},
                                scores[sel], n_boot=n_boot, seed=seed)
    return {"labels_file": str(labels), "label_field": label_field, "n_labelled": len(items),
            "n_skipped": int(skipped), "n_with_reference": int(sum(it.reference is not None
                                                                    for it in items)),
            "min_tokens": min_tokens, "max_new_tokens": max_new_tokens,
            "embed_model": embedder.name if embedder is not None else None,
            "label_scores": LABEL_SCORES, "n_boot": n_boot, "bootstrap_seed": seed,
            "proxies": agreement(proxies, scores, n_boot=n_boot, seed=seed),
            "group_field": group_field, "groups": by_group}


def own_reference_auc(replies: Sequence[str], refs: Sequence[str], *,
                      embedder: TextEmbedder | None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per reference-based proxy: the mean over replies of the share of other references that
    score below the reply's own reference (module docstring), with its bootstrap interval."""
    n = len(replies)
    if n < 2 or len(refs) != n:
        raise EvalError(f"need >= 2 replies with one reference each, got {n} and {len(refs)}")
    grids = {"rouge_l": np.array([rouge_l_f1([r] * n, refs) for r in replies])}
    if embedder is not None:
        a, _ = embed_texts(embedder, replies)
        b, _ = embed_texts(embedder, refs)
        grids["embed_cosine"] = np.array([cosine_rows(np.repeat(a[i:i + 1], n, 0), b)
                                          for i in range(n)])
    off = ~np.eye(n, dtype=bool)
    out = {}
    for name, g in grids.items():  # g[i, j] = proxy(reply i, reference j)
        own = np.diag(g)[:, None]
        wins = ((own > g) + 0.5 * (own == g)) * off
        per_reply = wins.sum(1) / (n - 1)
        out[name] = {**mean_summary(per_reply, n_boot=n_boot, seed=seed),
                     "mean_own": float(np.diag(g).mean()), "mean_other": float(g[off].mean())}
    return out


def _own_reference_main(path: str, embedder: TextEmbedder | None, n_boot: int) -> dict:
    rows, locs = read_table(Path(path))
    replies, refs = [], []
    for row, loc in zip(rows, locs):
        replies.append(_text(row, "response", Path(path), loc))
        refs.append(_text(row, "reference", Path(path), loc))
    if len(replies) < 2:
        raise DataError(path, None, None, f"{len(replies)} rows: the own-vs-other comparison needs "
                        f">= 2 rows with a response and a reference")
    res = own_reference_auc(replies, refs, embedder=embedder, n_boot=n_boot)
    print(f"Own vs other references on `{path}` ({len(replies)} replies): AUC [95%], mean "
          f"proxy with the own / other references")
    for name, d in res.items():
        print(f"  {name}: {d['mean']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]; "
              f"{d['mean_own']:.3f} / {d['mean_other']:.3f}")
    return {"generations_file": str(path), "n": len(replies),
            "embed_model": embedder.name if embedder is not None else None, "proxies": res}


def main(argv: list[str]) -> int:
    """The CLI (module docstring): print the result, write --out as JSON."""
    ap = argparse.ArgumentParser(prog="python -m semloss_jax.eval.helpfulness_agreement",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--labels", help="labelled replies (JSONL/JSON/CSV/Parquet)")
    what.add_argument("--own-reference", metavar="GENERATIONS",
                      help="a generations file with `response` and `reference` (module docstring)")
    ap.add_argument("--label-field", default="helpfulness")
    ap.add_argument("--group-field", default="kind",
                    help="also report the agreement per value of this field ('none': not)")
    ap.add_argument("--references", default="benign",
                    help="named set whose reference answers are looked up by prompt ('none': "
                         "only the rows' own `reference` field)")
    ap.add_argument("--embed-model", default=loading.DEFAULT,
                    help="frozen model of the embedding cosine ('none': no cosine)")
    ap.add_argument("--max-new-tokens", type=int, default=128,
                    help="the generation limit of rows that do not record theirs")
    ap.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.n_boot < 1:
        raise EvalError(f"--n-boot must be >= 1, got {args.n_boot}")
    if args.embed_model == "none":  # the tokenizer of the default model counts the tokens
        embedder, tok = None, load_tokenizer(loading.resolve_model_path(loading.DEFAULT))
    else:
        m = loading.load_model(args.embed_model)
        embedder, tok = TextEmbedder(m.params, m.cfg, m.tok, f"{args.embed_model} ({m.path.name})"), m.tok
    if args.own_reference:
        res = _own_reference_main(args.own_reference, embedder, args.n_boot)
    else:
        refs = None if args.references == "none" else reference_map(args.references)
        res = run_agreement(args.labels, tok=tok, embedder=embedder, label_field=args.label_field,
                            references=refs, max_new_tokens=args.max_new_tokens,
                            group_field=None if args.group_field == "none" else args.group_field,
                            min_tokens=args.min_tokens, n_boot=args.n_boot)
        print(render_markdown(res))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(res, indent=2))
        print(f"[agreement] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main("python -m semloss_jax.eval.helpfulness_agreement", main))
