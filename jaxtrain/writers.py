"""Metric writers: JSONL, CSV and TensorBoard event files, written as records arrive.

Every writer takes the log records `jaxtrain.fit` emits — flat dicts such as
``{"step": 40, "epoch": 1, "split": "train", "loss": 0.31, "accuracy": 0.9,
"grad_norm": 1.2, "learning_rate": 0.002, "examples_per_second": 5100.0}`` or
``{"step": 46, "epoch": 1, "split": "eval", "loss": 0.12, "accuracy": 0.97}`` — through
``write(record)``, and is closed by ``close()`` or a ``with`` block:

Example:
    >>> with JsonlWriter("run/metrics.jsonl") as jl, CsvWriter("run/metrics.csv") as cw, \
    ...         TensorBoardWriter("run/tb") as tb:  # doctest: +SKIP
    ...     state, history = jaxtrain.fit(state, train_step, data, epochs=3,
    ...                                   writers=[jl, cw, tb])

What must not live here: when to log (`jaxtrain.train_log`, `fit`) and plots
(`jaxtrain.apps.plots`). It never imports the loop, the applications (`jaxtrain.apps`,
`jaxtrain.contrast`) or torch. (It was `jaxtrain.logging`, a name that shadowed the standard
library's.)
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar


def json_safe(value: Any) -> Any:
    """``value`` made fit for strict JSON: non-finite floats become None (``null``).

    JSON has no NaN or Infinity; Python's ``json`` writes them as bare ``NaN`` /
    ``Infinity`` tokens that strict parsers (``jq``, JavaScript, Go, Rust's serde) reject,
    so one diverged value would make a whole file unreadable. Numpy scalars and arrays
    become Python numbers and lists; dicts, lists and tuples are converted recursively.
    Every JSON file jaxtrain writes goes through this and ``json.dumps(...,
    allow_nan=False)``.

    Args:
        value: a JSON-ready value, possibly holding NaN/Inf floats or numpy values.

    Returns:
        The same structure with each non-finite float replaced by None.

    Example:
        >>> import json, numpy as np
        >>> json.dumps(json_safe({"loss": float("nan"), "acc": np.float32(0.5), "l": [np.inf]}),
        ...            allow_nan=False)
        '{"loss": null, "acc": 0.5, "l": [null]}'
    """
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy / jax values
        return json_safe(value.tolist())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of `json_safe` ``(value)`` with ``allow_nan=False``: strict JSON text.

    Args:
        value: what to write.
        **kwargs: passed to ``json.dumps`` (e.g. ``indent=2``).

    Returns:
        The JSON text, with ``null`` where a value was NaN or infinite.

    Example:
        >>> dumps_strict({"step": 3, "loss": float("inf")})
        '{"step": 3, "loss": null}'
    """
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


_W = TypeVar("_W", bound="_FileWriter")


class _FileWriter:
    """What the file writers share: ``self._f`` closed by `close` and by ``with``."""

    _f: Any

    def close(self) -> None:
        """Closes the file (every record written so far is already flushed)."""
        self._f.close()

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlWriter(_FileWriter):
    """Appends each record to ``path`` as one JSON line, flushed at once.

    The file is strict JSON Lines: a NaN or infinite value (a diverged loss) is written
    as ``null`` (`json_safe`), never as a ``NaN``/``Infinity`` token.

    Args:
        path: the file (its folder must exist and be writable).
        mode: ``"w"`` to start afresh, ``"a"`` to append (resume).

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "metrics.jsonl")
        >>> with JsonlWriter(path) as w:  # or jaxtrain.fit(..., writers=[w])
        ...     w.write({"step": 1, "split": "train", "loss": 2.5})
        >>> print(open(path).read().strip())
        {"step": 1, "split": "train", "loss": 2.5}
        >>> tmp.cleanup()
    """

    def __init__(self, path: str | os.PathLike, mode: str = "w"):
        self.path = os.fspath(path)
        self._f = open(self.path, mode, encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        # Strict JSON: a non-finite value (a diverged loss) is written as null, so
        # every line stays readable by any JSON parser.
        self._f.write(dumps_strict(record) + "\n")
        self._f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a metrics.jsonl file back into a list of dicts.

    Args:
        path: a file written by `JsonlWriter` (one JSON object per line).

    Returns:
        One dict per line, in file order (``null``, a value that was NaN or infinite
        when written, reads back as None).

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "metrics.jsonl")
        >>> with JsonlWriter(path) as w:
        ...     w.write({"step": 1, "split": "train", "loss": 2.5})
        ...     w.write({"step": 1, "split": "eval", "accuracy": 0.5})
        >>> read_jsonl(path)
        [{'step': 1, 'split': 'train', 'loss': 2.5}, {'step': 1, 'split': 'eval', 'accuracy': 0.5}]
        >>> tmp.cleanup()
    """
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def member_columns(record: Mapping[str, Any], skip_missing: bool = False) -> dict[str, Any]:
    """``record`` with each list of N values (a population's metric) as N named values.

    A population run (`jaxtrain.population`) logs ``{"loss": [N values]}``: CSV and
    TensorBoard get one column / series per member, ``loss/member_0`` ... (the index
    zero-padded to N's width, so the names sort: ``member_07`` when N > 10). Other
    values are kept as they are.

    Args:
        record: a log record.
        skip_missing: leave out members' None/NaN values (a member frozen for the
            whole interval has no value: TensorBoard gets no point rather than a NaN).

    Returns:
        The flat record.

    Example:
        >>> member_columns({"step": 2, "loss": [0.5, 0.25], "active": [True, False]})
        {'step': 2, 'loss/member_0': 0.5, 'loss/member_1': 0.25, 'active/member_0': True, 'active/member_1': False}
    """
    out: dict[str, Any] = {}
    for k, v in record.items():
        if isinstance(v, (list, tuple)):
            width = len(str(max(len(v) - 1, 0)))
            for i, x in enumerate(v):
                if skip_missing and (x is None or (isinstance(x, float) and math.isnan(x))):
                    continue
                out[f"{k}/member_{i:0{width}d}"] = x
        else:
            out[k] = v
    return out


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)  # shortest round-trip text; nan/inf as 'nan'/'inf' (float() reads them)
    return v


class CsvWriter(_FileWriter):
    """Writes records as rows of a CSV file with a header, flushed at once.

    Records need not have the same keys (eval records have no ``grad_norm``, a custom
    loss may add a metric later): a missing value is an empty cell. The header is the
    union of the keys seen so far, in order of first appearance (``step``, ``epoch``,
    ``split`` first when present). When a record brings a key the header lacks, the file
    is rewritten once with the wider header — earlier rows get empty cells in the new
    column — so the file is always one valid CSV table that spreadsheet tools and
    ``pandas.read_csv`` read directly. Rewrites happen only when a new key first
    appears, not per record. With ``columns=...`` the header is fixed instead and other
    keys are left out (no rewrites ever).

    Args:
        path: the file (its folder must exist and be writable).
        mode: ``"w"`` to start afresh, ``"a"`` to append (resume: the existing header is
            read back and kept, and widened if needed).
        columns: a fixed header; None (default) grows the header as described.

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "metrics.csv")
        >>> with CsvWriter(path) as w:
        ...     w.write({"step": 1, "split": "train", "loss": 2.3})
        ...     w.write({"step": 1, "split": "eval", "loss": 2.2, "accuracy": 0.2})
        >>> print(open(path).read().strip())
        step,split,loss,accuracy
        1,train,2.3,
        1,eval,2.2,0.2
        >>> tmp.cleanup()
    """

    _FIRST = ("step", "epoch", "split")

    def __init__(
        self,
        path: str | os.PathLike,
        mode: str = "w",
        columns: Sequence[str] | None = None,
    ):
        if mode not in ("w", "a"):
            raise ValueError(f"CsvWriter mode must be 'w' or 'a'; got {mode!r}.")
        self.path = os.fspath(path)
        self.fixed = columns is not None
        self.columns: list[str] = list(columns) if columns is not None else []
        if mode == "a" and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if self.fixed and header != self.columns:
                raise ValueError(
                    f"CsvWriter: {self.path} has columns {header} but columns={self.columns} "
                    "was given. Fix: append with the file's columns, or write a new file."
                )
            self.columns = header
            self._f = open(self.path, "a", newline="", encoding="utf-8")
        else:
            self._f = open(self.path, "w", newline="", encoding="utf-8")
            if self.columns:
                self._writer().writeheader()
                self._f.flush()

    def _writer(self) -> csv.DictWriter:
        return csv.DictWriter(self._f, self.columns, extrasaction="ignore", restval="")

    def _widen(self, new: list[str]) -> None:
        """Rewrites the file with ``new`` appended to the header."""
        self._f.close()
        rows: list[dict] = []
        if self.columns:
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        merged = self.columns + new
        first = [c for c in self._FIRST if c in merged]
        self.columns = first + [c for c in merged if c not in first]
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, self.columns, restval="")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)  # never a half-written table
        self._f = open(self.path, "a", newline="", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        record = member_columns(record)  # a population's [N] values: one column each
        if not self.fixed:
            new = [k for k in record if k not in self.columns]
            if new:
                self._widen(new)
        self._writer().writerow({k: _csv_value(v) for k, v in record.items()})
        self._f.flush()


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Reads a `CsvWriter` file back: numbers as int/float, ``split`` as text, empty cells left out.

    Args:
        path: a CSV file with a header row (as `CsvWriter` writes it).

    Returns:
        One dict per row, in file order, without the row's empty cells.

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = os.path.join(tmp.name, "metrics.csv")
        >>> with CsvWriter(path) as w:
        ...     w.write({"step": 1, "split": "train", "loss": 2.3})
        ...     w.write({"step": 1, "split": "eval", "accuracy": 0.2})
        >>> read_csv(path)
        [{'step': 1, 'split': 'train', 'loss': 2.3}, {'step': 1, 'split': 'eval', 'accuracy': 0.2}]
        >>> tmp.cleanup()
    """

    def parse(v: str) -> Any:
        try:
            return int(v)
        except ValueError:
            pass
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: parse(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


_WRITER_IDS = itertools.count()


class TensorBoardWriter:
    """Writes each numeric metric as a TensorBoard scalar, tagged ``"{split}/{name}"``.

    Uses `tensorboardX <https://github.com/lanpa/tensorboardX>`_ (a small library with no
    TensorFlow dependency; ``pip install 'jaxtrain[tensorboard]'``) to write
    ``events.out.tfevents.*`` files into ``logdir``; view
    them with ``tensorboard --logdir LOGDIR`` (``pip install tensorboard``). A record
    ``{"step": 40, "split": "train", "loss": 0.31, "accuracy": 0.9}`` becomes the scalars
    ``train/loss`` and ``train/accuracy`` at step 40; ``step``, ``epoch`` and ``split``
    themselves are not logged, nor non-numeric values. Records without ``split`` use
    ``default_split``. Each record is flushed at once, so TensorBoard shows a live run.

    Args:
        logdir: the folder for event files (created if missing). Point several runs'
            writers at sibling folders (``runs/a/tb``, ``runs/b/tb``) and start
            TensorBoard on their parent to compare them.
        default_split: tag prefix for records without a ``split`` key.
        purge_step: for a resumed run: TensorBoard then drops the events of earlier files
            at steps >= this (logged before an interruption and logged again now), so
            no step appears twice. `jaxtrain train --resume` passes checkpoint step + 1.

    Raises:
        ImportError: tensorboardX is not installed (the message says how to install it).

    Example:
        >>> import os, tempfile
        >>> tmp = tempfile.TemporaryDirectory()
        >>> logdir = os.path.join(tmp.name, "tensorboard")
        >>> with TensorBoardWriter(logdir) as tb:
        ...     tb.write({"step": 10, "split": "train", "loss": 1.7})  # scalar train/loss
        >>> [f.startswith("events.out.tfevents") for f in os.listdir(logdir)]
        [True]
        >>> tmp.cleanup()
    """

    _NOT_SCALARS = ("step", "epoch", "split")

    def __init__(
        self,
        logdir: str | os.PathLike,
        default_split: str = "train",
        purge_step: int | None = None,
    ):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoardWriter needs the tensorboardX package, which is not installed. "
                "Fix: pip install 'jaxtrain[tensorboard]' (or pip install 'tensorboardX>=2.6')."
            ) from None
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self.default_split = default_split
        if purge_step is not None and (
            isinstance(purge_step, bool) or not isinstance(purge_step, int) or purge_step < 0
        ):
            raise ValueError(
                f"purge_step must be a step number >= 0 or None; got {purge_step!r}. "
                "Fix: pass the first step the resumed run will log, e.g. checkpoint step + 1."
            )
        # purge_step: TensorBoard drops the older files' events at steps >= purge_step,
        # which a resumed run logs again (the steps between its checkpoint and the kill).
        # The file name has the time in whole seconds: a second writer in the same second
        # would overwrite the first file without a distinct suffix.
        suffix = f".{os.getpid()}.{next(_WRITER_IDS)}"
        self._w = SummaryWriter(
            logdir=self.logdir, flush_secs=3600, purge_step=purge_step, filename_suffix=suffix
        )

    def write(self, record: Mapping[str, Any]) -> None:
        if "step" not in record:
            raise ValueError(
                f"TensorBoardWriter needs a 'step' in every record; got keys {sorted(record)}."
            )
        step = int(record["step"])
        split = record.get("split", self.default_split)
        record = member_columns(record, skip_missing=True)  # a population: a series each
        for k, v in record.items():
            if k in self._NOT_SCALARS or isinstance(v, bool) or not isinstance(v, numbers.Real):
                continue
            self._w.add_scalar(f"{split}/{k}", float(v), step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
