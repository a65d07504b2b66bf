"""Population training: N independent runs stacked along a leading member axis.

Lives here: `PopulationState` (the state of N runs: a `TrainState` whose every leaf has a
leading ``[N]`` axis, plus each member's loss hyperparameters, ``active`` mask, divergence
flag and seed), the creation helpers (`create`, `from_state`, `from_states`, `grid`,
`log_space`, `set_hyperparams`) and the way back to one run (`extract_member`,
`member_loss`, `member_hparams`, `set_active`). The vmapped steps live in
`jaxtrain.population_step`, what `fit` does with a population in
`jaxtrain.population_fit`. Must not live here: any step logic (the single-run step of
`jaxtrain.step` is reused as it is), the loop, the CLI, torch.

Per-member optimizer hyperparameters are the values ``optax.inject_hyperparams`` keeps in
the optimizer state: with the member axis they are simply ``[N]`` arrays, so one
compiled step trains members with different learning rates, weight decays, betas.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxtrain.state import TrainState, as_key_data, check_key_seed
from jaxtrain.types import PyTree

if TYPE_CHECKING:
    from jaxtrain.precision import Policy

__all__ = [
    "PopulationState",
    "create",
    "extract_member",
    "from_state",
    "from_states",
    "grid",
    "log_space",
    "member_hparams",
    "member_keys",
    "member_loss",
    "set_active",
    "set_hyperparams",
]

#: Keyword arguments the step passes to ``loss_fn`` itself: never a loss hyperparameter.
_LOSS_RESERVED = ("rng", "model_state")
_SEED_TOP = 2**32 - 1  # seeds are stored as uint32 in the state


@struct.dataclass
class PopulationState:
    """The state of N training runs trained together: arrays only, a pytree.

    Attributes:
        step: int32 scalar, population steps run (the loop's global step). A member's
            own update count is ``members.step[i]``: it stops when the member is frozen.
        members: a `TrainState` whose every leaf has a leading ``[N]`` member axis:
            ``params`` ``[N, ...]``, ``opt_state`` (with ``optax.inject_hyperparams``
            its ``hyperparams`` hold ``[N]`` per-member values), ``rng`` ``[N, 2]``,
            ``step`` and ``skipped_steps`` ``[N]``.
        loss_hparams: ``{name: float32 [N]}``, keyword arguments of the loss function
            (e.g. ``label_smoothing``) per member; an empty dict when there are none.
        active: bool ``[N]``; a False member is frozen: the step leaves it bitwise
            unchanged (early stopping, divergence, or `set_active`).
        diverged: bool ``[N]``, True where the non-finite guard froze the member.
        seeds: uint32 ``[N]``, each member's seed (reports; `member_keys`).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        >>> pop = create(lambda key: {"w": jnp.zeros(3)}, opt, seeds=[0, 1, 2],
        ...              hparams={"learning_rate": [0.1, 0.2, 0.3]})
        >>> pop.size, pop.params["w"].shape, pop.active.tolist()
        (3, (3, 3), [True, True, True])
    """

    step: jax.Array
    members: TrainState
    loss_hparams: dict = struct.field(default_factory=dict)
    active: jax.Array = struct.field(default_factory=lambda: jnp.zeros((0,), bool))
    diverged: jax.Array = struct.field(default_factory=lambda: jnp.zeros((0,), bool))
    seeds: jax.Array = struct.field(default_factory=lambda: jnp.zeros((0,), jnp.uint32))

    if TYPE_CHECKING:

        def replace(self, **changes: Any) -> PopulationState:
            """A copy with the fields in ``changes`` replaced."""
            ...

    @property
    def size(self) -> int:
        """N, the number of members."""
        return int(self.active.shape[0])

    @property
    def params(self) -> PyTree:
        """The members' parameters, ``[N, ...]`` leaves."""
        return self.members.params

    @property
    def opt_state(self) -> PyTree:
        """The members' optimizer states, ``[N, ...]`` leaves."""
        return self.members.opt_state

    @property
    def model_state(self) -> PyTree:
        """The members' model states, ``[N, ...]`` leaves."""
        return self.members.model_state

    @property
    def skipped_steps(self) -> jax.Array:
        """int32 ``[N]``: steps each member's non-finite guard skipped."""
        return self.members.skipped_steps

    @property
    def loss_scale(self) -> PyTree:
        """The members' loss-scale states (an empty dict without loss scaling)."""
        return self.members.loss_scale


def is_population(state: Any) -> bool:
    """Whether ``state`` is a `PopulationState`."""
    return isinstance(state, PopulationState)


def member_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """The two keys of member ``seed``: ``(init_key, rng)``, split from ``key(seed)``.

    `create` initialises member i with ``init_fn(init_key)`` and trains it with
    ``rng`` (the state's key). The single run that member i equals is
    ``TrainState.create(init_fn(init_key), optimizer, rng)`` with its hyperparameters.

    Args:
        seed: the member's seed, an int in ``[0, 2**32 - 1]``.

    Returns:
        ``(init_key, rng)``: a typed key for ``init_fn`` and raw uint32 key data ``(2,)``
        for the state.

    Example:
        >>> init_key, rng = member_keys(3)
        >>> rng.dtype, rng.shape
        (dtype('uint32'), (2,))
    """
    check_key_seed(seed, "population seed", top=_SEED_TOP)
    init_key, rng = jax.random.split(jax.random.key(int(seed)))
    return init_key, jax.random.key_data(rng)


def grid(**axes: Sequence[Any]) -> dict[str, list]:
    """Every combination of the given values: the cartesian product, first axis slowest.

    Args:
        **axes: ``name=[values]`` (e.g. ``seed=[0, 1]``, ``learning_rate=[...]``).

    Returns:
        ``{name: list of N values}``, N the product of the lengths; member ``i`` has
        ``{name: out[name][i]}``.

    Example:
        >>> grid(seed=[0, 1], learning_rate=[0.1, 0.01])
        {'seed': [0, 0, 1, 1], 'learning_rate': [0.1, 0.01, 0.1, 0.01]}
    """
    if not axes:
        raise ValueError("grid needs at least one axis, e.g. grid(seed=[0, 1, 2]).")
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(
                f"grid axis {name!r} must be a non-empty list of values; got {values!r}. "
                f"Fix: e.g. {name}=[0.1, 0.01]."
            )
    combos = list(itertools.product(*axes.values()))
    return {name: [c[j] for c in combos] for j, name in enumerate(axes)}


def log_space(low: float, high: float, n: int) -> list[float]:
    """``n`` log-spaced values from ``low`` to ``high`` (both included).

    Args:
        low: the first value (> 0).
        high: the last value (> 0).
        n: how many values (>= 1).

    Returns:
        A list of ``n`` floats (6 significant digits), e.g. learning rates for `grid`.

    Example:
        >>> log_space(1e-3, 1e-1, 3)
        [0.001, 0.01, 0.1]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"log_space needs n >= 1 values; got n={n!r}.")
    if not (low > 0 and high > 0 and math.isfinite(low) and math.isfinite(high)):
        raise ValueError(
            f"log_space needs finite positive bounds; got low={low!r}, high={high!r}. "
            "Fix: e.g. log_space(1e-4, 1e-2, 5)."
        )
    if n == 1:
        return [float(low)]
    return [float(f"{v:.6g}") for v in np.geomspace(low, high, n)]


def _hyperparam_nodes(opt_state: PyTree) -> list[Any]:
    """The ``optax.inject_hyperparams`` states in ``opt_state`` (their ``hyperparams``)."""
    found: list[Any] = []

    def visit(node: Any) -> bool:
        if isinstance(getattr(node, "hyperparams", None), Mapping):
            found.append(node)
            return True
        return False

    jax.tree_util.tree_leaves(opt_state, is_leaf=visit)
    return found


def _set_in_opt_state(opt_state: PyTree, values: Mapping[str, Any]) -> PyTree:
    """``opt_state`` with injected hyperparameters replaced (checked by name)."""
    nodes = _hyperparam_nodes(opt_state)
    if not nodes and values:
        raise ValueError(
            f"hparams {sorted(values)} need an optimizer built with optax.inject_hyperparams, "
            "whose state holds its hyperparameters; this optimizer's state has none. Fix: "
            "e.g. optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)."
        )
    available = sorted({k for n in nodes for k in n.hyperparams})
    for name in values:
        owners = [n for n in nodes if name in n.hyperparams]
        if not owners:
            raise ValueError(
                f"hparam {name!r} is not a hyperparameter of the optimizer; its injected "
                f"hyperparameters are {available}. Fix: use one of those names, or build the "
                f"optimizer with optax.inject_hyperparams(...)({name}=...)."
            )
        if len(owners) > 1:
            raise ValueError(
                f"hparam {name!r} is a hyperparameter of {len(owners)} inject_hyperparams "
                "transforms in this optimizer: which one to set is ambiguous. Fix: inject "
                f"{name!r} in only one of them."
            )
        schedules = getattr(owners[0], "hyperparams_states", None) or {}
        if name in schedules:
            raise ValueError(
                f"hparam {name!r} is given to the optimizer as a schedule: optax recomputes it "
                "at every step, so a per-member value would be overwritten. Fix: give it as "
                "a number, or make the per-member factor its own injected hyperparameter "
                "(e.g. optax.chain(..., optax.inject_hyperparams(optax.scale)(step_size=s)))."
            )

    def replace(node: Any) -> Any:
        if not (isinstance(getattr(node, "hyperparams", None), Mapping)):
            return node
        hp = dict(node.hyperparams)
        for name, v in values.items():
            if name in hp:
                old = jnp.asarray(hp[name])
                hp[name] = jnp.asarray(v, old.dtype).reshape(old.shape)
        return node._replace(hyperparams=hp)

    return jax.tree.map(
        replace, opt_state, is_leaf=lambda n: isinstance(getattr(n, "hyperparams", None), Mapping)
    )


def set_hyperparams(state: TrainState, **values: float) -> TrainState:
    """``state`` with the optimizer's injected hyperparameters set to ``values``.

    The single-run counterpart of a population's per-member ``hparams``: a run from
    ``set_hyperparams(TrainState.create(params, opt, rng), learning_rate=0.01)`` trains
    as ``TrainState.create`` with ``inject_hyperparams(...)(learning_rate=0.01)`` would.

    Args:
        state: a `TrainState` whose optimizer was built with ``optax.inject_hyperparams``.
        **values: ``name=number`` for hyperparameters the optimizer injects.

    Returns:
        A new `TrainState` (the other leaves shared with ``state``).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)
        >>> s = set_hyperparams(TrainState.create({"w": jnp.zeros(2)}, opt, 0), weight_decay=0.1)
        >>> round(float(s.opt_state.hyperparams["weight_decay"]), 3)
        0.1
    """
    return state.replace(opt_state=_set_in_opt_state(state.opt_state, values))


def _per_member(kind: str, values: Mapping[str, Any] | None, n: int) -> dict[str, list]:
    """``{name: scalar | N values}`` as ``{name: list of N floats}``, lengths checked."""
    out: dict[str, list] = {}
    for name, v in (values or {}).items():
        if not isinstance(name, str):
            raise TypeError(f"{kind} names must be strings; got {name!r}.")
        seq = list(np.asarray(v).reshape(-1)) if np.ndim(v) else [v] * n
        if len(seq) != n:
            raise ValueError(
                f"{kind}[{name!r}] has {len(seq)} values but the population has {n} members "
                f"(one per seed). Fix: give one value per member, or a single number for all; "
                "pop.grid(...) builds matching lists."
            )
        for x in seq:
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.number)):
                raise TypeError(
                    f"{kind}[{name!r}] values must be numbers; got {x!r}. Fix: pass floats."
                )
        out[name] = [float(x) for x in seq]
    return out


def _check_seeds(seeds: Any) -> list[int]:
    if isinstance(seeds, (int, np.integer)) or not isinstance(seeds, (Sequence, np.ndarray)):
        raise TypeError(
            f"seeds must be a list of ints, one per member; got {seeds!r}. Fix: e.g. "
            "seeds=list(range(8)) for 8 members."
        )
    seeds = [check_key_seed(s, "population seed", top=_SEED_TOP) for s in seeds]
    if not seeds:
        raise ValueError("a population needs at least one member: seeds is empty.")
    return seeds


def _check_loss_hparam_names(names: Sequence[str]) -> None:
    for name in names:
        if name in _LOSS_RESERVED:
            raise ValueError(
                f"loss_hparams cannot be named {name!r}: the step passes {name!r} to loss_fn "
                "itself. Fix: rename the loss's keyword argument."
            )


def from_states(
    states: Sequence[TrainState],
    *,
    seeds: Sequence[int],
    loss_hparams: Mapping[str, Any] | None = None,
) -> PopulationState:
    """A population of the given single-run states (stacked along a new member axis).

    Args:
        states: N `TrainState` s of the same structure, shapes and dtypes (e.g. built
            by `TrainState.create` and `set_hyperparams` per member).
        seeds: the N members' seeds (stored for reports; the states' rngs are kept).
        loss_hparams: ``{name: scalar | N numbers}``, keyword arguments of the loss.

    Returns:
        The `PopulationState`, all members active, on arrays of its own.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.sgd(0.1)
        >>> states = [TrainState.create({"w": jnp.full(2, float(i))}, opt, i) for i in range(3)]
        >>> from_states(states, seeds=[0, 1, 2]).params["w"][:, 0].tolist()
        [0.0, 1.0, 2.0]
    """
    seeds = _check_seeds(seeds)
    states = list(states)
    if len(states) != len(seeds):
        raise ValueError(
            f"from_states got {len(states)} states but {len(seeds)} seeds. Fix: one seed per state."
        )
    for i, s in enumerate(states):
        if not isinstance(s, TrainState):
            raise TypeError(f"states[{i}] is a {type(s).__name__}, not a jaxtrain.TrainState.")
    first = jax.tree.structure(states[0])
    shapes0 = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(states[0])]
    for i, s in enumerate(states[1:], start=1):
        shapes = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(s)]
        if jax.tree.structure(s) != first or shapes != shapes0:  # type: ignore[operator]
            raise ValueError(
                f"states[{i}] differs from states[0] in structure, shapes or dtypes: members of "
                "a population must share one model and one optimizer. Fix: build every state "
                "with the same init function and optimizer."
            )
    n = len(states)
    hp = _per_member("loss_hparams", loss_hparams, n)
    _check_loss_hparam_names(list(hp))
    members = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return PopulationState(
        step=jnp.zeros((), jnp.int32),
        members=members,
        loss_hparams={k: jnp.asarray(v, jnp.float32) for k, v in hp.items()},
        active=jnp.ones((n,), bool),
        diverged=jnp.zeros((n,), bool),
        seeds=jnp.asarray(np.asarray(seeds, np.uint32)),
    )


def create(
    init_fn: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    seeds: Sequence[int],
    *,
    hparams: Mapping[str, Any] | None = None,
    loss_hparams: Mapping[str, Any] | None = None,
    precision: str | Policy | None = None,
) -> PopulationState:
    """A population of ``len(seeds)`` runs, each initialised and seeded from its seed.

    Member ``i`` is exactly the single run ``set_hyperparams(TrainState.create(
    init_fn(init_key), optimizer, rng), **its hparams)`` with ``init_key, rng =
    member_keys(seeds[i])``, trained with ``member_loss(loss_fn, pop, i)``.

    Args:
        init_fn: ``init_fn(key) -> params`` or ``-> (params, model_state)``.
        optimizer: an optax ``GradientTransformation``; for per-member ``hparams`` built
            with ``optax.inject_hyperparams`` (e.g.
            ``optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)``).
        seeds: one int per member, in ``[0, 2**32 - 1]`` (repeat a seed to compare
            hyperparameters on the same initialisation).
        hparams: ``{name: number | N numbers}`` for the optimizer's injected
            hyperparameters (``learning_rate``, ``weight_decay``, ``b1``, ...).
        loss_hparams: ``{name: number | N numbers}``, keyword arguments of the loss
            function (e.g. ``label_smoothing``), passed to it per member.
        precision: as in `TrainState.create` (loss scaling's state per member).

    Returns:
        The `PopulationState`.

    Example:
        >>> import jax, optax
        >>> opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
        >>> init = lambda key: {"w": jax.random.normal(key, (4,))}
        >>> g = grid(seed=[0, 1], learning_rate=[1e-3, 1e-2])
        >>> pop = create(init, opt, g["seed"], hparams={"learning_rate": g["learning_rate"]})
        >>> pop.opt_state.hyperparams["learning_rate"].tolist()
        [0.0010000000474974513, 0.009999999776482582, 0.0010000000474974513, 0.009999999776482582]
    """
    seeds = _check_seeds(seeds)
    if not callable(init_fn):
        raise TypeError(f"init_fn must be a function key -> params; got {type(init_fn).__name__}.")
    n = len(seeds)
    hp = _per_member("hparams", hparams, n)
    states = []
    for i, seed in enumerate(seeds):
        init_key, rng = member_keys(seed)
        out = init_fn(init_key)
        params, model_state = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        state = TrainState.create(params, optimizer, rng, model_state, precision=precision)
        states.append(set_hyperparams(state, **{k: v[i] for k, v in hp.items()}))
    return from_states(states, seeds=seeds, loss_hparams=loss_hparams)


def from_state(
    state: TrainState,
    seeds: Sequence[int],
    *,
    hparams: Mapping[str, Any] | None = None,
    loss_hparams: Mapping[str, Any] | None = None,
) -> PopulationState:
    """N copies of one run's state, each with its own rng (``key(seeds[i])``) and hparams.

    The parameters, optimizer and model state are copied as they are (e.g. fine-tuning
    one pretrained model with N learning rates); only the step rng (dropout, noise)
    differs between seeds.

    Args:
        state: the `TrainState` to copy.
        seeds: one int per member; member i's ``rng`` is ``key_data(key(seeds[i]))``.
        hparams, loss_hparams: as in `create`.

    Returns:
        The `PopulationState`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        >>> one = TrainState.create({"w": jnp.ones(2)}, opt, 0)
        >>> pop = from_state(one, [5, 6], hparams={"learning_rate": [0.1, 0.5]})
        >>> pop.params["w"].tolist(), bool((pop.members.rng[0] != pop.members.rng[1]).any())
        ([[1.0, 1.0], [1.0, 1.0]], True)
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"from_state needs a jaxtrain.TrainState; got {type(state).__name__}.")
    seeds = _check_seeds(seeds)
    hp = _per_member("hparams", hparams, len(seeds))
    states = [
        set_hyperparams(state.replace(rng=as_key_data(seed)), **{k: v[i] for k, v in hp.items()})
        for i, seed in enumerate(seeds)
    ]
    return from_states(states, seeds=seeds, loss_hparams=loss_hparams)


def _check_index(pop: PopulationState, i: Any) -> int:
    if not isinstance(pop, PopulationState):
        raise TypeError(f"expected a PopulationState; got {type(pop).__name__}.")
    n = pop.size
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
        raise IndexError(
            f"member index {i!r} is out of range for a population of {n} members. "
            f"Fix: use 0..{n - 1}."
        )
    return int(i) % n


def extract_member(pop: PopulationState, i: int) -> TrainState:
    """Member ``i`` as an ordinary `TrainState`, on arrays of its own.

    Everything in jaxtrain that takes a `TrainState` takes it (`make_train_step`,
    `evaluate`, `Checkpointer`); its ``opt_state`` holds member i's injected
    hyperparameters. Its loss hyperparameters are not part of a `TrainState`: train
    it with `member_loss`.

    Args:
        pop: the population.
        i: the member's index (negative counts from the end).

    Returns:
        The `TrainState` of member ``i`` (its own ``step``, rng, optimizer state).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.sgd(0.1)
        >>> pop = create(lambda k: {"w": jnp.zeros(2)}, opt, seeds=[0, 1])
        >>> one = extract_member(pop, 1)
        >>> type(one).__name__, one.params["w"].shape, one.rng.shape
        ('TrainState', (2,), (2,))
    """
    i = _check_index(pop, i)
    return jax.tree.map(lambda x: jnp.array(x[i]), pop.members)


def member_loss(loss_fn: Callable, pop: PopulationState, i: int) -> Callable:
    """``loss_fn`` with member ``i``'s loss hyperparameters bound (``functools.partial``).

    Args:
        loss_fn: the population's loss function.
        pop: the population.
        i: the member's index.

    Returns:
        ``functools.partial(loss_fn, **member i's loss_hparams)`` (``loss_fn`` itself
        when there are none): the loss of member i's single run.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> def loss_fn(params, batch, scale=1.0):
        ...     return scale * jnp.sum(params["w"])
        >>> pop = create(lambda k: {"w": jnp.ones(2)}, optax.sgd(0.1), [0, 1],
        ...              loss_hparams={"scale": [1.0, 3.0]})
        >>> float(member_loss(loss_fn, pop, 1)({"w": jnp.ones(2)}, {}))
        6.0
    """
    i = _check_index(pop, i)
    values = {k: float(np.asarray(v)[i]) for k, v in pop.loss_hparams.items()}
    return functools.partial(loss_fn, **values) if values else loss_fn


def member_hparams(pop: PopulationState, varying_only: bool = True) -> list[dict[str, Any]]:
    """Each member's seed and hyperparameters (optimizer and loss), as Python numbers.

    Args:
        pop: the population.
        varying_only: keep only the hyperparameters that differ between members (the
            seed is always kept).

    Returns:
        One dict per member: ``{"seed": s, name: value, ...}``.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        >>> pop = create(lambda k: {"w": jnp.ones(2)}, opt, [0, 0],
        ...              hparams={"learning_rate": [0.5, 0.25]})
        >>> member_hparams(pop)
        [{'seed': 0, 'learning_rate': 0.5}, {'seed': 0, 'learning_rate': 0.25}]
    """
    table: dict[str, np.ndarray] = {}
    for node in _hyperparam_nodes(pop.opt_state):
        for name, v in node.hyperparams.items():
            a = np.asarray(jax.device_get(v))
            if a.ndim == 1 and np.issubdtype(a.dtype, np.number):
                table[name] = a
    for name, v in pop.loss_hparams.items():
        table[name] = np.asarray(jax.device_get(v))
    if varying_only:
        table = {k: a for k, a in table.items() if not np.all(a == a[0])}
    seeds = np.asarray(jax.device_get(pop.seeds))
    return [
        {"seed": int(seeds[i]), **{k: float(a[i]) for k, a in table.items()}}
        for i in range(pop.size)
    ]


def set_active(pop: PopulationState, active: Any) -> PopulationState:
    """``pop`` with a new ``active`` mask: False freezes a member, True resumes it.

    The mask keeps the shape, dtype and placement of the old one, so the compiled step
    runs it without recompiling.

    Args:
        pop: the population.
        active: N bools.

    Returns:
        The new `PopulationState` (other leaves shared).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> pop = create(lambda k: {"w": jnp.ones(2)}, optax.sgd(0.1), [0, 1, 2])
        >>> set_active(pop, [True, False, True]).active.tolist()
        [True, False, True]
    """
    mask = np.asarray(active)
    if mask.shape != (pop.size,) or mask.dtype != np.bool_:
        raise ValueError(
            f"active must be {pop.size} bools (one per member); got shape {mask.shape} dtype "
            f"{mask.dtype}. Fix: e.g. [True] * {pop.size}."
        )
    where = getattr(pop.active, "sharding", None)
    new = jax.device_put(mask, where) if where is not None else jnp.asarray(mask)
    return pop.replace(active=new)
