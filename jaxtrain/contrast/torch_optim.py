"""The user's own ``torch.optim`` optimizer and scheduler -> an `OptimizerSpec`.

`spec_from_torch` takes *constructors*: the optimizer class or a ``functools.partial``
of it (``partial(torch.optim.RMSprop, lr=1e-3, alpha=0.9)``), any ``params -> optimizer``
callable; the scheduler likewise (``partial(StepLR, step_size=30)``, or ``lambda opt:
SequentialLR(opt, [LinearLR(opt, ...), CosineAnnealingLR(opt, ...)], milestones=[W])``).
It builds them on a dummy parameter and reads back *every* setting the constructed
objects hold, PyTorch's defaults included: a setting with no counterpart (``maximize``,
an unknown scheduler, ``ReduceLROnPlateau(mode="max")``) is refused by name, never
dropped.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

from jaxtrain.contrast._torch import require_torch
from jaxtrain.contrast.spec import OptimizerSpec

# torch.optim class -> the param_groups settings that map to OptimizerSpec fields.
OPTIMIZER_SETTINGS = {
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "RMSprop": ("lr", "momentum", "alpha", "eps", "centered", "weight_decay"),
    "Adagrad": ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value"),
}
# Implementation choices that leave the arithmetic as it is (they pick a kernel).
_NEUTRAL = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")
SCHEDULERS = (
    "StepLR",
    "CosineAnnealingLR",
    "LinearLR",
    "SequentialLR",
    "OneCycleLR",
    "ReduceLROnPlateau",
)


def _construct(ctor: Any, arg: Any, what: str) -> Any:
    """``ctor(arg)``, with an unknown-keyword error that lists the accepted ones."""
    try:
        return ctor(arg)
    except TypeError as e:
        if "got multiple values for argument" in str(e):
            given = "the parameters" if what == "optimizer" else "the optimizer"
            raise TypeError(
                f"{what} constructor: {e}: the constructor receives {given} when it is "
                "called, so they must not be bound in it. Fix: e.g. "
                "functools.partial(torch.optim.SGD, lr=0.1), not partial(SGD, "
                "model.parameters(), lr=0.1); partial(StepLR, step_size=30), not "
                "partial(StepLR, opt, step_size=30)."
            ) from None
        if "unexpected keyword argument" not in str(e):
            raise
        cls = ctor.func if isinstance(ctor, functools.partial) else ctor
        try:
            accepted = [p for p in inspect.signature(cls).parameters][1:]
        except (TypeError, ValueError):
            raise e from None
        raise TypeError(
            f"{what} {getattr(cls, '__name__', cls)}: {e}; accepted: {', '.join(accepted)}."
        ) from None


def spec_from_torch(
    optimizer: Any, scheduler: Any = None, *, clip_norm: float | None = None
) -> OptimizerSpec:
    """The `OptimizerSpec` equal to a ``torch.optim`` optimizer (and scheduler) constructor.

    Args:
        optimizer: ``params -> torch.optim.Optimizer``: ``SGD``, ``Adam``, ``AdamW``,
            ``RMSprop`` or ``Adagrad`` (the class itself, a ``functools.partial``, a lambda).
        scheduler: None, or ``optimizer -> lr_scheduler``: ``StepLR``,
            ``CosineAnnealingLR``, ``LinearLR`` (a warmup to ``end_factor=1``),
            ``SequentialLR([LinearLR, StepLR or CosineAnnealingLR])``, ``OneCycleLR``,
            ``ReduceLROnPlateau(mode="min")``.
        clip_norm: ``clip_grad_norm_``'s ``max_norm`` of the PyTorch loop, or None.

    Returns:
        The spec; `make_optax` of it updates as the PyTorch optimizer does.

    Raises:
        TypeError: an unknown keyword argument (listing the accepted ones), or an
            optimizer instance instead of a constructor.
        ValueError: an optimizer, scheduler or setting with no counterpart, by name.

    Example:
        >>> import functools, torch
        >>> spec = spec_from_torch(functools.partial(torch.optim.RMSprop, lr=1e-3, alpha=0.9))
        >>> spec.name, spec.lr, spec.alpha, spec.epsilon
        ('rmsprop', 0.001, 0.9, 1e-08)
    """
    torch = require_torch()
    if isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"spec_from_torch needs the optimizer's constructor, got a {type(optimizer).__name__} "
            "instance. Fix: pass functools.partial(torch.optim.<Name>, lr=..., ...) or the class."
        )
    dummy = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = _construct(optimizer, [dummy], "optimizer")
    fields = _optimizer_fields(torch, opt)
    if scheduler is not None:
        fields.update(_scheduler_fields(torch, _construct(scheduler, opt, "scheduler"), opt))
    return OptimizerSpec(clip_norm=clip_norm, **fields)


def _optimizer_fields(torch: Any, opt: Any) -> dict[str, Any]:
    """The spec fields of a constructed optimizer's (only) parameter group."""
    cls = type(opt).__name__
    if cls not in OPTIMIZER_SETTINGS or type(opt) is not getattr(torch.optim, cls):
        raise ValueError(
            f"torch.optim optimizer {cls} has no optax counterpart in jaxtrain.contrast "
            f"(mapped: {', '.join(OPTIMIZER_SETTINGS)}). Fix: use one of those, or build the "
            "optax side yourself."
        )
    check_one_group(opt)
    group = dict(opt.param_groups[0])
    group.pop("params")
    if group.pop("maximize", False):
        raise ValueError(f"{cls}(maximize=True) is not mapped. Fix: negate the loss instead.")
    for key in _NEUTRAL:
        group.pop(key, None)
    unknown = sorted(set(group) - set(OPTIMIZER_SETTINGS[cls]))
    if unknown:
        raise ValueError(
            f"{cls}'s setting {unknown[0]}={group[unknown[0]]!r} has no counterpart in "
            f"OptimizerSpec (mapped: {', '.join(OPTIMIZER_SETTINGS[cls])})."
        )
    name = {"Adam": "adam", "AdamW": "adamw"}.get(cls, cls.lower())
    if cls == "Adam" and opt.defaults.get("decoupled_weight_decay"):
        name = "adamw"  # Adam(decoupled_weight_decay=True) is AdamW
    fields = {k: group[k] for k in OPTIMIZER_SETTINGS[cls]}
    fields["lr"] = float(fields["lr"])  # a tensor lr (capturable) as the number it holds
    fields["weight_decay"] = float(fields["weight_decay"])
    if "betas" in fields:
        fields["betas"] = tuple(float(b) for b in fields["betas"])
    return {"name": name, **fields}


def check_one_group(opt: Any) -> None:
    """Refuses an optimizer with several parameter groups (only one is mapped).

    Raises:
        ValueError: naming the groups' differing settings and the fix.
    """
    groups = opt.param_groups
    if len(groups) == 1:
        return
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    differ = sorted({k for s in settings for k in s if s.get(k) != settings[0].get(k)})
    raise ValueError(
        f"{type(opt).__name__} has {len(groups)} parameter groups (settings that differ: "
        f"{', '.join(differ) or 'none'}); an OptimizerSpec is one setting for every "
        "parameter, so mapping one group would silently change the others. Fix: one group; "
        "for no weight decay on biases and norms (the usual two groups) use "
        "OptimizerSpec(..., weight_decay=wd, decay_1d=False), which builds both sides' groups."
    )


def _scheduler_fields(torch: Any, sched: Any, opt: Any) -> dict[str, Any]:
    """The spec fields of a constructed scheduler."""
    cls = type(sched).__name__
    if cls not in SCHEDULERS or type(sched) is not getattr(torch.optim.lr_scheduler, cls):
        raise ValueError(
            f"torch.optim.lr_scheduler.{cls} is not mapped by jaxtrain.contrast (mapped: "
            f"{', '.join(SCHEDULERS)})."
        )
    if cls == "SequentialLR":
        return _sequential(sched)
    if cls == "OneCycleLR":
        return _onecycle(sched, opt)
    if cls == "ReduceLROnPlateau":
        return _plateau(sched)
    return _simple(sched)


def _simple(sched: Any) -> dict[str, Any]:
    cls = type(sched).__name__
    if cls == "StepLR":
        return {"schedule": "step", "step_size": sched.step_size, "gamma": sched.gamma}
    if cls == "CosineAnnealingLR":
        return {
            "schedule": "cosine",
            "total_steps": sched.T_max,
            "min_lr": float(sched.eta_min),
        }
    if sched.end_factor != 1.0:
        raise ValueError(
            f"LinearLR(end_factor={sched.end_factor}) is not mapped: only a warmup to the "
            "full rate (end_factor=1.0)."
        )
    return {"warmup_steps": sched.total_iters, "warmup_start_factor": sched.start_factor}


def _sequential(sched: Any) -> dict[str, Any]:
    inner = list(sched._schedulers)
    names = [type(s).__name__ for s in inner]
    ok = len(inner) == 2 and names[0] == "LinearLR" and names[1] in ("StepLR", "CosineAnnealingLR")
    if not ok or list(sched._milestones) != [inner[0].total_iters]:
        raise ValueError(
            f"SequentialLR of {names} with milestones {list(sched._milestones)} is not mapped: "
            "only [LinearLR(total_iters=W), StepLR or CosineAnnealingLR] with milestones=[W]."
        )
    fields = _simple(inner[0])
    main = _simple(inner[1])
    if main["schedule"] == "cosine":
        main["total_steps"] += fields["warmup_steps"]
    return {**fields, **main}


def _onecycle(sched: Any, opt: Any) -> dict[str, Any]:
    group = opt.param_groups[0]
    phases = sched._schedule_phases
    total = sched.total_steps
    fields = {
        "schedule": "onecycle",
        "lr": group["max_lr"],
        "total_steps": total,
        "pct_start": (phases[0]["end_step"] + 1) / total,
        "anneal_strategy": sched._anneal_func_type,
        "three_phase": len(phases) == 3,
        "div_factor": group["max_lr"] / group["initial_lr"],
        "final_div_factor": group["initial_lr"] / group["min_lr"],
        "cycle_momentum": bool(sched.cycle_momentum),
    }
    if sched.cycle_momentum:
        fields["base_momentum"] = group["base_momentum"]
        fields["max_momentum"] = group["max_momentum"]
    return fields


def _plateau(sched: Any) -> dict[str, Any]:
    if sched.mode != "min" or not math.isclose(sched.eps, 1e-8) or len(set(sched.min_lrs)) > 1:
        raise ValueError(
            f"ReduceLROnPlateau(mode={sched.mode!r}, eps={sched.eps}, min_lr={sched.min_lrs}) "
            "is not mapped: only mode='min' (the loss), eps=1e-8 and one min_lr."
        )
    return {
        "schedule": "plateau",
        "factor": sched.factor,
        "patience": sched.patience,
        "threshold": sched.threshold,
        "threshold_mode": sched.threshold_mode,
        "cooldown": sched.cooldown,
        "min_lr": float(sched.min_lrs[0]),
    }
