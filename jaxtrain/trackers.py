"""Experiment trackers as metric writers: MLflow (a local folder) and Weights & Biases (offline).

`MLflowWriter` and `WandbWriter` have the interface of `jaxtrain.writers`: ``write(record)``
for each log record `jaxtrain.fit` emits, ``close()`` or a ``with`` block at the end, so
they go in ``fit(..., writers=[...])`` next to the JSONL, CSV and TensorBoard writers.
Each numeric value of a record becomes a metric tagged ``"{split}/{name}"`` at the
record's ``step`` (``train/loss``, ``eval/accuracy``), as `TensorBoardWriter` tags its
scalars; ``step``, ``epoch``, ``split`` and non-numbers are not logged as metrics.

Neither package is a jaxtrain dependency: ``pip install 'jaxtrain[mlflow]'`` /
``'jaxtrain[wandb]'``. A writer whose package is missing raises ImportError with that
command. Neither writer needs a server: MLflow writes to a folder, W&B runs offline
unless told otherwise (``mode="online"``, or ``WANDB_MODE``), and ``wandb sync`` uploads
an offline run later.

What must not live here: when to log (`jaxtrain.train_log`, `fit`) and the run folder's
layout (`jaxtrain.apps.digits`). It never imports the loop, the applications or torch.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

from jaxtrain.writers import member_columns

_NOT_METRICS = ("step", "epoch", "split")


def _missing(writer: str, package: str, extra: str) -> ImportError:
    return ImportError(
        f"{writer} needs the {package} package, which is not installed. "
        f"Fix: pip install 'jaxtrain[{extra}]' (or pip install {package})."
    )


def tracker_available(name: str) -> bool:
    """Whether the package of tracker ``name`` (``"mlflow"`` or ``"wandb"``) can be imported.

    Checked without importing it (importing MLflow takes seconds), so a command-line
    option can refuse at once, before a run starts.

    Args:
        name: ``"mlflow"`` or ``"wandb"``.

    Returns:
        True when the package is installed.

    Example:
        >>> tracker_available("wandb") in (True, False)
        True
    """
    import importlib.util

    if name not in ("mlflow", "wandb"):
        raise ValueError(f"tracker name must be 'mlflow' or 'wandb'; got {name!r}.")
    return importlib.util.find_spec(name) is not None


class _TrackerWriter:
    """What the tracker writers share: the record -> metrics rule, ``with`` and close."""

    default_split: str = "train"
    _failed: bool = False

    @staticmethod
    def scalars(record: Mapping[str, Any], default_split: str = "train") -> tuple[int, dict]:
        """``(step, {"split/name": float})``: the metrics a log record holds.

        Args:
            record: a log record with a ``step`` (``{"step": 40, "split": "eval", ...}``).
            default_split: the tag prefix for a record without ``split``.

        Returns:
            The record's step and its numeric values (bools and text left out), each
            tagged ``"{split}/{name}"``; NaN and infinities are kept (a diverged loss
            shows as one). A population's list of N values becomes N metrics
            ``"{split}/{name}/member_{i}"`` (`jaxtrain.writers.member_columns`), a frozen
            member's missing values left out.

        Raises:
            ValueError: the record has no ``step``.
        """
        if "step" not in record:
            raise ValueError(
                f"a tracker writer needs a 'step' in every record; got keys {sorted(record)}. "
                "Fix: write the records jaxtrain.fit emits, or add the step."
            )
        split = record.get("split", default_split)
        record = member_columns(record, skip_missing=True)
        metrics = {
            f"{split}/{k}": float(v)
            for k, v in record.items()
            if k not in _NOT_METRICS and not isinstance(v, bool) and isinstance(v, numbers.Real)
        }
        return int(record["step"]), metrics

    def write(self, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._failed = exc_type is not None  # the tracker run is marked failed
        self.close()


def _mlflow_uri(tracking_uri: str | os.PathLike) -> tuple[str, bool]:
    """``(uri, is_a_local_folder)``: a path (no scheme) becomes an absolute ``file:`` URI."""
    text = os.fspath(tracking_uri)
    if text.startswith("file:"):
        return text, True
    if "://" in text or text.split(":", 1)[0] in ("sqlite", "databricks", "postgresql"):
        return text, False
    return "file://" + os.path.abspath(text), True


class MLflowWriter(_TrackerWriter):
    """Logs each record's metrics to an MLflow run, in a local folder by default.

    One MLflow run per writer, created at construction in experiment ``experiment``
    (created if missing) and ended by `close` (status FINISHED; FAILED when the ``with``
    block raised). ``params`` (say, the training configuration) are logged as the run's
    parameters. Metrics are logged as ``"{split}/{name}"`` at the record's step; view
    them with ``mlflow ui --backend-store-uri FOLDER`` or read them back with
    ``mlflow.tracking.MlflowClient(FOLDER).get_metric_history(run_id, "train/loss")``.

    MLflow 3 keeps its folder store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE=true``; for a local folder this writer sets that variable in
    its own process when it is unset (its database store would need SQLAlchemy, which
    ``mlflow-skinny`` does not install). ``mlflow ui`` on the folder needs the same
    variable. Any other URI (``sqlite:///mlflow.db``, ``http://host:5000``) is used as given.

    Args:
        tracking_uri: a local folder (created if missing), a ``file:`` URI or any MLflow
            tracking URI.
        experiment: the experiment's name.
        run_name: the run's name (None: MLflow picks one).
        params: logged once as the run's parameters (values as text).
        tags: the run's tags.
        default_split: the tag prefix for records without ``split``.

    Attributes:
        run_id: the MLflow run's id.
        tracking_uri: the resolved URI.

    Raises:
        ImportError: MLflow is not installed (the message says how to install it).

    Example:
        >>> MLflowWriter.scalars({"step": 40, "split": "train", "loss": 0.31, "epoch": 1})
        (40, {'train/loss': 0.31})
        >>> with MLflowWriter("runs/a/mlruns", params={"lr": 0.002}) as w:  # doctest: +SKIP
        ...     state, history = jaxtrain.fit(state, train_step, data, writers=[w])
        >>> from mlflow.tracking import MlflowClient  # doctest: +SKIP
        >>> [(m.step, m.value) for m in MlflowClient(w.tracking_uri).get_metric_history(
        ...     w.run_id, "train/loss")]  # doctest: +SKIP
        [(20, 1.7), (40, 0.31)]

        (Importing MLflow starts a process, which the docstring tests' tier does not
        allow; tests/test_trackers.py and docs/tracking.md run it.)
    """

    def __init__(
        self,
        tracking_uri: str | os.PathLike,
        experiment: str = "jaxtrain",
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        default_split: str = "train",
    ):
        try:
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("MLflowWriter", "mlflow", "mlflow") from None
        self.tracking_uri, local = _mlflow_uri(tracking_uri)
        if local:
            os.makedirs(self.tracking_uri[len("file://") :] or ".", exist_ok=True)
            # The folder store is what mlflow-skinny can write; MLflow 3 asks for this opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._metric = Metric
        self.default_split = default_split
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
        run = self._client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id: str = run.info.run_id
        if params:
            self._client.log_batch(
                self.run_id, params=[Param(str(k), str(v)) for k, v in params.items()]
            )
        self._tag = RunTag
        self._closed = False
        self._failed = False

    def write(self, record: Mapping[str, Any]) -> None:
        """Logs the record's metrics at its step (one batch call, written at once)."""
        import time

        step, metrics = self.scalars(record, self.default_split)
        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[self._metric(k, v, now, step) for k, v in metrics.items()]
        )

    def close(self) -> None:
        """Ends the run (FINISHED, or FAILED after an exception in the ``with`` block)."""
        if not self._closed:
            self._closed = True
            self._client.set_terminated(self.run_id, "FAILED" if self._failed else "FINISHED")


class WandbWriter(_TrackerWriter):
    """Logs each record's metrics to a Weights & Biases run, offline unless told otherwise.

    One W&B run per writer, started at construction (``wandb.init``) and finished by
    `close`. The x axis is jaxtrain's step: every metric is defined against a ``step``
    metric (``define_metric("*", step_metric="step")``), so train and eval records of the
    same step, or the repeated steps of a resumed run, never clash with W&B's own
    increasing ``_step``. Offline (the default) the run is a folder under
    ``DIR/wandb/offline-run-*`` that ``wandb sync`` uploads later; nothing contacts a
    server. ``mode="online"`` logs live (needs ``wandb login``); the ``WANDB_MODE``
    environment variable, when set, wins over ``mode``.

    Args:
        dir: the folder W&B writes its ``wandb/`` folder into (created if missing).
        project: the W&B project.
        name: the run's display name (None: W&B picks one).
        config: logged as the run's configuration.
        mode: ``"offline"`` (default), ``"online"`` or ``"disabled"``.
        default_split: the tag prefix for records without ``split``.

    Attributes:
        run: the ``wandb`` run.
        run_dir: the run's folder (holding ``run-<id>.wandb``).

    Raises:
        ImportError: wandb is not installed (the message says how to install it).

    Example:
        >>> WandbWriter.scalars({"step": 46, "split": "eval", "loss": 0.12, "accuracy": 0.97})
        (46, {'eval/loss': 0.12, 'eval/accuracy': 0.97})
        >>> with WandbWriter("runs/a", project="digits") as w:  # doctest: +SKIP
        ...     state, history = jaxtrain.fit(state, train_step, data, writers=[w])
    """

    def __init__(
        self,
        dir: str | os.PathLike,
        project: str = "jaxtrain",
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str = "offline",
        default_split: str = "train",
    ):
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(
                f"mode must be 'offline', 'online' or 'disabled'; got {mode!r}. "
                "Fix: mode='offline' writes a run folder that `wandb sync` uploads later."
            )
        try:
            import wandb
        except ImportError:
            raise _missing("WandbWriter", "wandb", "wandb") from None
        self.dir = os.fspath(dir)
        os.makedirs(self.dir, exist_ok=True)
        self.default_split = default_split
        self.run = wandb.init(
            dir=self.dir,
            project=project,
            name=name,
            config=dict(config or {}),
            mode=os.environ.get("WANDB_MODE") or mode,  # type: ignore[arg-type]
            reinit="create_new",  # one run per writer, even with another run open
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run_dir: str = os.path.dirname(self.run.dir)
        self._closed = False
        self._failed = False

    def write(self, record: Mapping[str, Any]) -> None:
        """Logs the record's metrics with its ``step`` as their x value."""
        step, metrics = self.scalars(record, self.default_split)
        self.run.log({"step": step, **metrics})

    def close(self) -> None:
        """Finishes the run (exit code 1 after an exception in the ``with`` block)."""
        if not self._closed:
            self._closed = True
            self.run.finish(exit_code=1 if self._failed else 0)
