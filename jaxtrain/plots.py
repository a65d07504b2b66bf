"""Loss and accuracy curves from log records, as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any


def plot_curves(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("loss", "accuracy"),
    title: str | None = None,
) -> str:
    """Draws one panel per metric, train and eval curves against the step.

    Args:
        records: log records with ``step``, ``split`` and metric values (as written
            to ``metrics.jsonl``).
        path: where to write the PNG.
        metrics: which metrics to draw (panels without data are left out).
        title: figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(m in r for r in records)]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(5 * max(len(shown), 1), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, m in zip(axes, shown, strict=False):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[m]) for r in records if r.get("split") == split and m in r]
            if pts:
                xs, ys = zip(*pts, strict=False)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(m)
        if m == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
