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
* ``RMSprop``: PyTorch's ``alpha`` is 0.99 (optax's ``decay`` 0.9) and its eps is added
  *outside* the square root (optax's default ``eps_in_sqrt=True`` adds it inside); its
  momentum buffer is scaled by the lr afterwards (``optax.rmsprop`` traces after the lr).
* ``Adagrad``: accumulator starts at 0 and eps 1e-10 outside the root (optax: 0.1 and
  1e-7 inside); ``Adam(amsgrad=True)``: the max of the raw second moment (optax: of the
  bias-corrected one); ``SGD(dampening=d)``: not on the first step. The PyTorch rules are
  in `jaxtrain.contrast.torch_rules`.
* ``OneCycleLR`` cycles momentum/beta1 by default (``cycle_momentum=True``);
  ``ReduceLROnPlateau`` is state fed a metric (`jaxtrain.contrast.plateau`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxtrain import losses
from jaxtrain.contrast import plateau, schedules, torch_rules
from jaxtrain.contrast._torch import require_torch
from jaxtrain.contrast.spec import (
    OptimizerSpec,
)

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


def _onecycle(spec: OptimizerSpec, dtype: Any) -> tuple[Callable, Callable]:
    """``OneCycleLR``'s learning-rate and momentum schedules."""
    assert spec.total_steps is not None  # OptimizerSpec refuses "onecycle" without it
    start = spec.lr / spec.div_factor
    common = dict(
        total_steps=spec.total_steps,
        pct_start=spec.pct_start,
        anneal=spec.anneal_strategy,
        three_phase=spec.three_phase,
        dtype=dtype,
    )
    lr = schedules.onecycle(start, spec.lr, start / spec.final_div_factor, **common)
    momentum = schedules.onecycle(
        spec.max_momentum, spec.base_momentum, spec.max_momentum, **common
    )
    return lr, momentum


def optax_schedule(spec: OptimizerSpec, dtype: Any = "float32") -> Callable[[jax.Array], jax.Array]:
    """The schedule ``step -> lr`` equal to the spec's PyTorch scheduler.

    Args:
        spec: the `OptimizerSpec` (not ``"plateau"``: that rate is state, see
            `jaxtrain.contrast.plateau`).
        dtype: ``"float32"``: optax's schedules (``OneCycleLR``: `jaxtrain.contrast.schedules`);
            ``"float64"``: `jaxtrain.contrast.schedules` in float64 under JAX's x64 mode
            (optax's linear and exponential schedules return float32 even then).
    """
    if spec.schedule == "plateau":
        raise ValueError("schedule='plateau' has no step -> lr function: see with_plateau_lr.")
    if spec.schedule == "onecycle":
        return _onecycle(spec, jnp.dtype(dtype))[0]
    if jnp.dtype(dtype) != jnp.float32:
        return _exact_schedule(spec, jnp.dtype(dtype))
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


def _exact_schedule(spec: OptimizerSpec, dtype: Any) -> Callable[[jax.Array], jax.Array]:
    """`optax_schedule` computed in ``dtype`` (closed forms of PyTorch's schedulers)."""
    if spec.schedule == "constant":
        main = schedules.constant(spec.lr, dtype)
    elif spec.schedule == "step":
        assert spec.step_size is not None  # OptimizerSpec refuses "step" without it
        main = schedules.step_decay(spec.lr, spec.step_size, spec.gamma, dtype)
    else:
        main = schedules.cosine(spec.lr, _cosine_steps(spec), spec.min_lr, dtype)
    if not spec.warmup_steps:
        return main
    return schedules.linear_warmup(
        main, spec.lr, spec.warmup_steps, spec.warmup_start_factor, dtype
    )


def _decay_mask(spec: OptimizerSpec) -> Callable | None:
    """The weight-decay mask of ``decay_1d=False``: True on leaves with >= 2 dimensions."""
    if spec.decay_1d:
        return None
    return lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _direction(spec: OptimizerSpec, momentum: Any) -> list[optax.GradientTransformation]:
    """The optimizer's update before the learning rate (decoupled decay included)."""
    eps, wd, mask = spec.epsilon, spec.decay, _decay_mask(spec)
    if spec.name == "sgd":
        if not spec.momentum:
            return []
        if spec.dampening:
            return [torch_rules.sgd_momentum_torch(momentum, spec.dampening, spec.nesterov)]
        return [optax.trace(momentum, nesterov=spec.nesterov)]  # first step buf = g, as torch
    if spec.name in ("adam", "adamw"):
        b1, b2 = momentum, spec.betas[1]
        if spec.amsgrad or spec.cycles_momentum:
            parts = [torch_rules.scale_by_adam_torch(b1, b2, eps, spec.amsgrad)]
        else:
            parts = [optax.scale_by_adam(b1, b2, eps)]
        if spec.name == "adamw" and wd:
            parts.append(optax.add_decayed_weights(wd, mask))  # times the lr, as torch
        return parts
    if spec.name == "rmsprop":
        kw = dict(decay=spec.alpha, eps=eps, initial_scale=0.0, eps_in_sqrt=False)
        rms = optax.scale_by_stddev(**kw) if spec.centered else optax.scale_by_rms(**kw)
        # torch: buf = m * buf + g / avg, then p -= lr * buf: the momentum before the lr
        # (optax.rmsprop traces after it, which differs once the lr is scheduled).
        return [rms, optax.trace(momentum)] if spec.momentum else [rms]
    parts = [torch_rules.scale_by_rss_torch(spec.initial_accumulator_value, eps)]
    if spec.lr_decay:  # torch: clr = lr / (1 + (step - 1) * lr_decay)
        parts.append(optax.scale_by_schedule(lambda t: 1 / (1 + t * spec.lr_decay)))
    return parts


def _build(spec: OptimizerSpec, lr: Any, momentum: Any) -> optax.GradientTransformation:
    """Clip -> L2 decay -> the optimizer's direction -> ``-lr``, as one chain."""
    parts = []
    if spec.clip_norm is not None:
        parts.append(clip_by_global_norm_torch(spec.clip_norm))
    if spec.name != "adamw" and spec.decay:
        parts.append(optax.add_decayed_weights(spec.decay, _decay_mask(spec)))  # grad += wd * p
    parts += _direction(spec, momentum)
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


class _CycledState(NamedTuple):
    steps: jax.Array
    inner: Any


def _with_momentum_schedule(build: Callable, schedule: Callable) -> optax.GradientTransformation:
    """``build(momentum)`` rebuilt every step with ``schedule(count)`` (``cycle_momentum``)."""

    def init_fn(params):
        return _CycledState(jnp.zeros([], jnp.int32), build(schedule(0)).init(params))

    def update_fn(updates, state, params=None):
        updates, inner = build(schedule(state.steps)).update(updates, state.inner, params)
        return updates, _CycledState(optax.safe_increment(state.steps), inner)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optax(
    spec: OptimizerSpec, dtype: Any = "float32"
) -> tuple[optax.GradientTransformation, Callable | None]:
    """The optax transformation that updates parameters as the spec's PyTorch optimizer.

    Args:
        spec: the `OptimizerSpec`.
        dtype: what the schedule computes in: ``"float32"``, or ``"float64"`` under JAX's
            x64 mode for `compare`'s exact mode (see `optax_schedule`).

    Returns:
        ``(optimizer, schedule)``: ``clip_by_global_norm_torch`` (if clipping), then
        ``add_decayed_weights`` (L2 weight decay), then the optimizer's direction
        (``optax.trace``, ``optax.scale_by_adam``, ``scale_by_rms``/``scale_by_stddev``
        with eps outside the square root, or the `jaxtrain.contrast.torch_rules` where
        no optax setting matches PyTorch: dampening, amsgrad, Adagrad), then ``-lr`` from
        ``schedule`` (``step -> lr``). ``schedule`` is None for ``"plateau"``, whose rate
        is in the optimizer state (`jaxtrain.contrast.plateau`).

    Example:
        >>> import jax.numpy as jnp
        >>> optimizer, schedule = make_optax(OptimizerSpec("sgd", lr=0.1, momentum=0.9))
        >>> params = {"w": jnp.ones(2)}
        >>> updates, _ = optimizer.update({"w": jnp.ones(2)}, optimizer.init(params), params)
        >>> [round(u, 6) for u in updates["w"].tolist()]  # -lr * g on the first step
        [-0.1, -0.1]
    """
    dtype = jnp.dtype(dtype)
    momentum = spec.betas[0] if spec.name in ("adam", "adamw") else spec.momentum
    if spec.schedule == "plateau":
        tx = plateau.with_plateau_lr(lambda lr: _build(spec, lr, momentum), spec.lr, dtype)
        return tx, None
    if spec.cycles_momentum:
        lr_schedule, momentum_schedule = _onecycle(spec, dtype)
        build = lambda m: _build(spec, lr_schedule, m)  # noqa: E731
        return _with_momentum_schedule(build, momentum_schedule), lr_schedule
    schedule = optax_schedule(spec, dtype)
    return _build(spec, schedule, momentum), schedule


def plateau_kwargs(spec: OptimizerSpec) -> dict[str, Any]:
    """The keyword arguments of `jaxtrain.contrast.plateau.plateau_step` for ``spec``."""
    names = ("factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lr")
    return {n: getattr(spec, n) for n in names}


# ---------------------------------------------------------------------------- torch side


def _torch_optimizer(torch: Any, spec: OptimizerSpec, params: list[Any]) -> Any:
    """``torch.optim.<name>(...)`` with every setting of the spec passed explicitly."""
    groups: Any = params
    if not spec.decay_1d:  # parameter groups: no weight decay on biases and norm scales
        groups = [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    common = dict(lr=spec.lr, weight_decay=spec.decay, eps=spec.epsilon)
    if spec.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=spec.lr,
            momentum=spec.momentum,
            dampening=spec.dampening,
            nesterov=spec.nesterov,
            weight_decay=spec.decay,
        )
    if spec.name in ("adam", "adamw"):
        cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
        return cls(groups, betas=spec.betas, amsgrad=spec.amsgrad, **common)
    if spec.name == "rmsprop":
        return torch.optim.RMSprop(
            groups, alpha=spec.alpha, momentum=spec.momentum, centered=spec.centered, **common
        )
    return torch.optim.Adagrad(
        groups,
        lr_decay=spec.lr_decay,
        initial_accumulator_value=spec.initial_accumulator_value,
        **common,
    )


def _torch_scheduler(torch: Any, spec: OptimizerSpec, opt: Any) -> Any:
    """The ``lr_scheduler`` of the spec's main schedule (None: constant)."""
    sched = torch.optim.lr_scheduler
    if spec.schedule == "step":
        return sched.StepLR(opt, step_size=spec.step_size, gamma=spec.gamma)
    if spec.schedule == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=_cosine_steps(spec), eta_min=spec.min_lr)
    if spec.schedule == "onecycle":
        return sched.OneCycleLR(
            opt,
            max_lr=spec.lr,
            total_steps=spec.total_steps,
            pct_start=spec.pct_start,
            anneal_strategy=spec.anneal_strategy,
            cycle_momentum=spec.cycle_momentum,
            base_momentum=spec.base_momentum,
            max_momentum=spec.max_momentum,
            div_factor=spec.div_factor,
            final_div_factor=spec.final_div_factor,
            three_phase=spec.three_phase,
        )
    if spec.schedule == "plateau":
        return sched.ReduceLROnPlateau(opt, mode="min", **plateau_kwargs(spec), eps=PLATEAU_EPS)
    return None


PLATEAU_EPS = 1e-8  # ReduceLROnPlateau's eps (plateau_step's default)


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
        warmup, else call ``scheduler.step()`` after every ``optimizer.step()``
        (``ReduceLROnPlateau``: ``scheduler.step(loss)``). With ``decay_1d=False`` the
        optimizer has two parameter groups, the second (< 2 dimensions) without decay.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> optimizer, scheduler = make_torch(OptimizerSpec("sgd", lr=0.1), net.parameters())
        >>> type(optimizer).__name__, optimizer.param_groups[0]["lr"], scheduler
        ('SGD', 0.1, None)
    """
    torch = require_torch()
    sched = torch.optim.lr_scheduler
    opt = _torch_optimizer(torch, spec, list(params))
    main = _torch_scheduler(torch, spec, opt)
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
        "`SGD(lr, momentum=m, dampening=d)`",
        "`optax.chain(sgd_momentum_torch(m, d), optax.scale_by_learning_rate(lr))`",
        "`buf = m * buf + (1 - d) * g`, but the first step's `buf = g` is not dampened; "
        "`optax.trace` has no dampening",
    ),
    (
        "`RMSprop(lr)` (alpha **0.99**, eps 1e-8 *outside* the root)",
        "`optax.rmsprop(lr, decay=0.99, eps_in_sqrt=False)` (optax default decay **0.9**, "
        "eps inside)",
        "`g / (sqrt(v) + eps)`; `centered=True` <-> `optax.scale_by_stddev`; with momentum "
        "PyTorch applies the lr after the buffer, `optax.rmsprop` before it (same only for "
        "a constant lr): here `scale_by_rms -> trace(m) -> scale_by_learning_rate`",
    ),
    (
        "`Adagrad(lr)` (accumulator **0**, eps **1e-10** outside the root)",
        "`optax.chain(scale_by_rss_torch(0.0, 1e-10), optax.scale_by_learning_rate(lr))`",
        "`optax.adagrad` starts at **0.1** with eps **1e-7** *inside* the root: no setting "
        "matches; `lr_decay` <-> `lr / (1 + t * lr_decay)`",
    ),
    (
        "`Adam(..., amsgrad=True)` / `AdamW(..., amsgrad=True)`",
        "`scale_by_adam_torch(b1, b2, eps, amsgrad=True)` (here), not `optax.amsgrad`",
        "PyTorch keeps `max(v)` of the raw moment then bias-corrects; optax keeps "
        "`max(v_hat)`: different once an older `v` is the max",
    ),
    (
        "parameter groups `[{'params': decay}, {'params': no_decay, 'weight_decay': 0}]`",
        "`optax.add_decayed_weights(wd, mask=...)` / `optax.adamw(..., mask=...)`",
        "`OptimizerSpec(decay_1d=False)`: no decay on parameters with `ndim < 2` (biases, "
        "norm scales), on both sides",
    ),
    (
        "`OneCycleLR(opt, max_lr, total_steps)`",
        "`jaxtrain.contrast.schedules.onecycle` (+ momentum schedule)",
        "phases end at `pct_start * T - 1` (optax's `cosine_onecycle_schedule`: "
        "`int(pct_start * T)`); `cycle_momentum=True` (default) also cycles momentum / "
        "beta1 between 0.95 and 0.85",
    ),
    (
        "`ReduceLROnPlateau(opt)` + `scheduler.step(loss)`",
        "`with_plateau_lr(build, lr)` + `opt_state = plateau_step(opt_state, loss)` between steps",
        "the rate and the counters are optimizer state; reduced after `patience + 1` bad "
        "values, from the next step (`optax.contrib.reduce_on_plateau`: after `patience`, "
        "on the current update, and needs `update(..., value=loss)`)",
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
