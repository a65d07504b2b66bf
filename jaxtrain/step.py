"""`make_train_step` and `make_eval_step`: the compiled heart of the training cycle.

forward pass -> loss -> gradients -> update is one pure function of ``(state, batch)``
(`build_step`). Gradients are a return value of ``jax.value_and_grad``: nothing
accumulates between steps, so there is nothing to clear (PyTorch's ``zero_grad``).

What lives here: the pure step and the user-function normalisation (`build_step`), the
`CompiledStep` wrapper (trace counting, mesh placement, its `StepSpec`), jit and donation
(`compile_step`), and the public builders, thin wrappers over `build_train_step`. The
options live in `jaxtrain.step_options`, the transforms (gradient accumulation,
precision, fused steps) in `jaxtrain.transforms`, the device-resident epoch in
`jaxtrain.resident`. This module never imports the loop, the CLI, checkpoints or torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain import ema as ema_lib
from jaxtrain import metrics as metrics_lib
from jaxtrain import perf as perf_lib
from jaxtrain import precision as precision_lib
from jaxtrain import transforms
from jaxtrain.parallel import fsdp_size, state_shardings
from jaxtrain.state import TrainState, raise_if_donated
from jaxtrain.step_options import (
    UNROLL_AUTO,
    StepOptions,
    StepSpec,
    check_optimizer,
    step_options,
)
from jaxtrain.types import Batch, EvalFn, LossFn, PyTree

MODEL_STATE_KEY = "model_state"

# Names the step (and `fit`'s log records) use themselves: an aux metric of one of these
# names would silently replace the real value, so it is an error at trace time.
RESERVED_METRICS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "skipped_steps",
    "nonfinite",
    "loss_scale",
    "loss_scale_overflows",
    "step",
    "epoch",
    "split",
    "examples_per_second",
    "model_flops_per_second",
    "mfu",
)


def _check_aux(aux: Mapping[str, Any]) -> None:
    """Trace-time check of the aux metrics: scalar values, no built-in metric's name."""
    for key, value in aux.items():
        if not hasattr(value, "shape") and not isinstance(value, (int, float, np.number)):
            raise TypeError(
                f"loss_fn's aux[{key!r}] is a {type(value).__name__}; aux metrics must be "
                "scalar numbers or arrays of shape (). Fix: return {'name': scalar, ...} "
                "(model state goes in aux['model_state'])."
            )
        if key in RESERVED_METRICS:
            raise ValueError(
                f"loss_fn's aux has the key {key!r}, the name of a metric jaxtrain reports "
                f"itself; it would replace the real {key!r}. Fix: rename it (e.g. "
                f"'my_{key}'). Reserved: {', '.join(RESERVED_METRICS)}."
            )
        shape = jnp.shape(value)
        if shape != ():
            raise ValueError(
                f"loss_fn's aux[{key!r}] has shape {tuple(shape)}; aux metrics must be "
                "scalars (they are averaged over logging intervals). Fix: reduce it, e.g. "
                f"jnp.mean(aux[{key!r}]), or return per-example values from an eval_fn "
                "(make_eval_step) instead; model state goes in aux['model_state']."
            )


def _unbuilt(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "this CompiledStep has no step function: its builder never set fn/jitted. "
        "Fix: build steps with make_train_step, make_train_steps or make_eval_step."
    )


class CompiledStep:
    """A step function plus what a careful user wants to know about its compilation.

    Calling it calls the jit-compiled function. ``trace_count`` counts how many times
    JAX traced the Python body: one per distinct input shape/dtype signature. A count
    above 1 in a loop over fixed-shape batches is a silent-recompilation bug.

    Attributes:
        fn: the pure, un-jitted step function (for ``jax.make_jaxpr``, ``vmap``, tests).
        jitted: the ``jax.jit`` object (``.lower(...)`` gives the compiled HLO and its
            memory/cost analysis).
        spec: the `StepSpec` the step declares: its kind (one step, K fused steps, a
            device-resident epoch, evaluation), steps per call, data set, non-finite
            policy and scan unrolling. `fit` reads it to feed the step.
        mesh: the mesh the compiled step keeps its state on, or None.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> opt = optax.sgd(0.1)
        >>> step = make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
        >>> state = TrainState.create({"w": jnp.ones(3)}, opt, jax.random.key(0))
        >>> for _ in range(3):
        ...     state, metrics = step(state, {"x": jnp.ones((4, 3))})
        >>> step.trace_count, step.spec.kind  # three calls, one batch shape: one compilation
        (1, 'step')
    """

    def __init__(
        self,
        fn: Callable[..., Any] | None,
        jitted: Callable[..., Any] | None,
        name: str = "step",
        spec: StepSpec | None = None,
    ):
        # None while a builder makes the body, which counts its traces on this object; a
        # call before the builder sets both says so rather than calling None.
        self.fn: Callable[..., Any] = _unbuilt if fn is None else fn
        # Any: a jax.jit object (with .lower) or, with jit=False, the plain function.
        self.jitted: Any = _unbuilt if jitted is None else jitted
        self.name = name  # for messages: "train_step", "train_steps", "eval_step"
        self.spec = StepSpec("step") if spec is None else spec
        self._traces = 0
        self._compile_seconds = 0.0
        # The mesh the compiled step keeps its state on (set by compile_step), whether a
        # state has been placed there yet, and a fused step's cached all-True ``active``.
        self.mesh: Mesh | None = None
        self._placed = False
        self._all_active: Any = None

    # A read-only view of ``spec`` under its former name (tests/test_readme.py reads it).
    @property
    def steps_per_call(self) -> int | None:
        """K for fused steps (``spec.steps_per_call``), None for any other kind."""
        return self.spec.steps_per_call if self.spec.kind == "fused" else None

    @property
    def trace_count(self) -> int:
        """Times the step body ran in Python: traces (== compilations) when jitted.

        With ``jit=False`` the body runs eagerly, so this counts calls instead.
        """
        return self._traces

    @property
    def compile_seconds(self) -> float:
        """Seconds JAX spent tracing, lowering and compiling this step (or loading it
        from the persistent compilation cache), over all its compilations so far.

        Measured from JAX's own compile events, wherever the compilation happened: in a
        call, or in ``lower(...).compile()`` (e.g. `jaxtrain.perf.step_flops`). 0.0 before
        the first compilation and with ``jit=False``.
        """
        return self._compile_seconds

    def _count_trace(self) -> None:
        self._traces += 1

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Traces inside this block (abstract evaluations, FLOP counts) are not counted.

        ``jax.eval_shape`` or ``jax.make_jaxpr`` of the step's body runs it in Python but
        compiles nothing, so `trace_count` (compilations) must not move.
        """
        traces = self._traces
        try:
            yield
        finally:
            self._traces = traces

    def add_compile_seconds(self, seconds: float) -> None:
        """Adds a compilation that happened outside a call (``lower(...).compile()``)."""
        self._compile_seconds += seconds

    def complete_args(self, args: tuple) -> tuple:
        """The arguments a call actually passes (a fused step's implicit ``active``)."""
        return self._complete(args)

    def _declare_unroll(self, unroll: int | bool) -> None:
        """Records the unrolling a fused step or epoch chose when traced."""
        if self.spec.unroll != unroll:
            self.spec = dataclasses.replace(self.spec, unroll=unroll)

    def _complete(self, args: tuple) -> tuple:
        """A fused step's arguments with ``active`` (all True when not given).

        Always passing it keeps one trace however the step is called.
        """
        if self.spec.kind != "fused" or len(args) not in (2, 3):
            return args
        k = self.spec.steps_per_call
        if len(args) == 3 and args[2] is not None:
            return (*args[:2], transforms.check_active(args[2], k))
        if self._all_active is None:
            ones = np.ones(k, np.bool_)
            where = _replicated(self.mesh)
            self._all_active = jnp.asarray(ones) if where is None else jax.device_put(ones, where)
        return (*args[:2], self._all_active)

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower`` for inspecting the compiled step."""
        return self.jitted.lower(*self._complete(args))

    def __call__(self, *args: Any) -> Any:
        traces, seen = self._traces, perf_lib.COMPILE_CLOCK.count
        args = self._complete(args)
        try:
            if self.mesh is not None and not self._placed:
                # The first state usually comes straight from TrainState.create, on one
                # device; the step returns it on the mesh. Placing it first gives every
                # call the same input layout: one compilation, not two. Later calls pass
                # the step's own output, already placed, and skip this. A copy: the
                # caller's arrays must survive the donation.
                from jaxtrain.parallel import shard_state

                args = (shard_state(args[0], self.mesh, copy=True), *args[1:])
                self._placed = True
            if traces == 0 and self.jitted is not self.fn:
                # The first call traces and compiles before it returns: say so if it is long.
                perf_lib.COMPILE_CLOCK.install()
                with perf_lib.CompileNotice(self.name):
                    return self.jitted(*args)
            return self.jitted(*args)
        except (RuntimeError, ValueError) as e:
            # Costs nothing unless the call failed: was the state donated before?
            raise_if_donated(args[0] if args else None, self.name, e)
            raise
        finally:
            if self._traces != traces:
                self._compile_seconds += perf_lib.COMPILE_CLOCK.seconds_since(seen)


def _accepted_kwargs(fn: Callable, names: tuple[str, ...]) -> frozenset[str]:
    """Which of ``names`` the user's function accepts as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins, some C callables
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(names)
    return frozenset(n for n in names if n in params)


def _check_loss(loss: Any) -> jax.Array:
    loss = jnp.asarray(loss)
    if loss.shape != ():
        raise ValueError(
            f"loss_fn must return a scalar loss; got shape {loss.shape}. "
            "Fix: reduce it, e.g. jaxtrain.losses.weighted_mean(per_example, batch['mask'])."
        )
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(
            f"loss_fn must return a floating-point loss; got dtype {loss.dtype}. "
            "Gradients of integer values are zero. Fix: compute the loss in float32."
        )
    return loss


def _normalize_loss_fn(loss_fn: LossFn) -> Callable:
    """Wraps the user's loss into ``f(params, batch, rng, model_state) -> (loss, (aux, ms))``.

    The user writes the simplest thing that works: ``loss_fn(params, batch)`` returning a
    scalar, and adds keyword arguments ``rng`` / ``model_state`` and an aux dict only
    when the model needs them.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable; got {type(loss_fn).__name__}.")
    extra = _accepted_kwargs(loss_fn, ("rng", MODEL_STATE_KEY))

    def wrapped(params, batch, rng, model_state):
        kwargs = {}
        if "rng" in extra:
            kwargs["rng"] = rng
        if MODEL_STATE_KEY in extra:
            kwargs[MODEL_STATE_KEY] = model_state
        out = loss_fn(params, batch, **kwargs)
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ValueError(
                    f"loss_fn returned a tuple of {len(out)} values; expected a scalar loss or "
                    "(loss, aux) where aux is a dict of metrics (plus optional 'model_state')."
                )
            loss, aux = out
            if aux is None:
                aux = {}
            if not isinstance(aux, Mapping):
                raise TypeError(
                    f"loss_fn's aux must be a dict of metrics; got {type(aux).__name__}. "
                    "Fix: return (loss, {'accuracy': acc, 'model_state': new_model_state})."
                )
            aux = dict(aux)
            returned = MODEL_STATE_KEY in aux
            new_model_state = aux.pop(MODEL_STATE_KEY, model_state)
            _check_aux(aux)
        else:
            loss, aux, new_model_state, returned = out, {}, model_state, False
        if MODEL_STATE_KEY in extra and not returned:
            _model_state_not_returned(model_state)
        return _check_loss(loss), (aux, new_model_state)

    return wrapped


def _model_state_not_returned(model_state: PyTree) -> None:
    """Trace-time refusal: a loss given a non-empty model state must hand it back.

    Otherwise the state (BatchNorm statistics, RNG counters) silently keeps its initial
    values for the whole run. Freezing it on purpose (fine-tuning with frozen statistics)
    stays one explicit line: return the ``model_state`` the loss was given.
    """
    leaves = jax.tree_util.tree_leaves_with_path(model_state)
    if not leaves:
        return
    raise ValueError(
        f"loss_fn takes model_state but did not return it in aux['model_state']: the model "
        f"state ({len(leaves)} arrays, e.g. model_state{jax.tree_util.keystr(leaves[0][0])}) "
        "would silently keep its initial values (BatchNorm statistics would freeze). Fix: "
        "return (loss, {'model_state': new_model_state, ...}) with the state that "
        "model.apply(..., train=True) returned; to freeze it on purpose, return the "
        "model_state the loss was given."
    )


def _find_learning_rate(opt_state: PyTree) -> jax.Array | None:
    """The learning rate stored by ``optax.inject_hyperparams``, if any."""
    found = []

    def visit(node):
        hp = getattr(node, "hyperparams", None)
        if isinstance(hp, Mapping) and "learning_rate" in hp:
            found.append(hp["learning_rate"])
            return True
        return False

    jax.tree_util.tree_leaves(opt_state, is_leaf=visit)
    return _lr_metric(found[0]) if found else None


def _lr_metric(lr: Any) -> jax.Array:
    """The ``learning_rate`` metric: float32, or float64 when the schedule gives float64
    (JAX's x64 mode: a float32 cast would hide the schedule's digits past ~1e-8)."""
    lr = jnp.asarray(lr)
    return lr if lr.dtype == jnp.float64 else lr.astype(jnp.float32)


def _replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def build_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    options: StepOptions,
    nonfinite_names: list[str] | None = None,
) -> Callable:
    """The pure one-step function ``step(state, batch) -> (new_state, metrics)``.

    Every train step is built on it: `make_train_step` jits it, `make_train_steps` and
    `make_device_epoch` scan it (`jaxtrain.transforms`). The gradient comes from the
    chain of gradient transforms ``options`` asks for (`jaxtrain.transforms.gradient_fn`).

    Args:
        loss_fn: the user's loss, as in `make_train_step`.
        optimizer: an optax ``GradientTransformation``.
        options: the `StepOptions` (``learning_rate_fn``, ``nonfinite``,
            ``grad_accum_steps``, ``precision``, ``grad_norm`` apply here).
        nonfinite_names: a list the guard fills, at trace time, with the names of the
            values it checks (`StepSpec.nonfinite_names`).

    Returns:
        The pure, un-jitted step function.
    """
    check_optimizer(optimizer)
    call_loss = _normalize_loss_fn(loss_fn)
    grad_fn = transforms.gradient_fn(options)
    names = [] if nonfinite_names is None else nonfinite_names

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_opt_state(optimizer, state)
        g = grad_fn(call_loss, state, batch, state.step_rng())
        updates, new_opt_state = optimizer.update(g.grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        metrics = _step_metrics(options, state, g, new_opt_state)
        new = {"params": new_params, "opt_state": new_opt_state, "model_state": g.model_state}
        decay = _check_ema(options.ema_decay, state)  # the parameter EMA (jaxtrain.ema)
        if decay is not None:
            new["ema_params"] = ema_lib.ema_update(state.ema_params, new_params, decay)
        skipped = state.skipped_steps
        # Loss scaling always skips an overflowed step (its gradients are garbage).
        skip = g.overflow
        if options.nonfinite is not None:
            bad, index = _nonfinite(options.policy, state, g, updates, new_params, names)
            skip = bad if skip is None else skip | bad
            skipped = skipped + bad.astype(skipped.dtype)
            metrics["skipped_steps"] = skipped
            metrics["nonfinite"] = index
        if skip is not None:
            # (the EMA too: a skipped step must not move the average)
            old = {k: getattr(state, k) for k in new}
            # A select, not a branch: bitwise the old values when skipped, no host sync.
            new = jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
        if g.overflow is not None:
            metrics["loss_scale"] = g.loss_scale.scale
            metrics["loss_scale_overflows"] = g.loss_scale.overflows
        new_state = state.replace(
            loss_scale=g.loss_scale, step=state.step + 1, skipped_steps=skipped, **new
        )
        return new_state, metrics

    return train_step


def _check_ema(decay: float | None, state: TrainState) -> float | None:
    """Trace-time check that the state and the step agree on the EMA; its decay or None."""
    has = bool(jax.tree.leaves(state.ema_params))
    if decay is not None and not has:
        raise ValueError(
            f"the step keeps a parameter EMA (ema_decay={decay}) but the state has no "
            "ema_params. Fix: build the state with TrainState.create(..., ema=True)."
        )
    if decay is None and has:
        raise ValueError(
            "the state has ema_params but the step has no ema_decay: the average would "
            "silently stay at its initial value. Fix: build the step with ema_decay=... "
            "(e.g. 0.999), or the state without ema=True."
        )
    return decay


def _step_metrics(
    options: StepOptions, state: TrainState, g: transforms.Grads, new_opt_state: PyTree
) -> dict[str, jax.Array]:
    """The loss, gradient norm, learning rate and aux metrics of one step."""
    metrics = {"loss": g.loss}
    if options.grad_norm:  # a reduction over every gradient leaf: ~10 small kernels on CPU
        metrics["grad_norm"] = optax.tree.norm(g.grads)
    if options.learning_rate_fn is not None:
        metrics["learning_rate"] = _lr_metric(options.learning_rate_fn(state.step))
    else:
        lr = _find_learning_rate(new_opt_state)
        if lr is not None:
            metrics["learning_rate"] = lr
    metrics.update({k: jnp.asarray(v) for k, v in g.aux.items()})
    return metrics


def _nonfinite(
    policy: precision_lib.Policy | None,
    state: TrainState,
    g: transforms.Grads,
    updates: PyTree,
    new_params: PyTree,
    names: list[str],
) -> tuple[jax.Array, jax.Array]:
    """The non-finite guard: whether to skip the step, and the first bad value's index.

    Checks the loss, each gradient, each update and each new parameter (finite
    gradients times a NaN learning rate would otherwise write NaN parameters). Fills
    ``names`` (what the index points at) the first time it is traced.
    """
    named = jax.tree_util.tree_leaves_with_path(g.grads)
    named_updates = jax.tree_util.tree_leaves_with_path(updates)
    named_params = jax.tree_util.tree_leaves_with_path(new_params)
    if not names:
        names.extend(
            ["loss"]
            + ["grads" + jax.tree_util.keystr(p) for p, _ in named]
            + ["updates" + jax.tree_util.keystr(p) for p, _ in named_updates]
            + ["new params" + jax.tree_util.keystr(p) for p, _ in named_params]
        )
    grad_flags = [~jnp.all(jnp.isfinite(x)) for _, x in named]
    after_flags = [~jnp.all(jnp.isfinite(u)) for _, u in named_updates] + [
        ~jnp.all(jnp.isfinite(p)) for _, p in named_params
    ]
    if g.overflow is not None:
        # Under loss scaling a non-finite gradient is an expected overflow, handled by
        # the scale (skip, halve it), not an error -- unless the scale is already at its
        # minimum, where halving cannot help: then it is genuine.
        assert policy is not None and policy.loss_scale is not None  # only they overflow
        at_min = state.loss_scale.scale <= policy.loss_scale.min_scale
        grad_flags = [f & at_min for f in grad_flags]
        # An overflowed step's update is garbage by construction and is dropped.
        after_flags = [f & (at_min | ~g.overflow) for f in after_flags]
    flags = jnp.stack([~jnp.isfinite(g.loss), *grad_flags, *after_flags])
    bad = jnp.any(flags)
    return bad, jnp.where(bad, jnp.argmax(flags), -1).astype(jnp.int32)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    mesh: Mesh | None = None,
    donate: bool = True,
    jit: bool = True,
    nonfinite: str | None = None,
    grad_accum_steps: int = 1,
    precision: str | precision_lib.Policy | None = None,
    grad_norm: bool = True,
    ema_decay: float | None = None,
) -> CompiledStep:
    """Builds ``train_step(state, batch) -> (new_state, metrics)``.

    One call is one turn of the training cycle: forward pass and loss inside
    ``loss_fn``, gradients by ``jax.value_and_grad``, the update by
    ``optimizer.update`` and ``optax.apply_updates``.

    Args:
        loss_fn: pure ``loss_fn(params, batch)`` returning a float scalar, or
            ``(loss, aux)`` with ``aux`` a dict of scalar metrics. It may also accept
            keyword arguments ``rng`` (a typed key, fresh for every step:
            ``fold_in(state.rng, state.step)``) and ``model_state`` (mutable
            collections); the updated model state is returned as ``aux['model_state']``.
        optimizer: any optax ``GradientTransformation``.
        learning_rate_fn: the schedule, ``step -> learning rate``, reported as the
            ``learning_rate`` metric. Not needed for optimizers built with
            ``optax.inject_hyperparams``, whose rate is read from the state.
        mesh: a mesh with a ``data`` axis (`jaxtrain.data_mesh`), or ``data`` and
            ``fsdp`` axes (`jaxtrain.make_mesh`). The new state is kept replicated on
            it — or, with ``fsdp``, in the layout of `jaxtrain.parallel.state_shardings` (place
            the initial state with `jaxtrain.shard_state`; `fit` does) — and the
            metrics replicated; batches must be sharded by the caller
            (`jaxtrain.shard_batch`). None: wherever the inputs live.
        donate: donate the input state's buffers to the output (the caller must not
            reuse the old state). Halves the state's memory.
        jit: False returns the pure function un-compiled (for debugging and tests).
        nonfinite: guard against a non-finite loss or gradient, inside the compiled
            step (no host sync): ``"skip"`` leaves params, optimizer state and model
            state bitwise unchanged for that step and counts it in
            ``state.skipped_steps`` (also reported as the ``skipped_steps`` metric);
            ``"raise"`` does the same and makes `fit` raise ``FloatingPointError``
            at the next logging point, naming the step and the first non-finite
            leaf; None (default) applies every update as computed.
        grad_accum_steps: split each batch into this many microbatches, processed one
            after another inside the compiled step (``lax.scan``, one gradient-sized
            accumulator, a fresh key per microbatch, example-weighted means): the
            memory of a small batch, the update of the large one.
        precision: mixed precision, a `jaxtrain.Policy` or its name (``"float32"``,
            ``"bfloat16"``, ``"float16"``); None (default) runs ``loss_fn`` as given.
            The parameters (float32 in the state) and the batch's ``Policy.input_keys``
            are cast to the compute dtype inside the differentiated function, so the
            gradients, the optimizer state and the update stay float32; the loss and
            aux come back in float32. With dynamic loss scaling (float16) the state
            must come from ``TrainState.create(..., precision=policy)``; an overflowed
            step is skipped (bitwise-unchanged state, like ``nonfinite="skip"``), the
            scale halved, and neither counted in ``skipped_steps`` nor raised by
            ``nonfinite="raise"`` — expected overflows are how the scale is found. A
            non-finite loss, or an overflow at the minimum scale, is a genuine
            non-finite value and goes to the ``nonfinite`` guard.
        grad_norm: report the global L2 norm of the gradients as the ``grad_norm``
            metric (default). False saves its reduction over every gradient leaf, which
            is measurable only for tiny models whose step takes microseconds
            (BENCHMARKS.md).
        ema_decay: keep ``state.ema_params``, an exponential moving average of the
            parameters updated after each applied step, ``ema = decay * ema + (1 -
            decay) * new_params`` (`jaxtrain.ema`); the state must come from
            ``TrainState.create(..., ema=True)``. A step the non-finite guard or loss
            scaling skips leaves it bitwise unchanged. None (default): no average.

    Returns:
        A `CompiledStep`. ``metrics`` holds device scalars: ``loss``, ``grad_norm``
        (global L2 norm of the gradients; unless ``grad_norm=False``), ``learning_rate``
        when known, and the
        entries of ``aux``; with loss scaling also ``loss_scale`` (after the step) and
        ``loss_scale_overflows`` (steps skipped for overflow so far). Nothing in the
        step forces a host sync.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> def loss_fn(params, batch):
        ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
        >>> opt = optax.sgd(0.1)
        >>> state = TrainState.create({"w": jnp.zeros(3)}, opt, jax.random.key(0))
        >>> step = make_train_step(loss_fn, opt)
        >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.ones(4)}
        >>> state, metrics = step(state, batch)
        >>> int(state.step), round(float(metrics["loss"]), 3)
        (1, 1.0)
    """
    options = StepOptions(
        learning_rate_fn=learning_rate_fn,
        mesh=mesh,
        donate=donate,
        jit=jit,
        nonfinite=nonfinite,
        grad_accum_steps=grad_accum_steps,
        precision=precision,
        grad_norm=grad_norm,
        ema_decay=ema_decay,
    )
    return build_train_step(loss_fn, optimizer, options)


def make_train_steps(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    steps_per_call: int,
    unroll: int | bool | str = UNROLL_AUTO,
    **options: Any,
) -> CompiledStep:
    """Builds ``train_steps(state, batches[, active]) -> (new_state, metrics)``: K steps.

    The same step as `make_train_step`, run ``K`` times by ``jax.lax.scan`` inside one
    compiled call (never a Python-unrolled loop), so small steps stop paying Python
    dispatch each time. On CPU, K fused steps give bitwise the state of K single steps.

    Args:
        loss_fn: as in `make_train_step`.
        optimizer: as in `make_train_step`.
        steps_per_call: K, the number of steps one call runs. ``batches`` must have a
            leading axis of exactly K; a shorter group (an epoch or budget end) is
            padded to K and its padding marked inactive with ``active``.
        unroll: ``jax.lax.scan``'s ``unroll``. ``"auto"`` (default) is decided when the
            step is first traced and can be read back as ``spec.unroll``: True (all K
            steps as straight-line code) when the backend is CPU and the step contains
            a convolution — XLA's CPU backend runs convolution gradients inside a loop
            on a slow path (the built-in CNN measured 18-33x slower per step,
            jax#12868, BENCHMARKS.md) — else 1 (one compiled body and a loop). 1 or
            True (or an integer) force it; compile time grows with the unrolling.
        **options: any option of `make_train_step` (``learning_rate_fn``, ``mesh``,
            ``donate``, ``jit``, ``nonfinite``, ``grad_accum_steps``, ``precision``,
            ``grad_norm``, ``ema_decay``): the fields of `jaxtrain.step_options.StepOptions`.

    Returns:
        A `CompiledStep` whose ``spec`` has ``kind="fused"`` and ``steps_per_call=K``.
        Call it with ``batches`` whose entries are ``[K, B, ...]``, and optionally
        ``active``, a bool array ``[K]``: step ``i`` runs only where ``active[i]``
        (an inactive step leaves the state bitwise unchanged; its metrics are zeros,
        ``nonfinite`` -1 and the state's counters). ``metrics`` holds per-step values
        stacked ``[K]``. Passing ``active`` or not, the step compiles once.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax
        >>> opt = optax.sgd(0.1)
        >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
        >>> steps = make_train_steps(loss_fn, opt, steps_per_call=3)
        >>> state = TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> state, metrics = steps(state, {"x": jnp.ones((3, 4, 2))})  # [K, B, features]
        >>> int(state.step), metrics["loss"].shape, steps.spec.unroll  # no convolution
        (3, (3,), 1)
        >>> state, _ = steps(state, {"x": jnp.ones((3, 4, 2))}, np.array([True, False, False]))
        >>> int(state.step), steps.trace_count  # one more step ran; still one compilation
        (4, 1)
    """
    transform = transforms.Fused(steps_per_call)
    opts = step_options("make_train_steps", unroll=unroll, **options)
    return build_train_step(loss_fn, optimizer, opts, transform)


def build_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    options: StepOptions | None = None,
    transform: Any = None,
) -> CompiledStep:
    """A compiled train step: the pure step, a step transform around it, jit.

    The public builders are thin wrappers over it: `make_train_step` (the `Single`
    transform), `make_train_steps` (`Fused`), `make_device_epoch` (`ResidentEpoch`).

    Args:
        loss_fn: the user's loss, as in `make_train_step`.
        optimizer: an optax ``GradientTransformation``.
        options: the `StepOptions`; None: the defaults.
        transform: a step transform (`jaxtrain.transforms.Single`, `Fused`,
            `jaxtrain.resident.ResidentEpoch`); None: `Single`. An option the transform
            lists in its ``refuses`` and that is not at its default is an error.

    Returns:
        A `CompiledStep` with the transform's `StepSpec`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from jaxtrain.step_options import StepOptions
        >>> from jaxtrain.transforms import Fused
        >>> opts = StepOptions(nonfinite="skip")
        >>> steps = build_train_step(lambda p, b: jnp.sum(p), optax.sgd(0.1), opts, Fused(2))
        >>> steps.spec.kind, steps.spec.nonfinite
        ('fused', 'skip')
    """
    options = StepOptions() if options is None else options
    transform = transforms.Single() if transform is None else transform
    refused = options.changed(transform.refuses)
    if refused:
        given = ", ".join(f"{n}={getattr(options, n)!r}" for n in refused)
        raise ValueError(
            f"{transform.name} does not support {given}: the option has no meaning for "
            f"a {transform.spec(StepOptions()).kind!r} step. Fix: leave "
            f"{', '.join(refused)} at the default, or use a builder that supports it."
        )
    check_optimizer(optimizer)
    compiled = CompiledStep(None, None, transform.name, spec=transform.spec(options))
    one_step = build_step(loss_fn, optimizer, options, compiled.spec.nonfinite_names)
    fn = transform.apply(one_step, options, compiled._declare_unroll)

    def counted(*args):
        compiled._count_trace()  # runs at trace time only, never per jitted call
        return fn(*args)

    # The compiled program is named after it: "jit_train_step" in profiles and HLO dumps.
    counted.__name__ = counted.__qualname__ = transform.name

    return compile_step(compiled, counted, options)


def compile_step(compiled: CompiledStep, fn: Callable, options: StepOptions) -> CompiledStep:
    """Attaches ``fn`` and its jit (state donated, outputs replicated on the mesh).

    On a mesh with an ``fsdp`` axis the new state instead keeps the FSDP layout of
    `jaxtrain.parallel.state_shardings` (metrics stay replicated). The layout is pinned
    with ``with_sharding_constraint`` from the traced shapes, so it needs no state at
    build time and the step still compiles once: input and output layouts agree.

    Args:
        compiled: the `CompiledStep` to complete.
        fn: the pure function ``fn(state, ...) -> (new_state, metrics)``.
        options: its ``jit``, ``mesh`` and ``donate`` apply.

    Returns:
        ``compiled``, with ``fn``, ``jitted`` and ``mesh`` set.
    """
    compiled.fn = fn
    if not options.jit:
        compiled.jitted = fn
        return compiled
    mesh = compiled.mesh = options.mesh
    donate = (0,) if options.donate else ()
    out = _replicated(mesh)
    if mesh is not None and fsdp_size(mesh) > 1:

        def sharded(state, *args):
            new_state, metrics = fn(state, *args)
            new_state = jax.lax.with_sharding_constraint(
                new_state, state_shardings(new_state, mesh)
            )
            return new_state, jax.lax.with_sharding_constraint(metrics, out)

        sharded.__name__ = sharded.__qualname__ = getattr(fn, "__name__", "sharded")
        compiled.jitted = jax.jit(sharded, donate_argnums=donate)
        return compiled
    outs = None if out is None else (out, out)
    compiled.jitted = jax.jit(fn, donate_argnums=donate, out_shardings=outs)
    return compiled


def _check_opt_state(optimizer: optax.GradientTransformation, state: TrainState) -> None:
    """Trace-time check that ``state.opt_state`` was built for ``state.params``.

    Costs one abstract evaluation of ``optimizer.init`` per trace, nothing per step.
    """
    expected = jax.eval_shape(optimizer.init, state.params)
    exp_leaves = jax.tree_util.tree_leaves_with_path(expected)
    got_leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    fix = "Fix: rebuild the state with TrainState.create(params, optimizer, rng)."
    # ignore: jax's stubs name PyTreeDef from a module mypy cannot resolve; it has __eq__.
    if jax.tree.structure(expected) != jax.tree.structure(state.opt_state):  # type: ignore[operator]
        raise ValueError(
            "params do not match the optimizer state: opt_state has the structure "
            f"{jax.tree.structure(state.opt_state)} but optimizer.init(params) gives "
            f"{jax.tree.structure(expected)}. {fix}"
        )
    for (path, e), (_, g) in zip(exp_leaves, got_leaves, strict=True):
        if tuple(e.shape) != tuple(jnp.shape(g)) or e.dtype != jnp.result_type(g):
            raise ValueError(
                "params do not match the optimizer state at opt_state"
                f"{jax.tree_util.keystr(path)}: expected shape {tuple(e.shape)} dtype "
                f"{e.dtype} for these params, got shape {tuple(jnp.shape(g))} dtype "
                f"{jnp.result_type(g)}. {fix}"
            )


def _normalize_eval_fn(eval_fn: EvalFn, policy: precision_lib.Policy | None) -> Callable:
    """``eval_fn`` as ``f(params, batch, model_state) -> values``, run under ``policy``."""
    extra = _accepted_kwargs(eval_fn, (MODEL_STATE_KEY,))

    def wrapped(params, batch, model_state):
        kwargs = {MODEL_STATE_KEY: model_state} if MODEL_STATE_KEY in extra else {}
        if policy is not None:
            params, batch = policy.cast_to_compute(params), policy.cast_batch(batch)
        out = eval_fn(params, batch, **kwargs)
        if not isinstance(out, Mapping):
            what = f"an array of shape {out.shape}" if hasattr(out, "shape") else type(out).__name__
            raise TypeError(
                f"eval_fn must return a dict of per-example metric values; got {what}. "
                "Fix: return {'accuracy': correct} with values of shape [batch]."
            )
        return out if policy is None else policy.cast_to_output(dict(out))

    return wrapped


def make_eval_step(
    eval_fn: EvalFn,
    *,
    mesh: Mesh | None = None,
    jit: bool = True,
    precision: str | precision_lib.Policy | None = None,
) -> CompiledStep:
    """Builds ``eval_step(state, batch) -> sums``, mask-weighted and exact.

    Args:
        eval_fn: pure ``eval_fn(params, batch)`` (optionally with keyword
            ``model_state``) returning ``{name: values}`` with per-example values of
            shape ``[B]`` (or per-token ``[B, T]``). The step weights them by
            ``batch['mask']`` (when present) so padded examples never count.
        mesh: as in `make_train_step`.
        jit: False returns the pure function un-compiled.
        precision: as in `make_train_step`: the parameters and the batch's
            ``Policy.input_keys`` are cast to the compute dtype (e.g. ``"bfloat16"``)
            before ``eval_fn`` runs, and its values cast back to float32 before they
            are summed. None (default): ``eval_fn`` runs on the parameters as stored.

    Returns:
        A `CompiledStep` returning ``{name: (weighted_sum, weight)}`` device scalars;
        merge them over batches with `jaxtrain.metrics.merge` and read them once with
        `jaxtrain.metrics.compute` (see `jaxtrain.evaluate`). The last, padded batch has
        the same shape as the others, so the step compiles once.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from jaxtrain import metrics
        >>> def eval_fn(params, batch):  # per-example values [B]
        ...     return {"err": jnp.abs(batch["x"] @ params["w"] - batch["y"])}
        >>> state = TrainState.create({"w": jnp.ones(2)}, optax.sgd(0.1), jax.random.key(0))
        >>> eval_step = make_eval_step(eval_fn)
        >>> batch = {"x": jnp.ones((3, 2)), "y": jnp.array([0.0, 1.0, 9.0]),
        ...          "mask": jnp.array([1.0, 1.0, 0.0])}  # the third row is padding
        >>> metrics.compute(eval_step(state, batch))  # mean of |2 - 0| and |2 - 1|
        {'err': 1.5}
    """
    options = StepOptions(mesh=mesh, jit=jit, precision=precision)
    call = _normalize_eval_fn(eval_fn, options.policy)
    compiled = CompiledStep(None, None, "eval_step", spec=StepSpec("eval", 0))

    def eval_step(state: TrainState, batch: Batch) -> metrics_lib.Sums:
        compiled._count_trace()
        values = call(state.params, batch, state.model_state)
        return metrics_lib.sums_from_values(values, batch.get("mask"))

    compiled.fn = eval_step
    # Not compile_step: nothing is donated (the state lives on) and the state is not
    # moved onto the mesh (it is the training state, already placed).
    compiled.jitted = jax.jit(eval_step, out_shardings=_replicated(mesh)) if jit else eval_step
    # The step carries its mesh (fit checks it against the train step's before training);
    # "placed": __call__ never copies the state onto it.
    compiled.mesh, compiled._placed = mesh, True
    return compiled
