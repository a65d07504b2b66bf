"""Parity: the same run in PyTorch and jaxtrain, float32 on CPU, step by step.

Targets (issue 3): per-step loss relative difference <= 1e-5 over the first 10 steps and
<= 1e-4 over 200 steps; final parameters within 1e-4 (max absolute difference). Held over
200 steps by the smooth models (tanh MLP and tanh CNN). jaxtrain's own MLP and CNN use
ReLU (and the CNN max-pooling), whose kinks let float32 rounding pick different branches
in the two frameworks after some tens of steps (see docs/pytorch.md); they are held to
the 10-step target here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jaxtrain.apps.cli import main
from jaxtrain.contrast import compare, digits_models, presets
from jaxtrain.contrast.runner import TARGET_ALL, TARGET_FIRST, TARGET_PARAMS
from jaxtrain.data import load_digits

torch.set_num_threads(1)  # the suite runs on 2 cores with pytest -n 2
STEPS = 200
TRAIN, _ = load_digits()


def _run(kind, preset, steps):
    torch_model, jax_model = digits_models(kind, seed=0)
    return compare(
        torch_model,
        presets(steps)[preset],
        TRAIN,
        input_shape=(1, 8, 8),
        steps=steps,
        batch_size=32,
        seed=0,
        jax_model=jax_model,
        param_diff_every=10,
    )


@pytest.mark.parametrize("preset", sorted(presets(STEPS)))
@pytest.mark.parametrize("kind", ["mlp-tanh", "cnn-tanh"])
def test_parity_over_200_steps(kind, preset):
    c = _run(kind, preset, STEPS)
    assert np.all(np.isfinite(c.jax_loss)) and len(c.jax_loss) == STEPS
    assert c.torch_loss[-1] < 0.8 * c.torch_loss[0]  # it trained
    assert c.max_rel_diff(10) <= TARGET_FIRST, c.table(10)
    assert c.max_rel_diff() <= TARGET_ALL, c.table(10)
    assert c.final_param_diff <= TARGET_PARAMS
    np.testing.assert_allclose(c.jax_lr, c.torch_lr, rtol=3e-6, atol=1e-9)
    np.testing.assert_allclose(c.jax_grad_norm, c.torch_grad_norm, rtol=1e-3)
    assert c.summary()["meets_targets"]


@pytest.mark.parametrize("preset", sorted(presets(STEPS)))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_builtin_models_first_steps(kind, preset):
    """jaxtrain.models.MLP / jaxtrain.models.CNN against their PyTorch twins: the 10-step target."""
    c = _run(kind, preset, 10)
    assert c.max_rel_diff(10) <= TARGET_FIRST, c.table()
    assert c.final_param_diff <= TARGET_PARAMS


def test_compare_command_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "mlp-tanh", "--optimizer", "adam", "--steps", "12"]
    assert main([*argv, "--every", "5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "  step    torch loss      jax loss   rel diff" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 5, 10, 11]
    assert all(float(r[3]) <= TARGET_FIRST for r in rows)
    assert "all met" in text
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "compare.json").read_text())
    assert len(record["torch_loss"]) == 12 and record["summary"]["meets_targets"]


@pytest.mark.e2e  # starts a subprocess
def test_compare_without_torch_says_how_to_install_it(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "from jaxtrain.apps.cli import main\n"
        f"sys.exit(main(['compare', '--steps', '2', '--out', {str(tmp_path)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "jaxtrain compare: error: PyTorch is not installed." in r.stderr
    assert "pip install torch==2.13.0 then pip install -e .[torch]" in r.stderr


@pytest.mark.e2e  # starts a subprocess
def test_core_never_imports_torch():
    code = (
        "import sys, jaxtrain, jaxtrain.apps.cli, jaxtrain.contrast\n"
        "jaxtrain.apps.cli.build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.e2e  # starts a subprocess
def test_contrast_functions_without_torch_raise_the_install_hint():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from jaxtrain.contrast import from_torch\n"
        "try:\n"
        "    from_torch(None, (1,))\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "jaxtrain.contrast needs PyTorch" in r.stdout, r.stderr
    assert "pip install torch==2.13.0 then pip install -e .[torch]" in r.stdout
