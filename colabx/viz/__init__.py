"""Figures of a run: training progress and context-label snapshots (matplotlib, Agg backend)."""

from colabx.viz.figures import context_snapshot, progress_figure

__all__ = ["context_snapshot", "progress_figure"]
