"""Evaluation: `evaluate` over a data set, and `fit`'s evaluation and early stopping.

Lives here: `evaluate` (exact, mask-weighted metrics, one read-back), `EarlyStopping`
(the user's rule), and two callbacks: `Evaluator` (evaluates every ``every`` steps or at
epoch ends, and at the end) and `EarlyStop` (applies the rule to each evaluation).
Must not live here: training, checkpoints, writers. Never imports the loop, the CLI,
the job or torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxtrain import metrics as metrics_lib
from jaxtrain.callbacks import Callback, Every
from jaxtrain.data import ArrayDataset
from jaxtrain.ema import params_for_eval
from jaxtrain.feed import epoch_batches, host_checked, prefetch
from jaxtrain.grain_data import GrainData
from jaxtrain.loop_state import LoopState
from jaxtrain.losses import INVALID_COUNT_KEYS
from jaxtrain.parallel import data_mesh
from jaxtrain.state import TrainState
from jaxtrain.step import CompiledStep
from jaxtrain.train_log import TrainLog


def evaluate(
    eval_step: CompiledStep | Callable,
    state: TrainState,
    data: ArrayDataset | Iterable[Mapping[str, Any]],
    mesh: Mesh | None = None,
    *,
    eval_params: str = "params",
) -> dict[str, float]:
    """Exact, mask-weighted metrics over a whole data set.

    Sums are merged on the device and read back once at the end.

    Args:
        eval_step: from `make_eval_step`.
        state: the state to evaluate.
        data: an `ArrayDataset` (served in order, last batch padded; with several
            processes each reads its own rows) or an iterable of dict batches (with
            several processes: this process's rows of each batch).
        mesh: the data mesh (default: all devices).
        eval_params: ``"params"`` evaluates ``state.params``; ``"ema"`` their moving
            average, ``state.ema_params`` (`jaxtrain.ema`).

    Returns:
        ``{name: mean over all real examples}``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> model = jt.from_function(lambda p, x: x @ p["w"])  # logits [B, 2]
        >>> params = {"w": jnp.zeros((3, 2))}
        >>> state = jt.TrainState.create(params, optax.sgd(0.1), jax.random.key(0))
        >>> from jaxtrain.apps.tasks import classification_eval
        >>> eval_step = jt.make_eval_step(classification_eval(model))
        >>> data = {"x": np.ones((5, 3), np.float32), "y": np.array([0, 0, 0, 1, 1], np.int32)}
        >>> result = evaluate(eval_step, state, jt.ArrayDataset(data, 2, shuffle=False))
        >>> {k: round(v, 4) for k, v in sorted(result.items())}  # 5 examples, 3 batches
        {'accuracy': 0.6, 'loss': 0.6931}
    """
    state = params_for_eval(state, eval_params)
    mesh = data_mesh() if mesh is None else mesh
    batches: Iterable[Mapping[str, Any]]
    if isinstance(data, ArrayDataset):
        batches = epoch_batches(data, 0, 0, mesh)
    elif isinstance(data, GrainData):  # checked as it serves
        batches = data
    else:
        batches = host_checked(data, "eval_data")
    total = None
    for _, batch in prefetch(batches, mesh):
        sums = eval_step(state, batch)
        total = sums if total is None else _merge(total, sums)
    if total is None:
        raise ValueError("evaluate got no batches: the eval data set is empty.")
    if getattr(getattr(eval_step, "spec", None), "population", False):
        from jaxtrain.population_step import compute_members  # imports the step module

        return compute_members(total)  # type: ignore[return-value]  # {name: [N floats]}
    return metrics_lib.compute(total)


_merge = jax.jit(metrics_lib.merge)


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Stop when an eval metric has not improved for ``patience`` evaluations.

    Attributes:
        metric: name of an eval metric (e.g. ``"accuracy"`` or ``"loss"``).
        mode: ``"max"`` or ``"min"``.
        patience: evaluations without improvement before stopping (>= 1).
        min_delta: smallest change that counts as an improvement.

    Example:
        >>> stop = EarlyStopping("accuracy", "max", patience=2, min_delta=0.01)
        >>> stop.improved(0.95, best=0.90), stop.improved(0.905, best=0.90)
        (True, False)
        >>> # jaxtrain.fit(..., eval_step=..., eval_data=..., early_stopping=stop)
    """

    metric: str = "loss"
    mode: str = "min"
    patience: int = 5
    min_delta: float = 0.0

    def __post_init__(self):
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(
                f"EarlyStopping metric must be the name of an eval metric (e.g. 'loss'); "
                f"got {self.metric!r}."
            )
        if self.mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max'; got {self.mode!r}.")
        if (
            isinstance(self.patience, bool)
            or not isinstance(self.patience, (int, np.integer))
            or self.patience < 1
        ):
            raise ValueError(
                f"EarlyStopping patience must be >= 1; got {self.patience!r}. It is a whole "
                "number of evaluations without improvement. Fix: e.g. patience=5."
            )
        if (
            isinstance(self.min_delta, bool)
            or not isinstance(self.min_delta, (int, float, np.integer, np.floating))
            or not math.isfinite(self.min_delta)
            or self.min_delta < 0
        ):
            raise ValueError(
                f"EarlyStopping min_delta must be a finite number >= 0; got {self.min_delta!r}. "
                "It is the smallest improvement that counts, in the direction of mode (a "
                "negative one would count getting worse). Fix: min_delta=0.0 or a small "
                "positive number."
            )

    def improved(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta`` (None: always)."""
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta


def eval_metric_names(
    eval_step: CompiledStep | Callable, state: TrainState, eval_data: Any
) -> set[str] | None:
    """The metric names `evaluate` will report, known before training starts.

    An abstract evaluation (``jax.eval_shape``: no compilation, no device work) of the
    eval step on the first eval batch. It does not count as a trace of ``eval_step``.
    None when the names cannot be known without consuming the data (a one-shot
    iterator, a grain pipeline) or the step cannot be evaluated abstractly: the check
    then happens at the first evaluation.
    """
    batch: Mapping[str, Any]
    if isinstance(eval_data, ArrayDataset):
        batch = next(eval_data.batches(0))
    elif (
        isinstance(eval_data, Sequence) and len(eval_data) > 0 and isinstance(eval_data[0], Mapping)
    ):
        batch = eval_data[0]
    else:
        return None
    step = eval_step if isinstance(eval_step, CompiledStep) else None
    fn = eval_step if step is None else step.fn
    # An abstract evaluation is not a compilation: the step's trace_count stays.
    with contextlib.nullcontext() if step is None else step.uncounted():
        try:
            out = jax.eval_shape(fn, state, dict(batch))
        except Exception:  # the first evaluation reports it (or the same error) instead
            return None
    if not isinstance(out, Mapping):
        return None
    return {k for k in out if k not in INVALID_COUNT_KEYS}


class Evaluator(Callback):
    """Evaluates at a cadence (None: at each epoch end) and once at the end.

    ``every``: an int (steps) or an `Every` (steps or epochs); ``eval_params``: what
    `evaluate` evaluates (``"params"`` or ``"ema"``).

    Closes the train log's open interval first (its record comes before the eval
    record, and evaluation time is not training time), appends the record to
    ``history.eval`` and announces it with ``on_eval_end``.
    """

    def __init__(
        self,
        eval_step: Any,
        eval_data: Any,
        every: int | Every | None,
        mesh: Mesh,
        log: TrainLog,
        eval_params: str = "params",
    ):
        self.eval_step, self.eval_data, self.eval_params = eval_step, eval_data, eval_params
        self.every = Every(steps=every) if isinstance(every, int) else every
        self.mesh, self.log = mesh, log

    def run(self, loop: LoopState, epoch: int) -> None:
        """Evaluates ``loop.state`` now; the record's epoch is ``epoch``."""
        self.log.close(loop)
        record = {"step": loop.step, "epoch": epoch, "split": "eval"}
        record.update(
            evaluate(
                self.eval_step, loop.state, self.eval_data, self.mesh, eval_params=self.eval_params
            )
        )
        self.log.restart_clock()
        loop.history.eval.append(record)
        loop.callbacks.on_eval_end(loop, record)

    def on_call_end(self, loop: LoopState) -> None:
        if self.every is not None and self.every.after_call(loop):
            self.run(loop, loop.epoch)

    def on_epoch_end(self, loop: LoopState) -> None:
        if self.every is None or self.every.at_epoch_end(loop):
            self.run(loop, loop.epoch)

    def on_train_end(self, loop: LoopState) -> None:
        history = loop.history
        if not (history.eval and history.eval[-1]["step"] == loop.step):
            self.run(loop, loop.epoch - 1 if loop.index == 0 else loop.epoch)


class EarlyStop(Callback):
    """Applies an `EarlyStopping` rule to each evaluation; sets ``loop.stop`` when done.

    Its counters (``best``, ``bad_evals``) are saved in checkpoints and restored with
    them, so a resumed run stops where the uninterrupted one would.
    """

    def __init__(self, rule: EarlyStopping):
        self.rule = rule
        self.best: float | None = None
        self.bad_evals = 0

    def on_eval_end(self, loop: LoopState, record: dict) -> None:
        if self.rule.metric not in record:
            raise KeyError(
                f"early_stopping.metric={self.rule.metric!r} is not an eval metric; "
                f"available: {sorted(k for k in record if k not in ('step', 'epoch', 'split'))}."
            )
        value = record[self.rule.metric]
        if self.rule.improved(value, self.best):
            self.best, self.bad_evals = value, 0
            loop.history.best_eval = dict(record)
        else:
            self.bad_evals += 1
        loop.stop = loop.stop or self.bad_evals >= self.rule.patience

    def dump(self) -> dict[str, Any]:
        """The counters a checkpoint saves (restored by `load`)."""
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load(self, saved: Mapping[str, Any]) -> None:
        """Restores the counters `dump` gave (from a checkpoint's metadata)."""
        self.best, self.bad_evals = saved.get("best"), int(saved.get("bad_evals", 0))

    def on_loop_end(self, loop: LoopState) -> None:
        # Before the final evaluation, which updates the counters but never stops anything.
        loop.history.stopped_early = loop.stop and self.bad_evals >= self.rule.patience
