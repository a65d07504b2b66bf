"""Composable transforms around the pure train step, in the manner of optax's ``chain``.

Two kinds live here:

* Gradient transforms wrap a `GradFn` — ``grad_fn(call_loss, state, batch, rng) ->
  Grads`` — in another: `accumulate` (microbatches in a ``lax.scan``) and
  `mixed_precision` (casts and dynamic loss scaling). `chain` composes them and
  `gradient_fn` builds the chain a `StepOptions` asks for around `value_and_grad`.
* Step transforms turn the one-step function ``step(state, batch)`` into what one
  compiled call runs: `Single` (itself) and `Fused` (K steps in a ``lax.scan``, each
  optionally inactive); the device-resident epoch lives in `jaxtrain.resident`. Each
  declares the `StepSpec` it produces and the options it refuses, by name.

``unroll="auto"`` is decided here (`resolve_unroll`), when the step is first traced.

What must not live here: the step's update rule (`jaxtrain.step`), jit and donation
(`jaxtrain.step.compile_step`), the loop, the CLI, checkpoints, torch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtrain import precision as precision_lib
from jaxtrain.losses import INVALID_COUNT_KEYS
from jaxtrain.state import TrainState
from jaxtrain.step_options import (
    StepOptions,
    StepSpec,
    check_positive_int,
    check_unroll,
)
from jaxtrain.types import Batch, PyTree

_log = logging.getLogger("jaxtrain")

#: The primitive XLA:CPU runs slowly inside a loop (upstream jax#12868).
CONV_PRIMITIVE = "conv_general_dilated"


class Grads(NamedTuple):
    """What a `GradFn` returns for one batch.

    Attributes:
        loss: the scalar loss (unscaled).
        aux: the loss function's aux metrics.
        model_state: the model state after the batch.
        grads: the gradients, in the parameters' dtypes.
        overflow: under dynamic loss scaling, whether a gradient overflowed; else None.
        loss_scale: the loss-scale state after the batch (``state.loss_scale`` when
            there is no scaling).
    """

    loss: jax.Array
    aux: dict[str, jax.Array]
    model_state: PyTree
    grads: PyTree
    overflow: jax.Array | None
    loss_scale: PyTree


GradFn = Callable[[Callable, TrainState, Batch, jax.Array], Grads]
GradTransform = Callable[[GradFn], GradFn]


def value_and_grad(call_loss: Callable, state: TrainState, batch: Batch, rng: jax.Array) -> Grads:
    """The base `GradFn`: ``jax.value_and_grad`` of the loss at ``state.params``.

    Args:
        call_loss: the normalised loss, ``(params, batch, rng, model_state) -> (loss,
            (aux, model_state))``.
        state: the `jaxtrain.TrainState`.
        batch: one batch.
        rng: this step's key.

    Returns:
        The `Grads`.
    """

    def objective(params):
        return call_loss(params, batch, rng, state.model_state)

    (loss, (aux, ms)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    return Grads(loss, aux, ms, grads, None, state.loss_scale)


def chain(*transforms: GradTransform) -> GradTransform:
    """Composes gradient transforms: the first listed is the outermost.

    Args:
        *transforms: functions ``GradFn -> GradFn``.

    Returns:
        One function ``GradFn -> GradFn``.

    Example:
        >>> grad_fn = chain(mixed_precision(None), accumulate(1))(value_and_grad)
        >>> grad_fn is value_and_grad  # both are identities at these settings
        True
    """

    def apply(inner: GradFn) -> GradFn:
        for transform in reversed(transforms):
            inner = transform(inner)
        return inner

    return apply


def gradient_fn(options: StepOptions) -> GradFn:
    """The `GradFn` ``options`` asks for: precision around accumulation around the grad."""
    return chain(mixed_precision(options.policy), accumulate(options.grad_accum_steps))(
        value_and_grad
    )


def accumulate(k: int) -> GradTransform:
    """Gradients of a batch as ``k`` microbatches in a ``lax.scan`` with one accumulator.

    Each microbatch's loss is a mask-weighted mean; the batch's loss and gradient are the
    means of those weighted by each microbatch's count of real examples (or tokens), so
    padding never counts and the result equals one pass over the whole batch. Every
    microbatch gets its own key, ``fold_in(step_key, i)``; the model state (e.g.
    BatchNorm statistics) is threaded through the microbatches in order.

    Args:
        k: microbatches per batch; 1 is the identity.

    Returns:
        A gradient transform.
    """
    check_positive_int("grad_accum_steps", k)
    if k == 1:
        return lambda inner: inner

    def transform(inner: GradFn) -> GradFn:
        def grad_fn(call_loss, state, batch, rng):
            m = _microbatch_size(batch, k)

            def microbatch(i):
                # A slice of the batch in place: no [k, m, ...] copy of the whole batch.
                return {key: jax.lax.dynamic_slice_in_dim(v, i * m, m) for key, v in batch.items()}

            def body(carry, i):
                grad_sum, loss_sum, aux_sum, w_sum, ms = carry
                mb = microbatch(i)
                w = _weight(mb)
                g = inner(call_loss, state.replace(model_state=ms), mb, jax.random.fold_in(rng, i))
                grad_sum = jax.tree.map(lambda a, b: a + w * b, grad_sum, g.grads)
                aux_sum = {
                    # Counts of invalid labels/mask values add up; a bad mask must not
                    # weight its own count away.
                    key: a
                    + (1.0 if key in INVALID_COUNT_KEYS else w)
                    * jnp.asarray(g.aux[key], jnp.float32)
                    for key, a in aux_sum.items()
                }
                return (grad_sum, loss_sum + w * g.loss, aux_sum, w_sum + w, g.model_state), None

            # Abstract shapes of one microbatch's aux, to start the accumulator at zero.
            first = microbatch(0)
            _, (aux_shape, _) = jax.eval_shape(
                lambda p: call_loss(p, first, rng, state.model_state), state.params
            )
            zeros_aux = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shape)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.float32(0), zeros_aux, jnp.float32(0), state.model_state)
            out, _ = jax.lax.scan(body, init, jnp.arange(k))
            grad_sum, loss_sum, aux_sum, w_sum, new_ms = out
            denom = jnp.maximum(w_sum, 1.0)  # an all-padding batch: zero gradient, not NaN
            grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, state.params)
            aux = {key: a if key in INVALID_COUNT_KEYS else a / denom for key, a in aux_sum.items()}
            return Grads(loss_sum / denom, aux, new_ms, grads, None, state.loss_scale)

        return grad_fn

    return transform


def _microbatch_size(batch: Batch, k: int) -> int:
    sizes = {key: jnp.shape(v)[0] for key, v in batch.items()}
    bad = {key: n for key, n in sizes.items() if n % k}
    if bad:
        raise ValueError(
            f"grad_accum_steps={k} must divide the batch size; got batch entries of sizes {bad}. "
            f"Fix: use a batch size that is a multiple of {k}."
        )
    return next(iter(sizes.values())) // k


def _weight(mb: Batch) -> jax.Array:
    """A microbatch's weight: its count of real examples (tokens), from the mask."""
    if "mask" in mb:
        return jnp.sum(jnp.asarray(mb["mask"], jnp.float32))
    return jnp.float32(next(iter(mb.values())).shape[0])


def mixed_precision(policy: precision_lib.Policy | None) -> GradTransform:
    """Runs the loss under ``policy``; with loss scaling, unscales and flags overflow.

    The parameters and the batch's ``Policy.input_keys`` are cast to the compute dtype
    inside the differentiated function, so the gradients stay float32. With dynamic
    loss scaling the loss is multiplied by ``state.loss_scale.scale`` before the
    gradient and the gradients divided by it after (exact: a power of two); `Grads`
    then carries ``overflow`` and the updated scale.

    Args:
        policy: a `jaxtrain.Policy`, or None (the identity).

    Returns:
        A gradient transform.
    """
    if policy is None:
        return lambda inner: inner

    def transform(inner: GradFn) -> GradFn:
        def grad_fn(call_loss, state, batch, rng):
            precision_lib.check_params(policy, state.params)
            precision_lib.check_loss_scale_state(policy, state.loss_scale)
            scale = state.loss_scale.scale if policy.loss_scale is not None else None
            g = inner(precision_lib.wrap_loss(call_loss, policy, scale), state, batch, rng)
            if scale is None:
                return g
            grads = jax.tree.map(lambda x: x / scale.astype(x.dtype), g.grads)
            overflow = ~jnp.all(
                jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(grads)])
            )
            new_scale = policy.loss_scale.update(state.loss_scale, ~overflow)
            return g._replace(
                loss=g.loss / scale, grads=grads, overflow=overflow, loss_scale=new_scale
            )

        return grad_fn

    return transform


# ---------------------------------------------------------------------------------------
# Step transforms: what one compiled call runs.


def has_primitive(jaxpr: Any, name: str) -> bool:
    """Whether ``jaxpr`` (or any jaxpr nested in it: scan, cond, pjit, remat) uses ``name``.

    Args:
        jaxpr: a ``Jaxpr`` or ``ClosedJaxpr`` (e.g. from ``jax.make_jaxpr``).
        name: a primitive's name, e.g. ``"conv_general_dilated"``.

    Returns:
        True if an equation anywhere in it binds that primitive.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> has_primitive(jax.make_jaxpr(lambda x: jnp.sin(x) @ x)(jnp.ones((2, 2))), "sin")
        True
    """
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    return any(
        eqn.primitive.name == name or any(has_primitive(j, name) for j in _sub_jaxprs(eqn))
        for eqn in inner.eqns
    )


def _sub_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs in an equation's parameters (a scan's body, a cond's branches, ...)."""
    found = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns") or hasattr(v, "jaxpr"):
                found.append(v)
    return found


def convolution_on_cpu(jaxpr: Callable[[], Any], mesh: Mesh | None) -> bool:
    """Whether the step runs on CPU and contains a convolution.

    XLA:CPU runs convolutions (and their gradients) inside nested computations — a
    loop body, a conditional branch — on a slow path, measured 18-33x slower per step
    than in straight-line code (upstream jax#12868; BENCHMARKS.md). Such a step is
    unrolled by ``unroll="auto"`` and its inactive steps masked by a select.

    Args:
        jaxpr: gives the one-step function's jaxpr; called only on CPU (an abstract
            trace, nothing is compiled).
        mesh: the step's mesh (its devices' platform decides), or None (the default
            backend).

    Returns:
        True for a convolutional step on CPU.
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return platform == "cpu" and has_primitive(jaxpr(), CONV_PRIMITIVE)


def resolve_unroll(unroll: int | bool | str, slow_loop: bool) -> int | bool:
    """``unroll`` with ``"auto"`` decided: True when loops are slow for this step, else 1.

    Args:
        unroll: ``"auto"``, True/False or an integer >= 1 (returned as given).
        slow_loop: `convolution_on_cpu` of the step.

    Returns:
        ``unroll`` as ``jax.lax.scan`` takes it.
    """
    if not isinstance(unroll, str):
        return unroll
    check_unroll(unroll)  # "auto" is the only string it lets through
    if not slow_loop:
        return 1
    _log.info(
        "jaxtrain: unroll='auto' unrolls the scan (unroll=True): a convolutional model on "
        "CPU runs ~20x slower per step inside a loop (jax#12868). Pass unroll=1 to keep it."
    )
    return True


def abstract(tree: PyTree) -> PyTree:
    """``tree``'s arrays as ``jax.ShapeDtypeStruct`` (for abstract tracing)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


@dataclasses.dataclass(frozen=True)
class Single:
    """The identity step transform: one step per call (`jaxtrain.make_train_step`).

    Attributes:
        name: the step's name in messages.
        refuses: options it cannot honour (a single step has no loop to unroll).
    """

    name: str = "train_step"
    refuses: tuple[str, ...] = ("unroll",)

    def spec(self, options: StepOptions) -> StepSpec:
        """The `StepSpec` of a single step built with ``options``."""
        return StepSpec("step", 1, None, options.nonfinite)

    def apply(self, step: Callable, options: StepOptions, on_unroll: Callable) -> Callable:
        """``step`` itself."""
        return step


@dataclasses.dataclass(frozen=True)
class Fused:
    """K steps per call in a ``lax.scan`` (`jaxtrain.make_train_steps`).

    The function it builds is ``train_steps(state, batches, active)``: ``batches``
    has a leading ``[K]`` axis, ``active`` is a bool array ``[K]``; step ``i`` runs only
    where ``active[i]``: an inactive step leaves the state bitwise unchanged. It is a
    ``lax.cond`` (an inactive step costs nothing), except for a convolutional step on
    CPU, where a conditional branch is as slow as a loop body (jax#12868): there the
    step runs and a select keeps the old state. `CompiledStep` passes an all-True ``active`` when the
    caller gives none, so the step compiles once however it is called.

    Attributes:
        steps_per_call: K.
        name: the step's name in messages.
        refuses: options it cannot honour (none).
    """

    steps_per_call: int
    name: str = "train_steps"
    refuses: tuple[str, ...] = ()

    def __post_init__(self):
        check_positive_int("steps_per_call", self.steps_per_call)

    def spec(self, options: StepOptions) -> StepSpec:
        """The `StepSpec` of K fused steps built with ``options``."""
        return StepSpec(
            "fused", self.steps_per_call, None, options.nonfinite, unroll=options.unroll
        )

    def apply(self, step: Callable, options: StepOptions, on_unroll: Callable) -> Callable:
        """``train_steps(state, batches, active)`` over the one-step ``step``."""
        k = self.steps_per_call

        def train_steps(state, batches, active):
            check_step_axis(batches, k)
            first = abstract(jax.tree.map(lambda x: x[0], batches))
            # One abstract trace sizes the metrics of inactive steps (and decides "auto").
            jaxpr, (_, metric_shapes) = jax.make_jaxpr(step, return_shape=True)(
                abstract(state), first
            )
            slow = convolution_on_cpu(lambda: jaxpr, options.mesh)
            unroll = resolve_unroll(options.unroll, slow)
            on_unroll(unroll)
            masked = _masked_by_select if slow else _masked_by_cond
            body = masked(step, metric_shapes)
            return jax.lax.scan(body, state, (batches, active), unroll=unroll)

        return train_steps


def _masked_by_cond(step: Callable, metric_shapes: Mapping[str, Any]) -> Callable:
    """A scan body running ``step`` only where active: a ``lax.cond``, no work when not."""

    def skip(st, batch):
        return st, inactive_metrics(metric_shapes, st)

    def body(st, xs):
        batch, on = xs
        return jax.lax.cond(on, step, skip, st, batch)

    return body


def _masked_by_select(step: Callable, metric_shapes: Mapping[str, Any]) -> Callable:
    """A scan body running ``step`` and keeping its result only where active.

    For convolutional steps on CPU: there a ``lax.cond`` branch is a nested computation,
    as slow as a loop body (jax#12868), while a select costs one pass over the state.
    An inactive step's values are computed and dropped (a padding batch's NaN included:
    the select takes the old state bitwise).
    """

    def body(st, xs):
        batch, on = xs
        new, metrics = step(st, batch)
        new = jax.tree.map(lambda n, o: jnp.where(on, n, o), new, st)
        skipped = inactive_metrics(metric_shapes, st)
        metrics = {k: jnp.where(on, v, skipped[k]) for k, v in metrics.items()}
        return new, metrics

    return body


def inactive_metrics(shapes: Mapping[str, Any], state: Any) -> dict[str, jax.Array]:
    """The metrics of a step that did not run: zeros, the state's counters, no non-finite.

    Args:
        shapes: the metrics' shapes and dtypes (``jax.eval_shape`` of the step).
        state: the unchanged state.

    Returns:
        ``{name: value}``: 0 for per-step values, -1 for ``nonfinite`` (no leaf), and
        ``skipped_steps``, ``loss_scale``, ``loss_scale_overflows`` as in ``state``.
    """
    out = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    carried = {"nonfinite": -1, "skipped_steps": state.skipped_steps}
    if jax.tree.leaves(state.loss_scale):
        carried.update(
            loss_scale=state.loss_scale.scale, loss_scale_overflows=state.loss_scale.overflows
        )
    for key, value in carried.items():
        if key in out:
            out[key] = jnp.asarray(value, shapes[key].dtype)
    return out


def check_step_axis(batches: Any, k: int) -> None:
    """Trace-time check that every batch entry has the leading ``[K]`` step axis.

    Without it a ``[B, ...]`` batch would scan over its examples: B one-example steps,
    silently. The leading size must be exactly K: a shorter group is padded to K and the
    padding marked inactive (``active``), so the step compiles once.
    """
    fix = (
        f"Fix: stack {k} batches along a new first axis, e.g. "
        f"{{name: np.stack([b[name] for b in group]) for name in group[0]}} over a group of "
        f"{k} batches (pad a shorter group to {k} and pass active=[True]*n + [False]*({k}-n)), "
        "or use make_train_step for one batch per call (fit does the stacking itself)."
    )
    for path, leaf in jax.tree_util.tree_leaves_with_path(batches):
        shape = tuple(jnp.shape(leaf))
        if not shape or shape[0] != k:
            lead = f"leading size {shape[0]}" if shape else "no axes"
            raise ValueError(
                f"make_train_steps(steps_per_call={k}) runs {k} steps per call and needs "
                f"batches with a leading step axis [K={k}, B, ...]; got batches"
                f"{jax.tree_util.keystr(path)} of shape {shape} ({lead}), which is missing "
                f"the [K] axis (a [B, ...] batch would run B one-example steps). {fix}"
            )


def check_active(active: Any, k: int) -> Any:
    """Host-side check of a fused step's ``active`` argument: a bool array ``[K]``.

    Args:
        active: a ``jax.Array`` or anything ``np.asarray`` takes.
        k: K, the steps per call.

    Returns:
        ``active`` as an array (a ``jax.Array`` is returned as it is: no host sync).
    """
    if not isinstance(active, jax.Array):
        active = np.asarray(active)
    if tuple(active.shape) != (k,) or active.dtype != np.bool_:
        raise ValueError(
            f"active must be a bool array of shape [K={k}] (which of the {k} steps run); "
            f"got shape {tuple(active.shape)} dtype {active.dtype}. Fix: e.g. "
            f"np.arange({k}) < n for the first n steps of a group padded to {k}."
        )
    return active


def pad_steps(
    group: Sequence[Mapping[str, Any]], k: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Host-side: up to ``k`` batches stacked ``[k, B, ...]`` and their ``active`` mask.

    A group shorter than ``k`` (an epoch or step budget that does not divide by K) is
    padded with zero batches marked inactive, so a fused step runs it without compiling
    again: ``train_steps(state, *pad_steps(group, K))``.

    Args:
        group: 1 to ``k`` batches, dicts of equally shaped arrays.
        k: K, the fused step's steps per call.

    Returns:
        ``(stacked, active)``: numpy arrays, ``active[i]`` True for the real batches.

    Example:
        >>> import numpy as np
        >>> stacked, active = pad_steps([{"x": np.ones((2, 3))}], 4)
        >>> stacked["x"].shape, active.tolist()
        ((4, 2, 3), [True, False, False, False])
    """
    n = len(group)
    if not 1 <= n <= k:
        raise ValueError(f"pad_steps needs 1 to {k} batches; got {n}. Fix: split the group.")
    stacked = {}
    for name in group[0]:
        rows = np.stack([np.asarray(b[name]) for b in group])
        pad = np.zeros((k - n, *rows.shape[1:]), rows.dtype)
        stacked[name] = np.concatenate([rows, pad]) if n < k else rows
    return stacked, np.arange(k) < n
