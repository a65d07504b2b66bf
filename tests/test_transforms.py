"""The step's options, transforms and declared spec (jaxtrain.step_options, .transforms).

One options object for every builder, each option supported or refused by name; fused
steps with an ``active`` mask (one compilation however a group is filled); ``unroll="auto"``
(unrolled for convolutions on CPU); the `StepSpec` a step declares.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.data import load_digits
from jaxtrain.resident import put_dataset
from jaxtrain.step import build_train_step
from jaxtrain.step_options import NONFINITE_POLICIES, StepOptions, StepSpec
from jaxtrain.transforms import Fused, pad_steps


@pytest.fixture(scope="module")
def digits():
    train, _ = load_digits()
    return {k: v[:256] for k, v in train.items()}


def _setup(digits, model):
    model = jt.from_linen(model)
    params, _ = model.init(jax.random.key(0), digits["x"][:1])
    return classification_loss(model), params, optax.adam(3e-3)


def _fresh(params, opt, **kw):
    return jt.TrainState.create(jax.tree.map(jnp.copy, params), opt, 3, **kw)


def _assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _singles(step, state, batches):
    for b in batches:
        state, _ = step(state, b)
    return state


@pytest.mark.integration
@pytest.mark.parametrize("cnn", [False, True])
def test_active_runs_only_the_marked_steps_bitwise(digits, cnn):
    """K=4 with active [T, T, F, F] is bitwise 2 single steps; one trace for any active."""
    model = (
        jt.models.CNN(channels=(4,), dense=8) if cnn else jt.models.MLP(hidden=(16,), dropout=0.1)
    )
    loss, params, opt = _setup(digits, model)
    batches = list(jt.ArrayDataset(digits, 32, seed=0).batches(0))[:4]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    fused = jt.make_train_steps(loss, opt, steps_per_call=4, nonfinite="raise")
    single = jt.make_train_step(loss, opt)
    got, metrics = fused(_fresh(params, opt), stacked, np.array([True, True, False, False]))
    _assert_bitwise(got, _singles(single, _fresh(params, opt), batches[:2]))
    assert int(got.step) == 2
    # Inactive steps report zeros and no non-finite leaf (fit reads only the real ones).
    np.testing.assert_array_equal(metrics["loss"][2:], [0.0, 0.0])
    np.testing.assert_array_equal(metrics["nonfinite"], [-1, -1, -1, -1])
    # All active (given, or not given at all) is bitwise 4 single steps.
    ref4 = _singles(single, _fresh(params, opt), batches)
    _assert_bitwise(fused(_fresh(params, opt), stacked)[0], ref4)
    _assert_bitwise(fused(_fresh(params, opt), stacked, jnp.ones(4, bool))[0], ref4)
    # A middle gap: steps 0 and 2 run, on their own batches, with their own step keys.
    gap, _ = fused(_fresh(params, opt), stacked, [True, False, True, False])
    assert int(gap.step) == 2
    assert fused.trace_count == 1
    assert fused.spec.unroll is (True if cnn else 1)


@pytest.mark.integration
def test_fused_conv_on_cpu_unrolls_by_default_and_says_so(digits):
    if jax.default_backend() != "cpu":
        pytest.skip("the automatic unrolling is for XLA:CPU")
    loss, params, opt = _setup(digits, jt.models.CNN(channels=(4,), dense=8))
    batches = list(jt.ArrayDataset(digits, 32, seed=0).batches(0))[:3]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    fused = jt.make_train_steps(loss, opt, steps_per_call=3)
    assert fused.spec.unroll == "auto"  # decided at the first trace
    got, _ = fused(_fresh(params, opt), stacked)
    assert fused.spec.unroll is True and fused.trace_count == 1
    _assert_bitwise(got, _singles(jt.make_train_step(loss, opt), _fresh(params, opt), batches))
    # Explicit values are kept as given.
    one = jt.make_train_steps(loss, opt, steps_per_call=3, unroll=1)
    one(_fresh(params, opt), stacked)
    assert one.spec.unroll == 1


@pytest.mark.integration
def test_mlp_keeps_the_loop_and_device_epoch_decides_too(digits):
    loss, params, opt = _setup(digits, jt.models.MLP(hidden=(16,)))
    fused = jt.make_train_steps(loss, opt, steps_per_call=2)
    b = next(jt.ArrayDataset(digits, 32).batches(0))
    fused(_fresh(params, opt), {k: np.stack([v, v]) for k, v in b.items()})
    assert fused.spec.unroll == 1
    ds = jt.ArrayDataset(digits, 64, seed=1)
    epoch = jt.make_device_epoch(loss, opt, ds)
    assert epoch.spec.unroll == "auto"
    epoch(_fresh(params, opt), put_dataset(ds), jnp.int32(0))
    assert epoch.spec.unroll == 1


@pytest.mark.integration
def test_active_of_the_wrong_shape_is_refused(digits):
    loss, params, opt = _setup(digits, jt.models.MLP(hidden=(8,)))
    fused = jt.make_train_steps(loss, opt, steps_per_call=4)
    b = next(jt.ArrayDataset(digits, 32).batches(0))
    stacked = {k: np.stack([v] * 4) for k, v in b.items()}
    with pytest.raises(
        ValueError,
        match=r"active must be a bool array of shape \[K=4\].*got shape \(3,\) dtype bool.*Fix",
    ):
        fused(_fresh(params, opt), stacked, np.ones(3, bool))
    with pytest.raises(ValueError, match=r"got shape \(4,\) dtype int64"):
        fused(_fresh(params, opt), stacked, np.ones(4, np.int64))


@pytest.mark.integration
def test_pad_steps_pads_a_short_group_for_one_compilation(digits):
    loss, params, opt = _setup(digits, jt.models.MLP(hidden=(8,)))
    batches = list(jt.ArrayDataset(digits, 32, seed=0).batches(0))[:3]
    fused = jt.make_train_steps(loss, opt, steps_per_call=2)
    state = _fresh(params, opt)
    for i in range(0, 3, 2):
        state, _ = fused(state, *pad_steps(batches[i : i + 2], 2))
    _assert_bitwise(state, _singles(jt.make_train_step(loss, opt), _fresh(params, opt), batches))
    assert fused.trace_count == 1 and int(state.step) == 3
    with pytest.raises(ValueError, match="pad_steps needs 1 to 2 batches; got 3"):
        pad_steps(batches, 2)


@pytest.mark.integration
@pytest.mark.parametrize(
    "option",
    [{"precision": "bfloat16"}, {"grad_accum_steps": 2}, {"grad_norm": False}],
    ids=["precision", "grad_accum", "grad_norm"],
)
def test_device_epoch_supports_every_option(digits, option):
    """Formerly dropped by make_device_epoch: now applied, bitwise as host-fed steps."""
    loss, params, opt = _setup(digits, jt.models.MLP(hidden=(16,)))
    ds = jt.ArrayDataset(digits, 64, seed=2)
    epoch = jt.make_device_epoch(loss, opt, ds, **option)
    got, metrics = epoch(_fresh(params, opt), put_dataset(ds), jnp.int32(1))
    single = jt.make_train_step(loss, opt, **option)
    ref = _singles(single, _fresh(params, opt), ds.batches(1))
    _assert_bitwise(got, ref)
    assert ("grad_norm" in metrics) is option.get("grad_norm", True)
    plain, _ = jt.make_device_epoch(loss, opt, ds)(
        _fresh(params, opt), put_dataset(ds), jnp.int32(1)
    )
    if "grad_norm" not in option:  # the option changed the result: it was applied
        assert not np.array_equal(
            np.asarray(jax.tree.leaves(plain.params)[0]), np.asarray(jax.tree.leaves(got.params)[0])
        )


def test_options_are_defined_once_and_checked_by_name():
    with pytest.raises(ValueError, match=r"nonfinite must be 'skip', 'raise' or None; got 'off'"):
        StepOptions(nonfinite="off")
    assert NONFINITE_POLICIES == ("skip", "raise")
    with pytest.raises(ValueError, match=r"unknown precision 'half' \(did you mean 'float16'"):
        StepOptions(precision="half")
    assert StepOptions(precision="bfloat16").precision == jt.Policy.from_name("bfloat16")
    with pytest.raises(ValueError, match="grad_accum_steps must be an integer >= 1; got 0"):
        jt.make_device_epoch(lambda p, b: 0.0, optax.sgd(0.1), None, grad_accum_steps=0)
    with pytest.raises(TypeError, match=r"make_train_steps got unknown option\(s\) 'nonfinte'"):
        jt.make_train_steps(lambda p, b: 0.0, optax.sgd(0.1), steps_per_call=2, nonfinte="skip")
    with pytest.raises(TypeError, match="donate must be True or False; got 'yes'"):
        jt.make_train_step(lambda p, b: 0.0, optax.sgd(0.1), donate="yes")


def test_a_transform_refuses_an_option_by_name():
    with pytest.raises(
        ValueError, match=r"train_step does not support unroll=True.*'step' step.*Fix: leave unroll"
    ):
        build_train_step(lambda p, b: 0.0, optax.sgd(0.1), StepOptions(unroll=True))


def test_each_step_declares_its_spec(digits):
    loss, _, opt = _setup(digits, jt.models.MLP(hidden=(8,)))
    ds = jt.ArrayDataset(digits, 64)
    single = jt.make_train_step(loss, opt, nonfinite="skip")
    fused = build_train_step(loss, opt, StepOptions(nonfinite="raise"), Fused(3))
    epoch = jt.make_device_epoch(loss, opt, ds)
    ev = jt.make_eval_step(classification_eval(jt.from_linen(jt.models.MLP(hidden=(8,)))))
    assert single.spec == StepSpec("step", 1, None, "skip", [], None)
    assert fused.spec == StepSpec("fused", 3, None, "raise", [], "auto")
    assert epoch.spec == StepSpec("epoch", ds.steps_per_epoch, ds, None, [], "auto")
    assert ev.spec.kind == "eval" and ev.spec.steps_per_call == 0
    # Declared, not discovered: the former ad-hoc attributes are gone (steps_per_call
    # stays, a read-only view of the spec).
    assert not any(hasattr(epoch, a) for a in ("device_epoch", "nonfinite_policy", "_group_size"))
    assert (single.steps_per_call, fused.steps_per_call) == (None, 3)
    with pytest.raises(AttributeError):
        fused.steps_per_call = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        single.spec.kind = "fused"


def test_eval_step_can_run_in_bfloat16():
    """1 + 2**-10 is not a bfloat16: its bf16 product rounds to 1; float32 keeps it."""
    state = jt.TrainState.create({"w": jnp.full((1,), 1 + 2.0**-10)}, optax.sgd(0.1), 0)
    batch = {"x": jnp.ones((2, 1))}

    def eval_fn(params, batch):
        return {"y": (batch["x"] @ params["w"]).astype(jnp.float32)}

    f32 = jt.metrics.compute(jt.make_eval_step(eval_fn)(state, batch))["y"]
    bf16_step = jt.make_eval_step(eval_fn, precision="bfloat16")
    bf16 = bf16_step(state, batch)
    assert f32 == 1 + 2.0**-10 and jt.metrics.compute(bf16)["y"] == 1.0
    assert bf16["y"][0].dtype == jnp.float32  # values come back float32 before summing
    with pytest.raises(ValueError, match="unknown precision 'bf16'"):
        jt.make_eval_step(eval_fn, precision="bf16")
