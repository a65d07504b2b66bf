"""The train log: reading metrics back at logging points, lagged by one, and throughput.

Lives here: `TrainLog`, the callback that turns the device metrics `fit` collects into
train records (one host transfer per logging interval, read one interval late so the
host never waits), measures device-synchronised throughput (examples/s, FLOP/s, MFU),
and raises the device-counted errors (invalid labels, the ``nonfinite="raise"`` guard)
at those points. Must not live here: writing records (writers get them through
``on_log``), evaluation, checkpoints. Never imports the loop, the CLI, the job or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxtrain import perf as perf_lib
from jaxtrain.callbacks import Callback
from jaxtrain.loop_state import LoopState
from jaxtrain.losses import INVALID_COUNT_KEYS, INVALID_LABELS

_LAST_VALUE_METRICS = ("learning_rate", "skipped_steps", "loss_scale", "loss_scale_overflows")


def per_step_metrics(
    pending: Sequence[tuple[Mapping[str, Any], int]],
) -> list[dict[str, np.ndarray]]:
    """Reads metrics back (one transfer) as one dict per real training step.

    Args:
        pending: ``(metrics, steps)`` per call: fused calls (`make_train_steps`) return
            metrics stacked ``[K]`` of which the first ``steps`` are real (a padded last
            group runs inactive steps); single steps return scalars.

    Returns:
        One dict of host arrays per real training step, in order.

    Example:
        >>> import jax.numpy as jnp
        >>> fused = ({"loss": jnp.array([3.0, 2.0, 2.0])}, 2)  # K=3, the last step padding
        >>> [float(m["loss"]) for m in per_step_metrics([({"loss": jnp.float32(4.0)}, 1), fused])]
        [4.0, 3.0, 2.0]
    """
    out: list[dict[str, np.ndarray]] = []
    host = jax.device_get([m for m, _ in pending])  # the one transfer
    for m, (_, steps) in zip(host, pending, strict=True):
        arrays = {k: np.asarray(v) for k, v in m.items()}
        n = max((a.shape[0] for a in arrays.values() if a.ndim), default=0)
        if n:
            n = min(n, steps)
            out.extend({k: a[i] if a.ndim else a for k, a in arrays.items()} for i in range(n))
        else:
            out.append(arrays)
    return out


def _check_invalid_counts(host: Sequence[Mapping[str, Any]], first_step: int) -> None:
    """Invalid labels / mask values counted on the device by the built-in losses.

    Checked before the non-finite guard, whose NaN loss they cause and explain.
    """
    for i, m in enumerate(host):
        for key in INVALID_COUNT_KEYS:
            n = float(np.asarray(m.get(key, 0)))
            if n > 0:
                what = (
                    "label(s) outside [0, num_classes) where the mask is > 0"
                    if key == INVALID_LABELS
                    else "mask value(s) outside [0, 1]"
                )
                raise ValueError(
                    f"invalid batch at training step {first_step + i + 1}: the loss counted "
                    f"{int(n)} {what} ({key!r}); its loss and gradients are meaningless "
                    "(the loss is NaN). Fix: remap the labels to [0, num_classes), set "
                    "mask=0 at positions to ignore (e.g. ignore_index -100), keep mask "
                    "values in [0, 1]; ArrayDataset(..., num_classes=C) checks labels "
                    "before training."
                )


def _check_nonfinite(host: Sequence[Mapping[str, Any]], first_step: int, names: Sequence) -> None:
    """The ``nonfinite="raise"`` guard: the first step whose values were not finite."""
    for i, m in enumerate(host):
        idx = int(m.get("nonfinite", -1))
        if idx >= 0:
            where = names[idx] if idx < len(names) else f"value #{idx}"
            if where.startswith(("updates", "new params")):
                where += (
                    " (the loss and gradients were finite: check the learning rate, its "
                    "schedule and the optimizer's hyperparameters for NaN/Inf)"
                )
            raise FloatingPointError(
                f"non-finite value at training step {first_step + i + 1} (update skipped): "
                f"first non-finite leaf is {where}. Fix: lower the learning rate, clip "
                "gradients, or check the batch for NaN/Inf inputs; nonfinite='skip' skips "
                "such steps instead of stopping."
            )


def _mean_records(
    pending: Sequence[tuple[Mapping[str, Any], int]],
    first_step: int,
    nonfinite: Callable[[], tuple[str | None, Sequence[str]]],
) -> dict[str, float]:
    """Means over a logging interval (one host transfer); checks the device-counted errors."""
    host = per_step_metrics(pending)  # the one host sync of a logging interval
    _check_invalid_counts(host, first_step)
    policy, names = nonfinite()
    if policy == "raise":
        _check_nonfinite(host, first_step, names)
    out = {}
    for k in host[0]:
        if k == "nonfinite" or k in INVALID_COUNT_KEYS:  # all 0 here: nothing to log
            continue
        vals = [float(np.asarray(m[k])) for m in host]
        out[k] = vals[-1] if k in _LAST_VALUE_METRICS else float(np.mean(vals))
    return out


def _peak_flops(mesh: Mesh) -> float | None:
    """Peak FLOP/s of all the mesh's devices together (None when the chip is unknown)."""
    devices = list(mesh.devices.flat)
    per_device = perf_lib.peak_flops(devices[0])["peak_flops_per_device"]
    return None if per_device is None else per_device * len(devices)


def _is_ready(metrics: Mapping[str, Any]) -> bool:
    """Whether a step's metrics are computed already (asks, never waits)."""
    for v in metrics.values():
        if isinstance(v, jax.Array):
            return v.is_ready()  # type: ignore[attr-defined]  # on every concrete jax.Array; absent from jax.Array's stub
    return True  # restored from a checkpoint: host values


def _throughput(
    flops_per_step: float, steps: int, seconds: float, peak: float | None
) -> dict[str, float | None]:
    """Achieved FLOP/s and MFU of a logging interval (``mfu`` None when the peak is unknown).

    ``seconds`` is the interval's device-synchronised time (see `TrainLog.emit_closed`).
    """
    achieved = flops_per_step * steps / max(seconds, 1e-9)
    return {"model_flops_per_second": achieved, "mfu": achieved / peak if peak else None}


@dataclasses.dataclass
class _Interval:
    """A closed logging interval whose metrics are not read back yet."""

    step: int
    epoch: int
    pending: list  # [(device metrics, real steps)] per call
    first: int  # the step before its first step
    examples: int  # timed examples: the first (compiling) call left out
    steps: int  # timed steps, for FLOP/s
    started: float | None  # when its first timed step was dispatched
    done: float | None = None  # when its last step was seen finished on the device


class TrainLog(Callback):
    """Train records at logging points: metric means, examples/s, FLOP/s and MFU.

    A logging point closes the open interval every ``every`` steps (read back one
    interval later, when the device has long finished it), at each epoch end, before
    each evaluation and at the end. Checkpoints read back the closed intervals first
    (`emit_closed`). Each record goes into ``history.train`` and to every callback's
    ``on_log``.
    """

    def __init__(
        self,
        every: int,
        flops_per_step: float | None,
        mesh: Mesh,
        nonfinite: Callable[[], tuple[str | None, Sequence[str]]],
        compile_seconds: Callable[[], float],
        members: bool = False,
    ):
        self.every = every
        # A population step (jaxtrain.population_step): metrics carry a member axis [N].
        self.members = members
        self.flops = flops_per_step
        self.peak = _peak_flops(mesh) if flops_per_step is not None else None
        self.nonfinite = nonfinite
        self.compile_seconds = compile_seconds
        self.lagged: list[_Interval] = []
        self.first_call = True
        # The open interval's timed work.
        self.examples, self.steps = 0, 0
        self.started: float | None = None
        self.last_done: float | None = None  # when the newest read-back interval finished
        self.t_start, self.compile_before = 0.0, 0.0  # set at train begin

    def on_train_begin(self, loop: LoopState) -> None:
        self.t_start = loop.clock()
        self.compile_before = self.compile_seconds()

    def on_call_end(self, loop: LoopState) -> None:
        h = loop.history
        if self.first_call:
            # The first call traces and compiles synchronously; block so the measured
            # time is the compile, not just the dispatch. Timed work starts once it is done.
            self.first_call = False
            jax.block_until_ready(loop.metrics)
            self.started = loop.clock()
            h.first_step_seconds = self.started - loop.call_started
        else:
            h.steady_examples += loop.call_examples
            h.steady_steps += loop.call_steps
            self.examples += loop.call_examples
            self.steps += loop.call_steps
            if self.started is None:
                self.started = loop.call_started
        self.watch(loop)
        if loop.crossed(self.every):
            self.close(loop, lag=True)

    def on_epoch_end(self, loop: LoopState) -> None:
        self.close(loop)

    def on_train_end(self, loop: LoopState) -> None:
        self.close(loop)

    def on_exit(self, loop: LoopState) -> None:
        loop.history.wall_seconds = loop.clock() - self.t_start
        loop.history.compile_seconds = self.compile_seconds() - self.compile_before

    def restart_clock(self) -> None:
        """The next interval starts at its first step (after an evaluation), not here."""
        self.last_done = None

    def watch(self, loop: LoopState) -> None:
        """Notes when closed intervals finish on the device: asks, never waits.

        Dispatch is asynchronous, so the time an interval was dispatched says nothing
        about the device. Called after every call and at every close, this asks
        (``is_ready``: no transfer, no wait) whether the oldest unfinished closed
        interval's last step is done, and stamps it the first time it is.
        """
        for interval in self.lagged:
            if interval.done is None:
                if not _is_ready(interval.pending[-1][0]):
                    return
                interval.done = loop.clock()

    def close(self, loop: LoopState, lag: bool = False) -> None:
        """Closes the open interval and records the closed ones.

        With ``lag`` (periodic logging) the newest interval is read back one interval
        later, when the device has long finished it: the host never waits on it.
        """
        if loop.pending:
            steps = sum(k for _, k in loop.pending)
            self.lagged.append(
                _Interval(
                    loop.step,
                    loop.epoch,
                    loop.pending,
                    loop.step - steps,
                    self.examples,
                    self.steps,
                    self.started,
                )
            )
            loop.pending = []
            self.examples, self.steps, self.started = 0, 0, None
            self.watch(loop)
        self.emit_closed(loop, keep=1 if lag else 0)

    def emit_closed(self, loop: LoopState, keep: int = 0) -> None:
        """Reads back and records closed intervals, all but the newest ``keep``.

        Each interval's time is device-synchronised: it ended when its last step was
        seen finished (`watch`, or here, waiting for it at the read-back that needs its
        values anyway), and began where the previous one ended (host time spent loading
        data in between is training time too) or, after the first (compiling) call or
        an evaluation, when its first step could start.
        """
        while len(self.lagged) > keep:
            interval = self.lagged.pop(0)
            if interval.done is None:
                last = interval.pending[-1][0]
                if not _is_ready(last):
                    jax.block_until_ready(last)  # the read below waits anyway
                interval.done = loop.clock()
            record = {"step": interval.step, "epoch": interval.epoch, "split": "train"}
            record.update(self._records(interval.pending, interval.first))
            record.update(self._timing(loop, interval))
            loop.history.train.append(record)
            loop.callbacks.on_log(loop, record)

    def _records(self, pending: list, first: int) -> dict[str, Any]:
        if not self.members:
            return _mean_records(pending, first, self.nonfinite)
        from jaxtrain.population_fit import member_records  # it imports this module

        return member_records(pending, first, self.nonfinite()[1])

    def step_metrics(self, pending: Sequence[tuple[Mapping[str, Any], int]]) -> list[dict]:
        """`per_step_metrics` of ``pending`` (for a population: per step, ``[N]`` values)."""
        if not self.members:
            return per_step_metrics(pending)
        from jaxtrain.population_fit import member_step_metrics

        return member_step_metrics(pending)

    def _timing(self, loop: LoopState, interval: _Interval) -> dict[str, Any]:
        started = interval.started if self.last_done is None else self.last_done
        self.last_done = interval.done
        done = self.last_done
        seconds = None if started is None or done is None else done - started
        out: dict[str, Any] = {"examples_per_second": None}
        flops_s = None
        if interval.examples and seconds is not None and seconds > 0:
            out["examples_per_second"] = interval.examples / seconds
            loop.history.steady_seconds += seconds
            if self.flops is not None:
                flops_s = _throughput(self.flops, interval.steps, seconds, self.peak)
        elif self.flops is not None:  # only the compiling call: no steady time
            flops_s = {"model_flops_per_second": None, "mfu": None}
        if flops_s is not None:
            out.update(flops_s)
        return out
