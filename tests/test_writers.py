"""CSV and TensorBoard metric writers; the TensorBoard file is read back with TensorBoard's reader."""

import csv
import json
import math
import os
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import jaxtrain
from jaxtrain.apps import cli
from jaxtrain.writers import CsvWriter, JsonlWriter, TensorBoardWriter, read_csv, read_jsonl

TRAIN_1 = {"step": 20, "epoch": 0, "split": "train", "loss": 1.25, "learning_rate": 0.002}
EVAL_1 = {"step": 23, "epoch": 0, "split": "eval", "loss": 0.5, "accuracy": 0.875}
TRAIN_2 = {"step": 40, "epoch": 1, "split": "train", "loss": 0.75, "learning_rate": 0.001}


def _scalars(logdir):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_csv_header_grows_when_a_new_key_appears(tmp_path):
    path = tmp_path / "m.csv"
    with CsvWriter(path) as w:
        w.write(TRAIN_1)
        assert path.read_text().splitlines() == [
            "step,epoch,split,loss,learning_rate",
            "20,0,train,1.25,0.002",
        ]
        w.write(EVAL_1)  # brings "accuracy": the file is rewritten with the wider header
        w.write(TRAIN_2)  # lacks "accuracy": an empty cell
    assert path.read_text().splitlines() == [
        "step,epoch,split,loss,learning_rate,accuracy",
        "20,0,train,1.25,0.002,",
        "23,0,eval,0.5,,0.875",
        "40,1,train,0.75,0.001,",
    ]
    assert read_csv(path) == [TRAIN_1, EVAL_1, TRAIN_2]
    assert not (tmp_path / "m.csv.tmp").exists()


def test_csv_append_keeps_the_header_and_nan_round_trips(tmp_path):
    path = tmp_path / "m.csv"
    with CsvWriter(path) as w:
        w.write(TRAIN_1)
    with CsvWriter(path, mode="a") as w:  # resume
        w.write({**TRAIN_2, "loss": float("nan")})
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "epoch", "split", "loss", "learning_rate"]
    assert len(rows) == 3
    back = read_csv(path)
    assert back[0] == TRAIN_1 and back[1]["step"] == 40 and math.isnan(back[1]["loss"])


def test_csv_fixed_columns_leave_other_keys_out(tmp_path):
    path = tmp_path / "m.csv"
    with CsvWriter(path, columns=["step", "loss"]) as w:
        w.write(TRAIN_1)
        w.write(EVAL_1)
    assert path.read_text().splitlines() == ["step,loss", "20,1.25", "23,0.5"]
    with pytest.raises(ValueError) as e:
        CsvWriter(path, mode="a", columns=["step", "accuracy"])
    assert "has columns ['step', 'loss'] but columns=['step', 'accuracy'] was given" in str(e.value)
    with pytest.raises(ValueError, match=r"CsvWriter mode must be 'w' or 'a'; got 'x'\."):
        CsvWriter(path, mode="x")


def test_tensorboard_scalars_read_back(tmp_path):
    with TensorBoardWriter(tmp_path / "tb") as w:
        w.write(TRAIN_1)
        w.write({**EVAL_1, "note": "text is skipped", "flag": True})
        w.write(TRAIN_2)
        w.write({"step": 50, "loss": 0.5})  # no split: default_split "train"
    scalars = _scalars(tmp_path / "tb")
    assert set(scalars) == {"train/loss", "train/learning_rate", "eval/loss", "eval/accuracy"}
    assert scalars["train/loss"] == [(20, 1.25), (40, 0.75), (50, 0.5)]
    assert scalars["eval/accuracy"] == [(23, 0.875)]
    assert [s for s, _ in scalars["train/learning_rate"]] == [20, 40]
    assert scalars["train/learning_rate"][0][1] == pytest.approx(0.002)
    with (
        TensorBoardWriter(tmp_path / "tb2") as w,
        pytest.raises(ValueError, match=r"needs a 'step' in every record; got keys \['loss'\]"),
    ):
        w.write({"loss": 1.0})


def _strict_loads(text):
    """A strict JSON parser: NaN / Infinity tokens are errors (as in jq, JavaScript, Go)."""

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_jsonl_writer_writes_null_for_non_finite_values(tmp_path):
    import numpy as np

    with JsonlWriter(tmp_path / "m.jsonl") as w:
        w.write({**TRAIN_1, "loss": float("inf"), "grad_norm": np.float32("nan")})
        w.write({**TRAIN_2, "extra": [1.0, float("-inf")], "n": np.int64(3)})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    first = _strict_loads(lines[0])
    assert first["loss"] is None and first["grad_norm"] is None and first["step"] == 20
    assert _strict_loads(lines[1])["extra"] == [1.0, None] and _strict_loads(lines[1])["n"] == 3
    assert read_jsonl(tmp_path / "m.jsonl")[0] == {**TRAIN_1, "loss": None, "grad_norm": None}


def test_diverged_run_writes_strict_json(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxtrain.apps.plots import load_run, plot_curves, plot_runs

    opt = optax.sgd(1e30)  # diverges: inf, then NaN loss and parameters
    step = jaxtrain.make_train_step(lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2), opt)
    state = jaxtrain.TrainState.create({"w": jnp.ones(2)}, opt, jax.random.key(0))
    data = jaxtrain.ArrayDataset({"x": np.ones((16, 2), np.float32)}, 4)
    with JsonlWriter(tmp_path / "metrics.jsonl") as w:
        _, h = jaxtrain.fit(state, step, data, epochs=2, log_every=2, writers=[w], progress=False)
    assert any(not math.isfinite(r["loss"]) for r in h.train)  # it did diverge
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [_strict_loads(line) for line in lines]
    assert len(records) == len(h.train) and any(r["loss"] is None for r in records)
    assert [r["step"] for r in load_run(tmp_path)] == [r["step"] for r in h.train]
    # The plots read null back as a gap, not a crash.
    assert os.path.exists(plot_curves(load_run(tmp_path), tmp_path / "curves.png"))
    assert os.path.exists(plot_runs([tmp_path], tmp_path / "runs.png"))


def test_train_cli_writes_tensorboard_and_csv(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        ["train", "--model", "mlp", "--epochs", "1", "--out", str(out), "--no-progress"]
        + ["--no-checkpoint", "--tensorboard", "--csv"]
    )
    assert code == 0, capsys.readouterr().err
    records = read_jsonl(out / "metrics.jsonl")
    scalars = _scalars(out / "tensorboard")
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "eval/accuracy"} <= set(scalars)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in train] == [20, 23]
    assert [s for s, _ in scalars["eval/accuracy"]] == [23]
    assert scalars["eval/accuracy"][0][1] == pytest.approx(evals[0]["accuracy"], rel=1e-6)
    assert scalars["train/loss"][-1][1] == pytest.approx(train[-1]["loss"], rel=1e-6)
    # CSV has no null: a None (e.g. ``mfu`` on CPU, where the peak is unknown) is an
    # empty cell, which read_csv leaves out.
    assert any(r.get("mfu", 0) is None for r in train)
    assert read_csv(out / "metrics.csv") == [
        {k: v for k, v in r.items() if v is not None} for r in records
    ]
    assert json.loads((out / "config.json").read_text())["tensorboard"] is True


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_tensorboard_purge_step_must_be_a_step(tmp_path, bad):
    with pytest.raises(
        ValueError, match=rf"purge_step must be a step number >= 0 or None; got {bad!r}.*Fix"
    ):
        TensorBoardWriter(tmp_path / "tb", purge_step=bad)


def test_tensorboard_purge_step_drops_steps_logged_twice(tmp_path):
    logdir = tmp_path / "tb"
    with TensorBoardWriter(logdir) as w:  # the interrupted run logged steps 1..7
        for s in range(1, 8):
            w.write({"step": s, "loss": float(s)})
    time.sleep(1.1)  # TensorBoard orders event files by the creation time in their name
    with TensorBoardWriter(logdir, purge_step=4) as w:  # resumed from the checkpoint at 3
        for s in range(4, 10):
            w.write({"step": s, "loss": s + 0.5})
    scalars = _scalars(logdir)
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)] + [
        (s, s + 0.5) for s in range(4, 10)
    ]
