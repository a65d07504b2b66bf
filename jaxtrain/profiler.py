"""`Profile`: a `jax.profiler` trace of a range of training steps, as a `fit` callback.

``fit(..., profile=(start, stop, log_dir))`` (or ``profile=Profile(start, stop,
log_dir)``; ``jaxtrain train --profile START:STOP`` writes to ``OUT/profile``) starts
``jax.profiler.start_trace(log_dir)`` before the call that runs step ``start`` and
stops it after the call that completes step ``stop - 1``, once the device has finished
that work (``jax.block_until_ready`` on the state: dispatch is asynchronous, and a
trace stopped at dispatch would miss the steps it is meant to show). Each call in the
range is marked with a ``jax.profiler.StepTraceAnnotation`` (``"train"``,
``step_num``), which TensorBoard's profile plugin reads as step boundaries; the
compiled step appears as ``jit_train_step`` (``jit_train_steps`` for fused steps).

The trace lands in ``log_dir/plugins/profile/<timestamp>/``: ``*.xplane.pb`` for
TensorBoard (``tensorboard --logdir LOG_DIR``, Profile tab; needs the
``tensorboard-plugin-profile`` package) and ``perfetto_trace.json.gz`` for
https://ui.perfetto.dev (open the file there).

Start and stop are call boundaries: with fused steps (K per call) the range is widened
to whole calls: the trace begins with the call that runs step ``start`` (the first call
starting after ``start - K``) and ends after the first call ending at or after ``stop``.
A resumed run that starts after ``start`` is refused at its first call (once the
checkpoint is restored): the steps asked for ran in an earlier process. What must not live here: the loop (`jaxtrain.loop`). It never imports
the loop, the CLI or torch.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Any

import jax

from jaxtrain.callbacks import Callback
from jaxtrain.loop_state import LoopState

__all__ = ["Profile", "check_profile_range", "check_resumed_start", "parse_profile_range"]


def check_profile_range(start: Any, stop: Any, total_steps: int | None = None) -> None:
    """Refuses a step range ``[start, stop)`` that cannot be profiled.

    Args:
        start: first step to trace (an integer >= 0).
        stop: the step after the last one traced (an integer > ``start``).
        total_steps: the run's last step (``state.step`` at its end) when known; then
            ``stop`` must not exceed it.

    Returns:
        None: the range can be profiled.

    Raises:
        ValueError: naming the range, what is wrong and the fix.

    Example:
        >>> check_profile_range(10, 20, total_steps=100)
        >>> check_profile_range(20, 10)
        Traceback (most recent call last):
        ...
        ValueError: profile range start=20, stop=10 is empty: start must be below stop. ...
    """
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(
                f"profile {name} must be an integer step >= 0; got {v!r}. Fix: e.g. "
                "profile=(10, 20, 'out/profile') traces steps 10 to 19."
            )
    if start >= stop:
        raise ValueError(
            f"profile range start={start}, stop={stop} is empty: start must be below stop. "
            "Fix: e.g. (10, 20) traces steps 10 to 19 (a few steps after the first, "
            "compiling one)."
        )
    if total_steps is not None and stop > total_steps:
        raise ValueError(
            f"profile range start={start}, stop={stop} goes beyond the run's {total_steps} "
            f"steps, so the trace would never be stopped there. Fix: choose stop <= "
            f"{total_steps}."
        )


def check_resumed_start(start: int, stop: int, first_step: int) -> None:
    """Refuses a range that begins before a resumed run's ``first_step``.

    Those steps ran in an earlier process: tracing later ones instead would answer
    another question than the one asked.

    Args:
        start: first step of the profile range.
        stop: the step after the last one traced (named in the message and its fix).
        first_step: the step the run starts at (``state.step`` after a restore; 0 for a
            fresh run).

    Returns:
        None: the range can still be traced (``start >= first_step``).

    Raises:
        ValueError: ``start`` before ``first_step``, naming a range that can be traced.

    Example:
        >>> check_resumed_start(10, 20, first_step=10)
        >>> check_resumed_start(2, 5, first_step=10)
        Traceback (most recent call last):
        ...
        ValueError: profile range start=2, stop=5: this run starts at step 10 (resumed), ...
    """
    if first_step > start:
        raise ValueError(
            f"profile range start={start}, stop={stop}: this run starts at step {first_step} "
            "(resumed), after the range begins, so those steps cannot be traced. Fix: "
            f"profile later steps, e.g. {first_step}:{first_step + stop - start}."
        )


def parse_profile_range(text: str) -> tuple[int, int]:
    """``"START:STOP"`` as ``(start, stop)``, checked by `check_profile_range`.

    Args:
        text: two integers separated by a colon, e.g. ``"10:20"``.

    Returns:
        ``(start, stop)``.

    Example:
        >>> parse_profile_range("10:20")
        (10, 20)
        >>> parse_profile_range("10")
        Traceback (most recent call last):
        ...
        ValueError: profile must be START:STOP (two integer steps, e.g. 10:20); got '10'.
    """
    parts = text.split(":") if isinstance(text, str) else []
    try:
        start, stop = (int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"profile must be START:STOP (two integer steps, e.g. 10:20); got {text!r}."
        ) from None
    check_profile_range(start, stop)
    return start, stop


class Profile(Callback):
    """Traces steps ``[start, stop)`` of a `fit` run with ``jax.profiler`` into ``log_dir``.

    Args:
        start: first step traced (``state.step`` before it runs).
        stop: the trace ends once step ``stop - 1`` has run on the device.
        log_dir: the folder ``jax.profiler.start_trace`` writes to (created).

    Attributes:
        trace_dir: after the trace stopped, the folder holding its files.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt, tempfile
        >>> opt = optax.sgd(0.1)
        >>> step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
        >>> state = jt.TrainState.create({"w": jnp.ones(2)}, opt, 0)
        >>> data = jt.ArrayDataset({"x": np.ones((8, 2), np.float32)}, 2)
        >>> out = tempfile.mkdtemp()
        >>> _ = jt.fit(state, step, data, num_steps=4, progress=False, profile=(1, 3, out))
        >>> any(f.endswith(".xplane.pb") for f in os.listdir(glob.glob(out + "/plugins/profile/*")[0]))
        True
    """

    def __init__(self, start: int, stop: int, log_dir: str | os.PathLike):
        check_profile_range(start, stop)
        if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
            raise ValueError(
                f"profile log_dir must be a folder path; got {log_dir!r}. Fix: e.g. "
                "profile=(10, 20, 'out/profile')."
            )
        self.start, self.stop, self.log_dir = start, stop, os.fspath(log_dir)
        self.trace_dir: str | None = None
        # Steps one call runs (fit sets it from the step's spec): a call that starts
        # within K steps before ``start`` runs it, so the trace begins there.
        self.steps_per_call = 1
        self._active = False
        self._done = False
        self._first_call = True
        self._step_mark: Any = None

    def check_total(self, total_steps: int | None) -> None:
        """Refuses a range beyond the run's ``total_steps`` (when known)."""
        check_profile_range(self.start, self.stop, total_steps)

    def on_train_begin(self, loop: LoopState) -> None:
        total = loop.num_steps
        if loop.steps_per_epoch is not None and loop.epochs is not None:
            by_epochs = loop.steps_per_epoch * loop.epochs
            total = by_epochs if total is None else min(total, by_epochs)
        self.check_total(total)
        # A fresh range for each fit (a Profile given to two fits traces both). The
        # resumed step is checked at the first call: a checkpoint is restored by a
        # callback after this one, so loop.step is not the run's start yet.
        self._done, self._first_call, self.trace_dir = False, True, None

    def on_call_begin(self, loop: LoopState) -> None:
        if self._first_call:
            self._first_call = False
            check_resumed_start(self.start, self.stop, loop.step)
        begins = loop.step + max(self.steps_per_call, 1) > self.start  # this call runs start
        if not self._done and not self._active and begins:
            os.makedirs(self.log_dir, exist_ok=True)
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self._active = True
        if self._active:
            # Step boundaries for TensorBoard's profile plugin (its "step" view).
            self._step_mark = jax.profiler.StepTraceAnnotation("train", step_num=loop.step)
            self._step_mark.__enter__()

    def on_call_end(self, loop: LoopState) -> None:
        if not self._active:
            return
        self._close_mark()
        if loop.step >= self.stop:
            # The calls were only dispatched: wait for the device, or the trace is empty.
            jax.block_until_ready(loop.state)
            self._finish()

    def on_train_end(self, loop: LoopState) -> None:
        if not self._done and not self._active:
            warnings.warn(
                f"profile: no call ran step {self.start} (the run ended at step "
                f"{loop.step}, before it: stopped early), so no trace was written. Fix: "
                "choose an earlier start.",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_exit(self, loop: LoopState) -> None:
        # An error (or the end of the run) while tracing: never leave the profiler on.
        if self._active:
            self._close_mark()
            self._finish()

    def _close_mark(self) -> None:
        if self._step_mark is not None:
            self._step_mark.__exit__(None, None, None)
            self._step_mark = None

    def _finish(self) -> None:
        jax.profiler.stop_trace()
        self._active, self._done = False, True
        runs = sorted(glob.glob(os.path.join(self.log_dir, "plugins", "profile", "*")))
        self.trace_dir = runs[-1] if runs else None


def profile_callback(profile: Any, steps_per_call: int | None = 1) -> Profile | None:
    """`fit`'s ``profile=`` argument as a `Profile` (None: no profiling).

    Args:
        profile: None, a `Profile`, or ``(start, stop, log_dir)``.
        steps_per_call: steps one call of the train step runs (its ``spec``): K for
            fused steps, so the trace begins with the call that runs ``start``.

    Returns:
        The callback, or None.
    """
    if isinstance(profile, (tuple, list)) and len(profile) == 3:
        profile = Profile(*profile)
    if isinstance(profile, Profile):
        profile.steps_per_call = steps_per_call or 1
    if profile is None or isinstance(profile, Profile):
        return profile
    if isinstance(profile, (tuple, list)) and len(profile) == 2:
        raise ValueError(
            f"profile={tuple(profile)!r} names steps but not where to write the trace. Fix: "
            f"profile=({profile[0]!r}, {profile[1]!r}, 'out/profile') (a folder), or "
            "jaxtrain.profiler.Profile(start, stop, log_dir)."
        )
    raise TypeError(
        f"profile must be None, (start, stop, log_dir) or a jaxtrain.profiler.Profile; got "
        f"{profile!r}."
    )
