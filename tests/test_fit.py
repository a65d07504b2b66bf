"""`fit`: budgets, logging cadence, evaluation, early stopping, hooks, data sources, syncs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.data import load_digits


@pytest.fixture(scope="module")
def setup():
    train, test = load_digits()
    train = {k: v[:300] for k, v in train.items()}  # 300 examples, batch 64: 5 steps/epoch
    model = jt.from_linen(jt.models.MLP(hidden=(32,)))
    params, ms = model.init(jax.random.key(0), train["x"][:1])
    opt = optax.adam(1e-2)
    return {
        "train": train,
        "train_ds": jt.ArrayDataset(train, 64, seed=0),
        "test_ds": jt.ArrayDataset(test, 120, shuffle=False),
        "params": params,
        "opt": opt,
        # One compiled step for the whole module: fit never retraces it.
        "step": jt.make_train_step(classification_loss(model), opt),
        "eval": jt.make_eval_step(classification_eval(model)),
    }


def _state(s):
    # A fresh copy: a state passed straight to the (donating) step is consumed.
    return jt.TrainState.create(jax.tree.map(jnp.copy, s["params"]), s["opt"], 0)


class ListWriter:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(dict(record))


def test_epochs_logging_and_eval_cadence(setup):
    s = setup
    w = ListWriter()
    state, h = jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        epochs=3,
        eval_step=s["eval"],
        eval_data=s["test_ds"],
        log_every=2,
        writers=[w],
        progress=False,
    )
    assert int(state.step) == 15 and h.steps == 15
    assert h.examples == 3 * 300  # real examples only, padding not counted
    # Logs every 2 global steps, plus at each epoch end (5, 15; 10 is both).
    assert [r["step"] for r in h.train] == [2, 4, 5, 6, 8, 10, 12, 14, 15]
    assert [r["step"] for r in h.eval] == [5, 10, 15]
    assert [r["epoch"] for r in h.eval] == [0, 1, 2]
    for r in h.train:
        assert {"loss", "grad_norm", "accuracy", "examples_per_second"} <= set(r)
        assert r["split"] == "train"
    assert w.records == (
        h.train[:3] + h.eval[:1] + h.train[3:6] + h.eval[1:2] + h.train[6:] + h.eval[2:]
    )
    assert h.position == jt.DataPosition(3, 0)
    assert h.eval[-1]["accuracy"] > h.eval[0]["accuracy"]  # it learns, even in 15 tiny steps
    assert h.eval[-1]["loss"] < h.eval[0]["loss"]
    assert s["step"].trace_count == 1 and s["eval"].trace_count == 1


def test_step_budget_and_eval_every(setup):
    s = setup
    state, h = jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        num_steps=7,
        eval_step=s["eval"],
        eval_data=s["test_ds"],
        eval_every=3,
        log_every=100,
        progress=False,
    )
    assert int(state.step) == 7
    # every 3 steps, plus the epoch end (5) when eval_every is set? No: only at 3, 6 and the end.
    assert [r["step"] for r in h.eval] == [3, 6, 7]
    assert h.position == jt.DataPosition(1, 2)


def test_epochs_and_steps_whichever_first(setup):
    s = setup
    state, h = jt.fit(_state(s), s["step"], s["train_ds"], epochs=1, num_steps=100, progress=False)
    assert int(state.step) == 5


def test_early_stopping_stops_and_records_best(setup):
    s = setup
    # min_delta so large that nothing after the first evaluation counts as better.
    es = jt.EarlyStopping("accuracy", "max", patience=2, min_delta=10.0)
    state, h = jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        epochs=10,
        eval_step=s["eval"],
        eval_data=s["test_ds"],
        early_stopping=es,
        progress=False,
    )
    assert h.stopped_early
    assert len(h.eval) == 3 and int(state.step) == 15
    assert h.best_eval == h.eval[0]


def test_hooks_called_at_intervals(setup):
    s = setup
    seen = []
    hook = jt.PeriodicHook(4, lambda st, hist: seen.append(int(st.step)))
    jt.fit(_state(s), s["step"], s["train_ds"], num_steps=12, hooks=[hook], progress=False)
    assert seen == [4, 8, 12]


def test_any_iterable_of_dict_batches_works(setup):
    s = setup
    batches = list(s["train_ds"].batches(0))
    ref_state, _ = jt.fit(_state(s), s["step"], s["train_ds"], epochs=2, progress=False)
    # A list is re-iterated every epoch; a callable gets the epoch number.
    st_list, _ = jt.fit(_state(s), s["step"], batches, epochs=1, progress=False)
    st_call, _ = jt.fit(
        _state(s), s["step"], lambda e: s["train_ds"].batches(e), epochs=2, progress=False
    )
    ref1, _ = jt.fit(_state(s), s["step"], s["train_ds"], epochs=1, progress=False)
    for a, b in zip(jax.tree.leaves(st_list.params), jax.tree.leaves(ref1.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(st_call.params), jax.tree.leaves(ref_state.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # A generator is consumed once: use num_steps.
    gen = (b for b in batches)
    st_gen, h = jt.fit(_state(s), s["step"], gen, num_steps=5, progress=False)
    assert int(st_gen.step) == 5


def test_start_position_skips_batches(setup):
    s = setup
    # Starting at batch 2 of epoch 0 and running 3 steps == running batches 2, 3, 4 by hand.
    st, h = jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        num_steps=3,
        start=jt.DataPosition(0, 2),
        progress=False,
    )
    manual = _state(s)
    for b in list(s["train_ds"].batches(0))[2:]:
        manual, _ = s["step"](manual, jt.shard_batch(b, jt.data_mesh()))
    for a, b in zip(jax.tree.leaves(st.params), jax.tree.leaves(manual.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert h.position == jt.DataPosition(1, 0)


def test_no_host_sync_per_step(setup, monkeypatch):
    """Implicit transfers (float(loss), np.asarray) are forbidden; explicit ones are counted."""
    s = setup
    calls = []
    real = jax.device_get

    def counting(x):
        calls.append(1)
        return real(x)

    monkeypatch.setattr(jax, "device_get", counting)
    with jax.transfer_guard_device_to_host("disallow"):
        _, h = jt.fit(_state(s), s["step"], s["train_ds"], epochs=4, log_every=10, progress=False)
    assert h.steps == 20
    # 20 steps, 5 reads: the start step + one per logging interval (every 10 steps and
    # at each of the 4 epoch ends, which include steps 10 and 20).
    assert [r["step"] for r in h.train] == [5, 10, 15, 20]
    assert len(calls) == 1 + len(h.train) == 5


def test_history_to_dict_is_json_ready(setup):
    import json

    s = setup
    _, h = jt.fit(_state(s), s["step"], s["train_ds"], num_steps=6, progress=False)
    d = json.loads(json.dumps(h.to_dict()))
    assert d["steps"] == 6 and d["position"] == {"epoch": 1, "index": 1}
    assert d["examples_per_second"] > 0 and d["first_step_seconds"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "fit needs epochs=... or num_steps=..."),
        ({"epochs": 0}, "epochs must be a positive integer; got 0"),
        ({"num_steps": -1}, "num_steps must be a positive integer; got -1"),
        ({"epochs": 1, "log_every": 0}, "log_every must be a positive integer; got 0"),
        (
            {"epochs": 1, "eval_every": 0},
            r"eval_every must be a positive integer \(steps\), an Every\(steps=...\|epochs=...\) or None; got 0",
        ),
        ({"epochs": 1, "eval_data": [1]}, "eval_step and eval_data go together"),
        (
            {"epochs": 1, "early_stopping": jt.EarlyStopping()},
            "early_stopping watches an eval metric",
        ),
    ],
)
def test_fit_argument_errors(setup, kwargs, message):
    s = setup
    with pytest.raises(ValueError, match=message):
        jt.fit(_state(s), s["step"], s["train_ds"], progress=False, **kwargs)


def test_early_stopping_errors():
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'; got 'up'"):
        jt.EarlyStopping("loss", "up")
    with pytest.raises(ValueError, match="patience must be >= 1; got 0"):
        jt.EarlyStopping("loss", "min", patience=0)


def test_bad_batches_are_rejected(setup):
    s = setup
    with pytest.raises(TypeError, match="each batch must be a dict of arrays; got int"):
        jt.fit(_state(s), s["step"], [1, 2], epochs=1, progress=False)
    with pytest.raises(TypeError, match="train_data must be an ArrayDataset"):
        jt.fit(_state(s), s["step"], 42, epochs=1, progress=False)
    with pytest.raises(ValueError, match="yielded no batches in epoch 0"):
        jt.fit(_state(s), s["step"], [], epochs=1, progress=False)
    bad = {"x": jnp.zeros((4, 8, 8, 1)), "y": jnp.zeros((3,), jnp.int32)}
    with pytest.raises(ValueError, match="same leading"):
        jt.fit(_state(s), s["step"], [bad], epochs=1, progress=False)


def _recorder(seen, tag):
    def fn(state, history):
        last = history.eval[-1]["step"] if history.eval else None
        seen.append((tag, int(state.step), last))

    return fn


def test_hooks_at_an_epoch_end_run_after_its_evaluation(setup):
    """At an epoch end (5 steps per epoch) every hook sees that epoch's evaluation, in the
    order given; eval_end hooks fire after each evaluation, mid-epoch ones too."""
    s = setup
    seen = []
    hooks = [
        jt.PeriodicHook(5, _recorder(seen, "every 5")),
        jt.EventHook("epoch_end", _recorder(seen, "epoch_end")),
        jt.EventHook("eval_end", _recorder(seen, "eval_end")),
    ]
    st, h = jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        epochs=2,
        eval_step=s["eval"],
        eval_data=s["test_ds"],
        hooks=hooks,
        progress=False,
    )
    assert [r["step"] for r in h.eval] == [5, 10]
    assert seen == [
        ("every 5", 5, 5),
        ("epoch_end", 5, 5),
        ("eval_end", 5, 5),
        ("every 5", 10, 10),
        ("epoch_end", 10, 10),
        ("eval_end", 10, 10),
    ]
    # Mid-epoch evaluations (eval_every) and a step budget that stops mid-epoch: the
    # periodic hook at step 3 sees the evaluation at 3; no epoch ended, none fired.
    seen.clear()
    jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        num_steps=3,
        eval_every=3,
        eval_step=s["eval"],
        eval_data=s["test_ds"],
        hooks=[jt.PeriodicHook(3, _recorder(seen, "every 3")), *hooks[1:]],
        progress=False,
    )
    assert seen == [("every 3", 3, 3), ("eval_end", 3, 3)]


def test_epoch_end_hook_fires_when_the_budget_ends_an_epoch(setup):
    s = setup
    seen = []
    jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        num_steps=5,
        hooks=[jt.EventHook("epoch_end", _recorder(seen, "epoch_end"))],
        progress=False,
    )
    assert seen == [("epoch_end", 5, None)]


def test_hook_errors_name_the_fix(setup):
    with pytest.raises(
        ValueError, match=r"EventHook on must be one of \['epoch_end', 'eval_end'\]; got 'epoch'"
    ):
        jt.EventHook("epoch", print)
    with pytest.raises(
        TypeError, match=r"hooks must be PeriodicHook or EventHook objects; got function. Fix"
    ):
        jt.fit(
            _state(setup),
            setup["step"],
            setup["train_ds"],
            num_steps=1,
            hooks=[lambda state, history: None],
            progress=False,
        )


@pytest.mark.integration
@pytest.mark.parametrize("k", [3, 8])  # 5 steps per epoch: groups 3+2, or one of 5 < K=8
def test_fused_steps_pad_the_short_last_group_and_compile_once(setup, k):
    """A group cut short by the epoch's end is padded to K with inactive steps: one
    compilation, bitwise the parameters of single steps, the same records (the padded
    steps' metrics are left out)."""
    s = setup
    model = jt.from_linen(jt.models.MLP(hidden=(32,)))
    fused = jt.make_train_steps(classification_loss(model), s["opt"], steps_per_call=k)
    ref, h_ref = jt.fit(_state(s), s["step"], s["train_ds"], epochs=2, progress=False)
    got, h = jt.fit(_state(s), fused, s["train_ds"], epochs=2, progress=False)
    assert fused.trace_count == 1
    assert h.steps == h_ref.steps == 10 and h.examples == h_ref.examples == 600
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params), strict=True):
        np.testing.assert_array_equal(a, b)
    timing = ("examples_per_second",)
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]  # noqa: E731
    assert [r["step"] for r in h.train] == [5, 10]
    assert strip(h.train) == strip(h_ref.train)
