"""In-memory data with explicit-key shuffling, fixed-shape batches and a plain-data position.

Every batch has the same shape, so the compiled step never recompiles: the last partial
batch is padded with zeros and a ``mask`` entry (1.0 real, 0.0 padding) tells losses and
metrics which rows count. Nothing is dropped silently.

What must not live here: device placement (`jaxtrain.parallel`, `jaxtrain.feed`), grain
pipelines (`jaxtrain.grain_data`) and task-specific data (`jaxtrain.apps.text`). It never
imports the loop, the applications (`jaxtrain.apps`, `jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxtrain.state import check_key_seed

MASK_KEY = "mask"


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where an epoch-based iteration stands: plain integers, so it can be saved as JSON.

    Attributes:
        epoch: the current epoch (0-based).
        index: the index of the next batch within that epoch.

    Example:
        >>> pos = DataPosition(epoch=2, index=5)  # resume: ds.batches(2, start=5)
        >>> pos.to_dict()
        {'epoch': 2, 'index': 5}
        >>> DataPosition.from_dict(pos.to_dict()) == pos
        True
    """

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


# Data seeds become `jax.random.key(seed)`, which keeps 32 bits without x64: seed 2**32
# would shuffle exactly like seed 0, and larger ones overflow. One range for every seed.
MAX_SEED = 2**32 - 1


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as an int, or a clear error unless it is an integer in ``[0, 2**32 - 1]``.

    Args:
        value: the seed.
        name: how the message names it.

    Returns:
        ``int(value)``.

    Example:
        >>> check_seed(7)
        7
        >>> check_seed(2**32)
        Traceback (most recent call last):
        ...
        ValueError: seed must be an integer in [0, 4294967295] (2**32 - 1); got 4294967296. ...
    """
    # One rule for every seed in jaxtrain (jaxtrain.state.check_key_seed): 32 bits, as
    # jax.random.key keeps them, also for the shuffles grain draws from it.
    return check_key_seed(value, name, top=MAX_SEED)


def _mask_weights(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """``mask > 0`` broadcast over ``shape`` (None without a usable mask): rows to check."""
    if mask is None or tuple(mask.shape) != tuple(shape[: mask.ndim]):
        return None
    real = np.asarray(mask) > 0
    return np.broadcast_to(real.reshape(real.shape + (1,) * (len(shape) - real.ndim)), shape)


def check_batch(
    batch: Mapping[str, Any],
    where: str,
    *,
    label_key: str | None = "y",
    num_classes: int | None = None,
) -> None:
    """Host check of one batch's values before it is placed on the devices.

    Checks, in numpy on the host (no device work): the ``mask`` entry holds finite values
    in ``[0, 1]``; no floating-point entry holds NaN or Inf; integer labels
    (``batch[label_key]``) are ``>= 0`` (and ``< num_classes`` when given). Positions
    whose mask is 0 (padding) are not checked: they are never read. Entries that are
    already ``jax.Array`` s are skipped (reading them would be a host sync).

    Args:
        batch: name -> array ``[B, ...]``.
        where: names the batch in messages, e.g. ``"train_data batch 3 of epoch 0"``.
        label_key: the integer labels' entry (None: no label check).
        num_classes: the labels' upper bound, when known.

    Raises:
        ValueError: naming the entry, the index (``[0]`` is the example within the
            batch), the value and the fix.

    Example:
        >>> import numpy as np
        >>> check_batch({"x": np.ones((2, 3)), "y": np.array([0, 1])}, "batch 0")  # fine
        >>> check_batch({"x": np.ones(2), "y": np.array([0, -1])}, "batch 4")
        Traceback (most recent call last):
        ...
        ValueError: batch 4: batch['y'] holds the label -1 at index (1,) (example 1 of the batch); ...
    """
    host = {
        k: np.asarray(v)
        for k, v in batch.items()
        if not isinstance(v, jax.Array) and isinstance(k, str)
    }
    mask = host.get(MASK_KEY)
    if mask is not None and mask.size:
        m = mask.astype(np.float64) if mask.dtype != np.float64 else mask
        bad = ~(np.isfinite(m) & (m >= 0) & (m <= 1))
        if bad.any():
            i = tuple(int(j) for j in np.argwhere(bad)[0])
            raise ValueError(
                f"{where}: batch['{MASK_KEY}'] holds {mask[i].item()!r} at index {i} (example {i[0]} "
                "of the batch); a mask must hold finite weights in [0, 1] (1 real, 0 "
                "padding), else the mask-weighted means are skewed. Fix: build the mask as "
                "(example is real).astype(np.float32)."
            )
    for k, v in host.items():
        if k == MASK_KEY or v.size == 0:
            continue
        real = _mask_weights(mask, v.shape) if mask is not None and v.ndim else None
        if np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.complexfloating):
            bad = ~np.isfinite(v)
            if real is not None:
                bad &= real
            if bad.any():
                i = tuple(int(j) for j in np.argwhere(bad)[0])
                raise ValueError(
                    f"{where}: batch[{k!r}] holds {v[i].item()!r} at index {i}"
                    f"{f' (example {i[0]} of the batch)' if i else ''}; NaN/Inf inputs "
                    "train NaN parameters. Fix: clean or impute the data before training "
                    "(or set mask=0 for examples that must be ignored)."
                )
        elif k == label_key and np.issubdtype(v.dtype, np.integer):
            bad = v < 0
            if num_classes is not None:
                bad |= v >= num_classes
            if real is not None:
                bad &= real
            if bad.any():
                i = tuple(int(j) for j in np.argwhere(bad)[0])
                rng = f"in [0, {num_classes})" if num_classes is not None else ">= 0"
                raise ValueError(
                    f"{where}: batch[{k!r}] holds the label {int(v[i])} at index {i}"
                    f"{f' (example {i[0]} of the batch)' if i else ''}; class labels must "
                    f"be {rng}. Fix: remap the labels, or set mask=0 at positions to ignore "
                    "(e.g. PyTorch's ignore_index -100): masked positions are never read."
                )


class ArrayDataset:
    """A dict of equal-length arrays served as fixed-shape, masked batches.

    Shuffling uses an explicit seed: epoch ``e`` is ordered by
    ``jax.random.permutation(fold_in(key(seed), e), n)``, so a run is reproducible and
    a position ``(epoch, index)`` identifies exactly which examples come next.

    Args:
        arrays: name -> array ``[N, ...]`` (e.g. ``{"x": images, "y": labels}``).
        batch_size: examples per batch ``B``.
        shuffle: reshuffle every epoch (False: the stored order).
        seed: int seed of the shuffle, in ``[0, 2**32 - 1]``.
        drop_remainder: drop the last partial batch instead of padding it (training
            only; never for evaluation).
        num_classes: when given, ``arrays[label_key]`` must hold integers in
            ``[0, num_classes)`` (checked once here, not in the compiled step).
        label_key: the labels' entry: integer labels there must be ``>= 0`` even
            without ``num_classes`` (None: no label check, for data whose integer
            ``y`` is not class labels).

    Raises:
        ValueError: for an empty data set, unequal lengths, a bad batch size, NaN or
            Inf in floating-point arrays, or labels out of range — each message names
            the entry, the offending value and the fix.

    Example:
        >>> import numpy as np
        >>> ds = ArrayDataset({"x": np.arange(10.0)[:, None], "y": np.arange(10)}, 4, seed=0)
        >>> [b["mask"].tolist() for b in ds.batches(epoch=0)][-1]
        [1.0, 1.0, 0.0, 0.0]
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = False,
        num_classes: int | None = None,
        label_key: str | None = "y",
    ):
        if not isinstance(arrays, Mapping) or not arrays:
            raise ValueError(
                "arrays must be a non-empty dict of arrays, e.g. {'x': images, 'y': labels}; "
                f"got {arrays!r:.80}."
            )
        if MASK_KEY in arrays:
            raise ValueError(f"'{MASK_KEY}' is reserved for the padding mask; rename that entry.")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"all arrays need the same leading length; got {lengths}.")
        self.num_examples: int = next(iter(self.arrays.values())).shape[0]
        if self.num_examples == 0:
            raise ValueError("the dataset is empty (0 examples); give at least one example.")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if drop_remainder and self.batch_size > self.num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the dataset ({self.num_examples} "
                "examples) with drop_remainder=True, so every batch would be dropped. "
                "Fix: lower batch_size or set drop_remainder=False."
            )
        self.shuffle = bool(shuffle)
        self.seed = check_seed(seed)
        self.drop_remainder = bool(drop_remainder)
        for k, v in self.arrays.items():
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
                bad = np.argwhere(~np.isfinite(v))[0]
                raise ValueError(
                    f"arrays[{k!r}] contains NaN or Inf (first at index {tuple(int(i) for i in bad)}: "
                    f"{v[tuple(bad)]}). Fix: clean or impute the data before training."
                )
        if num_classes is not None:
            check_labels(self.arrays.get(label_key or "y"), num_classes, label_key or "y")
        elif label_key is not None:
            labels = self.arrays.get(label_key)
            if labels is not None and np.issubdtype(labels.dtype, np.integer) and labels.size:
                if labels.min() < 0:
                    i = tuple(int(j) for j in np.argwhere(labels < 0)[0])
                    raise ValueError(
                        f"labels {label_key!r} must be >= 0 (class indices); found "
                        f"{int(labels[i])} at index {i} (example {i[0]}). Fix: remap the "
                        "labels; pass label_key=None if this integer entry is not labels."
                    )

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (the padded last batch included unless dropped)."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of ``epoch``, in serving order (int array ``[N]``)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        key = jax.random.fold_in(jax.random.key(self.seed), epoch)
        # Drawn on the CPU so the order is the same whatever the default backend is.
        # (This process's own CPU: with several processes jax.devices() lists theirs too.)
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return np.asarray(jax.random.permutation(key, self.num_examples))

    def batches(
        self, epoch: int = 0, start: int = 0, *, rows: slice | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Yields the batches of ``epoch`` from batch index ``start`` on.

        Each batch is ``{name: array [B, ...], "mask": float32 [B]}``; all have the same
        shapes, the last one zero-padded where the data runs out.

        Args:
            epoch: the epoch (selects the permutation).
            start: the first batch index.
            rows: only these rows of every batch (a process's share of the global
                batch in multi-host training, `jaxtrain.parallel.process_rows`); every
                process draws the same permutation and gathers only its own rows.
        """
        order = self.order(epoch)
        lo, hi = (0, self.batch_size) if rows is None else (rows.start or 0, rows.stop)
        for i in range(start, self.steps_per_epoch):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size][lo:hi]
            n = len(idx)
            batch = {}
            for k, v in self.arrays.items():
                b = v[idx]
                if n < hi - lo:
                    pad = np.zeros((hi - lo - n, *v.shape[1:]), v.dtype)
                    b = np.concatenate([b, pad])
                batch[k] = b
            mask = np.zeros(hi - lo, np.float32)
            mask[:n] = 1.0
            batch[MASK_KEY] = mask
            yield batch

    def iterate(
        self, position: DataPosition = DataPosition()
    ) -> Iterator[tuple[DataPosition, dict]]:
        """Endless iteration from ``position``: yields (position of this batch, batch)."""
        position = DataPosition() if position is None else position
        epoch, index = position.epoch, position.index
        while True:
            for i, batch in enumerate(self.batches(epoch, index), start=index):
                yield DataPosition(epoch, i), batch
            epoch, index = epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.batches(0)

    def __len__(self) -> int:
        return self.steps_per_epoch


def check_labels(labels: Any, num_classes: int, name: str = "y") -> None:
    """Raises a clear error unless ``labels`` are integers in ``[0, num_classes)``."""
    if labels is None:
        raise ValueError(f"labels {name!r} are missing from the data set.")
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"labels {name!r} must be integers (class indices); got dtype {labels.dtype}. "
            f"Fix: {name} = {name}.astype(np.int32)."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(
            f"labels {name!r} must be in [0, {num_classes}) for {num_classes} classes; "
            f"found {int(bad)} (min {int(labels.min())}, max {int(labels.max())}). "
            "Fix: remap the labels or raise num_classes."
        )


def _stratified_counts(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState):
    """How many of ``n_draws`` each class gets: its share, floored, the rest by remainder.

    The rows left after flooring go to the classes with the largest remainders; a tie is
    broken by ``rng``. Step for step scikit-learn's ``_approximate_mode`` (as of 1.9.1),
    so the same ``rng`` gives the same counts and leaves ``rng`` in the same state.
    """
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (tied,) = np.where(remainder == value)
            add_now = min(len(tied), need)
            floored[rng.choice(tied, size=add_now, replace=False)] += 1
            need -= add_now
            if need == 0:
                break
    return floored.astype(int)


def _check_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[int, int]:
    """``(n_train, n_test)`` after checking the arguments, or a ValueError saying the fix."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, float | int):
        raise TypeError(
            f"test_fraction must be a number in (0, 1); got {test_fraction!r} "
            f"({type(test_fraction).__name__}). Fix: e.g. test_fraction=0.2."
        )
    if not 0 < test_fraction < 1:
        raise ValueError(
            f"test_fraction must be in (0, 1) (the share of examples held out); got "
            f"{test_fraction!r}. Fix: e.g. test_fraction=0.2."
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(
            f"seed must be an integer in [0, 4294967295] (numpy's RandomState seeds the "
            f"split); got {seed!r}. Fix: e.g. seed=0."
        )
    n = len(y)
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        raise ValueError(
            f"a stratified split needs at least 2 examples of every class; class "
            f"{classes[counts.argmin()].item()!r} has {counts.min()}. Fix: drop or merge that class."
        )
    if min(n_train, n_test) < len(classes):
        raise ValueError(
            f"a stratified split of {n} examples with test_fraction={test_fraction} gives "
            f"{n_train} train and {n_test} test examples, fewer than the {len(classes)} "
            "classes (each side needs one of each). Fix: choose a test_fraction nearer 0.5."
        )
    return n_train, n_test


def stratified_split_indices(
    y: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices of a stratified random split: each class in proportion.

    The same ``(y, test_fraction, seed)`` always gives the same split, and it is exactly
    the split scikit-learn's ``train_test_split(..., test_size=test_fraction,
    random_state=seed, stratify=y)`` makes (the same algorithm on the same
    ``numpy.random.RandomState`` stream; tests/test_data.py checks this bitwise against
    digests recorded with scikit-learn 1.9.1), without depending on scikit-learn.
    ``ceil(test_fraction * N)`` rows are held out; per class, the counts are the
    proportional share, and the rows are a random permutation of that class's rows.

    Args:
        y: ``[N]`` class labels (any sortable values; every class needs >= 2 rows).
        test_fraction: the share of rows held out, in (0, 1).
        seed: the split's random state, an integer in ``[0, 2**32)``.

    Returns:
        ``(train, test)``: int64 index arrays ``[N - n_test]`` and ``[n_test]``, disjoint,
        each in a random order.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1), a class with fewer than 2 rows, or
            a side with fewer rows than classes (the message says which and the fix).

    Example:
        >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
        >>> train, test = stratified_split_indices(y, test_fraction=0.5, seed=0)
        >>> len(train), len(test), sorted(y[test].tolist())
        (5, 5, [0, 0, 1, 1, 1])
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(
            f"y must be one class label per row, shape [N]; got shape {y.shape}. "
            "Fix: pass the class indices (e.g. y.argmax(-1) for one-hot labels)."
        )
    n_train, n_test = _check_split(y, test_fraction, seed)
    _, y_classes, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    # Each class's rows in their original order (a stable sort keeps it).
    class_rows = np.split(np.argsort(y_classes, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)  # the legacy stream: scikit-learn's, bit for bit
    n_i = _stratified_counts(class_counts, n_train, rng)
    t_i = _stratified_counts(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for rows, n_tr, n_te in zip(class_rows, n_i, t_i, strict=True):
        rows = rows[rng.permutation(len(rows))]
        train.extend(rows[:n_tr])
        test.extend(rows[n_tr : n_tr + n_te])
    return rng.permutation(train), rng.permutation(test)


def train_test_split_stratified(
    x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A fixed stratified split of ``(x, y)`` (`stratified_split_indices`).

    Args:
        x: ``[N, ...]`` inputs.
        y: ``[N]`` class labels.
        test_fraction: the share of rows held out, in (0, 1).
        seed: the split's random state.

    Returns:
        ``({"x", "y"} train, {"x", "y"} test)``, rows taken from ``x`` and ``y``.

    Example:
        >>> x, y = np.arange(20).reshape(10, 2), np.array([0] * 4 + [1] * 6)
        >>> train, test = train_test_split_stratified(x, y, test_fraction=0.5)
        >>> train["x"].shape, test["y"].shape
        ((5, 2), (5,))
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(
            f"x and y must have the same number of rows; got {len(x)} and {len(y)}. "
            "Fix: pass one label per example."
        )
    train, test = stratified_split_indices(y, test_fraction, seed)
    return {"x": x[train], "y": y[train]}, {"x": x[test], "y": y[test]}


# The 1,797 8x8 digits of the UCI "Optical Recognition of Handwritten Digits" test set
# (Alpaydin & Kaynak, 1998; CC BY 4.0), shipped with the package: see
# jaxtrain/datasets/DIGITS.md for the source, licence and how the file was made.
DIGITS_FILE = pathlib.Path(__file__).parent / "datasets" / "digits.npz"


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits, unsplit: ``(images uint8 [1797, 8, 8] in 0..16, labels uint8 [1797])``.

    Read from the ``.npz`` that ships inside the package (no download, no pickle), in the
    data set's own row order, which is scikit-learn's ``load_digits()`` order.

    Returns:
        ``(images, labels)``: pixel counts 0..16 (each pixel counts the set bits of a
        4x4 block of a 32x32 bitmap) and the digit 0..9 of each image.

    Raises:
        FileNotFoundError: the data file is missing from the installation (the message
            says how to reinstall).

    Example:
        >>> images, labels = digits_arrays()
        >>> images.shape, images.dtype, int(images.max()), np.bincount(labels)[:3].tolist()
        ((1797, 8, 8), dtype('uint8'), 16, [178, 182, 177])
    """
    if not DIGITS_FILE.is_file():
        raise FileNotFoundError(
            f"the bundled digits data {DIGITS_FILE} is missing from this jaxtrain "
            "installation. Fix: reinstall jaxtrain (pip install --force-reinstall jaxtrain); "
            "a build from source must include package data (jaxtrain/datasets/*.npz)."
        )
    with np.load(DIGITS_FILE, allow_pickle=False) as z:
        return z["images"], z["labels"]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[dict, dict]:
    """The bundled 8x8 digits (1797 images, 10 classes), split 80/20 stratified by class.

    The data ship inside jaxtrain (`digits_arrays`), so this works offline on every
    machine. The arrays and the split are bitwise those of the earlier scikit-learn-based
    version (``sklearn.datasets.load_digits`` + ``train_test_split(stratify=y)``).

    Args:
        test_fraction: the share of examples held out for testing (stratified by class).
        seed: the split's random state (the same seed gives the same split).

    Returns:
        ``(train, test)`` dicts with ``x`` float32 ``[N, 8, 8, 1]`` scaled to [0, 1] and
        ``y`` int32 ``[N]``. With the defaults: 1437 train and 360 test examples.

    Example:
        >>> train, test = load_digits()
        >>> train["x"].shape, train["y"].shape, test["x"].shape
        ((1437, 8, 8, 1), (1437,), (360, 8, 8, 1))
    """
    images, labels = digits_arrays()
    x = (images.astype(np.float32) / 16.0)[..., None]
    y = labels.astype(np.int32)
    return train_test_split_stratified(x, y, test_fraction, seed)
