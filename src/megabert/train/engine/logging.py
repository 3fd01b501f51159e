"""Training metrics: a JSONL file, TensorBoard when installed, and a PNG of the curves.

``metrics.jsonl`` holds one JSON object per record: ``{"step": 10, "split": "train",
"loss": 7.9, "lr": 1e-4, ...}`` (``split`` is ``train`` or ``valid``). It is the source of
truth: the PNG is redrawn from it, and on resume it is cut back to the checkpoint's step so
the file always describes one consistent run. A torn last line (a killed process) is skipped
when reading.

TensorBoard (``pip install tensorboard``) and the PNG (``pip install matplotlib``, the
``plot`` extra) are optional: when a library is missing that output is skipped with a
one-line note.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from megabert.utils import atomic_path, atomic_write_text, write_error

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class MetricsConfig:
    """Where and how often metrics go."""

    log_every: int = 10  # optimizer steps between train records (averaged over the window)
    tensorboard: bool = True  # write OUT/tensorboard when the library is installed
    plot: bool = True  # redraw OUT/curves.png at each evaluation and at the end
    progress: bool = True  # tqdm bar on stderr


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file, skipping a torn or unreadable line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _clean(value: Any) -> Any:
    """JSON-friendly scalar: tensors -> float, NaN/inf -> None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Append metric records to ``OUT/metrics.jsonl`` (+ TensorBoard) and draw ``OUT/curves.png``.

    Only the main process of a distributed run should create one (the Trainer does that).
    """

    def __init__(self, output_dir: str | os.PathLike, config: MetricsConfig | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.config = config or MetricsConfig()
        self.path = self.output_dir / METRICS_FILE
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._tb: Any = None
        self._notes: set[str] = set()
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._note("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
            else:
                self._tb = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR))

    def _note(self, text: str) -> None:
        """Say a thing once (a missing optional library)."""
        if text not in self._notes:
            self._notes.add(text)
            logger.warning(text)

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (resuming from a checkpoint of that step)."""
        records = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def log(self, step: int, split: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record; returns it (values converted to plain floats)."""
        record: dict[str, Any] = {"step": int(step), "split": split}
        record.update({k: _clean(v) for k, v in values.items()})
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
                handle.flush()
        except OSError as exc:
            error = write_error(exc, self.path)  # a bare write() error names no file
            if error is None:
                raise
            raise error from None
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{split}/{key}", value, step)
            self._tb.flush()
        return record

    def plot(self) -> Path | None:
        """Redraw ``curves.png`` from the JSONL (loss, accuracies, learning rate); None if skipped."""
        records = read_metrics(self.path)
        if not records:
            return None
        try:
            path = plot_curves(records, self.output_dir / CURVES_FILE)
        except ImportError:
            self._note("matplotlib is not installed: no curves.png (pip install 'megabert[plot]')")
            return None
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _series(records: Iterable[Mapping[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if record.get("split") == split and isinstance(value, (int, float)):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Draw loss / accuracy / learning-rate panels into a PNG (atomically). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    loss_keys = [k for k in keys if "loss" in k]
    acc_keys = [k for k in keys if "acc" in k]
    panels = [("loss", loss_keys), ("accuracy", acc_keys), ("learning rate", ["lr"] if "lr" in keys else [])]
    panels = [(title, ks) for title, ks in panels if ks]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, panel_keys) in zip(axes[0], panels):
        for split, style in (("train", "-"), ("valid", "o-")):
            for key in panel_keys:
                steps, values = _series(records, split, key)
                if steps:
                    ax.plot(steps, values, style, markersize=3, label=f"{split} {key}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return target
