"""The population steps: the single-run step of `jaxtrain.step`, vmapped over members.

Lives here: `make_population_step` (one step, or K fused steps, over a
`jaxtrain.population.PopulationState`) and `make_population_eval_step`. Each member runs
exactly the single-run step (`jaxtrain.step.build_step`: the same loss normalisation,
gradient transforms, non-finite guard, metrics), mapped by ``jax.vmap`` over the leading
member axis; the step adds only the member mask: a frozen member's state is selected
back bitwise. Must not live here: a second copy of the step logic, the loop, the CLI.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrain import metrics as metrics_lib
from jaxtrain import transforms
from jaxtrain.losses import INVALID_COUNT_KEYS
from jaxtrain.population import PopulationState
from jaxtrain.step import (
    CompiledStep,
    _normalize_eval_fn,
    _replicated,
    build_step,
    compile_step,
)
from jaxtrain.step_options import UNROLL_AUTO, StepOptions, StepSpec, check_optimizer, step_options
from jaxtrain.types import EvalFn, LossFn

__all__ = [
    "NONFINITE_POLICIES",
    "make_population_eval_step",
    "make_population_step",
    "member_shardings",
]

#: The population's non-finite policies: "freeze" (default) or "skip" (or None).
NONFINITE_POLICIES = ("freeze", "skip")
#: Float metrics that stay meaningful for a frozen member (its settings, not its step).
_NOT_MASKED = ("learning_rate", "loss_scale")
#: How the members' steps are combined: batched (``jax.vmap``) or in a loop (``lax.map``).
VECTORIZE = ("vmap", "map")
#: Metrics the population step adds: an aux metric of one of these names is an error.
POPULATION_METRICS = ("active", "diverged", "nonfinite_leaf")


def _check_population_nonfinite(nonfinite: Any) -> None:
    if nonfinite is not None and nonfinite not in NONFINITE_POLICIES:
        extra = (
            " 'raise' would stop every member for one diverged member; 'freeze' freezes "
            "that member and reports it (fit's records: diverged)."
            if nonfinite == "raise"
            else ""
        )
        raise ValueError(
            f"a population step's nonfinite must be 'freeze', 'skip' or None; got "
            f"{nonfinite!r}.{extra} Fix: nonfinite='freeze' (default) freezes a member at "
            "its last finite state, 'skip' skips its bad steps, None applies every update."
        )


def _accepts_keywords(fn: Callable, names: list[str]) -> list[str]:
    """Which of ``names`` ``fn`` does NOT accept as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    ok = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [n for n in names if n not in params or params[n].kind not in ok]


def _expand(mask: jax.Array, x: jax.Array) -> jax.Array:
    """``mask`` [N] shaped to broadcast against ``x`` [N, ...]."""
    return mask.reshape(mask.shape + (1,) * (jnp.ndim(x) - 1))


def _check_members(pop: Any, batch: Any, member_batches: bool) -> None:
    """Trace-time checks: a `PopulationState`, and per-member batches of N."""
    if not isinstance(pop, PopulationState):
        raise TypeError(
            f"a population step takes a jaxtrain.population.PopulationState; got "
            f"{type(pop).__name__}. Fix: build it with jaxtrain.population.create / from_state, "
            "or use make_train_step for a single TrainState."
        )
    if not member_batches:
        return
    n = pop.size
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        shape = tuple(jnp.shape(leaf))
        if not shape or shape[0] != n:
            raise ValueError(
                f"member_batches=True needs every batch entry with a leading member axis "
                f"[N={n}, B, ...]; got batch{jax.tree_util.keystr(path)} of shape {shape}. "
                f"Fix: stack one batch per member along a new first axis (N={n}), or use "
                "member_batches=False to share each batch."
            )


def _population_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    inner: StepOptions,
    names: list[str],
    nonfinite: str | None,
    member_batches: bool,
    vectorize: str,
) -> Callable:
    """The pure ``step(pop, batch) -> (new_pop, metrics)``: one step of every member."""

    def member_step(state, loss_hparams, batch):
        # The single-run step, built here so that the member's loss hyperparameters
        # (tracers of this vmap) are bound as keyword arguments of the loss.
        loss = functools.partial(loss_fn, **loss_hparams) if loss_hparams else loss_fn
        return build_step(loss, optimizer, inner, names)(state, batch)

    def step(pop: PopulationState, batch: Any):
        _check_members(pop, batch, member_batches)
        unknown = _accepts_keywords(loss_fn, list(pop.loss_hparams))
        if unknown:
            raise ValueError(
                f"loss_hparams {unknown} are not keyword arguments of loss_fn: each loss "
                f"hyperparameter is passed as loss_fn(params, batch, {unknown[0]}=value). "
                f"Fix: add the keyword (def loss_fn(params, batch, {unknown[0]}=0.0)) or "
                "remove it from loss_hparams."
            )
        if vectorize == "vmap":
            axes = (0, 0, 0 if member_batches else None)
            new, metrics = jax.vmap(member_step, in_axes=axes)(pop.members, pop.loss_hparams, batch)
        else:  # "map": one member after another, inside the one compiled call

            def one(xs):
                state, hp, b = xs if member_batches else (*xs, batch)
                return member_step(state, hp, b)

            xs = (pop.members, pop.loss_hparams) + ((batch,) if member_batches else ())
            new, metrics = jax.lax.map(one, xs)
        clash = [k for k in POPULATION_METRICS if k in metrics]
        if clash:
            raise ValueError(
                f"loss_fn's aux has the key {clash[0]!r}, a metric the population step "
                f"reports itself. Fix: rename it (e.g. 'my_{clash[0]}')."
            )
        before = pop.active
        keep, diverged = before, pop.diverged
        if nonfinite is not None:
            bad = metrics["nonfinite"] >= 0
            metrics["nonfinite_leaf"] = jnp.where(before, metrics.pop("nonfinite"), -1)
            if nonfinite == "freeze":
                # The member restarts from its state before this step, and stays frozen.
                keep = before & ~bad
                diverged = diverged | (before & bad)
        # A select, not a branch: a frozen member's leaves are bitwise the old ones.
        members = jax.tree.map(lambda n, o: jnp.where(_expand(keep, n), n, o), new, pop.members)
        out = {}
        for k, v in metrics.items():
            if jnp.issubdtype(v.dtype, jnp.floating) and k not in _NOT_MASKED:
                v = jnp.where(before, v, jnp.nan)  # a frozen member did not train
            out[k] = v
        if "skipped_steps" in out:  # a frozen member's count stays its own
            out["skipped_steps"] = members.skipped_steps
        out["active"], out["diverged"] = keep, diverged
        new_pop = pop.replace(step=pop.step + 1, members=members, active=keep, diverged=diverged)
        return new_pop, out

    return step


def make_population_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    steps_per_call: int | None = None,
    member_batches: bool = False,
    nonfinite: str | None = "freeze",
    vectorize: str = "vmap",
    shard_members: bool = False,
    unroll: int | bool | str = UNROLL_AUTO,
    **options: Any,
) -> CompiledStep:
    """Builds ``step(pop, batch) -> (new_pop, metrics)``: one step of N runs, one compile.

    The single-run step (`jaxtrain.make_train_step`'s, unchanged) is mapped over the
    population's leading member axis with ``jax.vmap``: each member has its own
    parameters, optimizer state, rng (``fold_in(member rng, member step)``), injected
    optimizer hyperparameters and loss hyperparameters. One compiled call trains all N.

    Args:
        loss_fn: as in `make_train_step`; each name of the population's
            ``loss_hparams`` is passed as a keyword argument (``loss_fn(params, batch,
            label_smoothing=...)``), a traced scalar per member.
        optimizer: the optax transformation the population was created with.
        steps_per_call: None: one step per call. K: K fused steps in a ``lax.scan``
            (`make_train_steps`): ``batches`` ``[K, B, ...]``, optional ``active [K]``.
        member_batches: False (default): every member sees the same batch. True: the
            batch's entries carry a member axis, ``[N, B, ...]`` (fused: ``[K, N, B,
            ...]``), member i training on ``batch[i]`` (different data orders).
        nonfinite: ``"freeze"`` (default): a member whose loss, gradients, updates or new
            parameters are not finite keeps its state from before that step and is
            frozen (``active`` False, ``diverged`` True); the others go on. ``"skip"``:
            as a single run's ``nonfinite="skip"``, per member. None: no guard.
        vectorize: ``"vmap"`` (default): the members' step batched by ``jax.vmap``
            (their matmuls become batched matmuls: the speed-up on accelerators).
            ``"map"``: ``jax.lax.map``, one member after another inside the one
            compiled call: each member runs the very computation of a single run
            (bitwise equal to it on CPU). Not a proven speed-up where vmap loses (wide
            layers on CPU): see docs/population.md for measurements.
        shard_members: with ``mesh``: split the members over the mesh's ``data`` axis
            (each device trains N / devices members; N must divide evenly) instead of
            replicating them on every device. The step keeps the state in that layout
            and places a state given in another (a new state, a restored checkpoint)
            there once, so it still compiles once.
        unroll: the scan unrolling of fused steps, as in `make_train_steps`.
        **options: ``learning_rate_fn``, ``mesh`` (data parallel: members replicated,
            batch sharded; no ``fsdp`` axis), ``donate``, ``jit``, ``grad_accum_steps``,
            ``precision``, ``grad_norm``, as in `make_train_step`.

    Returns:
        A `CompiledStep` (``spec.population`` True). ``metrics`` holds ``[N]`` arrays
        (fused: ``[K, N]``): ``loss``, ``grad_norm``, ``learning_rate``, the aux
        metrics (NaN for a member frozen before the step), ``skipped_steps``,
        ``active`` and ``diverged`` after the step, and with a guard
        ``nonfinite_leaf`` (-1, or an index into ``spec.nonfinite_names``).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from jaxtrain import population as pop
        >>> def loss_fn(params, batch):
        ...     return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
        >>> opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        >>> state = pop.create(lambda key: {"w": jnp.zeros(3)}, opt, seeds=[0, 1, 2],
        ...                    hparams={"learning_rate": [0.01, 0.1, 0.2]})
        >>> step = make_population_step(loss_fn, opt)
        >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.ones(4)}
        >>> for _ in range(3):
        ...     state, metrics = step(state, batch)
        >>> metrics["loss"].shape, step.trace_count  # one loss per member, one compile
        ((3,), 1)
    """
    _check_population_nonfinite(nonfinite)
    if vectorize not in VECTORIZE:
        raise ValueError(
            f"vectorize must be 'vmap' or 'map'; got {vectorize!r}. Fix: 'vmap' batches the "
            "members (fast on accelerators), 'map' runs them one after another in one call."
        )
    opts = step_options("make_population_step", unroll=unroll, **options)
    if opts.mesh is not None and "fsdp" in opts.mesh.axis_names:
        raise ValueError(
            "make_population_step runs data parallel (members replicated, batch sharded): "
            f"the mesh has axes {opts.mesh.axis_names}, with 'fsdp'. Fix: use "
            "jaxtrain.data_mesh() (or a mesh with only a 'data' axis)."
        )
    check_optimizer(optimizer)
    if shard_members and opts.mesh is None:
        raise ValueError(
            "shard_members=True splits the members over a mesh: pass mesh=jaxtrain.data_mesh()."
        )
    if not isinstance(member_batches, bool):
        raise TypeError(f"member_batches must be True or False; got {member_batches!r}.")
    transform: Any
    if steps_per_call is None:
        if unroll != UNROLL_AUTO:
            raise ValueError(
                f"unroll={unroll!r} applies to fused steps only. Fix: pass steps_per_call=K "
                "or leave unroll at 'auto'."
            )
        transform = transforms.Single("population_step")
    else:
        transform = transforms.Fused(steps_per_call, name="population_steps")
    spec = transform.spec(opts)
    spec = StepSpec(
        spec.kind,
        spec.steps_per_call,
        None,
        nonfinite,
        unroll=spec.unroll,
        population=True,
        member_batches=member_batches,
    )
    compiled = (
        MemberShardedStep(None, None, transform.name, spec=spec)
        if shard_members
        else CompiledStep(None, None, transform.name, spec=spec)
    )
    # The inner (per-member) step: the single-run step with the guard on when the
    # population guards (its "nonfinite" index tells which members went bad).
    inner = StepOptions(
        learning_rate_fn=opts.learning_rate_fn,
        nonfinite=None if nonfinite is None else "skip",
        grad_accum_steps=opts.grad_accum_steps,
        precision=opts.precision,
        grad_norm=opts.grad_norm,
        ema_decay=opts.ema_decay,
    )
    names = compiled.spec.nonfinite_names
    one = _population_step(loss_fn, optimizer, inner, names, nonfinite, member_batches, vectorize)
    fn = transform.apply(one, opts, compiled._declare_unroll)

    def counted(*args):
        compiled._count_trace()  # trace time only
        return fn(*args)

    if not shard_members:
        return compile_step(compiled, counted, opts)
    mesh = opts.mesh
    assert mesh is not None  # checked above

    def sharded(pop, *args):
        new_pop, metrics = counted(pop, *args)
        new_pop = jax.lax.with_sharding_constraint(new_pop, member_shardings(new_pop, mesh))
        return new_pop, jax.lax.with_sharding_constraint(metrics, _replicated(mesh))

    compiled.fn, compiled.mesh = counted, mesh
    compiled.jitted = jax.jit(sharded, donate_argnums=(0,) if opts.donate else ())
    return compiled


def member_shardings(pop: PopulationState, mesh: Any) -> Any:
    """The layout of ``shard_members``: leaves with the member axis split over ``data``.

    Args:
        pop: the population (arrays or abstract values).
        mesh: a mesh with a ``data`` axis.

    Returns:
        A pytree of ``NamedSharding`` like ``pop``: ``P("data")`` for every leaf with a
        leading ``[N]`` axis, replicated for the rest (the population step).

    Example:
        >>> import jax, jax.numpy as jnp, optax, jaxtrain as jt
        >>> from jaxtrain import population as pop
        >>> state = pop.create(lambda k: {"w": jnp.ones(2)}, optax.sgd(0.1), [0, 1])
        >>> layout = member_shardings(state, jt.data_mesh(jax.devices()[:1]))
        >>> P = jax.sharding.PartitionSpec
        >>> layout.params["w"].spec == P("data"), layout.step.spec == P()
        (True, True)
    """
    n = pop.size
    devices = mesh.shape["data"]
    if n % devices:
        raise ValueError(
            f"shard_members splits {n} members over the mesh's {devices} 'data' devices, "
            f"which needs N divisible by {devices}. Fix: use a multiple of {devices} members, "
            "or shard_members=False (members replicated)."
        )
    split, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())

    def place(x: Any) -> NamedSharding:
        shape = jnp.shape(x)
        return split if shape and shape[0] == n else whole

    return jax.tree.map(place, pop)


class MemberShardedStep(CompiledStep):
    """A population step whose members are split over the mesh (``shard_members=True``).

    Before a call it places a state that is not in the members' layout (a host check of
    one leaf's sharding, no device work); the step's own output already is.
    """

    def __call__(self, *args: Any) -> Any:
        if args and isinstance(args[0], PopulationState) and self.mesh is not None:
            pop = args[0]
            want = member_shardings(pop, self.mesh)
            leaf = jax.tree.leaves(pop.members.params)[0]
            if getattr(leaf, "sharding", None) != jax.tree.leaves(want.members.params)[0]:
                pop = jax.device_put(jax.tree.map(jnp.copy, pop), want)
            self._placed = True  # CompiledStep would replicate it
            args = (pop, *args[1:])
        return super().__call__(*args)


def make_population_eval_step(
    eval_fn: EvalFn,
    *,
    mesh: Any = None,
    jit: bool = True,
    precision: Any = None,
) -> CompiledStep:
    """Builds ``eval_step(pop, batch) -> sums`` with ``[N]`` sums: every member evaluated.

    `make_eval_step`'s evaluation, vmapped over the members (the batch is shared).
    `jaxtrain.evaluate` with it returns ``{name: [N floats]}``.

    Args:
        eval_fn, mesh, jit, precision: as in `make_eval_step`.

    Returns:
        A `CompiledStep` (``spec.population`` True) returning ``{name: (sums [N],
        weights [N])}``.

    Example:
        >>> import jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> from jaxtrain import population as pop
        >>> state = pop.create(lambda k: {"w": jnp.ones(2)}, optax.sgd(0.1), [0, 1])
        >>> eval_step = make_population_eval_step(lambda p, b: {"out": b["x"] @ p["w"]})
        >>> data = jt.ArrayDataset({"x": np.ones((3, 2), np.float32)}, 2, shuffle=False)
        >>> jt.evaluate(eval_step, state, data)
        {'out': [2.0, 2.0]}
    """
    options = StepOptions(mesh=mesh, jit=jit, precision=precision)
    call = _normalize_eval_fn(eval_fn, options.policy)
    compiled = CompiledStep(
        None, None, "population_eval_step", StepSpec("eval", 0, population=True)
    )

    def one(params, model_state, batch):
        values = call(params, batch, model_state)
        return metrics_lib.sums_from_values(values, batch.get("mask"))

    def eval_step(pop: PopulationState, batch: Mapping[str, Any]):
        compiled._count_trace()
        _check_members(pop, batch, False)
        return jax.vmap(one, in_axes=(0, 0, None))(pop.params, pop.model_state, batch)

    compiled.fn = eval_step
    compiled.jitted = jax.jit(eval_step, out_shardings=_replicated(mesh)) if jit else eval_step
    return compiled


def compute_members(sums: Mapping[str, Any]) -> dict[str, list]:
    """A population's eval sums ``{name: (total [N], weight [N])}`` as ``{name: [N means]}``.

    One host read. NaN where a member's weight is 0; the invalid-label counts of the
    built-in eval functions raise as in `jaxtrain.metrics.compute`.

    Example:
        >>> import jax.numpy as jnp
        >>> compute_members({"acc": (jnp.array([3.0, 1.0]), jnp.array([4.0, 4.0]))})
        {'acc': [0.75, 0.25]}
    """
    import numpy as np

    host = jax.device_get(dict(sums))
    # The count checks of the single-run path, on the members' total counts.
    counts = {k: (np.sum(t), np.sum(w)) for k, (t, w) in host.items() if k in INVALID_COUNT_KEYS}
    metrics_lib.compute(counts)
    out = {}
    for name, (t, w) in host.items():
        if name in INVALID_COUNT_KEYS:
            continue
        # Per member as `metrics.compute` divides one run's sums: the same float.
        t, w = np.asarray(t), np.asarray(w)
        out[name] = [float(a / b) if b > 0 else float("nan") for a, b in zip(t, w, strict=True)]
    return out
