"""Data parallelism over a ``data`` mesh axis: batches sharded, state replicated.

With the batch split over devices and the parameters replicated, ``jax.jit`` partitions
the step itself (SPMD): each device computes the loss of its shard and the gradient
mean becomes an all-reduce that XLA inserts. No pmap, no hand-written collectives.
On one device the mesh has one entry and the placement is a no-op copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices).

    Args:
        devices: the devices to use, e.g. ``jax.devices()[:1]`` for a single-device run.

    Returns:
        ``jax.sharding.Mesh`` of shape ``(len(devices),)``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device; got an empty list.")
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicate(tree: Any, mesh: Mesh, copy: bool = False) -> Any:
    """Places every leaf of ``tree`` fully replicated on ``mesh``.

    Args:
        tree: a pytree of arrays.
        mesh: the mesh.
        copy: always make new buffers, even where the leaves already live there, so
            that donating the result never deletes the caller's arrays.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    if copy:
        return jax.device_put(tree, sharding, may_alias=False)
    return jax.device_put(tree, sharding)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: leading (example) dimension split over ``data``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises a clear error when the batch does not split evenly over the devices."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(
            f"batch size must be divisible by the number of devices on the '{DATA_AXIS}' axis: "
            f"got batch size {batch_size} and {n} devices. "
            f"Fix: use a batch size that is a multiple of {n} (e.g. {max(n, batch_size // n * n)})."
        )


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on ``mesh``, split along its leading dimension.

    Args:
        batch: dict of arrays with a common leading dimension ``B``.
        mesh: the data mesh; ``B`` must be divisible by its size.

    Returns:
        The batch as device arrays sharded over ``data``.
    """
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
    if any(s is None for s in sizes.values()) or len(set(sizes.values())) > 1:
        raise ValueError(
            f"every batch entry needs the same leading (batch) dimension; got {sizes}."
        )
    check_batch_size(next(iter(sizes.values())), mesh)
    return jax.device_put(dict(batch), batch_sharding(mesh))
