"""Run metrics: ``metrics.jsonl`` (one JSON record per line, appended and flushed) and PNG plots of it.

Every record has ``kind`` (``"step"`` or ``"epoch"`` are plotted, others kept), ``epoch`` (a float for step records:
2.5 = half-way through the third) and ``step`` (global optimizer step). ``plot_metrics`` draws keys containing
``loss`` in one panel and ``top1``, ``acc`` or ``map`` in another, against ``epoch``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from ..io.atomic import atomic_write, atomic_write_text

LOSS_KEYS = ("loss",)
ACC_KEYS = ("top1", "acc", "map")


class MetricsLogger:
    """Append-only JSON-lines writer for ``run_dir/filename`` (``run_dir`` is created if missing); with
    ``enabled=False`` (ranks other than 0) every method is a no-op."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, filename: str = "metrics.jsonl") -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / filename
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        """Append one record (a dict of JSON-serialisable values; non-finite floats are written as null)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        """All records so far (a torn last line, from a kill mid-write, is ignored)."""
        return read_jsonl(self.path)

    def truncate(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite the file with only the records for which ``keep(record)`` is true (used when resuming, to drop
        records written after the checkpoint the run resumes from)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.read() if keep(r)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Parse a JSON-lines file, skipping blank and unparsable lines."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _series(records: list[dict], kind: str, keys: tuple[str, ...]) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        if r.get("kind") != kind or not isinstance(r.get("epoch"), (int, float)):
            continue
        for k, v in r.items():
            if k in ("epoch", "step", "lr") or not any(s in k for s in keys):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(r["epoch"])
                ys.append(v)
    return out


def plot_metrics(jsonl_path: str | os.PathLike, png_path: str | os.PathLike, *, title: str | None = None) -> None:
    """Draw loss and accuracy curves from ``metrics.jsonl`` into a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, (xs, ys) in _series(records, "step", LOSS_KEYS).items():
        ax_loss.plot(xs, ys, lw=0.8, alpha=0.45, label=f"{k} (steps)")
    for kind, marker in (("epoch", "o"),):
        for k, (xs, ys) in _series(records, kind, LOSS_KEYS).items():
            ax_loss.plot(xs, ys, marker=marker, ms=3, label=k)
        for k, (xs, ys) in _series(records, kind, ACC_KEYS).items():
            ax_acc.plot(xs, ys, marker=marker, ms=3, label=k)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
