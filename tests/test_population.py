"""Population training (issue 14): N runs in one compiled step, each equal to its single run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain import population as pop
from jaxtrain.population_step import make_population_eval_step, make_population_step

OPT = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)
HP = {"learning_rate": [1e-3, 1e-2, 3e-2], "weight_decay": [0.0, 1e-4, 1e-2]}
LOSS_HP = {"smooth": [0.0, 0.1, 0.2]}


def loss_fn(params, batch, rng, smooth=0.0):
    """A tiny MLP with dropout (so each member's rng matters) and label smoothing."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    h = h * jax.random.bernoulli(rng, 0.9, h.shape) / 0.9
    y = jax.nn.one_hot(batch["y"], 4) * (1 - smooth) + smooth / 4
    return jnp.mean(-jnp.sum(y * jax.nn.log_softmax(h @ params["w2"]), -1))


def init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (6, 8)) * 0.4,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k2, (8, 4)) * 0.4,
    }


def _batches(n=3, seed=0):
    rs = np.random.RandomState(seed)
    return [
        {"x": rs.randn(16, 6).astype(np.float32), "y": rs.randint(0, 4, 16).astype(np.int32)}
        for _ in range(n)
    ]


def _population(seeds=(0, 1, 2)):
    return pop.create(init, OPT, list(seeds), hparams=HP, loss_hparams=LOSS_HP)


def _single_runs(p0, batches, **options):
    """Each member trained alone: its extracted state, its loss hparams bound."""
    out = []
    for i in range(p0.size):
        state = pop.extract_member(p0, i)
        step = jt.make_train_step(pop.member_loss(loss_fn, p0, i), OPT, **options)
        losses = []
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        out.append((state, losses))
    return out


def _leaves_equal(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def single():
    p0 = _population()
    return p0, _single_runs(p0, _batches())


@pytest.mark.integration  # three single runs and a population, a few steps each
def test_member_is_its_single_run_bitwise_with_map(single):
    p0, runs = single
    step = make_population_step(loss_fn, OPT, vectorize="map")
    state = jax.tree.map(jnp.copy, p0)
    for b in _batches():
        state, metrics = step(state, b)
    assert step.trace_count == 1
    for i, (ref, losses) in enumerate(runs):
        assert _leaves_equal(pop.extract_member(state, i), ref), i
        assert float(metrics["loss"][i]) == losses[-1]
    # the members really differ (seeds, hparams): the comparison is not trivial
    assert not np.array_equal(state.params["w1"][0], state.params["w1"][1])


@pytest.mark.integration  # one compile of the looped member step, a few steps
def test_member_is_its_single_run_bitwise_with_loop(single):
    """vectorize="loop": one compiled member step called per member (the CPU fallback)."""
    p0, runs = single
    step = make_population_step(loss_fn, OPT, vectorize="loop")
    state = jax.tree.map(jnp.copy, p0)
    losses = []
    for b in _batches():
        state, metrics = step(state, b)
        losses.append(metrics["loss"].tolist())
    assert step.trace_count == 1  # one compile for every member: i is traced
    assert step.spec.vectorize == "loop" and int(state.step) == 3
    assert metrics["loss"].shape == (3,) and state.active.tolist() == [True] * 3
    for i, (ref, ref_losses) in enumerate(runs):
        assert _leaves_equal(pop.extract_member(state, i), ref), i
        assert [ls[i] for ls in losses] == ref_losses
    assert not np.array_equal(state.params["w1"][0], state.params["w1"][1])


def conv_loss(params, batch):
    """A one-convolution model: what makes vectorize="auto" choose "loop" on CPU."""
    dims = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(
        batch["x"], params["k"], (1, 1), "SAME", dimension_numbers=dims
    )
    return jnp.mean((jnp.mean(y, (1, 2)) @ params["w"] - batch["y"]) ** 2)


def conv_init(key):
    k1, k2 = jax.random.split(key)
    return {"k": jax.random.normal(k1, (3, 3, 1, 4)) * 0.3, "w": jax.random.normal(k2, (4,))}


@pytest.mark.integration  # a tiny conv population and its single runs, two steps
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="'auto' loops on CPU only")
def test_auto_loops_a_convolutional_population_on_cpu():
    rs = np.random.RandomState(0)
    batch = {"x": rs.randn(8, 6, 6, 1).astype(np.float32), "y": rs.randn(8).astype(np.float32)}
    p0 = pop.create(conv_init, OPT, [0, 1], hparams={"learning_rate": [1e-2, 1e-1]})
    step = make_population_step(conv_loss, OPT)  # vectorize="auto", the default
    assert step.spec.vectorize == "auto"
    state = jax.tree.map(jnp.copy, p0)
    for _ in range(2):
        state, _ = step(state, batch)
    assert step.spec.vectorize == "loop" and step.trace_count == 1
    single = jt.make_train_step(conv_loss, OPT)
    for i in range(2):
        ref = pop.extract_member(p0, i)
        for _ in range(2):
            ref, _ = single(ref, batch)
        assert _leaves_equal(pop.extract_member(state, i), ref), i


@pytest.mark.e2e  # compiles population and single steps (the fast tier's budget)
def test_loop_with_float16_loss_scaling_is_each_single_run_bitwise():
    """Each member's own loss scale is sliced out and written back with the member."""
    p0 = pop.create(init, OPT, [0, 1, 2], hparams=HP, loss_hparams=LOSS_HP, precision="float16")
    step = make_population_step(loss_fn, OPT, vectorize="loop", precision="float16")
    state = jax.tree.map(jnp.copy, p0)
    for b in _batches():
        state, metrics = step(state, b)
    assert step.trace_count == 1 and metrics["loss_scale"].shape == (3,)
    for i in range(3):
        ref = pop.extract_member(p0, i)
        single = jt.make_train_step(pop.member_loss(loss_fn, p0, i), OPT, precision="float16")
        for b in _batches():
            ref, _ = single(ref, b)
        assert _leaves_equal(pop.extract_member(state, i), ref), i


@pytest.mark.e2e  # compiles population and single steps (the fast tier's budget)
def test_member_is_its_single_run_within_1e6_with_vmap(single):
    """vmap batches the members' matmuls: XLA:CPU sums in another order (not bitwise)."""
    p0, runs = single
    step = make_population_step(loss_fn, OPT)  # vectorize="auto": no convolution, vmap
    state = jax.tree.map(jnp.copy, p0)
    losses = []
    for b in _batches():
        state, metrics = step(state, b)
        losses.append(np.asarray(metrics["loss"]))
    assert step.trace_count == 1 and step.spec.vectorize == "vmap"
    for i, (ref, ref_losses) in enumerate(runs):
        got = pop.extract_member(state, i)
        assert _leaves_equal(got.rng, ref.rng) and int(got.step) == 3
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params), strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(a)
        np.testing.assert_allclose([ls[i] for ls in losses], ref_losses, rtol=1e-6)


@pytest.mark.e2e  # compiles population and single steps (the fast tier's budget)
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_frozen_and_diverged_members_stay_bitwise_unchanged(vectorize):
    p0 = pop.create(
        init, OPT, [0, 1, 2], hparams=HP, loss_hparams={"smooth": [0.0, float("nan"), 0.1]}
    )
    p0 = pop.set_active(p0, [True, True, False])  # member 2 frozen by the mask
    before = [pop.extract_member(p0, i) for i in range(3)]
    step = make_population_step(loss_fn, OPT, vectorize=vectorize)
    state = p0
    for b in _batches():
        state, metrics = step(state, b)
    # member 1's loss is NaN from step 1: frozen at its initial state, reported
    assert state.diverged.tolist() == [False, True, False]
    assert state.active.tolist() == [True, False, False]
    assert _leaves_equal(pop.extract_member(state, 1), before[1])
    assert _leaves_equal(pop.extract_member(state, 2), before[2])
    assert int(state.members.step[0]) == 3 and int(state.step) == 3
    assert np.isnan(metrics["loss"][1]) and np.isnan(metrics["loss"][2])
    assert metrics["nonfinite_leaf"].tolist() == [-1, -1, -1]  # frozen before this step
    # resuming member 2 and changing the mask does not recompile
    state, _ = step(pop.set_active(state, [True, False, True]), _batches()[0])
    assert int(state.members.step[2]) == 1 and step.trace_count == 1


@pytest.mark.e2e  # compiles population and single steps (the fast tier's budget)
@pytest.mark.parametrize("vectorize", ["map", "loop"])
def test_fused_steps_and_grad_accum_equal_single_steps(vectorize):
    batches = _batches(4)
    p0 = _population()
    fused = make_population_step(
        loss_fn, OPT, steps_per_call=2, vectorize=vectorize, grad_accum_steps=2
    )
    state = jax.tree.map(jnp.copy, p0)
    for k in (0, 2):
        group = {n: np.stack([batches[k][n], batches[k + 1][n]]) for n in batches[0]}
        state, metrics = fused(state, group)
    assert metrics["loss"].shape == (2, 3) and fused.trace_count == 1
    runs = _single_runs(p0, batches, grad_accum_steps=2)
    for i, (ref, _) in enumerate(runs):
        assert _leaves_equal(pop.extract_member(state, i), ref), i
    # an inactive padded step leaves every member as it is
    same, _ = fused(jax.tree.map(jnp.copy, state), group, np.array([False, False]))
    assert _leaves_equal(same.members, state.members)


@pytest.mark.e2e  # compiles population and single steps (the fast tier's budget)
@pytest.mark.parametrize("vectorize", ["map", "loop"])
def test_member_batches_give_each_member_its_own_data(vectorize):
    batches = _batches(2, seed=1)
    p0 = pop.create(init, OPT, [0, 0])  # identical members: only the data differs
    step = make_population_step(loss_fn, OPT, member_batches=True, vectorize=vectorize)
    stacked = {n: np.stack([batches[0][n], batches[1][n]]) for n in batches[0]}
    state, _ = step(jax.tree.map(jnp.copy, p0), stacked)
    for i in range(2):
        one = pop.from_states([pop.extract_member(p0, i)], seeds=[0])
        ref, _ = _single_runs(one, [batches[i]])[0]
        assert _leaves_equal(pop.extract_member(state, i), ref)
    assert not np.array_equal(state.params["w1"][0], state.params["w1"][1])
    with pytest.raises(
        ValueError, match=r"leading member axis \[N=2, B, \.\.\.\]; got batch\['x'\]"
    ):
        step(state, batches[0])


@pytest.mark.e2e  # compiles population and single steps (the fast tier's budget)
def test_population_eval_step_matches_evaluate_per_member(single):
    p0, _ = single

    def eval_fn(params, batch):
        logits = jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"]
        return {"accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}

    data = jt.ArrayDataset(_batches(1)[0], 6, shuffle=False)
    got = jt.evaluate(make_population_eval_step(eval_fn), p0, data)
    single_step = jt.make_eval_step(eval_fn)
    want = [jt.evaluate(single_step, pop.extract_member(p0, i), data)["accuracy"] for i in range(3)]
    assert got == {"accuracy": want}


def test_creation_helpers():
    g = pop.grid(seed=[3, 4], learning_rate=[0.1, 0.2])
    assert g == {"seed": [3, 3, 4, 4], "learning_rate": [0.1, 0.2, 0.1, 0.2]}
    p = pop.create(init, OPT, g["seed"], hparams={"learning_rate": g["learning_rate"]})
    assert pop.member_hparams(p) == [
        {"seed": s, "learning_rate": pytest.approx(lr)}
        for s, lr in zip(g["seed"], g["learning_rate"], strict=True)
    ]
    init_key, rng = pop.member_keys(4)
    m = pop.extract_member(p, 3)
    ref = pop.set_hyperparams(jt.TrainState.create(init(init_key), OPT, rng), learning_rate=0.2)
    assert _leaves_equal(m, ref)
    one = jt.TrainState.create(init(jax.random.key(0)), OPT, 0)
    copies = pop.from_state(one, [7, 8], hparams={"weight_decay": 0.5})
    assert _leaves_equal(pop.extract_member(copies, 1).params, one.params)
    assert np.array_equal(copies.members.rng[1], jax.random.key_data(jax.random.key(8)))
    assert copies.opt_state.hyperparams["weight_decay"].tolist() == [0.5, 0.5]
    assert pop.log_space(1e-4, 1e-2, 3) == [1e-4, 1e-3, 1e-2]


def test_bad_inputs_are_named():
    with pytest.raises(
        ValueError, match=r"hparams\['learning_rate'\] has 2 values but the population has 3"
    ):
        pop.create(init, OPT, [0, 1, 2], hparams={"learning_rate": [0.1, 0.2]})
    with pytest.raises(
        ValueError,
        match=r"hparam 'momentum' is not a hyperparameter of the optimizer; .*'weight_decay'",
    ):
        pop.create(init, OPT, [0, 1], hparams={"momentum": 0.9})
    with pytest.raises(ValueError, match=r"need an optimizer built with optax.inject_hyperparams"):
        pop.create(init, optax.adam(1e-3), [0, 1], hparams={"learning_rate": [0.1, 0.2]})
    sched = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(1.0, 0.0, 5))
    with pytest.raises(
        ValueError, match=r"'learning_rate' is given to the optimizer as a schedule"
    ):
        pop.create(init, sched, [0, 1], hparams={"learning_rate": [0.1, 0.2]})
    with pytest.raises(
        ValueError, match=r"loss_hparams\['smooth'\] has 3 values but the population has 2"
    ):
        pop.create(init, OPT, [0, 1], loss_hparams={"smooth": [0.0, 0.1, 0.2]})
    with pytest.raises(
        ValueError, match=r"population seed must be an integer in \[0, 4294967295\]"
    ):
        pop.create(init, OPT, [0, -1])
    with pytest.raises(TypeError, match=r"seeds must be a list of ints, one per member; got 3"):
        pop.create(init, OPT, 3)
    with pytest.raises(IndexError, match=r"member index 5 is out of range for a population of 2"):
        pop.extract_member(pop.create(init, OPT, [0, 1]), 5)
    with pytest.raises(ValueError, match=r"active must be 2 bools .* got shape \(3,\)"):
        pop.set_active(pop.create(init, OPT, [0, 1]), [True, True, True])
    with pytest.raises(
        ValueError, match=r"nonfinite must be 'freeze', 'skip' or None; got 'raise'"
    ):
        make_population_step(loss_fn, OPT, nonfinite="raise")
    with pytest.raises(
        ValueError, match=r"vectorize must be one of \('vmap', 'map', 'loop', 'auto'\); got 'pmap'"
    ):
        make_population_step(loss_fn, OPT, vectorize="pmap")
    mesh = jt.data_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match=r"vectorize='loop' .* cannot split the members over"):
        make_population_step(loss_fn, OPT, vectorize="loop", mesh=mesh, shard_members=True)


def test_bad_inputs_at_trace_time_are_named():
    p = pop.create(init, OPT, [0, 1], loss_hparams={"temperature": 2.0})
    step = make_population_step(loss_fn, OPT, jit=False)
    with pytest.raises(
        ValueError, match=r"loss_hparams \['temperature'\] are not keyword arguments of loss_fn"
    ):
        step(p, _batches(1)[0])
    with pytest.raises(
        TypeError, match=r"takes a jaxtrain.population.PopulationState; got TrainState"
    ):
        step(pop.extract_member(p, 0), _batches(1)[0])
    data = jt.ArrayDataset(_batches(1)[0], 8)
    with pytest.raises(ValueError, match=r"fit got a PopulationState but a train step that is not"):
        jt.fit(p, jt.make_train_step(loss_fn, OPT), data, num_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"fit got a population train step but a TrainState"):
        jt.fit(pop.extract_member(p, 0), step, data, num_steps=1, progress=False)


def test_member_values_in_the_progress_bar_writers_and_best_member():
    from jaxtrain.callbacks import loss_postfix
    from jaxtrain.population_fit import best_member, rank_value
    from jaxtrain.writers import member_columns

    assert loss_postfix([0.5, None, 0.25, 1.0]) == {"loss_best": "0.2500", "loss_med": "0.5000"}
    assert loss_postfix(0.5) == {"loss": "0.5000"}  # a single run's bar is unchanged
    cols = member_columns({"step": 1, "loss": [0.1] * 11, "examples_per_second": 9.0})
    assert "loss/member_00" in cols and "loss/member_10" in cols and cols["step"] == 1
    assert "loss/member_01" not in member_columns({"loss": [0.1, None]}, skip_missing=True)
    records = [{"loss": [0.3, 0.1, 0.2]}, {"accuracy": [0.5, 0.9, 0.7]}]
    assert best_member(records, "loss", "min") == 1
    assert best_member(records, "loss", "min", exclude=[1]) == 2
    assert best_member(records, "accuracy", "max", exclude=[0, 1, 2]) is None
    assert rank_value([0.2, None, 0.7], "min") == 0.2
