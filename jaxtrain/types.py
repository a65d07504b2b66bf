"""The shared type vocabulary: `PyTree`, `Batch`, and the `LossFn` / `EvalFn` protocols.

What lives here: type aliases and protocols, no behaviour. What must not: any import of
another jaxtrain module, so that every module (core or application) can import this one.
Named ``types`` rather than ``typing`` so that it never shadows the standard library's
module.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxtrain.types import LossFn
    >>> def loss_fn(params, batch):  # the plain form; ``rng`` / ``model_state`` optional
    ...     return jnp.mean((batch["x"] @ params["w"]) ** 2)
    >>> checked: LossFn = loss_fn  # what a type checker verifies at make_train_step
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeAlias

import jax

__all__ = [
    "Batch",
    "EvalFn",
    "EvalFnWithModelState",
    "LossFn",
    "LossFnWithModelState",
    "LossFnWithRng",
    "LossFnWithRngAndModelState",
    "LossOutput",
    "PlainEvalFn",
    "PlainLossFn",
    "PyTree",
]

# A nested structure of arrays: dicts, lists, tuples, flax FrozenDicts, optax states and
# registered dataclasses such as `TrainState`. `Any`, not `chex.ArrayTree`: chex's alias is
# a recursive union of Mapping/Iterable that a registered dataclass or optax's NamedTuple
# states do not match, so it would reject correct code without catching real errors. The
# name still says what is meant at every signature.
PyTree: TypeAlias = Any

# One batch as the steps see it: named arrays with a shared leading (example) axis.
Batch: TypeAlias = Mapping[str, jax.Array]

# The batch parameter of the user's functions: `Any`, not `Batch`, because parameters are
# contravariant: a loss annotated ``batch: dict[str, jax.Array]`` (the common spelling)
# would not accept every `Mapping` and so would be rejected although it works.
_BatchArg: TypeAlias = Any

# What a loss function returns: a float scalar, or ``(loss, aux)`` with ``aux`` a dict of
# scalar metrics (plus an optional ``"model_state"`` entry), or None for no metrics.
LossOutput: TypeAlias = jax.Array | tuple[jax.Array, Mapping[str, Any] | None]


class PlainLossFn(Protocol):
    """``loss_fn(params, batch) -> loss | (loss, aux)``."""

    def __call__(self, params: PyTree, batch: _BatchArg, /) -> LossOutput:
        """The scalar loss, or ``(loss, aux)``."""


class LossFnWithRng(Protocol):
    """``loss_fn(params, batch, *, rng)``: a fresh typed key every step (dropout)."""

    def __call__(self, params: PyTree, batch: _BatchArg, /, *, rng: jax.Array) -> LossOutput:
        """The scalar loss, or ``(loss, aux)``."""


class LossFnWithModelState(Protocol):
    """``loss_fn(params, batch, *, model_state)``: mutable collections (BatchNorm)."""

    def __call__(self, params: PyTree, batch: _BatchArg, /, *, model_state: PyTree) -> LossOutput:
        """The scalar loss, or ``(loss, aux)``."""


class LossFnWithRngAndModelState(Protocol):
    """``loss_fn(params, batch, *, rng, model_state)``: both keyword arguments."""

    def __call__(
        self, params: PyTree, batch: _BatchArg, /, *, rng: jax.Array, model_state: PyTree
    ) -> LossOutput:
        """The scalar loss, or ``(loss, aux)``."""


# The loss a step accepts: the step passes ``rng`` and ``model_state`` only to a function
# that declares them (by signature inspection), so any of the four forms type-checks.
LossFn: TypeAlias = PlainLossFn | LossFnWithRng | LossFnWithModelState | LossFnWithRngAndModelState


class PlainEvalFn(Protocol):
    """``eval_fn(params, batch) -> {name: per-example values}``."""

    def __call__(self, params: PyTree, batch: _BatchArg, /) -> Mapping[str, jax.Array]:
        """Per-example values, ``{name: [B] array}``."""


class EvalFnWithModelState(Protocol):
    """``eval_fn(params, batch, *, model_state) -> {name: per-example values}``."""

    def __call__(
        self, params: PyTree, batch: _BatchArg, /, *, model_state: PyTree
    ) -> Mapping[str, jax.Array]:
        """Per-example values, ``{name: [B] array}``."""


# The evaluation function `make_eval_step` accepts, with or without ``model_state``.
EvalFn: TypeAlias = PlainEvalFn | EvalFnWithModelState
