"""``jaxtrain train --population N`` options and population plots, without training.

The runs themselves (summary.json, resume, member = single run, ``jaxtrain plot`` of a
real run) are in tests/test_population_cli_e2e.py.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from jaxtrain.apps import cli, fields, population_run
from jaxtrain.apps.digits import TrainConfig, _diff
from jaxtrain.apps.plots import plot_curves
from jaxtrain.apps.population_plot import best_of
from jaxtrain.writers import JsonlWriter


def _train_args(argv):
    return cli.build_parser().parse_args(["train", *argv])


def test_sweep_options_take_lists_and_log_spaced_ranges():
    args = _train_args(
        [
            "--population",
            "8",
            "--lr",
            "logspace:1e-4:1e-1:4",
            "--seed",
            "0,1",
            "--weight-decay",
            "0",
        ]
    )
    assert args.lr == [1e-4, 1e-3, 1e-2, 1e-1]
    assert args.seed == [0, 1] and args.weight_decay == 0.0 and args.population == 8
    assert _train_args(["--lr", "3e-3"]).lr == 3e-3  # one value stays a number


def test_members_are_the_grid_of_the_lists_or_consecutive_seeds():
    cfg = TrainConfig(population=4, lr=[1e-3, 1e-2], seed=[3, 7], weight_decay=0.0)
    team = population_run.members(cfg)
    assert [(m["lr"], m["seed"]) for m in team] == [(1e-3, 3), (1e-3, 7), (1e-2, 3), (1e-2, 7)]
    assert all(m["weight_decay"] == 0.0 for m in team)
    assert [m["seed"] for m in population_run.members(TrainConfig(population=3, seed=5))] == [
        5,
        6,
        7,
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "1e-3,3e-3"], r"lr: a list of values \(--lr 0.001,0.003\) trains a population"),
        (
            ["--population", "4", "--lr", "1e-3,3e-3,1e-2"],
            r"--population 4, but --lr \(3 values\) make 3 member\(s\).*Fix: --population 3",
        ),
        (
            ["--population", "4", "--lr", "1e-3,3e-3", "--seed", "0,1,2"],
            r"--lr \(2 values\) x --seed \(3 values\) make 6 .*Fix: --population 6",
        ),
        (["--population", "2", "--lr", "1e-3,-1"], r"lr must be a finite number > 0; got -1"),
        (["--population", "2", "--lr", "logspace:1e-4:1e-1"], r"logspace:LO:HI:N with two"),
        (["--population", "3", "--lr", "logspace:0:1:3"], r"finite bounds > 0"),
        (["--population", "2", "--seed", "0,0"], r"seed lists a value twice: \[0, 0\]"),
        (["--population", "2", "--seed", "0,x"], r"expected an integer seed .* got '0,x'"),
        (["--population", "2", "--fsdp", "2"], r"--fsdp 2 is not supported with --population"),
        (["--population", "2", "--ema", "0.9"], r"--ema 0.9 is not supported with --population"),
        (["--nonfinite", "freeze"], r"'freeze' freezes one member of a population"),
        (["--vectorize", "map"], r"--vectorize map combines the members of a population"),
        (["--vectorize", "vmap"], r"--vectorize vmap combines the members of a population"),
        (["--population", "2", "--seed", "4294967295"], r"above the largest seed 4294967295"),
    ],
)
def test_bad_population_options_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = str(tmp_path / "run")
    try:
        code = cli.main(["train", *argv, "--out", out, "--no-progress"])
    except SystemExit as e:  # argparse's own errors (bad values)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not os.path.exists(out)  # refused before anything was written


def test_vectorize_auto_choice_is_printed_and_a_forced_vmap_on_a_cpu_cnn_warned(capsys):
    """--vectorize auto (the default) says what it chose, from an abstract trace."""
    import types

    import jax
    import jax.numpy as jnp
    import optax

    import jaxtrain as jt
    from jaxtrain import population as pop
    from jaxtrain.population_step import make_population_step

    if jax.default_backend() != "cpu":
        pytest.skip("'auto' loops on CPU only")

    def conv_loss(params, batch):
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(batch["x"], params["k"], (1, 1), "SAME",
                                         dimension_numbers=dims)  # fmt: skip
        return jnp.mean(y)

    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    state = pop.create(lambda k: {"k": jnp.ones((3, 3, 1, 2))}, opt, [0, 1])
    data = jt.ArrayDataset({"x": np.ones((8, 4, 4, 1), np.float32)}, 4)
    for k in (1, 2):  # one step, and fused steps (batches [K, B, ...])
        cfg = types.SimpleNamespace(vectorize="auto", steps_per_call=k, model="cnn")
        fused = None if k == 1 else k
        step = make_population_step(conv_loss, opt, steps_per_call=fused)
        population_run._report_vectorize(cfg, step, state, data)
        assert step.spec.vectorize == "loop" and step.trace_count == 0  # nothing compiled
        assert "population: --vectorize auto chose loop (" in capsys.readouterr().err
    mlp = make_population_step(lambda p, b: jnp.mean(b["x"]) * jnp.sum(p["k"]), opt)
    cfg = types.SimpleNamespace(vectorize="auto", steps_per_call=1, model="mlp")
    population_run._report_vectorize(cfg, mlp, state, data)
    assert "--vectorize auto chose vmap (the members batched" in capsys.readouterr().err
    forced = types.SimpleNamespace(vectorize="vmap", steps_per_call=1, model="cnn")
    with pytest.warns(RuntimeWarning, match=r"--vectorize vmap on a CPU makes the CNN's"):
        population_run._report_vectorize(forced, step, state, data)


def test_population_fields_round_trip_through_config_json_and_count_as_results():
    cfg = TrainConfig(population=4, lr=[1e-3, 1e-2], seed=[0, 1])
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    again = TrainConfig(**saved)
    again.validate()
    assert again == cfg
    # The run identity includes the population: a resume with other members is refused.
    other = dataclasses.replace(cfg, lr=[1e-3, 3e-2])
    assert _diff(dataclasses.asdict(other), saved) == ["lr"]
    assert _diff(dataclasses.asdict(dataclasses.replace(cfg, population=None)), saved) == [
        "population"
    ]


def test_config_json_with_a_bad_list_names_the_field():
    with pytest.raises(ValueError, match=r"weight_decay must be a finite number >= 0.*\[\]"):
        TrainConfig(population=2, weight_decay=[]).validate()
    with pytest.raises(ValueError, match=r"lr must be .*got 'x' \(str\) \(in the list"):
        TrainConfig(population=2, lr=[1e-3, "x"]).validate()


def test_sweep_syntax_is_documented_in_help():
    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "logspace:LO:HI:N" in " ".join(text.split())
    assert fields.parse_values("logspace:1e-3:1e-1:3", "float") == [1e-3, 1e-2, 1e-1]


# ------------------------------------------------------------------------------- plots


def _population_records(n=5, steps=(10, 20, 30)):
    rng = np.random.default_rng(0)
    records = []
    for s in steps:
        loss = (rng.uniform(0.5, 2.0, n) / s).tolist()
        loss[1] = None  # a frozen member: a gap, not a zero
        records.append({"step": s, "split": "train", "loss": loss, "diverged": [False] * n})
        acc = rng.uniform(0.5, 0.9, n).tolist()
        records.append({"step": s, "split": "eval", "loss": loss, "accuracy": acc})
    return records


def _capture_figures(monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.figure

    figures = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def _lines(fig, metric_title):
    ax = next(a for a in fig.axes if a.get_title() == metric_title)
    return {line.get_gid(): np.asarray(line.get_ydata(), float) for line in ax.get_lines()}


def test_curves_of_a_population_draw_every_member_median_and_best(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    records = _population_records()
    path = plot_curves(records, tmp_path / "curves.png")
    assert os.path.getsize(path) > 0
    lines = _lines(figures[-1], "accuracy")
    evals = np.array([r["accuracy"] for r in records if r["split"] == "eval"])
    for i in range(5):  # every member's data, as logged
        np.testing.assert_array_equal(lines[f"eval member {i}"], evals[:, i])
    np.testing.assert_array_equal(lines["eval median"], np.median(evals, axis=1))
    best = int(np.argmax(evals[-1]))
    assert best_of(records) == best
    np.testing.assert_array_equal(lines["eval best"], evals[:, best])
    loss = _lines(figures[-1], "loss")["train member 1"]
    assert np.isnan(loss).all()  # null (frozen) drawn as a gap


def test_best_member_is_never_a_diverged_one():
    records = _population_records(n=3, steps=(10,))
    records[1]["accuracy"] = [0.2, 0.9, 0.5]
    records[0]["diverged"] = [False, True, False]
    assert best_of(records) == 2


def test_jaxtrain_plot_of_a_population_run_folder(tmp_path, monkeypatch, capsys):
    figures = _capture_figures(monkeypatch)
    run = tmp_path / "sweep"
    run.mkdir()
    records = _population_records(n=4)
    with JsonlWriter(run / "metrics.jsonl") as w:
        for r in records:
            w.write(r)
    png = tmp_path / "plot.png"
    assert cli.main(["plot", str(run), "--out", str(png), "--metrics", "loss,accuracy"]) == 0
    assert png.stat().st_size > 0 and "wrote" in capsys.readouterr().out
    lines = _lines(figures[-1], "accuracy")
    evals = np.array([r["accuracy"] for r in records if r["split"] == "eval"])
    for i in range(4):
        np.testing.assert_array_equal(lines[f"sweep eval member {i}"], evals[:, i])
    assert "sweep eval best" in lines and "sweep eval median" in lines


def _summary(diverged=(), accuracies=(0.9, 0.95, 0.5), skipped=0):
    rows = [
        {
            "member": i,
            "seed": i,
            "lr": 1e-3 * (i + 1),
            "weight_decay": 0.0,
            "test_accuracy": None if i in diverged else acc,
            "diverged": i in diverged,
            "skipped_steps": skipped,
        }
        for i, acc in enumerate(accuracies)
    ]
    finite = [i for i in range(len(rows)) if i not in diverged]
    best = max(finite, key=lambda i: accuracies[i]) if finite else None
    return {
        "members": rows,
        "best_member": best,
        "test_accuracy": None if best is None else accuracies[best],
        "diverged_members": list(diverged),
        "skipped_steps": skipped * len(rows),
    }


@pytest.mark.parametrize(
    "nonfinite, diverged, skipped, error",
    [
        ("raise", (), 0, None),
        ("raise", (2,), 0, r"member\(s\) \[2\] of the population diverged .* --nonfinite freeze"),
        ("freeze", (2,), 0, None),  # accepted: reported, exit 0
        ("freeze", (0, 1, 2), 0, r"no member of the population ended with a finite test"),
        ("skip", (), 3, r"9 member step\(s\) were skipped"),
    ],
)
def test_population_report_fails_only_where_the_run_did(nonfinite, diverged, skipped, error):
    cfg = TrainConfig(population=3, lr=[1e-3, 2e-3, 3e-3], nonfinite=nonfinite)
    out, err = population_run.report_lines(cfg, _summary(diverged, skipped=skipped), 0.98)
    assert len(out) >= 3  # one line per member (and the best, when there is one)
    if 2 in diverged:
        assert "member 2: seed 2, lr 0.003, weight decay 0: test accuracy diverged" in out
    if error is None:
        assert err == [] and out[-1].startswith("best: member 1 (seed 1, lr 0.002")
    else:
        assert len(err) == 1 and re.search(error, err[0]), err
