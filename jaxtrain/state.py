"""`TrainState`: everything a training run carries from one step to the next, as data."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

PyTree = Any


def as_key_data(rng: jax.Array | int) -> jax.Array:
    """Returns raw ``uint32`` key data for an int seed, a typed key or raw key data.

    The state stores raw key data rather than a typed key: it is a plain array, so it
    checkpoints and shards like every other leaf (typed keys cannot be saved directly).
    """
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return jax.random.key_data(jax.random.key(int(rng)))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.ndim != 1:
        raise TypeError(
            f"rng must be an int seed, a typed PRNG key (jax.random.key) or raw uint32 key data "
            f"of shape (2,); got dtype={rng.dtype}, shape={tuple(rng.shape)}. "
            "Fix: pass jax.random.key(seed)."
        )
    return rng


@struct.dataclass
class TrainState:
    """The whole state of a training run: a pytree of arrays and nothing else.

    No functions and no optimizer object live here (unlike Flax linen's ``TrainState``),
    so the state can be donated, sharded, checkpointed and compared leaf by leaf. The
    optimizer and the model are bound into the step function instead.

    Attributes:
        step: int32 scalar, number of updates applied so far.
        params: the trainable parameters (any pytree of float arrays).
        opt_state: the optax state for ``params`` (NamedTuples of arrays).
        rng: raw uint32 key data, shape (2,). Never used directly: each step derives
            ``jax.random.fold_in(rng, step)``, so no key is ever reused.
        model_state: mutable non-trainable collections (e.g. BatchNorm statistics);
            an empty dict when the model has none.
        skipped_steps: int32 scalar, steps whose update the non-finite guard skipped
            (see ``make_train_step(nonfinite=...)``).
        loss_scale: dynamic loss scaling's state (`jaxtrain.precision.LossScaleState`)
            when the run computes in float16, else an empty dict (no leaves, so states
            and checkpoints without it are unchanged).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> state = TrainState.create({"w": jnp.zeros((3, 2))}, optax.adam(1e-3), jax.random.key(0))
        >>> int(state.step), state.params["w"].shape, state.rng.shape
        (0, (3, 2), (2,))
        >>> len(jax.tree.leaves(state))  # step, w, Adam's count/mu/nu, rng, skipped_steps
        7
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    model_state: PyTree = struct.field(default_factory=dict)
    skipped_steps: jax.Array = struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    loss_scale: PyTree = struct.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        params: PyTree,
        optimizer: optax.GradientTransformation,
        rng: jax.Array | int,
        model_state: PyTree | None = None,
        *,
        precision: Any = None,
    ) -> TrainState:
        """Builds the initial state.

        Args:
            params: initial parameters.
            optimizer: the optax transformation that ``make_train_step`` will use; only
                its ``init`` is called here.
            rng: an int seed, a typed key (``jax.random.key``) or raw key data.
            model_state: initial mutable collections, or None for none.
            precision: the `jaxtrain.Policy` (or its name) the step will use; a policy
                with loss scaling gets its initial `LossScaleState` here.

        Returns:
            A `TrainState` with ``step == 0``.

        Example:
            >>> import jax, jax.numpy as jnp, optax
            >>> state = TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1), jax.random.key(0))
            >>> int(state.step)
            0
        """
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                "optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)); "
                f"got {type(optimizer).__name__}."
            )
        bad = [
            jax.tree_util.keystr(path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
        ]
        if bad:
            raise TypeError(
                f"params must be floating point to be trained; integer leaves at {bad[:5]}. "
                "Fix: cast them (e.g. jnp.asarray(x, jnp.float32)) or keep them in model_state."
            )
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=as_key_data(rng),
            model_state={} if model_state is None else model_state,
            skipped_steps=jnp.zeros((), jnp.int32),
            loss_scale=_initial_loss_scale(precision),
        )

    def step_rng(self) -> jax.Array:
        """The typed key for the current step: ``fold_in(rng, step)``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _initial_loss_scale(precision: Any) -> PyTree:
    """``TrainState.loss_scale`` for a policy, a policy name, or None (an empty dict)."""
    from jaxtrain.precision import get_policy  # precision.py does not import state.py

    policy = get_policy(precision)
    return {} if policy is None else policy.init_loss_scale()
