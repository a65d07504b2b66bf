"""``jaxtrain train --population N`` end to end: summary.json, bitwise resume, the plot.

One population run (4 members of the digits MLP: 2 learning rates x 2 seeds, 24 steps)
is shared by the tests (module-scoped); the resume test continues a copy of it.
"""

import dataclasses
import json
import math
import shutil

import jax
import numpy as np
import pytest

from jaxtrain import population as pop
from jaxtrain.apps import cli, digits, population_run
from jaxtrain.apps.digits import TrainConfig
from jaxtrain.writers import read_jsonl

LRS, SEEDS = [1e-3, 3e-3], [0, 1]
ARGS = [
    "--model", "mlp", "--population", "4", "--lr", "1e-3,3e-3", "--seed", "0,1",
    "--max-steps", "24", "--eval-every", "12", "--save-every", "12", "--log-every", "6",
    "--no-progress", "--no-summary",
]  # fmt: skip


def _strict(path):
    def refuse(token):
        raise AssertionError(f"{path} is not strict JSON: {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pop") / "run"
    code = cli.main(["train", *ARGS, "--out", str(out)])
    return out, code


def test_summary_lists_every_member_and_the_best(run):
    out, code = run
    assert code == 0
    s = _strict(out / "summary.json")
    assert s["population"] == 4 and s["train_step_compilations"] == 1
    assert s["config"]["lr"] == LRS and s["config"]["population"] == 4
    grid = [(lr, seed) for lr in LRS for seed in SEEDS]  # first list slowest
    assert [(m["lr"], m["seed"]) for m in s["members"]] == grid
    last_eval = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "eval"][-1]
    for i, m in enumerate(s["members"]):
        assert m["member"] == i and m["steps"] == 24 and not m["diverged"]
        assert m["test_accuracy"] == last_eval["accuracy"][i]  # the logged final value
        assert math.isfinite(m["train"]["loss"]) and len(m["params_sha256"]) == 64
    best = int(np.argmax(last_eval["accuracy"]))
    assert s["best_member"] == best and s["best"] == s["members"][best]
    assert s["test_accuracy"] == s["members"][best]["test_accuracy"]
    assert len({m["params_sha256"] for m in s["members"]}) == 4  # four different runs


def test_records_hold_each_members_scheduled_learning_rate(run):
    out, _ = run
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    first = np.array(train[0]["learning_rate"])  # warmup: below the peak, per member
    assert first.shape == (4,) and np.all(first > 0)
    assert np.all(first < np.repeat(LRS, 2))
    np.testing.assert_allclose(first[2:] / first[:2], 3.0, rtol=1e-6)


def test_resume_of_a_population_run_folder_is_bitwise(run, tmp_path):
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for step in ("23", "24"):  # as if killed after the checkpoint of step 12
        shutil.rmtree(copy / "checkpoints" / step)
    assert cli.main(["train", "--resume", str(copy), "--no-progress", "--no-summary"]) == 0
    a, b = _strict(out / "summary.json"), _strict(copy / "summary.json")
    assert b["resumed_from_step"] == 12 and b["steps"] == 24
    assert [m["params_sha256"] for m in b["members"]] == [m["params_sha256"] for m in a["members"]]

    def members_after_12(folder):  # per-member values (lists), not the timings
        records = [r for r in read_jsonl(folder / "metrics.jsonl") if r["step"] > 12]
        return [{k: v for k, v in r.items() if isinstance(v, list)} for r in records]

    late = members_after_12(out)
    assert len(late) == 4 and late == members_after_12(copy)  # bitwise: losses, accuracies
    # The population is part of the run's identity: other members are refused.
    assert cli.main(["train", "--resume", str(copy), "--lr", "1e-3,1e-2"]) == 2


def test_jaxtrain_plot_draws_every_member_of_the_run(run, tmp_path, monkeypatch):
    import matplotlib.figure

    out, _ = run
    figures = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "savefig",
        lambda self, *a, **k: (figures.append(self), original(self, *a, **k))[1],
    )
    png = tmp_path / "members.png"
    assert cli.main(["plot", str(out), "--out", str(png)]) == 0
    assert png.stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    ax = next(a for a in figures[-1].axes if a.get_title() == "loss")
    drawn = {line.get_gid(): np.asarray(line.get_ydata()) for line in ax.get_lines()}
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    for i in range(4):
        np.testing.assert_array_equal(drawn[f"run train member {i}"], [r["loss"][i] for r in train])
    best = _strict(out / "summary.json")["best_member"]
    np.testing.assert_array_equal(drawn["run train best"], [r["loss"][best] for r in train])


def test_member_equals_the_single_run_with_its_seed_and_lr():
    # Member i against `jaxtrain train --seed s_i --lr lr_i` on the same batches. Not
    # bitwise: XLA:CPU sums the vmapped (batched) matmuls in another order, and the
    # member's schedule is lr_i * shape(t) where optax computes the single run's
    # warmup-cosine from lr_i directly (float32 rounding); measured <= 4e-7 absolute.
    cfg = TrainConfig(model="mlp", population=2, lr=LRS, seed=1, max_steps=30, progress=False)
    mesh = digits.data_mesh(jax.devices())
    parts = population_run.build_parts(cfg, mesh)
    batches = list(parts.train_ds.batches(0))[:4]
    state = parts.state
    for b in batches:
        state, metrics = parts.train_step(state, b)
    single = digits._build(dataclasses.replace(cfg, population=None, lr=LRS[1]), mesh)
    s = single.state
    for b in batches:
        s, single_metrics = single.train_step(s, b)
    member = pop.extract_member(state, 1)
    for got, want in zip(jax.tree.leaves(member.params), jax.tree.leaves(s.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(metrics["learning_rate"][1]) == float(single_metrics["learning_rate"])
    np.testing.assert_allclose(metrics["loss"][1], single_metrics["loss"], rtol=1e-6)
    assert parts.train_step.trace_count == 1


def test_a_diverged_member_is_frozen_reported_and_fails_the_command(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "mlp", "--optimizer", "sgd", "--schedule", "constant"]
    argv += ["--population", "2", "--lr", "1e-2,1e5", "--max-steps", "8", "--eval-every", "4"]
    code = cli.main(["train", *argv, "--out", str(out), "--no-progress", "--no-summary"])
    err = capsys.readouterr().err
    assert code == 1  # --nonfinite raise (the default): the others trained, the run failed
    assert "member(s) [1] of the population diverged" in err
    s = _strict(out / "summary.json")  # null, not NaN, for the diverged member's metrics
    assert s["diverged_members"] == [1] and s["best_member"] == 0
    assert s["members"][1]["diverged"] and s["members"][1]["train"]["loss"] is None
    assert s["members"][0]["steps"] == 8 and s["members"][1]["steps"] < 8
