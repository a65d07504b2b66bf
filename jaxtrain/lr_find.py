"""`lr_find`: an exponential learning-rate sweep that suggests a learning rate.

The range test of Smith (2017, "Cyclical Learning Rates") as fastai and Lightning run
it: train from a copy of the state for ``num_steps`` steps while the learning rate
grows exponentially from ``min_lr`` to ``max_lr`` (an optax schedule given to your
optimizer factory), record the loss of each step, smooth it (an exponential moving
average with bias correction, ``smoothing`` = 0.98 as in fastai) and stop early once
the smoothed loss exceeds ``diverge`` times its minimum (only while that minimum is
positive: a loss that reaches zero or below stops only when it is not finite), or once
the loss is not finite.

The suggestion (``rule``):

* ``"min/10"`` (default): a tenth of the rate at which the smoothed loss is lowest.
  The minimum is where training is still making progress fastest before it becomes
  unstable; a tenth of it keeps a margin below that edge. It depends on one robust
  point of the curve (its minimum), not on a derivative of a noisy curve.
* ``"steepest"``: the rate where the smoothed loss falls fastest against log(rate)
  (the most negative slope before the minimum). Noisier: a slope of a smoothed noisy
  curve; reported alongside as ``steepest_lr`` whatever the rule.

Your state is never touched: the sweep trains a fresh `TrainState` built from copies
of its parameters, model state and key (the step donates only those copies), with a
fresh optimizer state for the sweep's optimizer. The loss is read back after every
step (one host sync per step, a step behind the dispatch) to stop on divergence: this
is a diagnostic run, not the training hot path.

What must not live here: the plot and the command line (`jaxtrain.apps.lr_find`). It
never imports the loop, the CLI or torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxtrain.data import ArrayDataset
from jaxtrain.state import TrainState
from jaxtrain.step import make_train_step
from jaxtrain.types import LossFn

__all__ = ["RULES", "LRFindResult", "lr_find", "suggest"]

#: The suggestion rules of `suggest` (the first is the default).
RULES = ("min/10", "steepest")

#: The metrics a sweep reads back: the loss, and the running counts of skipped steps.
_COUNTED = ("loss", "loss_scale_overflows", "skipped_steps")


@dataclasses.dataclass(frozen=True)
class LRFindResult:
    """The sweep's curve and its suggestion.

    Attributes:
        learning_rates: the rate of each step run (the schedule at the optimizer's
            count: a step skipped by float16 loss scaling or the non-finite guard does
            not advance it, so the next step runs at the same rate).
        losses: each step's training loss (before its update), as computed.
        smoothed: the bias-corrected exponential moving average of ``losses``.
        suggestion: the suggested learning rate (None when fewer than 3 finite
            points were recorded).
        rule: the rule that chose it (one of `RULES`).
        min_loss_lr: the rate at the lowest smoothed loss.
        steepest_lr: the rate at the steepest descent of the smoothed loss.
        stopped_early: the sweep stopped because the loss diverged.
        reason: why the sweep ended, in words.

    Example:
        >>> r = LRFindResult([1e-3, 1e-2], [2.0, 1.0], [2.0, 1.5], 1e-3, "min/10", 1e-2,
        ...                  1e-2, False, "ran all 2 steps")
        >>> r.to_dict()["suggestion"]
        0.001
    """

    learning_rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    rule: str
    min_loss_lr: float | None
    steepest_lr: float | None
    stopped_early: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (non-finite losses stay floats: write it with
        `jaxtrain.writers.dumps_strict`, which writes them as null)."""
        return dataclasses.asdict(self)


def suggest(
    learning_rates: Any, smoothed: Any, rule: str = "min/10"
) -> tuple[float | None, float | None, float | None]:
    """The suggested rate of a smoothed loss curve, and the two points it comes from.

    Args:
        learning_rates: the rates, non-decreasing, shape ``[N]`` (of a repeated rate,
            only the last point counts).
        smoothed: the smoothed loss at each rate, shape ``[N]`` (non-finite points are
            ignored).
        rule: ``"min/10"`` (a tenth of the rate at the lowest loss) or ``"steepest"``
            (the rate at the most negative slope against log(rate), before the lowest
            loss).

    Returns:
        ``(suggestion, min_loss_lr, steepest_lr)``; all None with fewer than 3 finite
        points.

    Example:
        >>> lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
        >>> suggest(lrs, [2.0, 1.9, 1.0, 0.5, 3.0])  # lowest at 0.1
        (0.01, 0.1, 0.01)
        >>> suggest(lrs, [2.0, 1.9, 1.0, 0.5, 3.0], "steepest")[0]
        0.01
    """
    if rule not in RULES:
        raise ValueError(
            f"rule must be one of {', '.join(RULES)}; got {rule!r}. Fix: 'min/10' (a tenth of "
            "the rate at the lowest smoothed loss) or 'steepest' (its steepest descent)."
        )
    lrs = np.asarray(learning_rates, np.float64)
    loss = np.asarray(smoothed, np.float64)
    ok = np.isfinite(loss)
    lrs, loss = lrs[ok], loss[ok]
    # Skipped steps repeat a rate (the schedule did not advance): keep the last point at
    # each rate, so the slope against log(rate) is defined.
    last = np.diff(lrs, append=np.inf) > 0
    lrs, loss = lrs[last], loss[last]
    if len(loss) < 3:
        return None, None, None
    lowest = int(np.argmin(loss))
    min_lr = float(lrs[lowest])
    # Slope against log(rate), only up to the minimum (after it the loss rises).
    upto = max(lowest + 1, 2)
    slope = np.gradient(loss[:upto], np.log(lrs[:upto]))
    steepest = float(lrs[int(np.argmin(slope))])
    return (min_lr / 10 if rule == "min/10" else steepest), min_lr, steepest


def _check(min_lr: Any, max_lr: Any, num_steps: Any, smoothing: Any, diverge: Any) -> None:
    def positive(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf

    if not (positive(min_lr) and positive(max_lr) and min_lr < max_lr):
        raise ValueError(
            f"lr_find needs 0 < min_lr < max_lr (finite); got min_lr={min_lr!r}, "
            f"max_lr={max_lr!r}. Fix: e.g. min_lr=1e-7, max_lr=10."
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 3:
        raise ValueError(
            f"lr_find num_steps must be an integer >= 3 (points of the curve); got "
            f"{num_steps!r}. Fix: a few hundred, e.g. 200."
        )
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing < 1):
        raise ValueError(
            f"lr_find smoothing must be in [0, 1) (0: no smoothing); got {smoothing!r}. "
            "Fix: e.g. 0.98, fastai's value."
        )
    if not (positive(diverge) and diverge > 1):
        raise ValueError(
            f"lr_find diverge must be a number > 1 (stop when the smoothed loss exceeds "
            f"diverge x its minimum); got {diverge!r}. Fix: e.g. 4."
        )


def _batches(train_data: Any) -> Iterator[Mapping[str, Any]]:
    """Batches without end: an `ArrayDataset` epoch after epoch, or an iterable again."""
    epoch = 0
    while True:
        source: Iterable[Mapping[str, Any]]
        source = train_data.batches(epoch) if isinstance(train_data, ArrayDataset) else train_data
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find: train_data yielded no batches.")
        epoch += 1


def lr_find(
    loss_fn: LossFn,
    optimizer_fn: Callable[[Any], optax.GradientTransformation],
    state: TrainState,
    train_data: ArrayDataset | Iterable[Mapping[str, Any]],
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    num_steps: int = 200,
    smoothing: float = 0.98,
    diverge: float = 4.0,
    rule: str = "min/10",
    **step_options: Any,
) -> LRFindResult:
    """Sweeps the learning rate exponentially and suggests one; ``state`` is untouched.

    Args:
        loss_fn: the loss, as in `jaxtrain.make_train_step`.
        optimizer_fn: ``learning_rate -> optax optimizer``, e.g. ``lambda lr:
            optax.adamw(lr, weight_decay=1e-4)``; it is given an optax schedule (step
            -> rate), which every optax optimizer accepts as its learning rate.
        state: the starting point; its parameters, model state and key are copied (its
            optimizer state is not used: the sweep's optimizer starts fresh).
        train_data: an `ArrayDataset` (epoch after epoch) or a re-iterable of batches.
        min_lr: the first step's rate (> 0).
        max_lr: the last step's rate; step ``i`` uses ``min_lr * (max_lr /
            min_lr) ** (i / (num_steps - 1))``.
        num_steps: steps of the sweep (>= 3; a few hundred).
        smoothing: the moving average's weight of the past, in [0, 1).
        diverge: stop once the smoothed loss exceeds this many times its minimum (a
            positive minimum; with a minimum <= 0 only a non-finite loss stops the sweep).
        rule: the suggestion rule, one of `RULES` (see `suggest`).
        **step_options: options of `jaxtrain.make_train_step` (``precision``,
            ``grad_accum_steps``, ...).

    Returns:
        An `LRFindResult`.

    Example:
        >>> import jax.numpy as jnp, numpy as np, optax
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
        >>> data = ArrayDataset({"x": x, "y": x @ np.arange(4.0, dtype=np.float32)}, 16)
        >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
        >>> state = TrainState.create({"w": jnp.zeros(4)}, optax.sgd(0.1), 0)
        >>> r = lr_find(loss_fn, optax.sgd, state, data, min_lr=1e-4, max_lr=10.0, num_steps=60)
        >>> r.stopped_early, 1e-3 < r.suggestion < 1.0, float(state.params["w"].sum())
        (True, True, 0.0)
    """
    _check(min_lr, max_lr, num_steps, smoothing, diverge)
    if rule not in RULES:
        suggest([], [], rule)  # its message
    if "ema_decay" in step_options or "donate" in step_options:
        raise ValueError(
            "lr_find builds its own step: ema_decay and donate do not apply. Fix: drop them."
        )
    ratio = max_lr / min_lr

    def schedule(count: Any) -> Any:
        return min_lr * ratio ** (count / (num_steps - 1))

    optimizer = optimizer_fn(schedule)
    # A copy: TrainState.create copies params, model state and key, so the donating step
    # below consumes only the sweep's own arrays.
    precision = step_options.get("precision")
    sweep = TrainState.create(
        state.params, optimizer, state.rng, state.model_state, precision=precision
    )
    step = make_train_step(loss_fn, optimizer, **step_options)
    rates, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    reason = f"ran all {num_steps} steps"
    stopped = False
    pending: Any = None

    applied, skips_seen = 0, 0

    def record(i: int, step_metrics: Any) -> bool:
        """Adds step ``i``'s loss; True when the sweep must stop (diverged)."""
        nonlocal avg, best, applied, skips_seen
        got = jax.device_get({k: step_metrics[k] for k in _COUNTED if k in step_metrics})
        loss = float(got["loss"])
        # The schedule runs on the optimizer's count, which a skipped step (a float16
        # overflow, the non-finite guard) does not advance: step i ran at the rate of the
        # updates applied before it, not at schedule(i).
        rates.append(float(min_lr * ratio ** (applied / (num_steps - 1))))
        skips = sum(int(got[k]) for k in _COUNTED[1:] if k in got)  # cumulative counts
        applied += 1 if skips == skips_seen else 0
        skips_seen = skips
        losses.append(loss)
        if not math.isfinite(loss):
            smoothed.append(math.nan)
            return True
        avg = smoothing * avg + (1 - smoothing) * loss
        value = avg / (1 - smoothing ** (i + 1))
        smoothed.append(value)
        best = min(best, value)
        # "diverge x the minimum" is above the minimum only for a positive minimum: a loss
        # that reaches zero or below (shifted, a log-density) would stop at its first step.
        return best > 0 and value > diverge * best

    batches = _batches(train_data)
    for i in range(num_steps):
        sweep, metrics = step(sweep, next(batches))
        # Read the previous step's loss now: the device already runs step i.
        if pending is not None and record(*pending):
            stopped = True
            break
        pending = (i, metrics)
    if not stopped and pending is not None and record(*pending):
        stopped = True
    if stopped:
        i = len(losses) - 1
        if not math.isfinite(losses[-1]):
            reason = f"the loss was not finite ({losses[-1]}) at step {i} (rate {rates[-1]:.3g})"
            if i == 0:  # before any update: no rate is to blame
                reason += ", before any update: the model or the data gives it, whatever the rate"
        else:
            reason = (
                f"the loss diverged at step {i} (rate {rates[-1]:.3g}): smoothed loss "
                f"{smoothed[-1]:.4g}, more than {diverge:g}x its lowest, {best:.4g}"
            )
    suggestion, min_loss_lr, steepest_lr = suggest(rates, smoothed, rule)
    return LRFindResult(
        learning_rates=rates,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestion,
        rule=rule,
        min_loss_lr=min_loss_lr,
        steepest_lr=steepest_lr,
        stopped_early=stopped,
        reason=reason,
    )
