"""`compare` on the models PyTorch users bring: BatchNorm (Sequential and fx), dropout
refused, the user's constructors with clipping and parameter groups; the float64
learning-rate metric; fx conversion of in-place operations and tensor attributes; the
`jaxtrain compare` usage errors.

Tolerances: the float32 parity targets of `jaxtrain.contrast.runner` (1e-5 relative loss
over the first 10 steps, 1e-4 on the final parameters) and, for BatchNorm's running
statistics, 1e-6 absolute (float32) / 1e-12 (float64); the float64 learning rate equals
PyTorch's to 1e-15 relative (float32 rounding of the metric was ~5e-8).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jaxtrain as jt
from jaxtrain.apps.cli import main
from jaxtrain.contrast import (
    FxConverted,
    OptimizerSpec,
    compare,
    from_torch,
    from_torch_fx,
    spec_from_torch,
)

torch.set_num_threads(1)
RNG = np.random.default_rng(0)
DATA = {
    "x": RNG.normal(size=(64, 4)).astype(np.float32),  # [N, F]
    "y": RNG.integers(0, 3, 64).astype(np.int32),  # [N]
}


def _bn_sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


class Residual(nn.Module):
    """BatchNorm1d after Linear, a module attribute, an in-place add, cat on dim 1."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(8, 3)
        self.scale = 0.5
        self.p = dropout

    def forward(self, x):
        h = F.relu(self.bn(self.fc(x)), inplace=True) * self.scale
        h += x
        h = F.dropout(h, self.p, self.training)
        return self.out(torch.cat([x, h], dim=1))


def _residual(dropout=0.0):
    torch.manual_seed(0)
    return Residual(dropout)


# ---------------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float64", 1e-12)])
def test_compare_batchnorm_sequential_in_train_mode_stats_agree(dtype, tol):
    """An eval-mode BatchNorm model: both sides train (batch statistics), the running
    statistics agree at the end, the model's mode is restored."""
    net = _bn_sequential().eval()
    c = compare(
        net,
        OptimizerSpec("adam", lr=1e-2),
        DATA,
        input_shape=(4,),
        steps=6,
        batch_size=16,
        dtype=dtype,
    )
    s = c.summary()
    assert s["meets_targets"], s
    assert s["final_state_max_abs_diff"] is not None and s["final_state_max_abs_diff"] <= tol
    assert int(net[1].num_batches_tracked) == 6  # PyTorch trained in train() mode
    assert not net.training and not net[1].training  # restored


def test_compare_fx_batchnorm_model_with_user_constructor_and_clip_norm():
    """An fx-converted model (BatchNorm, self.scale, +=, cat) with a torch.optim
    constructor and clip_norm=: parity, running statistics, and clipping on both sides."""
    net = _residual()
    assert isinstance(from_torch(net, (4,)), FxConverted)
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    c = compare(net, sgd, DATA, input_shape=(4,), steps=6, batch_size=16, clip_norm=0.05)
    s = c.summary()
    assert s["meets_targets"], s
    assert s["final_state_max_abs_diff"] <= 1e-6
    assert np.all(c.torch_grad_norm > 0.05)  # clipping was active every step
    unclipped = compare(_residual(), sgd, DATA, input_shape=(4,), steps=6, batch_size=16)
    assert abs(unclipped.torch_loss[-1] - c.torch_loss[-1]) > 1e-3  # ... and changed the run


def test_compare_clip_norm_next_to_a_spec_is_refused():
    with pytest.raises(
        ValueError,
        match=r"clip_norm=1.0 goes with a torch.optim constructor.*"
        r"OptimizerSpec\(\.\.\., clip_norm=1.0\)",
    ):
        compare(
            _bn_sequential(),
            OptimizerSpec("sgd", lr=0.1),
            DATA,
            input_shape=(4,),
            steps=1,
            batch_size=16,
            clip_norm=1.0,
        )


# ---------------------------------------------------------------------------- dropout


def test_compare_refuses_dropout_layers_by_name():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    with pytest.raises(
        ValueError,
        match=r"layer '1' is Dropout\(p=0.5\).*different random "
        r"masks.*Fix: compare with p=0 \(model.get_submodule\('1'\).p = 0.0\)",
    ):
        compare(net, OptimizerSpec("sgd", lr=0.1), DATA, input_shape=(4,), steps=1, batch_size=16)
    net[1].p = 0.0  # the fix the message names
    c = compare(net, OptimizerSpec("sgd", lr=0.1), DATA, input_shape=(4,), steps=2, batch_size=16)
    assert c.summary()["meets_targets"]


def test_compare_refuses_functional_dropout_in_forward():
    with pytest.raises(
        ValueError,
        match=r"forward calls F.dropout\(p=0.3\).*Fix: compare "
        r"with p=0",
    ):
        compare(
            _residual(0.3),
            OptimizerSpec("sgd", lr=0.1),
            DATA,
            input_shape=(4,),
            steps=1,
            batch_size=16,
        )


# ---------------------------------------------------------------------------- float64 lr


def test_learning_rate_metric_keeps_a_float64_schedule():
    """Under x64 the metric is the schedule's float64 value (it was cast to float32);
    a float32 schedule, and any schedule without x64, still reports float32."""
    model = jt.from_function(lambda p, x: x @ p["w"])
    batch = {"x": jnp.ones((2, 3)), "y": jnp.array([0, 1])}
    from jaxtrain.apps.tasks import classification_loss

    lr = 0.1 + 1e-12  # not representable in float32
    with jax.enable_x64(True):
        opt = optax.sgd(lr)
        state = jt.TrainState.create({"w": jnp.zeros((3, 2))}, opt, 0)
        step = jt.make_train_step(
            classification_loss(model), opt, learning_rate_fn=lambda s: jnp.float64(lr)
        )
        _, metrics = step(state, batch)
        assert metrics["learning_rate"].dtype == jnp.float64
        assert float(metrics["learning_rate"]) == lr
    state = jt.TrainState.create({"w": jnp.zeros((3, 2))}, optax.sgd(0.1), 0)
    step = jt.make_train_step(
        classification_loss(model), optax.sgd(0.1), learning_rate_fn=lambda s: 0.1
    )
    assert step(state, batch)[1]["learning_rate"].dtype == jnp.float32


def test_compare_float64_learning_rates_match_torch_exactly():
    """A warmup + cosine schedule in float64: jax_lr is PyTorch's lr to 1e-15."""
    spec = OptimizerSpec("adamw", lr=2e-3, schedule="cosine", warmup_steps=3, total_steps=12)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    c = compare(net, spec, DATA, input_shape=(4,), steps=12, batch_size=16, dtype="float64")
    rel = np.abs(c.jax_lr - c.torch_lr) / c.torch_lr
    assert rel.max() <= 1e-15, rel


# ---------------------------------------------------------------------------- parameter groups


def _two_groups_on_real_params(params):
    """No weight decay on 1-D parameters: one group on spec_from_torch's 2-D dummy, two on
    a real model."""
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=0.1, weight_decay=1e-2)


def test_parameter_groups_are_refused_not_mapped_by_their_first_group():
    def groups(params):
        params = list(params)
        return torch.optim.SGD(
            [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}],
            lr=0.1,
            weight_decay=1e-2,
        )

    with pytest.raises(
        ValueError,
        match=r"SGD has 2 parameter groups \(settings that differ: "
        r"weight_decay\).*decay_1d=False",
    ):
        spec_from_torch(groups)
    with pytest.raises(ValueError, match=r"SGD has 2 parameter groups"):
        compare(
            _bn_sequential(),
            _two_groups_on_real_params,
            DATA,
            input_shape=(4,),
            steps=1,
            batch_size=16,
        )


def test_constructor_with_bound_parameters_says_why():
    net = _bn_sequential()
    with pytest.raises(
        TypeError,
        match=r"receives the parameters when it is called, so they "
        r"must not be bound",
    ):
        spec_from_torch(functools.partial(torch.optim.SGD, net.parameters(), lr=0.1))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"momentum": float("nan")}, "momentum"),
        ({"dampening": float("inf")}, "dampening"),
        ({"schedule": "step", "step_size": 2, "gamma": float("nan")}, "gamma"),
    ],
)
def test_spec_refuses_nan_and_inf(kwargs, field):
    with pytest.raises(ValueError, match=rf"OptimizerSpec.{field} must be .*finite number"):
        OptimizerSpec("sgd", lr=0.1, **kwargs)


# ---------------------------------------------------------------------------- fx conversion


class ReadAfterInplace(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.fc, self.act, self.functional = nn.Linear(3, 3), nn.ReLU(inplace=True), functional

    def forward(self, x):
        y = self.fc(x)
        if self.functional:
            F.relu(y, inplace=True)
        else:
            self.act(y)
        return y + 1  # PyTorch reads the overwritten y here


@pytest.mark.parametrize("functional", [False, True])
def test_fx_refuses_an_inplace_result_read_through_the_old_name(functional):
    """It converted silently and differed from PyTorch by ~1.5."""
    with pytest.raises(
        ValueError,
        match=r"test_contrast_compare.py:\d+ \(in forward\).*"
        r"overwrites 'fc' in place, and 'add' reads 'fc' afterwards.*Fix: assign",
    ):
        from_torch_fx(ReadAfterInplace(functional), (3,))


class InplaceAssigned(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("shift", torch.full((3,), 0.25))
        self.weights = torch.tensor([1.0, -2.0, 3.0])  # a plain tensor attribute

    def forward(self, x):
        y = self.fc(x).relu_()
        y = y.add_(x)
        y = torch.sigmoid_(y)
        return y * self.weights + self.shift


def test_fx_inplace_methods_assigned_and_tensor_attributes_convert():
    torch.manual_seed(0)
    net = InplaceAssigned()
    conv = from_torch_fx(net, (3,))
    x = torch.randn(4, 3)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(np.asarray(conv.apply(conv.params, x)), want, atol=1e-6)
    assert sorted(conv.state_dict(conv.params)) == ["fc.bias", "fc.weight", "shift"]


# ---------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "100000"], r"--batch-size 100000 is larger than the digits"),
        (["--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*63\); got -1"),
        (["--out", "FILE"], r"--out '.*FILE' is not a usable directory"),
    ],
)
def test_compare_cli_usage_errors_are_one_line(args, message, tmp_path, capsys):
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    argv = ["compare", "--x64", "--steps", "2", "--out", str(tmp_path / "o"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("jaxtrain compare: error: ")
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compare_an_embedding_model_keeps_token_ids_integer(dtype):
    """Token ids were cast to the comparison's float dtype, which PyTorch's Embedding
    refuses (RuntimeError: Expected tensor for argument #1 'indices' ...)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    ids = np.random.default_rng(1).integers(0, 10, (64, 3)).astype(np.int32)  # [N, T]
    data = {"x": ids, "y": DATA["y"]}
    c = compare(
        net,
        OptimizerSpec("sgd", lr=0.1),
        data,
        input_shape=(3,),
        steps=3,
        batch_size=16,
        dtype=dtype,
    )
    assert c.summary()["meets_targets"], c.summary()


def test_compare_refuses_frozen_parameters_by_name():
    """PyTorch skips a requires_grad=False parameter; the JAX side trained it (the runs
    parted: 6 SGD steps, final parameters 5e-2 apart, losses 2e-2)."""
    net = _bn_sequential()
    net[0].weight.requires_grad_(False)
    with pytest.raises(
        ValueError,
        match=r"1 parameter\(s\) have requires_grad=False \(first: "
        r"'0.weight'\).*Fix: compare with every parameter trainable",
    ):
        compare(net, OptimizerSpec("sgd", lr=0.1), DATA, input_shape=(4,), steps=1, batch_size=16)


class TrainingBranch(nn.Module):
    """``if self.training:``, fixed by fx when traced."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if self.training:
            x = x * 2.0
        return self.fc(x)


def test_compare_traces_an_eval_mode_model_in_train_mode():
    """compare trains PyTorch in train() mode; the graph was traced in the mode the model
    came in, so an eval-mode model took the other branch on the JAX side (losses apart)."""
    torch.manual_seed(0)
    net = TrainingBranch().eval()
    c = compare(net, OptimizerSpec("sgd", lr=0.1), DATA, input_shape=(4,), steps=3, batch_size=16)
    assert c.summary()["meets_targets"], c.summary()
    assert not net.training
