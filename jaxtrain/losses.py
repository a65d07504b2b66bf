"""Mask-weighted losses and metrics.

Every function takes an optional ``mask`` so that padded examples (the last partial
batch) or padded tokens never count. A mask of shape ``[B]`` is broadcast over trailing
label dimensions, so the same function serves classification (labels ``[B]``) and
language modelling (labels ``[B, T]``, mask ``[B]`` or ``[B, T]``).

What must not live here: loss functions bound to a model (``(params, batch) -> loss``, in
`jaxtrain.apps.tasks`) and metric accumulation (`jaxtrain.metrics`). It never imports the
loop, the applications (`jaxtrain.apps`, `jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Metrics the built-in losses report: counts of invalid labels (outside [0, C) where the
# mask is > 0) and of mask values outside [0, 1]. Under jit nothing can raise, so they
# are counted on the device; `fit` raises at the next logging point when one is > 0 and
# `jaxtrain.metrics.compute` (hence `evaluate`) raises at once. Hidden from logs.
INVALID_LABELS = "invalid_labels"
INVALID_MASK = "invalid_mask"
INVALID_COUNT_KEYS = (INVALID_LABELS, INVALID_MASK)


def _concrete(x) -> bool:
    """Whether ``x`` holds values now (outside jit), so it can be checked on the host."""
    return x is not None and not isinstance(x, jax.core.Tracer)


def _bad_mask(mask) -> jax.Array:
    m = jnp.asarray(mask, jnp.float32)
    return ~(jnp.isfinite(m) & (m >= 0) & (m <= 1))


def _bad_labels(num_classes: int, labels, mask) -> jax.Array:
    bad = (labels < 0) | (labels >= num_classes)
    if mask is not None:
        bad = bad & (broadcast_mask(mask, labels.shape) > 0)
    return bad


def _invalid_counts(num_classes: int, labels, mask) -> tuple[jax.Array, jax.Array]:
    """(invalid labels, invalid mask values) as float32 device scalars (no host sync)."""
    n_labels = jnp.sum(_bad_labels(num_classes, labels, mask), dtype=jnp.float32)
    n_mask = jnp.float32(0) if mask is None else jnp.sum(_bad_mask(mask), dtype=jnp.float32)
    return n_labels, n_mask


def _raise_first(what: str, bad: np.ndarray, values: np.ndarray, rule: str, fix: str) -> None:
    i = tuple(int(j) for j in np.argwhere(bad)[0])
    example = f"example {i[0]} of the batch; " if i else ""
    raise ValueError(
        f"{what} holds {values[i].item()!r} at index {i} ({example}"
        f"{int(bad.sum())} such value(s) in all): {rule}. Fix: {fix}"
    )


def _check_mask(fn: str, mask) -> jax.Array | None:
    """Raises now for a bad concrete mask; under jit returns the count of bad values."""
    if mask is None:
        return None
    if not _concrete(mask):
        return jnp.sum(_bad_mask(mask), dtype=jnp.float32)
    m = np.asarray(mask)
    with np.errstate(invalid="ignore"):
        bad = ~(np.isfinite(m.astype(np.float64)) & (m >= 0) & (m <= 1))
    if bad.any():
        _raise_first(
            f"{fn}: mask",
            bad,
            m,
            "a mask holds weights in [0, 1] (1 real, 0 padding), or the mean is skewed",
            "build the mask as (example is real).astype(np.float32).",
        )
    return None


def _check_labels(fn: str, num_classes: int, labels, mask) -> jax.Array | None:
    """Raises now for bad concrete labels; under jit returns the count of bad labels."""
    if not (_concrete(labels) and (mask is None or _concrete(mask))):
        return jnp.sum(_bad_labels(num_classes, labels, mask), dtype=jnp.float32)
    y = np.asarray(labels)
    bad = (y < 0) | (y >= num_classes)
    if mask is not None:
        bad &= np.asarray(broadcast_mask(mask, y.shape)) > 0
    if bad.any():
        _raise_first(
            f"{fn}: labels",
            bad,
            y,
            f"labels must be in [0, {num_classes}) for logits with {num_classes} classes "
            "where the mask is > 0",
            "remap the labels, or set mask=0 at positions to ignore (e.g. PyTorch's "
            "ignore_index -100): masked positions are never read.",
        )
    return None


def _poison(value: jax.Array, *counts: jax.Array | None) -> jax.Array:
    """NaN when a device count of invalid labels or mask values is > 0 (under jit).

    An out-of-range label otherwise gives a NaN loss or, with label smoothing, a small
    finite one: training would go on silently. NaN is caught by ``nonfinite=`` and shows
    in every log; the built-in `jaxtrain.apps.tasks.classification_loss` also reports the counts.
    """
    present = [c for c in counts if c is not None]
    if not present:
        return value
    return jnp.where(sum(present) > 0, jnp.nan, value).astype(value.dtype)


def compute_dtype(*arrays) -> jnp.dtype:
    """The dtype a loss computes in: its inputs' float dtype, promoted to at least float32.

    bfloat16/float16 logits are computed in float32 (a softmax in 16 bits loses the
    small probabilities); float32 stays float32; float64 (JAX's x64 mode) stays float64,
    so a float64 model gets a float64 loss (``jaxtrain.contrast``'s exact parity mode).

    Args:
        *arrays: the loss's float inputs (logits, predictions, targets).

    Returns:
        ``jnp.result_type(float32, *float inputs)``; integer inputs do not count.

    Example:
        >>> import jax.numpy as jnp
        >>> compute_dtype(jnp.zeros(2, jnp.bfloat16)), compute_dtype(jnp.zeros(2, jnp.float32))
        (dtype('float32'), dtype('float32'))
    """
    floats = [a for a in arrays if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact)]
    return jnp.dtype(jnp.result_type(jnp.float32, *(jnp.asarray(a).dtype for a in floats)))


def broadcast_mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """A float32 weight of ``shape`` from a mask over a prefix of ``shape``.

    The losses and metrics weight every value by it: a ``[B]`` mask weights each
    example's ``[B, T]`` tokens alike; None weights everything 1.

    Args:
        mask: ``[B]``, ``[B, T]``, ... (a prefix of ``shape``), or None.
        shape: the shape of the values to weight.

    Returns:
        The mask broadcast to ``shape``, float32.

    Raises:
        ValueError: the mask's shape is not a prefix of ``shape``.

    Example:
        >>> broadcast_mask(jnp.array([1.0, 0.0]), (2, 3)).tolist()
        [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape != shape[: mask.ndim]:
        raise ValueError(
            f"mask has shape {mask.shape} but must be a prefix of the labels' shape {shape} "
            "(e.g. [batch] or [batch, time])."
        )
    return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim)), shape)


def weighted_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of ``values`` over entries where ``mask`` is nonzero (0 when nothing counts).

    Args:
        values: float array ``[B, ...]``.
        mask: ``[B]`` (or any prefix of ``values.shape``) weights, 1 real and 0 padding;
            None counts every entry.

    Returns:
        Scalar in the dtype of ``values * mask`` (at least float32): ``sum(values * mask) /
        max(sum(mask), 1)`` over the broadcast mask.

    Example:
        >>> import jax.numpy as jnp
        >>> float(weighted_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([1.0, 1.0, 0.0])))
        2.0
    """
    w = broadcast_mask(mask, values.shape)
    # where, not just *: padded rows may hold NaN/inf (NaN * 0 is NaN).
    # max(.., 1) keeps an all-padding batch at 0 instead of NaN.
    return jnp.sum(jnp.where(w > 0, values * w, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def cross_entropy_per_example(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Softmax cross-entropy per position.

    Args:
        logits: float array ``[..., C]``.
        labels: integer class indices ``[...]``.
        label_smoothing: weight moved uniformly onto all ``C`` classes (as in
            ``torch.nn.CrossEntropyLoss(label_smoothing=...)``).

    Returns:
        ``[...]`` in `compute_dtype` (float32 for 16- and 32-bit logits, float64 for
        float64 logits).

    Example:
        >>> import jax.numpy as jnp
        >>> cross_entropy_per_example(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32)).shape
        (2, 3)
    """
    logits = logits.astype(compute_dtype(logits))
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Mask-weighted mean softmax cross-entropy with integer labels.

    Args:
        logits: ``[B, ..., C]``.
        labels: ``[B, ...]`` int.
        mask: ``[B]`` or ``labels.shape``; 1 for real examples, 0 for padding.
        label_smoothing: see `cross_entropy_per_example`.

    Returns:
        Scalar in `compute_dtype` (float32; float64 for float64 logits). Labels of masked-out positions are never read (they may be
        anything, e.g. PyTorch's ``ignore_index`` -100).

    Raises:
        ValueError: outside jit, for a label outside ``[0, C)`` where the mask is > 0 or
            a mask value outside ``[0, 1]``, naming the index and value. Under jit it
            cannot raise: the loss is NaN instead (never a silent, wrong value).

    Example:
        >>> import jax.numpy as jnp
        >>> float(softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 1])))  # log(4)
        1.3862943649291992
    """
    n_mask = _check_mask("softmax_cross_entropy", mask)
    n_labels = _check_labels("softmax_cross_entropy", logits.shape[-1], labels, mask)
    if mask is not None:
        # An out-of-range label in a padded row would give NaN values and gradients.
        labels = jnp.where(broadcast_mask(mask, labels.shape) > 0, labels, 0)
    loss = weighted_mean(cross_entropy_per_example(logits, labels, label_smoothing), mask)
    return _poison(loss, n_labels, n_mask)


def mean_squared_error(
    predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Mask-weighted mean of ``(predictions - targets) ** 2`` over all elements.

    Matches ``torch.nn.MSELoss()`` (no 0.5 factor, unlike ``optax.l2_loss``).

    Args:
        predictions: ``[B, ...]``.
        targets: same shape as ``predictions``.
        mask: ``[B]`` (or any prefix of the shape).

    Returns:
        Scalar in `compute_dtype` of both inputs (float32; float64 for float64 inputs).

    Example:
        >>> import jax.numpy as jnp
        >>> float(mean_squared_error(jnp.array([[1.0], [3.0]]), jnp.array([[0.0], [0.0]])))
        5.0
    """
    n_mask = _check_mask("mean_squared_error", mask)
    dtype = compute_dtype(predictions, targets)
    err = jnp.square(predictions.astype(dtype) - targets.astype(dtype))
    return _poison(weighted_mean(err, mask), n_mask)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mask-weighted fraction of positions where ``argmax(logits) == labels``.

    Args:
        logits: ``[B, ..., C]``.
        labels: ``[B, ...]`` int.
        mask: ``[B]`` or ``labels.shape``.

    Returns:
        float32 scalar in [0, 1]; NaN under jit for an invalid label or mask (outside
        jit that is a ``ValueError``, as in `softmax_cross_entropy`).

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])  # predicts 0, 1, 0
        >>> float(accuracy(logits, jnp.array([0, 0, 1]), mask=jnp.array([1.0, 1.0, 0.0])))
        0.5
    """
    n_mask = _check_mask("accuracy", mask)
    n_labels = _check_labels("accuracy", logits.shape[-1], labels, mask)
    return _poison(weighted_mean(correct(logits, labels), mask), n_labels, n_mask)


def correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where ``argmax(logits) == labels`` else 0.0, shape ``labels.shape``.

    Args:
        logits: ``[B, ..., C]``.
        labels: ``[B, ...]`` int.

    Returns:
        float32 array ``labels.shape``, unmasked (see `accuracy` for the masked mean).

    Example:
        >>> import jax.numpy as jnp
        >>> correct(jnp.array([[2.0, 0.0], [2.0, 0.0]]), jnp.array([0, 1])).tolist()
        [1.0, 0.0]
    """
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
