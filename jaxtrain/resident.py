"""A whole epoch in one dispatch: the data set lives on the device.

For in-memory data sets the host has nothing to do between steps: the epoch's
permutation is drawn on the device from the same explicit key as
`ArrayDataset.order`, and each step gathers its batch inside a compiled
``jax.lax.scan``. Batches are bitwise the ones the host-fed path builds (same order,
same zero padding and mask), so results match it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain import parallel
from jaxtrain.data import MASK_KEY, ArrayDataset
from jaxtrain.step import CompiledStep, LossFn, _build_step, _check_unroll, _finish


def make_device_epoch(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    dataset: ArrayDataset,
    *,
    learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
    mesh: Mesh | None = None,
    donate: bool = True,
    nonfinite: str | None = None,
    unroll: int | bool = 1,
) -> CompiledStep:
    """Builds ``run_epoch(state, arrays, epoch) -> (state, metrics)``: one epoch, one call.

    Args:
        loss_fn, optimizer, learning_rate_fn, mesh, donate, nonfinite: as in
            `make_train_step`.
        unroll: as in `make_train_steps` (True for convolutional models on CPU).
        dataset: the `ArrayDataset` whose order, batch size and padding to reproduce.

    Returns:
        A `CompiledStep` with ``device_epoch`` set to ``dataset``. Call it with the
        arrays from `put_dataset` and an int32 epoch; ``metrics`` are stacked
        ``[steps_per_epoch]``. `fit` uses it when given as ``train_step``.

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
    compiled = CompiledStep(None, None)
    compiled.nonfinite_policy = nonfinite
    compiled.device_epoch = dataset
    one_step = _build_step(loss_fn, optimizer, learning_rate_fn, nonfinite, compiled, False)
    _check_unroll(unroll)
    n, bsz, steps = dataset.num_examples, dataset.batch_size, dataset.steps_per_epoch
    # Split over every batch axis ("data", and "fsdp" on an FSDP mesh), as host-fed batches.
    batch_sharding = None if mesh is None else parallel.batch_sharding(mesh)

    def run_epoch(state, arrays, epoch):
        compiled._count_trace()
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

        def body(st, xs):
            i, m = xs
            batch = {}
            for k, v in arrays.items():
                rows = v[i]  # [B, ...] gathered on the device
                keep = m.reshape((bsz,) + (1,) * (v.ndim - 1)) > 0
                batch[k] = jnp.where(keep, rows, jnp.zeros((), v.dtype))
            batch[MASK_KEY] = m
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return one_step(st, batch)

        return jax.lax.scan(body, state, (idx, valid), unroll=unroll)

    return _finish(compiled, run_epoch, jit=True, mesh=mesh, donate=donate)


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
