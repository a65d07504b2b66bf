"""Data parallelism and parameter sharding (FSDP) on a ``("data", "fsdp")`` device mesh.

With the batch split over devices and the parameters replicated, ``jax.jit`` partitions
the step itself (SPMD): each device computes the loss of its shard and the gradient
mean becomes an all-reduce that XLA inserts. No pmap, no hand-written collectives.
On one device the mesh has one entry and the placement is a no-op copy.

A mesh with an ``fsdp`` axis (`make_mesh`) also splits the *state*: each large parameter
and its optimizer moments are cut along one dimension over the ``fsdp`` devices
(`state_shardings` states the rule), so every device holds about ``1/fsdp`` of them.
The batch is split over both axes; XLA all-gathers each parameter where the forward
and backward passes need it and reduce-scatters the gradients — still one ``jax.jit``.

Across several processes (`jaxtrain.distributed.initialize`), the mesh spans every
process's devices and each process supplies only its own rows of a global batch
(`shard_batch` assembles them with ``jax.make_array_from_process_local_data``).

What must not live here: multi-process start-up (`jaxtrain.distributed`) and the loop's
feeding (`jaxtrain.feed`). It never imports the loop, the applications (`jaxtrain.apps`,
`jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain.types import PyTree

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Leaves with fewer elements than this stay replicated under FSDP: biases, norms, step
# counters, keys. Splitting them saves almost no memory and costs one collective each.
FSDP_MIN_ELEMENTS = 2**12

# `jax.make_mesh(shape, names, axis_types=..., devices=...)` (jax >= 0.4.36) lays devices
# out by their physical topology (rings on TPU torii). Older jax: the plain reshape below.
_AXIS_TYPE = getattr(jax.sharding, "AxisType", None)
_MAKE_MESH_PARAMS = inspect.signature(jax.make_mesh).parameters if hasattr(jax, "make_mesh") else {}
_TOPOLOGY_MESH = _AXIS_TYPE is not None and {"devices", "axis_types"} <= set(_MAKE_MESH_PARAMS)


def _processes_contiguous(devices: np.ndarray) -> bool:
    """Whether each process's devices form one contiguous run of the flattened mesh."""
    runs = [p for p, _ in itertools.groupby(d.process_index for d in devices.flat)]
    return len(runs) == len(set(runs))


def _build_mesh(devices: list[jax.Device], shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    """A mesh of ``shape`` over ``devices``, laid out by ``jax.make_mesh`` where it can.

    The axes are ``Auto`` (what ``Mesh(...)`` gives): newer ``jax.make_mesh`` defaults to
    ``Explicit`` sharding, which would change how ``jit`` propagates shardings in every
    step. The given device order (``Mesh(np.array(devices).reshape(shape))``) is used on
    jax without ``make_mesh(devices=...)``, when ``jax.make_mesh`` cannot map the shape on
    the topology (a multi-slice or non-contiguous device set), and when its layout would
    give a process non-neighbouring devices (`process_rows` needs contiguous rows).
    """
    if _TOPOLOGY_MESH and _AXIS_TYPE is not None:  # the second: for the type checker
        try:
            mesh = jax.make_mesh(
                shape, names, axis_types=(_AXIS_TYPE.Auto,) * len(shape), devices=devices
            )
        except (ValueError, AssertionError, NotImplementedError):
            mesh = None  # a topology jax.make_mesh cannot map: keep the given order
        if mesh is not None and _processes_contiguous(mesh.devices):
            return mesh
    return Mesh(np.array(devices).reshape(shape), names)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices).

    Args:
        devices: the devices to use, e.g. ``jax.devices()[:1]`` for a single-device run.

    Returns:
        ``jax.sharding.Mesh`` of shape ``(len(devices),)``.

    Example:
        >>> mesh = data_mesh(jax.devices()[:1])
        >>> dict(mesh.shape)
        {'data': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device; got an empty list.")
    return _build_mesh(devices, (len(devices),), (DATA_AXIS,))


def make_mesh(
    data: int | None = None, fsdp: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A 2-D mesh with axes ``("data", "fsdp")``: batch split over both, state over ``fsdp``.

    Devices are laid out by ``jax.make_mesh``, which knows the topology (on TPUs the
    physical torus, on GPUs device ids, on CPUs the given order), ``fsdp`` the
    fastest-varying axis, so an ``fsdp`` group is made of neighbouring devices (on one
    machine when ``fsdp`` is at most its device count). Each process's devices stay
    contiguous; where ``jax.make_mesh`` cannot give that (or this jax has no
    ``make_mesh(devices=...)``) the devices keep their given order, process by process.

    Args:
        data: the size of the ``data`` axis; default ``len(devices) // fsdp``.
        fsdp: the size of the ``fsdp`` axis (1: plain data parallelism).
        devices: the devices (default: all devices of all processes).

    Returns:
        ``jax.sharding.Mesh`` of shape ``(data, fsdp)``.

    Raises:
        ValueError: when ``data * fsdp`` is not the number of devices.

    Example:
        >>> mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
        >>> dict(mesh.shape)
        {'data': 1, 'fsdp': 1}
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, v in (("fsdp", fsdp), ("data", data)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"make_mesh: {name} must be an integer >= 1; got {v!r}.")
    if data is None:
        if n % fsdp:
            raise ValueError(
                f"make_mesh: fsdp={fsdp} does not divide the {n} devices. "
                f"Fix: choose fsdp among the divisors of {n}."
            )
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(
            f"make_mesh: data * fsdp must equal the number of devices; got data={data}, "
            f"fsdp={fsdp} ({data * fsdp}) for {n} devices. Fix: e.g. data={n // fsdp}, "
            f"fsdp={fsdp}."
        )
    return _build_mesh(devices, (data, fsdp), (DATA_AXIS, FSDP_AXIS))


def fsdp_size(mesh: Mesh) -> int:
    """The size of the mesh's ``fsdp`` axis (1 when it has none).

    Args:
        mesh: a mesh from `make_mesh` or `data_mesh`.

    Returns:
        The number of devices on the ``fsdp`` axis.

    Example:
        >>> fsdp_size(data_mesh(jax.devices()[:1]))
        1
    """
    return int(dict(mesh.shape).get(FSDP_AXIS, 1))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch's leading dimension is split over (``data``, then ``fsdp``).

    Args:
        mesh: a mesh with a ``data`` axis (and optionally ``fsdp``).

    Returns:
        The axis names, e.g. ``("data", "fsdp")``.

    Example:
        >>> batch_axes(make_mesh(fsdp=1, devices=jax.devices()[:1]))
        ('data', 'fsdp')
    """
    axes = tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)
    if not axes:
        raise ValueError(
            f"the mesh needs a '{DATA_AXIS}' axis (and optionally '{FSDP_AXIS}'); got axes "
            f"{mesh.axis_names}. Fix: build it with jaxtrain.data_mesh() or jaxtrain.make_mesh()."
        )
    return axes


def _batch_spec(mesh: Mesh, leading: int = 0) -> PartitionSpec:
    axes = batch_axes(mesh)
    split = axes[0] if len(axes) == 1 else axes
    return PartitionSpec(*([None] * leading), split)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: leading (example) dimension split over the batch axes.

    Args:
        mesh: the mesh.

    Returns:
        A ``NamedSharding`` for arrays ``[B, ...]``.

    Example:
        >>> batch_sharding(data_mesh(jax.devices()[:1])).spec == PartitionSpec("data")
        True
    """
    return NamedSharding(mesh, _batch_spec(mesh))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of K stacked batches ``[K, B, ...]`` (`make_train_steps`).

    Args:
        mesh: the mesh.

    Returns:
        A ``NamedSharding`` that keeps ``K`` whole and splits ``B``.

    Example:
        >>> spec = stacked_batch_sharding(data_mesh(jax.devices()[:1])).spec
        >>> spec == PartitionSpec(None, "data")
        True
    """
    return NamedSharding(mesh, _batch_spec(mesh, leading=1))


def _batch_devices(mesh: Mesh) -> int:
    return math.prod(dict(mesh.shape)[a] for a in batch_axes(mesh))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises a clear error when the batch does not split evenly over the devices.

    Args:
        batch_size: the global batch size ``B``.
        mesh: the mesh whose batch axes split ``B``.

    Returns:
        None; raises ``ValueError`` (naming both numbers and a fix) when the device
        count does not divide ``B``.

    Example:
        >>> check_batch_size(64, data_mesh(jax.devices()[:1]))  # 1 device divides anything
    """
    n = _batch_devices(mesh)
    axes = batch_axes(mesh)
    where = f"the '{axes[0]}' axis" if len(axes) == 1 else "the 'data' x 'fsdp' axes"
    if batch_size % n:
        raise ValueError(
            f"batch size must be divisible by the number of devices on {where}: "
            f"got batch size {batch_size} and {n} devices. "
            f"Fix: use a batch size that is a multiple of {n} (e.g. {max(n, batch_size // n * n)})."
        )


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of each global batch that this process supplies (all of them in one process).

    Derived from where the batch sharding puts the rows, so it holds for any device
    order; with ``make_mesh``/``data_mesh`` over ``jax.devices()``, process ``p`` of ``P``
    gets the ``p``-th contiguous block of ``global_batch_size / P`` rows.

    Args:
        mesh: the mesh the batches go to.
        global_batch_size: rows of the global batch (divisible by the batch devices).

    Returns:
        A ``slice`` of the batch's leading dimension.

    Example:
        >>> process_rows(data_mesh(jax.devices()[:1]), 64)
        slice(0, 64, None)
    """
    check_batch_size(global_batch_size, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    spans = sorted(
        {
            (s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
            for s in index_map.values()
            if s is not None  # every device of a NamedSharding has an index
        }
    )
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise ValueError(
            "this process's devices hold non-contiguous rows of the batch "
            f"({spans}); build the mesh with jaxtrain.make_mesh or data_mesh so that each "
            "process's devices are neighbours."
        )
    return slice(start, stop)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on ``mesh``, split along its leading dimension.

    In one process ``batch`` is the whole batch. With several processes it is this
    process's rows (`process_rows`) and the global batch, ``P`` times as long, is
    assembled with ``jax.make_array_from_process_local_data`` without copying rows
    between machines.

    Args:
        batch: dict of arrays with a common leading dimension ``B`` (this process's part).
        mesh: the mesh; the global batch size must be divisible by its batch devices.

    Returns:
        The batch as (global) device arrays sharded over the batch axes.

    Example:
        >>> b = shard_batch({"x": np.zeros((4, 3), np.float32)}, data_mesh(jax.devices()[:1]))
        >>> b["x"].shape
        (4, 3)
    """
    return _put_batch(batch, mesh, stacked=False)


def shard_stacked_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places K stacked host batches ``[K, B, ...]`` on ``mesh`` (`make_train_steps` input).

    As `shard_batch`, with the leading step axis ``K`` kept whole on every device and
    ``B`` split over the batch axes (`stacked_batch_sharding`).

    Args:
        batch: dict of arrays ``[K, B, ...]`` (``B``: this process's rows).
        mesh: the mesh; the global batch size must be divisible by its batch devices.

    Returns:
        The stacked batches as (global) device arrays.

    Example:
        >>> b = shard_stacked_batch({"x": np.zeros((3, 4, 2))}, data_mesh(jax.devices()[:1]))
        >>> b["x"].shape, b["x"].sharding.spec == PartitionSpec(None, "data")
        ((3, 4, 2), True)
    """
    return _put_batch(batch, mesh, stacked=True)


def _put_batch(batch: Mapping[str, Any], mesh: Mesh, *, stacked: bool) -> dict[str, jax.Array]:
    dim = 1 if stacked else 0
    sizes = {k: np.shape(v)[dim] if np.ndim(v) > dim else None for k, v in batch.items()}
    if any(s is None for s in sizes.values()) or len(set(sizes.values())) > 1:
        raise ValueError(
            f"every batch entry needs the same leading (batch) dimension; got {sizes}."
        )
    sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
    procs = jax.process_count()
    check_batch_size(next(iter(sizes.values())) * procs, mesh)
    if procs == 1:
        return jax.device_put(dict(batch), sharding)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def _leaf_spec(shape: tuple[int, ...], n: int, min_elements: int) -> PartitionSpec:
    """The FSDP rule for one leaf: split its largest dimension divisible by ``n``."""
    if n <= 1 or math.prod(shape) < min_elements:
        return PartitionSpec()
    candidates = [(d, i) for i, d in enumerate(shape) if d % n == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates, key=lambda c: (c[0], -c[1]))  # largest; first on a tie
    spec: list[Any] = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return PartitionSpec(*spec)


def state_shardings(tree: PyTree, mesh: Mesh, *, min_elements: int = FSDP_MIN_ELEMENTS) -> PyTree:
    """The FSDP placement rule: a ``NamedSharding`` for every leaf of ``tree``.

    The rule, for a mesh whose ``fsdp`` axis has ``n > 1`` devices: a leaf with at
    least ``min_elements`` elements is split along its largest dimension divisible by
    ``n`` (the first such on a tie); every other leaf — small ones (biases, norms),
    scalars (``step``, counts), the RNG key data, and leaves with no divisible
    dimension — is replicated. Without an ``fsdp`` axis (or ``n == 1``) everything is
    replicated, which is plain data parallelism. Only shapes are read, so ``tree`` may
    hold ``jax.ShapeDtypeStruct`` leaves.

    Args:
        tree: a pytree of arrays, e.g. a `TrainState`.
        mesh: the mesh (from `make_mesh` or `data_mesh`).
        min_elements: the size below which a leaf is always replicated (default
            ``FSDP_MIN_ELEMENTS`` = 4096 elements, 16 KiB in float32).

    Returns:
        A pytree of ``NamedSharding`` with the structure of ``tree``.

    Example:
        >>> mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
        >>> state_shardings({"w": np.zeros((64, 8))}, mesh)["w"].spec == PartitionSpec()
        True
    """
    n = fsdp_size(mesh)
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _leaf_spec(tuple(np.shape(x)), n, min_elements)), tree
    )


def init_sharded(
    create: Callable[[], PyTree], mesh: Mesh, *, min_elements: int = FSDP_MIN_ELEMENTS
) -> PyTree:
    """Creates a state directly in its `state_shardings` layout: never whole anywhere.

    ``create`` is traced once for its shapes (``jax.eval_shape``, no computation), then
    compiled with ``out_shardings`` set to the FSDP rule, so XLA computes each device's
    shards of the initial parameters and optimizer moments on that device: no device
    and no host holds an unsharded copy (`shard_state` of an eagerly created state
    needs the whole state on one device first). In a multi-process run every process
    calls it and gets its part of the same global state. The values equal (bitwise, on
    the same backend) those of ``create()`` run eagerly and then placed.

    Args:
        create: a function of no arguments returning the state, e.g.
            ``lambda: TrainState.create(model.init(key, x)[0], optimizer, seed)``; it
            runs under ``jax.jit`` (no side effects, no host reads of its values).
            Arrays it closes over (e.g. pre-trained weights in numpy) are compiled
            into the program as whole constants: place those with `shard_state` or
            restore them (`jaxtrain.checkpoint.Checkpointer.restore` with ``mesh=``).
        mesh: the mesh (`make_mesh`; on a mesh without an ``fsdp`` axis the state is
            replicated).
        min_elements: as in `state_shardings`.

    Returns:
        The state, each leaf with its `state_shardings` sharding.

    Example:
        >>> import jax.numpy as jnp
        >>> mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
        >>> state = init_sharded(lambda: {"w": jnp.ones((64, 8))}, mesh)
        >>> state["w"].sharding == state_shardings(state, mesh)["w"]
        True
    """
    if not callable(create):
        raise TypeError(
            f"init_sharded needs a function of no arguments that creates the state; got "
            f"{type(create).__name__}. Fix: pass e.g. lambda: TrainState.create(...)."
        )
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"init_sharded needs a jax.sharding.Mesh; got {type(mesh).__name__}. Fix: "
            "pass make_mesh(...) (or the step's mesh)."
        )
    abstract = jax.eval_shape(create)
    shardings = state_shardings(abstract, mesh, min_elements=min_elements)
    return jax.jit(create, out_shardings=shardings)()


def shard_state(
    tree: PyTree, mesh: Mesh, *, copy: bool = True, min_elements: int = FSDP_MIN_ELEMENTS
) -> PyTree:
    """Places ``tree`` on ``mesh`` by the FSDP rule of `state_shardings`.

    On a mesh without an ``fsdp`` axis this is `replicate`.

    Args:
        tree: a pytree of arrays (e.g. a `TrainState`).
        mesh: the mesh.
        copy: always make new buffers (default; see `replicate`).
        min_elements: as in `state_shardings`.

    Returns:
        The placed pytree.

    Example:
        >>> mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
        >>> placed = shard_state({"w": np.ones((64, 8), np.float32)}, mesh)
        >>> placed["w"].sharding.is_fully_replicated
        True
    """
    return _place(tree, state_shardings(tree, mesh, min_elements=min_elements), copy)


def replicate(tree: PyTree, mesh: Mesh, copy: bool = True) -> PyTree:
    """Places every leaf of ``tree`` fully replicated on ``mesh``.

    Args:
        tree: a pytree of arrays.
        mesh: the mesh.
        copy: always make new buffers, even where the leaves already live there, so
            that donating the result (a train step does) never deletes the caller's
            arrays (default). False may reuse a leaf's buffer where it already lives
            (no copy): only for arrays nothing else refers to.

    Returns:
        The placed pytree.

    Example:
        >>> placed = replicate({"w": np.ones(3, np.float32)}, data_mesh(jax.devices()[:1]))
        >>> placed["w"].sharding.is_fully_replicated
        True
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    return _place(tree, jax.tree.map(lambda _: sharding, tree), copy)


def _place(tree: Any, shardings: Any, copy: bool) -> Any:
    if jax.process_count() > 1:
        # Every process holds the same host values (same seed, same init); each
        # contributes the pieces its own devices need.
        return jax.tree.map(_put_global, tree, shardings)
    if copy:
        # A private copy first: device_put(..., may_alias=False) still reuses the source
        # buffer for the shard on the source's device (jax 0.10), and donating the result
        # would then delete the caller's array.
        tree = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)
    return jax.device_put(tree, shardings)


def _with_trailing(sharding: NamedSharding, key: jax.Array) -> NamedSharding:
    """``sharding`` for a key's data, which has trailing (unsplit) dimensions."""
    extra = jax.random.key_data(key).ndim - key.ndim
    spec = (*sharding.spec, *([None] * (key.ndim - len(sharding.spec) + extra)))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from this process's full local value of ``x`` (equal in every process).

    Each local device gets only its shard, sliced where ``x`` is: a device array is
    sliced on its device (no host copy of the whole leaf), a host array on the host.
    """
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # already global: a resharding inside JAX
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed key: via its data
            impl = jax.random.key_impl(x)
            data = _put_global(jax.random.key_data(x), _with_trailing(sharding, x))
            return jax.random.wrap_key_data(data, impl=impl)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
