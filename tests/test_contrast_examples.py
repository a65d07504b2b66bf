"""The PyTorch-vs-functional examples run (small sizes) and print what they promise."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    r = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_the_two_loops_read_alike_and_both_train():
    losses = {}
    for name in ("pytorch_loop", "functional_loop"):
        out = _run(f"examples/{name}.py", "--steps", "40", "--log-every", "39")
        steps = re.findall(r"^step +(\d+) +loss (\d+\.\d+)$", out, re.MULTILINE)
        assert [s for s, _ in steps] == ["0", "39"], out
        losses[name] = [float(v) for _, v in steps]
        assert losses[name][1] < losses[name][0]
        assert re.search(r"^test accuracy 0\.\d+$", out, re.MULTILINE), out
    # structured identically: the same five labelled stages
    stages = {"1": "clearing the gradients", "2": "forward pass", "3": "loss", "4": "gradients"}
    stages["5"] = "update"
    for name in ("pytorch_loop", "functional_loop"):
        text = (ROOT / "examples" / f"{name}.py").read_text()
        for n, stage in stages.items():
            assert f"# ({n}) {stage}" in text, (name, n, stage)
    assert (
        "(1) clearing the gradients: no such line"
        in (ROOT / "examples" / "functional_loop.py").read_text()
    )


def test_forgotten_zero_grad_example():
    out = _run("examples/forgotten_zero_grad.py", "--steps", "25")
    gap = float(re.search(r"without zero_grad: up to (\d+\.\d+)% off", out).group(1))
    same = float(re.search(r"jaxtrain: within (\S+) \(relative\)", out).group(1))
    assert gap > 5.0
    assert same <= 1e-5
