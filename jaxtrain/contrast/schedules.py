"""PyTorch's learning-rate schedulers as closed-form ``step -> value`` functions, in any dtype.

optax's ``linear_schedule`` and ``exponential_decay`` return float32 even under JAX's x64
mode, which caps a float64 comparison at ~1e-8. These compute in the dtype they are
given (float64 for `jaxtrain.contrast.compare`'s exact mode) and follow PyTorch's
definitions; PyTorch itself evaluates most schedulers recursively in Python floats, which
agrees with the closed forms to ~1e-16 per step.

`onecycle` is ``OneCycleLR`` (learning rate and, with ``cycle_momentum``, the momentum or
``beta1`` it cycles in the opposite direction); optax's ``cosine_onecycle_schedule``
places its phase boundaries at ``int(pct_start * T)`` instead of PyTorch's
``pct_start * T - 1`` and does not cycle momentum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Schedule = Callable[[Any], jax.Array]


def _t(count: Any, dtype: Any) -> jax.Array:
    return jnp.asarray(count).astype(dtype)


def constant(lr: float, dtype: Any = jnp.float32) -> Schedule:
    """``lr`` at every step (no scheduler)."""
    return lambda count: jnp.full([], lr, dtype) + 0 * _t(count, dtype)


def step_decay(lr: float, step_size: int, gamma: float, dtype: Any = jnp.float32) -> Schedule:
    """``StepLR``: ``lr * gamma ** (t // step_size)``."""
    return lambda count: lr * jnp.asarray(gamma, dtype) ** jnp.floor(_t(count, dtype) / step_size)


def cosine(lr: float, steps: int, min_lr: float, dtype: Any = jnp.float32) -> Schedule:
    """``CosineAnnealingLR(T_max=steps, eta_min=min_lr)`` (held at ``min_lr`` after ``steps``)."""

    def schedule(count):
        t = jnp.minimum(_t(count, dtype), steps)
        return min_lr + (lr - min_lr) * (1 + jnp.cos(jnp.pi * t / steps)) / 2

    return schedule


def linear_warmup(
    main: Schedule, lr: float, steps: int, start_factor: float, dtype: Any = jnp.float32
) -> Schedule:
    """``SequentialLR([LinearLR(start_factor, total_iters=steps), main], [steps])``.

    ``lr * (f + (1 - f) * t / steps)`` for ``t < steps``, then ``main(t - steps)`` (the
    main scheduler's count restarts at the milestone, in both frameworks).
    """

    def schedule(count):
        t = _t(count, dtype)
        warm = lr * (start_factor + (1 - start_factor) * jnp.minimum(t, steps) / steps)
        return jnp.where(t < steps, warm, main(jnp.maximum(count - steps, 0)))

    return schedule


def inverse_time(main: Schedule, lr_decay: float, dtype: Any = jnp.float32) -> Schedule:
    """``Adagrad(lr_decay=d)``: the scheduled rate divided by ``1 + t * d``."""
    return lambda count: main(count) / (1 + _t(count, dtype) * lr_decay)


def onecycle(
    start: float,
    peak: float,
    end: float,
    total_steps: int,
    pct_start: float,
    anneal: str = "cos",
    three_phase: bool = False,
    dtype: Any = jnp.float32,
) -> Schedule:
    """``OneCycleLR``'s phases from ``start`` to ``peak`` to ``end``, as PyTorch computes them.

    For the learning rate: ``start = max_lr / div_factor``, ``peak = max_lr``, ``end =
    start / final_div_factor``. For the cycled momentum: ``start = max_momentum``, ``peak =
    base_momentum``, ``end = max_momentum``.

    Args:
        start, peak, end: the values at the phase boundaries.
        total_steps: ``OneCycleLR``'s ``total_steps``.
        pct_start: the fraction of the run spent rising; the phase ends at step
            ``pct_start * total_steps - 1`` (a float, as in PyTorch).
        anneal: ``"cos"`` or ``"linear"``.
        three_phase: PyTorch's ``three_phase`` (rise, fall back to ``start``, then to
            ``end``).
        dtype: the dtype to compute in.

    Returns:
        ``step -> value``.

    Example:
        >>> s = onecycle(0.004, 0.1, 4e-7, total_steps=100, pct_start=0.3)
        >>> round(float(s(0)), 6), round(float(s(29)), 6), float(s(99)) < 1e-6
        (0.004, 0.1, True)
    """
    if three_phase:
        ends = [pct_start * total_steps - 1, 2 * pct_start * total_steps - 2, total_steps - 1]
        values = [start, peak, start, end]
    else:
        ends = [pct_start * total_steps - 1, total_steps - 1]
        values = [start, peak, end]

    def anneal_fn(a, b, pct):
        if anneal == "cos":
            return b + (a - b) / 2 * (jnp.cos(math.pi * pct) + 1)
        return (b - a) * pct + a

    def schedule(count):
        t = _t(count, dtype)
        out = jnp.asarray(values[-1], dtype)
        begin = 0.0
        phases = []
        for i, stop in enumerate(ends):
            phases.append((begin, stop, values[i], values[i + 1]))
            begin = stop
        # PyTorch takes the first phase with t <= its end (the last one otherwise):
        # evaluate from the last phase back so the earliest matching one wins.
        for i, (lo, hi, a, b) in reversed(list(enumerate(phases))):
            value = anneal_fn(a, b, (t - lo) / (hi - lo))
            out = value if i == len(phases) - 1 else jnp.where(t <= hi, value, out)
        return out

    return schedule
