"""The non-finite guard inside the compiled step: skip (bitwise unchanged) or raise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_loss
from jaxtrain.data import load_digits


@pytest.fixture(scope="module")
def setup():
    train, _ = load_digits()
    train = {k: v[:256] for k, v in train.items()}
    model = jt.from_linen(jt.models.MLP(hidden=(16,)))
    params, _ = model.init(jax.random.key(0), train["x"][:1])
    return train, model, params


def _nan_batches(train, bad_index):
    """Four batches of 64; batch ``bad_index`` has a NaN input."""
    ds = jt.ArrayDataset(train, 64, shuffle=False)
    batches = list(ds.batches(0))
    x = batches[bad_index]["x"].copy()
    x[3, 2, 2, 0] = np.nan  # injected after the data set's own finite check
    batches[bad_index] = {**batches[bad_index], "x": x}
    return batches


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.mark.parametrize("jit", [True, False])
def test_skip_leaves_state_bitwise_unchanged_and_counts(setup, jit):
    train, model, params = setup
    opt = optax.adam(1e-2)
    step = jt.make_train_step(classification_loss(model), opt, nonfinite="skip", jit=jit)
    state = jt.TrainState.create(_copy(params), opt, 0)
    batches = _nan_batches(train, 1)
    state, m0 = step(state, batches[0])
    before = jax.device_get((state.params, state.opt_state))
    state, m1 = step(state, batches[1])
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(m0["skipped_steps"]) == 0 and int(m0["nonfinite"]) == -1
    assert int(m1["skipped_steps"]) == 1 and int(state.skipped_steps) == 1
    assert int(m1["nonfinite"]) == 0  # index 0 is the loss itself
    assert int(state.step) == 2  # the bad batch is consumed, not retried
    state, m2 = step(state, batches[2])  # training goes on
    assert np.isfinite(float(m2["loss"])) and int(m2["skipped_steps"]) == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_without_guard_nan_poisons_the_params(setup):
    """The control: the same batch without the guard turns parameters into NaN."""
    train, model, params = setup
    opt = optax.adam(1e-2)
    step = jt.make_train_step(classification_loss(model), opt)
    state = jt.TrainState.create(_copy(params), opt, 0)
    state, _ = step(state, _nan_batches(train, 0)[0])
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_raise_stops_fit_at_next_log_with_step_and_leaf(setup):
    train, model, params = setup
    opt = optax.sgd(0.1)

    step = jt.make_train_step(classification_loss(model), opt, nonfinite="raise")
    state = jt.TrainState.create(_copy(params), opt, 0)
    # Already on the device: fit does not read such batches back (numpy batches are
    # checked on the host, see below); the guard catches the NaN inside the step.
    batches = [jax.tree.map(jnp.asarray, b) for b in _nan_batches(train, 2)]
    with pytest.raises(FloatingPointError) as e:
        jt.fit(state, step, batches, epochs=1, log_every=4, progress=False)
    msg = str(e.value)
    assert "non-finite value at training step 3 (update skipped)" in msg
    assert "first non-finite leaf is loss" in msg


def test_raise_names_the_first_nonfinite_gradient_leaf(setup):
    train, model, params = setup
    opt = optax.sgd(0.1)
    base = classification_loss(model)

    def loss_fn(p, batch, *, rng, model_state):
        loss, aux = base(p, batch, rng=rng, model_state=model_state)
        # Finite loss, but d/d(bias of the last layer) of sqrt at 0 is inf.
        return loss + 0.0 * jnp.sqrt(
            jnp.abs(p["Dense_1"]["bias"][0] - p["Dense_1"]["bias"][0])
        ), aux

    step = jt.make_train_step(loss_fn, opt, nonfinite="raise")
    state = jt.TrainState.create(_copy(params), opt, 0)
    batches = list(jt.ArrayDataset(train, 64, shuffle=False).batches(0))
    with pytest.raises(
        FloatingPointError, match=r"step 1 .*first non-finite leaf is grads\['Dense_1'\]\['bias'\]"
    ):
        jt.fit(state, step, batches, epochs=1, log_every=2, progress=False)


def test_guard_does_not_sync_per_step(setup):
    train, model, params = setup
    opt = optax.adam(1e-2)
    step = jt.make_train_step(classification_loss(model), opt, nonfinite="raise")
    state = jt.TrainState.create(_copy(params), opt, 0)
    batches = list(jt.ArrayDataset(train, 64, shuffle=False).batches(0))
    with jax.transfer_guard_device_to_host("disallow"):
        _, h = jt.fit(state, step, batches, epochs=2, log_every=100, progress=False)
    assert h.steps == 8 and len(h.train) == 2 and h.train[-1]["skipped_steps"] == 0


def test_bad_policy_is_rejected():
    with pytest.raises(ValueError, match="nonfinite must be 'skip', 'raise' or None; got 'ignore'"):
        jt.make_train_step(lambda p, b: 0.0, optax.sgd(0.1), nonfinite="ignore")


def _lr_nan_setup(setup):
    train, model, params = setup
    batches = list(jt.ArrayDataset(train, 64, shuffle=False).batches(0))
    return model, params, batches


@pytest.mark.parametrize("how", ["inject", "schedule"])
@pytest.mark.parametrize("kind", ["single", "fused", "accum"])
def test_nan_learning_rate_is_skipped_not_written_into_params(setup, how, kind):
    """Finite loss and gradients, NaN update: the guard checks the update and new params."""
    model, params, batches = _lr_nan_setup(setup)
    if how == "inject":
        opt = optax.inject_hyperparams(optax.sgd)(learning_rate=jnp.nan)
    else:
        opt = optax.sgd(lambda step: jnp.where(step >= 1, jnp.nan, 0.1))  # NaN from step 1
    loss = classification_loss(model)
    if kind == "fused":
        step = jt.make_train_steps(loss, opt, steps_per_call=2, nonfinite="skip")
        batch = {k: np.stack([batches[0][k], batches[1][k]]) for k in batches[0]}
    else:
        step = jt.make_train_step(
            loss, opt, nonfinite="skip", grad_accum_steps=2 if kind == "accum" else 1
        )
        batch = batches[0]
    state = jt.TrainState.create(_copy(params), opt, 0)
    state, m = step(state, batch)
    if kind != "fused":
        state, m = step(state, batches[1])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert int(state.step) == 2
    skipped = 2 if how == "inject" else 1  # the schedule is finite at step 0
    assert int(state.skipped_steps) == skipped
    if how == "schedule":  # step 0 ran, step 1 was skipped: the params of step 1
        ref = jt.TrainState.create(_copy(params), optax.sgd(0.1), 0)
        accum = 2 if kind == "accum" else 1
        ref, _ = jt.make_train_step(loss, optax.sgd(0.1), grad_accum_steps=accum)(ref, batches[0])
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_learning_rate_raise_names_the_update(setup):
    model, params, batches = _lr_nan_setup(setup)
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=jnp.nan)
    step = jt.make_train_step(classification_loss(model), opt, nonfinite="raise")
    state = jt.TrainState.create(_copy(params), opt, 0)
    with pytest.raises(
        FloatingPointError,
        match=r"step 1 \(update skipped\): first non-finite leaf is "
        r"updates\['Dense_0'\]\['bias'\] \(the loss and gradients were finite: check the "
        r"learning rate",
    ):
        jt.fit(state, step, batches, epochs=1, log_every=2, progress=False)


def test_infinite_param_names_the_new_params(setup):
    """An update that is finite but overflows the parameter: named as 'new params'."""
    train, model, params = setup
    opt = optax.sgd(3e38)  # loss, gradient (-1) and update (+3e38) are finite
    step = jt.make_train_step(lambda p, b: -p["Dense_1"]["bias"][0], opt, nonfinite="skip")
    p = _copy(params)
    p["Dense_1"]["bias"] = p["Dense_1"]["bias"] + 3e38
    state = jt.TrainState.create(p, opt, 0)
    state, m = step(state, {"x": jnp.zeros((1,))})
    name = step.spec.nonfinite_names[int(m["nonfinite"])]
    assert name == "new params['Dense_1']['bias']", name
    np.testing.assert_array_equal(np.asarray(state.params["Dense_1"]["bias"]), p["Dense_1"]["bias"])


def test_nan_input_from_a_plain_iterable_is_an_error_naming_the_batch(setup):
    """Numpy batches from any iterable are checked on the host before placement."""
    train, model, params = setup
    opt = optax.sgd(0.1)
    step = jt.make_train_step(classification_loss(model), opt)
    state = jt.TrainState.create(_copy(params), opt, 0)
    with pytest.raises(
        ValueError,
        match=r"train_data epoch 0, batch 1: batch\['x'\] holds nan at index \(3, 2, 2, 0\) "
        r"\(example 3 of the batch\).*Fix",
    ):
        jt.fit(state, step, _nan_batches(train, 1), epochs=1, progress=False)
    assert step.trace_count <= 1  # refused before the bad batch reached the device
