"""The options every train step is built from, defined and validated once.

`StepOptions` holds each option of `jaxtrain.make_train_step`, `make_train_steps` and
`make_device_epoch` exactly once, with its allowed values and its check; the builders
and the transforms (`jaxtrain.transforms`) read it and never re-validate. `StepSpec` is
what a built step declares about itself (`CompiledStep.spec`): the loop reads it instead
of probing attributes.

What must not live here: anything that traces, compiles or runs a step. This module
imports only `jaxtrain.precision` (for the policy names); never the loop, the CLI,
checkpoints or torch.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import optax
from jax.sharding import Mesh

from jaxtrain import precision as precision_lib

__all__ = ["NONFINITE_POLICIES", "UNROLL_AUTO", "StepOptions", "StepSpec", "check_unroll"]

#: The values of ``nonfinite`` other than None (no guard): the one definition.
NONFINITE_POLICIES = ("skip", "raise")
#: ``unroll``'s default: decided when the step is first traced (`jaxtrain.transforms`).
UNROLL_AUTO = "auto"
#: What a step built by jaxtrain is: one step, K fused steps, a device-resident epoch,
#: or an evaluation step.
KINDS = ("step", "fused", "epoch", "eval")


def check_unroll(unroll: Any) -> None:
    """Refuses an ``unroll`` that is not ``"auto"``, a bool or an integer >= 1."""
    if unroll == UNROLL_AUTO and isinstance(unroll, str):
        return
    if not (isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1)):
        raise ValueError(
            f"unroll must be 'auto', True, False or an integer >= 1 (steps per loop "
            f"iteration); got {unroll!r}. Fix: leave it at 'auto' (unrolls convolutional "
            "models on CPU), or pass True or 1."
        )


def check_positive_int(name: str, value: Any) -> None:
    """Refuses a ``value`` for option ``name`` that is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")


def _check_nonfinite(nonfinite: Any) -> None:
    if nonfinite is not None and nonfinite not in NONFINITE_POLICIES:
        allowed = ", ".join(repr(p) for p in NONFINITE_POLICIES)
        raise ValueError(
            f"nonfinite must be {allowed} or None; got {nonfinite!r}. Fix: nonfinite='skip' "
            "skips a non-finite step, 'raise' also stops the run at the next log, None "
            "applies every update."
        )


def check_ema_decay(decay: Any) -> None:
    """Refuses an ``ema_decay`` that is not None or a number strictly between 0 and 1."""
    if decay is None:
        return
    # numbers.Real: numpy scalars (np.float32(0.999)) are numbers too; bool is not a decay.
    ok = isinstance(decay, numbers.Real) and not isinstance(decay, bool) and 0 < float(decay) < 1
    if not ok:
        raise ValueError(
            f"ema_decay must be a number in (0, 1) or None; got {decay!r}. It is the weight "
            "of the old average at each step: ema = decay * ema + (1 - decay) * params. "
            "Fix: e.g. ema_decay=0.999 (an average over about 1 / (1 - decay) = 1000 steps)."
        )


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How a train step is built: every option once, checked when constructed.

    The public builders take these as keyword arguments (their docstrings describe
    each); `jaxtrain.step.build_train_step` takes the object itself.

    Attributes:
        learning_rate_fn: the schedule ``step -> learning rate`` reported as a metric.
        mesh: the device mesh the state lives on; None: wherever the inputs live.
        donate: donate the input state's buffers to the output.
        jit: False runs the pure function eagerly (debugging, tests).
        nonfinite: None, or one of `NONFINITE_POLICIES` (``"skip"``, ``"raise"``).
        grad_accum_steps: microbatches per batch (an integer >= 1).
        precision: a `jaxtrain.Policy`, one of `jaxtrain.precision.NAMES`, or None;
            stored as the `Policy` (or None).
        grad_norm: report the ``grad_norm`` metric.
        unroll: ``jax.lax.scan``'s unroll for fused steps and device epochs:
            ``"auto"`` (default), True, or an integer >= 1.
        ema_decay: keep ``state.ema_params``, an exponential moving average of the
            parameters, with this decay in (0, 1); None: no average.

    Example:
        >>> opts = StepOptions(nonfinite="skip", precision="bfloat16")
        >>> opts.precision.name, opts.grad_accum_steps
        ('bfloat16', 1)
        >>> StepOptions(nonfinite="off")
        Traceback (most recent call last):
        ...
        ValueError: nonfinite must be 'skip', 'raise' or None; got 'off'. ...
    """

    learning_rate_fn: Callable[[Any], Any] | None = None
    mesh: Mesh | None = None
    donate: bool = True
    jit: bool = True
    nonfinite: str | None = None
    grad_accum_steps: int = 1
    precision: precision_lib.Policy | str | None = None
    grad_norm: bool = True
    unroll: int | bool | str = UNROLL_AUTO
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.learning_rate_fn is not None and not callable(self.learning_rate_fn):
            raise TypeError(
                "learning_rate_fn must be a function step -> learning rate (e.g. an optax "
                f"schedule) or None; got {type(self.learning_rate_fn).__name__}."
            )
        _check_bool("grad_norm", self.grad_norm)
        _check_bool("donate", self.donate)
        _check_bool("jit", self.jit)
        _check_nonfinite(self.nonfinite)
        check_positive_int("grad_accum_steps", self.grad_accum_steps)
        check_unroll(self.unroll)
        check_ema_decay(self.ema_decay)
        object.__setattr__(self, "precision", precision_lib.get_policy(self.precision))

    @property
    def policy(self) -> precision_lib.Policy | None:
        """``precision`` as its `Policy` (or None), the type the transforms take.

        ``__post_init__`` already resolved a name; this says so to the type checker
        (get_policy returns a Policy as given).
        """
        return precision_lib.get_policy(self.precision)

    def changed(self, names: tuple[str, ...]) -> list[str]:
        """Which of the options ``names`` differ from their defaults.

        Args:
            names: option names (fields of this class).

        Returns:
            The names, in the order given, whose value is not the default.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [n for n in names if getattr(self, n) != defaults[n]]


def check_optimizer(optimizer: Any) -> None:
    """Refuses an ``optimizer`` that is not an optax ``GradientTransformation``."""
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)); "
            f"got {type(optimizer).__name__}."
        )


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a compiled step is, declared by the step (`CompiledStep.spec`).

    `jaxtrain.fit` reads it to feed the step: one batch per call (``"step"``), ``[K,
    B, ...]`` groups (``"fused"``), or nothing but the epoch number (``"epoch"``).

    Attributes:
        kind: ``"step"``, ``"fused"``, ``"epoch"`` or ``"eval"``.
        steps_per_call: training steps one call runs: 1, K, or the steps of an epoch
            (0 for an evaluation step).
        dataset: the `jaxtrain.ArrayDataset` a device-resident epoch runs, else None.
        nonfinite: the non-finite guard's policy (``"skip"``, ``"raise"``) or None.
        nonfinite_names: the names of the values the guard checks (``"loss"``, then
            each gradient, update and new parameter), filled when the step is traced;
            the step's ``nonfinite`` metric indexes it.
        unroll: the scan unrolling of a fused step or epoch: ``"auto"`` until the first
            call decides it (True for a convolutional model on CPU, else 1), then the
            value used; None for a single step or an evaluation step.
        population: True for a step over a `jaxtrain.population.PopulationState`
            (`jaxtrain.population_step`): its metrics carry a member axis ``[N]``.
        member_batches: True for a population step fed one batch per member, ``[N,
            B, ...]`` (fused ``[K, N, B, ...]``).
        vectorize: how a population step combines its members: ``"vmap"``, ``"map"``
            or ``"loop"``; ``"auto"`` until the first call decides it; None for a
            single-run step.

    Example:
        >>> import jax.numpy as jnp, optax, jaxtrain as jt
        >>> steps = jt.make_train_steps(lambda p, b: jnp.sum(p), optax.sgd(0.1), steps_per_call=4)
        >>> steps.spec.kind, steps.spec.steps_per_call, steps.spec.unroll
        ('fused', 4, 'auto')
        >>> jt.make_train_step(lambda p, b: jnp.sum(p), optax.sgd(0.1)).spec.steps_per_call
        1
    """

    kind: str
    steps_per_call: int = 1
    dataset: Any = None
    nonfinite: str | None = None
    nonfinite_names: list[str] = dataclasses.field(default_factory=list)
    unroll: int | bool | str | None = None
    population: bool = False
    member_batches: bool = False
    vectorize: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"StepSpec.kind must be one of {KINDS}; got {self.kind!r}.")


def step_options(caller: str, **kwargs: Any) -> StepOptions:
    """`StepOptions` from a builder's keyword arguments; a misspelt name says so.

    Args:
        caller: the builder's name, for the message.
        **kwargs: `StepOptions` fields.

    Returns:
        The checked `StepOptions`.
    """
    fields = [f.name for f in dataclasses.fields(StepOptions)]
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        raise TypeError(
            f"{caller} got unknown option(s) {', '.join(repr(k) for k in unknown)}. Fix: use "
            f"one of {', '.join(fields)}."
        )
    return StepOptions(**kwargs)
