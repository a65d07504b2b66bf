"""TrainState.create: initial values, key handling, pytree purity and clear errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain import TrainState
from jaxtrain.state import as_key_data


def _params():
    return {"dense": {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}, "scale": jnp.float32(1.5)}


def test_step_is_int32_zero_scalar():
    state = TrainState.create(_params(), optax.adam(1e-3), 0)
    assert isinstance(state.step, jax.Array)
    assert state.step.shape == ()
    assert state.step.dtype == jnp.int32
    assert int(state.step) == 0


def test_rng_from_int_seed_is_uint32_key_data():
    state = TrainState.create(_params(), optax.sgd(0.1), 7)
    expected = jax.random.key_data(jax.random.key(7))
    assert state.rng.dtype == jnp.uint32
    assert not jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
    assert state.rng.shape == expected.shape
    np.testing.assert_array_equal(state.rng, expected)


def test_rng_from_typed_key_and_raw_key_data_agree():
    key = jax.random.key(123)
    from_typed = TrainState.create(_params(), optax.sgd(0.1), key).rng
    from_raw = TrainState.create(_params(), optax.sgd(0.1), jax.random.key_data(key)).rng
    from_int = TrainState.create(_params(), optax.sgd(0.1), 123).rng
    assert from_typed.dtype == jnp.uint32
    np.testing.assert_array_equal(from_typed, jax.random.key_data(key))
    np.testing.assert_array_equal(from_raw, from_typed)
    np.testing.assert_array_equal(from_int, from_typed)
    # Different seeds give different key data.
    other = TrainState.create(_params(), optax.sgd(0.1), 124).rng
    assert not np.array_equal(other, from_typed)


def test_step_rng_is_fold_in_of_rng_and_step():
    state = TrainState.create(_params(), optax.sgd(0.1), 5)
    state = state.replace(step=jnp.int32(3))
    expected = jax.random.fold_in(jax.random.key(5), 3)
    np.testing.assert_array_equal(
        jax.random.key_data(state.step_rng()), jax.random.key_data(expected)
    )


def test_bad_rng_has_clear_message():
    with pytest.raises(TypeError) as exc:
        as_key_data(jnp.zeros((3,), jnp.float32))
    msg = str(exc.value)
    assert "float32" in msg
    assert "(3,)" in msg
    assert "jax.random.key(seed)" in msg


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.adam(1e-3),
        optax.adamw(1e-3, weight_decay=1e-2),
        optax.sgd(0.1, momentum=0.9),
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    ],
    ids=["adam", "adamw", "sgd_momentum", "chain"],
)
def test_opt_state_equals_optimizer_init(optimizer):
    params = _params()
    state = TrainState.create(params, optimizer, 0)
    expected = optimizer.init(params)
    chex.assert_trees_all_equal_structs(state.opt_state, expected)
    chex.assert_trees_all_equal(state.opt_state, expected)
    chex.assert_trees_all_equal(state.params, params)


def test_state_is_pytree_of_arrays_only():
    state = TrainState.create(
        _params(), optax.adam(1e-3), 0, model_state={"batch_stats": {"mean": jnp.zeros(2)}}
    )
    leaves_with_path = jax.tree_util.tree_leaves_with_path(state)
    # Every field is data: step, 3 params, adam's count + mu + nu, rng, 1 model-state
    # array, skipped_steps (loss_scale is empty without a float16 policy).
    opt_leaves = len(jax.tree.leaves(optax.adam(1e-3).init(_params())))
    assert opt_leaves == 7
    assert len(leaves_with_path) == 1 + 3 + opt_leaves + 1 + 1 + 1
    for path, leaf in leaves_with_path:
        assert isinstance(leaf, (jax.Array, np.ndarray)), (jax.tree_util.keystr(path), leaf)
    # Round trip through flatten/unflatten preserves everything (no static junk).
    flat, treedef = jax.tree_util.tree_flatten(state)
    rebuilt = jax.tree_util.tree_unflatten(treedef, flat)
    chex.assert_trees_all_equal(rebuilt, state)
    # Passes through jit as a plain argument.
    out = jax.jit(lambda s: s)(state)
    chex.assert_trees_all_equal(out, state)


def test_default_model_state_is_empty_dict():
    state = TrainState.create(_params(), optax.sgd(0.1), 0)
    assert state.model_state == {}
    ms = {"batch_stats": {"var": jnp.ones(4)}}
    state = TrainState.create(_params(), optax.sgd(0.1), 0, model_state=ms)
    chex.assert_trees_all_equal(state.model_state, ms)


@pytest.mark.parametrize("bad", ["adam", lambda grads: grads, object()], ids=["str", "fn", "obj"])
def test_non_optax_optimizer_raises_clear_type_error(bad):
    with pytest.raises(TypeError) as exc:
        TrainState.create(_params(), bad, 0)
    msg = str(exc.value)
    assert "optax.GradientTransformation" in msg  # names the problem
    assert type(bad).__name__ in msg  # names the value that was given
    assert "optax.adam(" in msg  # shows the fix


def test_integer_params_raise_clear_type_error():
    params = {"w": jnp.ones(3), "count": jnp.arange(3, dtype=jnp.int32)}
    with pytest.raises(TypeError) as exc:
        TrainState.create(params, optax.sgd(0.1), 0)
    msg = str(exc.value)
    assert "floating point" in msg  # names the problem
    assert "integer" in msg
    assert "count" in msg  # names the offending leaf
    assert "'w'" not in msg  # ... and only that one
    assert "Fix" in msg and "jnp.float32" in msg and "model_state" in msg  # the fix


def test_numpy_integer_seed_is_an_int_seed():
    import numpy as np

    a = TrainState.create({"w": jnp.zeros(2)}, optax.sgd(0.1), np.int64(3))
    b = TrainState.create({"w": jnp.zeros(2)}, optax.sgd(0.1), 3)
    np.testing.assert_array_equal(a.rng, b.rng)
