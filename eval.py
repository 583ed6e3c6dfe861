#!/usr/bin/env python
"""semloss_jax evaluation CLI.

    python eval.py chat --prompt "What is the capital of France?"
    python eval.py bounds --out DIR [--positions N] [--topk K]
    python eval.py run --model PATH_OR_RUN_DIR --out DIR [--sets ...]
    python eval.py judge --in FILE --out FILE [--judge v2|tfidf|hf:DIR|guard:DIR]
    python eval.py report RUN_OR_EVAL_DIR ... --out DIR

Each subcommand lives in its own library module (semloss_jax.eval.*) exposing add_args(parser)
and run(args). Any error of the project is reported as one line and exit code 2 (`--debug`:
the traceback).
"""
from __future__ import annotations

import argparse
import sys

from semloss_jax.errors import cli_main
from semloss_jax.eval import bounds, chat, evaluate, judge_file, report

SUBCOMMANDS = {
    "chat": (chat, "chat with a model (default: the embedded SmolLM2-135M-Instruct)"),
    "bounds": (bounds, "exact EMD (OTT) vs lower/upper bounds on real model outputs"),
    "run": (evaluate, "generate on the evaluation sets and judge the responses"),
    "judge": (judge_file, "judge a JSONL of {prompt, response} rows (harm, refusal, degenerate, label)"),
    "report": (report, "compare evaluated models side by side (tables and plots)"),
}


def main(argv: list[str]) -> int:
    """Parse the subcommand and its arguments from argv, run it and return its exit code."""
    ap = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (mod, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("--debug", action="store_true", help="show tracebacks of the project's errors")
        mod.add_args(p)
        p.set_defaults(_run=mod.run)
    args = ap.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(cli_main("eval.py", main))
