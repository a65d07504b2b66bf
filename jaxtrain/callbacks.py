"""The callback protocol of `fit`, the user hooks, the log writers and the progress bar.

Lives here: `Callback` (the events, each a no-op by default), `CallbackList` (delivers an
event to every callback in order), `PeriodicHook` / `EventHook` (the ``hooks=`` of
`fit`) and two small built-in callbacks (writers, progress bar). Must not live here:
device reads, the metric read-back (`jaxtrain.train_log`), evaluation
(`jaxtrain.evaluation`), checkpoints (`jaxtrain.checkpointing`). This module never
imports the loop, the CLI, the job or torch.

Events, in the order a run sees them::

    on_train_begin                      once (a resumed run is restored by then)
    per call:  on_call_begin -> (the step runs) -> on_call_end
               (on_log / on_eval_end when a logging point / an evaluation happens)
    on_epoch_end                        after an epoch's last call
    on_loop_end                         the last call ran; before the closing records
    on_train_end                        closing log record, final evaluation, hooks
    on_exit                             always, also on an error; in reverse order
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from jaxtrain.loop_state import History, LoopState
from jaxtrain.state import TrainState


class Callback:
    """Base class of `fit`'s callbacks: override the events you need (all are no-ops).

    `fit(..., callbacks=[...])` delivers each event to its built-in callbacks first
    (train log, evaluation, checkpoints, writers, ``hooks=``, early stopping), then to
    yours in list order; ``on_exit`` goes in reverse order. So at an event your
    callback sees `fit`'s own work for it done: the log record, the evaluation, the
    checkpoint. Read ``loop.metrics`` / ``loop.pending`` only in ``on_log``-like
    moments: each read of a device value is a host sync. Set ``loop.stop = True`` to end
    training after the current call.

    The events: ``on_train_begin`` before the first call (a resumed run is restored);
    ``on_call_begin`` before each dispatched call (``loop.state`` is still the previous
    step's; the call donates it); ``on_call_end`` after each call of
    ``loop.call_steps`` steps (``loop.prev_step`` -> ``loop.step``;
    ``loop.crossed(every)`` tells whether a period of ``every`` steps ended in it);
    ``on_log`` when a train record was read back (a logging point); ``on_eval_end``
    when an evaluation finished (its record is in ``loop.history.eval``);
    ``on_epoch_end`` after an epoch's last call, its evaluation and checkpoint (not sent
    when the step budget ends training on an epoch's last step; an
    ``EventHook("epoch_end")`` still fires then, at the train end); ``on_loop_end``
    when the last call ran (budget, epochs, early stopping or a ``stop`` request: a
    checkpoint saved here holds what a resumed run needs); ``on_train_end`` after the
    closing log record and final evaluation; ``on_exit`` always, also when an
    exception ends `fit` (release resources there).

    Event arguments:
        loop: every event's argument: the `LoopState` of this `fit` call.
        record: ``on_log`` and ``on_eval_end`` also get the new train or eval record.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> class StopAt(jt.Callback):
        ...     def __init__(self, step):
        ...         self.at, self.calls = step, 0
        ...     def on_call_end(self, loop):
        ...         self.calls += 1
        ...         loop.stop = loop.step >= self.at
        >>> opt = optax.sgd(0.1)
        >>> step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
        >>> state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> data = jt.ArrayDataset({"x": np.ones((12, 2), np.float32)}, 2)
        >>> stop = StopAt(4)
        >>> state, history = jt.fit(state, step, data, epochs=3, callbacks=[stop],
        ...                         progress=False)
        >>> int(state.step), stop.calls, history.position
        (4, 4, DataPosition(epoch=0, index=4))
    """

    def on_train_begin(self, loop: LoopState) -> None:
        """Before the first call."""

    def on_call_begin(self, loop: LoopState) -> None:
        """Before each dispatched call."""

    def on_call_end(self, loop: LoopState) -> None:
        """After each dispatched call."""

    def on_log(self, loop: LoopState, record: dict) -> None:
        """A train record was read back."""

    def on_eval_end(self, loop: LoopState, record: dict) -> None:
        """An evaluation finished."""

    def on_epoch_end(self, loop: LoopState) -> None:
        """After an epoch's last call."""

    def on_loop_end(self, loop: LoopState) -> None:
        """The last call ran."""

    def on_train_end(self, loop: LoopState) -> None:
        """After the closing log record and evaluation."""

    def on_exit(self, loop: LoopState) -> None:
        """Always, last (also on an error)."""


class CallbackList:
    """Delivers each event to every callback, in order (``on_exit``: in reverse order)."""

    def __init__(self, callbacks: Sequence[Callback]):
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be jaxtrain.Callback objects; got {type(cb).__name__}. "
                    "Fix: subclass jaxtrain.Callback and override the events you need."
                )
        self.callbacks = list(callbacks)

    def on_train_begin(self, loop: LoopState) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(loop)

    def on_call_begin(self, loop: LoopState) -> None:
        for cb in self.callbacks:
            cb.on_call_begin(loop)

    def on_call_end(self, loop: LoopState) -> None:
        for cb in self.callbacks:
            cb.on_call_end(loop)

    def on_log(self, loop: LoopState, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_log(loop, record)

    def on_eval_end(self, loop: LoopState, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_eval_end(loop, record)

    def on_epoch_end(self, loop: LoopState) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(loop)

    def on_loop_end(self, loop: LoopState) -> None:
        for cb in self.callbacks:
            cb.on_loop_end(loop)

    def on_train_end(self, loop: LoopState) -> None:
        for cb in self.callbacks:
            cb.on_train_end(loop)

    def on_exit(self, loop: LoopState) -> None:
        """Every callback's ``on_exit``, newest first, each even if an earlier one raised."""
        error = None
        for cb in reversed(self.callbacks):
            try:
                cb.on_exit(loop)
            except Exception as e:  # the first error wins; the others still clean up
                error = error or e
        if error is not None:
            raise error


@dataclasses.dataclass(frozen=True)
class Every:
    """A cadence: every ``steps`` training steps, or every ``epochs`` epochs.

    Attributes:
        steps: the period in steps (a call of K fused steps that crosses a multiple
            counts once).
        epochs: the period in epochs (at the end of epochs 1·n, 2·n, ..., counted from 1).

    Example:
        >>> Every(steps=100), Every(epochs=2)
        (Every(steps=100, epochs=None), Every(steps=None, epochs=2))
        >>> Every(steps=0)
        Traceback (most recent call last):
        ...
        ValueError: Every needs one period >= 1, steps or epochs; got steps=0, epochs=None. Fix: Every(steps=100) or Every(epochs=1).
    """

    steps: int | None = None
    epochs: int | None = None

    def __post_init__(self):
        given = [v for v in (self.steps, self.epochs) if v is not None]
        if len(given) != 1 or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in given
        ):
            raise ValueError(
                f"Every needs one period >= 1, steps or epochs; got steps={self.steps!r}, "
                f"epochs={self.epochs!r}. Fix: Every(steps=100) or Every(epochs=1)."
            )

    def after_call(self, loop: LoopState) -> bool:
        """Whether a step period ended in the call that just ran."""
        return self.steps is not None and loop.crossed(self.steps)

    def at_epoch_end(self, loop: LoopState) -> bool:
        """Whether an epoch period ends with the epoch that just ended."""
        return self.epochs is not None and (loop.epoch + 1) % self.epochs == 0


class PeriodicCallback(Callback):
    """A callback whose `on_period` runs at a cadence: ``every=Every(steps=...)`` or epochs.

    Subclass it and implement `on_period`; the other events stay available. A step
    period is checked after each call; an epoch period at each epoch end (after the
    epoch's evaluation and checkpoint).

    Args:
        every: an `Every`, or an int for a period in steps.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> class Seen(PeriodicCallback):
        ...     def __init__(self, every):
        ...         super().__init__(every)
        ...         self.steps = []
        ...     def on_period(self, loop):
        ...         self.steps.append(loop.step)
        >>> opt = optax.sgd(0.1)
        >>> step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
        >>> state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> data = jt.ArrayDataset({"x": np.ones((8, 2), np.float32)}, 2)  # 4 steps an epoch
        >>> by_steps, by_epochs = Seen(3), Seen(Every(epochs=2))
        >>> _ = jt.fit(state, step, data, epochs=4, callbacks=[by_steps, by_epochs],
        ...            progress=False)
        >>> by_steps.steps, by_epochs.steps
        ([3, 6, 9, 12, 15], [8, 16])
    """

    def __init__(self, every: Every | int):
        self.every = every if isinstance(every, Every) else Every(steps=every)

    def on_period(self, loop: LoopState) -> None:
        """Runs once per period (override it)."""

    def on_call_end(self, loop: LoopState) -> None:
        if self.every.after_call(loop):
            self.on_period(loop)

    def on_epoch_end(self, loop: LoopState) -> None:
        if self.every.at_epoch_end(loop):
            self.on_period(loop)


@dataclasses.dataclass(frozen=True)
class PeriodicHook:
    """Calls ``fn(state, history)`` every ``every_steps`` steps or ``every_epochs`` epochs.

    The hook runs on the host between dispatches; reading arrays from ``state`` inside
    it is a host sync, so keep the period large for hooks that do.

    Attributes:
        every_steps: call ``fn`` whenever the global step crosses a multiple of this
            (None with ``every_epochs``).
        fn: ``fn(state, history)``, given the current `TrainState` and `History`.
        every_epochs: instead, call ``fn`` at the end of every epoch whose number
            (counted from 1) is a multiple of this, after its evaluation and checkpoint.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> opt = optax.sgd(0.1)
        >>> step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
        >>> state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> seen = []
        >>> hook = PeriodicHook(2, lambda state, history: seen.append(int(state.step)))
        >>> data = jt.ArrayDataset({"x": np.ones((12, 2), np.float32)}, 2)
        >>> _ = jt.fit(state, step, data, epochs=1, hooks=[hook], progress=False)
        >>> seen
        [2, 4, 6]
    """

    every_steps: int | None
    fn: Callable[[TrainState, History], None]
    every_epochs: int | None = None

    def __post_init__(self):
        if (self.every_steps is None) == (self.every_epochs is None):
            raise ValueError(
                f"PeriodicHook needs one cadence, every_steps or every_epochs; got "
                f"every_steps={self.every_steps!r}, every_epochs={self.every_epochs!r}. Fix: "
                "PeriodicHook(100, fn) (steps) or PeriodicHook(None, fn, every_epochs=2)."
            )
        for name in ("every_steps", "every_epochs"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1
            ):
                unit = "training steps" if name == "every_steps" else "epochs"
                raise ValueError(
                    f"PeriodicHook {name} must be an integer >= 1 ({unit}); got {v!r}. "
                    "Fix: PeriodicHook(100, fn) calls fn every 100 steps."
                )
        if not callable(self.fn):
            raise TypeError(
                f"PeriodicHook fn must be callable as fn(state, history); got "
                f"{type(self.fn).__name__}."
            )


HOOK_EVENTS = ("epoch_end", "eval_end")


@dataclasses.dataclass(frozen=True)
class EventHook:
    """Calls ``fn(state, history)`` after an event of the loop.

    Events: ``"epoch_end"`` (after an epoch's last step, its evaluation and its
    checkpoint) and ``"eval_end"`` (after each evaluation, its record already in
    ``history.eval``).

    Order at a step: every hook due at a step (a `PeriodicHook` whose period the step
    crosses, an ``eval_end`` or ``epoch_end`` event there) runs once, in the order of
    ``fit(hooks=...)``, after all of `fit`'s own work for that step: its log record, its
    evaluation, its checkpoint. So a hook at an epoch end sees that epoch's evaluation:
    ``history.eval[-1]["step"] == state.step``.

    Attributes:
        on: ``"epoch_end"`` or ``"eval_end"``.
        fn: ``fn(state, history)``, given the current `TrainState` and `History`.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> opt = optax.sgd(0.1)
        >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
        >>> eval_fn = lambda p, b: {"err": jnp.abs(b["x"] @ p["w"])}
        >>> state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> seen = []
        >>> hook = EventHook("epoch_end", lambda s, h: seen.append((int(s.step), h.eval[-1]["step"])))
        >>> data = jt.ArrayDataset({"x": np.ones((8, 2), np.float32)}, 4)
        >>> _ = jt.fit(state, jt.make_train_step(loss_fn, opt), data, epochs=2,
        ...            eval_step=jt.make_eval_step(eval_fn), eval_data=data, hooks=[hook],
        ...            progress=False)
        >>> seen  # (step, step of the newest evaluation) at each epoch end
        [(2, 2), (4, 4)]
    """

    on: str
    fn: Callable[[TrainState, History], None]

    def __post_init__(self):
        if self.on not in HOOK_EVENTS:
            raise ValueError(
                f"EventHook on must be one of {list(HOOK_EVENTS)}; got {self.on!r}. Fix: "
                "EventHook('epoch_end', fn), or PeriodicHook(every_steps, fn) for a period."
            )
        if not callable(self.fn):
            raise TypeError(
                f"EventHook fn must be callable as fn(state, history); got "
                f"{type(self.fn).__name__}."
            )


class HookCallback(Callback):
    """One `PeriodicHook` or `EventHook` as a callback of one `fit` call.

    A hook becomes due at a step (its period crossed, or its event) and runs once at the
    next moment when all of `fit`'s work for that step is done: before the next call, at
    the epoch end (after its evaluation and checkpoint) or at the train end. Callbacks
    are told events in list order, so hooks due together run in the order of ``hooks=``.
    """

    def __init__(self, hook: PeriodicHook | EventHook):
        if not isinstance(hook, (PeriodicHook, EventHook)):
            raise TypeError(
                f"hooks must be PeriodicHook or EventHook objects; got {type(hook).__name__}. "
                "Fix: wrap the function, e.g. PeriodicHook(100, fn) or EventHook('epoch_end', fn)."
            )
        self.hook = hook
        self.due = False

    def _is(self, event: str) -> bool:
        return isinstance(self.hook, EventHook) and self.hook.on == event

    def _run_due(self, loop: LoopState) -> None:
        if self.due:
            self.due = False
            self.hook.fn(loop.state, loop.history)

    def on_call_begin(self, loop: LoopState) -> None:
        self._run_due(loop)  # the previous step was not an epoch's last: its work is done

    def on_call_end(self, loop: LoopState) -> None:
        hook = self.hook
        if isinstance(hook, PeriodicHook) and hook.every_steps is not None:
            self.due = self.due or Every(steps=hook.every_steps).after_call(loop)

    def _epoch_due(self, loop: LoopState) -> bool:
        hook = self.hook
        if isinstance(hook, PeriodicHook) and hook.every_epochs is not None:
            return Every(epochs=hook.every_epochs).at_epoch_end(loop)
        return self._is("epoch_end")

    def on_eval_end(self, loop: LoopState, record: dict) -> None:
        self.due = self.due or self._is("eval_end")

    def on_epoch_end(self, loop: LoopState) -> None:
        self.due = self.due or self._epoch_due(loop)
        self._run_due(loop)

    def on_train_end(self, loop: LoopState) -> None:
        per_epoch = loop.steps_per_epoch
        if per_epoch is not None and loop.index >= per_epoch:  # the budget ended an epoch
            self.due = self.due or self._epoch_due(loop)
        self._run_due(loop)


class Writer(Protocol):
    """Anything that takes log records (e.g. `jaxtrain.writers.JsonlWriter`)."""

    def write(self, record: Mapping[str, Any]) -> None: ...


class WriterCallback(Callback):
    """Gives every train and eval record to each writer (on process 0 only)."""

    def __init__(self, writers: Sequence[Writer], primary: bool):
        self.writers = list(writers) if primary else []

    def on_log(self, loop: LoopState, record: dict) -> None:
        for w in self.writers:
            w.write(record)

    def on_eval_end(self, loop: LoopState, record: dict) -> None:
        self.on_log(loop, record)


def loss_postfix(loss: float | list) -> dict[str, str]:
    """The bar's loss: the value, or for a population (N values) the best and the median.

    Members frozen for the whole interval (None / NaN) are left out.

    Example:
        >>> loss_postfix(0.5), loss_postfix([0.5, None, 0.25, 1.0])
        ({'loss': '0.5000'}, {'loss_best': '0.2500', 'loss_med': '0.5000'})
    """
    if not isinstance(loss, list):
        return {"loss": f"{loss:.4f}"}
    values = np.array([np.nan if v is None else v for v in loss], np.float64)
    if np.all(np.isnan(values)):
        return {"loss_best": "n/a", "loss_med": "n/a"}
    return {"loss_best": f"{np.nanmin(values):.4f}", "loss_med": f"{np.nanmedian(values):.4f}"}


class ProgressBar(Callback):
    """A tqdm bar of steps, with loss, examples/s (and TFLOP/s, MFU) at logging points."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None

    def on_train_begin(self, loop: LoopState) -> None:
        self.bar = tqdm(
            total=loop.planned_steps(),
            disable=not self.enabled,
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    def on_call_end(self, loop: LoopState) -> None:
        self.bar.update(loop.call_steps)

    def on_log(self, loop: LoopState, record: dict) -> None:
        ex_s = record["examples_per_second"]
        postfix = loss_postfix(record["loss"])
        postfix["ex_s"] = "n/a" if ex_s is None else f"{ex_s:.0f}"
        if "mfu" in record:
            mfu = "unknown" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
            achieved = record["model_flops_per_second"]
            postfix["tflops"] = "n/a" if achieved is None else f"{achieved / 1e12:.3g}"
            postfix["mfu"] = mfu
        self.bar.set_postfix(postfix, refresh=False)

    def on_exit(self, loop: LoopState) -> None:
        if self.bar is not None:
            self.bar.close()
