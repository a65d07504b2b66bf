"""A whole epoch in one dispatch: the data set lives on the device.

For in-memory data sets the host has nothing to do between steps: the epoch's
permutation is drawn on the device from the same explicit key as
`ArrayDataset.order`, and each step gathers its batch inside a compiled
``jax.lax.scan``. Batches are bitwise the ones the host-fed path builds (same order,
same zero padding and mask), so results match it.

What lives here: the `ResidentEpoch` step transform, `make_device_epoch` (a thin wrapper
over `jaxtrain.step.build_train_step`) and `put_dataset`. It uses only the public
functions of `jaxtrain.step`, `jaxtrain.step_options` and `jaxtrain.transforms`; it
never imports the loop, the CLI, checkpoints or torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain import parallel
from jaxtrain.data import MASK_KEY, ArrayDataset
from jaxtrain.step import CompiledStep, build_train_step
from jaxtrain.step_options import UNROLL_AUTO, StepOptions, StepSpec, step_options
from jaxtrain.transforms import abstract, convolution_on_cpu, resolve_unroll
from jaxtrain.types import LossFn


@dataclasses.dataclass(frozen=True)
class ResidentEpoch:
    """The step transform of a device-resident epoch: ``run_epoch(state, arrays, epoch)``.

    Every option of `StepOptions` applies (precision, gradient accumulation — which
    must divide the batch size —, the non-finite guard, ``grad_norm``, ``jit``, the mesh).

    Attributes:
        dataset: the `ArrayDataset` whose order, batch size and padding to reproduce.
        name: the step's name in messages.
        refuses: options it cannot honour (none).
    """

    dataset: ArrayDataset
    name: str = "run_epoch"
    refuses: tuple[str, ...] = ()

    def spec(self, options: StepOptions) -> StepSpec:
        """The `StepSpec` of this epoch built with ``options``."""
        steps = self.dataset.steps_per_epoch
        return StepSpec("epoch", steps, self.dataset, options.nonfinite, unroll=options.unroll)

    def apply(self, step: Callable, options: StepOptions, on_unroll: Callable) -> Callable:
        """``run_epoch(state, arrays, epoch)`` over the one-step ``step``."""
        dataset = self.dataset
        # Split over every batch axis ("data", and "fsdp" on an FSDP mesh), as host-fed batches.
        mesh = options.mesh
        batch_sharding = None if mesh is None else parallel.batch_sharding(mesh)

        def run_epoch(state, arrays, epoch):
            idx, valid = _epoch_indices(dataset, epoch)

            def body(st, xs):
                batch = _gather(arrays, *xs)
                if batch_sharding is not None:
                    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
                return step(st, batch)

            def jaxpr():
                row = (abstract(idx[0]), abstract(valid[0]))
                return jax.make_jaxpr(body)(abstract(state), row)

            auto = options.unroll == UNROLL_AUTO
            unroll = resolve_unroll(options.unroll, auto and convolution_on_cpu(jaxpr, mesh))
            on_unroll(unroll)
            return jax.lax.scan(body, state, (idx, valid), unroll=unroll)

        return run_epoch


def _epoch_indices(dataset: ArrayDataset, epoch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The epoch's example indices ``[steps, B]`` and their validity mask, on device."""
    n, bsz, steps = dataset.num_examples, dataset.batch_size, dataset.steps_per_epoch
    if dataset.shuffle:
        key = jax.random.fold_in(jax.random.key(dataset.seed), epoch)
        order = jax.random.permutation(key, n)
    else:
        order = jnp.arange(n)
    total = steps * bsz
    if total > n:  # pad the last batch: index 0 as a placeholder, masked and zeroed
        order = jnp.concatenate([order, jnp.zeros(total - n, order.dtype)])
    idx = order[:total].reshape(steps, bsz)
    valid = (jnp.arange(total) < n).astype(jnp.float32).reshape(steps, bsz)
    return idx, valid


def _gather(arrays: dict[str, jax.Array], i: jax.Array, m: jax.Array) -> dict[str, jax.Array]:
    """One batch gathered on the device: rows ``i``, padding rows zeroed, and the mask."""
    bsz = i.shape[0]
    batch = {}
    for k, v in arrays.items():
        rows = v[i]  # [B, ...] gathered on the device
        keep = m.reshape((bsz,) + (1,) * (v.ndim - 1)) > 0
        batch[k] = jnp.where(keep, rows, jnp.zeros((), v.dtype))
    batch[MASK_KEY] = m
    return batch


def make_device_epoch(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    dataset: ArrayDataset,
    *,
    unroll: int | bool | str = UNROLL_AUTO,
    **options: Any,
) -> CompiledStep:
    """Builds ``run_epoch(state, arrays, epoch) -> (state, metrics)``: one epoch, one call.

    Args:
        loss_fn: as in `make_train_step`.
        optimizer: as in `make_train_step`.
        dataset: the `ArrayDataset` whose order, batch size and padding to reproduce.
        unroll: as in `make_train_steps`: ``"auto"`` (default) unrolls the epoch's scan
            for a convolutional model on CPU (read it back as ``spec.unroll``), else 1.
        **options: any option of `make_train_step` (``learning_rate_fn``, ``mesh``,
            ``donate``, ``jit``, ``nonfinite``, ``grad_accum_steps``, ``precision``,
            ``grad_norm``), applied to every step of the epoch.

    Returns:
        A `CompiledStep` whose ``spec`` has ``kind="epoch"``, ``dataset`` and
        ``steps_per_call`` (the steps of an epoch). Call it with the arrays from
        `put_dataset` and an int32 epoch; ``metrics`` are stacked ``[steps_per_epoch]``.
        `fit` uses it when given as ``train_step``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxtrain as jt
        >>> ds = jt.ArrayDataset({"x": np.ones((10, 2), np.float32)}, 4, seed=0)
        >>> def loss_fn(params, batch):
        ...     return jt.losses.weighted_mean((batch["x"] @ params["w"]) ** 2, batch["mask"])
        >>> opt = optax.sgd(0.1)
        >>> run_epoch = make_device_epoch(loss_fn, opt, ds)
        >>> state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
        >>> state, metrics = run_epoch(state, put_dataset(ds), jnp.int32(0))
        >>> int(state.step), metrics["loss"].shape  # batches of 4, 4 and 2 (+2 padding)
        (3, (3,))
    """
    opts = step_options("make_device_epoch", unroll=unroll, **options)
    return build_train_step(loss_fn, optimizer, opts, ResidentEpoch(dataset))


def put_dataset(dataset: ArrayDataset, mesh: Mesh | None = None) -> dict[str, Any]:
    """The data set's arrays on the device(s), replicated on ``mesh`` when given.

    Args:
        dataset: the `ArrayDataset` (all of it is copied, ``[N, ...]`` per entry).
        mesh: the data mesh to replicate over; None: the default device.

    Returns:
        ``{name: jax.Array [N, ...]}``, the input of a `make_device_epoch` step.

    Example:
        >>> import numpy as np, jaxtrain as jt
        >>> arrays = put_dataset(jt.ArrayDataset({"x": np.zeros((10, 2), np.float32)}, 4))
        >>> arrays["x"].shape, isinstance(arrays["x"], jax.Array)
        ((10, 2), True)
    """
    target = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    return jax.device_put(dict(dataset.arrays), target)
