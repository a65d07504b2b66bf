"""Ready-made loss and eval functions for a `Model` on ``{"x", "y", "mask"}`` batches.

They are ordinary pure functions of the shapes `make_train_step` / `make_eval_step`
expect; write your own the same way when your task differs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import losses
from jaxtrain.models.adapters import Model


def classification_loss(model: Model, label_smoothing: float = 0.0) -> Callable:
    """``loss_fn(params, batch, *, rng, model_state) -> (loss, aux)`` for classification.

    Works for per-example labels (``x [B, ...]``, ``y [B]``) and per-token labels
    (language modelling: ``x [B, T]``, ``y [B, T]``) alike.

    Args:
        model: the `Model`.
        label_smoothing: as in ``torch.nn.CrossEntropyLoss(label_smoothing=...)``.

    Returns:
        The loss function; its aux holds ``accuracy`` and the new ``model_state``.
    """

    def loss_fn(params, batch, *, rng, model_state):
        logits, new_model_state = model.apply(params, model_state, batch["x"], train=True, rng=rng)
        mask = batch.get("mask")
        loss = losses.softmax_cross_entropy(logits, batch["y"], mask, label_smoothing)
        acc = losses.accuracy(logits, batch["y"], mask)
        return loss, {"accuracy": acc, "model_state": new_model_state}

    return loss_fn


def classification_eval(model: Model) -> Callable:
    """``eval_fn(params, batch, *, model_state) -> {"loss", "accuracy"}`` per example.

    Returns:
        The eval function, for `make_eval_step`: values have the labels' shape
        (``[B]`` or ``[B, T]``) and are mask-weighted by the step.
    """

    def eval_fn(params, batch, *, model_state):
        logits, _ = model.apply(params, model_state, batch["x"], train=False)
        return {
            "loss": losses.cross_entropy_per_example(logits, batch["y"]),
            "accuracy": losses.correct(logits, batch["y"]),
        }

    return eval_fn


def regression_loss(model: Model) -> Callable:
    """Mean-squared-error ``loss_fn`` (``torch.nn.MSELoss`` semantics)."""

    def loss_fn(params, batch, *, rng, model_state):
        pred, new_model_state = model.apply(params, model_state, batch["x"], train=True, rng=rng)
        loss = losses.mean_squared_error(pred, batch["y"], batch.get("mask"))
        return loss, {"model_state": new_model_state}

    return loss_fn


def regression_eval(model: Model) -> Callable:
    """Per-example squared error ``{"mse": [B]}`` for `make_eval_step`."""

    def eval_fn(params, batch, *, model_state):
        pred, _ = model.apply(params, model_state, batch["x"], train=False)
        err = jnp.square(pred.astype(jnp.float32) - batch["y"].astype(jnp.float32))
        return {"mse": err.reshape(err.shape[0], -1).mean(axis=1)}

    return eval_fn


def init_model(model: Model, rng: jax.Array | int, sample_x) -> tuple:
    """``model.init`` with an int seed or a key; returns ``(params, model_state)``."""
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    return model.init(rng, jnp.asarray(sample_x))
