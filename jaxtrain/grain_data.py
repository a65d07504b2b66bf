"""Data from grain: feed `fit` from a grain pipeline, for data sets that do not fit in memory.

`GrainData` turns a grain data set of per-example records into the fixed-shape, masked
batches `fit` expects, one epoch at a time:

* records are dicts of arrays (``{"x": [..], "y": []}``), read lazily by grain from any
  random-access source (``grain.sources.ArrayRecordDataSource``, a ``grain.MapDataset``
  with your own ``.map`` transformations, a list) or streamed from a ``grain.IterDataset``;
* every batch has the same shapes: the last, partial batch of an epoch is zero-padded and
  a float32 ``mask`` entry (1.0 real, 0.0 padding) says which rows count, as in
  `jaxtrain.ArrayDataset`;
* epoch ``e`` of a random-access source is shuffled by grain (``MapDataset.shuffle``) with a
  seed derived from ``(seed, e)``: reproducible, and different in every epoch;
* grain reads ahead in threads (``read_threads``, ``prefetch``) and, with
  ``worker_count > 0``, in worker processes (``IterDataset.mp_prefetch``); `fit` then puts
  each batch on the devices one batch ahead of the step that uses it;
* the grain iterator state is saved in every checkpoint `fit` writes, so a resumed run sees
  exactly the batches an uninterrupted one would (bitwise the same parameters).

grain is an optional dependency: ``pip install 'jaxtrain[grain]'``.

Example:
    >>> import grain, numpy as np, jaxtrain
    >>> records = [{"x": np.full(3, i, np.float32), "y": np.int32(i % 2)} for i in range(10)]
    >>> data = jaxtrain.GrainData(records, batch_size=4, seed=0)
    >>> data.steps_per_epoch
    3
    >>> [b["mask"].tolist() for b in data.batches(epoch=0)][-1]
    [1.0, 1.0, 0.0, 0.0]

What must not live here: in-memory data (`jaxtrain.data`) and placement on devices
(`jaxtrain.feed`). It never imports the loop, the applications (`jaxtrain.apps`,
`jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxtrain.data import MASK_KEY, DataPosition, check_batch, check_seed

# How many per-batch iterator states are kept for checkpoints. `fit` reads at most two
# calls (2 * steps_per_call batches) ahead of the step it saves at; far more is kept.
_KEPT_STATES = 4096


def _grain():
    try:
        import grain
    except ImportError:  # pragma: no cover - grain is in the test extra
        raise ImportError(
            "jaxtrain.GrainData needs grain. Fix: pip install 'jaxtrain[grain]' "
            "(or pip install grain)."
        ) from None
    return grain


def _spec(record: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (np.shape(v), str(np.asarray(v).dtype)) for k, v in record.items()}


class _Collate:
    """grain ``batch_fn``: stacks dict records into ``[B, ...]`` arrays, pads, adds the mask.

    A module-level class (not a closure) so grain can pickle it into worker processes.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, records: Any) -> dict[str, np.ndarray]:
        records = list(records)
        first = records[0]
        for i, r in enumerate(records):
            if not isinstance(r, Mapping):
                raise TypeError(
                    "GrainData: every grain record must be a dict of arrays, e.g. "
                    f"{{'x': image, 'y': label}}; record {i} of a batch is a "
                    f"{type(r).__name__} ({r!r:.60}). Fix: add a .map(lambda r: {{...}}) "
                    "that returns a dict."
                )
            if MASK_KEY in r:
                raise ValueError(
                    f"GrainData: '{MASK_KEY}' is reserved for the padding mask, but a record "
                    "has that entry. Fix: rename it in the record."
                )
            if r is not first and _spec(r) != _spec(first):
                a, b = _spec(first), _spec(r)
                diff = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
                raise ValueError(
                    "GrainData: the records of a batch must have the same entries, shapes and "
                    f"dtypes to stack; (record 0, record {i}) differ for {diff} as (shape, "
                    "dtype). Fix: pad or crop ragged entries to one shape in a .map before "
                    "GrainData (a new shape would also recompile the train step)."
                )
        n = len(records)
        batch = {}
        for k in first:
            stacked = np.stack([np.asarray(r[k]) for r in records])
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *stacked.shape[1:]), stacked.dtype)
                stacked = np.concatenate([stacked, pad])
            batch[k] = stacked
        mask = np.zeros(self.batch_size, np.float32)
        mask[:n] = 1.0
        batch[MASK_KEY] = mask
        return batch


class _Rows:
    """grain ``map`` fn: batch index ``i`` -> rows ``[lo, hi)`` of global batch ``i``, collated.

    A process of a multi-process run reads only these records of the (shuffled) source:
    rows ``i * B + lo .. i * B + hi`` that exist, zero-padded to ``hi - lo`` rows with a
    mask, exactly its block of the global batch one process would build. Module-level
    (not a closure) so grain can pickle it into worker processes.
    """

    def __init__(self, source: Any, batch_size: int, lo: int, hi: int, num_records: int):
        self.source, self.batch_size, self.lo, self.hi = source, batch_size, lo, hi
        self.num_records = num_records
        self.collate = _Collate(hi - lo)

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        first = int(i) * self.batch_size
        stop = min(first + self.hi, self.num_records)
        records = [self.source[j] for j in range(first + self.lo, stop)]
        if records:
            return self.collate(records)
        # Only padding rows here (the epoch's last, partial global batch): zeros shaped
        # like a record, all masked.
        batch = self.collate([self.source[0]])
        return {k: np.zeros_like(v) for k, v in batch.items()}


def _epoch_seed(seed: int, epoch: int) -> int:
    # Mixed through SeedSequence rather than seed + epoch, so that (seed 0, epoch 1) and
    # (seed 1, epoch 0) do not shuffle alike.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _check_num_classes(num_classes: Any) -> None:
    """Raises ``ValueError`` unless ``num_classes`` is None or a positive int."""
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(
            f"GrainData num_classes must be a positive integer or None; got {num_classes!r}."
        )


def _check_counts(batch_size: Any, read_threads: Any, prefetch: Any, worker_count: Any) -> None:
    """Raises ``ValueError`` for a count that is not an integer at or above its minimum."""
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("read_threads", read_threads, 1),
        ("prefetch", prefetch, 1),
        ("worker_count", worker_count, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"GrainData {name} must be an integer >= {low}; got {value!r}.")


class GrainData:
    """A grain pipeline served to `fit` as fixed-shape, masked batches, resumable exactly.

    Pass it as ``train_data`` to `fit` (or iterate `batches` yourself). `fit` saves the
    grain iterator state with each checkpoint (under ``data_state`` in the checkpoint's
    JSON metadata) and restores it on ``resume``, so a resumed run is bitwise identical
    to an uninterrupted one.

    Args:
        source: the records, each a dict of arrays with the same entries and shapes:
            a ``grain.MapDataset``, a random-access data source (anything with ``len``
            and ``[i]``: ``grain.sources.ArrayRecordDataSource``, a list of dicts, ...),
            a ``grain.IterDataset``, or a callable ``epoch -> grain.IterDataset`` (for
            streaming data: shuffle inside it, e.g. seeded by the epoch).
        batch_size: examples per batch ``B``.
        shuffle: shuffle a random-access source each epoch (default True). An
            ``IterDataset`` is served as it comes; do not pass ``shuffle`` with one.
        seed: int seed of the shuffle, in ``[0, 2**32 - 1]`` (as for `ArrayDataset`);
            epoch ``e`` uses a seed derived from ``(seed, e)``.
        drop_remainder: drop an epoch's last partial batch instead of padding it.
        read_threads: grain threads reading (and batching) ahead.
        prefetch: batches grain buffers ahead of the training loop.
        worker_count: grain worker processes (``mp_prefetch``; 0: read in this process).
            Workers are started each epoch with the ``spawn`` method, so scripts need the
            ``if __name__ == "__main__":`` guard and the pipeline must be picklable.
        num_classes: when given, integer labels (``record[label_key]``) must be in
            ``[0, num_classes)``; without it they must be ``>= 0``.
        label_key: the labels' entry (None: no label check).

    Every batch is checked on the host as it is served (`jaxtrain.data.check_batch`):
    NaN/Inf in a floating-point entry, a label out of range, or a mask outside
    ``[0, 1]`` is a ``ValueError`` naming the epoch, the batch, the entry, the index and
    the value.

    Attributes:
        steps_per_epoch: batches per epoch for a random-access source; None for an
            ``IterDataset`` (its length is unknown until it ends).

    Raises:
        TypeError: for a source grain cannot read (e.g. a ``grain.DataLoader``: pass its
            data source instead), or records that are not dicts (when read).
        ValueError: for a bad batch size, seed or thread count, an empty source, or
            records of different shapes within a batch (when read).

    Example:
        >>> import numpy as np, jaxtrain
        >>> records = [{"x": np.ones(3, np.float32), "y": np.int32(1)}] * 10
        >>> data = jaxtrain.GrainData(records, batch_size=4, seed=0)
        >>> b = next(data.batches(epoch=0))
        >>> {k: v.shape for k, v in b.items()}
        {'x': (4, 3), 'y': (4,), 'mask': (4,)}
        >>> # state, history = jaxtrain.fit(state, train_step, data, epochs=3,
        >>> #     checkpointer=jaxtrain.checkpoint.Checkpointer("ckpt"), resume="auto")
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        shuffle: bool | None = None,
        seed: int = 0,
        drop_remainder: bool = False,
        read_threads: int = 4,
        prefetch: int = 8,
        worker_count: int = 0,
        num_classes: int | None = None,
        label_key: str | None = "y",
    ):
        grain = _grain()
        check_seed(seed, "GrainData seed")
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.label_key = label_key
        _check_counts(batch_size, read_threads, prefetch, worker_count)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.read_threads = int(read_threads)
        self.prefetch = int(prefetch)
        self.worker_count = int(worker_count)
        self._map: Any = None  # a grain.MapDataset of records
        self._iter: Callable[[int], Any] | None = None  # epoch -> grain.IterDataset
        self._set_source(source, grain)
        if self._map is not None:
            self._init_random_access(shuffle)
        else:
            self._init_streaming(shuffle)
        # (epoch, batches consumed in the epoch) -> grain iterator state after them.
        self._states: collections.OrderedDict = collections.OrderedDict()
        self._resumed: tuple[int, int, Any, Any] | None = None

    def _set_source(self, source: Any, grain: Any) -> None:
        """Sets ``_map`` (random access) or ``_iter`` (streaming) from ``source``.

        Raises:
            TypeError: ``source`` is a ``grain.DataLoader`` or nothing grain can read.
        """
        if isinstance(source, grain.DataLoader):
            raise TypeError(
                "GrainData takes grain's Dataset API, not a grain.DataLoader (whose sampler "
                "owns shuffling and epochs). Fix: pass the loader's data source, e.g. "
                "GrainData(source, batch_size, seed=..., worker_count=...), or a "
                "grain.MapDataset / grain.IterDataset pipeline."
            )
        if isinstance(source, grain.MapDataset):
            self._map = source
        elif isinstance(source, grain.IterDataset):
            self._iter = lambda epoch: source
        elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            self._map = grain.MapDataset.source(source)
        elif callable(source):
            self._iter = source
        else:
            raise TypeError(
                "GrainData source must be a grain.MapDataset, a random-access data source "
                "(with len() and [i], e.g. grain.sources.ArrayRecordDataSource or a list of "
                "dicts), a grain.IterDataset, or a callable epoch -> grain.IterDataset; got "
                f"{type(source).__name__}."
            )

    def _init_streaming(self, shuffle: bool | None) -> None:
        """Sets ``shuffle`` and ``num_records`` of a streaming (IterDataset) source.

        Raises:
            ValueError: ``shuffle`` is asked for (only random-access sources shuffle).
        """
        if shuffle:
            raise ValueError(
                "GrainData shuffle applies to random-access sources; an IterDataset is "
                "served in its own order. Fix: shuffle inside the pipeline (e.g. "
                "ds.shuffle(seed) on a MapDataset before .to_iter_dataset(), or a "
                "window shuffle seeded by the epoch) and drop shuffle=."
            )
        self.shuffle = False
        self.num_records: int | None = None

    def _init_random_access(self, shuffle: bool | None) -> None:
        """Sets ``shuffle`` and ``num_records`` of a random-access source, checked.

        Raises:
            ValueError: the source is empty, or ``drop_remainder`` would drop every batch.
        """
        self.shuffle = True if shuffle is None else bool(shuffle)
        self.num_records = num_records = len(self._map)
        if num_records == 0:
            raise ValueError("GrainData source is empty (0 records); give at least one.")
        if self.drop_remainder and self.batch_size > num_records:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the source ({self.num_records} "
                "records) with drop_remainder=True, so every batch would be dropped. "
                "Fix: lower batch_size or set drop_remainder=False."
            )

    # -- what fit needs --------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per epoch (the padded last one included unless dropped); None when
        the source is an ``IterDataset``."""
        if self.num_records is None:
            return None
        full, rest = divmod(self.num_records, self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    @property
    def signature(self) -> dict[str, Any]:
        """What must match for a resumed run to see the same batches (JSON-ready)."""
        return {
            "kind": "grain",
            "num_records": self.num_records,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_remainder": self.drop_remainder,
            # grain's iterator state has another layout with worker processes.
            "worker_count": self.worker_count,
        }

    def _dataset(self, epoch: int, rows: slice | None = None) -> Any:
        """The grain IterDataset of epoch ``epoch``'s batches (``rows`` of each, if given)."""
        grain = _grain()
        collate = _Collate(self.batch_size)
        if self._map is not None and rows is not None:
            ds = self._map
            if self.shuffle:
                ds = ds.shuffle(seed=_epoch_seed(self.seed, epoch))
            assert self.num_records is not None and self.steps_per_epoch is not None
            lo, hi = rows.start or 0, rows.stop
            ds = grain.MapDataset.range(self.steps_per_epoch).map(
                _Rows(ds, self.batch_size, lo, hi, self.num_records)
            )
            ds = ds.to_iter_dataset(
                grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.prefetch)
            )
        elif self._map is not None:
            ds = self._map
            if self.shuffle:
                ds = ds.shuffle(seed=_epoch_seed(self.seed, epoch))
            # Batching the MapDataset (before to_iter_dataset) lets the read threads build
            # whole batches in parallel.
            ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder, batch_fn=collate)
            ds = ds.to_iter_dataset(
                grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.prefetch)
            )
        else:
            assert self._iter is not None  # a source without _map is a streaming one
            ds = self._iter(epoch)
            if isinstance(ds, grain.MapDataset):
                ds = ds.to_iter_dataset()
            if not isinstance(ds, grain.IterDataset):
                raise TypeError(
                    "GrainData: the source callable must return a grain.IterDataset (or "
                    f"MapDataset) of records for epoch {epoch}; got {type(ds).__name__}."
                )
            ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder, batch_fn=collate)
            ds = grain.experimental.ThreadPrefetchIterDataset(
                ds, prefetch_buffer_size=self.prefetch
            )
        if self.worker_count:
            _allow_grain_workers()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        return ds

    def batches(
        self, epoch: int = 0, start: int = 0, *, rows: slice | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields the batches of ``epoch`` from batch index ``start`` on.

        Each batch is ``{name: array [B, ...], "mask": float32 [B]}``. The iterator
        state after each batch is remembered for `iterator_state`. Starting mid-epoch
        continues from a restored or remembered state when there is one, and otherwise
        reads and drops the first ``start`` batches.

        Args:
            epoch: the epoch (0-based); it picks the shuffle.
            start: index of the first batch to yield.
            rows: only these rows of every batch (a process's share of the global
                batch in multi-process training, `jaxtrain.parallel.process_rows`),
                ``hi - lo`` rows each: only those records are read. The rows of all
                processes together are the batches of ``rows=None``. Random-access
                sources only (a stream is read whole by every process).

        Raises:
            ValueError: ``rows`` for a streaming (``IterDataset``) source.
        """
        if rows is not None and self._map is None:
            raise ValueError(
                "GrainData.batches(rows=...) needs a random-access source (a stream cannot "
                "be read by row); got an IterDataset source. Fix: read the whole batches "
                "(rows=None) and keep this process's rows."
            )
        if self._resumed is not None and self._resumed[:2] == (epoch, start):
            _, _, it, state = self._resumed
            self._resumed = None
            if rows is not None:  # the same position, read for this process's rows only
                _close(it)
                it = iter(self._dataset(epoch, rows))
                it.set_state(state)
        else:
            it = iter(self._dataset(epoch, rows))
            state = self._states.get((epoch, start)) if start else None
            if state is not None:
                it.set_state(state)
            else:
                for _ in range(start):  # deterministic pipeline: the same batches again
                    next(it, None)
        return self._serve(it, epoch, start)

    def _serve(self, it: Any, epoch: int, index: int) -> Iterator[dict[str, np.ndarray]]:
        try:
            for batch in it:
                # On the host, as produced: cheaper than any check on the device, and
                # the message can say which batch of which epoch.
                check_batch(
                    batch,
                    f"GrainData batch {index} of epoch {epoch}",
                    label_key=self.label_key,
                    num_classes=self.num_classes,
                )
                index += 1
                self._states[(epoch, index)] = it.get_state()
                if len(self._states) > _KEPT_STATES:
                    self._states.popitem(last=False)
                yield batch
        finally:
            _close(it)

    def iterator_state(self, position: DataPosition) -> dict[str, Any] | None:
        """The JSON-ready state to save with a checkpoint taken at ``position``.

        Args:
            position: where training stands: ``position.index`` batches of epoch
                ``position.epoch`` have been trained on.

        Returns:
            ``{"epoch", "index", "grain": grain iterator state}``, or None at the start
            of an epoch (a fresh iterator).
        """
        if position.index == 0:
            return None
        state = self._states.get((position.epoch, position.index))
        if state is None:
            raise RuntimeError(
                f"GrainData has no iterator state for batch {position.index} of epoch "
                f"{position.epoch}: it keeps the states of the last {_KEPT_STATES} batches "
                "served. Fix: save checkpoints from fit while it iterates this GrainData."
            )
        return {"epoch": position.epoch, "index": position.index, "grain": state}

    def restore(self, data_state: Any, position: DataPosition, step: int | None = None) -> None:
        """Prepares to continue at ``position`` from a checkpoint's saved ``data_state``.

        Called by `fit` on ``resume``. The grain iterator is rebuilt and its state set
        now, so a mismatch fails before training starts.

        Raises:
            ValueError: the checkpoint has no iterator state for a mid-epoch position,
                its state is for another position, or grain rejects it (the pipeline
                differs from the one that saved it).
        """
        where = f"the checkpoint at step {step}" if step is not None else "the checkpoint"
        self._resumed = None
        if position.index == 0 and data_state is None:
            return  # a fresh epoch: nothing to restore
        if not isinstance(data_state, Mapping) or "grain" not in data_state:
            raise ValueError(
                f"cannot resume exactly: {where} is at batch {position.index} of epoch "
                f"{position.epoch} but holds no grain iterator state (got {data_state!r:.80}); "
                "it was not saved by a run fed from GrainData. Fix: resume with the "
                "train_data it was trained on, or start a new run."
            )
        saved = (data_state.get("epoch"), data_state.get("index"))
        if saved != (position.epoch, position.index):
            raise ValueError(
                f"cannot resume exactly: the grain iterator state in {where} is for (epoch, "
                f"batch) {saved} but the checkpoint's position is ({position.epoch}, "
                f"{position.index}); the checkpoint metadata is inconsistent. Fix: resume "
                "from another checkpoint."
            )
        it = iter(self._dataset(position.epoch))
        try:
            it.set_state(data_state["grain"])
        except Exception as e:  # grain raises KeyError/ValueError/TypeError for bad states
            raise ValueError(
                f"cannot resume exactly: grain rejects the iterator state saved in {where} "
                f"({type(e).__name__}: {e}); this pipeline differs from the one that saved "
                "it. Fix: resume with the same grain source and transformations."
            ) from None
        self._resumed = (position.epoch, position.index, it, data_state["grain"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.batches(0)


def _close(it: Any) -> None:
    """Stops a grain iterator's threads and workers."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _allow_grain_workers() -> None:
    """Lets grain start worker processes in programs that do not use absl's app.run.

    grain reads an absl flag when it starts workers; outside ``app.run`` the flags are
    unparsed and that read fails. Marking them parsed keeps every flag at its default.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
