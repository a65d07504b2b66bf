"""`TrainState`: everything a training run carries from one step to the next, as data.

What must not live here: how a state is updated (`jaxtrain.step`) or stored
(`jaxtrain.checkpoint`). It never imports the loop, the applications (`jaxtrain.apps`,
`jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxtrain.types import PyTree

if TYPE_CHECKING:  # annotations only: precision is imported where a policy is used
    from jaxtrain.precision import Policy


def as_key_data(rng: jax.Array | int) -> jax.Array:
    """Returns raw ``uint32`` key data for an int seed, a typed key or raw key data.

    The state stores raw key data rather than a typed key: it is a plain array, so it
    checkpoints and shards like every other leaf (typed keys cannot be saved directly).
    """
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return jax.random.key_data(jax.random.key(check_key_seed(rng)))
    if isinstance(rng, (bool, str, bytes, float)) or rng is None:
        raise TypeError(
            f"rng must be an int seed, a typed PRNG key (jax.random.key) or raw uint32 key data "
            f"of shape (2,); got {rng!r} ({type(rng).__name__}). Fix: pass an int seed, e.g. "
            "0, or jax.random.key(0)."
        )
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


def max_key_seed() -> int:
    """The largest int seed that `jax.random.key` turns into its own, distinct key.

    Without ``jax_enable_x64`` JAX keeps the low 32 bits of an int seed (``2**32`` gives
    seed 0's key, negative seeds wrap around) and ints beyond 64 bits overflow; with it,
    64 bits (Python ints up to ``2**63 - 1``).
    """
    return 2**63 - 1 if jax.config.read("jax_enable_x64") else 2**32 - 1


def check_key_seed(seed: Any, name: str = "rng seed", *, top: int | None = None) -> int:
    """``seed`` as an int, or a clear error unless it is in ``[0, top]``.

    The one seed rule of jaxtrain (`TrainState.create`, `ArrayDataset`, `GrainData` and
    the CLI's ``--seed``): a seed outside the range would silently repeat another seed.

    Args:
        seed: the seed.
        name: how the message names it.
        top: the largest seed allowed; default `max_key_seed` (32 bits without x64).

    Returns:
        ``int(seed)``.

    Example:
        >>> check_key_seed(7)
        7
        >>> check_key_seed(-1)
        Traceback (most recent call last):
        ...
        ValueError: rng seed must be an integer in [0, 4294967295] (2**32 - 1); got -1. ...
    """
    top = max_key_seed() if top is None else top
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= top:
        bits = 63 if top == 2**63 - 1 else 32
        why = (
            "jax.random.key keeps 32 bits of an int seed (jax_enable_x64 is off), so a "
            "seed outside it would silently repeat another seed's key (2**32 gives seed 0's)"
            if bits == 32
            else "larger ints do not fit jax.random.key's 64-bit seed"
        )
        raise ValueError(
            f"{name} must be an integer in [0, {top}] (2**{bits} - 1); got {seed!r}. "
            f"{why}. Fix: use a seed in that range (e.g. seed % 2**{bits}) or pass "
            "a key, jax.random.key(seed)."
        )
    return int(seed)


def _private_copy(tree: PyTree) -> PyTree:
    """New device buffers for every array leaf (numpy and Python values become arrays).

    The train step donates the state: XLA reuses its buffers for the new state and
    deletes the old arrays. Arrays the caller still holds (the params one init gave,
    shared by two states built for two optimizers) must therefore never be leaves of a
    state: a copy, once at creation, costs one params-sized copy and nothing per step.
    """
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else jnp.array(x), tree)


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
        ema_params: the exponential moving average of ``params`` that a step built
            with ``ema_decay=`` keeps (`TrainState.create(..., ema=True)` starts it as a
            copy of ``params``), else an empty dict (no leaves, as ``loss_scale``).

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
    ema_params: PyTree = struct.field(default_factory=dict)

    if TYPE_CHECKING:
        # flax.struct.dataclass adds this at runtime, where type checkers cannot see it.
        def replace(self, **changes: Any) -> TrainState:
            """A copy with the fields in ``changes`` replaced."""
            ...

    @classmethod
    def create(
        cls,
        params: PyTree,
        optimizer: optax.GradientTransformation,
        rng: jax.Array | int,
        model_state: PyTree | None = None,
        *,
        precision: str | Policy | None = None,
        copy: bool = True,
        ema: bool = False,
    ) -> TrainState:
        """Builds the initial state, on arrays of its own.

        The train step donates its input state (its buffers become the new state's, and
        the old arrays are deleted), so the state holds copies of ``params``,
        ``model_state`` and ``rng``: the caller's arrays stay valid, and one init can
        seed several states (two optimizers compared from the same params).

        Args:
            params: initial parameters.
            optimizer: the optax transformation that ``make_train_step`` will use; only
                its ``init`` is called here.
            rng: an int seed, a typed key (``jax.random.key``) or raw key data.
            model_state: initial mutable collections, or None for none.
            precision: the `jaxtrain.Policy` (or its name) the step will use; a policy
                with loss scaling gets its initial `LossScaleState` here.
            copy: copy the arrays (default). False hands ``params`` and ``model_state``
                over to the state, saving one params-sized copy at creation: the first
                donating step then deletes them, so use it only for arrays nothing
                else refers to.
            ema: also keep an exponential moving average of the parameters
                (``ema_params``), started as a copy of ``params``; the step must then
                be built with ``ema_decay=`` (`jaxtrain.make_train_step`, `jaxtrain.ema`).

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
        model_state = {} if model_state is None else model_state
        key_data = as_key_data(rng)
        if not isinstance(ema, bool):
            raise TypeError(f"ema must be True or False; got {ema!r}.")
        if copy:
            params, model_state, key_data = _private_copy((params, model_state, key_data))
        # Its own buffers: the step donates the state, and one buffer twice in it would be
        # deleted twice. Starting at the params (not zeros) needs no bias correction.
        ema_params = jax.tree.map(jnp.copy, params) if ema else {}
        opt_state = optimizer.init(params)
        # Some optimizers keep the params themselves in their state (lookahead's slow
        # weights): one buffer twice in a donated state would be deleted twice.
        param_ids = {id(x) for x in jax.tree.leaves(params)}
        opt_state = jax.tree.map(
            lambda x: x.copy() if id(x) in param_ids and isinstance(x, jax.Array) else x,
            opt_state,
        )
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=key_data,
            model_state=model_state,
            skipped_steps=jnp.zeros((), jnp.int32),
            loss_scale=_initial_loss_scale(precision),
            ema_params=ema_params,
        )

    def step_rng(self) -> jax.Array:
        """The typed key for the current step: ``fold_in(rng, step)``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _initial_loss_scale(precision: str | Policy | None) -> PyTree:
    """``TrainState.loss_scale`` for a policy, a policy name, or None (an empty dict)."""
    from jaxtrain.precision import get_policy  # precision.py does not import state.py

    policy = get_policy(precision)
    return {} if policy is None else policy.init_loss_scale()


def raise_if_donated(tree: PyTree, name: str, error: BaseException) -> None:
    """Raises a clear error, from ``error``, when ``tree`` holds donated (deleted) arrays.

    Called only after a step call has failed, so the check costs nothing per step.

    Args:
        tree: the state the failed call was given.
        name: the step's name, for the message.
        error: the exception the call raised.
    """
    deleted = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if isinstance(leaf, jax.Array) and leaf.is_deleted()
    ]
    if deleted:
        raise RuntimeError(
            f"{name} got a state whose arrays were donated to a train step at an earlier "
            f"call and are deleted (e.g. {deleted[0]}): this TrainState was donated. Fix: "
            "use the state that call returned, `state, metrics = train_step(state, batch)`; "
            "to keep a state for later, copy it first: `jax.tree.map(jnp.copy, state)`."
        ) from error
