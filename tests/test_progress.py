"""Throughput and MFU in fit's progress bar and train records (``flops_per_step``):
achieved FLOP/s from the interval's measured time, MFU against the device's peak
("unknown" where the peak is unknown, as on CPU), no extra host reads. ``jaxtrain train``
passes its step FLOPs to fit: checked in test_cli's short run."""

import time
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
import jaxtrain.callbacks as callbacks_lib
import jaxtrain.loop as loop_lib
import jaxtrain.train_log as train_log_lib
from jaxtrain import perf
from jaxtrain.apps.tasks import classification_loss
from jaxtrain.data import load_digits
from jaxtrain.parallel import replicate, shard_batch
from jaxtrain.perf import step_flops

B, STEPS, LOG_EVERY, SECONDS_PER_STEP = 32, 12, 4, 0.25


class FakeBar:
    """Stands in for tqdm: records every postfix fit sets."""

    instances: typing.ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        self.postfixes: list[dict] = []
        FakeBar.instances.append(self)

    def update(self, n=1):
        pass

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        self.postfixes.append({**(ordered_dict or {}), **kwargs})

    def close(self):
        pass


@pytest.fixture
def bar(monkeypatch):
    FakeBar.instances = []
    monkeypatch.setattr(callbacks_lib, "tqdm", FakeBar)
    return FakeBar


@pytest.fixture(scope="module")
def setup():
    train, _ = load_digits()
    arrays = {"x": train["x"][: B * 8], "y": train["y"][: B * 8]}  # 8 full batches
    model = jt.from_linen(jt.models.MLP(hidden=(16,)))
    params, _ = model.init(jax.random.key(0), arrays["x"][:1])
    opt = optax.adam(1e-3)
    step = jt.make_train_step(classification_loss(model), opt)
    data = jt.ArrayDataset(arrays, B, seed=0)
    state = jt.TrainState.create(params, opt, 0)
    mesh = jt.data_mesh()
    flops = step_flops(step, replicate(state, mesh), shard_batch(next(data.batches(0)), mesh))
    assert flops is not None and flops > 0
    return {"params": params, "opt": opt, "step": step, "data": data, "flops": flops}


def _fresh(s):
    return jt.TrainState.create(jax.tree.map(jnp.copy, s["params"]), s["opt"], 0)


@pytest.fixture
def clock(monkeypatch, setup):
    """fit's clock advances only inside the step, by SECONDS_PER_STEP per step."""
    now = [100.0]
    monkeypatch.setattr(
        loop_lib, "time", types.SimpleNamespace(perf_counter=lambda: now[0], sleep=lambda s: None)
    )

    def step(state, batch):
        now[0] += SECONDS_PER_STEP
        # The fake device finishes inside the step: fit's device-synchronised interval
        # clock then reads exactly SECONDS_PER_STEP per step.
        return jax.block_until_ready(setup["step"](state, batch))

    return step


def _train_records(history):
    assert [r["step"] for r in history.train] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    return history.train


def test_mfu_is_flops_over_time_over_a_fake_peak(monkeypatch, bar, setup, clock):
    fake_peak = 2e10  # FLOP/s per device
    monkeypatch.setattr(perf, "PEAKS", (("cpu", "Fake chip", fake_peak, 1),))
    reads = []
    real_reads = train_log_lib.per_step_metrics
    monkeypatch.setattr(
        train_log_lib, "per_step_metrics", lambda p: reads.append(1) or real_reads(p)
    )

    _, history = jt.fit(
        _fresh(setup),
        clock,
        setup["data"],
        num_steps=STEPS,
        log_every=LOG_EVERY,
        flops_per_step=setup["flops"],
    )
    achieved = setup["flops"] * LOG_EVERY / (LOG_EVERY * SECONDS_PER_STEP)
    mfu = achieved / (fake_peak * jax.device_count())
    for r in _train_records(history):
        assert r["model_flops_per_second"] == pytest.approx(achieved, rel=1e-9)
        assert r["mfu"] == pytest.approx(mfu, rel=1e-9)
    postfixes = bar.instances[0].postfixes
    assert len(postfixes) == STEPS // LOG_EVERY  # updated at logging points only
    assert postfixes[-1]["tflops"] == f"{achieved / 1e12:.3g}"
    assert postfixes[-1]["mfu"] == f"{100 * mfu:.1f}%"
    assert set(postfixes[-1]) == {"loss", "ex_s", "tflops", "mfu"}
    assert len(reads) == STEPS // LOG_EVERY  # one metrics read per interval, none per step


def test_mfu_is_unknown_on_cpu_and_absent_without_flops(bar, setup, clock):
    assert perf.peak_flops(jax.devices()[0])["peak_flops_per_device"] is None  # plain CPU
    _, history = jt.fit(
        _fresh(setup),
        clock,
        setup["data"],
        num_steps=STEPS,
        log_every=LOG_EVERY,
        flops_per_step=setup["flops"],
    )
    achieved = setup["flops"] / SECONDS_PER_STEP
    for r in _train_records(history):
        assert r["mfu"] is None
        assert r["model_flops_per_second"] == pytest.approx(achieved, rel=1e-9)
    assert bar.instances[0].postfixes[-1]["mfu"] == "unknown"

    _, plain = jt.fit(_fresh(setup), clock, setup["data"], num_steps=STEPS, log_every=LOG_EVERY)
    for r in _train_records(plain):
        assert "mfu" not in r and "model_flops_per_second" not in r
    assert set(bar.instances[1].postfixes[-1]) == {"loss", "ex_s"}


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1e9", True])
def test_bad_flops_per_step_is_a_clear_error(setup, bad):
    with pytest.raises(ValueError, match=r"flops_per_step must be a positive number of FLOPs"):
        jt.fit(_fresh(setup), setup["step"], setup["data"], num_steps=1, flops_per_step=bad)


# --- Device-synchronised throughput ---------------------------------------------------
D, N_MATMULS, SLOW_B = 128, 96, 64


@pytest.fixture(scope="module")
def slow():
    """A deliberately slow step (a chain of matmuls, ~10 ms on CPU) and its data."""

    def loss_fn(params, batch):
        def body(_, h):
            return jnp.tanh(h @ params["w"])

        h = jax.lax.fori_loop(0, N_MATMULS, body, batch["x"])
        return jnp.mean(h**2)

    opt = optax.sgd(1e-3)
    w = jax.random.normal(jax.random.key(0), (D, D)) / jnp.sqrt(D)
    x = np.asarray(jax.random.normal(jax.random.key(1), (SLOW_B * 8, D)))
    return {"loss_fn": loss_fn, "opt": opt, "w": w, "x": x}


def _slow_data(slow, stall_every=5, stall=0.01):
    """epoch -> batches; the host stalls now and then (varying dispatch)."""

    def epoch_batches(epoch):
        for i in range(8):
            if i % stall_every == stall_every - 1:
                time.sleep(stall)
            yield {"x": slow["x"][i * SLOW_B : (i + 1) * SLOW_B]}

    return epoch_batches


def test_interval_throughput_is_device_synchronised(slow):
    """Intervals tile the run on the device's clock: their examples over their time agree
    with the examples over the measured time, and none swings far above the mean (at an
    epoch end the loop reads everything back: dispatch-time rates then jumped 100x)."""
    step = jt.make_train_step(slow["loss_fn"], slow["opt"])
    state = jt.TrainState.create({"w": slow["w"]}, slow["opt"], 0)
    first_done = []

    def timed(state, batch):  # notes when the first (compiling) call has finished
        out = step(state, batch)
        if not first_done:
            first_done.append(time.perf_counter() if jax.block_until_ready(out) else 0)
        return out

    _, h = jt.fit(state, timed, _slow_data(slow), epochs=4, log_every=4, progress=False)
    t_end = time.perf_counter()
    assert step.trace_count == 1 and h.steps == 32
    assert h.steady_examples == 31 * SLOW_B and h.steady_steps == 31
    measured = h.steady_examples / (t_end - first_done[0])
    rates = [r["examples_per_second"] for r in h.train]
    assert all(r is not None and r > 0 for r in rates)
    # Examples per interval: 4 steps; the first call is left out.
    steps_in = np.diff([0] + [r["step"] for r in h.train])
    steps_in[0] -= 1
    seconds = [n * SLOW_B / r for n, r in zip(steps_in, rates, strict=True)]
    assert sum(seconds) == pytest.approx(h.steady_seconds, rel=1e-6)
    assert h.examples_per_second == pytest.approx(measured, rel=0.10)
    assert h.steady_examples / sum(seconds) == pytest.approx(measured, rel=0.10)
    assert max(rates) < 3 * measured, (rates, measured)
    assert perf.steps_per_second(h) == pytest.approx(31 / h.steady_seconds)


def test_evaluation_time_is_not_training_time(slow):
    step = jt.make_train_step(slow["loss_fn"], slow["opt"])
    state = jt.TrainState.create({"w": slow["w"]}, slow["opt"], 0)

    def slow_eval(state, batch):  # 0.3 s of "evaluation" per epoch
        time.sleep(0.3)
        return {"n": (jnp.float32(0), jnp.float32(1))}

    _, h = jt.fit(
        state,
        step,
        _slow_data(slow, stall_every=100),
        epochs=3,
        log_every=4,
        eval_step=slow_eval,
        eval_data=[{"x": slow["x"][:2]}],
        progress=False,
    )
    assert len(h.eval) == 3
    # Three evaluations took 0.9 s; the training intervals did not absorb them.
    assert h.steady_seconds < h.wall_seconds - h.first_step_seconds - 0.8
    assert max(r["examples_per_second"] for r in h.train) < 3 * h.examples_per_second


def test_compile_seconds_is_the_compilation_not_the_first_call(slow):
    def long_loss(params, batch):  # compiles like the slow step, runs ~20x longer
        h = jax.lax.fori_loop(0, 20 * N_MATMULS, lambda _, h: jnp.tanh(h @ params["w"]), batch["x"])
        return jnp.mean(h**2)

    step = jt.make_train_step(long_loss, slow["opt"])
    state = jt.TrainState.create({"w": slow["w"]}, slow["opt"], 0)
    batch = {"x": slow["x"][:SLOW_B]}
    assert step.compile_seconds == 0.0
    state, h = jt.fit(state, step, [batch] * 2, epochs=1, log_every=2, progress=False)
    assert step.trace_count == 1
    assert 0 < h.compile_seconds == pytest.approx(step.compile_seconds)
    # The first call also ran the step once; a later call shows how long that takes.
    t0 = time.perf_counter()
    jax.block_until_ready(step(state, jt.shard_batch(batch, jt.data_mesh())))
    run = time.perf_counter() - t0
    assert step.trace_count == 1  # no new compilation
    assert h.compile_seconds < h.first_step_seconds - 0.5 * run, (h.compile_seconds, run)


def test_compile_time_counted_where_the_compile_happens(slow):
    """step_flops compiles the step before fit (jaxtrain train does): counted once, there."""
    step = jt.make_train_step(slow["loss_fn"], slow["opt"])
    state = jt.TrainState.create({"w": slow["w"]}, slow["opt"], 0)
    batch = {"x": slow["x"][:SLOW_B]}
    mesh = jt.data_mesh()
    assert step_flops(step, jt.shard_state(state, mesh), jt.shard_batch(batch, mesh)) > 0
    compiled = step.compile_seconds
    assert compiled > 0
    _, h = jt.fit(state, step, [batch] * 2, epochs=1, progress=False)
    assert step.trace_count == 1
    assert h.compile_seconds == pytest.approx(0.0, abs=0.05)
    assert step.compile_seconds == pytest.approx(compiled, abs=0.05)


def test_a_long_compile_says_what_is_compiling(slow, monkeypatch, capsys):
    batch = {"x": slow["x"][:SLOW_B]}
    state = jt.TrainState.create({"w": slow["w"]}, slow["opt"], 0)
    quiet = jt.make_train_step(slow["loss_fn"], slow["opt"])
    quiet(state, batch)  # default threshold (5 s): a quick compile prints nothing
    assert "compiling" not in capsys.readouterr().err
    monkeypatch.setenv("JAXTRAIN_COMPILE_NOTICE_SECONDS", "0")
    step = jt.make_train_step(slow["loss_fn"], slow["opt"])
    state = jt.TrainState.create({"w": slow["w"]}, slow["opt"], 0)
    state, _ = step(state, batch)
    err = capsys.readouterr().err
    assert "jaxtrain: compiling train_step (first call: tracing and XLA compilation)" in err
    assert "jaxtrain: train_step compiled in" in err
    step(state, batch)  # later calls say nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("JAXTRAIN_COMPILE_NOTICE_SECONDS", "soon")
    state = jt.TrainState.create({"w": slow["w"]}, slow["opt"], 0)
    with pytest.raises(ValueError, match=r"JAXTRAIN_COMPILE_NOTICE_SECONDS must be a number"):
        jt.make_train_step(slow["loss_fn"], slow["opt"])(state, batch)
