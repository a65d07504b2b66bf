"""Feeding a train step: host batches -> placed device inputs, one call ahead.

Lives here: the three data paths of `fit` (one batch per call; K stacked batches per
fused call, a short last group padded to K; a device-resident epoch per call), each
batch's host-side checks before placement, and multi-process row selection. Each call
is a `Call`: how many real steps and examples it holds and the step's arguments after
the state. Must not live here: dispatching the step, metrics, callbacks. Never imports
the loop, the CLI, the job or torch.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxtrain.data import MASK_KEY, ArrayDataset, check_batch
from jaxtrain.grain_data import GrainData
from jaxtrain.parallel import process_rows, replicate, shard_batch, shard_stacked_batch


@dataclasses.dataclass(frozen=True)
class Call:
    """One dispatch: ``train_step(state, *args)`` runs ``steps`` real training steps."""

    steps: int
    examples: int  # real (unpadded) examples, global
    args: tuple


class _LocalBatch(dict):
    """One process's rows of a global batch, carrying the global count of real examples."""

    num_real: int = 0


def _local_batches(data: ArrayDataset, epoch: int, start: int, mesh: Mesh | None):
    """The batches as fed to `shard_batch`: whole in one process, this process's rows in many.

    Every process draws the same permutation (same seed) and gathers only its own
    contiguous block of each global batch; the global count of real examples rides
    along so that `History.examples` counts the global batch.
    """
    if mesh is None or jax.process_count() == 1:
        yield from data.batches(epoch, start)
        return
    rows = process_rows(mesh, data.batch_size)
    for i, batch in enumerate(data.batches(epoch, start, rows=rows), start=start):
        local = _LocalBatch(batch)
        local.num_real = min(data.batch_size, data.num_examples - i * data.batch_size)
        yield local


def _local_grain_batches(data: GrainData, epoch: int, start: int, mesh: Mesh | None):
    """`GrainData` batches, cut to this process's rows when there are several processes.

    From a random-access source each process reads only its own block of rows of each
    global batch (`GrainData.batches` with ``rows``): the global batch is the one a
    single process would see, so multi-process runs equal one-process runs. (grain's
    own per-process sharding would give each process a contiguous part of the records
    and so change the global batches.) A streaming source cannot be read by row: every
    process runs the same pipeline and keeps its rows.
    """
    if mesh is None or jax.process_count() == 1:
        yield from data.batches(epoch, start)
        return
    rows = process_rows(mesh, data.batch_size)
    if data.num_records is not None:
        for i, batch in enumerate(data.batches(epoch, start, rows=rows), start=start):
            local = _LocalBatch(batch)
            local.num_real = min(data.batch_size, data.num_records - i * data.batch_size)
            yield local
        return
    for batch in data.batches(epoch, start):
        local = _LocalBatch({k: v[rows] for k, v in batch.items()})
        local.num_real = int(np.sum(batch[MASK_KEY]))
        yield local


def epoch_batches(
    data: Any, epoch: int, start: int, mesh: Mesh | None = None
) -> Iterator[Mapping[str, Any]]:
    """The host batches of ``epoch`` from batch ``start`` on, of any supported data kind."""
    if isinstance(data, ArrayDataset):
        return _local_batches(data, epoch, start, mesh)
    if isinstance(data, GrainData):
        return _local_grain_batches(data, epoch, start, mesh)
    if callable(data):  # epoch -> iterable of batches
        it = iter(data(epoch))
    elif isinstance(data, Iterable):
        it = iter(data)
    else:
        raise TypeError(
            "train_data must be an ArrayDataset, an iterable of dict batches, or a callable "
            f"epoch -> iterable; got {type(data).__name__}."
        )
    for _ in range(start):
        next(it, None)
    return host_checked(it, f"train_data epoch {epoch}", start)


def host_checked(batches: Iterable[Any], what: str, start: int = 0) -> Iterator[Any]:
    """Batches of a plain iterable, each checked on the host before it is placed.

    `jaxtrain.data.check_batch`: NaN/Inf inputs, negative labels in ``y`` (the upper
    bound needs ``num_classes``: the built-in losses count those on the device), and
    masks outside ``[0, 1]`` are errors naming the batch, entry, index and value. Entries
    that are already ``jax.Array`` s are not read back (that would be a host sync per
    step); the built-in losses' counts and ``nonfinite=`` guard cover them on the device.
    `ArrayDataset` (checked once when built) and `GrainData` (checked as it serves) do
    not come through here.
    """
    for i, b in enumerate(batches, start=start):
        if isinstance(b, Mapping):
            check_batch(b, f"{what}, batch {i}")
        yield b


def _num_real(batch: Mapping[str, Any]) -> int:
    if isinstance(batch, _LocalBatch):
        return batch.num_real
    mask = batch.get(MASK_KEY)
    if mask is not None and isinstance(mask, np.ndarray):
        return int(mask.sum())
    first = next(iter(batch.values()))
    return int(np.shape(first)[0])


class SameShapes:
    """Host-side check that every batch has the first batch's entries, shapes and dtypes.

    A batch of another shape would silently recompile the step (the classic JAX loop
    bug); here it is an error that says which entry differs.
    """

    def __init__(self):
        self.spec: dict[str, tuple] | None = None

    def __call__(self, batch: Any) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(f"each batch must be a dict of arrays; got {type(batch).__name__}.")
        spec = {
            k: (tuple(np.shape(v)), str(getattr(v, "dtype", type(v).__name__)))
            for k, v in batch.items()
        }
        if self.spec is None:
            self.spec = spec
        elif spec != self.spec:
            diff = {
                k: (self.spec.get(k), spec.get(k))
                for k in set(spec) | set(self.spec)
                if self.spec.get(k) != spec.get(k)
            }
            raise ValueError(
                "every batch must have the same entries, shapes and dtypes (a new shape "
                f"recompiles the step); (first batch, this batch) differ for {diff}. Fix: "
                "pad the last batch and mask it (ArrayDataset does this)."
            )


def prefetch(
    batches: Iterable[Any], mesh: Mesh, depth: int = 2, check: Any = None
) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """Puts batches on the devices ``depth - 1`` ahead so transfer overlaps compute."""
    queue: collections.deque = collections.deque()
    for b in batches:
        if not isinstance(b, Mapping):
            raise TypeError(f"each batch must be a dict of arrays; got {type(b).__name__}.")
        if check is not None:
            check(b)
        queue.append((_num_real(b), shard_batch(b, mesh)))
        if len(queue) >= depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _groups(batches: Iterable[Any], k: int, budget: float, check: SameShapes):
    """Groups of up to ``k`` checked batches; never past the epoch or the step budget."""
    group: list = []
    for b in batches:
        if budget <= 0:
            break
        check(b)
        group.append(b)
        budget -= 1
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def _stack(group: Sequence[Mapping[str, Any]], k: int) -> dict[str, np.ndarray]:
    """``[K, B, ...]`` from a group of n <= K batches: a short group repeats its last batch.

    The repeats are inactive steps (``active[i] = False``): the step leaves the state
    as it is, so one compiled shape serves every group.
    """
    padded = [*group, *[group[-1]] * (k - len(group))]
    return {name: np.stack([np.asarray(b[name]) for b in padded]) for name in group[0]}


class _Active:
    """The fused step's ``active`` masks, placed once each (replicated on the mesh)."""

    def __init__(self, k: int, mesh: Mesh):
        self.k, self.mesh = k, mesh
        self.masks: dict[int, jax.Array] = {}

    def __call__(self, n: int) -> jax.Array:
        if n not in self.masks:
            self.masks[n] = replicate(np.arange(self.k) < n, self.mesh)
        return self.masks[n]


def fused_calls(
    batches: Iterable[Any], mesh: Mesh, k: int, budget: float, check: SameShapes, active: _Active
) -> Iterator[Call]:
    """Calls of K stacked batches, placed one call ahead.

    A group never crosses the end of the epoch or of the step budget: a shorter last
    group of n < K batches is padded to K (the last batch repeated) with ``active``
    true for its first n steps, so the fused step keeps one shape: one compilation.
    """
    queue: collections.deque = collections.deque()
    for group in _groups(batches, k, budget, check):
        n = len(group)
        stacked = shard_stacked_batch(_stack(group, k), mesh)
        queue.append(Call(n, sum(_num_real(b) for b in group), (stacked, active(n))))
        if len(queue) >= 2:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def single_calls(
    batches: Iterable[Any], mesh: Mesh, budget: float, check: SameShapes
) -> Iterator[Call]:
    """One batch per call, placed one call ahead; at most ``budget`` calls."""
    for n_real, batch in prefetch(batches, mesh, check=check):
        if budget <= 0:
            return
        budget -= 1
        yield Call(1, n_real, (batch,))


def _member_counted(batch: Any) -> Any:
    """A ``[N, B, ...]`` batch (one per population member) that counts its N * B examples."""
    if not isinstance(batch, Mapping) or MASK_KEY in batch:  # a mask counts them already
        return batch
    shape = np.shape(next(iter(batch.values())))
    counted = _LocalBatch(batch)
    counted.num_real = int(np.prod(shape[:2]))
    return counted


class Feed:
    """The calls of each epoch for one train step kind (``"step"``, ``"fused"``, ``"epoch"``)."""

    def __init__(
        self, kind: str, steps_per_call: int, data: Any, mesh: Mesh, member_batches: bool = False
    ):
        self.kind, self.k, self.data, self.mesh = kind, steps_per_call, data, mesh
        # A population step with one batch per member ([N, B, ...]): count N * B examples.
        self.member_batches = member_batches
        self.check = SameShapes()
        self.active = _Active(steps_per_call, mesh) if kind == "fused" else None
        self.arrays = None
        if kind == "epoch":  # the data set goes to the devices once
            from jaxtrain.resident import put_dataset

            self.arrays = put_dataset(data, mesh)

    def calls(self, epoch: int, start: int, budget: float) -> Iterable[Call]:
        """The calls of ``epoch`` from batch ``start``, at most ``budget`` steps."""
        if self.kind == "epoch":
            return [Call(self.k, self.data.num_examples, (self.arrays, jnp.int32(epoch)))]
        batches = epoch_batches(self.data, epoch, start, self.mesh)
        if self.member_batches:
            batches = map(_member_counted, batches)
        if self.kind == "fused":
            assert self.active is not None  # made for every fused feed
            return fused_calls(batches, self.mesh, self.k, budget, self.check, self.active)
        return single_calls(batches, self.mesh, budget, self.check)
