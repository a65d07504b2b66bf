"""FLOPs per step from the compiled step, the peak table, MFU, and their summary.json fields."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxtrain import cli
from jaxtrain.loop import History
from jaxtrain.perf import (
    _flops_from_cost,
    peak_flops,
    perf_summary,
    step_flops,
    steps_per_second,
)


class _Kind:
    def __init__(self, device_kind):
        self.device_kind = device_kind


@pytest.mark.parametrize(
    "kind, chip, tflops",
    [
        ("TPU v2", "TPU v2", 22.5),  # two devices (TensorCores) per chip
        ("TPU v3", "TPU v3", 61.5),
        ("TPU v4", "TPU v4", 275),
        ("TPU v5 lite", "TPU v5e", 197),
        ("TPU v5", "TPU v5p", 459),
        ("TPU v6 lite", "TPU v6e", 918),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100", 312),
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", "NVIDIA H200", 989),
    ],
)
def test_peak_table(kind, chip, tflops):
    peak = peak_flops(_Kind(kind))
    assert peak["chip"] == chip
    assert peak["peak_flops_per_device"] == pytest.approx(tflops * 1e12)
    assert peak["source"].startswith(f"table: {chip}, ")


def test_cpu_peak_is_unknown():
    peak = peak_flops(jax.devices()[0])
    assert peak == {
        "device_kind": jax.devices()[0].device_kind,
        "chip": None,
        "peak_flops_per_device": None,
        "source": "unknown",
    }


def test_matmul_flops_are_exact():
    f = jax.jit(lambda x, w: x @ w)
    assert step_flops(f, jnp.ones((8, 16)), jnp.ones((16, 4))) == 2 * 8 * 16 * 4


def test_train_step_flops_without_recompiling():
    import optax

    import jaxtrain as jt

    model = jt.from_function(lambda p, x: x.reshape(x.shape[0], -1) @ p["w"])
    params = {"w": jnp.zeros((64, 10))}
    opt = optax.sgd(0.1)
    step = jt.make_train_step(jt.classification_loss(model), opt)
    state = jt.TrainState.create(params, opt, 0)
    batch = {"x": jnp.ones((32, 8, 8, 1)), "y": jnp.zeros((32,), jnp.int32), "mask": jnp.ones(32)}
    state, _ = step(state, batch)
    flops = step_flops(step, state, batch)
    # forward 2*32*64*10 and the weight gradient as much again, plus softmax and update
    assert 2 * (2 * 32 * 64 * 10) <= flops <= 4 * (2 * 32 * 64 * 10)
    assert step.trace_count == 1  # lowering reused the trace and the compiled program


class _FakeStep:
    def __init__(self, cost):
        self.cost = cost

    def lower(self, *args):
        return self

    def compile(self):
        return self

    def cost_analysis(self):
        if isinstance(self.cost, Exception):
            raise self.cost
        return self.cost


@pytest.mark.parametrize(
    "cost, flops",
    [
        ({"flops": 100.0, "bytes accessed": 8.0}, 100.0),  # newer jax: a dict
        ([{"flops": 50.0}, {"flops": 1.0}], 50.0),  # older jax: one dict per computation
        (None, None),
        ([], None),
        ({"flops": -1.0}, None),  # "not computed"
        ({"bytes accessed": 8.0}, None),
        (NotImplementedError("no cost analysis on this backend"), None),
    ],
)
def test_cost_analysis_shapes(cost, flops):
    assert step_flops(_FakeStep(cost)) == flops


def test_flops_from_cost_ignores_text():
    assert _flops_from_cost("flops") is None


def test_step_flops_needs_a_compiled_step():
    with pytest.raises(TypeError) as e:
        step_flops(lambda x: x, 1.0)
    assert str(e.value).startswith(
        "step_flops needs a jit-compiled step with .lower(...); got function. Fix: "
    )


def test_mfu_arithmetic():
    devices = [_Kind("TPU v4")] * 4
    out = perf_summary(1e12, 55.0, devices)
    assert out["model_flops_per_second"] == pytest.approx(55e12)
    assert out["peak_flops_per_second"] == pytest.approx(4 * 275e12)
    assert out["mfu"] == pytest.approx(55 / 1100)
    assert out["peak_source"] == "table: TPU v4, 275 TFLOP/s bf16 per chip"
    unknown = perf_summary(1e9, 10.0, [_Kind("cpu")])
    assert unknown["model_flops_per_second"] == pytest.approx(1e10)
    assert unknown["mfu"] is None and unknown["peak_flops_per_second"] is None
    assert unknown["peak_source"] == "unknown"
    assert perf_summary(None, 10.0, devices)["mfu"] is None


def test_steps_per_second_after_the_first_step():
    h = History(steps=11, wall_seconds=3.0, first_step_seconds=1.0)
    assert steps_per_second(h) == pytest.approx(5.0)
    assert steps_per_second(History(steps=1, wall_seconds=2.0, first_step_seconds=2.0)) is None


def test_summary_has_flops_and_mfu(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--epochs", "1", "--max-steps", "6", "--log-every", "3"]
    assert cli.main([*args, "--out", str(out), "--no-progress", "--no-checkpoint"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # MLP 64 -> 256 -> 256 -> 10 on batches of 64: ~3 x 2 x 64 x 83,456 FLOPs per step
    analytic = 3 * 2 * 64 * (64 * 256 + 256 * 256 + 256 * 10)
    assert 0.5 * analytic < summary["flops_per_step"] < 2 * analytic
    assert summary["model_flops_per_second"] > 0
    assert summary["mfu"] is None and summary["peak_flops_per_second"] is None  # CPU
    assert summary["peak_source"] == "unknown"
    assert summary["train_step_compilations"] == 1
    assert "MFU unknown (no peak)" in capsys.readouterr().out


def test_step_flops_counts_the_lowered_program_not_the_optimised_one():
    """The count comes from the program as lowered (every dot still a dot, global), which
    is what a GPU's optimised program loses when its matmuls become cuBLAS calls."""

    class Lowered(_FakeStep):
        def compile(self):
            return _FakeStep({"flops": 1.0})  # what an optimised GPU program reports

    assert step_flops(Lowered({"flops": 1024.0})) == 1024.0
    assert step_flops(Lowered(NotImplementedError("none"))) == 1.0  # falls back
