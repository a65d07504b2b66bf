"""The population steps: the single-run step of `jaxtrain.step`, vmapped over members.

Lives here: `make_population_step` (one step, or K fused steps, over a
`jaxtrain.population.PopulationState`) and `make_population_eval_step`. Each member runs
exactly the single-run step (`jaxtrain.step.build_step`: the same loss normalisation,
gradient transforms, non-finite guard, metrics), mapped by ``jax.vmap`` over the leading
member axis; the step adds only the member mask: a frozen member's state is selected
back bitwise. Must not live here: a second copy of the step logic, the loop, the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
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

_log = logging.getLogger("jaxtrain")

__all__ = [
    "NONFINITE_POLICIES",
    "PopulationLoopStep",
    "make_population_eval_step",
    "make_population_step",
    "member_shardings",
]

#: The population's non-finite policies: "freeze" (default) or "skip" (or None).
NONFINITE_POLICIES = ("freeze", "skip")
#: Float metrics that stay meaningful for a frozen member (its settings, not its step).
_NOT_MASKED = ("learning_rate", "loss_scale")
#: How the members' steps are combined: batched (``jax.vmap``), in a loop inside the call
#: (``lax.map``), one call per member from the host (``"loop"``), or chosen (``"auto"``).
VECTORIZE = ("vmap", "map", "loop", "auto")
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


def _check_vectorize(vectorize: Any, shard_members: bool) -> None:
    """Build-time check of ``vectorize`` (and that ``"loop"`` is not asked to shard)."""
    if vectorize not in VECTORIZE:
        raise ValueError(
            f"vectorize must be one of {VECTORIZE}; got {vectorize!r}. Fix: 'auto' (loop "
            "for a convolutional model on CPU, else vmap), 'vmap' batches the members (fast "
            "on accelerators), 'loop' calls one compiled member step per member, 'map' "
            "runs them one after another inside one call."
        )
    if shard_members and vectorize == "loop":
        raise ValueError(
            "vectorize='loop' trains one member per call on the whole mesh; it cannot "
            "split the members over devices (shard_members=True). Fix: vectorize='vmap' "
            "with shard_members=True, or shard_members=False with 'loop'."
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
        elif vectorize == "loop":
            # A population of one member (sliced out by `_looped`): the member's very
            # single-run program, no batching; [1] re-added for the shared code below.
            first = functools.partial(jax.tree.map, lambda x: x[0])
            b = first(batch) if member_batches else batch
            new, metrics = member_step(first(pop.members), first(pop.loss_hparams), b)
            new, metrics = jax.tree.map(lambda x: x[None], (new, metrics))
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


def _check_population_args(
    opts: StepOptions, optimizer: Any, shard_members: bool, member_batches: Any
) -> None:
    """`make_population_step`'s checks of the mesh, optimizer and member options."""
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


def _population_transform(steps_per_call: int | None, unroll: Any) -> Any:
    """One population step per call (`transforms.Single`) or K fused (`transforms.Fused`)."""
    if steps_per_call is None:
        if unroll != UNROLL_AUTO:
            raise ValueError(
                f"unroll={unroll!r} applies to fused steps only. Fix: pass steps_per_call=K "
                "or leave unroll at 'auto'."
            )
        return transforms.Single("population_step")
    return transforms.Fused(steps_per_call, name="population_steps")


def make_population_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    steps_per_call: int | None = None,
    member_batches: bool = False,
    nonfinite: str | None = "freeze",
    vectorize: str = "auto",
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
        vectorize: ``"auto"`` (default): ``"loop"`` when the step has a convolution
            and runs on CPU (decided from its jaxpr at the first call; read it back as
            ``spec.vectorize``), else ``"vmap"``. ``"vmap"``: the members' step batched
            by ``jax.vmap`` (their matmuls become batched matmuls: the speed-up on
            accelerators; on CPU a vmapped convolution is a slow grouped one).
            ``"loop"``: one compiled member step (member index traced: one compile)
            called per member from Python, each member written back in place into the
            donated state (`PopulationLoopStep`): each member runs the very computation
            of a single run (bitwise equal to it on CPU) at the speed of N separate
            runs; not with ``shard_members``. ``"map"``: ``jax.lax.map``, one member
            after another inside the one compiled call (bitwise too; slow for
            convolutions on CPU). Measurements: docs/population.md.
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
    _check_vectorize(vectorize, shard_members)
    opts = step_options("make_population_step", unroll=unroll, **options)
    _check_population_args(opts, optimizer, shard_members, member_batches)
    transform = _population_transform(steps_per_call, unroll)
    spec = transform.spec(opts)
    spec = StepSpec(
        spec.kind,
        spec.steps_per_call,
        None,
        nonfinite,
        unroll=spec.unroll,
        population=True,
        member_batches=member_batches,
        vectorize="vmap" if shard_members and vectorize == "auto" else vectorize,
    )
    compiled: CompiledStep
    if shard_members:
        compiled = MemberShardedStep(None, None, transform.name, spec=spec)
    elif vectorize in ("loop", "auto"):
        compiled = PopulationLoopStep(None, None, transform.name, spec=spec)
    else:
        compiled = CompiledStep(None, None, transform.name, spec=spec)
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

    def build(mode: str) -> Callable:
        one = _population_step(loss_fn, optimizer, inner, names, nonfinite, member_batches, mode)
        fn = transform.apply(one, opts, compiled._declare_unroll)
        if mode == "loop":
            fn = _looped(fn, member_batches, steps_per_call)

        def counted(*args):
            compiled._count_trace()  # trace time only
            return fn(*args)

        counted.uncounted = fn  # type: ignore[attr-defined]  # for abstract traces
        return counted

    if isinstance(compiled, PopulationLoopStep):
        if vectorize == "auto":
            compile_step(compiled, build("vmap"), opts)
            compiled._vmap = (compiled.fn, compiled.jitted)
        # The member's step reads the population (no donation); `_put_member` writes.
        compile_step(compiled, build("loop"), dataclasses.replace(opts, donate=False))
        compiled._loop = (compiled.fn, compiled.jitted)
        donate = (0,) if opts.donate else ()
        compiled._put = jax.jit(_put_member, donate_argnums=donate) if opts.jit else _put_member
        return compiled
    counted = build("vmap" if vectorize == "auto" else vectorize)
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


#: The `PopulationState` fields with a leading member axis (all but ``step``).
_FIELDS = ("members", "loss_hparams", "active", "diverged", "seeds")


def _looped(fn: Callable, member_batches: bool, steps_per_call: int | None) -> Callable:
    """``f(pop, batch[, active], i)``: ``fn`` (a step over a one-member population) on member i.

    Member ``i`` (a traced int32 scalar: one compile serves every member) is sliced out
    of every ``[N]`` leaf and stepped; f returns ``(member i's new state as a
    one-member population, its metrics [1] (fused [K, 1]))``. `_put_member` writes it
    back.
    """
    axis = 0 if steps_per_call is None else 1  # the member axis of a member batch

    def take(x: jax.Array, i: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(x, i, 1, axis=0)

    def f(pop: PopulationState, *args: Any):
        _check_members(pop, None, False)  # a TrainState: the message, not an unpacking error
        *rest, i = args
        batch = rest[0]
        if member_batches:
            if steps_per_call is not None:
                transforms.check_step_axis(batch, steps_per_call)
            # Checked on the full batch: a [B, ...] batch must not pass as member 0's.
            per_step = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[axis:], jnp.result_type(x)), batch
            )
            _check_members(pop, per_step, True)
            batch = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1, axis), batch)
        # Every field but the population's step counter carries the member axis.
        one = pop.replace(
            **{k: jax.tree.map(lambda x: take(x, i), getattr(pop, k)) for k in _FIELDS}
        )
        return fn(one, batch, *rest[1:])

    return f


def _put_member(pop: PopulationState, new: PopulationState, i: jax.Array) -> PopulationState:
    """``pop`` with member i replaced by ``new`` (a one-member population), in place.

    A call of its own, after the member's step: written in the step's call, XLA fuses
    e.g. Adam's moment update into both the moment's and the parameter's in-place
    writes, one reading the old moments after the other overwrote them, and then copies
    the whole ``[N]`` state twice per call to stay correct (measured: 0.82x of
    sequential at N = 16 on the CNN, from ~1x at N = 4). Alone, the writes alias the
    donated input: no copy.
    """
    put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=i, axis=0)
    whole = {k: jax.tree.map(put, getattr(pop, k), getattr(new, k)) for k in _FIELDS}
    # Every member's step advances the counter from the same value: the last one keeps it.
    step = jnp.where(i == pop.size - 1, new.step, pop.step)
    return pop.replace(step=step, **whole)


@functools.partial(jax.jit, static_argnums=1)
def _stack_members(metrics: list[dict], axis: int) -> dict:
    """The members' metrics ``[1]`` (fused ``[K, 1]``) joined into ``[N]`` (``[K, N]``)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis), *metrics)


class PopulationLoopStep(CompiledStep):
    """A population step that calls one compiled member step per member (``"loop"``).

    ``step(pop, batch[, active])`` calls the jitted ``f(pop, batch[, active], i)`` for
    ``i = 0 .. N-1`` (no host sync): each call runs member i's single-run program,
    bitwise its single run on CPU, and a second small call writes the member back into
    the donated population in place (2N dispatches); the members' metrics are then
    joined into ``[N]`` (fused ``[K, N]``) by one more call. With ``vectorize="auto"`` the first call
    chooses ``"loop"`` for a convolutional model on CPU (where a vmapped convolution
    becomes a slow grouped one) and ``"vmap"`` otherwise, and records it in
    ``spec.vectorize``. When looping, ``lower`` and ``complete_args`` give one member's
    call, so `jaxtrain.perf.step_flops` counts one member: multiply by N for the step.

    Built by `make_population_step`, not by hand; its constructor is `CompiledStep`'s.

    Attributes:
        spec: the step's `jaxtrain.StepSpec`; ``spec.vectorize`` is ``"auto"`` until the
            first call, then the mode chosen (``"loop"`` or ``"vmap"``).
        trace_count: compilations of the member step: 1 for all N members, since the
            member index is a traced ``int32`` argument.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from jaxtrain import population as pop
        >>> opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        >>> state = pop.create(lambda key: {"w": jnp.ones(2)}, opt, seeds=[0, 1, 2])
        >>> step = make_population_step(lambda p, b: jnp.sum(b["x"] @ p["w"]), opt,
        ...                             vectorize="loop")
        >>> state, metrics = step(state, {"x": jnp.ones((4, 2))})
        >>> isinstance(step, PopulationLoopStep), metrics["loss"].shape, step.trace_count
        (True, (3,), 1)
    """

    _vmap: tuple[Callable, Any] | None = None
    _loop: tuple[Callable, Any] | None = None
    _put: Callable = staticmethod(_put_member)
    _indices: tuple[jax.Array, ...] = ()

    def _resolve(self, args: tuple) -> bool:
        """Decides ``"auto"`` (once) from the arguments' shapes; True when looping."""
        if self.spec.vectorize == "auto":
            assert self._vmap is not None
            # The uncounted body: jax.jit would reuse a trace of the counted one, and
            # then count nothing when it compiles.
            fn = self._vmap[0].uncounted  # type: ignore[attr-defined]
            with self.uncounted():
                slow = transforms.convolution_on_cpu(
                    lambda: jax.make_jaxpr(fn)(*self._complete(args)), self.mesh
                )
            mode = "loop" if slow else "vmap"
            if slow:
                _log.info(
                    "jaxtrain: vectorize='auto' chose 'loop' (one compiled member step per "
                    "member): the model has convolutions and runs on CPU, where vmap turns "
                    "them into slow grouped convolutions. Pass vectorize='vmap' to keep it."
                )
            self.spec = dataclasses.replace(self.spec, vectorize=mode)
            chosen = self._loop if slow else self._vmap
            assert chosen is not None  # both built by make_population_step for "auto"
            self.fn, self.jitted = chosen
        return self.spec.vectorize == "loop"

    def _index(self, n: int) -> tuple[jax.Array, ...]:
        if len(self._indices) != n:  # made once: no host-to-device copy per call
            self._indices = tuple(jnp.asarray(i, jnp.int32) for i in range(n))
        return self._indices

    def complete_args(self, args: tuple) -> tuple:
        """The arguments of one member's call (member 0) when looping."""
        done = self._complete(args)
        return (*done, self._index(args[0].size)[0]) if self._resolve(args) else done

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower`` of the step; when looping, of one member's call."""
        return self.jitted.lower(*self.complete_args(args))

    def __call__(self, *args: Any) -> Any:
        if not args or not isinstance(args[0], PopulationState) or not self._resolve(args):
            return super().__call__(*args)
        pop, *rest = self._complete(args)
        if self.mesh is not None and not self._placed:
            # As CompiledStep places a first state (the member step does not return it).
            from jaxtrain.parallel import shard_state

            pop, self._placed = shard_state(pop, self.mesh, copy=True), True
        outs = []
        for i in self._index(pop.size):
            new, metrics = super().__call__(pop, *rest, i)
            pop = self._put(pop, new, i)
            outs.append(metrics)
        axis = 0 if self.spec.kind != "fused" else 1
        return pop, _stack_members(outs, axis)


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
