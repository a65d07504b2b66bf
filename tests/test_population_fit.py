"""Population training under `fit`: per-member records, evaluation, early stopping, the best
member, writers, and a bitwise resume from a checkpoint (issue 14)."""

import json
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain import population as pop
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.population_step import make_population_eval_step, make_population_step
from jaxtrain.writers import CsvWriter, JsonlWriter, TensorBoardWriter, json_safe, read_csv

OPT = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)


def loss_fn(params, batch, smooth=0.0):
    y = jax.nn.one_hot(batch["y"], 3) * (1 - smooth) + smooth / 3
    return jnp.mean(-jnp.sum(y * jax.nn.log_softmax(batch["x"] @ params["w"]), -1))


def eval_fn(params, batch):
    logits = batch["x"] @ params["w"]
    return {"accuracy": (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)}


def init(key):
    return {"w": jax.random.normal(key, (5, 3)) * 0.1}


def _data():
    rs = np.random.RandomState(0)
    x = rs.randn(48, 5).astype(np.float32)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1)).astype(np.int32)
    return jt.ArrayDataset({"x": x, "y": y}, 16), jt.ArrayDataset(
        {"x": x, "y": y}, 48, shuffle=False
    )


def _population():
    # member 1 diverges (a NaN loss hyperparameter); member 2 learns nothing (lr 0) and
    # is stopped early; members 0 and 3 train.
    return pop.create(
        init,
        OPT,
        [0, 1, 2, 3],
        hparams={"learning_rate": [1e-2, 1e-2, 0.0, 5e-2]},
        loss_hparams={"smooth": [0.0, float("nan"), 0.0, 0.1]},
    )


def _bitwise(a, b):
    """Same leaves, byte for byte (a NaN loss hyperparameter equals itself)."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in pairs)


def _not_nan_json(text):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_fit_population_records_writers_early_stopping_best(tmp_path, caplog):
    train, evald = _data()
    step = make_population_step(loss_fn, OPT, steps_per_call=2, vectorize="map")
    p0 = _population()
    with (
        JsonlWriter(tmp_path / "m.jsonl") as jl,
        CsvWriter(tmp_path / "m.csv") as cw,
        TensorBoardWriter(tmp_path / "tb") as tb,
        caplog.at_level(logging.WARNING, "jaxtrain"),
    ):
        state, h = jt.fit(
            p0, step, train, epochs=6, eval_step=make_population_eval_step(eval_fn),
            eval_data=evald, log_every=3, writers=[jl, cw, tb], progress=False,
            early_stopping=jt.EarlyStopping("accuracy", "max", patience=2),
        )  # fmt: skip
    assert step.trace_count == 1
    rec = h.train[-1]
    assert len(rec["loss"]) == 4 and rec["diverged"] == [False, True, False, False]
    assert "member 1 diverged at step 1 (first non-finite value: loss)" in caplog.text
    assert rec["active"] == [True, False, False, True]  # 1 diverged, 2 stopped early
    assert np.isnan(rec["loss"][1]) and np.isnan(rec["loss"][2]) and rec["loss"][0] > 0
    assert all(len(e["accuracy"]) == 4 for e in h.eval)
    assert int(state.members.step[1]) == 0 and 0 < int(state.members.step[2]) < 18
    assert int(state.members.step[0]) == 18 == int(state.step)
    # every JSON line strict; CSV: one column per member; TensorBoard: event files
    lines = [_not_nan_json(x) for x in open(tmp_path / "m.jsonl")]
    assert lines[0]["loss"][1] is None
    rows = read_csv(tmp_path / "m.csv")
    assert {"loss/member_0", "loss/member_3", "accuracy/member_2"} <= set(rows[-1]) | set(rows[0])
    assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "tb"))
    # the report: the best member by the early-stopping metric, never a diverged one
    report = h.population
    assert report["metric"] == "accuracy" and report["size"] == 4
    last = h.eval[-1]["accuracy"]
    assert report["best"] == int(np.nanargmax([last[0], -1, last[2], last[3]]))
    m = report["members"]
    assert m[1]["diverged"] and m[2]["stopped_early"] and not m[0]["stopped_early"]
    assert m[3]["hparams"] == {"learning_rate": pytest.approx(5e-2), "smooth": pytest.approx(0.1)}
    _not_nan_json(json.dumps(json_safe(h.to_dict()), allow_nan=False))


def test_member_in_fit_equals_its_single_fit():
    train, _ = _data()
    p0 = pop.create(init, OPT, [0, 1], hparams={"learning_rate": [1e-2, 3e-2]})
    step = make_population_step(loss_fn, OPT, vectorize="map")
    state, h = jt.fit(p0, step, train, epochs=2, log_every=2, progress=False)
    one = jt.make_train_step(pop.member_loss(loss_fn, p0, 1), OPT)
    ref, h1 = jt.fit(pop.extract_member(p0, 1), one, train, epochs=2, log_every=2, progress=False)
    got = pop.extract_member(state, 1)
    assert _bitwise(got, ref)
    assert [r["loss"][1] for r in h.train] == [r["loss"] for r in h1.train]


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_population_resume_is_bitwise(tmp_path, vectorize):
    train, evald = _data()
    step = make_population_step(loss_fn, OPT, vectorize=vectorize)
    eval_step = make_population_eval_step(eval_fn)
    kw = dict(
        eval_step=eval_step, eval_data=evald, eval_every=2, log_every=3, progress=False,
        early_stopping=jt.EarlyStopping("accuracy", "max", patience=1),
    )  # fmt: skip
    full, h_full = jt.fit(_population(), step, train, num_steps=9, **kw)
    with Checkpointer(tmp_path / "ckpt") as ck:
        jt.fit(_population(), step, train, num_steps=5, checkpointer=ck, **kw)
    with Checkpointer(tmp_path / "ckpt") as ck:
        resumed, h_res = jt.fit(
            _population(), step, train, num_steps=9, checkpointer=ck, resume=True, **kw
        )
    assert _bitwise(full, resumed)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_second"} for r in rs]  # noqa: E731
    assert json.dumps(strip(h_full.train)) == json.dumps(strip(h_res.train))
    assert h_full.eval == h_res.eval
    assert h_full.population["best"] == h_res.population["best"]
    assert [m["stopped_early"] for m in h_full.population["members"]] == [
        m["stopped_early"] for m in h_res.population["members"]
    ]


def test_population_on_a_data_mesh_matches_one_device():
    """Members replicated on 4 devices, each batch sharded (or the members split over the
    devices): the same training as on 1 device."""
    from _subprocess import run_script

    result = run_script(pathlib.Path(__file__).parent / "_population_mesh_script.py", devices=4)
    four, one = result["four"], result["one"]
    assert four["replicated"] and four["devices"] == 4 and one["devices"] == 1
    assert four["traces"] == 1 and one["traces"] == 1
    np.testing.assert_allclose(four["w"], one["w"], rtol=1e-6, atol=1e-7)
    assert len(four["loss"]) == 3
    # shard_members: 8 members split over the 4 devices (the first 3 are p0's members)
    split = result["split"]
    assert not split["replicated"] and split["spec"] in ("P('data',)", "PartitionSpec('data',)")
    assert split["traces"] == 1
    np.testing.assert_allclose(split["w"], one["w"], rtol=1e-6, atol=1e-7)
    # vectorize="loop" on the mesh: members replicated, one compile, the same training
    loop = result["loop"]
    assert loop["replicated"] and loop["devices"] == 4 and loop["traces"] == 1
    np.testing.assert_allclose(loop["w"], one["w"], rtol=1e-6, atol=1e-7)


def test_fit_feeds_one_batch_per_member_and_counts_their_examples():
    rs = np.random.RandomState(0)
    groups = [
        {"x": rs.randn(2, 8, 5).astype(np.float32), "y": rs.randint(0, 3, (2, 8)).astype(np.int32)}
        for _ in range(3)
    ]
    p0 = pop.create(init, OPT, [0, 0])  # identical members: only their data differs
    step = make_population_step(loss_fn, OPT, member_batches=True, steps_per_call=2)
    state, h = jt.fit(p0, step, lambda epoch: iter(groups), epochs=1, progress=False)
    assert h.examples == 3 * 2 * 8 and step.trace_count == 1
    for i in range(2):
        one = jt.make_train_step(loss_fn, OPT)
        data = [{k: v[i] for k, v in g.items()} for g in groups]
        ref, _ = jt.fit(pop.extract_member(p0, i), one, data, epochs=1, progress=False)
        got = pop.extract_member(state, i).params["w"]  # vmap: within 1e-6, not bitwise
        np.testing.assert_allclose(got, ref.params["w"], rtol=1e-6, atol=1e-7)
    assert not np.array_equal(state.params["w"][0], state.params["w"][1])


def test_sigkill_then_resume_of_a_population_is_bitwise(tmp_path):
    """Killed (SIGKILL) after a checkpoint, resumed: the uninterrupted run's state, byte for byte."""
    import signal
    import subprocess
    import sys

    from _subprocess import device_env, parse_result

    script = str(pathlib.Path(__file__).with_name("_population_kill_script.py"))

    def run(out, mode):
        cmd = [sys.executable, script, str(out), mode]
        proc = subprocess.run(cmd, env=device_env(1), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return parse_result(proc.stdout)

    full = run(tmp_path / "full", "full")
    cmd = [sys.executable, script, str(tmp_path / "killed"), "pause:4"]
    proc = subprocess.Popen(cmd, env=device_env(1), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "PAUSED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run(tmp_path / "killed", "resume")
    assert resumed["digest"] == full["digest"]
    assert resumed["train"] == full["train"]
