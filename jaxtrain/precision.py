"""Mixed precision: a dtype policy and dynamic loss scaling, as data.

A `Policy` says which dtype each kind of value lives in:

* ``param_dtype`` (float32): the parameters and the optimizer state, as stored in the
  `TrainState`. They never leave float32, so small updates are not lost to rounding.
* ``compute_dtype`` (bfloat16 or float16): the forward and backward passes. The step
  casts the parameters and the floating batch inputs (``Policy.input_keys``, by default
  ``"x"``; never masks or labels) to it *inside* the differentiated function, so the
  cast's transpose brings the gradients back in float32.
* ``output_dtype`` (float32): the loss, the aux metrics and the model state the loss
  function returns.

float16's range ends at 65504 and its smallest normal is 6e-5, so small gradients
underflow to zero. `DynamicLossScale` multiplies the loss by a scale ``S`` (2**15 to
start) before differentiation and divides the float32 gradients by ``S`` afterwards. When
any gradient is non-finite (the scaled backward pass overflowed) the update is skipped —
parameters, optimizer state and model state stay bitwise unchanged, selected with
``jnp.where`` inside the compiled step, no host sync — and ``S`` is halved; after
``growth_interval`` consecutive finite steps ``S`` is doubled. The scale's state,
`LossScaleState`, is three arrays kept in ``TrainState.loss_scale``, so it is donated,
fused, checkpointed and restored like every other leaf.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jaxtrain as jt
    >>> policy = jt.Policy.from_name("float16")  # compute in float16, loss scaling on
    >>> policy.compute_dtype, policy.loss_scale.initial_scale
    (dtype('float16'), 32768.0)
    >>> def loss_fn(params, batch):
    ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    >>> opt = optax.sgd(0.1)
    >>> state = jt.TrainState.create({"w": jnp.zeros(3)}, opt, 0, precision=policy)
    >>> step = jt.make_train_step(loss_fn, opt, precision=policy)
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.ones(4)}
    >>> state, metrics = step(state, batch)  # 2**15 * gradient (-2) overflows float16
    >>> float(metrics["loss_scale"]), int(metrics["loss_scale_overflows"]), state.params["w"]
    (16384.0, 1, Array([0., 0., 0.], dtype=float32))
    >>> state, metrics = step(state, batch)  # at 2**14 it fits: the update is applied
    >>> float(metrics["loss"]), float(metrics["loss_scale"]), state.params["w"]
    (1.0, 16384.0, Array([0.2, 0.2, 0.2], dtype=float32))

What must not live here: how the step applies the policy (`jaxtrain.transforms`). It never
imports the loop, the applications (`jaxtrain.apps`, `jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxtrain.types import PyTree

__all__ = ["NAMES", "DynamicLossScale", "LossScaleState", "Policy", "get_policy"]

#: The policies `Policy.from_name` knows, by name.
NAMES = ("float32", "bfloat16", "float16")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Common spellings that are not names here, mapped to the name meant.
_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}


def _dtype(value: Any, field: str) -> np.dtype:
    """``value`` as one of the three floating dtypes, or an error naming ``field``."""
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt is None or dt.name not in _DTYPES:
        raise ValueError(
            f"Policy.{field} must be one of float32, bfloat16, float16; got {value!r}. "
            f"Fix: e.g. Policy({field}=jnp.bfloat16)."
        )
    return dt


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """Settings of dynamic loss scaling (the state lives in `LossScaleState`).

    Every scale is a power of two, so scaling the loss and unscaling the gradients are
    exact in floating point: with no overflow, a loss-scaled step computes the same
    gradients as an unscaled one would without underflow.

    Attributes:
        initial_scale: the scale of the first step (default 2**15).
        growth_interval: double the scale after this many consecutive finite steps
            (default 2000).
        min_scale: the scale is never halved below this (default 1.0). An overflow at
            the minimum is a genuinely non-finite gradient (see `make_train_step`'s
            ``nonfinite``).
        max_scale: the scale is never doubled above this (default 2**24).

    Example:
        >>> DynamicLossScale(initial_scale=2.0**10, growth_interval=100).max_scale
        16777216.0
    """

    initial_scale: float = 2.0**15
    growth_interval: int = 2000
    min_scale: float = 1.0
    max_scale: float = 2.0**24

    def __post_init__(self):
        for field in ("initial_scale", "min_scale", "max_scale"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"DynamicLossScale.{field} must be a number; got {value!r}.")
            if not _is_power_of_two(float(value)):
                raise ValueError(
                    f"DynamicLossScale.{field} must be a power of two (so that scaling is "
                    f"exact); got {value!r}. Fix: e.g. {field}=2.0**15."
                )
            object.__setattr__(self, field, float(value))
        if not self.min_scale <= self.initial_scale <= self.max_scale:
            raise ValueError(
                "DynamicLossScale needs min_scale <= initial_scale <= max_scale; got "
                f"min_scale={self.min_scale}, initial_scale={self.initial_scale}, "
                f"max_scale={self.max_scale}."
            )
        if (
            isinstance(self.growth_interval, bool)
            or not isinstance(self.growth_interval, int)
            or self.growth_interval < 1
        ):
            raise ValueError(
                "DynamicLossScale.growth_interval must be an integer >= 1; got "
                f"{self.growth_interval!r}."
            )

    def init(self) -> LossScaleState:
        """The state before the first step: ``initial_scale``, no good steps yet."""
        return LossScaleState(
            scale=jnp.asarray(self.initial_scale, jnp.float32),
            good_steps=jnp.zeros((), jnp.int32),
            overflows=jnp.zeros((), jnp.int32),
        )

    def update(self, state: LossScaleState, finite: jax.Array) -> LossScaleState:
        """The state after a step whose gradients were ``finite`` (a bool scalar).

        Pure and branch-free (``jnp.where``), so it runs inside the compiled step.
        """
        grown = state.good_steps + 1 >= self.growth_interval
        scale = jnp.where(
            finite,
            jnp.where(grown, jnp.minimum(state.scale * 2, self.max_scale), state.scale),
            jnp.maximum(state.scale / 2, self.min_scale),
        )
        good = jnp.where(finite & ~grown, state.good_steps + 1, 0)
        return LossScaleState(
            scale=scale.astype(jnp.float32),
            good_steps=good.astype(jnp.int32),
            overflows=state.overflows + (~finite).astype(jnp.int32),
        )


@struct.dataclass
class LossScaleState:
    """Dynamic loss scaling's state: three scalars, a pytree of arrays.

    Attributes:
        scale: float32, the current loss scale.
        good_steps: int32, consecutive finite steps since the scale last changed.
        overflows: int32, steps skipped because the scaled gradients overflowed.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> s = LossScaleState(jnp.float32(2.0**15), jnp.int32(0), jnp.int32(0))
        >>> float(s.scale), len(jax.tree.leaves(s))
        (32768.0, 3)
    """

    scale: jax.Array
    good_steps: jax.Array
    overflows: jax.Array


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which dtype parameters, computation and outputs use.

    Attributes:
        param_dtype: dtype of the stored parameters (and so of the optimizer state).
            The step checks the parameters have it.
        compute_dtype: dtype of the forward and backward passes.
        output_dtype: dtype of the loss, the aux metrics and the returned model state.
        loss_scale: dynamic loss scaling settings, or None for none. `from_name`
            turns it on for float16 only (bfloat16 has float32's range).
        input_keys: batch entries cast to ``compute_dtype`` when they are floating
            point. Other entries (``mask``, labels, targets) are left as they are.

    Example:
        >>> import jax.numpy as jnp
        >>> p = Policy(compute_dtype=jnp.bfloat16)
        >>> p.name, p.cast_to_compute({"w": jnp.ones(2)})["w"].dtype
        ('bfloat16', dtype(bfloat16))
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32
    loss_scale: DynamicLossScale | None = None
    input_keys: tuple[str, ...] = ("x",)

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, field, _dtype(getattr(self, field), field))
        if self.loss_scale is not None and not isinstance(self.loss_scale, DynamicLossScale):
            raise ValueError(
                "Policy.loss_scale must be a jaxtrain.precision.DynamicLossScale or None; got "
                f"{type(self.loss_scale).__name__}. Fix: loss_scale=DynamicLossScale()."
            )
        keys = self.input_keys
        if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
            raise ValueError(
                f"Policy.input_keys must be a tuple of batch entry names; got {keys!r}. "
                "Fix: input_keys=('x',)."
            )
        object.__setattr__(self, "input_keys", tuple(keys))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Policy:
        """The standard policy for ``name``: float32 parameters and outputs.

        Args:
            name: ``"float32"`` (plain float32), ``"bfloat16"`` or ``"float16"``
                (compute dtype; float16 also turns on `DynamicLossScale` ()).
            **overrides: any `Policy` field, e.g. ``loss_scale=DynamicLossScale(2.0**10)``.

        Returns:
            The `Policy`.

        Example:
            >>> Policy.from_name("bfloat16").loss_scale is None
            True
        """
        if name not in _DTYPES:
            hint = f" (did you mean {_ALIASES[name]!r}?)" if name in _ALIASES else ""
            raise ValueError(
                f"unknown precision {name!r}{hint}; expected one of "
                f"{', '.join(repr(n) for n in NAMES)}. Fix: e.g. precision='bfloat16'."
            )
        fields = {
            "compute_dtype": _DTYPES[name],
            "loss_scale": DynamicLossScale() if name == "float16" else None,
        }
        fields.update(overrides)
        return cls(**fields)

    @property
    def name(self) -> str:
        """The compute dtype's name (``"bfloat16"``), for summaries and messages."""
        return self.compute_dtype.name

    def init_loss_scale(self) -> PyTree:
        """The value of ``TrainState.loss_scale`` for this policy.

        Returns:
            A `LossScaleState` when loss scaling is on, else an empty dict (no leaves).
        """
        return {} if self.loss_scale is None else self.loss_scale.init()

    def cast_to_compute(self, tree: PyTree) -> PyTree:
        """Floating leaves of ``tree`` cast to ``compute_dtype``; others unchanged."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: PyTree) -> PyTree:
        """Floating leaves of ``tree`` cast to ``output_dtype``; others unchanged."""
        return _cast_floating(tree, self.output_dtype)

    def cast_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch`` with its floating ``input_keys`` entries cast to ``compute_dtype``.

        Args:
            batch: ``{name: array}``; ``mask`` and labels are never in ``input_keys``
                unless you put them there.

        Returns:
            A new dict; entries not named in ``input_keys`` are the same objects.
        """
        out = dict(batch)
        for key in self.input_keys:
            if key in out:
                out[key] = _cast_floating(out[key], self.compute_dtype)
        return out


def _cast_floating(tree: PyTree, dtype: np.dtype) -> PyTree:
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(cast, tree)


def get_policy(precision: str | Policy | None) -> Policy | None:
    """``precision`` as a `Policy`: a name, a policy, or None (no policy).

    Args:
        precision: ``"float32"``, ``"bfloat16"``, ``"float16"``, a `Policy`, or None.

    Returns:
        The `Policy`, or None when ``precision`` is None.

    Example:
        >>> get_policy("float16").loss_scale.growth_interval
        2000
    """
    if precision is None or isinstance(precision, Policy):
        return precision
    if isinstance(precision, str):
        return Policy.from_name(precision)
    raise TypeError(
        "precision must be a name ('float32', 'bfloat16', 'float16'), a jaxtrain.Policy or "
        f"None; got {type(precision).__name__}."
    )


def check_params(policy: Policy, params: PyTree) -> None:
    """Trace-time check that every floating parameter has ``policy.param_dtype``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dt = jnp.result_type(leaf)
        if jnp.issubdtype(dt, jnp.floating) and dt != policy.param_dtype:
            raise ValueError(
                f"precision policy {policy.name!r} keeps parameters in {policy.param_dtype}, "
                f"but params{jax.tree_util.keystr(path)} is {dt}. Fix: create the state from "
                f"{policy.param_dtype} parameters (the policy casts them to "
                f"{policy.compute_dtype} inside the step)."
            )


def check_loss_scale_state(policy: Policy, loss_scale: PyTree) -> None:
    """Trace-time check that ``TrainState.loss_scale`` fits the policy."""
    fix = (
        "Fix: TrainState.create(params, optimizer, rng, precision=policy), or "
        "state.replace(loss_scale=policy.init_loss_scale())."
    )
    if policy.loss_scale is not None and not isinstance(loss_scale, LossScaleState):
        raise ValueError(
            f"precision policy {policy.name!r} uses dynamic loss scaling, whose state lives in "
            f"TrainState.loss_scale, but the state holds {loss_scale!r}. {fix}"
        )
    if policy.loss_scale is None and jax.tree.leaves(loss_scale):
        raise ValueError(
            f"the state carries a loss scale but precision policy {policy.name!r} does not "
            f"scale the loss (its loss_scale is None). {fix}"
        )


def wrap_loss(
    call_loss: Callable[..., Any], policy: Policy, scale: jax.Array | None
) -> Callable[..., Any]:
    """``call_loss`` computed under ``policy``, its loss multiplied by ``scale``.

    ``call_loss(params, batch, rng, model_state) -> (loss, (aux, model_state))`` is
    jaxtrain's normalised loss. The returned function takes float32 parameters and casts
    them (and the batch inputs) to the compute dtype itself, so ``jax.grad`` of it
    returns float32 gradients (of ``scale * loss`` when ``scale`` is given).
    """

    def wrapped(params, batch, rng, model_state):
        loss, (aux, new_model_state) = call_loss(
            policy.cast_to_compute(params), policy.cast_batch(batch), rng, model_state
        )
        loss = loss.astype(policy.output_dtype)
        if scale is not None:
            loss = loss * scale.astype(loss.dtype)
        # The model state keeps the dtypes it came in with (a scan/where needs equal types).
        if jax.tree.structure(new_model_state) == jax.tree.structure(model_state):
            new_model_state = jax.tree.map(
                lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)),
                new_model_state,
                model_state,
            )
        return loss, (policy.cast_to_output(aux), new_model_state)

    return wrapped
