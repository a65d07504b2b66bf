"""`fit(callbacks=[...])`: the events a user's `jaxtrain.Callback` sees, their order
relative to fit's own work, stopping from a callback, cleanup on errors, and the
fault-injection hook living in the tests rather than in the package."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.data import load_digits

pytestmark = pytest.mark.integration  # tiny trainings


@pytest.fixture(scope="module")
def setup():
    train, test = load_digits()
    train = {k: v[:300] for k, v in train.items()}  # batch 64: 5 steps per epoch
    model = jt.from_linen(jt.models.MLP(hidden=(16,)))
    params, _ = model.init(jax.random.key(0), train["x"][:1])
    opt = optax.adam(1e-2)
    return {
        "train_ds": jt.ArrayDataset(train, 64, seed=0),
        "test_ds": jt.ArrayDataset(test, 120, shuffle=False),
        "params": params,
        "opt": opt,
        "step": jt.make_train_step(classification_loss(model), opt),
        "eval": jt.make_eval_step(classification_eval(model)),
    }


def _state(s):
    return jt.TrainState.create(jax.tree.map(jnp.copy, s["params"]), s["opt"], 0)


class Recorder(jt.Callback):
    """Notes each event with the step and what fit had done by then."""

    def __init__(self):
        self.events = []

    def _note(self, name, loop, *extra):
        last_train = loop.history.train[-1]["step"] if loop.history.train else None
        last_eval = loop.history.eval[-1]["step"] if loop.history.eval else None
        self.events.append((name, loop.step, last_train, last_eval, *extra))

    def on_train_begin(self, loop):
        self._note("train_begin", loop, loop.position())

    def on_call_end(self, loop):
        self._note("call_end", loop)

    def on_log(self, loop, record):
        self._note("log", loop, record["step"])

    def on_eval_end(self, loop, record):
        self._note("eval_end", loop, record["step"])

    def on_epoch_end(self, loop):
        self._note("epoch_end", loop, loop.position())

    def on_loop_end(self, loop):
        self._note("loop_end", loop)

    def on_train_end(self, loop):
        self._note("train_end", loop)

    def on_exit(self, loop):
        self._note("exit", loop)


def test_a_callback_sees_each_event_after_fits_own_work(setup):
    s = setup
    rec = Recorder()
    _, h = jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        num_steps=7,
        log_every=2,
        eval_step=s["eval"],
        eval_data=s["test_ds"],
        callbacks=[rec],
        progress=False,
    )
    names = [e[0] for e in rec.events]
    assert names[0] == "train_begin" and names[-2:] == ["train_end", "exit"]
    assert names.count("call_end") == h.steps == 7
    assert [e[-1] for e in rec.events if e[0] == "log"] == [r["step"] for r in h.train]
    # (event, loop.step, newest train record, newest eval record, ...) from step 3 on:
    # lagged logging reads the record of step 2 back at step 4 (one interval late); the
    # epoch end (step 5) comes after its log records and its evaluation; the loop's end
    # comes before the closing records and the final evaluation.
    assert rec.events[3:] == [
        ("call_end", 3, None, None),
        ("log", 4, 2, None, 2),
        ("call_end", 4, 2, None),
        ("call_end", 5, 2, None),
        ("log", 5, 4, None, 4),
        ("log", 5, 5, None, 5),
        ("eval_end", 5, 5, 5, 5),
        ("epoch_end", 5, 5, 5, jt.DataPosition(1, 0)),
        ("call_end", 6, 5, 5),
        ("call_end", 7, 5, 5),
        ("loop_end", 7, 5, 5),
        ("log", 7, 6, 5, 6),
        ("log", 7, 7, 5, 7),
        ("eval_end", 7, 7, 7, 7),
        ("train_end", 7, 7, 7),
        ("exit", 7, 7, 7),
    ]


def test_a_callback_can_stop_training_and_the_run_ends_cleanly(setup, tmp_path):
    """loop.stop ends training after the current call; the closing work still runs
    (a checkpoint of that step, its log record, the final evaluation)."""
    from jaxtrain.checkpoint import Checkpointer

    s = setup

    class StopAt(jt.Callback):
        def on_call_end(self, loop):
            loop.stop = loop.step >= 3

    ckpt = Checkpointer(tmp_path / "ckpt")
    st, h = jt.fit(
        _state(s),
        s["step"],
        s["train_ds"],
        epochs=5,
        eval_step=s["eval"],
        eval_data=s["test_ds"],
        checkpointer=ckpt,
        callbacks=[StopAt()],
        progress=False,
    )
    assert int(st.step) == h.steps == 3 and h.position == jt.DataPosition(0, 3)
    assert [r["step"] for r in h.train] == [3] and [r["step"] for r in h.eval] == [3]
    assert ckpt.all_steps() == [3] and not h.stopped_early
    ckpt.close()


def test_exit_runs_on_errors_and_other_objects_are_refused(setup):
    s = setup
    rec = Recorder()

    class Boom(jt.Callback):
        def on_call_end(self, loop):
            if loop.step == 2:
                raise RuntimeError("boom at step 2")

    with pytest.raises(RuntimeError, match="boom at step 2"):
        jt.fit(
            _state(s), s["step"], s["train_ds"], epochs=1, callbacks=[rec, Boom()], progress=False
        )
    assert rec.events[-1][:2] == ("exit", 2)
    with pytest.raises(
        TypeError, match=r"callbacks must be jaxtrain.Callback objects; got function. Fix"
    ):
        jt.fit(_state(s), s["step"], s["train_ds"], epochs=1, callbacks=[lambda loop: None])


def test_no_fault_injection_hook_in_the_package():
    """The kill tests' pause lives in tests/_paused_train.py (a callback), not in jaxtrain."""
    root = pathlib.Path(jt.__file__).parent
    offenders = [
        p.relative_to(root.parent).as_posix()
        for p in root.rglob("*.py")
        if "DEBUG_PAUSE" in p.read_text() or "_debug_pause" in p.read_text()
    ]
    assert offenders == []


def test_cadence_in_steps_or_epochs_for_callbacks_and_hooks():
    """Every(steps=...) / Every(epochs=...) drive PeriodicCallback and PeriodicHook alike;
    an epoch period runs after that epoch's evaluation."""
    from jaxtrain.callbacks import Every, PeriodicCallback

    opt = optax.sgd(0.1)
    step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
    eval_step = jt.make_eval_step(lambda p, b: {"err": jnp.abs(b["x"] @ p["w"])})
    state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
    data = jt.ArrayDataset({"x": np.ones((8, 2), np.float32)}, 2)  # 4 steps per epoch

    class Seen(PeriodicCallback):
        def __init__(self, every):
            super().__init__(every)
            self.seen = []

        def on_period(self, loop):
            self.seen.append(
                (loop.step, loop.history.eval[-1]["step"] if loop.history.eval else None)
            )

    steps3, epochs2 = Seen(3), Seen(Every(epochs=2))
    hook_epochs = []
    hook = jt.PeriodicHook(None, lambda s, h: hook_epochs.append(int(s.step)), every_epochs=3)
    jt.fit(
        state,
        step,
        data,
        epochs=6,
        eval_step=eval_step,
        eval_data=data,
        callbacks=[steps3, epochs2],
        hooks=[hook],
        progress=False,
    )
    assert [s for s, _ in steps3.seen] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert epochs2.seen == [(8, 8), (16, 16), (24, 24)]  # after each such epoch's evaluation
    assert hook_epochs == [12, 24]
    for bad, message in [
        (lambda: Every(), "Every needs one period >= 1"),
        (lambda: Every(steps=2, epochs=1), "Every needs one period >= 1"),
        (lambda: Every(epochs=0), "got steps=None, epochs=0"),
        (lambda: jt.PeriodicHook(None, print), "PeriodicHook needs one cadence"),
        (lambda: jt.PeriodicHook(5, print, every_epochs=1), "PeriodicHook needs one cadence"),
        (
            lambda: jt.PeriodicHook(None, print, every_epochs=0),
            "every_epochs must be an integer >= 1",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            bad()


def test_fit_evaluates_and_saves_at_an_epoch_cadence(tmp_path):
    """eval_every / save_every take an Every(epochs=n) as well as a number of steps."""
    from jaxtrain.callbacks import Every
    from jaxtrain.checkpoint import Checkpointer

    opt = optax.sgd(0.1)
    step = jt.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
    eval_step = jt.make_eval_step(lambda p, b: {"err": jnp.abs(b["x"] @ p["w"])})
    state = jt.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
    data = jt.ArrayDataset({"x": np.ones((8, 2), np.float32)}, 2)  # 4 steps per epoch
    with Checkpointer(tmp_path / "ckpt", keep_last=10) as ckpt:
        _, history = jt.fit(
            state,
            step,
            data,
            epochs=6,
            eval_step=eval_step,
            eval_data=data,
            eval_every=Every(epochs=2),
            checkpointer=ckpt,
            save_every=Every(epochs=3),
            save_at_epoch_end=False,
            progress=False,
        )
        saved = ckpt.all_steps()
    assert [r["step"] for r in history.eval] == [8, 16, 24]
    assert saved == [12, 24]
    with pytest.raises(
        ValueError, match=r"eval_every must be a positive integer \(steps\), an Every"
    ):
        jt.fit(state, step, data, epochs=1, eval_step=eval_step, eval_data=data, eval_every=0)
