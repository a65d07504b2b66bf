"""Gradient accumulation inside the compiled step: k microbatches == one k-times batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_loss
from jaxtrain.data import load_digits


@pytest.fixture(scope="module")
def setup():
    train, _ = load_digits()
    model = jt.from_linen(jt.models.MLP(hidden=(32,)))  # no dropout: same function for any split
    params, _ = model.init(jax.random.key(0), train["x"][:1])
    return train, model, params


def _batch(train, n, n_pad):
    """``n`` rows, the last ``n_pad`` of them padding (garbage inputs, mask 0)."""
    b = {"x": train["x"][:n].copy(), "y": train["y"][:n].copy(), "mask": np.ones(n, np.float32)}
    b["mask"][n - n_pad :] = 0.0
    b["x"][n - n_pad :] = 7.0
    return b


def _rel(a, b):
    """||a - b|| / ||b|| over whole pytrees (global L2 norms)."""
    diff = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)

    def norm(t):
        return np.sqrt(
            sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(t))
        )

    return norm(diff) / norm(b)


@pytest.mark.parametrize("n_pad", [0, 10])  # 10: the last microbatch is mostly padding
def test_k_microbatches_equal_one_large_batch(setup, n_pad):
    train, model, params = setup
    opt = optax.sgd(0.5)
    loss = classification_loss(model)
    batch = _batch(train, 64, n_pad)
    one = jt.make_train_step(loss, opt)
    acc = jt.make_train_step(loss, opt, grad_accum_steps=4)
    s1, m1 = one(jt.TrainState.create(jax.tree.map(jnp.copy, params), opt, 0), batch)
    s4, m4 = acc(jt.TrainState.create(jax.tree.map(jnp.copy, params), opt, 0), batch)
    # Stated tolerance: float32, summed in another order (per microbatch, then weighted):
    # the update's relative difference (global L2 norms) is ~1e-7; 1e-6 bounds it.
    update = lambda s: jax.tree.map(lambda new, old: new - old, s.params, params)  # noqa: E731
    assert _rel(update(s4), update(s1)) <= 1e-6
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["accuracy"], m1["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert acc.trace_count == 1


def test_temporary_memory_does_not_grow_with_k(setup):
    """Microbatches of 16: a batch of 32 (k=2) and of 128 (k=8) need the same scratch."""
    train, model, params = setup
    opt = optax.adam(1e-3)
    loss = classification_loss(model)
    state = jt.TrainState.create(params, opt, 0)
    temp = {}
    for k in (2, 8):
        step = jt.make_train_step(loss, opt, grad_accum_steps=k)
        batch = _batch(train, 16 * k, 0)
        temp[k] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp[8] <= 1.25 * temp[2], temp


def test_batch_not_divisible_is_a_clear_error(setup):
    train, model, params = setup
    opt = optax.sgd(0.1)
    step = jt.make_train_step(classification_loss(model), opt, grad_accum_steps=3)
    with pytest.raises(
        ValueError, match=r"grad_accum_steps=3 must divide the batch size; got .*'x': 64"
    ):
        step(jt.TrainState.create(jax.tree.map(jnp.copy, params), opt, 0), _batch(train, 64, 0))
    with pytest.raises(ValueError, match="grad_accum_steps must be an integer >= 1; got 0"):
        jt.make_train_step(classification_loss(model), opt, grad_accum_steps=0)


@pytest.mark.e2e  # two `jaxtrain train` runs end to end
def test_cli_grad_accum_steps_runs_and_matches_closely(tmp_path):
    """`jaxtrain train --grad-accum-steps 4` trains like the plain run (float32-close)."""
    import json

    from jaxtrain.apps import cli

    acc = []
    for k in ("1", "4"):
        out = tmp_path / k
        args = ["train", "--model", "mlp", "--epochs", "1", "--no-checkpoint", "--no-progress"]
        assert cli.main([*args, "--grad-accum-steps", k, "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["config"]["grad_accum_steps"] == int(k)
        acc.append(summary["test"]["loss"])
    # MLP dropout draws differ per microbatch key, so not bitwise; the runs stay close.
    assert abs(acc[0] - acc[1]) / acc[0] < 0.05


def _state_bytes(state):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))


def test_memory_against_optax_multisteps_and_one_big_batch(setup):
    """XLA's compiled memory analysis of three ways to train on k microbatches of 16.

    * ours: one call, the whole batch of 16k as input, a lax.scan over microbatches;
    * ``optax.MultiSteps``: k calls on batches of 16, the gradient sum kept in the
      optimizer state between calls (applied on every k-th call);
    * one big batch of 16k without accumulation.

    Measured on CPU (MLP 64-32-10, 9,640 parameter bytes, Adam), bytes:

    ====  ==========  ==========  ==============  ==========  ============
    k     ours temp   big temp    MultiSteps temp ours args   MultiSteps
                                                              args / state
    ====  ==========  ==========  ==============  ==========  ============
    2     24,520      18,000      34,320          37,388      42,812 / 38,588
    8     24,520      47,568      34,320          62,732      42,812 / 38,588
    16    24,520      94,672      34,320          96,524      42,812 / 38,588
    ====  ==========  ==========  ==============  ==========  ============

    Plain state (ours and big batch): 28,940 bytes. What is true, and asserted: our
    scratch memory is flat in k and we keep no gradient buffer between steps;
    MultiSteps' scratch is flat too but its state holds a persistent gradient-sized
    buffer (+9,648 bytes = the parameters' 9,640 + two int32 counters); one big batch's
    scratch grows with k. The price of ours: the whole batch of 16k is an input of the
    step (its argument bytes grow with k), where MultiSteps gets one microbatch per call.
    """
    train, model, params = setup
    loss = classification_loss(model)
    opt = optax.adam(1e-3)
    multi = optax.MultiSteps(opt, every_k_schedule=8).gradient_transformation()
    m = 16
    param_bytes = _state_bytes(params)

    def analyse(optimizer, batch_size, grad_accum_steps):
        state = jt.TrainState.create(params, optimizer, 0)
        step = jt.make_train_step(loss, optimizer, grad_accum_steps=grad_accum_steps)
        ma = step.lower(state, _batch(train, batch_size, 0)).compile().memory_analysis()
        return ma.temp_size_in_bytes, ma.argument_size_in_bytes, _state_bytes(state)

    ours = {k: analyse(opt, m * k, k) for k in (2, 8)}
    big = {k: analyse(opt, m * k, 1) for k in (2, 8)}
    ms = {
        k: analyse(optax.MultiSteps(opt, every_k_schedule=k).gradient_transformation(), m, 1)
        for k in (2, 8)
    }
    plain_state = _state_bytes(jt.TrainState.create(params, opt, 0))
    # Ours: flat scratch, no persistent accumulator.
    assert ours[8][0] <= 1.25 * ours[2][0], ours
    assert ours[2][2] == ours[8][2] == plain_state
    # Big batch: scratch grows with k, past ours.
    assert big[8][0] >= 1.5 * big[2][0] and big[8][0] > ours[8][0], (big, ours)
    # MultiSteps: flat scratch, but a gradient-sized buffer persists in the state.
    assert ms[2][0] == ms[8][0], ms
    assert param_bytes <= ms[8][2] - plain_state <= param_bytes + 64, (ms, plain_state)
    # The trade-off: our step's input is the whole batch, MultiSteps' one microbatch.
    batch_bytes = lambda n: _state_bytes(_batch(train, n, 0))  # noqa: E731
    assert ours[8][1] - ours[2][1] == batch_bytes(8 * m) - batch_bytes(2 * m)
    assert ms[2][1] == ms[8][1]

    # And the two accumulations compute the same update (k=8 calls vs one call).
    s_ms = jt.TrainState.create(jax.tree.map(jnp.copy, params), multi, 0)
    ms_step = jt.make_train_step(loss, multi)
    full = _batch(train, 8 * m, 0)
    for i in range(8):
        s_ms, _ = ms_step(s_ms, {k: v[i * m : (i + 1) * m] for k, v in full.items()})
    s_ours, _ = jt.make_train_step(loss, opt, grad_accum_steps=8)(
        jt.TrainState.create(jax.tree.map(jnp.copy, params), opt, 0), full
    )
    update = lambda p: jax.tree.map(lambda new, old: new - old, p, params)  # noqa: E731
    assert _rel(update(s_ms.params), update(s_ours.params)) <= 1e-6
