"""Curves of a population run: every member, their median and spread, the best highlighted.

A population run (``jaxtrain train --population N``, or `jaxtrain.fit` of a
`jaxtrain.population.PopulationState`) logs each metric as a list of N values per record.
`plot_population` draws, per metric, one thin line per member, the median over the members
as a thick line, the interquartile range as a band, and the best member in its own colour.
`jaxtrain.apps.plots` calls it for population records (``curves.png``, ``jaxtrain plot``).

What must not live here: writing the records (`jaxtrain.writers`), choosing the best member
of a run (`jaxtrain.population_fit.best_member`). Part of `jaxtrain.apps`: the core never
imports it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Metrics drawn on a log scale when every value is positive.
_LOG_SCALE = ("loss", "grad_norm")


def is_population(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the records are a population's (a ``loss`` or ``accuracy`` list per record).

    Args:
        records: log records (``metrics.jsonl``).

    Returns:
        True when a ``loss`` or ``accuracy`` value is a list (one value per member).

    Example:
        >>> is_population([{"step": 1, "split": "train", "loss": [0.5, 0.7]}])
        True
        >>> is_population([{"step": 1, "split": "train", "loss": 0.5}])
        False
    """
    return any(isinstance(r.get(m), list) for r in records for m in ("loss", "accuracy"))


def _float(v: Any) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def member_series(
    records: Sequence[Mapping[str, Any]], metric: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """The steps ``[T]`` and member values ``[T, N]`` of ``metric`` in ``split`` records.

    A null value (a frozen or diverged member) is NaN: a gap in its line.

    Args:
        records: a population's log records.
        metric: e.g. ``"loss"``.
        split: ``"train"`` or ``"eval"``.

    Returns:
        ``(steps [T], values [T, N])`` (empty arrays when no record has the metric).

    Example:
        >>> steps, values = member_series(
        ...     [{"step": 5, "split": "eval", "accuracy": [0.5, None]}], "accuracy", "eval")
        >>> steps.tolist(), values.tolist()
        ([5], [[0.5, nan]])
    """
    rows = [r for r in records if r.get("split") == split and isinstance(r.get(metric), list)]
    if not rows:
        return np.zeros(0), np.zeros((0, 0))
    n = max(len(r[metric]) for r in rows)
    values = np.full((len(rows), n), math.nan)
    for t, r in enumerate(rows):
        values[t, : len(r[metric])] = [_float(v) for v in r[metric]]
    return np.array([r["step"] for r in rows]), values


def best_of(records: Sequence[Mapping[str, Any]]) -> int | None:
    """The best member of a population's records, as ``jaxtrain train`` chooses it.

    The highest final eval accuracy; without one the lowest final eval loss, then the
    lowest final train loss; a member the last train record marks ``diverged`` never is.

    Args:
        records: a population's log records.

    Returns:
        The member's index, or None when no member has a finite value.

    Example:
        >>> best_of([{"step": 9, "split": "eval", "accuracy": [0.7, 0.9, 0.8]}])
        1
    """
    from jaxtrain.population_fit import best_member

    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    flags: list = next(
        (r["diverged"] for r in reversed(train) if isinstance(r.get("diverged"), list)), []
    )
    diverged = [i for i, d in enumerate(flags) if d]
    for recs, metric, mode in ((evals, "accuracy", "max"), (evals, "loss", "min")):
        if any(isinstance(r.get(metric), list) for r in recs):
            return best_member(recs, metric, mode, exclude=diverged)
    return best_member(train, "loss", "min", exclude=diverged)


def draw_population(
    ax: Any,
    records: Sequence[Mapping[str, Any]],
    metric: str,
    best: int | None,
    color: str = "C0",
    label: str = "",
) -> None:
    """One panel: ``metric``'s members (thin), median (thick), IQR band, best (red).

    Train records are solid, eval records dashed with dots. Each member line carries
    ``gid="member i"`` and the median ``gid="median"`` (tests read the drawn data back).
    """
    prefix = f"{label} " if label else ""
    for split, style in (("train", "-"), ("eval", "--o")):
        steps, values = member_series(records, metric, split)
        if not steps.size:
            continue
        for i in range(values.shape[1]):
            ax.plot(
                steps,
                values[:, i],
                style,
                color=color,
                alpha=0.25,
                linewidth=0.7,
                markersize=1.5,
                gid=f"{prefix}{split} member {i}",
            )
        with np.errstate(all="ignore"), _quiet_nan_warnings():
            median = np.nanmedian(values, axis=1)
            low, high = np.nanpercentile(values, [25, 75], axis=1)
        ax.fill_between(
            steps,
            low,
            high,
            color=color,
            alpha=0.2,
            linewidth=0,
            label=f"{prefix}{split} 25-75% of {values.shape[1]} members",
        )
        ax.plot(
            steps,
            median,
            style,
            color=color,
            linewidth=2.0,
            markersize=3,
            label=f"{prefix}{split} median",
            gid=f"{prefix}{split} median",
        )
        if best is not None and best < values.shape[1]:
            ax.plot(
                steps,
                values[:, best],
                style,
                color="crimson",
                linewidth=1.6,
                markersize=3,
                label=f"{prefix}{split} best (member {best})",
                gid=f"{prefix}{split} best",
            )


class _quiet_nan_warnings:
    """Silences numpy's "All-NaN slice" warning (a step where every member is frozen)."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._catch.__exit__(*exc)


def plot_population(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("loss", "accuracy"),
    title: str | None = None,
    best: int | None = None,
) -> str:
    """Draws a population's curves: one panel per metric (see `draw_population`).

    Args:
        records: the run's records (``metrics.jsonl``), each metric a list of N values.
        path: the image to write (``.png``, ``.svg``, ``.pdf``).
        metrics: the metrics to draw, one panel each (those without data are left out).
        title: figure title.
        best: the member to highlight (default: `best_of` the records).

    Returns:
        The path written.

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> records = [{"step": s, "split": "train", "loss": [1.0 / s, 2.0 / s, 3.0 / s]}
        ...            for s in (1, 2, 3)]
        >>> path = plot_population(records, os.path.join(tmp.name, "pop.png"))
        >>> os.path.getsize(path) > 0
        True
        >>> tmp.cleanup()
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    best = best_of(records) if best is None else best
    shown = [m for m in metrics if any(isinstance(r.get(m), list) for r in records)]
    if not shown:
        raise ValueError(f"none of the metrics {list(metrics)} has per-member values to draw.")
    ncols = 2 if len(shown) > 1 else 1
    nrows = (len(shown) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.0 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, shown, strict=False):
        draw_population(ax, records, m, best)
        finish_panel(ax, m)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def finish_panel(ax: Any, metric: str) -> None:
    """Title, axis label, grid and legend; a log scale for positive losses and norms."""
    from jaxtrain.apps.plots import _LABELS, _plain_log_scale

    ax.set_title(_LABELS.get(metric, metric))
    ax.set_xlabel("step")
    ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), float)]
    finite = [y for y in ys if math.isfinite(y)]
    if metric in _LOG_SCALE and finite and all(y > 0 for y in finite):
        _plain_log_scale(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
