"""Bad input gets a clear error: the type, and a message naming the argument, what was
expected and what was given. One table across the public API and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps import cli
from jaxtrain.apps.digits import TrainConfig
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.checkpoint import Checkpointer, CheckpointError

X = np.zeros((10, 8, 8, 1), np.float32)
Y = np.arange(10, dtype=np.int32) % 10


def _model_and_state():
    model = jt.from_linen(jt.models.CNN(channels=(4,), dense=8))
    params, ms = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    opt = optax.sgd(0.1)
    return model, jt.TrainState.create(params, opt, 0, ms), opt


def _train_step_on(batch, loss_fn=None):
    model, st, opt = _model_and_state()
    step = jt.make_train_step(loss_fn or classification_loss(model), opt)
    return step(st, batch)


def _batch(**over):
    b = {"x": jnp.zeros((4, 8, 8, 1)), "y": jnp.zeros((4,), jnp.int32), "mask": jnp.ones(4)}
    b.update(over)
    return {k: v for k, v in b.items() if v is not None}


def _params_not_matching_opt_state():
    """Adam state built for one model, params of another (e.g. swapped by hand)."""
    model, st, _ = _model_and_state()
    opt = optax.adam(1e-3)
    st = jt.TrainState.create(st.params, opt, 0, st.model_state)
    other = jax.tree.map(lambda p: jnp.zeros(p.shape[:-1] + (p.shape[-1] + 1,)), st.params)
    step = jt.make_train_step(classification_loss(model), opt)
    return step(st.replace(params=other), _batch())


def _nan_data():
    x = X.copy()
    x[2, 1, 1, 0] = np.inf
    return jt.ArrayDataset({"x": x, "y": Y}, 4)


def _cli(args, tmp_path):
    def run():
        code = cli.main(args(tmp_path) if callable(args) else args)
        if code:
            raise SystemExit(code)

    return run


def _resume_without_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 1, "out": str(tmp_path)}))
    return ["train", "--resume", str(tmp_path)]


def _fused_without_k_axis():
    model, st, opt = _model_and_state()
    steps = jt.make_train_steps(classification_loss(model), opt, steps_per_call=4)
    # B=8 != K. (B == K is not visible in the shapes; the model's input check then
    # catches the missing batch axis.)
    b = {"x": jnp.zeros((8, 8, 8, 1)), "y": jnp.zeros((8,), jnp.int32), "mask": jnp.ones(8)}
    return steps(st, b)


def _fit_plain(batches):
    model, st, opt = _model_and_state()
    step = jt.make_train_step(classification_loss(model), opt)
    return jt.fit(st, step, batches, epochs=1, progress=False)


def _np_batch(**over):
    b = {"x": np.zeros((4, 8, 8, 1), np.float32), "y": np.zeros(4, np.int32)}
    b["mask"] = np.ones(4, np.float32)
    b.update(over)
    return b


def _early_stopping_typo():
    model, st, opt = _model_and_state()
    step = jt.make_train_step(classification_loss(model), opt)
    eval_step = jt.make_eval_step(classification_eval(model))
    ds = jt.ArrayDataset({"x": X, "y": Y}, 4)
    stop = jt.EarlyStopping("acuracy", "max")
    return jt.fit(st, step, ds, epochs=1, eval_step=eval_step, eval_data=ds, early_stopping=stop)


CASES = [
    # (id, build(tmp_path) -> callable, exception, substrings the message must contain)
    (
        "dataset-empty-dict",
        lambda t: lambda: jt.ArrayDataset({}, 4),
        ValueError,
        ["arrays must be a non-empty dict", "got {}"],
    ),
    (
        "dataset-0-examples",
        lambda t: lambda: jt.ArrayDataset({"x": X[:0]}, 4),
        ValueError,
        ["dataset is empty", "0 examples"],
    ),
    (
        "batch-size-0",
        lambda t: lambda: jt.ArrayDataset({"x": X}, 0),
        ValueError,
        ["batch_size", "integer >= 1", "got 0"],
    ),
    (
        "batch-size-negative",
        lambda t: lambda: jt.ArrayDataset({"x": X}, -3),
        ValueError,
        ["batch_size", ">= 1", "got -3"],
    ),
    (
        "batch-size-over-dataset-drop",
        lambda t: lambda: jt.ArrayDataset({"x": X}, 20, drop_remainder=True),
        ValueError,
        ["batch_size=20", "larger than the dataset (10 examples)", "drop_remainder"],
    ),
    (
        "unequal-lengths",
        lambda t: lambda: jt.ArrayDataset({"x": X, "y": Y[:9]}, 4),
        ValueError,
        ["same leading length", "'x': 10", "'y': 9"],
    ),
    (
        "nan-inf-inputs",
        lambda t: _nan_data,
        ValueError,
        ["arrays['x']", "NaN or Inf", "index (2, 1, 1, 0)", "inf"],
    ),
    (
        "labels-out-of-range",
        lambda t: lambda: jt.ArrayDataset({"x": X, "y": Y + 3}, 4, num_classes=10),
        ValueError,
        ["labels 'y'", "in [0, 10)", "found 10", "max 12"],
    ),
    (
        "labels-not-integer",
        lambda t: lambda: jt.ArrayDataset({"x": X, "y": Y * 1.0}, 4, num_classes=10),
        TypeError,
        ["labels 'y'", "must be integers", "float64"],
    ),
    (
        "dataset-seed-over-key-range",
        lambda t: lambda: jt.ArrayDataset({"x": X}, 4, seed=2**32),
        ValueError,
        ["seed must be an integer in [0, 4294967295]", "got 4294967296", "Fix"],
    ),
    (
        "grain-seed-negative",
        lambda t: lambda: jt.GrainData([{"x": X[0]}] * 4, 2, seed=-1),
        ValueError,
        ["GrainData seed must be an integer in [0, 4294967295]", "got -1"],
    ),
    (
        "dataset-label-minus-one",
        lambda t: lambda: jt.ArrayDataset({"x": X, "y": np.where(Y == 4, -1, Y)}, 4),
        ValueError,
        ["labels 'y' must be >= 0", "found -1 at index (4,)", "Fix"],
    ),
    (
        "loss-label-out-of-range",
        lambda t: lambda: jt.losses.softmax_cross_entropy(jnp.zeros((2, 10)), jnp.array([3, 10])),
        ValueError,
        ["labels holds 10 at index (1,)", "must be in [0, 10)", "Fix"],
    ),
    (
        "loss-mask-negative",
        lambda t: (
            lambda: jt.losses.accuracy(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.array([1, -1]))
        ),
        ValueError,
        ["accuracy: mask holds -1 at index (1,)", "[0, 1]", "Fix"],
    ),
    (
        "fit-iterable-nan-input",
        lambda t: lambda: _fit_plain([_np_batch(), _np_batch(x=np.full((4, 8, 8, 1), np.nan))]),
        ValueError,
        ["train_data epoch 0, batch 1", "batch['x'] holds nan at index (0, 0, 0, 0)", "Fix"],
    ),
    (
        "fit-iterable-negative-label",
        lambda t: lambda: _fit_plain([_np_batch(y=np.array([0, 1, -1, 2], np.int32))]),
        ValueError,
        ["batch 0: batch['y'] holds the label -1 at index (2,)", "ignore_index", "Fix"],
    ),
    (
        "fit-iterable-mask-over-1",
        lambda t: lambda: _fit_plain([_np_batch(mask=np.full(4, 2.0, np.float32))]),
        ValueError,
        ["batch['mask'] holds 2.0 at index (0,)", "[0, 1]", "Fix"],
    ),
    (
        "aux-collides-with-loss",
        lambda t: lambda: _train_step_on(_batch(), lambda p, b: (jnp.float32(0), {"loss": 1.0})),
        ValueError,
        ["aux has the key 'loss'", "replace the real 'loss'", "Fix: rename it"],
    ),
    (
        "aux-not-scalar",
        lambda t: (
            lambda: _train_step_on(_batch(), lambda p, b: (jnp.float32(0), {"a": jnp.ones(3)}))
        ),
        ValueError,
        ["aux['a'] has shape (3,)", "must be scalars", "Fix: reduce it"],
    ),
    (
        "fused-missing-k-axis",
        lambda t: _fused_without_k_axis,
        ValueError,
        ["steps_per_call=4", "leading step axis [K=4, B, ...]", "missing the [K] axis", "Fix"],
    ),
    (
        "hook-period-0",
        lambda t: lambda: jt.PeriodicHook(0, print),
        ValueError,
        ["PeriodicHook every_steps must be an integer >= 1", "got 0", "Fix"],
    ),
    (
        "early-stopping-min-delta-negative",
        lambda t: lambda: jt.EarlyStopping("loss", min_delta=-0.1),
        ValueError,
        ["min_delta must be a finite number >= 0", "got -0.1", "Fix"],
    ),
    (
        "early-stopping-min-delta-nan",
        lambda t: lambda: jt.EarlyStopping("loss", min_delta=float("nan")),
        ValueError,
        ["min_delta must be a finite number >= 0", "got nan"],
    ),
    (
        "early-stopping-patience-float",
        lambda t: lambda: jt.EarlyStopping("loss", patience=2.5),
        ValueError,
        ["patience must be >= 1; got 2.5", "whole number of evaluations", "Fix"],
    ),
    (
        "early-stopping-metric-typo",
        lambda t: _early_stopping_typo,
        ValueError,
        ["early_stopping.metric='acuracy' is not a metric", "['accuracy', 'loss']", "Fix"],
    ),
    (
        "mask-key-reserved",
        lambda t: lambda: jt.ArrayDataset({"x": X, "mask": Y}, 4),
        ValueError,
        ["'mask' is reserved"],
    ),
    (
        "batch-missing-key",
        lambda t: lambda: _train_step_on(_batch(y=None)),
        KeyError,
        ["no 'y' entry", "integer labels", "it has ['mask', 'x']"],
    ),
    (
        "input-wrong-rank",
        lambda t: lambda: _train_step_on(_batch(x=jnp.zeros((4, 64)))),
        ValueError,
        ["initialised with inputs of shape [batch, 8, 8, 1]", "got shape [4, 64]"],
    ),
    (
        "input-wrong-dtype",
        lambda t: lambda: _train_step_on(_batch(x=jnp.zeros((4, 8, 8, 1), jnp.int32))),
        TypeError,
        ["initialised with float inputs", "got dtype int32"],
    ),
    (
        "labels-wrong-shape",
        lambda t: lambda: _train_step_on(_batch(y=jnp.zeros((4, 2), jnp.int32))),
        ValueError,
        ["batch['y'] has shape (4, 2)", "logits have shape (4, 10)"],
    ),
    (
        "labels-float-in-batch",
        lambda t: lambda: _train_step_on(_batch(y=jnp.zeros((4,)))),
        TypeError,
        ["batch['y'] must hold integer class indices", "float32"],
    ),
    (
        "loss-not-scalar",
        lambda t: lambda: _train_step_on(_batch(), lambda p, b: jnp.zeros(4)),
        ValueError,
        ["loss_fn must return a scalar loss", "got shape (4,)"],
    ),
    (
        "loss-integer",
        lambda t: lambda: _train_step_on(_batch(), lambda p, b: jnp.int32(1)),
        TypeError,
        ["floating-point loss", "got dtype int32"],
    ),
    (
        "aux-not-dict",
        lambda t: lambda: _train_step_on(_batch(), lambda p, b: (jnp.float32(0), [1])),
        TypeError,
        ["aux must be a dict of metrics", "got list"],
    ),
    (
        "params-vs-opt-state",
        lambda t: _params_not_matching_opt_state,
        ValueError,
        ["params do not match the optimizer state", "expected shape", "got shape"],
    ),
    (
        "integer-params",
        lambda t: lambda: jt.TrainState.create({"w": jnp.zeros(3, jnp.int32)}, optax.sgd(1), 0),
        TypeError,
        ["params must be floating point", "integer leaves at", "['w']"],
    ),
    (
        "optimizer-not-optax",
        lambda t: lambda: jt.make_train_step(lambda p, b: 0.0, "adam"),
        TypeError,
        ["optimizer must be an optax.GradientTransformation", "got str"],
    ),
    (
        "rng-bad",
        lambda t: lambda: jt.TrainState.create({"w": jnp.zeros(3)}, optax.sgd(1), jnp.zeros(3)),
        TypeError,
        ["rng must be an int seed", "got dtype=float32, shape=(3,)"],
    ),
    (
        "fit-epochs-0",
        lambda t: lambda: jt.fit(None, None, [], epochs=0),
        ValueError,
        ["epochs must be a positive integer", "got 0"],
    ),
    (
        "fit-no-budget",
        lambda t: lambda: jt.fit(None, None, []),
        ValueError,
        ["fit needs epochs=... or num_steps=..."],
    ),
    (
        "nonfinite-policy",
        lambda t: lambda: jt.make_train_step(lambda p, b: 0.0, optax.sgd(1), nonfinite="x"),
        ValueError,
        ["nonfinite must be 'skip', 'raise' or None", "got 'x'"],
    ),
    (
        "early-stopping-mode",
        lambda t: lambda: jt.EarlyStopping("loss", "up"),
        ValueError,
        ["mode must be 'min' or 'max'", "got 'up'"],
    ),
    (
        "config-lr-negative",
        lambda t: TrainConfig(lr=-1.0).validate,
        ValueError,
        ["lr must be a finite number > 0", "got -1.0"],
    ),
    (
        "config-lr-nan",
        lambda t: TrainConfig(lr=float("nan")).validate,
        ValueError,
        ["lr must be a finite number > 0", "got nan"],
    ),
    (
        "config-model",
        lambda t: TrainConfig(model="vit").validate,
        ValueError,
        ["model must be one of cnn, mlp", "got 'vit'"],
    ),
    (
        "config-optimizer",
        lambda t: TrainConfig(optimizer="lion").validate,
        ValueError,
        ["optimizer must be one of adamw, adam, sgd, momentum", "got 'lion'"],
    ),
    (
        "checkpointer-keep-0",
        lambda t: lambda: Checkpointer(t / "c", keep_last=0),
        ValueError,
        ["keep_last must be an integer >= 1", "got 0"],
    ),
    (
        "restore-no-checkpoint",
        lambda t: lambda: Checkpointer(t / "c").restore({"w": jnp.zeros(1)}),
        CheckpointError,
        ["no checkpoint to restore in", "no committed checkpoint step"],
    ),
    (
        "cli-unknown-option",
        lambda t: _cli(["train", "--epoch", "3"], t),
        SystemExit,
        ["unrecognized arguments: --epoch 3", "--help"],
    ),
    (
        "cli-negative-lr",
        lambda t: _cli(["train", "--lr", "-0.1"], t),
        SystemExit,
        ["argument --lr", "expected a finite number > 0, got -0.1"],
    ),
    (
        "cli-unknown-model",
        lambda t: _cli(["train", "--model", "vit"], t),
        SystemExit,
        ["argument --model", "invalid choice: 'vit'", "'cnn'"],
    ),
    (
        "cli-batch-size-0",
        lambda t: _cli(["train", "--batch-size", "0"], t),
        SystemExit,
        ["argument --batch-size", "expected an integer >= 1, got 0"],
    ),
    (
        "cli-unwritable-out",
        lambda t: _cli(lambda tp: ["train", "--out", "/proc/jaxtrain-no"], t),
        SystemExit,
        ["out: cannot write to the output directory", "'/proc/jaxtrain-no'", "--out"],
    ),
    (
        "cli-resume-no-checkpoint",
        lambda t: _cli(_resume_without_checkpoint, t),
        SystemExit,
        ["resume: no checkpoint in", "checkpoints", "without --resume"],
    ),
]


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("build", "exc", "parts"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_clear_error(build, exc, parts, tmp_path, capsys):
    with pytest.raises(exc) as e:
        build(tmp_path)()
    text = str(e.value) if exc is not SystemExit else capsys.readouterr().err
    if exc is SystemExit:
        assert e.value.code == 2
    for part in parts:
        assert part in text, (part, text)


def test_early_stopping_typo_is_refused_before_the_first_step():
    model, st, opt = _model_and_state()
    step = jt.make_train_step(classification_loss(model), opt)
    eval_step = jt.make_eval_step(classification_eval(model))
    ds = jt.ArrayDataset({"x": X, "y": Y}, 4)
    for eval_data in (ds, list(ds.batches(0))):
        with pytest.raises(ValueError, match="early_stopping.metric='acc' is not a metric"):
            jt.fit(
                st,
                step,
                ds,
                epochs=1,
                eval_step=eval_step,
                eval_data=eval_data,
                early_stopping=jt.EarlyStopping("acc", "max"),
                progress=False,
            )
    assert step.trace_count == 0 and eval_step.trace_count == 0  # nothing ran, nothing compiled
    # A correct name trains, with one trace of each step as before.
    jt.fit(
        st,
        step,
        ds,
        epochs=1,
        eval_step=eval_step,
        eval_data=ds,
        early_stopping=jt.EarlyStopping("accuracy", "max"),
        progress=False,
    )
    assert step.trace_count == 1 and eval_step.trace_count == 1
