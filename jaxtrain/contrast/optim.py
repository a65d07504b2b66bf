"""One optimizer spec, two frameworks: ``torch.optim`` + scheduler and the matching optax.

`OptimizerSpec` describes an optimizer in PyTorch's terms; `make_torch` builds the
``torch.optim`` optimizer and ``lr_scheduler`` from it, `make_optax` the optax
transformation and schedule that update the parameters identically (up to float32
rounding). `CORRESPONDENCE` is the table behind both (rendered by
`correspondence_markdown`).

The traps, each handled here:

* ``torch.optim.SGD(weight_decay=wd)`` adds ``wd * param`` to the gradient (an L2 term)
  before momentum: ``optax.add_decayed_weights(wd)`` *before* ``optax.sgd``.
* ``AdamW``'s default weight decay is ``1e-2`` in PyTorch and ``1e-4`` in optax; both
  multiply it by the learning rate. The spec's ``weight_decay=None`` means PyTorch's
  default and is passed to both explicitly.
* ``clip_grad_norm_`` multiplies the gradients by ``max_norm / (norm + 1e-6)`` (clamped
  to 1); ``optax.clip_by_global_norm`` has no ``1e-6``. `clip_by_global_norm_torch`
  matches PyTorch exactly.
* ``LinearLR`` cannot start at 0 (``start_factor`` in (0, 1]); its default is 1/3.
* ``MSELoss`` is the plain mean of squares; ``optax.l2_loss`` is *half* of it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtrain import losses
from jaxtrain.contrast._torch import require_torch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
TORCH_DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 1e-2}
OPTAX_DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 1e-4}


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer, gradient clipping and learning-rate schedule, in PyTorch's terms.

    Attributes:
        name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: the (peak) learning rate.
        momentum: SGD momentum (0: plain SGD).
        nesterov: SGD Nesterov momentum (needs ``momentum > 0``).
        weight_decay: None for PyTorch's default (0, 0, 1e-2 for sgd, adam, adamw).
            SGD/Adam: L2 term added to the gradient; AdamW: decoupled, times the lr.
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon (added to ``sqrt(v_hat)``, in both frameworks).
        clip_norm: ``clip_grad_norm_(max_norm=clip_norm)`` before the step, or None.
        schedule: ``"constant"``, ``"step"`` (``StepLR``) or ``"cosine"``
            (``CosineAnnealingLR`` over ``total_steps - warmup_steps``).
        warmup_steps: linear warmup (``LinearLR``) over this many steps, 0 for none.
        warmup_start_factor: ``LinearLR``'s ``start_factor``, in (0, 1].
        total_steps: steps of the whole run (needed by ``"cosine"``).
        step_size: ``StepLR``'s ``step_size`` (needed by ``"step"``).
        gamma: ``StepLR``'s ``gamma``.
        min_lr: ``CosineAnnealingLR``'s ``eta_min``.

    Example:
        >>> spec = OptimizerSpec("adamw", lr=1e-3, schedule="cosine", warmup_steps=10,
        ...                      total_steps=100, clip_norm=1.0)
        >>> optimizer, schedule = make_optax(spec)  # the optax side
        >>> round(float(schedule(10)), 6)  # warmup done: the peak rate
        0.001
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    warmup_start_factor: float = 1.0 / 3.0
    total_steps: int | None = None
    step_size: int | None = None
    gamma: float = 0.1
    min_lr: float = 0.0

    def __post_init__(self):
        def bad(field: str, expected: str) -> ValueError:
            return ValueError(
                f"OptimizerSpec.{field} must be {expected}; got {getattr(self, field)!r}."
            )

        if self.name not in OPTIMIZERS:
            raise bad("name", f"one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0")
        if self.momentum < 0 or (self.momentum and self.name != "sgd"):
            raise bad("momentum", ">= 0, and only used with name='sgd'")
        if self.nesterov and not (self.name == "sgd" and self.momentum > 0):
            raise bad("nesterov", "False unless name='sgd' and momentum > 0")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise bad("weight_decay", "None (PyTorch's default) or >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise bad("clip_norm", "None or > 0")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", ">= 0")
        if not 0 < self.warmup_start_factor <= 1:
            raise bad("warmup_start_factor", "in (0, 1] (torch's LinearLR cannot start at 0)")
        if self.schedule == "cosine" and (
            self.total_steps is None or self.total_steps <= self.warmup_steps
        ):
            raise bad("total_steps", "an int > warmup_steps for schedule='cosine'")
        if self.schedule == "step" and (self.step_size is None or self.step_size < 1):
            raise bad("step_size", "an int >= 1 for schedule='step'")

    @property
    def decay(self) -> float:
        """The weight decay in effect: the given one or PyTorch's default."""
        if self.weight_decay is None:
            return TORCH_DEFAULT_WEIGHT_DECAY[self.name]
        return float(self.weight_decay)


# ---------------------------------------------------------------------------- optax side


def clip_by_global_norm_torch(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_`` as an optax transformation, exactly.

    PyTorch computes the norm of the per-tensor norms and multiplies every gradient by
    ``min(max_norm / (norm + 1e-6), 1)``; ``optax.clip_by_global_norm`` scales by
    ``max_norm / norm`` only when ``norm > max_norm``, without the ``1e-6``.

    Args:
        max_norm: PyTorch's ``max_norm``.
        eps: PyTorch's constant ``1e-6``.

    Returns:
        A stateless ``optax.GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp
        >>> clip = clip_by_global_norm_torch(1.0)
        >>> grads = {"w": jnp.array([3.0, 4.0])}  # global norm 5
        >>> updates, _ = clip.update(grads, clip.init(grads))
        >>> round(float(jnp.linalg.norm(updates["w"])), 4)
        1.0
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        if not leaves:
            return updates, state
        norm = jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.ravel()) for g in leaves]))
        coef = jnp.minimum(max_norm / (norm + eps), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _cosine_steps(spec: OptimizerSpec) -> int:
    """Steps of the cosine part: ``total_steps`` (set, for ``"cosine"``) minus warm-up."""
    assert spec.total_steps is not None  # OptimizerSpec refuses "cosine" without it
    return spec.total_steps - spec.warmup_steps


def optax_schedule(spec: OptimizerSpec) -> Callable[[jax.Array], jax.Array]:
    """The optax schedule ``step -> lr`` equal to the spec's PyTorch scheduler."""
    if spec.schedule == "constant":
        main = optax.constant_schedule(spec.lr)
    elif spec.schedule == "step":
        main = optax.exponential_decay(spec.lr, spec.step_size, spec.gamma, staircase=True)
    else:
        main = optax.cosine_decay_schedule(
            spec.lr, _cosine_steps(spec), alpha=spec.min_lr / spec.lr
        )
    if not spec.warmup_steps:
        return main
    warmup = optax.linear_schedule(spec.lr * spec.warmup_start_factor, spec.lr, spec.warmup_steps)
    return optax.join_schedules([warmup, main], [spec.warmup_steps])


def make_optax(spec: OptimizerSpec) -> tuple[optax.GradientTransformation, Callable]:
    """The optax transformation that updates parameters as the spec's PyTorch optimizer.

    Args:
        spec: the `OptimizerSpec`.

    Returns:
        ``(optimizer, schedule)``: ``clip_by_global_norm_torch`` (if clipping), then
        ``add_decayed_weights`` (SGD/Adam with weight decay), then ``optax.sgd`` /
        ``optax.adam`` / ``optax.adamw`` driven by ``schedule`` (``step -> lr``).

    Example:
        >>> import jax.numpy as jnp
        >>> optimizer, schedule = make_optax(OptimizerSpec("sgd", lr=0.1, momentum=0.9))
        >>> params = {"w": jnp.ones(2)}
        >>> updates, _ = optimizer.update({"w": jnp.ones(2)}, optimizer.init(params), params)
        >>> [round(u, 6) for u in updates["w"].tolist()]  # -lr * g on the first step
        [-0.1, -0.1]
    """
    schedule = optax_schedule(spec)
    parts = []
    if spec.clip_norm is not None:
        parts.append(clip_by_global_norm_torch(spec.clip_norm))
    wd = spec.decay
    if spec.name in ("sgd", "adam") and wd:
        parts.append(optax.add_decayed_weights(wd))  # torch: grad += wd * param
    if spec.name == "sgd":
        parts.append(optax.sgd(schedule, spec.momentum or None, nesterov=spec.nesterov))
    elif spec.name == "adam":
        parts.append(optax.adam(schedule, spec.betas[0], spec.betas[1], spec.eps))
    else:
        parts.append(
            optax.adamw(schedule, spec.betas[0], spec.betas[1], spec.eps, 0.0, weight_decay=wd)
        )
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------- torch side


def make_torch(spec: OptimizerSpec, params: Iterable[Any]) -> tuple[Any, Any]:
    """The ``torch.optim`` optimizer and learning-rate scheduler for the spec.

    Clipping is not part of a PyTorch optimizer: call `torch_clip` (or
    ``torch.nn.utils.clip_grad_norm_(params, spec.clip_norm)``) between ``backward()`` and
    ``step()``.

    Args:
        spec: the `OptimizerSpec`.
        params: the model's parameters (``model.parameters()``).

    Returns:
        ``(optimizer, scheduler)``; ``scheduler`` is None for a constant rate without
        warmup, else call ``scheduler.step()`` after every ``optimizer.step()``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> optimizer, scheduler = make_torch(OptimizerSpec("sgd", lr=0.1), net.parameters())
        >>> type(optimizer).__name__, optimizer.param_groups[0]["lr"], scheduler
        ('SGD', 0.1, None)
    """
    torch = require_torch()
    sched = torch.optim.lr_scheduler
    params = list(params)
    if spec.name == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            weight_decay=spec.decay,
        )
    elif spec.name == "adam":
        opt = torch.optim.Adam(
            params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.decay
        )
    else:
        opt = torch.optim.AdamW(
            params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.decay
        )
    if spec.schedule == "constant":
        main = None
    elif spec.schedule == "step":
        main = sched.StepLR(opt, step_size=spec.step_size, gamma=spec.gamma)
    else:
        main = sched.CosineAnnealingLR(opt, T_max=_cosine_steps(spec), eta_min=spec.min_lr)
    if not spec.warmup_steps:
        return opt, main
    warmup = sched.LinearLR(
        opt, start_factor=spec.warmup_start_factor, end_factor=1.0, total_iters=spec.warmup_steps
    )
    if main is None:
        return opt, warmup  # LinearLR stays at end_factor after total_iters
    return opt, sched.SequentialLR(opt, [warmup, main], milestones=[spec.warmup_steps])


def torch_clip(spec: OptimizerSpec, params: Iterable[Any]) -> float:
    """Clips the gradients as the spec says; returns the total norm before clipping.

    Args:
        spec: the `OptimizerSpec` (``clip_norm`` None: no clipping, just the norm).
        params: parameters whose ``.grad`` are set (after ``backward()``).

    Returns:
        The global L2 norm of the gradients, before clipping (as jaxtrain's ``grad_norm``).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> norm = torch_clip(OptimizerSpec(clip_norm=1.0), [w])
        >>> round(float(norm), 4), round(float(w.grad.norm()), 4)  # before, after
        (5.0, 1.0)
    """
    torch = require_torch()
    params = [p for p in params if p.grad is not None]
    if spec.clip_norm is None:
        return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    return float(torch.nn.utils.clip_grad_norm_(params, spec.clip_norm))


# ---------------------------------------------------------------------------- losses


def torch_loss(kind: str, label_smoothing: float = 0.0) -> Any:
    """The PyTorch criterion matching `jax_loss`.

    Args:
        kind: ``"cross_entropy"`` (``nn.CrossEntropyLoss``) or ``"mse"`` (``nn.MSELoss``).
        label_smoothing: cross-entropy label smoothing.

    Returns:
        The ``torch.nn`` loss module (mean reduction).

    Example:
        >>> import torch
        >>> criterion = torch_loss("cross_entropy")
        >>> logits, labels = torch.zeros(2, 4), torch.tensor([0, 1])  # [B, C], [B]
        >>> type(criterion).__name__, round(float(criterion(logits, labels)), 4)  # log(4)
        ('CrossEntropyLoss', 1.3863)
    """
    torch = require_torch()
    if kind == "cross_entropy":
        return torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if kind == "mse":
        if label_smoothing:
            raise ValueError(f"label_smoothing={label_smoothing} applies to cross_entropy only.")
        return torch.nn.MSELoss()
    raise ValueError(f"loss kind must be 'cross_entropy' or 'mse'; got {kind!r}.")


def jax_loss(kind: str, label_smoothing: float = 0.0) -> Callable:
    """The jaxtrain loss ``(outputs, targets, mask) -> scalar`` matching `torch_loss`.

    ``"cross_entropy"``: `jaxtrain.losses.softmax_cross_entropy` (same label smoothing as
    PyTorch: ``(1 - s) * one_hot + s / C``). ``"mse"``: `jaxtrain.losses.mean_squared_error`,
    which is ``2 * mean(optax.l2_loss(...))`` — ``l2_loss`` has a factor 0.5.

    Args:
        kind: ``"cross_entropy"`` (outputs ``[B, C]``, int targets ``[B]``) or ``"mse"``
            (outputs and targets of one shape ``[B, ...]``).
        label_smoothing: cross-entropy label smoothing.

    Returns:
        ``loss(outputs, targets, mask=None) -> float32 scalar`` (mask ``[B]``).

    Example:
        >>> import jax.numpy as jnp
        >>> mse = jax_loss("mse")
        >>> float(mse(jnp.array([[1.0], [3.0]]), jnp.zeros((2, 1))))  # as nn.MSELoss()
        5.0
    """
    if kind == "cross_entropy":
        return lambda out, y, mask=None: losses.softmax_cross_entropy(out, y, mask, label_smoothing)
    if kind == "mse":
        if label_smoothing:
            raise ValueError(f"label_smoothing={label_smoothing} applies to cross_entropy only.")
        return losses.mean_squared_error
    raise ValueError(f"loss kind must be 'cross_entropy' or 'mse'; got {kind!r}.")


# ---------------------------------------------------------------------------- frozen params


def freeze(
    optimizer: optax.GradientTransformation, trainable: Callable[[str], bool]
) -> optax.GradientTransformation:
    """Trains only the parameters ``trainable(path)`` selects; the others never change.

    PyTorch's counterpart is ``param.requires_grad_(False)``: no ``.grad``, so the
    optimizer skips the tensor. Here every leaf has a gradient (it is just a return
    value); ``optax.multi_transform`` sends the frozen leaves to ``optax.set_to_zero()``,
    so their update is exactly 0 and ``apply_updates`` leaves them bitwise unchanged —
    also under weight decay or momentum, which only the trainable branch sees.

    Beware ``optax.masked(optimizer, mask)`` alone: it passes the *raw gradients* of the
    masked-out leaves through as updates, so "frozen" leaves still move.

    Args:
        optimizer: the optimizer for the trainable parameters.
        trainable: ``path -> bool``, ``path`` the ``jax.tree_util.keystr`` of the leaf,
            e.g. ``"['Dense_0']['kernel']"``.

    Returns:
        An optax transformation over the whole parameter tree.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"Dense_0": {"kernel": jnp.ones(2)}, "Dense_1": {"kernel": jnp.ones(2)}}
        >>> optimizer = freeze(optax.sgd(0.1), lambda path: "Dense_1" in path)
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, _ = optimizer.update(grads, optimizer.init(params), params)
        >>> updates["Dense_0"]["kernel"].tolist()  # frozen: exactly 0
        [0.0, 0.0]
        >>> [round(u, 6) for u in updates["Dense_1"]["kernel"].tolist()]
        [-0.1, -0.1]
    """

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if trainable(jax.tree_util.keystr(path)) else "frozen",
            params,
        )

    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------- the table

CORRESPONDENCE: tuple[tuple[str, str, str], ...] = (
    (
        "`SGD(lr)`",
        "`optax.sgd(lr)`",
        "identical update `p - lr * g`",
    ),
    (
        "`SGD(lr, momentum=m, nesterov=True)`",
        "`optax.sgd(lr, momentum=m, nesterov=True)`",
        "both keep `buf = m * buf + g` (first step `buf = g`); no dampening",
    ),
    (
        "`SGD(..., weight_decay=wd)`",
        "`optax.chain(optax.add_decayed_weights(wd), optax.sgd(...))`",
        "PyTorch adds `wd * p` to the gradient *before* momentum (an L2 term)",
    ),
    (
        "`Adam(lr, betas=(b1, b2), eps=eps)`",
        "`optax.adam(lr, b1, b2, eps)`",
        "eps added to `sqrt(v_hat)` in both; optax computes the bias correction in float32",
    ),
    (
        "`Adam(..., weight_decay=wd)`",
        "`optax.chain(optax.add_decayed_weights(wd), optax.adam(...))`",
        "L2 term added to the gradient, like SGD",
    ),
    (
        "`AdamW(lr)` (weight decay **1e-2**)",
        "`optax.adamw(lr, weight_decay=1e-2)` (optax default **1e-4**)",
        "defaults differ by 100x; both multiply the decay by the lr: `p -= lr * wd * p`",
    ),
    (
        "`clip_grad_norm_(params, c)`",
        "`clip_by_global_norm_torch(c)` (here), not `optax.clip_by_global_norm(c)`",
        "PyTorch scales by `min(c / (norm + 1e-6), 1)`; optax by `c / norm` (no 1e-6)",
    ),
    (
        "`StepLR(opt, step_size=s, gamma=g)`",
        "`optax.exponential_decay(lr, s, g, staircase=True)`",
        "`lr * g ** (t // s)`",
    ),
    (
        "`CosineAnnealingLR(opt, T_max=T, eta_min=m)`",
        "`optax.cosine_decay_schedule(lr, T, alpha=m / lr)`",
        "PyTorch's cosine is periodic after `T`; optax stays at `m`",
    ),
    (
        "`LinearLR(opt, start_factor=f, total_iters=W)`",
        "`optax.linear_schedule(f * lr, lr, W)`",
        "PyTorch needs `f > 0` (default 1/3); optax may start at 0",
    ),
    (
        "`SequentialLR(opt, [warmup, main], milestones=[W])`",
        "`optax.join_schedules([warmup, main], [W])`",
        "both restart the second schedule's count at the milestone",
    ),
    (
        "`scheduler.step()` after `opt.step()`",
        "the schedule reads the step count in the optimizer state",
        "nothing to call; the jaxtrain metric `learning_rate` is the rate used by the step",
    ),
    (
        "`CrossEntropyLoss(label_smoothing=s)`",
        "`jaxtrain.losses.softmax_cross_entropy(logits, y, mask, label_smoothing=s)`",
        "same targets `(1 - s) * one_hot + s / C`; mean over the (unmasked) batch",
    ),
    (
        "`MSELoss()`",
        "`jaxtrain.losses.mean_squared_error` = `2 * optax.l2_loss(...).mean()`",
        "`optax.l2_loss` is `0.5 * (p - y) ** 2`",
    ),
    (
        "`opt.zero_grad()`",
        "(no line)",
        "`jax.grad` returns fresh gradients; nothing accumulates, nothing to clear",
    ),
    (
        "`p.requires_grad_(False)`",
        "`optax.multi_transform({..., 'frozen': optax.set_to_zero()}, labels)` (`freeze`)",
        "`optax.masked` alone would apply the raw gradient to masked-out leaves",
    ),
)


def correspondence_markdown() -> str:
    """`CORRESPONDENCE` as a Markdown table (PyTorch | optax / jaxtrain | note).

    Returns:
        The table: a header row, a separator row, then one row per entry.

    Example:
        >>> table = correspondence_markdown()
        >>> table.splitlines()[0]
        '| PyTorch | optax / jaxtrain | note |'
        >>> len(table.splitlines()) == len(CORRESPONDENCE) + 2
        True
    """
    lines = ["| PyTorch | optax / jaxtrain | note |", "|---|---|---|"]
    lines += [f"| {t} | {o} | {n} |" for t, o, n in CORRESPONDENCE]
    return "\n".join(lines)
