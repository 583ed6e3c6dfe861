#!/usr/bin/env python
"""semloss_jax evaluation CLI.

    python eval.py chat --prompt "What is the capital of France?"
    python eval.py bounds --out DIR [--positions N] [--topk K]
    python eval.py run --model PATH_OR_RUN_DIR --out DIR [--sets ...]
    python eval.py report RUN_OR_EVAL_DIR ... --out DIR

Each subcommand lives in its own library module exposing add_args(parser) and run(args).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "chat": ("semloss_jax.chat", "chat with a model (default: the embedded SmolLM2-135M-Instruct)"),
    "bounds": ("semloss_jax.bounds_report", "exact EMD (OTT) vs lower/upper bounds on real model outputs"),
    "run": ("semloss_jax.evaluate", "generate on the evaluation sets and judge the responses"),
    "report": ("semloss_jax.report", "compare evaluated models side by side (tables and plots)"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (mod, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=mod)
        try:
            importlib.import_module(mod).add_args(p)
        except ImportError as e:  # a module not built yet must not break the others
            p.set_defaults(_import_error=str(e))
    args = ap.parse_args(argv)
    if getattr(args, "_import_error", None):
        print(f"eval.py {args.cmd}: unavailable ({args._import_error})", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
