"""Model FLOPs per step from the jaxpr (XLA as fallback), the peak table, MFU, summary.json."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxtrain.apps import cli
from jaxtrain.loop import History
from jaxtrain.perf import (
    _flops_from_cost,
    jaxpr_flops,
    peak_flops,
    perf_summary,
    step_flops,
    step_flops_source,
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
    from jaxtrain.apps.tasks import classification_loss

    model = jt.from_function(lambda p, x: x.reshape(x.shape[0], -1) @ p["w"])
    params = {"w": jnp.zeros((64, 10))}
    opt = optax.sgd(0.1)
    step = jt.make_train_step(classification_loss(model), opt)
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
    # _FakeStep cannot be traced: the jaxpr walk fails, XLA's cost analysis is the fallback.
    step = _FakeStep(cost)
    assert step_flops(step) == flops
    source = step_flops_source(step)
    if flops is None:
        assert source is None
    else:
        assert source.startswith("xla-lowered: the jaxpr walk failed (TypeError: ")


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


@pytest.mark.e2e  # a whole `jaxtrain train` run
def test_summary_has_flops_and_mfu(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--epochs", "1", "--max-steps", "6", "--log-every", "3"]
    assert cli.main([*args, "--out", str(out), "--no-progress", "--no-checkpoint"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # MLP 64 -> 256 -> 256 -> 10 on batches of 64: ~3 x 2 x 64 x 83,456 FLOPs per step
    analytic = 3 * 2 * 64 * (64 * 256 + 256 * 256 + 256 * 10)
    assert 0.5 * analytic < summary["flops_per_step"] < 2 * analytic
    # FLOP/s is FLOPs per step times steady steps per second (examples/s over the batch of 64).
    steps_per_second = summary["examples_per_second"] / 64
    assert summary["model_flops_per_second"] == pytest.approx(
        summary["flops_per_step"] * steps_per_second, rel=1e-3
    )
    assert summary["mfu"] is None and summary["peak_flops_per_second"] is None  # CPU
    assert summary["peak_source"] == "unknown"
    assert summary["train_step_compilations"] == 1
    assert "MFU unknown (no peak)" in capsys.readouterr().out


def test_step_flops_counts_the_lowered_program_not_the_optimised_one():
    """Where the jaxpr walk fails, the count comes from the program as lowered (every dot
    still a dot, global), which is what a GPU's optimised program loses when its matmuls
    become cuBLAS calls."""

    class Lowered(_FakeStep):
        def compile(self):
            return _FakeStep({"flops": 1.0})  # what an optimised GPU program reports

    assert step_flops(Lowered({"flops": 1024.0})) == 1024.0
    falls_back = Lowered(NotImplementedError("none"))
    assert step_flops(falls_back) == 1.0  # falls back
    assert step_flops_source(falls_back).startswith("xla-compiled: the jaxpr walk failed")


# --- Model FLOPs from the jaxpr ------------------------------------------------------------


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_jaxpr_flops_matmul_is_2mnk_whatever_the_dtype():
    m, k, n = 8, 16, 4
    matmul = jax.jit(lambda x, w: jnp.tanh(x @ w) + 1.0)  # elementwise work is not counted
    assert jaxpr_flops(matmul, _sds(m, k), _sds(k, n)) == 2 * m * n * k
    half = (_sds(m, k, dtype=jnp.bfloat16), _sds(k, n, dtype=jnp.bfloat16))
    assert jaxpr_flops(matmul, *half) == 2 * m * n * k
    assert step_flops(matmul, jnp.ones((m, k)), jnp.ones((k, n))) == 2 * m * n * k
    assert step_flops_source(matmul) == "jaxpr"


def test_jaxpr_flops_batched_dot_general():
    b, m, k, n = 3, 5, 7, 2
    bmm = lambda x, w: jnp.einsum("bmk,bkn->bmn", x, w)  # noqa: E731
    assert jaxpr_flops(bmm, _sds(b, m, k), _sds(b, k, n)) == 2 * b * m * n * k
    # Two contracting dims and a batch dim that is not leading: out [b, m, n], K = 4 * 6.
    dims = (((1, 3), (2, 0)), ((2,), (1,)))
    general = lambda x, w: jax.lax.dot_general(x, w, dims)  # noqa: E731
    flops = jaxpr_flops(general, _sds(m, 4, b, 6), _sds(6, b, 4, n))
    assert flops == 2 * (b * m * n) * (4 * 6)


def _conv(x, w, groups=1, padding="VALID"):
    return jax.lax.conv_general_dilated(
        x,
        w,
        (1, 1),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


@pytest.mark.parametrize("groups", [1, 4])
def test_jaxpr_flops_conv_matches_formula_and_xla(groups):
    n, h, w_, c, o, kh, kw = 2, 16, 16, 8, 12, 3, 3
    x, w = _sds(n, h, w_, c), _sds(kh, kw, c // groups, o)
    out = (h - kh + 1) * (w_ - kw + 1) * n * o  # VALID: output elements
    expected = 2 * out * (kh * kw * c // groups)
    conv = jax.jit(lambda x, w: _conv(x, w, groups))
    assert jaxpr_flops(conv, x, w) == expected
    if jax.default_backend() == "cpu":  # XLA:CPU counts convolutions exactly
        xla = _flops_from_cost(conv.lower(x, w).compile().cost_analysis())
        assert xla == pytest.approx(expected, rel=0.05)


def test_jaxpr_flops_scan_counts_every_iteration():
    k = 5

    def body(c, _):
        return c @ c, None

    scanned = jax.jit(lambda c: jax.lax.scan(body, c, None, length=k)[0])
    one = 2 * 16 * 16 * 16
    assert jaxpr_flops(scanned, _sds(16, 16)) == k * one
    # XLA's cost analysis counts a loop body once; the jaxpr walk is what step_flops uses.
    assert step_flops(scanned, jnp.ones((16, 16))) == k * one


def test_jaxpr_flops_cond_takes_the_costliest_branch_and_while_one_body():
    big, small = 2 * 8 * 8 * 8, 2 * 8 * 8 * 1
    pick = lambda p, x, v: jax.lax.cond(p, lambda: (x @ x).sum(), lambda: (x @ v).sum())  # noqa: E731
    assert jaxpr_flops(pick, _sds(dtype=jnp.bool_), _sds(8, 8), _sds(8, 1)) == big
    assert big != small
    loop = lambda x: jax.lax.while_loop(lambda c: c[0, 0] < 1e3, lambda c: c @ c, x)  # noqa: E731
    assert jaxpr_flops(loop, _sds(8, 8)) == big  # trip count unknown: one iteration


def test_jaxpr_flops_nested_calls_count_once_remat_recomputes():
    def f(x):
        return jax.jit(lambda y: y @ y)(x).sum()

    one = 2 * 4 * 4 * 4
    assert jaxpr_flops(f, _sds(4, 4)) == one
    # Gradient of y @ y w.r.t. y: two products (one per operand) plus the forward one.
    assert jaxpr_flops(jax.grad(f), _sds(4, 4)) == 3 * one
    # A rematerialised forward appears, and is counted, in the backward pass again (the
    # backward needs cos(y @ y), so the product is recomputed there: 3 becomes 4).
    plain = lambda x: jnp.sin(x @ x).sum()  # noqa: E731
    remat = lambda x: jax.checkpoint(lambda y: jnp.sin(y @ y))(x).sum()  # noqa: E731
    assert jaxpr_flops(jax.grad(plain), _sds(4, 4)) == 3 * one
    assert jaxpr_flops(jax.grad(remat), _sds(4, 4)) == 4 * one


def _mlp_step(precision=None, bias=True):
    import optax

    import jaxtrain as jt

    def loss(p, batch):
        h = batch["x"] @ p["w1"] + (p["b1"] if bias else 0.0)
        out = jax.nn.relu(h) @ p["w2"]
        return jnp.mean((out - batch["y"]) ** 2)

    params = {"w1": jnp.ones((64, 32)) * 0.01, "w2": jnp.ones((32, 10)) * 0.01}
    if bias:
        params["b1"] = jnp.zeros(32)
    opt = optax.adam(1e-3)
    step = jt.make_train_step(loss, opt, precision=precision)
    state = jt.TrainState.create(params, opt, jax.random.key(0))
    batch = {"x": jnp.ones((16, 64)), "y": jnp.zeros((16, 10))}
    return step, state, batch


def test_mlp_train_step_flops_exact():
    step, state, batch = _mlp_step()
    first, second = 2 * 16 * 64 * 32, 2 * 16 * 32 * 10
    forward = first + second
    flops = step_flops(step, state, batch)
    assert step_flops_source(step) == "jaxpr"
    assert 2 * forward <= flops <= 4 * forward
    # Backward: both weight gradients and the hidden activations' gradient (not the
    # input's, which nothing asks for): 3x forward less the first layer's input product.
    # Adam, relu, the bias and the loss are elementwise: not counted.
    assert flops == 3 * forward - first


def test_linear_train_step_is_exactly_twice_forward():
    import optax

    import jaxtrain as jt
    from jaxtrain.apps.tasks import classification_loss

    model = jt.from_function(lambda p, x: x.reshape(x.shape[0], -1) @ p["w"])
    opt = optax.sgd(0.1)
    step = jt.make_train_step(classification_loss(model), opt)
    state = jt.TrainState.create({"w": jnp.zeros((64, 10))}, opt, 0)
    batch = {"x": jnp.ones((32, 8, 8, 1)), "y": jnp.zeros((32,), jnp.int32), "mask": jnp.ones(32)}
    # Forward x @ w and the weight gradient x.T @ g; no input gradient (x is data).
    assert step_flops(step, state, batch) == 2 * (2 * 32 * 64 * 10)


def test_bfloat16_step_counts_the_same_as_float32():
    f32 = step_flops(*_mlp_step())
    bf16_step, state, batch = _mlp_step("bfloat16")
    assert step_flops(bf16_step, state, batch) == f32
    assert step_flops_source(bf16_step) == "jaxpr"


def test_jaxpr_flops_leaves_trace_count_unchanged():
    step, state, batch = _mlp_step()
    expected = jaxpr_flops(step, state, batch)  # before any call: the call reuses the trace
    assert step.trace_count == 1
    state, _ = step(state, batch)
    assert step.trace_count == 1
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (state, batch))
    assert jaxpr_flops(step, *abstract) == expected
    assert step_flops(step, state, batch) == expected
    state, _ = step(state, batch)  # still the one compiled program
    assert step.trace_count == 1


def test_step_without_matmuls_falls_back_to_xla_and_says_so():
    elementwise = jax.jit(lambda x: jnp.sin(x) * 2.0)
    assert jaxpr_flops(elementwise, _sds(32)) == 0.0
    flops = step_flops(elementwise, jnp.ones(32))
    assert flops is not None and flops > 0  # XLA's elementwise count, on CPU
    assert step_flops_source(elementwise) == (
        "xla-lowered: the jaxpr has no matrix product or convolution"
    )
