"""``ReduceLROnPlateau`` in a pure loop: the learning rate lives in the optimizer state.

PyTorch's scheduler is an object fed a metric (``scheduler.step(val_loss)``) that edits
``param_groups[i]["lr"]`` in place. The pure counterpart has two parts:

* `with_plateau_lr(build, lr)`: the optimizer, whose state holds the current learning
  rate (``opt_state.hyperparams["learning_rate"]``, where jaxtrain's ``learning_rate``
  metric finds it, as for ``optax.inject_hyperparams``) and PyTorch's counters;
* `plateau_step(opt_state, metric, ...)`: ``scheduler.step(metric)`` as a pure function
  ``opt_state -> opt_state``, called *between* train steps (jit it: no host sync, the
  metric stays on the device), at the cadence PyTorch's loop steps the scheduler.

Everything is in ``TrainState.opt_state``, so checkpoints and exact resume include it.

Why not ``optax.contrib.reduce_on_plateau``: it needs the metric passed to
``optimizer.update(..., value=loss)``, which a generic train step does not do; it scales the
*updates* by the decision taken on the *current* loss (PyTorch lowers the rate from the
next step on); and it reduces after ``patience`` bad values (PyTorch after
``patience + 1``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class PlateauState(NamedTuple):
    """The optimizer state of `with_plateau_lr`: PyTorch's scheduler fields and the inner state.

    ``hyperparams["learning_rate"]`` is the rate of the next step; ``best``,
    ``num_bad_epochs`` and ``cooldown_counter`` are ``ReduceLROnPlateau``'s attributes.
    """

    hyperparams: dict[str, jax.Array]
    best: jax.Array
    num_bad_epochs: jax.Array
    cooldown_counter: jax.Array
    inner: Any


def with_plateau_lr(
    build: Callable[[jax.Array], optax.GradientTransformation], lr: float, dtype: Any = jnp.float32
) -> optax.GradientTransformation:
    """An optimizer whose learning rate is a value in its state, lowered by `plateau_step`.

    Args:
        build: ``lr -> transformation`` (the optimizer at learning rate ``lr``; its state's
            structure must not depend on ``lr``).
        lr: the starting learning rate.
        dtype: the dtype of the rate and of ``best``.

    Returns:
        A transformation with `PlateauState`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = with_plateau_lr(optax.sgd, 0.1)
        >>> state = tx.init({"w": jnp.zeros(1)})
        >>> for loss in [1.0, 1.0, 1.0]:  # no improvement after the first value
        ...     state = plateau_step(state, loss, factor=0.5, patience=1)
        >>> round(float(state.hyperparams["learning_rate"]), 6)  # 2 bad values > patience 1
        0.05
    """

    def init_fn(params):
        rate = jnp.asarray(lr, dtype)
        return PlateauState(
            hyperparams={"learning_rate": rate},
            best=jnp.asarray(jnp.inf, dtype),
            num_bad_epochs=jnp.zeros([], jnp.int32),
            cooldown_counter=jnp.zeros([], jnp.int32),
            inner=build(rate).init(params),
        )

    def update_fn(updates, state, params=None):
        updates, inner = build(state.hyperparams["learning_rate"]).update(
            updates, state.inner, params
        )
        return updates, state._replace(inner=inner)

    return optax.GradientTransformation(init_fn, update_fn)


def plateau_step(
    state: PlateauState,
    metric: Any,
    *,
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: float = 0.0,
    eps: float = 1e-8,
) -> PlateauState:
    """PyTorch's ``ReduceLROnPlateau(mode="min").step(metric)``, as a pure function.

    Better: ``metric < best * (1 - threshold)`` (``"rel"``) or ``< best - threshold``
    (``"abs"``). After more than ``patience`` values that are not better the rate
    becomes ``max(lr * factor, min_lr)`` (unless that changes it by ``eps`` or less) and
    ``cooldown`` values are ignored.

    Args:
        state: `with_plateau_lr`'s state (``TrainState.opt_state``).
        metric: the monitored value (a scalar, e.g. the loss the train step returned).
        factor, patience, threshold, threshold_mode, cooldown, min_lr, eps: PyTorch's
            arguments and defaults.

    Returns:
        The new state; the lowered rate applies from the next update on.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> state = with_plateau_lr(optax.adam, 1e-3).init({"w": jnp.zeros(1)})
        >>> state = plateau_step(state, 2.0)  # better than inf: the new best
        >>> float(state.best), int(state.num_bad_epochs)
        (2.0, 0)
    """
    metric = jnp.asarray(metric, state.best.dtype)
    if threshold_mode == "rel":
        better = metric < state.best * (1 - threshold)
    else:
        better = metric < state.best - threshold
    best = jnp.where(better, metric, state.best)
    bad = jnp.where(better, 0, state.num_bad_epochs + 1)
    in_cooldown = state.cooldown_counter > 0
    counter = jnp.where(in_cooldown, state.cooldown_counter - 1, state.cooldown_counter)
    bad = jnp.where(in_cooldown, 0, bad)
    reduce = bad > patience
    old = state.hyperparams["learning_rate"]
    new = jnp.maximum(old * factor, min_lr)
    lr = jnp.where(reduce & (old - new > eps), new, old)
    return state._replace(
        hyperparams={**state.hyperparams, "learning_rate": lr.astype(old.dtype)},
        best=best,
        num_bad_epochs=jnp.where(reduce, 0, bad).astype(jnp.int32),
        cooldown_counter=jnp.where(reduce, cooldown, counter).astype(jnp.int32),
    )
