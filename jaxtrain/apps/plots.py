"""Training curves as images (matplotlib, no display needed).

`plot_curves` draws one run's records; `plot_runs` (``jaxtrain plot RUN_DIR ...``)
overlays the loss, accuracy, learning-rate and gradient-norm curves of several run folders.

What must not live here: writing the metric files (`jaxtrain.writers`). Part of
`jaxtrain.apps`: the core never imports it.
"""

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

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> records = [
        ...     {"step": 10, "split": "train", "loss": 2.0, "accuracy": 0.4},
        ...     {"step": 20, "split": "train", "loss": 1.0, "accuracy": 0.7},
        ...     {"step": 20, "split": "eval", "loss": 1.2, "accuracy": 0.6},
        ... ]
        >>> path = plot_curves(records, os.path.join(tmp.name, "curves.png"))
        >>> os.path.basename(path), os.path.getsize(path) > 0
        ('curves.png', True)
        >>> tmp.cleanup()
    """
    from jaxtrain.apps.population_plot import is_population, plot_population

    if is_population(records):  # N values per metric: members, median, spread, best
        return plot_population(records, path, metrics, title)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(m in r for r in records)]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(5 * max(len(shown), 1), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, m in zip(axes, shown, strict=False):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [
                (r["step"], _number(r[m])) for r in records if r.get("split") == split and m in r
            ]
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


def _number(v) -> float:
    """A logged value as a float: ``null`` (a non-finite value, written as strict JSON)
    and the text "nan"/"inf" of older files are NaN/inf, drawn as a gap."""
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


COMMAND = "plot"
RUN_METRICS = ("loss", "accuracy", "learning_rate", "grad_norm")
_FORMATS = (".png", ".svg", ".pdf")
_LABELS = {
    "loss": "loss",
    "accuracy": "accuracy",
    "learning_rate": "learning rate",
    "grad_norm": "gradient norm (global L2)",
}


def load_run(run_dir: str | os.PathLike) -> list[dict]:
    """The log records of a run folder (``RUN_DIR/metrics.jsonl``).

    Args:
        run_dir: a folder written by ``jaxtrain train --out RUN_DIR`` (or any folder
            holding a ``metrics.jsonl`` of `fit` records).

    Returns:
        The records, in file order.

    Raises:
        ValueError: the folder does not exist, has no ``metrics.jsonl``, or that file
            has no records; the message names the folder and the fix.
    """
    from jaxtrain.writers import read_jsonl

    run_dir = os.fspath(run_dir)
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise ValueError(
            f"{run_dir!r} is not a folder. Fix: pass run folders written by "
            "'jaxtrain train --out RUN_DIR'."
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"{run_dir!r} has no metrics.jsonl, so it is not a jaxtrain run folder (or the "
            "run has not logged yet). Fix: pass the --out folder of a 'jaxtrain train' run."
        )
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path} is empty: the run logged no metrics yet.")
    return records


def _run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Folder names; the paths as given where two folders share a name."""
    names = [os.path.basename(os.path.normpath(d)) or os.path.normpath(d) for d in run_dirs]
    return [
        os.path.normpath(d) if names.count(n) > 1 else n
        for d, n in zip(run_dirs, names, strict=True)
    ]


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    metrics: Sequence[str] = RUN_METRICS,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
    """Overlays the curves of several runs: one panel per metric, one colour per run.

    Train records are solid lines, eval records dashed lines with dots; loss and
    gradient norm use a log scale. Metrics no run logged are left out (the learning rate
    and gradient norm exist for train records only).

    Args:
        run_dirs: run folders, each with a ``metrics.jsonl`` (see `load_run`).
        path: the image to write; its suffix picks the format (``.png``, ``.svg``,
            ``.pdf``). Missing parent folders are created.
        metrics: the metrics to draw, in panel order.
        labels: legend names, one per run (default: the folder names).
        title: figure title.

    Returns:
        The path written.

    Raises:
        ValueError: no run folders, a folder without metrics, a count of ``labels``
            unlike that of ``run_dirs``, an unsupported suffix, or no drawable metric.

    Example:
        >>> import os, tempfile
        >>> from jaxtrain.writers import JsonlWriter
        >>> tmp = tempfile.TemporaryDirectory()
        >>> runs = [os.path.join(tmp.name, name) for name in ("adamw", "sgd")]
        >>> for run, scale in zip(runs, (1.0, 2.0)):  # what `jaxtrain train --out` writes
        ...     os.makedirs(run)
        ...     with JsonlWriter(os.path.join(run, "metrics.jsonl")) as w:
        ...         for step in (10, 20, 30):
        ...             w.write({"step": step, "split": "train", "loss": scale / step})
        >>> path = plot_runs(runs, os.path.join(tmp.name, "compare.png"), metrics=("loss",))
        >>> os.path.basename(path), os.path.getsize(path) > 0
        ('compare.png', True)
        >>> tmp.cleanup()
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run_dirs, path = _checked_plot_args(run_dirs, path, labels)
    runs = [load_run(d) for d in run_dirs]
    labels = list(labels) if labels is not None else _run_labels(run_dirs)
    shown = [m for m in metrics if any(m in r for recs in runs for r in recs)]
    if not shown:
        raise ValueError(f"none of the metrics {list(metrics)} is in the records of {run_dirs}.")

    ncols = 2 if len(shown) > 1 else 1
    nrows = (len(shown) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.0 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes.flat, shown, strict=False):
        _draw_runs(ax, m, labels, runs, colors)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _checked_plot_args(
    run_dirs: Sequence[str | os.PathLike], path: str | os.PathLike, labels: Sequence[str] | None
) -> tuple[list[str], str]:
    """`plot_runs`'s run folders and output path as strings, checked.

    Raises:
        ValueError: no run folders, an unsupported suffix, or a count of ``labels``
            unlike that of ``run_dirs``.
    """
    run_dirs = [os.fspath(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder; got none.")
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() not in _FORMATS:
        raise ValueError(
            f"the output file must end in {', '.join(_FORMATS)}; got {path!r}. "
            "Fix: e.g. --out compare.png."
        )
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(
            f"labels must name each of the {len(run_dirs)} runs; got {len(labels)} labels."
        )
    return [os.fspath(d) for d in run_dirs], os.fspath(path)


def _draw_runs(
    ax: Any, m: str, labels: Sequence[str], runs: Sequence[Sequence[Mapping]], colors: list
) -> None:
    """One panel: metric ``m`` of every run (one colour each), train solid, eval dashed.

    A population run (`jaxtrain.apps.population_plot`) is drawn as its members, their
    median and interquartile band in the run's colour, and its best member highlighted.
    """
    from jaxtrain.apps.population_plot import best_of, draw_population, is_population

    for i, (label, recs) in enumerate(zip(labels, runs, strict=True)):
        color = colors[i % len(colors)]
        if is_population(recs):
            draw_population(ax, recs, m, best_of(recs), color=color, label=label)
            continue
        for split, style in (("train", "-"), ("eval", "--o")):
            pts = [
                (r["step"], r[m])
                for r in recs
                if r.get("split") == split and isinstance(r.get(m), (int, float))
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=color,
                    label=f"{label} {split}",
                    markersize=3,
                    linewidth=1.4,
                )
    ax.set_title(_LABELS.get(m, m))
    ax.set_xlabel("step")
    if m in ("loss", "grad_norm") and all(
        y > 0 for line in ax.get_lines() for y in line.get_ydata()
    ):
        _plain_log_scale(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plain_log_scale(ax: Any) -> None:
    """A log y axis whose ticks read 0.4, not 4 x 10^-1."""
    import matplotlib.ticker

    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def add_plot_parser(subparsers: Any) -> Any:
    """Adds the ``plot`` subcommand to ``jaxtrain``'s subparsers (run it with `run_plot`)."""
    import argparse

    p = subparsers.add_parser(
        COMMAND,
        help="plot the curves of one or more run folders (overlaid) as PNG",
        description=(
            "Read RUN_DIR/metrics.jsonl of each run folder and draw loss, accuracy, learning "
            "rate and gradient norm against the step (train: solid, eval: dashed), the runs "
            "overlaid in one colour each and labelled by folder name. A population run "
            "(jaxtrain train --population N) is drawn as its members (thin), their median "
            "(thick) and interquartile band, and its best member (red)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (jaxtrain train --out)")
    p.add_argument("--out", default="plot.png", help="image to write (.png, .svg or .pdf)")
    p.add_argument(
        "--metrics",
        default=",".join(RUN_METRICS),
        help="comma-separated metrics to draw, one panel each",
    )
    p.add_argument("--title", default=None, help="figure title")
    return p


def run_plot(args: Any) -> int:
    """Runs ``jaxtrain plot``: 0 when the image was written, 2 with a message otherwise."""
    import sys

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        path = plot_runs(args.runs, args.out, metrics=metrics, title=args.title)
    except ValueError as e:
        print(f"jaxtrain plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(args.runs)} run(s): {', '.join(_run_labels(args.runs))})")
    return 0
