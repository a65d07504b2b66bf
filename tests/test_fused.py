"""Fused execution: K steps per compiled call with lax.scan, bitwise equal to K single steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_loss
from jaxtrain.data import load_digits
from jaxtrain.resident import put_dataset


@pytest.fixture(scope="module")
def setup():
    train, _ = load_digits()
    train = {k: v[:300] for k, v in train.items()}  # 5 batches of 64 per epoch, last padded
    model = jt.from_linen(jt.models.MLP(hidden=(32,), dropout=0.1))
    params, _ = model.init(jax.random.key(0), train["x"][:1])
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3))
    return train, model, params, opt


def _fresh(params, opt):
    return jt.TrainState.create(jax.tree.map(jnp.copy, params), opt, 3)


def _assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_k_fused_steps_equal_k_single_steps_bitwise(setup):
    train, model, params, opt = setup
    loss = classification_loss(model)
    single = jt.make_train_step(loss, opt)
    fused = jt.make_train_steps(loss, opt, steps_per_call=5)
    batches = list(jt.ArrayDataset(train, 64, seed=0).batches(0))
    s1 = _fresh(params, opt)
    singles = []
    for b in batches:
        s1, m = single(s1, b)
        singles.append(m)
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    s5, m5 = fused(_fresh(params, opt), stacked)
    _assert_bitwise(s5, s1)
    assert m5["loss"].shape == (5,)
    np.testing.assert_array_equal(m5["loss"], np.stack([m["loss"] for m in singles]))
    assert fused.trace_count == 1 and fused.spec.steps_per_call == 5


def test_fit_with_fused_steps_matches_single_steps(setup):
    train, model, params, opt = setup
    loss = classification_loss(model)
    ds = jt.ArrayDataset(train, 64, seed=0)
    single = jt.make_train_step(loss, opt)
    fused = jt.make_train_steps(loss, opt, steps_per_call=2)
    ref, h_ref = jt.fit(_fresh(params, opt), single, ds, epochs=3, log_every=4, progress=False)
    got, h = jt.fit(_fresh(params, opt), fused, ds, epochs=3, log_every=4, progress=False)
    _assert_bitwise(got, ref)
    assert h.steps == h_ref.steps == 15
    # 5 steps per epoch in groups of 2: 2, 2 and a leftover 1 padded to 2 (inactive
    # padding): one compilation.
    assert fused.trace_count == 1
    # Logging happens at the first call boundary at or after each multiple of 4 (calls
    # end at steps 2, 4, 5, 7, 9, 10, ...) and at epoch ends.
    assert [r["step"] for r in h.train] == [4, 5, 9, 10, 12, 15]
    assert [r["step"] for r in h_ref.train] == [4, 5, 8, 10, 12, 15]
    ref_by_step = {r["step"]: r for r in h_ref.train}
    for r in h.train:
        if r["step"] in (4, 5, 12, 15):  # same intervals in both runs
            assert r["loss"] == pytest.approx(ref_by_step[r["step"]]["loss"], rel=1e-6)


def test_fused_steps_respect_the_step_budget(setup):
    train, model, params, opt = setup
    fused = jt.make_train_steps(classification_loss(model), opt, steps_per_call=4)
    st, h = jt.fit(
        _fresh(params, opt), fused, jt.ArrayDataset(train, 64, seed=0), num_steps=7, progress=False
    )
    assert int(st.step) == 7 and h.steps == 7
    assert h.position == jt.DataPosition(1, 2)


def _state_bytes(state):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))


@pytest.mark.parametrize("fused", [False, True])
def test_donation_aliases_the_state(setup, fused):
    """The compiled step's memory analysis shows the state's buffers aliased (>= 99%)."""
    train, model, params, opt = setup
    loss = classification_loss(model)
    step = (
        jt.make_train_steps(loss, opt, steps_per_call=3) if fused else jt.make_train_step(loss, opt)
    )
    batch = next(jt.ArrayDataset(train, 64).batches(0))
    if fused:
        batch = {k: np.stack([v] * 3) for k, v in batch.items()}
    state = _fresh(params, opt)
    mem = step.lower(state, batch).compile().memory_analysis()
    assert mem is not None
    alias = mem.alias_size_in_bytes
    assert alias >= 0.99 * _state_bytes(state), (alias, _state_bytes(state))
    undonated = (
        jt.make_train_steps(loss, opt, steps_per_call=3, donate=False)
        if fused
        else jt.make_train_step(loss, opt, donate=False)
    )
    assert undonated.lower(state, batch).compile().memory_analysis().alias_size_in_bytes == 0


def test_steps_per_call_must_be_positive():
    with pytest.raises(ValueError, match="steps_per_call must be an integer >= 1; got 0"):
        jt.make_train_steps(lambda p, b: 0.0, optax.sgd(0.1), steps_per_call=0)


def test_device_resident_epoch_matches_host_fed(setup):
    """A whole epoch per dispatch, data on the device: same results as the host-fed path."""
    train, model, params, opt = setup
    loss = classification_loss(model)
    ds = jt.ArrayDataset(train, 64, seed=4)
    host, h_host = jt.fit(
        _fresh(params, opt),
        jt.make_train_step(loss, opt),
        ds,
        epochs=3,
        log_every=100,
        progress=False,
    )
    epoch_fn = jt.make_device_epoch(loss, opt, ds)
    dev, h_dev = jt.fit(_fresh(params, opt), epoch_fn, ds, epochs=3, log_every=100, progress=False)
    assert int(dev.step) == int(host.step) == 15
    _assert_bitwise(dev.params, host.params)
    assert epoch_fn.trace_count == 1  # one compile for every epoch (epoch is traced)
    assert [r["step"] for r in h_dev.train] == [5, 10, 15]
    for a, b in zip(h_dev.train, h_host.train, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="runs whole epochs"):
        jt.fit(_fresh(params, opt), epoch_fn, ds, num_steps=7, progress=False)


@pytest.mark.e2e  # three `jaxtrain train` runs end to end
def test_cli_steps_per_call_gives_the_same_parameters(tmp_path, capsys):
    """`jaxtrain train --steps-per-call 4` ends bitwise where the per-step run ends."""
    import json

    from jaxtrain.apps import cli

    shas = []
    for k in ("1", "4", "4 --unroll"):
        out = tmp_path / k.replace(" ", "")
        args = ["train", "--model", "mlp", "--epochs", "2", "--no-checkpoint", "--no-progress"]
        assert cli.main([*args, "--steps-per-call", *k.split(), "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 46
        shas.append(summary["params_sha256"])
    assert shas[0] == shas[1] == shas[2]  # unrolled too: measured bitwise on CPU
    # Groups of 4 and the leftover of 3, padded to 4 with an inactive step: one compilation.
    assert summary["train_step_compilations"] == 1


@pytest.mark.parametrize("unroll", [True, 2])
def test_unrolled_fused_steps_equal_single_steps(setup, unroll):
    """``unroll`` (the fast path for convolutions on XLA:CPU) changes no result."""
    train, model, params, opt = setup
    loss = classification_loss(model)
    batches = list(jt.ArrayDataset(train, 64, seed=0).batches(0))[:4]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    rolled = jt.make_train_steps(loss, opt, steps_per_call=4)
    unrolled = jt.make_train_steps(loss, opt, steps_per_call=4, unroll=unroll)
    s_ref, m_ref = rolled(_fresh(params, opt), stacked)
    s_got, m_got = unrolled(_fresh(params, opt), stacked)
    # Measured bitwise on CPU; the stated tolerance allows XLA to fuse unrolled steps
    # differently on other backends.
    chex.assert_trees_all_close(s_got, s_ref, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(m_got, m_ref, rtol=1e-6, atol=1e-7)
    assert unrolled.trace_count == 1


def test_device_epoch_unrolled_matches_rolled(setup):
    train, model, params, opt = setup
    loss = classification_loss(model)
    ds = jt.ArrayDataset(train, 64, seed=4)
    arrays = put_dataset(ds)
    got = [
        jt.make_device_epoch(loss, opt, ds, unroll=u)(_fresh(params, opt), arrays, jnp.int32(0))
        for u in (1, True)
    ]
    chex.assert_trees_all_close(got[1], got[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "yes"])
def test_unroll_must_be_bool_or_positive_int(bad):
    with pytest.raises(
        ValueError,
        match=rf"unroll must be 'auto', True, False or an integer >= 1.*got {bad!r}.*Fix",
    ):
        jt.make_train_steps(lambda p, b: 0.0, optax.sgd(0.1), steps_per_call=2, unroll=bad)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_norm_metric_can_be_switched_off(setup, fused):
    train, model, params, opt = setup
    loss = classification_loss(model)
    batches = list(jt.ArrayDataset(train, 64, seed=0).batches(0))[:2]
    if fused:
        make = lambda **kw: jt.make_train_steps(loss, opt, steps_per_call=2, **kw)  # noqa: E731
        feed = [{k: np.stack([b[k] for b in batches]) for k in batches[0]}]
    else:
        make = lambda **kw: jt.make_train_step(loss, opt, **kw)  # noqa: E731
        feed = batches
    results = []
    for flag in (True, False):
        step, state = make(grad_norm=flag), _fresh(params, opt)
        for b in feed:
            state, metrics = step(state, b)
        results.append((state, metrics))
    assert "grad_norm" in results[0][1] and "grad_norm" not in results[1][1]
    _assert_bitwise(results[1][0], results[0][0])  # only the report differs
    with pytest.raises(TypeError, match="grad_norm must be True or False; got 'no'"):
        jt.make_train_step(loss, opt, grad_norm="no")


def test_batch_without_the_step_axis_is_an_error_naming_it(setup):
    """A [B, ...] batch would otherwise run B one-example steps."""
    train, model, params, opt = setup
    fused = jt.make_train_steps(classification_loss(model), opt, steps_per_call=4)
    batch = next(jt.ArrayDataset(train, 64, seed=0).batches(0))  # [64, 8, 8, 1]: no [K]
    with pytest.raises(
        ValueError,
        match=r"make_train_steps\(steps_per_call=4\) runs 4 steps per call and needs batches "
        r"with a leading step axis \[K=4, B, \.\.\.\]; got batches\['mask'\] of shape \(64,\) "
        r"\(leading size 64\), which is missing the \[K\] axis.*Fix: stack 4 batches",
    ):
        fused(_fresh(params, opt), batch)
    # A group of another size (here 2 of 4) is refused outside fit too.
    two = {k: np.stack([batch[k]] * 2) for k in batch}
    with pytest.raises(ValueError, match=r"got batches\['mask'\] of shape \(2, 64\)"):
        fused(_fresh(params, opt), two)


def test_fit_runs_a_shorter_last_group_without_recompiling(setup):
    """An epoch of 5 batches in groups of 4: the last group is padded to 4 and masked.

    Found on an H200: the shorter last group compiled the fused step a second time.
    """
    train, model, params, opt = setup
    loss = classification_loss(model)
    fused = jt.make_train_steps(loss, opt, steps_per_call=4)
    ds = jt.ArrayDataset(train, 64, seed=0)  # 5 batches: a group of 4, then one of 1
    got, h = jt.fit(_fresh(params, opt), fused, ds, epochs=2, progress=False)
    ref, _ = jt.fit(
        _fresh(params, opt), jt.make_train_step(loss, opt), ds, epochs=2, progress=False
    )
    assert h.steps == 10 and int(got.step) == 10
    assert fused.trace_count == 1
    _assert_bitwise(got, ref)
