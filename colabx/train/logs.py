"""A run's logs: one CSV row per epoch, TensorBoard scalars and ``progress.png``.

The rows also live in the checkpoint, so ``--resume`` rewrites ``log.csv`` exactly up to the
resumed epoch (rows of epochs after the checkpoint are dropped, as those epochs are redone).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any

from colabx._io import atomic_write_text

__all__ = ["RunLog"]

COLUMNS = ("epoch", "iteration", "train_loss", "meta_l_seg", "meta_l_roi", "meta_v_norm",
           "meta_skipped", "lr", "gen_lr", "val_dsc", "val_sensitivity", "val_precision",
           "epoch_time", "data_time")


class RunLog:
    """Per-epoch rows written to ``log.csv``, TensorBoard (``tensorboard/``) and
    ``progress.png`` in the run directory."""

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]] | None = None,
                 tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # a declared dependency, but a bare GPU box may lack it
                warnings.warn("tensorboard is not installed: no TensorBoard events for this run "
                              "(log.csv and progress.png are still written)", stacklevel=2)
            else:
                # Scalars are logged at step = epoch (1-based): a run resumed after epoch N
                # redoes the epochs from N + 1 on, so the events of those steps are dropped.
                done = int(self.rows[-1]["epoch"]) if self.rows else 0
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                         purge_step=done + 1 if done else None)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["epoch"])
            self._tb.flush()
        self.write()

    def write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
        atomic_write_text(self.run_dir / "log.csv", buf.getvalue())
        from colabx.viz.figures import progress_figure

        progress_figure(self.rows, self.run_dir / "progress.png")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v
