"""Shared helpers of the bench/ scripts: machine description, interleaved timing, JSON output.

This machine is shared and noisy, so every comparison runs its contenders INTERLEAVED in one
process (A, B, A, B, ...) over several repetitions and reports medians and the ratio of the
medians (plus the median of the per-repetition ratios, which cancels slow drifts of the load).
The load average is recorded at the start and at the end of each script.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import jax

# `python bench/x.py` puts bench/ first on sys.path, not the repository: put this checkout's
# package ahead of any installed copy (an editable install of another worktree included) before
# the first semloss_jax import.
REPO = Path(__file__).resolve().parent.parent
if sys.path[0] != str(REPO):
    sys.path.insert(0, str(REPO))

from semloss_jax.paths import atomic_write_text  # noqa: E402


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(extra: Mapping | None = None) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": loadavg(),
        "time_start": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001 - informational only
        pass
    if extra:
        info.update(extra)
    return info


def finish(info: dict) -> dict:
    info["loadavg_end"] = loadavg()
    info["time_end"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return info


def block(x):
    """Wait for JAX arrays (any pytree) to be computed; returns x."""
    return jax.block_until_ready(x)


def interleaved(fns: Mapping[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Call each fn once per repetition, in turn (order rotated every repetition), timing each
    call with perf_counter. Each fn must block until its work is done. Returns seconds lists."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def summary(times: Mapping[str, list[float]], num: str, den: str) -> dict:
    """Medians of each contender, ratio of medians num/den and median of per-rep ratios."""
    med = {n: statistics.median(v) for n, v in times.items()}
    per_rep = [a / b for a, b in zip(times[num], times[den])]
    return {"median_s": med, "times_s": {n: list(v) for n, v in times.items()},
            "ratio": med[num] / med[den], "ratio_median_per_rep": statistics.median(per_rep),
            "ratio_min_over_min": min(times[num]) / min(times[den]), "ratio_of": f"{num} / {den}"}


def write_json(path: str | os.PathLike | None, data: dict) -> None:
    if not path:
        return
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=float) + "\n")
    print(f"wrote {path}")


def rss_now_kb() -> int:
    """Current resident set (VmRSS) in KiB."""
    return _status_kb("VmRSS")


def rss_peak_kb() -> int:
    """Peak resident set since the last reset_peak_rss (VmHWM) in KiB."""
    return _status_kb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1
