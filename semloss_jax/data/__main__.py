"""`python -m semloss_jax.data`: fetch the pinned archives, build the named sets, show counts.

    python -m semloss_jax.data fetch model      # the default model (SmolLM2-135M-Instruct GGUF)
    python -m semloss_jax.data fetch data       # every data archive, then the built sources
    python -m semloss_jax.data fetch all        # both (what `make fetch` runs)
    python -m semloss_jax.data sets [--force]   # (re)build the sources and print each set's counts

Every step is idempotent: a rerun checks the size and sha256 recorded for every extracted and
every built file and does nothing more when they match; a missing or damaged file is rewritten
(from the verified archive, or by rebuilding), so a damaged cache repairs itself.
"""
from __future__ import annotations

import argparse
import sys

from semloss_jax.data import fetch, registry
from semloss_jax.errors import DataError, cli_main
from semloss_jax.paths import cache_dir


def set_counts() -> dict[str, dict]:
    """{set name: {split: count or "unavailable (...)"}} for every named set."""
    out = {}
    for name, spec in registry.SETS.items():
        counts: dict = {}
        for sp in spec.splits:
            try:
                counts[sp] = len(registry.load_set(name, sp))
            except DataError as e:
                counts[sp] = f"unavailable ({e})"
        out[name] = counts
    return out


def main(argv: list[str]) -> int:
    """Run `fetch model|data|all` or `sets [--force]` from argv; return 0."""
    ap = argparse.ArgumentParser(prog="python -m semloss_jax.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch and verify the model and/or the data")
    f.add_argument("what", choices=["model", "data", "all"])
    s = sub.add_parser("sets", help="build the sources and print the named sets' counts")
    s.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        if args.what in ("model", "all"):
            print(f"[fetch] model: {fetch.fetch_model()}", file=sys.stderr)
        if args.what in ("data", "all"):
            fetch.fetch_archives()
            registry.build_all(verify=True)
            print(f"[fetch] data: {cache_dir()}", file=sys.stderr)
        return 0
    registry.build_all(force=args.force, verify=True)
    for name, counts in set_counts().items():
        print(f"{name}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main("python -m semloss_jax.data", main))
