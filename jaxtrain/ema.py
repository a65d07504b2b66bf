"""An exponential moving average (EMA) of the parameters, kept in the `TrainState`.

A train step built with ``ema_decay=d`` (`jaxtrain.make_train_step`, `make_train_steps`,
`make_device_epoch`) updates ``state.ema_params`` after every applied step::

    ema = d * ema + (1 - d) * new_params

inside the compiled step (no host sync), in the parameters' dtype (float32 under mixed
precision, whose parameters stay float32). It starts as a copy of the initial parameters
(`TrainState.create(..., ema=True)`), so unlike ``optax.ema`` (which starts at zeros and
divides by ``1 - d**t``) it needs no bias correction: every average is a weighted mean
of parameters the model actually had. A step skipped by the non-finite guard or by loss
scaling leaves it bitwise unchanged. It is a field of the state, so checkpoints save it
and a resumed run continues it bitwise; `fit(..., eval_params="ema")` and `evaluate`
evaluate it (`ema_state`).

What must not live here: the step itself (`jaxtrain.step`), the loop. It imports only
jax, optax and `jaxtrain.state`.
"""

from __future__ import annotations

import jax
import optax

from jaxtrain.state import TrainState
from jaxtrain.types import PyTree

__all__ = ["EVAL_PARAMS", "ema_state", "ema_update", "params_for_eval"]

#: What `fit(..., eval_params=...)` evaluates: the trained parameters or their EMA.
EVAL_PARAMS = ("params", "ema")


def ema_update(ema: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """One EMA step: ``decay * ema + (1 - decay) * params``, leaf by leaf.

    Args:
        ema: the current average (the same structure, shapes and dtypes as ``params``).
        params: the parameters after the step.
        decay: the weight of the old average, in (0, 1).

    Returns:
        The new average, in ``ema``'s dtypes.

    Example:
        >>> import jax.numpy as jnp
        >>> ema_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.9)["w"].tolist()
        [0.10000000149011612, 0.10000000149011612]
    """
    # optax's own rule: step_size * new + (1 - step_size) * old, cast to the old dtype.
    new = optax.incremental_update(params, ema, step_size=1 - decay)
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new, ema)


def ema_state(state: TrainState) -> TrainState:
    """``state`` with its EMA parameters in place of ``params``, to evaluate them.

    Args:
        state: a state built with ``TrainState.create(..., ema=True)``, or a
            `jaxtrain.population.PopulationState` of such states (each member's EMA).

    Returns:
        A `TrainState` whose ``params`` are ``state.ema_params`` (no copy: do not pass
        it to a donating train step); for a population, the population with its
        members' ``params`` replaced so.

    Raises:
        ValueError: the state keeps no EMA.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> state = TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1), 0, ema=True)
        >>> ema_state(state).params["w"].tolist()
        [1.0, 1.0]
    """
    members = getattr(state, "members", None)  # a PopulationState: its members' EMA
    if isinstance(members, TrainState):
        return state.replace(members=ema_state(members))
    if not jax.tree.leaves(state.ema_params):
        raise ValueError(
            "the state keeps no parameter EMA (state.ema_params is empty), so there is "
            "nothing to evaluate with eval_params='ema'. Fix: build the state with "
            "TrainState.create(..., ema=True) and the step with ema_decay=... (e.g. 0.999)."
        )
    return state.replace(params=state.ema_params)


def params_for_eval(state: TrainState, eval_params: str) -> TrainState:
    """The state to evaluate for ``eval_params`` (one of `EVAL_PARAMS`).

    Args:
        state: the training state.
        eval_params: ``"params"`` (the state as it is) or ``"ema"`` (`ema_state`).

    Returns:
        The state to give the eval step.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> state = TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1), 0)
        >>> params_for_eval(state, "params") is state
        True
        >>> params_for_eval(state, "best")
        Traceback (most recent call last):
        ...
        ValueError: eval_params must be 'params' or 'ema'; got 'best'. ...
    """
    check_eval_params(eval_params)
    return state if eval_params == "params" else ema_state(state)


def check_eval_params(eval_params: object) -> None:
    """Refuses an ``eval_params`` that is not one of `EVAL_PARAMS`."""
    if not isinstance(eval_params, str) or eval_params not in EVAL_PARAMS:
        raise ValueError(
            f"eval_params must be 'params' or 'ema'; got {eval_params!r}. Fix: 'params' "
            "evaluates the trained parameters, 'ema' their moving average (a state made "
            "with TrainState.create(..., ema=True), a step with ema_decay=...)."
        )
