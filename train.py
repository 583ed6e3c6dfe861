#!/usr/bin/env python
"""Train with TA-SFT or one of the paper's baselines.

    python train.py                                   # configs/default.yaml end to end
    python train.py --config configs/smoke.yaml objective.lam=0.5 run.steps=10
    python train.py --config configs/smoke.yaml output_dir=runs/x --resume

Overrides are `key=value` with dotted keys (section.field); a bare field name that belongs to
exactly one section works too (steps=10, output_dir=runs/x, checkpoint_every=5). Values are read
as YAML (true, 3, 0.5, [a, b], null). The run directory gets config.yaml (resolved),
metrics.jsonl, checkpoints/, tb/ and hf/ (the exported model).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in run.output_dir from its latest checkpoint")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import os
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # reruns skip XLA compilation
        import jax
        from semloss_jax.paths import cache_dir
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_compile"))
    from semloss_jax import config as config_lib
    from semloss_jax import train_loop

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("run.resume=true")
    if args.quiet:
        overrides.append("run.progress=false")
    try:
        cfg = config_lib.load_config(args.config, overrides)
    except (config_lib.ConfigError, FileNotFoundError) as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    try:
        res = train_loop.train(cfg)
    except train_loop.NonFiniteLoss as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 3
    except train_loop.TrainError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 1
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
    sys.exit(main())
