"""`OptimizerSpec`: one optimizer, clipping and schedule, in PyTorch's terms and defaults.

`jaxtrain.contrast.optim.make_torch` builds the ``torch.optim`` side from it,
`jaxtrain.contrast.optim.make_optax` the optax side. Every field has PyTorch's default;
a field that the chosen optimizer or schedule would ignore must keep its default (a
setting that silently does nothing is refused), and an unknown keyword is an error that
lists the accepted ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "plateau")
TORCH_DEFAULT_WEIGHT_DECAY = {
    "sgd": 0.0,
    "adam": 0.0,
    "adamw": 1e-2,
    "rmsprop": 0.0,
    "adagrad": 0.0,
}
OPTAX_DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 1e-4}
TORCH_DEFAULT_EPS = {"sgd": 1e-8, "adam": 1e-8, "adamw": 1e-8, "rmsprop": 1e-8, "adagrad": 1e-10}

# Fields that only one group of optimizers (or schedules) reads: any other value than the
# default with another optimizer would be ignored, so it is refused.
_OPTIMIZER_FIELDS = {
    "momentum": ("sgd", "rmsprop"),
    "dampening": ("sgd",),
    "nesterov": ("sgd",),
    "betas": ("adam", "adamw"),
    "eps": ("adam", "adamw", "rmsprop", "adagrad"),
    "amsgrad": ("adam", "adamw"),
    "alpha": ("rmsprop",),
    "centered": ("rmsprop",),
    "lr_decay": ("adagrad",),
    "initial_accumulator_value": ("adagrad",),
}
_SCHEDULE_FIELDS = {
    "step_size": ("step",),
    "gamma": ("step",),
    "min_lr": ("cosine", "plateau"),
    "pct_start": ("onecycle",),
    "anneal_strategy": ("onecycle",),
    "div_factor": ("onecycle",),
    "final_div_factor": ("onecycle",),
    "three_phase": ("onecycle",),
    "cycle_momentum": ("onecycle",),
    "base_momentum": ("onecycle",),
    "max_momentum": ("onecycle",),
    "factor": ("plateau",),
    "patience": ("plateau",),
    "threshold": ("plateau",),
    "threshold_mode": ("plateau",),
    "cooldown": ("plateau",),
}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer, gradient clipping and learning-rate schedule, in PyTorch's terms.

    Attributes:
        name: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"`` or ``"adagrad"``.
        lr: the (peak) learning rate (``OneCycleLR``'s ``max_lr``).
        momentum: SGD / RMSprop momentum (0: none).
        nesterov: SGD Nesterov momentum (needs ``momentum > 0`` and no dampening).
        weight_decay: None for PyTorch's default (1e-2 for adamw, else 0).
            AdamW: decoupled, times the lr; the others: L2 term added to the gradient.
        betas: Adam's ``(beta1, beta2)``.
        eps: None for PyTorch's default (1e-10 for adagrad, else 1e-8).
        clip_norm: ``clip_grad_norm_(max_norm=clip_norm)`` before the step, or None.
        schedule: ``"constant"``, ``"step"`` (``StepLR``), ``"cosine"``
            (``CosineAnnealingLR`` over ``total_steps - warmup_steps``), ``"onecycle"``
            (``OneCycleLR`` over ``total_steps``) or ``"plateau"`` (``ReduceLROnPlateau``
            on the training loss, stepped after every step).
        warmup_steps: linear warmup (``LinearLR``) over this many steps, 0 for none.
        warmup_start_factor: ``LinearLR``'s ``start_factor``, in (0, 1].
        total_steps: steps of the whole run (``"cosine"``, ``"onecycle"``).
        step_size, gamma: ``StepLR``'s.
        min_lr: ``CosineAnnealingLR``'s ``eta_min``, ``ReduceLROnPlateau``'s ``min_lr``.
        dampening: SGD's ``dampening`` (not applied on the first step, as in PyTorch).
        amsgrad: Adam/AdamW ``amsgrad`` (PyTorch's: the max of the raw second moment).
        alpha: RMSprop's smoothing constant (PyTorch 0.99; optax's ``decay`` default 0.9).
        centered: RMSprop's ``centered``.
        lr_decay, initial_accumulator_value: Adagrad's.
        decay_1d: False: no weight decay on parameters with fewer than 2 dimensions
            (biases, norm scales): two PyTorch parameter groups, an optax mask.
        pct_start, anneal_strategy, div_factor, final_div_factor, three_phase,
            cycle_momentum, base_momentum, max_momentum: ``OneCycleLR``'s (PyTorch's
            defaults; ``cycle_momentum`` cycles SGD/RMSprop momentum or Adam's beta1).
        factor, patience, threshold, threshold_mode, cooldown: ``ReduceLROnPlateau``'s
            (``mode="min"``, on the training loss).

    Example:
        >>> spec = OptimizerSpec("adamw", lr=1e-3, schedule="cosine", warmup_steps=10,
        ...                      total_steps=100, clip_norm=1.0)
        >>> spec.decay, spec.epsilon  # PyTorch's defaults
        (0.01, 1e-08)
        >>> OptimizerSpec("adam", amsgrad=True, maximize=True)
        Traceback (most recent call last):
        ...
        TypeError: OptimizerSpec got an unknown keyword argument 'maximize'; accepted: ...
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = None
    clip_norm: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_start_factor: float = 1.0 / 3.0
    total_steps: int | None = None
    step_size: int | None = None
    gamma: float = 0.1
    min_lr: float = 0.0
    dampening: float = 0.0
    amsgrad: bool = False
    alpha: float = 0.99
    centered: bool = False
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    decay_1d: bool = True
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0

    def __post_init__(self):
        _check_fields_in_use(self)
        _check_optimizer(self)
        _check_schedule(self)

    @property
    def decay(self) -> float:
        """The weight decay in effect: the given one or PyTorch's default."""
        if self.weight_decay is None:
            return TORCH_DEFAULT_WEIGHT_DECAY[self.name]
        return float(self.weight_decay)

    @property
    def epsilon(self) -> float:
        """The epsilon in effect: the given one or PyTorch's default."""
        return TORCH_DEFAULT_EPS[self.name] if self.eps is None else float(self.eps)

    @property
    def cycles_momentum(self) -> bool:
        """Whether ``OneCycleLR`` cycles this optimizer's momentum (or beta1)."""
        return self.schedule == "onecycle" and self.cycle_momentum


FIELDS = tuple(f.name for f in dataclasses.fields(OptimizerSpec))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OptimizerSpec)}
_dataclass_init = OptimizerSpec.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args: Any, **kwargs: Any) -> None:
    # The dataclass's __init__ with an error that lists the accepted fields: Python's
    # "unexpected keyword argument 'amsgrad'" says neither what exists nor where.
    unknown = [k for k in kwargs if k not in FIELDS]
    if unknown:
        raise TypeError(
            f"OptimizerSpec got an unknown keyword argument {unknown[0]!r}; accepted: "
            f"{', '.join(FIELDS)}."
        )
    if len(args) > len(FIELDS):
        raise TypeError(f"OptimizerSpec takes at most {len(FIELDS)} fields; got {len(args)}.")
    _dataclass_init(self, *args, **kwargs)


OptimizerSpec.__init__ = _init  # type: ignore[method-assign]


def _bad(spec: OptimizerSpec, field: str, expected: str) -> ValueError:
    return ValueError(f"OptimizerSpec.{field} must be {expected}; got {getattr(spec, field)!r}.")


def _check_fields_in_use(spec: OptimizerSpec) -> None:
    """Refuses a non-default value of a field the optimizer or schedule never reads."""
    if spec.name not in OPTIMIZERS:
        raise _bad(spec, "name", f"one of {', '.join(OPTIMIZERS)}")
    if spec.schedule not in SCHEDULES:
        raise _bad(spec, "schedule", f"one of {', '.join(SCHEDULES)}")
    for table, attr in ((_OPTIMIZER_FIELDS, "name"), (_SCHEDULE_FIELDS, "schedule")):
        for field, users in table.items():
            if getattr(spec, attr) not in users and getattr(spec, field) != _DEFAULTS[field]:
                raise _bad(
                    spec,
                    field,
                    f"its default {_DEFAULTS[field]!r} unless {attr} is one of "
                    f"{', '.join(users)} (with {attr}={getattr(spec, attr)!r} it is unused)",
                )


def _nonnegative(value: Any) -> bool:
    """A finite number >= 0 (NaN fails every comparison, so ``value < 0`` lets it pass)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and value >= 0


def _check_optimizer(spec: OptimizerSpec) -> None:
    """The optimizer's own fields: ranges PyTorch's constructors accept."""
    if not (math.isfinite(spec.lr) and spec.lr > 0):
        raise _bad(spec, "lr", "a finite number > 0")
    if not _nonnegative(spec.momentum):
        raise _bad(spec, "momentum", "a finite number >= 0")
    if spec.nesterov and not (spec.momentum > 0 and spec.dampening == 0):
        raise _bad(
            spec, "nesterov", "False unless momentum > 0 and dampening == 0 (PyTorch's rule)"
        )
    if not _nonnegative(spec.dampening):
        raise _bad(spec, "dampening", "a finite number >= 0")
    if spec.weight_decay is not None and not _nonnegative(spec.weight_decay):
        raise _bad(spec, "weight_decay", "None (PyTorch's default) or a finite number >= 0")
    if not spec.decay_1d and not spec.decay:
        raise _bad(spec, "decay_1d", "True unless there is weight decay (it selects what decays)")
    if spec.eps is not None and not spec.eps >= 0:
        raise _bad(spec, "eps", "None (PyTorch's default) or >= 0")
    if not all(0 <= b < 1 for b in spec.betas):
        raise _bad(spec, "betas", "two numbers in [0, 1)")
    if not 0 <= spec.alpha < 1:
        raise _bad(spec, "alpha", "in [0, 1)")
    for field in ("lr_decay", "initial_accumulator_value"):
        if not _nonnegative(getattr(spec, field)):
            raise _bad(spec, field, "a finite number >= 0")
    if spec.clip_norm is not None and not spec.clip_norm > 0:
        raise _bad(spec, "clip_norm", "None or > 0")


def _check_schedule(spec: OptimizerSpec) -> None:
    """The schedule's fields: what PyTorch's scheduler needs."""
    if spec.warmup_steps < 0:
        raise _bad(spec, "warmup_steps", ">= 0")
    if spec.warmup_steps and spec.schedule in ("onecycle", "plateau"):
        raise _bad(spec, "warmup_steps", f"0 with schedule={spec.schedule!r} (no SequentialLR)")
    if not 0 < spec.warmup_start_factor <= 1:
        raise _bad(spec, "warmup_start_factor", "in (0, 1] (torch's LinearLR cannot start at 0)")
    if spec.schedule in ("cosine", "onecycle") and (
        spec.total_steps is None or spec.total_steps <= spec.warmup_steps
    ):
        raise _bad(spec, "total_steps", f"an int > warmup_steps for schedule={spec.schedule!r}")
    if spec.schedule == "step" and (spec.step_size is None or spec.step_size < 1):
        raise _bad(spec, "step_size", "an int >= 1 for schedule='step'")
    for field in ("gamma", "min_lr", "threshold"):  # NaN would make every rate NaN
        if not _nonnegative(getattr(spec, field)):
            raise _bad(spec, field, "a finite number >= 0")
    if spec.schedule == "onecycle":
        _check_onecycle(spec)
    if spec.schedule == "plateau":
        if not 0 < spec.factor < 1:
            raise _bad(spec, "factor", "in (0, 1)")
        if spec.threshold_mode not in ("rel", "abs"):
            raise _bad(spec, "threshold_mode", "'rel' or 'abs'")
        if spec.patience < 0 or spec.cooldown < 0:
            raise _bad(spec, "patience" if spec.patience < 0 else "cooldown", ">= 0")


def _check_onecycle(spec: OptimizerSpec) -> None:
    if not 0 < spec.pct_start < 1:
        raise _bad(spec, "pct_start", "in (0, 1)")
    if spec.anneal_strategy not in ("cos", "linear"):
        raise _bad(spec, "anneal_strategy", "'cos' or 'linear'")
    if not (spec.div_factor > 0 and spec.final_div_factor > 0):
        raise _bad(spec, "div_factor" if spec.div_factor <= 0 else "final_div_factor", "> 0")
    has_momentum = spec.name in ("adam", "adamw") or spec.momentum > 0
    if spec.cycle_momentum and not has_momentum:
        raise _bad(
            spec,
            "cycle_momentum",
            "False for an optimizer without momentum (PyTorch's OneCycleLR raises too; "
            f"name={spec.name!r}, momentum={spec.momentum})",
        )
