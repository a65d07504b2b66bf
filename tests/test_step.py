"""make_train_step / make_eval_step: equivalence to a hand-written loop, tracing,
per-step randomness, metrics, donation and error messages."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain import ArrayDataset, TrainState, make_eval_step, make_train_step
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.data import load_digits
from jaxtrain.losses import softmax_cross_entropy

# A small MLP with dropout, so that the per-step rng matters for the result.
MODULE = jt.models.MLP(hidden=(32,), num_outputs=10, dropout=0.1)
MODEL = jt.from_linen(MODULE)


@functools.cache
def _digits():
    train, _ = load_digits()
    return train


def _small_dataset(n=200, batch_size=32, seed=0):
    train = _digits()
    return ArrayDataset({"x": train["x"][:n], "y": train["y"][:n]}, batch_size, seed=seed)


@functools.cache
def _batches(n_steps=20):
    """``n_steps`` batches of 32 from 200 examples: crosses epochs, includes padded ones."""
    ds = _small_dataset()
    out = []
    for _, batch in ds.iterate():
        out.append(batch)
        if len(out) == n_steps:
            break
    return tuple(out)


_jit_init = jax.jit(MODEL.init)


def _init_state(optimizer, seed=0):
    # Jitted: one compile instead of compiling every initializer op eagerly.
    params, model_state = _jit_init(jax.random.key(seed), _digits()["x"][:1])
    return TrainState.create(params, optimizer, seed, model_state)


def _copy(tree):
    """A deep copy on the device (the step donates its input state)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _assert_trees_bitwise_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


# ---------------------------------------------------------------- linear toy problem


def _linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def _linear_batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _linear_state(optimizer, seed=0):
    return TrainState.create({"w": jnp.zeros(3, jnp.float32)}, optimizer, seed)


# ---------------------------------------------------------------- bitwise reference


OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_train_step_matches_hand_written_loop_bitwise(opt_name):
    optimizer = OPTIMIZERS[opt_name]()
    batches = _batches(20)
    assert any(b["mask"].min() == 0 for b in batches)  # padded batches are included

    def ref_loss(params, batch, rng):
        logits = MODULE.apply({"params": params}, batch["x"], train=True, rngs={"dropout": rng})
        return softmax_cross_entropy(logits, batch["y"], batch["mask"])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def ref_step(params, opt_state, rng_data, step, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)
        loss, grads = jax.value_and_grad(ref_loss)(params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, optax.tree.norm(grads)

    state = _init_state(optimizer)
    params, opt_state = _copy(state.params), _copy(state.opt_state)
    rng_data = np.asarray(state.rng)
    train_step = make_train_step(classification_loss(MODEL), optimizer)

    for i, batch in enumerate(batches):
        state, metrics = train_step(state, batch)
        params, opt_state, ref_loss_value, ref_grad_norm = ref_step(
            params, opt_state, rng_data, jnp.int32(i), batch
        )
        np.testing.assert_array_equal(metrics["loss"], ref_loss_value, err_msg=f"step {i}")
        np.testing.assert_array_equal(metrics["grad_norm"], ref_grad_norm, err_msg=f"step {i}")

    assert int(state.step) == 20
    _assert_trees_bitwise_equal(state.params, params)
    _assert_trees_bitwise_equal(state.opt_state, opt_state)
    # Training did move the parameters (the comparison is not vacuous).
    initial = _init_state(optimizer).params
    assert not np.array_equal(state.params["Dense_0"]["kernel"], initial["Dense_0"]["kernel"])
    assert train_step.trace_count == 1


# ---------------------------------------------------------------- jit / no-jit variants


def _tiny_mlp_loss(params, batch, rng):
    """A plain-jnp MLP with dropout (few primitives, so the un-jitted run stays cheap)."""
    h = jnp.tanh(batch["x"].reshape(batch["x"].shape[0], -1) @ params["w1"] + params["b1"])
    keep = jax.random.bernoulli(rng, 0.9, h.shape)
    h = jnp.where(keep, h / 0.9, 0.0)
    logits = h @ params["w2"] + params["b2"]
    return softmax_cross_entropy(logits, batch["y"], batch["mask"])


def _tiny_mlp_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(rng.normal(scale=0.1, size=(64, 16)), jnp.float32),
        "b1": jnp.zeros(16, jnp.float32),
        "w2": jnp.asarray(rng.normal(scale=0.1, size=(16, 10)), jnp.float32),
        "b2": jnp.zeros(10, jnp.float32),
    }


def test_jit_and_no_jit_variants_agree():
    optimizer = optax.sgd(0.1, momentum=0.9)
    step_jit = make_train_step(_tiny_mlp_loss, optimizer, jit=True)
    step_eager = make_train_step(_tiny_mlp_loss, optimizer, jit=False)
    assert step_eager.jitted is step_eager.fn  # jit=False: the pure function itself
    s_jit = TrainState.create(_tiny_mlp_params(), optimizer, 0)
    s_eager = TrainState.create(_tiny_mlp_params(), optimizer, 0)
    for batch in _batches(3):
        s_jit, m_jit = step_jit(s_jit, batch)
        s_eager, m_eager = step_eager(s_eager, batch)
        chex.assert_trees_all_close(m_jit, m_eager, rtol=1e-5, atol=1e-6)
    assert int(s_jit.step) == int(s_eager.step) == 3
    chex.assert_trees_all_close(s_jit, s_eager, rtol=1e-5, atol=1e-6)
    # The comparison is not vacuous: the parameters moved.
    assert not np.allclose(s_jit.params["w2"], _tiny_mlp_params()["w2"], atol=1e-4)
    assert step_jit.trace_count == 1


class StepFnVariantsTest(chex.TestCase):
    """The un-jitted ``step.fn`` is a pure function: jitting it or not gives the same result."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_fn_variants(self):
        optimizer = optax.sgd(0.05, momentum=0.9)
        step = make_train_step(_linear_loss, optimizer, jit=False)
        fn = self.variant(step.fn)
        state = _linear_state(optimizer)
        for seed in range(3):
            state, metrics = fn(state, _linear_batch(seed))
        assert int(state.step) == 3
        # Reference: plain value_and_grad + optax, un-jitted.
        params, opt_state = {"w": jnp.zeros(3)}, optimizer.init({"w": jnp.zeros(3)})
        for seed in range(3):
            loss, grads = jax.value_and_grad(_linear_loss)(params, _linear_batch(seed))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(state.params, params, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(metrics["loss"], loss, rtol=1e-6)


# ---------------------------------------------------------------- tracing


def test_train_and_eval_steps_trace_once_over_epochs_with_partial_batch():
    train = _digits()
    ds = ArrayDataset({"x": train["x"][:100], "y": train["y"][:100]}, 32, seed=1)
    assert ds.steps_per_epoch == 4
    optimizer, train_step, eval_step = _shared_steps()
    state = _init_state(optimizer)
    n_partial = 0
    for epoch in range(2):
        for batch in ds.batches(epoch):
            n_partial += int(batch["mask"].sum() < 32)
            state, _ = train_step(state, batch)
            eval_step(state, batch)
        # The shared steps may already have run in other tests on same-shaped batches:
        # either way, the body was traced exactly once.
        assert train_step.trace_count == 1, f"retraced in epoch {epoch}"
        assert eval_step.trace_count == 1, f"eval retraced in epoch {epoch}"
    assert n_partial == 2
    assert int(state.step) == 8


def test_loss_fn_traced_once_with_chex_assert_max_traces():
    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def counted_loss(params, batch):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    optimizer = optax.sgd(0.1)
    train_step = make_train_step(counted_loss, optimizer)
    state = _linear_state(optimizer)
    for seed in range(4):
        state, _ = train_step(state, _linear_batch(seed))
    assert train_step.trace_count == 1
    # A new batch shape is a new trace, which assert_max_traces catches.
    with pytest.raises(AssertionError, match="traced > 1 times"):
        train_step(state, _linear_batch(0, n=5))


# ---------------------------------------------------------------- determinism


SCHEDULE = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)


@functools.cache
def _shared_steps():
    """One compiled train/eval step pair reused by several tests (compiles dominate)."""
    schedule = optax.linear_schedule(1e-2, 1e-3, 50)
    optimizer = optax.adam(schedule)
    train_step = make_train_step(classification_loss(MODEL), optimizer, learning_rate_fn=schedule)
    return optimizer, train_step, make_eval_step(classification_eval(MODEL))


def _train(seed, n_steps=5):
    optimizer, step, _ = _shared_steps()
    state = _init_state(optimizer, seed)
    for batch in _batches(n_steps):
        state, _ = step(state, batch)
    return state


def test_same_seed_gives_bitwise_identical_params():
    a, b = _train(0), _train(0)
    _assert_trees_bitwise_equal(a.params, b.params)
    _assert_trees_bitwise_equal(a.opt_state, b.opt_state)


def test_different_seeds_give_different_params():
    a, b = _train(0), _train(1)
    leaves_a, leaves_b = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
    assert len(leaves_a) == 4
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert not np.array_equal(x, y)


# ---------------------------------------------------------------- per-step rng


def test_rng_is_fresh_each_step_and_equals_fold_in():
    def loss_fn(params, batch, rng):
        loss = _linear_loss(params, batch)
        return loss, {"u": jax.random.uniform(rng), "bits": jax.random.bits(rng)}

    optimizer = optax.sgd(0.1)
    step = make_train_step(loss_fn, optimizer)
    state = _linear_state(optimizer, seed=42)
    rng0 = np.asarray(state.rng).copy()
    key = jax.random.wrap_key_data(jnp.asarray(rng0))
    us, bits = [], []
    for k in range(5):
        state, metrics = step(state, _linear_batch(k))
        np.testing.assert_array_equal(state.rng, rng0)  # the stored key never changes
        expected = jax.random.fold_in(key, k)
        np.testing.assert_array_equal(metrics["u"], jax.random.uniform(expected))
        np.testing.assert_array_equal(metrics["bits"], jax.random.bits(expected))
        us.append(float(metrics["u"]))
        bits.append(int(metrics["bits"]))
    assert len(set(us)) == 5
    assert len(set(bits)) == 5
    # Not the unfolded key either.
    assert float(jax.random.uniform(key)) not in us


# ---------------------------------------------------------------- metrics


def test_loss_and_grad_norm_match_reference():
    optimizer = optax.sgd(0.1)
    step = make_train_step(_linear_loss, optimizer, donate=False)
    state = _linear_state(optimizer)
    state = state.replace(params={"w": jnp.array([0.3, -0.1, 2.0], jnp.float32)})
    batch = _linear_batch(3)
    _, metrics = step(state, batch)
    loss, grads = jax.jit(jax.value_and_grad(_linear_loss))(state.params, batch)
    assert set(metrics) == {"loss", "grad_norm"}  # no learning_rate: not known here
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
    assert float(metrics["grad_norm"]) > 0


def _lr_metrics(optimizer, learning_rate_fn=None, n=3):
    step = make_train_step(_linear_loss, optimizer, learning_rate_fn=learning_rate_fn)
    state = _linear_state(optimizer)
    out = []
    for k in range(n):
        state, metrics = step(state, _linear_batch(k))
        out.append(metrics)
    return out


def test_learning_rate_metric_from_learning_rate_fn():
    for k, m in enumerate(_lr_metrics(optax.sgd(SCHEDULE), learning_rate_fn=SCHEDULE)):
        assert m["learning_rate"].dtype == jnp.float32
        np.testing.assert_allclose(m["learning_rate"], SCHEDULE(k), rtol=1e-7)


def test_learning_rate_metric_from_inject_hyperparams():
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=SCHEDULE)
    values = [float(m["learning_rate"]) for m in _lr_metrics(optimizer)]
    # The rate the update at step k used: schedule(k) = 0.1 * 0.5**k.
    np.testing.assert_allclose(values, [0.1, 0.05, 0.025], rtol=1e-6)


def test_learning_rate_metric_absent_when_unknown():
    for optimizer in (optax.sgd(0.1), optax.adam(SCHEDULE)):
        for m in _lr_metrics(optimizer, n=1):
            assert "learning_rate" not in m
            assert set(m) == {"loss", "grad_norm"}


def test_aux_metrics_pass_through_and_model_state_updates_state():
    def loss_fn(params, batch, model_state):
        loss = _linear_loss(params, batch)
        new_ms = {"calls": model_state["calls"] + 1, "last_loss": loss}
        return loss, {"twice_loss": 2 * loss, "model_state": new_ms}

    optimizer = optax.sgd(0.1)
    step = make_train_step(loss_fn, optimizer)
    state = TrainState.create(
        {"w": jnp.zeros(3)},
        optimizer,
        0,
        model_state={"calls": jnp.int32(0), "last_loss": jnp.float32(0)},
    )
    for k in range(3):
        state, metrics = step(state, _linear_batch(k))
        np.testing.assert_allclose(metrics["twice_loss"], 2 * metrics["loss"], rtol=1e-6)
        np.testing.assert_array_equal(state.model_state["last_loss"], metrics["loss"])
    assert "model_state" not in metrics
    assert set(metrics) == {"loss", "grad_norm", "twice_loss"}
    assert int(state.model_state["calls"]) == 3


def test_all_metric_values_are_device_scalars():
    optimizer, step, eval_step = _shared_steps()
    state, metrics = step(_init_state(optimizer), _batches(1)[0])
    # The built-in loss also counts invalid labels / mask values (fit hides them).
    assert set(metrics) == {
        "loss",
        "grad_norm",
        "learning_rate",
        "accuracy",
        "invalid_labels",
        "invalid_mask",
    }
    for name, value in metrics.items():
        assert isinstance(value, jax.Array), (name, type(value))
        assert value.shape == (), (name, value.shape)
        assert jnp.issubdtype(value.dtype, jnp.floating), (name, value.dtype)
    sums = eval_step(state, _batches(1)[0])
    assert set(sums) == {"loss", "accuracy", "invalid_labels", "invalid_mask"}
    for name, leaf in jax.tree_util.tree_leaves_with_path(sums):
        assert isinstance(leaf, jax.Array) and leaf.shape == (), jax.tree_util.keystr(name)


# ---------------------------------------------------------------- donation


@pytest.mark.parametrize("donate", [True, False])
def test_donation_deletes_input_state_buffers(donate):
    optimizer = optax.sgd(0.1, momentum=0.9)
    step = make_train_step(_linear_loss, optimizer, donate=donate)
    state = _linear_state(optimizer)
    new_state, _ = step(state, _linear_batch())
    jax.block_until_ready(new_state)
    for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
        assert leaf.is_deleted() is donate
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))


# ---------------------------------------------------------------- error messages


def _raises_on_first_step(loss_fn, exc_type):
    optimizer = optax.sgd(0.1)
    step = make_train_step(loss_fn, optimizer)
    with pytest.raises(exc_type) as exc:
        step(_linear_state(optimizer), _linear_batch())
    return str(exc.value)


def test_non_scalar_loss_raises_value_error_with_shape():
    msg = _raises_on_first_step(lambda p, b: (b["x"] @ p["w"] - b["y"]) ** 2, ValueError)
    assert "scalar" in msg
    assert "(8,)" in msg
    assert "weighted_mean" in msg  # the fix


def test_integer_loss_raises_type_error_with_dtype():
    def int_loss(params, batch):
        return jnp.sum(params["w"]).astype(jnp.int32)

    msg = _raises_on_first_step(int_loss, TypeError)
    assert "floating-point" in msg
    assert "int32" in msg
    assert "float32" in msg  # the fix


def test_non_dict_aux_raises_type_error():
    msg = _raises_on_first_step(lambda p, b: (_linear_loss(p, b), [1.0]), TypeError)
    assert "aux must be a dict" in msg
    assert "list" in msg
    assert "model_state" in msg  # the fix shows the expected form


def test_wrong_tuple_length_raises_value_error():
    msg = _raises_on_first_step(lambda p, b: (_linear_loss(p, b), {}, {}), ValueError)
    assert "tuple of 3 values" in msg


@pytest.mark.parametrize("bad", ["sgd", optax.sgd, lambda g: g], ids=["str", "factory", "fn"])
def test_non_optax_optimizer_raises_type_error(bad):
    with pytest.raises(TypeError) as exc:
        make_train_step(_linear_loss, bad)
    msg = str(exc.value)
    assert "optax.GradientTransformation" in msg
    assert type(bad).__name__ in msg
    assert "optax.adam(1e-3)" in msg


def test_non_callable_loss_raises_type_error():
    with pytest.raises(TypeError, match="loss_fn must be callable; got int"):
        make_train_step(3, optax.sgd(0.1))


def test_eval_fn_not_returning_dict_raises_type_error():
    step = make_eval_step(lambda params, batch: batch["x"] @ params["w"])
    with pytest.raises(TypeError) as exc:
        step(_linear_state(optax.sgd(0.1)), _linear_batch())
    msg = str(exc.value)
    assert "dict of per-example metric values" in msg
    assert "Fix: return {'accuracy': correct}" in msg


@pytest.mark.parametrize("donate", [True, False])
def test_step_on_a_mesh_compiles_once_for_an_unplaced_state(donate):
    """A state straight from TrainState.create (one device, uncommitted) and the step's
    own output (on the mesh) have different layouts; the step places the first state
    itself, so a hand-written loop compiles once."""
    opt = optax.sgd(0.1)
    mesh = jt.data_mesh()
    step = jt.make_train_step(
        lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt, mesh=mesh, donate=donate
    )
    state = jt.TrainState.create({"w": jnp.ones(3)}, opt, 0)
    batch = jt.shard_batch({"x": np.ones((4, 3), np.float32)}, mesh)
    for _ in range(3):
        state, metrics = step(state, batch)
    assert step.trace_count == 1
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("key", ["loss", "grad_norm", "learning_rate", "skipped_steps", "step"])
def test_aux_key_colliding_with_a_builtin_metric_is_an_error(key):
    optimizer = optax.sgd(0.1)

    def loss_fn(params, batch):
        loss = _linear_loss(params, batch)
        return loss, {key: 2 * loss}

    step = make_train_step(loss_fn, optimizer)
    with pytest.raises(
        ValueError,
        match=rf"aux has the key '{key}', the name of a metric jaxtrain reports itself; it "
        rf"would replace the real '{key}'\. Fix: rename it \(e\.g\. 'my_{key}'\)",
    ):
        step(_linear_state(optimizer), _linear_batch())


def test_non_scalar_aux_value_is_an_error_at_trace_time():
    optimizer = optax.sgd(0.1)

    def loss_fn(params, batch):
        per_example = (batch["x"] @ params["w"] - batch["y"]) ** 2
        return jnp.mean(per_example), {"per_example": per_example}

    for accum in (1, 2):
        step = make_train_step(loss_fn, optimizer, grad_accum_steps=accum)
        with pytest.raises(
            ValueError,
            match=r"aux\['per_example'\] has shape \((8|4),\); aux metrics must be scalars.*"
            r"Fix: reduce it, e\.g\. jnp\.mean",
        ):
            step(_linear_state(optimizer), _linear_batch())
    step = make_train_step(lambda p, b: (_linear_loss(p, b), {"d": {"a": 1.0}}), optimizer)
    with pytest.raises(TypeError, match=r"aux\['d'\] is a dict; aux metrics must be scalar"):
        step(_linear_state(optimizer), _linear_batch())
