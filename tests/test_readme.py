"""The README cannot rot: its quick start is what CI runs, and its code blocks execute."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quickstart_lines():
    block = README.split("<!-- quickstart -->")[1].split("<!-- /quickstart -->")[0]
    return [ln for ln in block.strip().splitlines() if not ln.startswith("```")]


def test_quickstart_is_exactly_two_command_lines():
    lines = _quickstart_lines()
    assert len(lines) == 2, lines
    install_and_train, install_and_test = lines
    assert "pip install -e ." in install_and_train and "jaxtrain train" in install_and_train
    assert '".[test' in install_and_test and "pytest" in install_and_test
    assert "torch==2.13.0" in install_and_test  # the CPU build: parity tests must not skip
    assert install_and_test.index("torch==2.13.0") < install_and_test.index('".[test')
    # CI runs every tier (no -m marker selection) and names the 20 slowest tests.
    pytest_args = install_and_test.split("pytest", 1)[1].split()
    assert "-m" not in pytest_args and "--durations=20" in pytest_args, pytest_args


def test_ci_runs_the_readme_test_line():
    """.ci/run extracts line 2 of the quick start; check its extraction gives that line."""
    script = (ROOT / ".ci" / "run").read_text()
    extract = next(ln for ln in script.splitlines() if ln.startswith("test_line=$("))
    cmd = extract[len("test_line=$(") : -1]
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _quickstart_lines()[1]
    assert 'eval "$test_line"' in script


@pytest.mark.parametrize("code", [0, 1, 5])
def test_ci_exits_with_the_test_line_status_no_tests_included(code):
    """pytest's exit 5 (no tests collected) fails CI like any other failure, with a word."""
    script = (ROOT / ".ci" / "run").read_text()
    tail = script[script.index('echo "+ $test_line"') :]
    res = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\ntest_line='(exit {code})'\n{tail}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == code, res
    assert ("collected no tests" in res.stderr) == (code == 5), res.stderr


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Runs the API tour with fewer epochs (same code otherwise)."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 3
    tour, fit_block = blocks[0], blocks[1]
    assert "range(40)" in tour and "epochs=40" in fit_block
    code = tour.replace("range(40)", "range(2)") + fit_block.replace(
        "epochs=40,", "epochs=2, progress=False,"
    )
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert int(ns["state"].step) == 4 * 23  # 2 + 2 epochs of 23 steps
    assert ns["train_step"].trace_count == 1  # the tour's loop compiles its step once
    assert ns["history"].eval[-1]["accuracy"] > 0.8
    # The custom-loss block defines a loss usable by make_train_step.
    loss_ns = dict(ns)
    exec(compile(blocks[2], "README.md", "exec"), loss_ns)
    step = ns["jt"].make_train_step(loss_ns["loss_fn"], ns["optimizer"])
    batch = next(ns["jt"].ArrayDataset(ns["train"], 64).batches(0))
    new_state, metrics = step(ns["state"], batch)
    assert {"loss", "accuracy", "grad_norm"} <= set(metrics)
    # The fused-steps block: same code, one epoch.
    ns["state"] = new_state  # the tour's state was consumed (donated) by the step above
    fused_block = next(b for b in blocks if "make_train_steps(" in b)
    exec(
        compile(fused_block.replace("epochs=40", "epochs=1, progress=False"), "README.md", "exec"),
        ns,
    )
    assert ns["train_steps"].steps_per_call == 8 and ns["history"].steps == 23
    # The callbacks block: same code, two epochs (every epoch instead of every 10 / 5).
    cb_block = next(b for b in blocks if "PeriodicCallback" in b)
    cb_code = cb_block.replace("epochs=40,", "epochs=2, progress=False,")
    cb_code = cb_code.replace("Every(epochs=10)", "Every(epochs=1)").replace(
        "every_epochs=5", "every_epochs=1"
    )
    ns["state"] = ns["jt"].TrainState.create(
        ns["params"], ns["optimizer"], ns["jax"].random.key(0), ns["model_state"]
    )
    exec(compile(cb_code, "README.md", "exec"), ns)
    assert ns["history"].steps == 2 * 23 and len(ns["history"].eval) == 2
    # The checkpoint block: same code, two epochs, in a temporary folder.
    ckpt_block = next(b for b in blocks if "Checkpointer(" in b)
    assert "epochs=40" in ckpt_block
    monkeypatch.chdir(tmp_path)
    ns["train_ds"] = ns["jt"].ArrayDataset(ns["train"], 64, seed=0)
    ns["test_ds"] = ns["jt"].ArrayDataset(ns["test"], 120, shuffle=False)
    ns["state"] = new_state.replace(step=new_state.step * 0)  # a live state at step 0
    for _ in range(2):  # the second run resumes from the first one's checkpoints
        exec(
            compile(
                ckpt_block.replace("epochs=40", "epochs=2, progress=False"), "README.md", "exec"
            ),
            ns,
        )
    assert int(ns["state"].step) == 2 * 23
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir() if p.name.isdigit()) == [
        "23",
        "46",
    ]
