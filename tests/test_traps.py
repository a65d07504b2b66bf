"""The research loop has no traps: donation never eats the caller's arrays, a consumed
state says so, NNX randomness follows the TrainState's key, a loss cannot silently
freeze the model state, seeds outside the key range are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss

X = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32)
BATCH = {"x": jnp.asarray(X), "y": jnp.asarray(Y)}


def _function_model():
    model = jt.from_function(
        lambda p, x: x @ p["w"] + p["b"],
        init_fn=lambda rng, x: {"w": jax.random.normal(rng, (4, 2)), "b": jnp.zeros(2)},
    )
    return model, *model.init(jax.random.key(0), X[:2])


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def _nnx_model(rngs=None):
    model = jt.from_nnx(_Net(rngs or nnx.Rngs(params=0, dropout=1)))
    return model, *model.init(None, None)


def _batch(mesh):
    return BATCH if mesh is None else jt.shard_batch(BATCH, mesh)


@pytest.mark.parametrize("kind", ["function", "nnx"])
@pytest.mark.parametrize("use_mesh", [False, True])
def test_one_init_two_optimizers_both_train_with_donated_steps(kind, use_mesh):
    """The research pattern: init once, a state per optimizer, train both, compare."""
    model, params, model_state = _function_model() if kind == "function" else _nnx_model()
    mesh = jt.data_mesh() if use_mesh else None
    # Copies, not views: a numpy view of a CPU buffer pins it (JAX then copies instead
    # of donating), which would hide the bug this test is about.
    before = jax.tree.map(lambda a: np.array(a, copy=True), params)
    loss = classification_loss(model)
    runs = {}
    opts = {"sgd": optax.sgd(0.1), "adam": optax.adam(1e-2)}
    states = {n: jt.TrainState.create(params, o, 0, model_state) for n, o in opts.items()}
    for name, opt in opts.items():
        step = jt.make_train_step(loss, opt, mesh=mesh)  # donates its input state
        state = states[name]
        for _ in range(3):
            state, _ = step(state, _batch(mesh))
        runs[name] = state
    assert all(int(s.step) == 3 for s in runs.values())
    # Both trained, differently, and the caller's init is intact (not donated away).
    a, b = (jax.tree.leaves(runs[n].params) for n in opts)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    # A module's init gives new arrays each call, never the same buffers twice.
    if kind == "nnx":
        again, _ = model.init(None, None)
        assert all(
            x is not y for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True)
        )


def test_replicate_and_shard_state_copy_by_default():
    mesh = jt.data_mesh()
    w = jnp.ones((4, 2))
    step = jax.jit(lambda t: jax.tree.map(lambda a: a + 1, t), donate_argnums=0)
    for place in (jt.replicate, jt.shard_state):
        step(place({"w": w}, mesh))
        assert not w.is_deleted()
    np.testing.assert_array_equal(w, np.ones((4, 2)))


def _consumed_message(name):
    return rf"{name} got a state whose arrays were donated .*this TrainState was donated. Fix: use the state that call returned, `state, metrics = train_step\(state, batch\)`"


def test_reusing_a_donated_state_says_donated_and_the_fix():
    model, params, ms = _function_model()
    opt = optax.sgd(0.1)
    loss = classification_loss(model)
    step = jt.make_train_step(loss, opt)
    old = jt.TrainState.create(params, opt, 0)
    new, _ = step(old, BATCH)
    with pytest.raises(RuntimeError, match=_consumed_message("train_step")):
        step(old, BATCH)
    steps = jt.make_train_steps(loss, opt, steps_per_call=2)
    stacked = {k: jnp.stack([v, v]) for k, v in BATCH.items()}
    old = jt.TrainState.create(params, opt, 0)
    steps(old, stacked)
    with pytest.raises(RuntimeError, match=_consumed_message("train_steps")):
        steps(old, stacked)
    ev = jt.make_eval_step(classification_eval(model))
    with pytest.raises(RuntimeError, match=_consumed_message("eval_step")):
        ev(old, BATCH)
    # The state the step returned is the one to use.
    new, _ = step(new, BATCH)
    assert int(new.step) == 2


def _nnx_run(module_rngs, state_seed, steps=4):
    model, _, model_state = _nnx_model(module_rngs)
    _, params, _ = _nnx_model()  # the same params for every run; only the streams differ
    opt = optax.sgd(0.5)

    def loss_fn(p, batch, rng):  # no model_state: the module's own streams stay put
        logits, _ = model.apply(p, model_state, batch["x"], train=True, rng=rng)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {"probe": jnp.sum(logits * jnp.arange(logits.size).reshape(logits.shape))}

    step = jt.make_train_step(loss_fn, opt)
    state = jt.TrainState.create(params, opt, state_seed, model_state)
    probes = []
    for _ in range(steps):
        state, m = step(state, BATCH)
        probes.append(float(m["probe"]))
    return jax.tree.map(np.asarray, state.params), probes


@pytest.mark.parametrize("rngs_b", [nnx.Rngs(params=0, dropout=99), nnx.Rngs(0)])
def test_nnx_randomness_follows_the_train_state_key(rngs_b):
    params_a, probes_a = _nnx_run(nnx.Rngs(params=0, dropout=1), 0)
    # Modules built with other nnx.Rngs (another dropout seed; only a default stream):
    # the same TrainState key gives bitwise the same training.
    params_b, probes_b = _nnx_run(rngs_b, 0)
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)
    assert probes_a == probes_b
    # Masks differ from step to step (with lr 0.5 the params move too, so compare
    # dropout directly below) and another TrainState key gives another run.
    params_c, _ = _nnx_run(rngs_b, 1)
    assert any(
        not np.array_equal(a, c)
        for a, c in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_c), strict=True)
    )


def test_nnx_masks_differ_per_step_without_threading_model_state():
    model, params, model_state = _nnx_model(nnx.Rngs(0))  # only a "default" stream
    x = jnp.ones((8, 4))
    key = jax.random.key(3)
    y = [
        model.apply(params, model_state, x, train=True, rng=jax.random.fold_in(key, s))[0]
        for s in (0, 1, 0)
    ]
    assert not np.array_equal(y[0], y[1])
    np.testing.assert_array_equal(y[0], y[2])
    with pytest.raises(
        ValueError,
        match=r"_Net has RNG streams \['default'\] .* got rng=None.*Fix: take `rng` in your loss_fn",
    ):
        model.apply(params, model_state, x, train=True)


class _BN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))


def test_loss_that_drops_model_state_is_an_error():
    model = jt.from_linen(_BN())
    params, model_state = model.init(jax.random.key(0), X[:2])
    opt = optax.sgd(0.1)

    def forgetful(params, batch, *, rng, model_state):
        logits, _ = model.apply(params, model_state, batch["x"], train=True, rng=rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    step = jt.make_train_step(forgetful, opt)
    state = jt.TrainState.create(params, opt, 0, model_state)
    with pytest.raises(
        ValueError,
        match=r"loss_fn takes model_state but did not return it in aux\['model_state'\].*"
        r"BatchNorm statistics would freeze\). Fix: return \(loss, \{'model_state'",
    ):
        step(state, BATCH)
    # Returning it (or the given one, to freeze on purpose) is fine.
    state, _ = jt.make_train_step(classification_loss(model), opt)(state, BATCH)

    def frozen(params, batch, *, rng, model_state):
        logits, _ = model.apply(params, model_state, batch["x"], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {"model_state": model_state}

    jt.make_train_step(frozen, opt)(state, BATCH)
    # An empty model state has nothing to freeze: a loss may take it and not return it.
    empty = jt.TrainState.create({"w": jnp.zeros((4, 2))}, opt, 0)
    jt.make_train_step(lambda p, b, *, model_state: jnp.sum(p["w"] ** 2), opt)(empty, BATCH)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63, 2**64, np.int64(-5)])
def test_create_refuses_seeds_outside_the_key_range(seed):
    with pytest.raises(
        ValueError, match=r"rng seed must be an integer in \[0, 4294967295\] \(2\*\*32 - 1\); got"
    ):
        jt.TrainState.create({"w": jnp.zeros(2)}, optax.sgd(0.1), seed)


def test_create_accepts_the_whole_key_range():
    for seed in (0, 2**32 - 1, np.uint32(7)):
        jt.TrainState.create({"w": jnp.zeros(2)}, optax.sgd(0.1), seed)


@pytest.mark.parametrize("rng", ["0", 1.5, True, None])
def test_create_names_an_rng_of_the_wrong_type(rng):
    with pytest.raises(
        TypeError,
        match=r"rng must be an int seed, a typed PRNG key .*; got .*Fix: pass an int seed",
    ):
        jt.TrainState.create({"w": jnp.zeros(2)}, optax.sgd(0.1), rng)
