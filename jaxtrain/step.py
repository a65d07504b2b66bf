"""`make_train_step` and `make_eval_step`: the compiled heart of the training cycle.

forward pass -> loss -> gradients -> update is one pure function of ``(state, batch)``.
Gradients are a return value of ``jax.value_and_grad``: nothing accumulates between
steps, so there is nothing to clear (PyTorch's ``zero_grad``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain import metrics as metrics_lib
from jaxtrain import perf as perf_lib
from jaxtrain import precision as precision_lib
from jaxtrain.losses import INVALID_COUNT_KEYS
from jaxtrain.parallel import fsdp_size, state_shardings
from jaxtrain.state import TrainState, raise_if_donated

PyTree = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[..., Any]

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


class CompiledStep:
    """A step function plus what a careful user wants to know about its compilation.

    Calling it calls the jit-compiled function. ``trace_count`` counts how many times
    JAX traced the Python body: one per distinct input shape/dtype signature. A count
    above 1 in a loop over fixed-shape batches is a silent-recompilation bug.

    Attributes:
        fn: the pure, un-jitted step function (for ``jax.make_jaxpr``, ``vmap``, tests).
        jitted: the ``jax.jit`` object (``.lower(...)`` gives the compiled HLO and its
            memory/cost analysis).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> opt = optax.sgd(0.1)
        >>> step = make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
        >>> state = TrainState.create({"w": jnp.ones(3)}, opt, jax.random.key(0))
        >>> for _ in range(3):
        ...     state, metrics = step(state, {"x": jnp.ones((4, 3))})
        >>> step.trace_count  # three calls, one batch shape [4, 3]: one compilation
        1
    """

    def __init__(self, fn: Callable, jitted: Callable, name: str = "step"):
        self.fn = fn
        self.jitted = jitted
        self.name = name  # for messages: "train_step", "train_steps", "eval_step"
        self._traces = 0
        self._compile_seconds = 0.0
        # Set by make_train_step: the guard policy and, once traced, the names of the
        # values it checks ("loss", then each gradient leaf) for error messages.
        self.nonfinite_policy: str | None = None
        self.nonfinite_names: list[str] = []
        # K for steps built by make_train_steps (fit then feeds [K, B, ...] groups).
        self.steps_per_call: int | None = None
        # Set by fit only while it calls a fused step on a shorter last group of k < K
        # batches: the one leading size other than K that the step-axis check accepts.
        self._group_size: int | None = None
        # The mesh the compiled step keeps its state on (set by _finish), and whether a
        # state has been placed there yet.
        self.mesh: Mesh | None = None
        self._placed = False

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
        call, or in ``lower(...).compile()`` (e.g. `jaxtrain.step_flops`). 0.0 before
        the first compilation and with ``jit=False``.
        """
        return self._compile_seconds

    def _count_trace(self) -> None:
        self._traces += 1

    def lower(self, *args):
        """``jax.jit(...).lower`` for inspecting the compiled step."""
        return self.jitted.lower(*args)

    def __call__(self, *args):
        traces, seen = self._traces, perf_lib.COMPILE_CLOCK.count
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
    return jnp.asarray(found[0], jnp.float32) if found else None


def _replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def _accumulate(call_loss: Callable, state: TrainState, batch: Batch, rng: jax.Array, k: int):
    """Gradients of a batch as ``k`` microbatches, in a ``lax.scan`` with one accumulator.

    Each microbatch's loss is a mask-weighted mean; the batch's loss and gradient are the
    means of those weighted by each microbatch's count of real examples (or tokens), so
    padding never counts and the result equals one pass over the whole batch. Every
    microbatch gets its own key, ``fold_in(step_key, i)``; the model state (e.g.
    BatchNorm statistics) is threaded through the microbatches in order.
    """
    sizes = {key: jnp.shape(v)[0] for key, v in batch.items()}
    bad = {key: n for key, n in sizes.items() if n % k}
    if bad:
        raise ValueError(
            f"grad_accum_steps={k} must divide the batch size; got batch entries of sizes {bad}. "
            f"Fix: use a batch size that is a multiple of {k}."
        )
    m = next(iter(sizes.values())) // k

    def microbatch(i):
        # A slice of the batch in place: no [k, m, ...] copy of the whole batch.
        return {key: jax.lax.dynamic_slice_in_dim(v, i * m, m) for key, v in batch.items()}

    def weight(mb):
        if "mask" in mb:
            return jnp.sum(jnp.asarray(mb["mask"], jnp.float32))
        return jnp.float32(next(iter(mb.values())).shape[0])

    def body(carry, i):
        grad_sum, loss_sum, aux_sum, w_sum, model_state = carry
        mb = microbatch(i)
        w = weight(mb)

        def objective(params):
            return call_loss(params, mb, jax.random.fold_in(rng, i), model_state)

        (loss, (aux, new_ms)), g = jax.value_and_grad(objective, has_aux=True)(state.params)
        grad_sum = jax.tree.map(lambda a, b: a + w * b, grad_sum, g)
        aux_sum = {
            # Counts of invalid labels/mask values add up; a bad mask must not weight
            # its own count away.
            key: a + (1.0 if key in INVALID_COUNT_KEYS else w) * jnp.asarray(aux[key], jnp.float32)
            for key, a in aux_sum.items()
        }
        return (grad_sum, loss_sum + w * loss, aux_sum, w_sum + w, new_ms), None

    # Abstract shapes of one microbatch's aux, to start the accumulator at zero.
    first = microbatch(0)
    _, (aux_shape, _) = jax.eval_shape(
        lambda p: call_loss(p, first, rng, state.model_state), state.params
    )
    zeros_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape)
    init = (
        jax.tree.map(jnp.zeros_like, state.params),
        jnp.float32(0),
        zeros_aux,
        jnp.float32(0),
        state.model_state,
    )
    (grad_sum, loss_sum, aux_sum, w_sum, new_ms), _ = jax.lax.scan(body, init, jnp.arange(k))
    denom = jnp.maximum(w_sum, 1.0)  # an all-padding batch: zero gradient, not NaN
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, state.params)
    aux = {key: a if key in INVALID_COUNT_KEYS else a / denom for key, a in aux_sum.items()}
    return loss_sum / denom, aux, new_ms, grads


def _build_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    learning_rate_fn: Callable | None,
    nonfinite: str | None,
    holder: CompiledStep,
    count_traces: bool,
    grad_accum_steps: int = 1,
    precision: str | precision_lib.Policy | None = None,
    grad_norm: bool = True,
) -> Callable:
    """The pure one-step function shared by `make_train_step` and `make_train_steps`."""
    if not isinstance(grad_norm, bool):
        raise TypeError(f"grad_norm must be True or False; got {grad_norm!r}.")
    policy = precision_lib.get_policy(precision)
    if (
        isinstance(grad_accum_steps, bool)
        or not isinstance(grad_accum_steps, int)
        or grad_accum_steps < 1
    ):
        raise ValueError(f"grad_accum_steps must be an integer >= 1; got {grad_accum_steps!r}.")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)); "
            f"got {type(optimizer).__name__}."
        )
    if nonfinite not in (None, "skip", "raise"):
        raise ValueError(f"nonfinite must be 'skip', 'raise' or None; got {nonfinite!r}.")
    call_loss = _normalize_loss_fn(loss_fn)
    compiled = holder

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        if count_traces:
            compiled._count_trace()  # runs at trace time only, never per jitted call
        _check_opt_state(optimizer, state)
        rng = state.step_rng()
        step_loss, scale = call_loss, None
        if policy is not None:
            precision_lib.check_params(policy, state.params)
            precision_lib.check_loss_scale_state(policy, state.loss_scale)
            if policy.loss_scale is not None:
                scale = state.loss_scale.scale
            # Casts inside the differentiated function: gradients come back in float32.
            step_loss = precision_lib.wrap_loss(call_loss, policy, scale)
        if grad_accum_steps > 1:
            loss, aux, new_model_state, grads = _accumulate(
                step_loss, state, batch, rng, grad_accum_steps
            )
        else:

            def objective(params):
                return step_loss(params, batch, rng, state.model_state)

            (loss, (aux, new_model_state)), grads = jax.value_and_grad(objective, has_aux=True)(
                state.params
            )
        overflow, new_loss_scale = None, state.loss_scale
        if scale is not None:
            # Exact divisions: the scale is always a power of two.
            loss = loss / scale
            grads = jax.tree.map(lambda g: g / scale.astype(g.dtype), grads)
            overflow = ~jnp.all(
                jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
            )
            new_loss_scale = policy.loss_scale.update(state.loss_scale, ~overflow)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        metrics = {"loss": loss}
        if grad_norm:  # a reduction over every gradient leaf: ~10 small kernels on CPU
            metrics["grad_norm"] = optax.tree.norm(grads)
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        else:
            lr = _find_learning_rate(new_opt_state)
            if lr is not None:
                metrics["learning_rate"] = lr
        metrics.update({k: jnp.asarray(v) for k, v in aux.items()})
        skipped = state.skipped_steps
        # Loss scaling always skips an overflowed step (its gradients are garbage).
        skip = overflow
        if nonfinite is not None:
            named = jax.tree_util.tree_leaves_with_path(grads)
            named_updates = jax.tree_util.tree_leaves_with_path(updates)
            named_params = jax.tree_util.tree_leaves_with_path(new_params)
            if not compiled.nonfinite_names:
                compiled.nonfinite_names = (
                    ["loss"]
                    + ["grads" + jax.tree_util.keystr(p) for p, _ in named]
                    + ["updates" + jax.tree_util.keystr(p) for p, _ in named_updates]
                    + ["new params" + jax.tree_util.keystr(p) for p, _ in named_params]
                )
            grad_flags = [~jnp.all(jnp.isfinite(g)) for _, g in named]
            # The update and the new parameters too: finite gradients times a NaN
            # learning rate (a schedule gone wrong) would otherwise write NaN params.
            after_flags = [~jnp.all(jnp.isfinite(u)) for _, u in named_updates] + [
                ~jnp.all(jnp.isfinite(p)) for _, p in named_params
            ]
            if overflow is not None:
                # Under loss scaling a non-finite gradient is an expected overflow, handled
                # above (skip, halve the scale), not an error -- unless the scale is already
                # at its minimum, where halving cannot help: then it is genuine.
                at_min = state.loss_scale.scale <= policy.loss_scale.min_scale
                grad_flags = [f & at_min for f in grad_flags]
                # An overflowed step's update is garbage by construction and is dropped.
                after_flags = [f & (at_min | ~overflow) for f in after_flags]
            flags = jnp.stack([~jnp.isfinite(loss), *grad_flags, *after_flags])
            bad = jnp.any(flags)
            skip = bad if skip is None else skip | bad
            skipped = skipped + bad.astype(skipped.dtype)
            metrics["skipped_steps"] = skipped
            metrics["nonfinite"] = jnp.where(bad, jnp.argmax(flags), -1).astype(jnp.int32)
        if skip is not None:

            def keep_old(new, old):
                return jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)

            # A select, not a branch: bitwise the old values when skipped, no host sync.
            new_params = keep_old(new_params, state.params)
            new_opt_state = keep_old(new_opt_state, state.opt_state)
            new_model_state = keep_old(new_model_state, state.model_state)
        if scale is not None:
            metrics["loss_scale"] = new_loss_scale.scale
            metrics["loss_scale_overflows"] = new_loss_scale.overflows
        new_state = state.replace(
            loss_scale=new_loss_scale,
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            model_state=new_model_state,
            skipped_steps=skipped,
        )
        return new_state, metrics

    return train_step


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
            it — or, with ``fsdp``, in the layout of `jaxtrain.state_shardings` (place
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
    compiled = CompiledStep(None, None, "train_step")
    compiled.nonfinite_policy = nonfinite
    train_step = _build_step(
        loss_fn,
        optimizer,
        learning_rate_fn,
        nonfinite,
        compiled,
        True,
        grad_accum_steps,
        precision,
        grad_norm,
    )
    return _finish(compiled, train_step, jit=jit, mesh=mesh, donate=donate)


def make_train_steps(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    steps_per_call: int,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    mesh: Mesh | None = None,
    donate: bool = True,
    jit: bool = True,
    nonfinite: str | None = None,
    grad_accum_steps: int = 1,
    precision: str | precision_lib.Policy | None = None,
    grad_norm: bool = True,
    unroll: int | bool = 1,
) -> CompiledStep:
    """Builds ``train_steps(state, batches) -> (new_state, metrics)``: K steps, one call.

    The same step as `make_train_step`, run ``K`` times by ``jax.lax.scan`` inside one
    compiled call (never a Python-unrolled loop), so small steps stop paying Python
    dispatch each time. On CPU, K fused steps give bitwise the state of K single steps.

    Args:
        loss_fn, optimizer, learning_rate_fn, mesh, donate, jit, nonfinite,
            grad_accum_steps, precision, grad_norm: as in `make_train_step`.
        steps_per_call: K, the number of steps `fit` groups into one call (a shorter
            group at an epoch end or budget end compiles once more and is reused).
        unroll: ``jax.lax.scan``'s ``unroll``: 1 (default) compiles one step body and
            loops over it; True unrolls all K steps into straight-line code (compile
            time grows with K). Use True for convolutional models on CPU: XLA's CPU
            backend runs convolution gradients inside a loop on a slow path (the
            built-in CNN measured 18x slower per step than outside a loop,
            BENCHMARKS.md); unrolled they run at the single-step speed.

    Returns:
        A `CompiledStep` with ``steps_per_call`` set. ``batches`` is a dict whose
        entries have a leading step axis ``[k, B, ...]`` (``k <= K``); ``metrics``
        holds per-step values stacked ``[k]``.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> opt = optax.sgd(0.1)
        >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
        >>> steps = make_train_steps(loss_fn, opt, steps_per_call=3)
        >>> state = TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> state, metrics = steps(state, {"x": jnp.ones((3, 4, 2))})  # [K, B, features]
        >>> int(state.step), metrics["loss"].shape
        (3, (3,))
    """
    if (
        isinstance(steps_per_call, bool)
        or not isinstance(steps_per_call, int)
        or steps_per_call < 1
    ):
        raise ValueError(f"steps_per_call must be an integer >= 1; got {steps_per_call!r}.")
    compiled = CompiledStep(None, None, "train_steps")
    compiled.nonfinite_policy = nonfinite
    compiled.steps_per_call = steps_per_call
    one_step = _build_step(
        loss_fn,
        optimizer,
        learning_rate_fn,
        nonfinite,
        compiled,
        False,
        grad_accum_steps,
        precision,
        grad_norm,
    )
    _check_unroll(unroll)

    def train_steps(state: TrainState, batches: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        compiled._count_trace()
        _check_step_axis(batches, steps_per_call, compiled._group_size)
        return jax.lax.scan(one_step, state, batches, unroll=unroll)

    return _finish(compiled, train_steps, jit=jit, mesh=mesh, donate=donate)


def _check_step_axis(batches: Any, k: int, group_size: int | None) -> None:
    """Trace-time check that every batch entry has the leading ``[K]`` step axis.

    Without it a ``[B, ...]`` batch would scan over its examples: B one-example steps,
    silently. The leading size must be K; `fit` alone may pass a shorter last group
    (an epoch or step budget that does not divide by K), and says so through
    ``CompiledStep._group_size`` while it makes that call.
    """
    leaves = jax.tree_util.tree_leaves_with_path(batches)
    allowed = {k} if group_size is None else {k, group_size}
    fix = (
        f"Fix: stack {k} batches along a new first axis, e.g. "
        f"{{name: np.stack([b[name] for b in group]) for name in group[0]}} over a group of "
        f"{k} batches, or use make_train_step for one batch per call (fit does the stacking "
        "itself)."
    )
    for path, leaf in leaves:
        shape = tuple(jnp.shape(leaf))
        if not shape or shape[0] not in allowed:
            lead = f"leading size {shape[0]}" if shape else "no axes"
            raise ValueError(
                f"make_train_steps(steps_per_call={k}) runs {k} steps per call and needs "
                f"batches with a leading step axis [K={k}, B, ...]; got batches"
                f"{jax.tree_util.keystr(path)} of shape {shape} ({lead}), which is missing "
                f"the [K] axis (a [B, ...] batch would run B one-example steps). {fix}"
            )


def _check_unroll(unroll: Any) -> None:
    if not (isinstance(unroll, bool) or (isinstance(unroll, int) and unroll >= 1)):
        raise ValueError(
            f"unroll must be True, False or an integer >= 1 (steps per loop iteration); got "
            f"{unroll!r}. Fix: unroll=True for convolutional models on CPU, else leave it at 1."
        )


def _finish(
    compiled: CompiledStep, fn: Callable, *, jit: bool, mesh: Mesh | None, donate: bool
) -> CompiledStep:
    """Attaches ``fn`` and its jit (state donated, outputs replicated on ``mesh``).

    On a mesh with an ``fsdp`` axis the new state instead keeps the FSDP layout of
    `jaxtrain.parallel.state_shardings` (metrics stay replicated). The layout is pinned
    with ``with_sharding_constraint`` from the traced shapes, so it needs no state at
    build time and the step still compiles once: input and output layouts agree.
    """
    compiled.fn = fn
    if not jit:
        compiled.jitted = fn
        return compiled
    compiled.mesh = mesh
    out = _replicated(mesh)
    if mesh is not None and fsdp_size(mesh) > 1:

        def sharded(state, *args):
            new_state, metrics = fn(state, *args)
            new_state = jax.lax.with_sharding_constraint(
                new_state, state_shardings(new_state, mesh)
            )
            return new_state, jax.lax.with_sharding_constraint(metrics, out)

        compiled.jitted = jax.jit(sharded, donate_argnums=(0,) if donate else ())
        return compiled
    compiled.jitted = jax.jit(
        fn,
        donate_argnums=(0,) if donate else (),
        out_shardings=None if out is None else (out, out),
    )
    return compiled


def _check_opt_state(optimizer: optax.GradientTransformation, state: TrainState) -> None:
    """Trace-time check that ``state.opt_state`` was built for ``state.params``.

    Costs one abstract evaluation of ``optimizer.init`` per trace, nothing per step.
    """
    expected = jax.eval_shape(optimizer.init, state.params)
    exp_leaves = jax.tree_util.tree_leaves_with_path(expected)
    got_leaves = jax.tree_util.tree_leaves_with_path(state.opt_state)
    fix = "Fix: rebuild the state with TrainState.create(params, optimizer, rng)."
    if jax.tree.structure(expected) != jax.tree.structure(state.opt_state):
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


def _normalize_eval_fn(eval_fn: Callable) -> Callable:
    extra = _accepted_kwargs(eval_fn, (MODEL_STATE_KEY,))

    def wrapped(params, batch, model_state):
        kwargs = {MODEL_STATE_KEY: model_state} if MODEL_STATE_KEY in extra else {}
        out = eval_fn(params, batch, **kwargs)
        if not isinstance(out, Mapping):
            what = f"an array of shape {out.shape}" if hasattr(out, "shape") else type(out).__name__
            raise TypeError(
                f"eval_fn must return a dict of per-example metric values; got {what}. "
                "Fix: return {'accuracy': correct} with values of shape [batch]."
            )
        return out

    return wrapped


def make_eval_step(
    eval_fn: Callable[..., Mapping[str, jax.Array]],
    *,
    mesh: Mesh | None = None,
    jit: bool = True,
) -> CompiledStep:
    """Builds ``eval_step(state, batch) -> sums``, mask-weighted and exact.

    Args:
        eval_fn: pure ``eval_fn(params, batch)`` (optionally with keyword
            ``model_state``) returning ``{name: values}`` with per-example values of
            shape ``[B]`` (or per-token ``[B, T]``). The step weights them by
            ``batch['mask']`` (when present) so padded examples never count.
        mesh: as in `make_train_step`.
        jit: False returns the pure function un-compiled.

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
    call = _normalize_eval_fn(eval_fn)
    compiled: CompiledStep | None = None

    def eval_step(state: TrainState, batch: Batch) -> metrics_lib.Sums:
        if compiled is not None:
            compiled._count_trace()
        values = call(state.params, batch, state.model_state)
        return metrics_lib.sums_from_values(values, batch.get("mask"))

    if not jit:
        compiled = CompiledStep(eval_step, eval_step, "eval_step")
        return compiled
    compiled = CompiledStep(
        eval_step, jax.jit(eval_step, out_shardings=_replicated(mesh)), "eval_step"
    )
    return compiled
