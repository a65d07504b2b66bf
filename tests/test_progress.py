"""Throughput and MFU in fit's progress bar and train records (``flops_per_step``):
achieved FLOP/s from the interval's measured time, MFU against the device's peak
("unknown" where the peak is unknown, as on CPU), no extra host reads. ``jaxtrain train``
passes its step FLOPs to fit: checked in test_cli's short run."""

import types
import typing

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxtrain as jt
import jaxtrain.loop as loop_lib
from jaxtrain import perf
from jaxtrain.parallel import replicate, shard_batch

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
    monkeypatch.setattr(loop_lib, "tqdm", FakeBar)
    return FakeBar


@pytest.fixture(scope="module")
def setup():
    train, _ = jt.load_digits()
    arrays = {"x": train["x"][: B * 8], "y": train["y"][: B * 8]}  # 8 full batches
    model = jt.from_linen(jt.MLP(hidden=(16,)))
    params, _ = model.init(jax.random.key(0), arrays["x"][:1])
    opt = optax.adam(1e-3)
    step = jt.make_train_step(jt.classification_loss(model), opt)
    data = jt.ArrayDataset(arrays, B, seed=0)
    state = jt.TrainState.create(params, opt, 0)
    mesh = jt.data_mesh()
    flops = jt.step_flops(step, replicate(state, mesh), shard_batch(next(data.batches(0)), mesh))
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
        return setup["step"](state, batch)

    return step


def _train_records(history):
    assert [r["step"] for r in history.train] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    return history.train


def test_mfu_is_flops_over_time_over_a_fake_peak(monkeypatch, bar, setup, clock):
    fake_peak = 2e10  # FLOP/s per device
    monkeypatch.setattr(perf, "PEAKS", (("cpu", "Fake chip", fake_peak, 1),))
    reads = []
    real_reads = loop_lib.per_step_metrics
    monkeypatch.setattr(loop_lib, "per_step_metrics", lambda p: reads.append(1) or real_reads(p))

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
