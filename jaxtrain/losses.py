"""Mask-weighted losses and metrics.

Every function takes an optional ``mask`` so that padded examples (the last partial
batch) or padded tokens never count. A mask of shape ``[B]`` is broadcast over trailing
label dimensions, so the same function serves classification (labels ``[B]``) and
language modelling (labels ``[B, T]``, mask ``[B]`` or ``[B, T]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _broadcast_mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """Returns a float32 weight of ``shape`` from a mask of a prefix of ``shape``."""
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
        float32 scalar: ``sum(values * mask) / max(sum(mask), 1)`` over the broadcast mask.

    Example:
        >>> import jax.numpy as jnp
        >>> float(weighted_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([1.0, 1.0, 0.0])))
        2.0
    """
    w = _broadcast_mask(mask, values.shape)
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
        float32 array ``[...]``.

    Example:
        >>> import jax.numpy as jnp
        >>> cross_entropy_per_example(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32)).shape
        (2, 3)
    """
    logits = logits.astype(jnp.float32)
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
        float32 scalar. Labels of masked-out positions are never read (they may be
        anything, e.g. PyTorch's ``ignore_index`` -100).

    Example:
        >>> import jax.numpy as jnp
        >>> float(softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 1])))  # log(4)
        1.3862943649291992
    """
    if mask is not None:
        # An out-of-range label in a padded row would give NaN values and gradients.
        labels = jnp.where(_broadcast_mask(mask, labels.shape) > 0, labels, 0)
    return weighted_mean(cross_entropy_per_example(logits, labels, label_smoothing), mask)


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
        float32 scalar.

    Example:
        >>> import jax.numpy as jnp
        >>> float(mean_squared_error(jnp.array([[1.0], [3.0]]), jnp.array([[0.0], [0.0]])))
        5.0
    """
    err = jnp.square(predictions.astype(jnp.float32) - targets.astype(jnp.float32))
    return weighted_mean(err, mask)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mask-weighted fraction of positions where ``argmax(logits) == labels``.

    Args:
        logits: ``[B, ..., C]``.
        labels: ``[B, ...]`` int.
        mask: ``[B]`` or ``labels.shape``.

    Returns:
        float32 scalar in [0, 1].

    Example:
        >>> import jax.numpy as jnp
        >>> logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])  # predicts 0, 1, 0
        >>> float(accuracy(logits, jnp.array([0, 0, 1]), mask=jnp.array([1.0, 1.0, 0.0])))
        0.5
    """
    return weighted_mean(correct(logits, labels), mask)


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
