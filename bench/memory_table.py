"""The docs/PERFORMANCE.md memory-plan table from bench/memory_plan.py's JSON files.

    python bench/memory_table.py bench/results/memory_plan
    python bench/memory_table.py bench/results/memory_plan/ablation --ablation

reads <config>_<seq>_tasft.json and <config>_<seq>_sft.json (TA-SFT as shipped, and SFT on the
same token slots: benign rows = benign + harmful) and prints one markdown row per config and
sequence length: per-device arguments / temporaries / peak GiB, the TA-SFT / SFT peak ratio,
weight all-gathers and activation-shaped all-reduces inside the layer scan, and each target of
the pod-scale plan with whether the figure meets it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from semloss_jax.train import hlo  # noqa: E402  (after the path setup above)

# per-device peak targets (GiB) by (config family, sequence length)
TARGETS = {("tpu", 2048): 16.0, ("tpu", 4096): 32.0, ("8gpu", 4096): 60.0}
TPU_TARGETED = ("llama3_8b_tpu", "llama2_7b_tpu")
RATIO_TARGET = 1.05


def target(cfg: str, seq: int) -> float | None:
    family = "tpu" if cfg.endswith("_tpu") else "8gpu"
    if family == "tpu" and cfg not in TPU_TARGETED:
        return None
    return TARGETS.get((family, seq))


def layer_scan_comms(t: dict) -> tuple[int, int]:
    """(weight all-gathers, activation-shaped all-reduces) inside the layer scan, from the shapes."""
    total = sum(t["rows_per_micro_batch"].values())
    rows = total // (t["mesh"]["data"] * t["mesh"]["fsdp"])

    def count(kind, activation):
        return sum(n for shape, n in t[kind]["by_size"].items() if shape.endswith("[layer scan]")
                   and hlo.activation_shaped(shape, rows, t["seq_len"], total) == activation)

    return count("all_gather", False), count("all_reduce", True)


def row(cfg: str, seq: int, t: dict, s: dict | None) -> str:
    ratio = t["peak_gib"] / s["peak_gib"] if s else None
    goal = target(cfg, seq)
    checks = []
    if goal is not None:
        checks.append(f"peak <= {goal:.0f}: {'met' if t['peak_gib'] <= goal else '**missed**'}")
    if ratio is not None:
        checks.append(f"ratio <= {RATIO_TARGET}: {'met' if ratio <= RATIO_TARGET else '**missed**'}")
    gathers, reduces = layer_scan_comms(t)
    comm_ok = gathers > 0 and reduces == 0
    checks.append(f"comms: {'met' if comm_ok else '**missed**'}")
    mesh = "x".join(str(t["mesh"][k]) for k in ("data", "fsdp", "tensor"))
    sft = "-" if s is None else f"{s['peak_gib']:.2f}"
    return (f"| {cfg} | {t['devices']} ({mesh}) | {seq} | {t['argument_gib']:.2f} | {t['temp_gib']:.2f} | "
            f"**{t['peak_gib']:.2f}** | {sft} | "
            f"{'-' if ratio is None else f'{ratio:.3f}'} | {gathers} | {reduces} | {'; '.join(checks)} |")


def ablation_table(folder: Path) -> None:
    """One row per JSON file of the folder: what was on, and the figures."""
    print("| run | devices (data x fsdp x tensor) | seq | activation rules | head tile | attention | "
          "arguments GiB | temporaries GiB | peak GiB | weight all-gathers in layer scan | "
          "activation all-reduces in layer scan |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in sorted(folder.glob("*.json")):
        t = json.loads(f.read_text())
        gathers, reduces = layer_scan_comms(t)
        mesh = "x".join(str(t["mesh"][k]) for k in ("data", "fsdp", "tensor"))
        print(f"| {f.stem} | {t['devices']} ({mesh}) | {t['seq_len']} | {t.get('activation_rules', True)} | "
              f"{t['head_tile'] or 'untiled'} | {t['attention']} | {t['argument_gib']:.2f} | "
              f"{t['temp_gib']:.2f} | **{t['peak_gib']:.2f}** | {gathers} | {reduces} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--ablation", action="store_true", help="one row per JSON file (ablation runs)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    if args.ablation:
        ablation_table(folder)
        return 0
    print("| config | devices (data x fsdp x tensor) | seq | arguments GiB | temporaries GiB | TA-SFT peak "
          "GiB | SFT peak GiB (same slots) | TA-SFT / SFT | weight all-gathers in layer scan | "
          "activation all-reduces in layer scan | targets |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in sorted(folder.glob("*_tasft.json"), key=lambda p: (p.name.rsplit("_", 2)[0],
                                                                  int(p.name.rsplit("_", 2)[1]))):
        cfg, seq, _ = f.name.rsplit("_", 2)
        t = json.loads(f.read_text())
        sf = folder / f"{cfg}_{seq}_sft.json"
        print(row(cfg, int(seq), t, json.loads(sf.read_text()) if sf.exists() else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
