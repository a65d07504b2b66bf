"""The tools users expect (issue 16): parameter EMA, the profiler, the model summary and
the learning-rate finder, on tiny models (the digits runs are in test_tools_e2e)."""

import glob
import gzip
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.ema import ema_state
from jaxtrain.lr_find import lr_find, suggest
from jaxtrain.profiler import Profile, parse_profile_range
from jaxtrain.summary import model_summary


def _loss(p, b):
    return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return {"x": x, "y": (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)}


def _state(opt, ema=True, **kw):
    return jt.TrainState.create({"w": jnp.zeros(3)}, opt, 0, ema=ema, **kw)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- EMA -------------------------------------------------------------------------------


def test_ema_matches_a_hand_computed_average():
    """ema_t = d * ema_{t-1} + (1 - d) * params_t from ema_0 = params_0, in float64 by hand.

    Tolerance: float32 arithmetic over 4 steps, rtol 1e-6.
    """
    opt, d = optax.sgd(0.1), 0.8
    step = jt.make_train_step(_loss, opt, ema_decay=d)
    state = _state(opt)
    assert len(jax.tree.leaves(_state(opt, ema=False))) + 1 == len(jax.tree.leaves(state))
    data = _data()
    expected = np.zeros(3)
    for i in range(4):
        batch = {k: v[4 * i : 4 * i + 4] for k, v in data.items()}
        state, _ = step(state, batch)
        expected = d * expected + (1 - d) * np.asarray(state.params["w"], np.float64)
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), expected, rtol=1e-6)
    assert not np.allclose(state.ema_params["w"], state.params["w"])  # it is an average
    assert step.trace_count == 1


def test_a_skipped_step_leaves_the_ema_bitwise_unchanged():
    opt = optax.sgd(0.1)
    step = jt.make_train_step(_loss, opt, ema_decay=0.9, nonfinite="skip")
    state, _ = step(_state(opt), {k: v[:4] for k, v in _data().items()})
    before = np.asarray(state.ema_params["w"]).copy()
    bad = {"x": np.full((4, 3), np.nan, np.float32), "y": np.zeros(4, np.float32)}
    state, _ = step(state, bad)
    assert int(state.skipped_steps) == 1
    np.testing.assert_array_equal(np.asarray(state.ema_params["w"]), before)


def test_ema_of_fused_steps_is_bitwise_that_of_single_steps():
    opt = optax.adam(0.05)
    data = _data(12)
    single = jt.make_train_step(_loss, opt, ema_decay=0.9)
    fused = jt.make_train_steps(_loss, opt, ema_decay=0.9, steps_per_call=3)
    a = _state(opt)
    for i in range(3):
        a, _ = single(a, {k: v[4 * i : 4 * i + 4] for k, v in data.items()})
    b, _ = fused(_state(opt), {k: v.reshape(3, 4, *v.shape[1:]) for k, v in data.items()})
    _leaves_equal(a.ema_params, b.ema_params)


def test_ema_with_accumulation_and_bfloat16_is_one_float32_update_per_step():
    """One EMA update per optimizer step (not per microbatch), kept in float32.

    Tolerance: one float32 multiply-add, rtol 1e-6.
    """
    opt, d = optax.sgd(0.1), 0.75
    step = jt.make_train_step(_loss, opt, ema_decay=d, grad_accum_steps=2, precision="bfloat16")
    state = _state(opt)
    state, _ = step(state, {k: v[:8] for k, v in _data().items()})
    assert state.ema_params["w"].dtype == jnp.float32
    expected = (1 - d) * np.asarray(state.params["w"], np.float64)  # from ema_0 = 0
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), expected, rtol=1e-6)


def test_ema_mismatches_are_clear_errors():
    opt = optax.sgd(0.1)
    batch = {k: v[:4] for k, v in _data().items()}
    with pytest.raises(ValueError, match=r"state has no ema_params.*ema=True"):
        jt.make_train_step(_loss, opt, ema_decay=0.9)(_state(opt, ema=False), batch)
    with pytest.raises(ValueError, match=r"has ema_params but the step has no ema_decay"):
        jt.make_train_step(_loss, opt)(_state(opt), batch)
    for bad in (0.0, 1.0, 1.5, "0.9", True):
        with pytest.raises(ValueError, match=r"ema_decay must be a number in \(0, 1\)"):
            jt.make_train_step(_loss, opt, ema_decay=bad)
    with pytest.raises(ValueError, match=r"keeps no parameter EMA.*ema=True"):
        ema_state(_state(opt, ema=False))
    # A numpy scalar is a number (it used to be refused as "not a number").
    assert jt.make_train_step(_loss, opt, ema_decay=np.float32(0.9)).spec is not None


@pytest.fixture(scope="module")
def classifier():
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2, 0, 1]]
    data = {"x": x, "y": np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)}
    model = jt.from_function(lambda p, x: x @ p["w"])
    opt = optax.sgd(0.5)
    return {
        "ds": jt.ArrayDataset(data, 4, seed=0),
        "eval_ds": jt.ArrayDataset(data, 4, shuffle=False),
        "opt": opt,
        "step": jt.make_train_step(classification_loss(model), opt, ema_decay=0.5),
        "eval": jt.make_eval_step(classification_eval(model)),
    }


def _cls_state(c, ema=True):
    return jt.TrainState.create({"w": jnp.zeros((3, 3))}, c["opt"], 0, ema=ema)


def test_fit_evaluates_the_ema_when_asked(classifier):
    c = classifier
    common = dict(eval_step=c["eval"], eval_data=c["eval_ds"], progress=False)
    state, hist = jt.fit(
        _cls_state(c), c["step"], c["ds"], num_steps=3, eval_params="ema", **common
    )
    on_ema = jt.evaluate(c["eval"], state, c["eval_ds"], eval_params="ema")
    on_params = jt.evaluate(c["eval"], state, c["eval_ds"])
    assert hist.eval[-1]["loss"] == on_ema["loss"] != on_params["loss"]
    with pytest.raises(ValueError, match=r"eval_params must be 'params' or 'ema'; got 'best'"):
        jt.fit(_cls_state(c), c["step"], c["ds"], num_steps=1, eval_params="best", **common)
    with pytest.raises(ValueError, match=r"keeps no parameter EMA"):
        jt.fit(
            _cls_state(c, ema=False), c["step"], c["ds"], num_steps=1, eval_params="ema", **common
        )


def test_ema_is_checkpointed_and_resumed_bitwise(tmp_path, classifier):
    c = classifier
    common = dict(progress=False, save_every=2, log_every=2, eval_params="params")
    with Checkpointer(tmp_path / "a") as ca:
        full, _ = jt.fit(_cls_state(c), c["step"], c["ds"], num_steps=6, checkpointer=ca, **common)
    with Checkpointer(tmp_path / "b") as cb:
        jt.fit(_cls_state(c), c["step"], c["ds"], num_steps=4, checkpointer=cb, **common)
        other = jt.TrainState.create({"w": jnp.ones((3, 3))}, c["opt"], 9, ema=True)
        resumed, _ = jt.fit(
            other, c["step"], c["ds"], num_steps=6, checkpointer=cb, resume=True, **common
        )
    _leaves_equal(resumed.ema_params, full.ema_params)
    _leaves_equal(resumed.params, full.params)
    assert not np.array_equal(full.ema_params["w"], full.params["w"])


def test_a_population_evaluates_each_members_ema():
    # eval_params="ema" on a PopulationState used to raise AttributeError (no ema_params).
    from jaxtrain import population as population_lib
    from jaxtrain.population_step import make_population_eval_step, make_population_step

    opt = optax.sgd(0.1)
    members = [
        jt.TrainState.create({"w": jnp.full(3, 1.0 + i)}, opt, i, ema=True) for i in range(2)
    ]
    pop = population_lib.from_states(members, seeds=[0, 1])
    pop, _ = make_population_step(_loss, opt, ema_decay=0.5)(
        pop, {k: v[:4] for k, v in _data().items()}
    )
    ds = jt.ArrayDataset(_data(8), 4, shuffle=False)
    eval_fn = lambda p, b: {"mse": (b["x"] @ p["w"] - b["y"]) ** 2}  # noqa: E731
    got = jt.evaluate(make_population_eval_step(eval_fn), pop, ds, eval_params="ema")["mse"]
    single = jt.make_eval_step(eval_fn)
    for i in range(2):
        one = population_lib.extract_member(pop, i)
        assert got[i] == pytest.approx(jt.evaluate(single, one, ds, eval_params="ema")["mse"])
        assert got[i] != pytest.approx(jt.evaluate(single, one, ds)["mse"])  # not the params


# --- profiler --------------------------------------------------------------------------


def test_profile_writes_a_trace_naming_the_train_step(tmp_path):
    opt = optax.sgd(0.1)
    step = jt.make_train_step(_loss, opt)
    state = jt.TrainState.create({"w": jnp.zeros(3)}, opt, 0)
    profiler = Profile(2, 4, tmp_path / "profile")
    jt.fit(state, step, jt.ArrayDataset(_data(), 4), num_steps=6, progress=False, profile=profiler)
    assert profiler.trace_dir is not None
    planes = glob.glob(os.path.join(profiler.trace_dir, "*.xplane.pb"))
    perfetto = os.path.join(profiler.trace_dir, "perfetto_trace.json.gz")
    assert len(planes) == 1 and os.path.exists(perfetto)
    # The compiled step's module is named after the step (it was "jit_counted").
    assert b"jit_train_step" in open(planes[0], "rb").read()
    assert b"jit_train_step" in gzip.decompress(open(perfetto, "rb").read())


def test_bad_profile_ranges_are_clear_errors(tmp_path):
    opt = optax.sgd(0.1)
    step = jt.make_train_step(_loss, opt)
    state = jt.TrainState.create({"w": jnp.zeros(3)}, opt, 0)
    data = jt.ArrayDataset(_data(), 4)
    cases = [
        ((3, 3, str(tmp_path)), r"start=3, stop=3 is empty"),
        ((-1, 3, str(tmp_path)), r"profile start must be an integer step >= 0; got -1"),
        ((2, 9, str(tmp_path)), r"stop=9 goes beyond the run's 6 steps"),
        ((2, 4), r"names steps but not where to write the trace"),
    ]
    for profile, message in cases:
        with pytest.raises(ValueError, match=message):
            jt.fit(state, step, data, num_steps=6, progress=False, profile=profile)
    with pytest.raises(ValueError, match=r"goes beyond the run's 8 steps"):  # 2 epochs of 4
        jt.fit(state, step, data, epochs=2, progress=False, profile=(1, 9, str(tmp_path)))
    with pytest.raises(ValueError, match=r"must be START:STOP .* got '3-4'"):
        parse_profile_range("3-4")
    assert step.trace_count == 0  # refused before the first step
    assert not os.listdir(tmp_path)


def test_profile_of_a_resumed_run_that_starts_after_the_range_is_refused(tmp_path):
    # The checkpoint is restored by a callback after the profiler's train begin: the
    # range used to be checked against step 0 and steps 4.. traced instead of 1..2.
    opt = optax.sgd(0.1)
    step = jt.make_train_step(_loss, opt)
    data = jt.ArrayDataset(_data(), 4)
    common = dict(progress=False, save_every=2, log_every=2)
    with Checkpointer(tmp_path / "ck") as ck:
        jt.fit(
            jt.TrainState.create({"w": jnp.zeros(3)}, opt, 0),
            step,
            data,
            num_steps=4,
            checkpointer=ck,
            **common,
        )
        with pytest.raises(
            ValueError,
            match=r"start=1, stop=3: this run starts at step 4 "
            r"\(resumed\).* Fix: profile later steps, e.g. 4:6",
        ):
            jt.fit(
                jt.TrainState.create({"w": jnp.zeros(3)}, opt, 0),
                step,
                data,
                num_steps=8,
                checkpointer=ck,
                resume=True,
                profile=(1, 3, str(tmp_path / "p")),
                **common,
            )
    assert not os.path.exists(tmp_path / "p")


def test_profile_with_fused_steps_traces_the_calls_that_run_the_range(tmp_path, monkeypatch):
    """Widened to whole calls: (1, 3) with K=4 traces the call of steps 0..3 (it used to
    trace steps 4..7, none of the range), and (5, 7) the call of 4..7 (it used to trace
    nothing). The same Profile traces again in a second fit."""
    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: calls.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))
    opt = optax.sgd(0.1)
    steps = jt.make_train_steps(_loss, opt, steps_per_call=4)

    class Spy(Profile):
        def on_call_begin(self, loop):
            super().on_call_begin(loop)
            calls.append(("begin", loop.step, self._active))

    for start, stop, traced in [(1, 3, [0]), (5, 7, [4]), (3, 5, [0, 4])]:
        spy = Spy(start, stop, tmp_path)
        for _ in range(2):
            calls.clear()
            state = jt.TrainState.create({"w": jnp.zeros(3)}, opt, 0)
            jt.fit(
                state, steps, jt.ArrayDataset(_data(), 2), num_steps=8, progress=False, profile=spy
            )
            assert [c[1] for c in calls if c[0] == "begin" and c[2]] == traced, (start, calls)
            assert calls.count("start") == calls.count("stop") == 1


# --- model summary ---------------------------------------------------------------------


def test_model_summary_counts_exactly():
    model = jt.from_linen(jt.models.MLP(hidden=(8,)))
    # Shapes only (jax.eval_shape: nothing is compiled or allocated), as the summary allows.
    x = np.zeros((1, 8, 8, 1), np.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x)[0])
    s = model_summary(params, name="MLP")
    rows = {r.path: (r.shape, r.dtype, r.count, r.bytes) for r in s.rows}
    assert rows == {
        "Dense_0/bias": ((8,), "float32", 8, 32),
        "Dense_0/kernel": ((64, 8), "float32", 512, 2048),
        "Dense_1/bias": ((10,), "float32", 10, 40),
        "Dense_1/kernel": ((8, 10), "float32", 80, 320),
    }
    assert (s.total_params, s.total_bytes) == (610, 2440)
    assert [(m, n, b) for m, n, b, _ in s.modules()] == [
        ("Dense_0", 520, 2080),
        ("Dense_1", 90, 360),
    ]
    text = s.format()
    assert "Dense_0     520" in text and "total: 610 parameters, 2.4 KB (float32)" in text


def test_model_summary_lists_batchnorm_statistics_as_model_state():
    # Keras' "non-trainable params": they used to be left out of the summary entirely.
    from flax import linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))

    params, model_state = jt.from_linen(Net()).init(jax.random.key(0), np.zeros((1, 5)))
    s = model_summary(params, model_state=model_state)
    assert (s.total_params, s.total_bytes) == (48 + 16, 256)  # Dense 5x8 + 8, BN scale/bias
    assert (s.state_values, s.state_bytes) == (16, 64)  # BN mean and var, 8 each
    state_rows = [(r.path, r.count) for r in s.rows if not r.trainable]
    assert state_rows == [("batch_stats/BatchNorm_0/mean", 8), ("batch_stats/BatchNorm_0/var", 8)]
    assert s.format().endswith(
        "total: 64 parameters, 256 B (float32) + model state 16 values, 64 B"
    )
    assert s.to_dict()["state_values"] == 16


def test_model_summary_counts_the_steps_flops():
    opt = optax.sgd(0.1)
    step = jt.make_train_step(_loss, opt)
    state = jt.TrainState.create({"w": jnp.zeros(3)}, opt, 0)
    batch = {k: v[:4] for k, v in _data().items()}
    s = model_summary(state.params, step, state, batch)
    # x @ w forward (2*4*3) and its gradient x^T @ r (2*4*3): the jaxpr's matrix products.
    assert s.flops_per_step == 48.0 and s.flops_source == "jaxpr"
    assert s.format().endswith("48 FLOP per train step (jaxpr)")
    assert jax.tree.leaves(state)[0].is_deleted() is False  # lowered, never run
    with pytest.raises(ValueError, match=r"got a step but no arguments"):
        model_summary(state.params, step)
    # A fused step's call runs K=2 steps: still FLOPs per step (it printed 2x that).
    fused = jt.make_train_steps(_loss, opt, steps_per_call=2)
    batches = {k: v[:8].reshape(2, 4, *v.shape[1:]) for k, v in _data().items()}
    s2 = model_summary(state.params, fused, state, batches)
    assert s2.flops_per_step == 48.0 and s2.format().endswith("48 FLOP per train step (jaxpr)")


# --- learning-rate finder --------------------------------------------------------------


def test_lr_find_leaves_the_state_untouched_and_stops_on_divergence():
    state = jt.TrainState.create({"w": jnp.zeros(3)}, optax.adam(1e-3), 0)
    before = jax.device_get(state)
    data = jt.ArrayDataset(_data(32), 8)
    r = lr_find(_loss, optax.sgd, state, data, min_lr=1e-4, max_lr=100.0, num_steps=80)
    _leaves_equal(jax.device_get(state), before)  # nothing donated, nothing changed
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    assert r.stopped_early and "diverged" in r.reason and len(r.losses) < 80
    assert np.all(np.diff(r.learning_rates) > 0) and r.learning_rates[0] == pytest.approx(1e-4)
    # sgd on this quadratic is stable below lr = 2 / lambda_max (about 0.5 here).
    assert r.rule == "min/10" and r.suggestion == pytest.approx(r.min_loss_lr / 10)
    assert 1e-3 < r.suggestion < 0.5


def test_lr_find_suggestion_rules_and_bad_arguments():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert suggest(lrs, [2.0, 1.9, 1.0, 0.5, 3.0]) == (pytest.approx(0.01), 0.1, 0.01)
    assert suggest(lrs, [2.0, 1.9, 1.0, 0.98, math.nan], "steepest")[0] == 1e-3
    assert suggest(lrs[:2], [1.0, 0.5]) == (None, None, None)
    state = jt.TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1), 0)
    data = jt.ArrayDataset(_data(), 4)
    for kwargs, message in [
        (dict(min_lr=1.0, max_lr=0.1), r"0 < min_lr < max_lr .* min_lr=1.0, max_lr=0.1"),
        (dict(num_steps=2), r"num_steps must be an integer >= 3 .*; got 2"),
        (dict(smoothing=1.0), r"smoothing must be in \[0, 1\)"),
        (dict(diverge=1.0), r"diverge must be a number > 1"),
        (dict(rule="valley"), r"rule must be one of min/10, steepest; got 'valley'"),
    ]:
        with pytest.raises(ValueError, match=message):
            lr_find(_loss, optax.sgd, state, data, **kwargs)


def test_lr_find_with_a_negative_loss_or_a_nan_at_step_0_says_what_happened():
    state = jt.TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1), 0)
    data = jt.ArrayDataset(_data(32), 8)
    # A loss below zero: "4x the minimum" is below the minimum, so the sweep used to stop
    # as "diverged" at its first step.
    r = lr_find(
        lambda p, b: _loss(p, b) - 100.0,
        optax.sgd,
        state,
        data,
        min_lr=1e-4,
        max_lr=0.05,
        num_steps=12,
    )
    assert len(r.losses) == 12 and not r.stopped_early and r.reason == "ran all 12 steps"
    assert r.suggestion is not None
    # NaN before any update: the message blames the model/data, not a rate or a minimum.
    r = lr_find(lambda p, b: _loss(p, b) * jnp.nan, optax.sgd, state, data, num_steps=5)
    assert r.stopped_early and r.suggestion is None and len(r.losses) == 1
    assert r.reason == (
        "the loss was not finite (nan) at step 0 (rate 1e-07), before any update: the model "
        "or the data gives it, whatever the rate"
    )


def test_lr_find_command_interrupted_is_one_line_exit_130(tmp_path, monkeypatch, capsys):
    # Ctrl-C used to end `jaxtrain lr-find` with a KeyboardInterrupt traceback.
    from jaxtrain.apps import cli
    from jaxtrain.apps import lr_find as lr_find_app

    def interrupted(cfg, overwrite=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(lr_find_app, "run", interrupted)
    assert cli.main(["lr-find", "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxtrain lr-find: interrupted (its lr_find")


def test_lr_find_rates_follow_the_optimizer_count_when_float16_steps_are_skipped():
    # float16 loss scaling skips the first steps (their scaled gradients overflow): the
    # optimizer's count, and so the schedule, stays put. Their rates used to be recorded as
    # schedule(i), shifting the whole curve (and the suggestion) to higher rates.
    state = jt.TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1), 0)
    data = jt.ArrayDataset(_data(32), 8)
    r = lr_find(_loss, optax.sgd, state, data, min_lr=1e-4, max_lr=1e-1, num_steps=10,
                precision="float16")  # fmt: skip
    single = jt.make_train_step(_loss, optax.sgd(0.1), precision="float16")
    probe = jt.TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1), 0, precision="float16")
    _, m = single(probe, next(iter(data.batches(0))))
    assert int(m["loss_scale_overflows"]) == 1  # the premise: step 0 is skipped
    assert r.learning_rates[0] == r.learning_rates[1] == pytest.approx(1e-4)
    assert np.all(np.diff(r.learning_rates) >= 0) and r.learning_rates[-1] < 1e-1
    # Repeated rates: the last point at each rate counts (np.gradient divided by zero).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert suggest([1e-3, 1e-3, 1e-2, 1e-1], [9.0, 2.0, 1.0, 3.0]) == (
            pytest.approx(1e-3),
            1e-2,
            1e-3,
        )
