"""Each adapter (Flax linen, Flax NNX, plain function) trains a model end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.data import load_digits


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits()
    return jt.ArrayDataset(train, 64, seed=0), jt.ArrayDataset(test, 120, shuffle=False)


def _train(model, params, model_state, digits, epochs=3):
    train_ds, test_ds = digits
    opt = optax.adam(3e-3)
    state = jt.TrainState.create(params, opt, 0, model_state)
    step = jt.make_train_step(classification_loss(model), opt)
    ev = jt.make_eval_step(classification_eval(model))
    before = jt.evaluate(ev, state, test_ds)
    state, hist = jt.fit(state, step, train_ds, epochs=epochs, log_every=10, progress=False)
    after = jt.evaluate(ev, state, test_ds)
    return state, hist, before, after, step


class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(64)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)


def test_linen_adapter_trains_and_updates_batch_stats(digits):
    model = jt.from_linen(LinenBN())
    x = digits[0].arrays["x"][:2]
    params, model_state = model.init(jax.random.key(0), x)
    assert set(model_state) == {"batch_stats"}
    stats0 = jax.tree.map(np.asarray, model_state)
    state, hist, before, after, step = _train(model, params, model_state, digits)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.9
    assert hist.train[-1]["loss"] < hist.train[0]["loss"]
    # BatchNorm statistics moved (mutable collection threaded through model_state).
    moved = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), stats0, state.model_state)
    assert all(jax.tree.leaves(moved))
    assert step.trace_count == 1


def test_linen_module_without_train_argument(digits):
    model = jt.from_linen(jt.models.MLP(hidden=(32,)))  # MLP takes train; check a plain Dense too
    plain = jt.from_linen(nn.Dense(10))
    x = digits[0].arrays["x"][:2].reshape(2, -1)
    params, ms = plain.init(jax.random.key(0), x)
    y, ms2 = plain.apply(params, ms, x, train=True, rng=jax.random.key(1))
    assert y.shape == (2, 10) and ms2 == {}
    p, _ = model.init(jax.random.key(0), digits[0].arrays["x"][:2])
    assert p["Dense_0"]["kernel"].shape == (64, 32)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 64, rngs=rngs)
        self.bn = nnx.BatchNorm(64, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.l2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def test_nnx_adapter_trains_and_updates_batch_stats(digits):
    model = jt.from_nnx(NNXNet(nnx.Rngs(0, dropout=1)))
    params, model_state = model.init(None, None)
    mean0 = np.asarray(model_state["bn"]["mean"][...])
    state, hist, before, after, step = _train(model, params, model_state, digits, epochs=4)
    assert after["loss"] < 0.5 * before["loss"]
    assert hist.train[-1]["loss"] < hist.train[0]["loss"]
    assert not np.allclose(np.asarray(state.model_state["bn"]["mean"][...]), mean0)
    assert step.trace_count == 1


def test_nnx_dropout_follows_step_key(digits):
    """Dropout masks come from the step's key: same key, same output; new key, new output."""
    model = jt.from_nnx(NNXNet(nnx.Rngs(0, dropout=1)))
    params, ms = model.init(None, None)
    x = jnp.asarray(digits[0].arrays["x"][:8])
    k1, k2 = jax.random.key(1), jax.random.key(2)
    y1, _ = model.apply(params, ms, x, train=True, rng=k1)
    y1b, _ = model.apply(params, ms, x, train=True, rng=k1)
    y2, _ = model.apply(params, ms, x, train=True, rng=k2)
    np.testing.assert_array_equal(y1, y1b)
    assert not np.allclose(y1, y2)
    # Eval mode is deterministic and uses running statistics.
    e1, _ = model.apply(params, ms, x, train=False)
    e2, _ = model.apply(params, ms, x, train=False)
    np.testing.assert_array_equal(e1, e2)


def test_plain_function_adapter_trains(digits):
    def forward(params, x):
        h = jnp.tanh(x.reshape((x.shape[0], -1)) @ params["w1"] + params["b1"])
        return h @ params["w2"] + params["b2"]

    def init_fn(rng, x):
        k1, k2 = jax.random.split(rng)
        return {
            "w1": jax.random.normal(k1, (64, 32)) * 0.1,
            "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 10)) * 0.1,
            "b2": jnp.zeros(10),
        }

    model = jt.from_function(forward, init_fn)
    params, ms = model.init(jax.random.key(0), digits[0].arrays["x"][:2])
    assert ms == {}
    _, hist, before, after, step = _train(model, params, ms, digits)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.85
    assert step.trace_count == 1


def test_adapter_errors_name_the_problem():
    with pytest.raises(TypeError, match="from_linen expects a flax.linen.Module; got int"):
        jt.from_linen(3)
    with pytest.raises(TypeError, match="from_nnx expects a flax.nnx.Module; got Dense"):
        jt.from_nnx(nn.Dense(3))
    with pytest.raises(TypeError, match=r"from_function expects a callable \(params, x\) -> y"):
        jt.from_function("not a function")
    no_init = jt.from_function(lambda p, x: x, name="net")
    with pytest.raises(ValueError, match="net has no init_fn: pass from_function"):
        no_init.init(jax.random.key(0), jnp.zeros((1, 2)))
