"""jaxtrain.evaluate: masked, exact metrics over a data set with a partial last batch."""

import functools

import jax
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain import ArrayDataset, TrainState, evaluate, make_eval_step
from jaxtrain.apps.tasks import classification_eval
from jaxtrain.data import load_digits

MODULE = jt.models.MLP(hidden=(32,), num_outputs=10)
MODEL = jt.from_linen(MODULE)
BATCH = 64


@functools.cache
def _setup():
    _, test = load_digits()
    params, model_state = jax.jit(MODEL.init)(jax.random.key(0), test["x"][:1])
    # Perturb the init so that the predictions are far from uniform (a sharper test).
    params = jax.tree.map(lambda p: p * 3.0 + 0.05, params)
    state = TrainState.create(params, optax.sgd(0.1), 0, model_state)
    eval_step = make_eval_step(classification_eval(MODEL))
    return test, state, eval_step


def _exact(test, state):
    """The metrics over all examples at once, in float64 numpy."""
    logits = np.asarray(MODULE.apply({"params": state.params}, test["x"]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -logp[np.arange(len(test["y"])), test["y"]].mean()
    accuracy = (logits.argmax(-1) == test["y"]).mean()
    return {"loss": loss, "accuracy": accuracy}


def _assert_matches(result, exact):
    assert set(result) == {"loss", "accuracy"}
    np.testing.assert_allclose(result["loss"], exact["loss"], rtol=1e-6)
    np.testing.assert_allclose(result["accuracy"], exact["accuracy"], rtol=1e-6)


def test_evaluate_with_partial_last_batch_is_exact():
    test, state, eval_step = _setup()
    ds = ArrayDataset(test, BATCH, shuffle=False)
    batches = list(ds.batches(0))
    assert len(batches) == 6 and batches[-1]["mask"].sum() == 360 - 5 * BATCH
    exact = _exact(test, state)
    assert 0.0 < exact["accuracy"] < 1.0
    result = evaluate(eval_step, state, ds)
    _assert_matches(result, exact)
    # The padded zero rows would have changed the result had they counted.
    unmasked = [{k: v for k, v in b.items() if k != "mask"} for b in batches]
    assert abs(evaluate(eval_step, state, unmasked)["loss"] - exact["loss"]) > 1e-4
    # Mean of per-batch means is NOT the exact answer (the test can tell them apart).
    per_batch = [evaluate(eval_step, state, [b])["loss"] for b in batches]
    assert abs(np.mean(per_batch) - exact["loss"]) > 1e-4
    assert eval_step.trace_count == 2  # with a mask, and without: one trace each


def test_evaluate_ignores_garbage_in_padded_rows():
    test, state, eval_step = _setup()
    rng = np.random.default_rng(0)
    clean = list(ArrayDataset(test, BATCH, shuffle=False).batches(0))
    dirty = []
    for batch in clean:
        batch = {k: v.copy() for k, v in batch.items()}
        pad = batch["mask"] == 0
        batch["x"][pad] = rng.normal(scale=50.0, size=batch["x"][pad].shape)
        batch["y"][pad] = rng.integers(0, 10, size=int(pad.sum()))
        dirty.append(batch)
    assert sum(int((b["mask"] == 0).sum()) for b in dirty) == 6 * BATCH - 360
    exact = _exact(test, state)
    _assert_matches(evaluate(eval_step, state, dirty), exact)
    # Without the mask the garbage counts and the result differs.
    unmasked = [{k: v for k, v in b.items() if k != "mask"} for b in dirty]
    assert abs(evaluate(eval_step, state, unmasked)["loss"] - exact["loss"]) > 1e-3
    assert eval_step.trace_count == 2  # with a mask, and without: one trace each


@pytest.mark.parametrize("batch_size", [7, 360, 500])
def test_evaluate_is_exact_for_any_batching_and_order(batch_size):
    test, state, _ = _setup()
    eval_step = make_eval_step(classification_eval(MODEL))
    exact = _exact(test, state)
    _assert_matches(
        evaluate(eval_step, state, ArrayDataset(test, batch_size, shuffle=False)), exact
    )
    # evaluate serves epoch 0 of a shuffled set; the order does not matter either.
    shuffled = ArrayDataset(test, batch_size, shuffle=True, seed=3)
    _assert_matches(evaluate(eval_step, state, shuffled), exact)
    assert eval_step.trace_count == 1


def test_evaluate_on_no_batches_raises():
    _, state, eval_step = _setup()
    with pytest.raises(ValueError, match="no batches"):
        evaluate(eval_step, state, [])
