"""What a run reports: per-step metrics (metrics.jsonl, TensorBoard, a progress bar), and the
device peak FLOP/s that turns model FLOPs into MFU.

metrics.jsonl holds one JSON object per step; a line cut by a kill ends the readable part
(`read_metrics`), and a resumed run first truncates the file to its checkpoint's step
(`truncate_metrics`), so the file always reads as one trajectory.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax
from tqdm.auto import tqdm

from semloss_jax.errors import TrainError
from semloss_jax.paths import atomic_write_text, is_remote

log = logging.getLogger(__name__)

# Dense bf16 FLOP/s per chip, for MFU: (substring of the lower-cased device_kind, peak); the
# first match wins. None (no MFU) for the CPU and for unknown devices.
PEAK_FLOPS = (
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v6 lite", 918e12), ("v6e", 918e12), ("v4", 275e12),
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("a100", 312e12),
)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device (None on the CPU or an unknown device)."""
    d = device or jax.devices()[0]
    if d.platform == "cpu":
        return None
    kind = str(getattr(d, "device_kind", "")).lower()
    for sub, peak in PEAK_FLOPS:
        if sub in kind:
            return peak
    return None


def read_metrics(path: Path) -> list[dict]:
    """The readable records of a metrics.jsonl (up to the first line cut by a kill)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            break  # a line cut by a kill: everything after it is unreliable
    return out


def truncate_metrics(path: Path, upto_step: int) -> None:
    """Keep the records of steps <= upto_step (what a resume from that checkpoint continues)."""
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= upto_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


class MetricsLog:
    """metrics.jsonl (every step), TensorBoard (every `tb_every` steps) and a progress bar.

    Only the main process writes (`enabled=False` elsewhere). Use as a context manager.
    """

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool,
                 tb_every: int, total: int, initial: int):
        self.tb_every = tb_every
        self.file = _append_file(out_dir / "metrics.jsonl") if enabled else None
        self.tb = _tensorboard(out_dir / "tb") if (enabled and tensorboard) else None
        self.bar = (tqdm(total=total, initial=initial, desc="train", unit="step",
                         dynamic_ncols=True, file=sys.stderr)
                    if (enabled and progress and initial < total) else None)

    def write(self, rec: dict) -> None:
        """Append one step's record (and show it on the bar and in TensorBoard)."""
        if self.file is not None:
            try:
                self.file.write(json.dumps(rec) + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: one clear line instead of a traceback
                raise TrainError(f"{self.file.name}: cannot write the metrics of step "
                                 f"{rec.get('step')} ({e.strerror})") from e
        step = rec["step"]
        if self.tb is not None and step % self.tb_every == 0:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None and "loss" in rec:
            self.bar.update(1)
            tps = rec.get("tokens_per_s")
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tps:.0f}" if tps else "-")

    def close(self) -> None:
        """Close the progress bar, metrics.jsonl and the TensorBoard writer (those that are open)."""
        for h in (self.bar, self.file, self.tb):
            if h is not None:
                try:
                    h.close()
                except OSError as e:  # what a full disk left unwritten was reported by write()
                    log.debug("closing %s: %s", h, e)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RewriteAppend:
    """Append for stores without append (gs://...): each flush rewrites the whole file atomically."""

    def __init__(self, path):
        self.path, self.name = path, str(path)
        self.text = path.read_text(encoding="utf-8") if path.exists() else ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        atomic_write_text(self.path, self.text)

    def close(self) -> None:
        self.flush()


def _append_file(path):
    """An append-mode text file: a local file, or a rewrite-on-flush one on a remote store."""
    if is_remote(path):
        return _RewriteAppend(path)
    return open(path, "a", encoding="utf-8")


def _tensorboard(path: Path):
    try:  # lazy: tensorboardX takes ~3 s to import and only the main process writes logs
        from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover
        log.warning("tensorboardX is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(path))
