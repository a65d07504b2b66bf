"""What one `fit` call shares between its loop and its callbacks: `LoopState` and `History`.

Lives here: plain host-side data (counters, the budget, the device metrics not read back
yet) and the small rules on it (where the data continues, whether a step period was
crossed). Must not live here: device reads, training logic, callbacks; this module never
imports the loop, the CLI, the job or torch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jaxtrain.data import DataPosition

if TYPE_CHECKING:  # annotations only: the callbacks module imports this one
    from jaxtrain.callbacks import CallbackList


@dataclasses.dataclass
class History:
    """What `fit` observed: log records and a few run totals (plain Python data).

    Attributes:
        train: one dict per logging interval: ``step``, ``epoch``, ``split="train"``, the
            mean of each metric over the interval (``learning_rate``: its last value) and
            ``examples_per_second`` over the interval's device-synchronised time (see
            ``steady_seconds``; the first call, which compiles, is left out: None for an
            interval holding only that call).
        eval: one dict per evaluation: ``step``, ``epoch``, ``split="eval"``, metrics.
        steps: training steps run by this call.
        examples: real (unpadded) training examples seen by this call.
        wall_seconds: wall time of the loop.
        first_step_seconds: wall time of the first step (tracing and compilation).
        stopped_early: whether `EarlyStopping` ended the run.
        best_eval: the eval record with the best early-stopping metric (or None).
        position: where the data iteration stands (resume from here).
        population: for a population run (`jaxtrain.population`), the report of
            `jaxtrain.population_fit.PopulationReport`: each member's seed,
            hyperparameters, state and final metrics, and the ``best`` member; None
            for a single run.
        steady_examples: examples seen after the first call (for throughput).
        steady_steps: steps run after the first call.
        steady_seconds: device-synchronised seconds of those steps: each logging
            interval runs from when its first step could start (the previous interval
            finished on the device, or its first step was dispatched, whichever is
            later) to when its last step finished on the device, so evaluation between
            intervals is not counted; checkpoints and hooks inside an interval are.
        compile_seconds: seconds this call spent tracing and compiling the train step
            (or loading it from the persistent cache), from JAX's compile events; 0.0
            when the step was compiled before (e.g. by `jaxtrain.perf.step_flops`; see
            ``CompiledStep.compile_seconds``) or is not a `CompiledStep`.

    Example:
        >>> h = History(steps=3, wall_seconds=3.0, first_step_seconds=1.0, steady_examples=64)
        >>> h.examples_per_second  # 64 examples after the compiling step, in 2 s
        32.0
        >>> h.to_dict()["position"]
        {'epoch': 0, 'index': 0}
    """

    train: list[dict] = dataclasses.field(default_factory=list)
    eval: list[dict] = dataclasses.field(default_factory=list)
    steps: int = 0
    examples: int = 0
    wall_seconds: float = 0.0
    first_step_seconds: float = 0.0
    stopped_early: bool = False
    best_eval: dict | None = None
    position: DataPosition = dataclasses.field(default_factory=DataPosition)

    steady_examples: int = 0
    steady_steps: int = 0
    steady_seconds: float = 0.0
    compile_seconds: float = 0.0
    population: dict | None = None

    @property
    def examples_per_second(self) -> float:
        """Throughput after the first (compiling) call; 0.0 if only one call ran.

        ``steady_examples / steady_seconds``: device-synchronised, the same time base as
        the train records' ``examples_per_second``. A `History` built by hand without
        ``steady_seconds`` falls back to the wall time after the first step.
        """
        t = self.steady_seconds or self.wall_seconds - self.first_step_seconds
        return self.steady_examples / t if t > 0 and self.steady_examples else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields plus ``examples_per_second``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["position"] = self.position.to_dict()
        d["examples_per_second"] = self.examples_per_second
        return d


def _no_callbacks() -> CallbackList:
    """An empty `CallbackList`: a LoopState made outside `fit` announces to no one."""
    from jaxtrain.callbacks import CallbackList  # that module imports this one

    return CallbackList([])


@dataclasses.dataclass
class LoopState:
    """The state of one `fit` call that its callbacks read and update (host data only).

    `fit` owns the counters: after each dispatched call it advances ``step`` and
    ``index`` by the call's ``call_steps`` and appends the call's device metrics to
    ``pending``. Callbacks read them, set ``stop`` to end training after the current
    call, and read ``metrics`` / ``pending`` only at logging points (reading a device
    value is a host sync).

    Attributes:
        state: the current `TrainState` (the step donates it: read it, never keep it).
        history: the `History` that `fit` returns.
        step: global training step after the newest call (``state.step``, on the host).
        epoch: the current epoch; during ``on_epoch_end`` the epoch that just ended.
        index: batches of ``epoch`` done.
        stop: set to True to end training after the current call.
        prev_step: ``step`` before the newest call (a call may run several steps).
        call_steps: training steps the newest call ran (K for fused steps).
        call_examples: real (unpadded) examples of the newest call.
        metrics: the newest call's metrics, on the device (stacked ``[K]`` for fused
            steps, of which the first ``call_steps`` are real).
        pending: device metrics of the calls since the last logging point, with the
            number of real steps of each: ``[(metrics, steps), ...]``.
        saved_step: the step of the newest checkpoint of this run (None: none yet).
        epochs, num_steps: the budget given to `fit` (None: not limited that way).
        steps_per_epoch: batches per epoch when the data knows it (else None).
        at_epoch_end: True during ``on_epoch_end``.
        callbacks: this fit's callbacks, for a callback that announces an event (the
            train log announces ``on_log``, evaluation ``on_eval_end``); none by default.
        clock: the loop's one clock (seconds; ``time.perf_counter``).
        call_started: ``clock()`` when the newest call was dispatched.

    Example:
        >>> loop = LoopState(state=None, history=History(), step=12, prev_step=8)
        >>> loop.crossed(5), loop.crossed(3), loop.crossed(None)  # 10 and 9, 12 are in (8, 12]
        (True, True, False)
        >>> loop.steps_per_epoch, loop.index = 6, 6
        >>> loop.position()  # the epoch is done: the data continues at the next one
        DataPosition(epoch=1, index=0)
    """

    state: Any
    history: History
    step: int = 0
    epoch: int = 0
    index: int = 0
    stop: bool = False
    prev_step: int = 0
    call_steps: int = 0
    call_examples: int = 0
    metrics: Any = None
    pending: list = dataclasses.field(default_factory=list)
    saved_step: int | None = None
    epochs: int | None = None
    num_steps: int | None = None
    steps_per_epoch: int | None = None
    at_epoch_end: bool = False
    callbacks: CallbackList = dataclasses.field(default_factory=_no_callbacks)
    clock: Callable[[], float] = time.perf_counter
    call_started: float = 0.0

    def crossed(self, every: int | None) -> bool:
        """Whether a multiple of ``every`` lies in ``(prev_step, step]`` (False for None)."""
        return every is not None and self.step // every > self.prev_step // every

    def position(self) -> DataPosition:
        """Where the training data continues: the next batch to read."""
        done = self.at_epoch_end or (
            self.steps_per_epoch is not None and self.index >= self.steps_per_epoch
        )
        return DataPosition(self.epoch + 1, 0) if done else DataPosition(self.epoch, self.index)

    def seek(self, position: DataPosition) -> None:
        """Starts the data at ``position`` (an index past the epoch's end: the next epoch)."""
        self.epoch, self.index = position.epoch, position.index
        start = self.position()
        self.epoch, self.index = start.epoch, start.index

    def planned_steps(self) -> int | None:
        """Steps left in the budget from here (None when the data's length is unknown)."""
        total = None if self.num_steps is None else max(self.num_steps - self.step, 0)
        if self.epochs is not None and self.steps_per_epoch is not None:
            by_epochs = max((self.epochs - self.epoch) * self.steps_per_epoch - self.index, 0)
            total = by_epochs if total is None else min(total, by_epochs)
        return total

    @property
    def last_epoch(self) -> float:
        """The epoch at which training ends (inf without ``epochs``)."""
        return math.inf if self.epochs is None else self.epochs
