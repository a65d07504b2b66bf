"""Side by side: the same batches, in the same order, through a PyTorch loop and `train_step`.

PyTorch, one step::

    optimizer.zero_grad()                 # clearing the gradients
    loss = criterion(model(x), y)         # forward pass, loss
    loss.backward()                       # gradients, accumulated into p.grad
    clip_grad_norm_(params, c)            # (optional)
    optimizer.step()                      # update, in place
    scheduler.step()

jaxtrain, one step::

    state, metrics = train_step(state, batch)   # all of the above, as one pure function

`compare` runs both from identical weights (PyTorch's, converted by
`jaxtrain.contrast.from_torch`) and records, per step, both losses, both gradient norms,
both learning rates and the largest parameter difference. `Comparison.table` prints
them; `Comparison.plot` draws the two loss curves and their difference. `presets` and
`digits_models` are the optimizers and models of the parity targets (``jaxtrain compare``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.apps.tasks import classification_loss, regression_loss
from jaxtrain.contrast._torch import require_torch
from jaxtrain.contrast.convert import from_torch, nhwc_to_nchw, torch_twin
from jaxtrain.contrast.fx import FxConverted
from jaxtrain.contrast.optim import (
    OptimizerSpec,
    make_optax,
    make_torch,
    plateau_kwargs,
    torch_clip,
    torch_loss,
)
from jaxtrain.contrast.plateau import plateau_step
from jaxtrain.contrast.torch_optim import check_one_group, spec_from_torch
from jaxtrain.data import ArrayDataset
from jaxtrain.models.adapters import Model, from_linen
from jaxtrain.state import TrainState
from jaxtrain.step import make_train_step

# Parity targets (float32, CPU, matmul precision "highest"): relative loss difference per
# step over the first 10 steps and over the whole run; final parameters (max abs diff).
TARGET_FIRST = 1e-5
TARGET_ALL = 1e-4
TARGET_PARAMS = 1e-4
# float64 (`compare(..., dtype="float64")`): every step and the final parameters.
TARGET_F64 = 1e-12


def targets(dtype: str) -> tuple[float, float, float]:
    """``(first 10 steps, all steps, final params)`` targets of a ``dtype`` comparison."""
    if dtype == "float64":
        return TARGET_F64, TARGET_F64, TARGET_F64
    return TARGET_FIRST, TARGET_ALL, TARGET_PARAMS


def presets(steps: int) -> dict[str, OptimizerSpec]:
    """The optimizer set of the parity targets, for a run of ``steps`` steps.

    Returns:
        name -> `OptimizerSpec`: ``sgd``, ``sgd-nesterov-wd`` (momentum 0.9, Nesterov,
        weight decay 5e-4), ``adam``, ``adamw`` (PyTorch's default weight decay 1e-2),
        ``clip`` (SGD with momentum, ``clip_grad_norm_`` at 1.0) and ``cosine-warmup``
        (AdamW, linear warmup over a tenth of the run, then cosine decay).

    Args:
        steps: the run's length (sets the warmup and the cosine decay).

    Example:
        >>> specs = presets(100)
        >>> sorted(specs)
        ['adam', 'adamw', 'clip', 'cosine-warmup', 'sgd', 'sgd-nesterov-wd']
        >>> specs["cosine-warmup"].warmup_steps, specs["cosine-warmup"].total_steps
        (10, 100)
    """
    return {
        "sgd": OptimizerSpec("sgd", lr=0.1),
        "sgd-nesterov-wd": OptimizerSpec(
            "sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        ),
        "adam": OptimizerSpec("adam", lr=1e-3),
        "adamw": OptimizerSpec("adamw", lr=1e-3),
        "clip": OptimizerSpec("sgd", lr=0.05, momentum=0.9, clip_norm=1.0),
        "cosine-warmup": OptimizerSpec(
            "adamw",
            lr=2e-3,
            schedule="cosine",
            warmup_steps=max(1, steps // 10),
            total_steps=max(steps, 2),
        ),
    }


@dataclasses.dataclass
class Comparison:
    """Per-step records of the two loops (arrays of length ``S``, one entry per step).

    Attributes:
        torch_loss, jax_loss: the loss of the batch at step ``t``, before update ``t``.
        torch_grad_norm, jax_grad_norm: global L2 norm of the gradients (before clipping).
        torch_lr, jax_lr: the learning rate used by update ``t``.
        param_diff: max |torch param - jax param| after update ``t`` (NaN where not
            measured).
        state_diff: max |torch buffer - jax model_state| after update ``t``: BatchNorm's
            running statistics and batch count (NaN where not measured, and for models
            without buffers; empty when not recorded).
        label: what ran (model, optimizer).
        dtype: ``"float32"`` or ``"float64"``: both sides' dtype (sets the targets).

    Example:
        >>> import numpy as np
        >>> lr = np.full(2, 0.1)
        >>> c = Comparison(torch_loss=np.array([2.0, 1.0]), jax_loss=np.array([2.0, 1.001]),
        ...                torch_grad_norm=np.ones(2), jax_grad_norm=np.ones(2),
        ...                torch_lr=lr, jax_lr=lr, param_diff=np.array([0.0, 1e-6]))
        >>> c.steps.tolist(), round(c.max_rel_diff(), 6), c.final_param_diff  # S = 2 steps
        ([0, 1], 0.001, 1e-06)
    """

    torch_loss: np.ndarray
    jax_loss: np.ndarray
    torch_grad_norm: np.ndarray
    jax_grad_norm: np.ndarray
    torch_lr: np.ndarray
    jax_lr: np.ndarray
    param_diff: np.ndarray
    state_diff: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    label: str = ""
    dtype: str = "float32"

    @property
    def steps(self) -> np.ndarray:
        """Step indices ``[S]`` (0-based)."""
        return np.arange(len(self.torch_loss))

    @property
    def rel_diff(self) -> np.ndarray:
        """``|torch - jax| / |torch|`` per step ``[S]``."""
        return np.abs(self.torch_loss - self.jax_loss) / np.maximum(np.abs(self.torch_loss), 1e-30)

    def max_rel_diff(self, first: int | None = None) -> float:
        """The largest relative loss difference over the first ``first`` steps (all: None)."""
        return float(np.max(self.rel_diff[:first]))

    @property
    def final_param_diff(self) -> float:
        """Max absolute parameter difference after the last step."""
        return float(self.param_diff[-1])

    @property
    def final_state_diff(self) -> float | None:
        """Max absolute difference of the buffers (BatchNorm's running statistics) after
        the last step; None for a model without buffers."""
        if not len(self.state_diff) or not np.isfinite(self.state_diff[-1]):
            return None
        return float(self.state_diff[-1])

    def summary(self) -> dict[str, Any]:
        """The headline figures and whether each parity target holds (plain Python)."""
        first = self.max_rel_diff(10)
        every = self.max_rel_diff()
        params = self.final_param_diff
        buffers = self.final_state_diff
        t_first, t_all, t_params = targets(self.dtype)
        meets = first <= t_first and every <= t_all and params <= t_params
        return {
            "label": self.label,
            "dtype": self.dtype,
            "steps": len(self.torch_loss),
            "max_rel_diff_first_10": first,
            "max_rel_diff_all": every,
            "final_param_max_abs_diff": params,
            "final_state_max_abs_diff": buffers,  # None: no buffers (no BatchNorm)
            "max_grad_norm_rel_diff": float(
                np.max(
                    np.abs(self.torch_grad_norm - self.jax_grad_norm)
                    / np.maximum(self.torch_grad_norm, 1e-30)
                )
            ),
            "meets_targets": bool(meets and (buffers is None or buffers <= t_params)),
        }

    def table(self, every: int = 1) -> str:
        """A text table: step, torch loss, jax loss, relative difference.

        Args:
            every: print every ``every``-th step (the last step always).
        """
        rows = [f"{'step':>6}  {'torch loss':>12}  {'jax loss':>12}  {'rel diff':>9}"]
        last = len(self.torch_loss) - 1
        rel = self.rel_diff
        for t in range(last + 1):
            if t % every == 0 or t == last:
                rows.append(
                    f"{t:>6}  {self.torch_loss[t]:>12.8f}  {self.jax_loss[t]:>12.8f}  "
                    f"{rel[t]:>9.2e}"
                )
        return "\n".join(rows)

    def plot(self, path: str | os.PathLike) -> str:
        """Writes a PNG: both loss curves overlaid, their relative difference, and the
        parameter difference, against the step.

        Returns:
            The path written.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        steps = self.steps
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        ax = axes[0]
        ax.plot(steps, self.torch_loss, "-", lw=2.5, alpha=0.6, label="PyTorch")
        ax.plot(steps, self.jax_loss, "--", lw=1.2, label="jaxtrain")
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
        ax.legend()
        ax = axes[1]
        ax.semilogy(steps, np.maximum(self.rel_diff, 1e-17), lw=1)
        t_first, t_all, t_params = targets(self.dtype)
        ax.axhline(t_first, color="C2", ls=":", label=f"{t_first:g} (first 10 steps)")
        ax.axhline(t_all, color="C3", ls=":", label=f"{t_all:g} (all steps)")
        ax.set_ylabel("|torch - jax| / |torch| (loss)")
        ax.legend(fontsize=8)
        ax = axes[2]
        ok = np.isfinite(self.param_diff)
        ax.semilogy(steps[ok], np.maximum(self.param_diff[ok], 1e-17), lw=1)
        ax.axhline(t_params, color="C3", ls=":", label=f"{t_params:g}")
        ax.set_ylabel("max |torch - jax| (parameters)")
        ax.legend(fontsize=8)
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        if self.label:
            fig.suptitle(self.label)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return os.fspath(path)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every per-step series as a list, plus `summary`."""
        out = {
            f.name: getattr(self, f.name).tolist()
            for f in dataclasses.fields(self)
            if f.name not in ("label", "dtype")
        }
        out["summary"] = self.summary()
        return out


# Per-step records of `compare`: short key -> `Comparison` field.
_SERIES = {
    "tl": "torch_loss",
    "jl": "jax_loss",
    "tg": "torch_grad_norm",
    "jg": "jax_grad_norm",
    "tlr": "torch_lr",
    "jlr": "jax_lr",
    "pd": "param_diff",
    "sd": "state_diff",
}


def _max_abs_diff(a: Any, b: Any) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def compare(
    torch_model: Any,
    spec: OptimizerSpec,
    data: Mapping[str, np.ndarray],
    *,
    input_shape: tuple[int, ...],
    steps: int = 200,
    batch_size: int = 32,
    seed: int = 0,
    loss: str = "cross_entropy",
    label_smoothing: float = 0.0,
    jax_model: Model | None = None,
    param_diff_every: int = 1,
    label: str = "",
    dtype: str = "float32",
    scheduler: Any = None,
    clip_norm: float | None = None,
) -> Comparison:
    """Trains ``torch_model`` with PyTorch and its converted twin with `make_train_step`.

    Both start from ``torch_model``'s current weights and see the same batches in the
    same order (`ArrayDataset` with ``seed``, full batches only). PyTorch runs
    deterministic (``use_deterministic_algorithms``), JAX with matmul precision
    ``"highest"``; both are restored afterwards. ``torch_model`` is trained in place, in
    ``train()`` mode (its mode is restored afterwards), and the JAX model with
    ``train=True``: BatchNorm normalises with batch statistics on both sides, and its
    running statistics (``model_state``, started from the PyTorch buffers) are compared
    too (`Comparison.state_diff`). Dropout with ``p > 0`` is refused: the two sides draw
    different random masks by design.

    ``dtype="float64"`` runs both sides in float64: ``torch_model.double()``, JAX's x64 mode
    for the duration of the call only (``jax.enable_x64``), float64 parameters, inputs,
    losses and schedules. Rounding then no longer hides what differs: the presets agree to
    ~1e-13 over 200 steps (docs/pytorch-optimizers.md).

    Args:
        torch_model: a module `from_torch` can convert (an ``nn.Sequential`` or any
            ``torch.fx``-traceable module; BatchNorm allowed), without active dropout
            (``nn.Dropout(p=0)`` or none; ``F.dropout`` likewise).
        spec: the optimizer, clipping and schedule: an `OptimizerSpec`, or the user's own
            ``torch.optim`` constructor (``functools.partial(torch.optim.RMSprop, lr=1e-3)``
            or the class), which then runs on the PyTorch side as given and is mapped by
            `jaxtrain.contrast.torch_optim.spec_from_torch` for the JAX side.
        data: ``{"x": [N, H, W, C] or [N, F], "y": [N] int (or [N, K] float for mse)}``
            in jaxtrain's layout; PyTorch gets ``x`` as NCHW.
        input_shape: PyTorch shape of one example (``(C, H, W)`` or ``(F,)``).
        steps: training steps ``S``.
        batch_size: examples per step.
        seed: the shuffle seed of the batches.
        loss: ``"cross_entropy"`` or ``"mse"``.
        label_smoothing: cross-entropy label smoothing (both sides).
        jax_model: the JAX model to train (default: the converted ``nn.Sequential``). Its
            parameters must have the converted tree (e.g. ``from_linen(jaxtrain.models.CNN(...))``
            for a `torch_twin`).
        param_diff_every: measure the parameter difference every this many steps (and
            after the last); it copies every PyTorch weight to the host.
        label: a title for tables and plots.
        dtype: ``"float32"`` or ``"float64"`` (both frameworks).
        scheduler: with a constructor ``spec`` only: the ``lr_scheduler`` constructor
            (``optimizer -> scheduler``, e.g. ``functools.partial(StepLR, step_size=30)``).
        clip_norm: with a constructor ``spec`` only: ``clip_grad_norm_``'s ``max_norm``
            in the PyTorch loop (and PyTorch's clipping on the JAX side); an
            `OptimizerSpec` holds its own (``OptimizerSpec(..., clip_norm=1.0)``).

    Returns:
        A `Comparison`.

    Raises:
        ValueError: an unknown ``dtype``, a ``scheduler`` or ``clip_norm`` next to an
            `OptimizerSpec`, an optimizer/scheduler with no counterpart (by name), a
            dropout layer with ``p > 0`` or a parameter with ``requires_grad=False``
            (by name).

    Example:
        >>> import numpy as np, torch
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
        >>> rng = np.random.default_rng(0)
        >>> data = {"x": rng.normal(size=(16, 4)).astype(np.float32),  # [N, F]
        ...         "y": rng.integers(0, 3, 16).astype(np.int32)}      # [N]
        >>> result = compare(net, OptimizerSpec("sgd", lr=0.1), data, input_shape=(4,),
        ...                  steps=3, batch_size=8)
        >>> result.jax_loss.shape, result.max_rel_diff() < 1e-5
        ((3,), True)
    """
    torch = require_torch()
    spec, torch_ctors = _resolve_optimizer(spec, scheduler, clip_norm)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    _refuse_dropout(torch, torch_model)
    _refuse_frozen(torch_model)
    with _train_mode(torch_model):  # fx fixes `if self.training:` at tracing: as trained
        converted = from_torch(torch_model, input_shape)
    if isinstance(converted, FxConverted):
        _refuse_functional_dropout(torch, converted)
    data = _cast_data(data, dtype, loss)
    rec = {k: np.full(steps, np.nan) for k in _SERIES}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_deterministic_torch(torch))
        stack.enter_context(jax.default_matmul_precision("highest"))
        stack.enter_context(_train_mode(torch_model))  # the JAX side runs with train=True
        if dtype == "float64":
            stack.enter_context(jax.enable_x64(True))  # this comparison only
            torch_model.double()
        model, params = _jax_model_and_params(converted, jax_model, data["x"], dtype)
        model_state = _floats_as(converted.model_state, dtype)  # BatchNorm's buffers
        loss_fn, criterion = _losses(loss, model, label_smoothing)
        optimizer, schedule = make_optax(spec, dtype)
        state = TrainState.create(params, optimizer, seed, model_state=model_state)
        torch_loop = _TorchLoop.create(torch_model, spec, criterion, *torch_ctors)
        dataset = ArrayDataset(dict(data), batch_size, seed=seed, drop_remainder=True)
        train_step = make_train_step(loss_fn, optimizer, learning_rate_fn=schedule)
        feed = _plateau_feed(spec)
        batches = dataset.iterate()
        for t in range(steps):
            _, batch = next(batches)
            # --- PyTorch: clear, forward, loss, backward, (clip), step, schedule.
            x, y = _torch_batch(torch, batch, loss)
            rec["tlr"][t], rec["tg"][t], rec["tl"][t] = torch_loop.step(x, y)
            # --- jaxtrain: one pure function of (state, batch).
            state, metrics = train_step(state, batch)
            if feed is not None:  # scheduler.step(loss): a pure function of the state
                state = state.replace(opt_state=feed(state.opt_state, metrics["loss"]))
            rec["jl"][t] = float(metrics["loss"])
            rec["jg"][t] = float(metrics["grad_norm"])
            rec["jlr"][t] = float(metrics["learning_rate"])
            if (t + 1) % param_diff_every == 0 or t == steps - 1:
                rec["pd"][t] = _max_abs_diff(converted.params_from(torch_model), state.params)
                if model_state:  # the running statistics, updated by both forwards
                    buffers = converted.state_from(torch_model)
                    rec["sd"][t] = _max_abs_diff(buffers, state.model_state)
    series = {field: rec[key] for key, field in _SERIES.items()}
    return Comparison(**series, label=label, dtype=dtype)


DTYPES = ("float32", "float64")


def _resolve_optimizer(
    spec: Any, scheduler: Any, clip_norm: float | None = None
) -> tuple[OptimizerSpec, tuple[Any, Any]]:
    """``(the spec, (torch optimizer constructor, scheduler constructor) or Nones)``."""
    if isinstance(spec, OptimizerSpec):
        if scheduler is not None:
            raise ValueError(
                "compare: scheduler= goes with a torch.optim constructor; an OptimizerSpec "
                "holds its schedule (schedule=, warmup_steps=, ...). Fix: drop scheduler=."
            )
        if clip_norm is not None:
            raise ValueError(
                f"compare: clip_norm={clip_norm} goes with a torch.optim constructor; an "
                "OptimizerSpec holds its own. Fix: OptimizerSpec(..., "
                f"clip_norm={clip_norm}) and drop clip_norm=."
            )
        return spec, (None, None)
    return spec_from_torch(spec, scheduler, clip_norm=clip_norm), (spec, scheduler)


def _refuse_dropout(torch: Any, torch_model: Any) -> None:
    """Refuses a dropout layer with ``p > 0``: the two sides' masks differ by design.

    Raises:
        ValueError: naming the first such layer and the fix.
    """
    dropout_types = torch.nn.modules.dropout._DropoutNd
    for name, module in torch_model.named_modules():
        if isinstance(module, dropout_types) and module.p > 0:
            raise ValueError(
                f"compare: layer '{name}' is {type(module).__name__}(p={module.p}); in "
                "training both sides drop units, but with different random masks "
                "(PyTorch's generator vs JAX's keys), so the runs cannot agree step by step. "
                f"Fix: compare with p=0 (model.get_submodule({name!r}).p = 0.0), or remove "
                "the dropout; compare in eval mode with from_torch(...).apply(params, x) "
                "against model.eval()(x)."
            )


def _refuse_frozen(torch_model: Any) -> None:
    """Refuses parameters with ``requires_grad=False``: PyTorch's optimizer skips them, the
    JAX side would train them (its optimizer sees every leaf).

    Raises:
        ValueError: naming the first frozen parameter and the fix.
    """
    frozen = [name for name, p in torch_model.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"compare: {len(frozen)} parameter(s) have requires_grad=False (first: "
            f"'{frozen[0]}'); PyTorch's optimizer skips them, but the JAX side would train "
            "them, so the runs would differ. Fix: compare with every parameter trainable "
            "(model.requires_grad_(True)); in your own jaxtrain loop, freeze them with "
            "jaxtrain.contrast.freeze(optimizer, trainable)."
        )


def _refuse_functional_dropout(torch: Any, converted: FxConverted) -> None:
    """Refuses ``F.dropout(x, p > 0)`` in a traced ``forward`` (see `_refuse_dropout`).

    Raises:
        ValueError: naming the node and the fix.
    """
    for node in converted.graph.graph_module.graph.nodes:
        if node.op != "call_function" or node.target is not torch.nn.functional.dropout:
            continue
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        if not isinstance(p, (int, float)) or p > 0:  # a p computed in forward: refused too
            raise ValueError(
                f"compare: forward calls F.dropout(p={p}) (node '{node.name}'); the two "
                "sides would draw different random masks. Fix: compare with p=0 in forward, "
                "or compare outputs in eval mode (train=False)."
            )


@contextlib.contextmanager
def _train_mode(torch_model: Any) -> Iterator[None]:
    """``torch_model.train()`` (``model.train()`` in a training loop); its mode restored."""
    modes = {name: m.training for name, m in torch_model.named_modules()}
    torch_model.train()
    try:
        yield
    finally:
        for name, m in torch_model.named_modules():
            m.training = modes.get(name, m.training)


def _floats_as(tree: Any, dtype: str) -> Any:
    """``tree`` with its floating leaves in ``dtype`` (own buffers; counts stay integers)."""

    def cast(v: Any) -> Any:
        v = jnp.asarray(v)
        return jnp.array(v, dtype) if jnp.issubdtype(v.dtype, jnp.floating) else jnp.array(v)

    return jax.tree.map(cast, tree)


def _cast_data(data: Mapping[str, np.ndarray], dtype: str, loss: str) -> dict[str, np.ndarray]:
    """The inputs (and regression targets) in ``dtype``; labels and token ids unchanged."""
    out = dict(data)
    x = np.asarray(data["x"])
    # Token ids (an Embedding first) stay integers: as floats PyTorch refuses them.
    out["x"] = x if np.issubdtype(x.dtype, np.integer) else x.astype(dtype)
    if loss == "mse":
        out["y"] = np.asarray(data["y"]).astype(dtype)
    return out


def _plateau_feed(spec: OptimizerSpec) -> Any:
    """``ReduceLROnPlateau.step(loss)`` as a jitted ``(opt_state, loss) -> opt_state``."""
    if spec.schedule != "plateau":
        return None
    return jax.jit(functools.partial(plateau_step, **plateau_kwargs(spec)))


def _jax_model_and_params(
    converted: Any, jax_model: Model | None, x: Any, dtype: str = "float32"
) -> tuple[Model, Any]:
    """The JAX model `compare` trains and its start parameters (the converted weights).

    Raises:
        ValueError: ``jax_model``'s parameter tree is not the converted one.
    """
    model = jax_model if jax_model is not None else converted.model()
    # own buffers (the state is donated), in the comparison's dtype
    params = jax.tree.map(lambda p: jnp.array(p, dtype), converted.params)
    if jax_model is not None:
        sample = jnp.zeros((1, *np.asarray(x).shape[1:]), jnp.float32)
        expected = jax.tree.structure(model.init(jax.random.key(0), sample)[0])
        # ignore: jax's stubs name PyTreeDef from a module mypy cannot resolve; it has __eq__.
        if expected != jax.tree.structure(params):  # type: ignore[operator]
            raise ValueError(
                "jax_model's parameters do not have the tree of the converted PyTorch model: "
                f"{expected} vs {jax.tree.structure(params)}. Fix: pass jax_model=None, or a "
                "model with the same layers (torch_twin builds the twin of MLP and CNN)."
            )
    return model, params


def _losses(loss: str, model: Model, label_smoothing: float) -> tuple[Any, Any]:
    """``(jaxtrain loss function, PyTorch criterion)`` for the ``loss`` kind.

    Raises:
        ValueError: ``loss`` is neither ``"cross_entropy"`` nor ``"mse"``.
    """
    if loss == "cross_entropy":
        loss_fn = classification_loss(model, label_smoothing)
    elif loss == "mse":
        loss_fn = regression_loss(model)
    else:
        raise ValueError(f"loss must be 'cross_entropy' or 'mse'; got {loss!r}.")
    return loss_fn, torch_loss(loss, label_smoothing)


@dataclasses.dataclass
class _TorchLoop:
    """The PyTorch side of `compare`: a model, its criterion, optimizer and scheduler."""

    model: Any
    spec: OptimizerSpec
    criterion: Any
    params: list[Any]
    optimizer: Any
    scheduler: Any  # None: a constant learning rate

    @classmethod
    def create(
        cls,
        model: Any,
        spec: OptimizerSpec,
        criterion: Any,
        optimizer_ctor: Any = None,
        scheduler_ctor: Any = None,
    ) -> _TorchLoop:
        """The optimizer and scheduler of ``spec`` (or the user's constructors) over
        ``model``'s parameters."""
        params = list(model.parameters())
        if optimizer_ctor is None:
            optimizer, scheduler = make_torch(spec, params)
        else:
            optimizer = optimizer_ctor(params)
            # spec_from_torch saw one group on a dummy parameter; a constructor that splits
            # the real parameters (by ndim, by name) must not be mapped by its first group.
            check_one_group(optimizer)
            scheduler = None if scheduler_ctor is None else scheduler_ctor(optimizer)
        return cls(model, spec, criterion, params, optimizer, scheduler)

    def step(self, x: Any, y: Any) -> tuple[float, float, float]:
        """One PyTorch step on ``(x, y)``; returns ``(lr used, grad norm, loss)``."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.criterion(self.model(x), y)
        loss.backward()
        grad_norm = torch_clip(self.spec, self.params)
        self.optimizer.step()
        if self.spec.schedule == "plateau":
            self.scheduler.step(float(loss.detach()))  # ReduceLROnPlateau: fed the metric
        elif self.scheduler is not None:
            self.scheduler.step()
        return lr, grad_norm, float(loss.detach())


def _torch_batch(torch: Any, batch: Mapping[str, np.ndarray], loss: str) -> tuple[Any, Any]:
    """A jaxtrain batch as PyTorch tensors: ``x`` NCHW, ``y`` int64 for cross-entropy."""
    x = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(batch["x"])))
    y = torch.from_numpy(batch["y"])
    if loss == "cross_entropy":
        y = y.long()
    return x, y


@contextlib.contextmanager
def _deterministic_torch(torch: Any) -> Iterator[None]:
    """PyTorch deterministic, float32 matmuls at "highest"; the settings restored after."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_prec = torch.get_float32_matmul_precision()
    torch.use_deterministic_algorithms(True)
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_float32_matmul_precision(prev_prec)


MODELS = ("mlp-tanh", "cnn-tanh", "mlp", "cnn")


def digits_models(kind: str, seed: int = 0) -> tuple[Any, Model | None]:
    """A PyTorch model for the 8x8 digits and the JAX model it is compared with.

    Args:
        kind: ``"mlp-tanh"``: ``nn.Sequential`` of Flatten -> Linear(64->64) -> Tanh ->
            Linear(64->64) -> Tanh -> Linear(64->10), compared with its `from_torch`
            conversion. ``"mlp"``: jaxtrain's `jaxtrain.models.MLP` (hidden (64, 64), ReLU) and
            its `torch_twin`. ``"cnn-tanh"``: a smooth CNN, ``nn.Sequential`` of Conv2d(1->8,
            3x3) -> Tanh -> Conv2d(8->16, 3x3, stride 2) -> Tanh -> Conv2d(16->16, 3x3,
            stride 2) -> Tanh -> Flatten -> Linear(64->32) -> Tanh -> Linear(32->10),
            compared with its `from_torch` conversion. ``"cnn"``: jaxtrain's `jaxtrain.models.CNN`
            (channels (8, 16), dense 32, ReLU and max-pooling, no dropout) and its twin.
        seed: ``torch.manual_seed`` for PyTorch's default initialisation, which is the
            start of both runs.

    Returns:
        ``(torch_model, jax_model)``; ``jax_model`` None means the converted model.

    Example:
        >>> torch_model, jax_model = digits_models("mlp-tanh")
        >>> [type(m).__name__ for m in torch_model], jax_model
        (['Flatten', 'Linear', 'Tanh', 'Linear', 'Tanh', 'Linear'], None)
    """
    from jaxtrain.models.builtin import CNN, MLP

    torch = require_torch()
    tnn = torch.nn
    torch.manual_seed(seed)
    if kind == "mlp":
        module = MLP(hidden=(64, 64), num_outputs=10)
        return torch_twin(module, (1, 8, 8)), from_linen(module)
    if kind == "cnn":
        cnn = CNN(channels=(8, 16), dense=32, num_classes=10, dropout=0.0)
        return torch_twin(cnn, (1, 8, 8)), from_linen(cnn)
    if kind == "mlp-tanh":
        net = tnn.Sequential(
            tnn.Flatten(),
            tnn.Linear(64, 64),
            tnn.Tanh(),
            tnn.Linear(64, 64),
            tnn.Tanh(),
            tnn.Linear(64, 10),
        )
        return net, None
    if kind == "cnn-tanh":
        net = tnn.Sequential(
            tnn.Conv2d(1, 8, 3, padding=1),
            tnn.Tanh(),
            tnn.Conv2d(8, 16, 3, stride=2, padding=1),  # [B, 16, 4, 4]
            tnn.Tanh(),
            tnn.Conv2d(16, 16, 3, stride=2, padding=1),  # [B, 16, 2, 2]
            tnn.Tanh(),
            tnn.Flatten(),
            tnn.Linear(64, 32),
            tnn.Tanh(),
            tnn.Linear(32, 10),
        )
        return net, None
    raise ValueError(f"model must be one of {', '.join(MODELS)}; got {kind!r}.")
