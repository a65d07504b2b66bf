"""The example scripts run end to end (tiny sizes) and print what they promise."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# One xdist group (pytest --dist loadgroup): the module fixture runs once, on one worker.
pytestmark = pytest.mark.xdist_group("test_examples")


ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300

COMMANDS = {
    "train_digits": [
        "examples/train_digits.py",
        "--epochs",
        "1",
        "--steps",
        "6",
        "--log-every",
        "3",
    ],
    "char_lm": [
        "examples/char_lm.py",
        *("--steps", "12", "--seq-len", "16", "--d-model", "32", "--heads", "2"),
        *("--layers", "1", "--max-chars", "20000", "--eval-every", "6"),
        *("--prompt", "The ", "--sample-len", "40"),
    ],
}


@pytest.fixture(scope="module")
def runs():
    """Runs every example at once (they are mostly single-threaded start-up and compile)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in COMMANDS.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def test_train_digits(runs):
    rc, out, err = runs["train_digits"]
    assert rc == 0, err[-3000:]
    assert "step     3" in out and "step     6" in out  # logged every 3 steps, no more
    assert "compilations: train 1, eval 1" in out  # fixed shapes: one compile each
    loss = re.search(r"^test loss (\d+\.\d+)$", out, re.MULTILINE)
    match = re.search(r"^test accuracy (\d\.\d+)$", out, re.MULTILINE)
    assert match and loss, out
    # Six steps already learn: measured test loss 2.2185 (uniform guessing: ln 10 = 2.3026)
    # and accuracy 0.328 (chance: 0.1). An untrained or broken step stays near chance.
    assert float(loss.group(1)) < math.log(10) - 0.05, out
    assert float(match.group(1)) > 0.2, out


def test_char_lm(runs):
    rc, out, err = runs["char_lm"]
    assert rc == 0, err[-3000:]
    assert re.search(r"^step +12 +eval +loss \d", out, re.MULTILINE), out
    match = re.search(r"^final train loss (\d+\.\d+) \| eval loss (\d+\.\d+)", out, re.MULTILINE)
    assert match, out
    # Both evaluations (steps 6 and 12) fall, and the last is well below uniform guessing
    # over the vocabulary (ln 78 = 4.36). Measured: 3.986, then 3.811.
    vocab = int(re.search(r"vocab (\d+)", out).group(1))
    evals = [float(x) for x in re.findall(r"^step +\d+ +eval +loss (\d+\.\d+)", out, re.MULTILINE)]
    assert len(evals) == 2 and evals[1] < evals[0], out
    assert float(match.group(2)) == evals[1] < math.log(vocab) - 0.3, out
    sample = out.split("sample:\n", 1)[1]
    assert sample.startswith("The ")
    assert (
        len(sample.rstrip("\n")) >= len("The ") + 30
    )  # 40 characters generated (some may be "\n")
