#!/usr/bin/env python
"""Train with TA-SFT or one of the paper's baselines.

    python train.py                                   # configs/default.yaml end to end
    python train.py --config configs/smoke.yaml objective.lam=0.5 run.steps=10
    python train.py --config configs/smoke.yaml output_dir=runs/x --resume

Overrides are `key=value` with dotted keys (section.field); a bare field name that belongs to
exactly one section works too (steps=10, output_dir=runs/x, checkpoint_every=5). Values are read
as YAML (true, 3, 0.5, [a, b], null). The run directory gets config.yaml (resolved),
metrics.jsonl, checkpoints/, tb/ and hf/ (the exported model).

Any error of the project is reported as one line and exit code 2 (`--debug`: the traceback).
A run holds run.output_dir/train.lock (a second run on the directory stops at once); SIGTERM or
Ctrl-C finishes the current step, saves it and stops with the resume command (exit code 143 /
130); --resume continues from the newest checkpoint that restores and verifies.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import jax

from semloss_jax.errors import cli_main
from semloss_jax.paths import cache_dir
from semloss_jax.train import config as config_lib
from semloss_jax.train import loop as train_loop

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


def main(argv: list[str]) -> int:
    """Load the config with the overrides from argv, train, print where the run's files are; return 0."""
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in run.output_dir from its latest checkpoint")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of the project's errors")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # reruns skip XLA compilation
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_compile"))

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("run.resume=true")
    if args.quiet:
        overrides.append("run.progress=false")
    cfg = config_lib.load_config(args.config, overrides)
    res = train_loop.train(cfg)
    out = res.output_dir
    print(f"run directory: {out}")
    print(f"  config:      {out / 'config.yaml'}")
    print(f"  metrics:     {out / 'metrics.jsonl'}  (TensorBoard: {out / 'tb'})")
    print(f"  checkpoints: {res.checkpoint_dir}")
    if res.export_dir is not None:
        print(f"  export:      {res.export_dir}  (Hugging Face safetensors)")
    elif res.final_step < cfg.run.steps:
        print(f"  stopped at step {res.final_step} of {cfg.run.steps}; continue with --resume")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main("train.py", main))
