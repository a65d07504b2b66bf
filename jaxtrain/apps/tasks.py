"""Ready-made loss and eval functions for a `Model` on ``{"x", "y", "mask"}`` batches.

They are ordinary pure functions of the shapes `make_train_step` / `make_eval_step`
expect; write your own the same way when your task differs.

What must not live here: the masked losses and metrics themselves (`jaxtrain.losses`,
`jaxtrain.metrics`), which these helpers bind to a model. Part of `jaxtrain.apps`: the core
never imports it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import losses
from jaxtrain.models.adapters import Model


def _get(batch, key: str, what: str):
    """``batch[key]``, or an error that lists what the batch has (trace time)."""
    if key not in batch:
        raise KeyError(
            f"the batch has no {key!r} entry ({what}); it has {sorted(batch)}. Fix: "
            f"yield dict batches with {key!r} (e.g. ArrayDataset({{'x': inputs, 'y': labels}}, ...))."
        )
    return batch[key]


def _check_labels(logits, labels) -> None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"batch['y'] must hold integer class indices; got dtype {labels.dtype}. "
            "Fix: labels.astype(np.int32)."
        )
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"batch['y'] has shape {tuple(labels.shape)} but the model's logits have shape "
            f"{tuple(logits.shape)}: labels must have the logits' shape without the last "
            "(class) axis."
        )


def classification_loss(model: Model, label_smoothing: float = 0.0) -> Callable:
    """``loss_fn(params, batch, *, rng, model_state) -> (loss, aux)`` for classification.

    Works for per-example labels (``x [B, ...]``, ``y [B]``) and per-token labels
    (language modelling: ``x [B, T]``, ``y [B, T]``) alike.

    Args:
        model: the `Model`.
        label_smoothing: as in ``torch.nn.CrossEntropyLoss(label_smoothing=...)``.

    Returns:
        The loss function; its aux holds ``accuracy``, the new ``model_state`` and the
        counts ``invalid_labels`` (labels outside ``[0, C)`` where the mask is > 0) and
        ``invalid_mask`` (mask values outside ``[0, 1]``). Under jit these cannot raise:
        `fit` raises at the next logging point when one is > 0 (and leaves them out of
        the logs while they are 0); the loss is then NaN. Outside jit the loss raises
        at once.

    Example:
        >>> import jax.numpy as jnp, jaxtrain as jt
        >>> model = jt.from_function(lambda p, x: x @ p["w"])  # logits [B, 4]
        >>> loss_fn = classification_loss(model)
        >>> batch = {"x": jnp.ones((2, 3)), "y": jnp.array([0, 1])}
        >>> loss, aux = loss_fn({"w": jnp.zeros((3, 4))}, batch, rng=None, model_state={})
        >>> round(float(loss), 4), float(aux["accuracy"])  # log(4); argmax 0 is right once
        (1.3863, 0.5)
    """

    def loss_fn(params, batch, *, rng, model_state):
        x, y = _get(batch, "x", "model inputs"), _get(batch, "y", "integer labels")
        logits, new_model_state = model.apply(params, model_state, x, train=True, rng=rng)
        _check_labels(logits, y)
        mask = batch.get("mask")
        loss = losses.softmax_cross_entropy(logits, y, mask, label_smoothing)
        acc = losses.accuracy(logits, y, mask)
        n_labels, n_mask = losses._invalid_counts(logits.shape[-1], y, mask)
        return loss, {
            "accuracy": acc,
            losses.INVALID_LABELS: n_labels,
            losses.INVALID_MASK: n_mask,
            "model_state": new_model_state,
        }

    return loss_fn


def classification_eval(model: Model) -> Callable:
    """``eval_fn(params, batch, *, model_state) -> {"loss", "accuracy"}`` per example.

    Args:
        model: the `Model`; ``batch`` holds ``x [B, ...]`` and int labels ``y [B]`` (or
            ``[B, T]``), the model's logits ``[B, C]`` (or ``[B, T, C]``).

    Returns:
        The eval function, for `make_eval_step`: ``loss`` and ``accuracy`` have the
        labels' shape (``[B]`` or ``[B, T]``) and are mask-weighted by the step;
        ``invalid_labels`` and ``invalid_mask`` flag labels outside ``[0, C)`` (where the
        mask is > 0) and mask values outside ``[0, 1]``: `jaxtrain.metrics.compute` (and
        so `jaxtrain.evaluate`) raises when any is set, and leaves them out otherwise.

    Example:
        >>> import jax.numpy as jnp, jaxtrain as jt
        >>> eval_fn = classification_eval(jt.from_function(lambda p, x: x @ p["w"]))
        >>> batch = {"x": jnp.ones((2, 3)), "y": jnp.array([0, 1])}
        >>> out = eval_fn({"w": jnp.zeros((3, 4))}, batch, model_state={})
        >>> {name: out[name].shape for name in ("loss", "accuracy")}, out["accuracy"].tolist()
        ({'loss': (2,), 'accuracy': (2,)}, [1.0, 0.0])
    """

    def eval_fn(params, batch, *, model_state):
        x, y = _get(batch, "x", "model inputs"), _get(batch, "y", "integer labels")
        logits, _ = model.apply(params, model_state, x, train=False)
        _check_labels(logits, y)
        mask = batch.get("mask")
        # Flags, summed unweighted by the eval step (see jaxtrain.metrics): a padded
        # row's label is never read, a bad mask value always counts.
        bad_mask = (
            jnp.zeros(y.shape[:1], jnp.float32)
            if mask is None
            else losses._bad_mask(mask).astype(jnp.float32)
        )
        return {
            "loss": losses.cross_entropy_per_example(logits, y),
            "accuracy": losses.correct(logits, y),
            losses.INVALID_LABELS: losses._bad_labels(logits.shape[-1], y, mask).astype(
                jnp.float32
            ),
            losses.INVALID_MASK: bad_mask,
        }

    return eval_fn


def regression_loss(model: Model) -> Callable:
    """Mean-squared-error ``loss_fn`` (``torch.nn.MSELoss`` semantics).

    Args:
        model: the `Model`; its predictions must have the shape of ``batch["y"]``
            (``[B, ...]`` float targets).

    Returns:
        ``loss_fn(params, batch, *, rng, model_state) -> (loss, aux)``: the mask-weighted
        mean squared error (float32 scalar); aux holds the new ``model_state``.

    Example:
        >>> import jax.numpy as jnp, jaxtrain as jt
        >>> loss_fn = regression_loss(jt.from_function(lambda p, x: x * p["a"]))
        >>> batch = {"x": jnp.ones((2, 1)), "y": jnp.zeros((2, 1))}
        >>> loss, aux = loss_fn({"a": jnp.float32(2.0)}, batch, rng=None, model_state={})
        >>> float(loss)
        4.0
    """

    def loss_fn(params, batch, *, rng, model_state):
        x, y = _get(batch, "x", "model inputs"), _get(batch, "y", "regression targets")
        pred, new_model_state = model.apply(params, model_state, x, train=True, rng=rng)
        if tuple(pred.shape) != tuple(y.shape):
            raise ValueError(
                f"batch['y'] has shape {tuple(y.shape)} but the model predicts shape "
                f"{tuple(pred.shape)}; they must be equal for the squared error."
            )
        loss = losses.mean_squared_error(pred, y, batch.get("mask"))
        return loss, {"model_state": new_model_state}

    return loss_fn


def regression_eval(model: Model) -> Callable:
    """Per-example squared error ``{"mse": [B]}`` for `make_eval_step`.

    Args:
        model: the `Model`; predictions ``[B, ...]`` of the shape of ``batch["y"]``.

    Returns:
        ``eval_fn(params, batch, *, model_state) -> {"mse": [B]}``, the mean over each
        example's elements.

    Example:
        >>> import jax.numpy as jnp, jaxtrain as jt
        >>> eval_fn = regression_eval(jt.from_function(lambda p, x: x * p["a"]))
        >>> batch = {"x": jnp.array([[1.0], [2.0]]), "y": jnp.zeros((2, 1))}
        >>> eval_fn({"a": jnp.float32(2.0)}, batch, model_state={})["mse"].tolist()
        [4.0, 16.0]
    """

    def eval_fn(params, batch, *, model_state):
        pred, _ = model.apply(params, model_state, batch["x"], train=False)
        err = jnp.square(pred.astype(jnp.float32) - batch["y"].astype(jnp.float32))
        return {"mse": err.reshape(err.shape[0], -1).mean(axis=1)}

    return eval_fn


def init_model(model: Model, rng: jax.Array | int, sample_x) -> tuple:
    """``model.init`` with an int seed or a key; returns ``(params, model_state)``.

    Args:
        model: the `Model`.
        rng: an int seed or a typed key (``jax.random.key``).
        sample_x: a sample input batch ``[B, ...]`` (its values do not matter).

    Returns:
        ``(params, model_state)``.

    Example:
        >>> import numpy as np, jaxtrain as jt
        >>> model = jt.from_linen(jt.models.MLP(hidden=(8,), num_outputs=2))
        >>> params, model_state = init_model(model, 0, np.zeros((1, 3), np.float32))
        >>> params["Dense_1"]["kernel"].shape, model_state
        ((8, 2), {})
    """
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    return model.init(rng, jnp.asarray(sample_x))
