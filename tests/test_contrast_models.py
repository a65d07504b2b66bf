"""PyTorch models -> JAX, part two: more layers, BatchNorm's train/eval and running stats,
any fx-traceable module (a ResNet written here), the state_dict round trip, .double().

Tolerances (float32, CPU, matmul precision "highest"): forward outputs within
``1e-6 * max(1, max |output|)`` of PyTorch (the per-layer table, both conversion paths);
running statistics after training steps within 1e-6; training parity within the targets of
`jaxtrain.contrast.runner` (1e-5 relative loss over the first 10 steps, 1e-4 over the run,
1e-4 on the final parameters). float64 (``.double()`` under JAX's x64): 1e-12. The state
dict round trip is bitwise.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import linen as fnn
from torch import nn

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_loss
from jaxtrain.contrast import from_torch, nhwc_to_nchw
from jaxtrain.contrast.convert import Converted
from jaxtrain.contrast.fx import FxConverted, from_torch_fx
from jaxtrain.contrast.runner import TARGET_ALL, TARGET_FIRST, TARGET_PARAMS
from jaxtrain.data import load_digits

torch.set_num_threads(1)
TOL = 1e-6


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    """float32 matmuls at full precision here, without changing other test modules."""
    with jax.default_matmul_precision("highest"):
        yield


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, running stats too (defaults 1 and 0 would hide a bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    return model


def _close(got, want, what, tol=TOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3g} > {tol * scale:.3g}"
    return diff / scale  # what the tolerance bounds: max |diff| / max(1, max |output|)


def _images(shape, seed=1, scale=1.0):
    return torch.randn(6, *shape, generator=torch.Generator().manual_seed(seed)) * scale


# name -> (build, input_shape, input maker). Every model is an nn.Sequential, converted
# both ways: the Flax Sequential (from_torch) and the fx function (from_torch_fx).
LAYERS = {
    "BatchNorm1d [B, F]": (
        lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh()),
        (6,),
        _images,
    ),
    "BatchNorm1d [B, C, L] momentum=None": (
        lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4, momentum=None)),
        (3, 10),
        _images,
    ),
    "BatchNorm2d": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        (2, 6, 5),
        _images,
    ),
    "BatchNorm2d affine=False eps=1e-3": (
        lambda: nn.Sequential(nn.BatchNorm2d(3, affine=False, eps=1e-3, momentum=0.3)),
        (3, 4, 4),
        _images,
    ),
    "BatchNorm2d track_running_stats=False": (
        lambda: nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)),
        (3, 4, 4),
        _images,
    ),
    "Conv1d stride/groups/dilation": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
            nn.Conv1d(6, 3, 2, padding="same", dilation=2, bias=False),
        ),
        (4, 11),
        _images,
    ),
    "Conv1d -> Flatten -> Linear": (
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 4)),
        (2, 8),
        _images,
    ),
    "Embedding padding_idx -> Linear [B, T, F]": (
        lambda: nn.Sequential(nn.Embedding(11, 6, padding_idx=0), nn.Linear(6, 4)),
        (7,),
        lambda shape, seed=1: torch.randint(
            0, 11, (6, *shape), generator=torch.Generator().manual_seed(seed)
        ),
    ),
    "AvgPool2d (count_include_pad)": (
        lambda: nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)),
        (2, 7, 6),
        _images,
    ),
    "AvgPool2d count_include_pad=False": (
        lambda: nn.Sequential(nn.AvgPool2d(2, padding=1, count_include_pad=False)),
        (2, 5, 6),
        _images,
    ),
    "AdaptiveAvgPool2d 1x1 -> Flatten -> Linear": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)
        ),
        (2, 7, 6),
        _images,
    ),
    "AdaptiveAvgPool2d (2, 3) -> Flatten": (
        lambda: nn.Sequential(nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(), nn.Linear(12, 2)),
        (2, 4, 6),
        _images,
    ),
    "GroupNorm": (
        lambda: nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.SiLU()),
        (2, 6, 6),
        _images,
    ),
    "SiLU Sigmoid LeakyReLU ELU ReLU6": (
        lambda: nn.Sequential(
            nn.Linear(5, 8),
            nn.SiLU(),
            nn.Linear(8, 8),
            nn.LeakyReLU(0.2),
            nn.Linear(8, 8),
            nn.ELU(0.7),
            nn.Linear(8, 8),
            nn.ReLU6(),
            nn.Linear(8, 3),
            nn.Sigmoid(),
        ),
        (5,),
        lambda shape, seed=1: _images(shape, seed, scale=4.0),
    ),
    "Softplus beta/threshold": (
        lambda: nn.Sequential(nn.Softplus(beta=2.0, threshold=5.0)),
        (8,),
        lambda shape, seed=1: _images(shape, seed, scale=4.0),
    ),
    "Softmax(dim=1) on images": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.Softmax(dim=1)),
        (2, 3, 4),
        _images,
    ),
    "LogSoftmax(dim=-1)": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.LogSoftmax(dim=-1)),
        (5,),
        _images,
    ),
    "Linear/LayerNorm/GELU on [B, T, F]": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)),
        (4, 5),
        _images,
    ),
    "Dropout(p=0) in train mode": (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.Linear(4, 2)),
        (4,),
        _images,
    ),
}

MEASURED: dict[str, float] = {}  # name -> max |diff|, for the docs table


def _outputs(conv, x, state, train):
    """The converted model's output and new state, in PyTorch's layout (tensor input)."""
    if isinstance(conv, Converted):
        y, new = conv.fn(conv.params, state, x, train=train, rng=jax.random.key(0))
        return nhwc_to_nchw(y), new
    xj = jnp.asarray(x.numpy())
    return conv.fn(conv.params, state, xj, train=train, rng=jax.random.key(0))


def _stats_of(conv, state):
    """``{torch buffer key: array}`` of a converted model state (either path)."""
    sd = conv.state_dict(conv.params, state)
    return {k: v.numpy() for k, v in sd.items() if "running" in k or "batches" in k}


@pytest.mark.parametrize("path", ["sequential", "fx"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_table(name, path):
    """Eval and train outputs within 1e-6 of PyTorch; BatchNorm buffers after 3 train passes."""
    build, shape, make = LAYERS[name]
    model = _randomize(build())
    convert = from_torch if path == "sequential" else from_torch_fx
    conv = convert(model, shape)
    assert isinstance(conv, Converted if path == "sequential" else FxConverted)
    x = make(shape)
    worst = 0.0
    with torch.no_grad():
        want = model.eval()(x)
    got, _ = _outputs(conv, x, conv.model_state, train=False)
    worst = max(worst, _close(got, want, f"{name} eval"))
    state = conv.model_state
    model.train()
    for step in range(3):  # train-mode forward passes: batch statistics, buffer updates
        xs = make(shape, seed=10 + step)
        with torch.no_grad():
            want = model(xs)
        got, state = _outputs(conv, xs, state, train=True)
        worst = max(worst, _close(got, want, f"{name} train pass {step}"))
    for key, value in _stats_of(conv, state).items():
        ref = model.state_dict()[key].numpy()
        if "batches" in key:
            assert int(value) == int(ref) == 3, key
        else:
            worst = max(worst, _close(value, ref, f"{name} {key}"))
    MEASURED[f"{name} ({path})"] = worst


def test_batchnorm_running_var_is_pytorchs_unbiased_one():
    """Flax's BatchNorm(momentum=0.9) matches the output but keeps the biased variance; the
    converted BatchNorm keeps PyTorch's unbiased one."""
    bn = _randomize(nn.BatchNorm1d(4))
    conv = from_torch(nn.Sequential(bn), (4,))
    x = _images((4,))
    state = conv.model_state
    for _ in range(2):
        _, state = conv.fn(conv.params, state, x, train=True)
        bn.train()(x)
    ours = np.asarray(state["batch_stats"]["BatchNorm_0"]["var"])
    np.testing.assert_allclose(ours, bn.running_var.numpy(), rtol=0, atol=1e-6)
    flax_bn = fnn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    variables = {
        "params": {
            "scale": conv.params["BatchNorm_0"]["scale"],
            "bias": conv.params["BatchNorm_0"]["bias"],
        },
        "batch_stats": {
            "mean": conv.model_state["batch_stats"]["BatchNorm_0"]["mean"],
            "var": conv.model_state["batch_stats"]["BatchNorm_0"]["var"],
        },
    }
    for _ in range(2):
        _, upd = flax_bn.apply(variables, jnp.asarray(x.numpy()), mutable=["batch_stats"])
        variables = {**variables, **upd}
    flax_var = np.asarray(variables["batch_stats"]["var"])
    assert np.abs(flax_var - bn.running_var.numpy()).max() > 1e-2  # n/(n-1) = 6/5 apart


def test_dropout_in_train_mode_agrees_in_expectation():
    """Different generators: the masks differ, the statistics agree (p=0.3, 60k units)."""
    drop = nn.Dropout(0.3)  # train mode, as built
    conv = from_torch(nn.Sequential(drop), (60000,))
    x = np.ones((1, 60000), np.float32)
    assert np.array_equal(conv.apply(conv.params, x), x)  # train=False: the identity
    y1 = np.asarray(conv.apply(conv.params, x, train=True, rng=jax.random.key(1)))
    y2 = np.asarray(conv.apply(conv.params, x, train=True, rng=jax.random.key(2)))
    t = drop(torch.from_numpy(x)).numpy()
    for y in (y1, y2, t):
        np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.7], rtol=1e-6)  # kept: scaled
        # fraction dropped ~ Binomial(60000, 0.3): 4.3 standard deviations is 0.008
        assert abs((y == 0).mean() - 0.3) < 0.008
        assert abs(y.mean() - 1.0) < 0.012
    assert not np.array_equal(y1, y2)
    fx = from_torch_fx(nn.Sequential(nn.Linear(3, 3), drop), (3,))
    with pytest.raises(ValueError, match=r"Dropout '1'\(p=0\.3\) in training needs a random key"):
        fx.fn(fx.params, fx.model_state, jnp.ones((2, 3)), train=True)  # rng=None


# ---------------------------------------------------------------------------- fx: a ResNet


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """A small ResNet: stem, two stages of residual blocks, two pooled heads concatenated."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = self.layer2(self.layer1(x))
        a = torch.flatten(self.pool(x), 1)
        b = x.mean(dim=(2, 3))
        return self.fc(torch.cat([a, b], dim=1).view(x.size(0), -1))


TRAIN, _ = load_digits()
BATCHES = list(jt.ArrayDataset(TRAIN, 32, seed=0, drop_remainder=True).batches(0))[:12]


def _xy(batch, dtype=torch.float32):
    x = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(batch["x"]))).to(dtype)
    return x, torch.from_numpy(batch["y"]).long()


def _resnet(seed=0):
    torch.manual_seed(seed)
    return ResNet()


def test_fx_resnet_forward_train_and_eval():
    model = _randomize(_resnet())
    conv = from_torch(model, (1, 8, 8))
    assert isinstance(conv, FxConverted)
    assert conv.params["layer2.0.shortcut.0"]["weight"].shape == (16, 8, 1, 1)  # OIHW kept
    x, _ = _xy(BATCHES[0])
    with torch.no_grad():
        want = model.eval()(x)
    MEASURED["fx ResNet eval"] = _close(conv.apply(conv.params, x), want, "eval")
    with torch.no_grad():
        want = model.train()(x)
    y, state = conv.fn(conv.params, conv.model_state, jnp.asarray(x.numpy()), train=True)
    # Ten layers deep, BatchNorm dividing by batch std: rounding compounds; 5e-6 here.
    MEASURED["fx ResNet train"] = _close(y, want, "train", tol=5e-6)
    for key, ref in model.state_dict().items():
        if "running" in key:
            path, _, name = key.rpartition(".")
            _close(state[path][name], ref.numpy(), key)


def test_sequential_with_a_custom_block_goes_through_fx():
    """An nn.Sequential holding a module with its own forward converts through fx."""
    model = _randomize(nn.Sequential(BasicBlock(2, 4, 2), nn.Flatten(), nn.Linear(36, 3)))
    conv = from_torch(model, (2, 6, 6))
    assert isinstance(conv, FxConverted)
    assert sorted(conv.params) == [
        "0.bn1",
        "0.bn2",
        "0.conv1",
        "0.conv2",
        "0.shortcut.0",
        "0.shortcut.1",
        "2",
    ]
    x = _images((2, 6, 6))
    with torch.no_grad():
        want = model.eval()(x)
    _close(conv.apply(conv.params, x), want, "eval")


class ScaledLinear(nn.Linear):
    """A subclass of a built-in layer: fx traces through it (to F.linear)."""

    def forward(self, x):
        return super().forward(x) * 2


class TanhConv(nn.Conv2d):
    def forward(self, x):
        return torch.tanh(super().forward(x))  # F.conv2d inside


def test_subclassed_layers_trace_to_functional_calls():
    model = _randomize(
        nn.Sequential(
            TanhConv(2, 3, 3, padding="same", dilation=2), nn.Flatten(), ScaledLinear(75, 4)
        )
    )
    conv = from_torch(model, (2, 5, 5))
    assert isinstance(conv, FxConverted)
    x = _images((2, 5, 5))
    with torch.no_grad():
        want = model(x)
    _close(conv.apply(conv.params, x), want, "F.conv2d / F.linear")


def _train_both(model, conv, steps, lr=1e-3):
    """Adam in PyTorch and jaxtrain from the same weights on the same batches."""
    jax_model = conv.model()
    params, model_state = jax_model.init(None, None)
    state = jt.TrainState.create(params, optax.adam(lr), 0, model_state=model_state)
    train_step = jt.make_train_step(classification_loss(jax_model), optax.adam(lr))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    torch_loss, jax_loss = [], []
    for batch in BATCHES[:steps]:
        x, y = _xy(batch)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        torch_loss.append(loss.item())
        state, metrics = train_step(state, batch)
        jax_loss.append(float(metrics["loss"]))
    assert train_step.trace_count == 1
    return np.array(torch_loss), np.array(jax_loss), state


def _param_diff(conv, model, state):
    return max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(
            jax.tree.leaves(conv.params_from(model)), jax.tree.leaves(state.params), strict=True
        )
    )


def test_fx_resnet_trains_like_pytorch():
    model = _resnet()
    conv = from_torch(model, (1, 8, 8))
    tl, jl, state = _train_both(model, conv, steps=8)
    rel = np.abs(tl - jl) / tl
    MEASURED["fx ResNet 8 Adam steps, loss rel"] = float(rel.max())
    assert rel.max() <= TARGET_FIRST, rel
    assert tl[-1] < tl[0]
    assert _param_diff(conv, model, state) <= TARGET_PARAMS
    for key, ref in model.state_dict().items():  # running stats after 8 steps
        path, _, name = key.rpartition(".")
        if "running" in key:
            _close(state.model_state[path][name], ref.numpy(), key)
        elif "batches" in key:
            assert int(state.model_state[path][name]) == int(ref) == 8


def test_sequential_batchnorm_model_trains_like_pytorch():
    """A smooth CNN with BatchNorm2d/1d: the parity targets over 12 steps, running stats too.

    No bias before a BatchNorm (the usual practice): BatchNorm subtracts the mean, so such a
    bias has a zero gradient up to rounding noise, which Adam scales to lr-sized steps of
    random sign in either framework (measured: those biases 8e-3 apart after 12 steps,
    every other parameter within 1e-5; docs/pytorch-models.md).
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(256, 32, bias=False),
        nn.BatchNorm1d(32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )
    conv = from_torch(model, (1, 8, 8))
    # Converted.model() initialises afresh; train from the converted weights instead.
    jax_model = conv.model()
    state = jt.TrainState.create(conv.params, optax.adam(1e-3), 0, model_state=conv.model_state)
    train_step = jt.make_train_step(classification_loss(jax_model), optax.adam(1e-3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tl, jl = [], []
    for batch in BATCHES:
        x, y = _xy(batch)
        opt.zero_grad()
        loss = F.cross_entropy(model.train()(x), y)
        loss.backward()
        opt.step()
        tl.append(float(loss))
        state, metrics = train_step(state, batch)
        jl.append(float(metrics["loss"]))
    rel = np.abs(np.array(tl) - np.array(jl)) / np.array(tl)
    MEASURED["Sequential BatchNorm CNN 12 Adam steps, loss rel"] = float(rel.max())
    assert rel[:10].max() <= TARGET_FIRST and rel.max() <= TARGET_ALL, rel
    assert _param_diff(conv, model, state) <= TARGET_PARAMS
    for key, value in _stats_of(conv, state.model_state).items():
        if "batches" in key:
            assert int(value) == len(BATCHES)
        else:
            _close(value, model.state_dict()[key].numpy(), key)


# ---------------------------------------------------------------------------- state dict


@pytest.mark.parametrize("kind", ["sequential", "fx"])
def test_state_dict_round_trip(kind):
    """JAX params (+ model_state) -> a state dict the original module loads (strict):
    bitwise weights back, the same outputs in PyTorch and JAX."""

    def build(seed):
        if kind == "fx":
            return _resnet(seed)
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)
        )

    shape = (1, 8, 8)
    model = _randomize(build(0))
    conv = from_torch(model, shape)
    # "Trained" weights and statistics: anything but the originals.
    params = jax.tree.map(lambda a: a * 1.5 + 0.25, conv.params)
    _, state = conv.fn(params, conv.model_state, _images(shape).numpy(), train=True)
    sd = conv.state_dict(params, state)
    assert list(sd) == list(model.state_dict())  # every key, the module's order
    fresh = build(3)
    fresh.load_state_dict(sd)  # strict
    back = conv.params_from(fresh)
    jax.tree.map(np.testing.assert_array_equal, back, params)  # bitwise
    x = _images(shape)
    with torch.no_grad():
        want = fresh.eval()(x)
    _close(conv.apply(params, x, model_state=state), want, "outputs after the round trip")


def test_state_dict_without_model_state_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    conv = from_torch(model, (3,))
    with pytest.raises(
        ValueError, match=r"no value for the state-dict keys \['1\.running_mean', .*model_state"
    ):
        conv.state_dict(conv.params, {})
    with pytest.raises(ValueError, match=r"key '0\.weight': value of shape \[3, 5\].*\[4, 3\]"):
        conv.state_dict(
            {**conv.params, "Dense_0": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(4)}}
        )


# ---------------------------------------------------------------------------- float64


def test_double_model_converts_under_x64():
    seq = _randomize(
        nn.Sequential(
            nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(108, 4)
        )
    ).double()
    res = _randomize(_resnet()).double()
    with pytest.raises(
        ValueError, match=r"float64 \(model\.double\(\)\), but JAX's x64 mode is off"
    ):
        from_torch(seq, (1, 8, 8))
    with jax.enable_x64(True):
        for model in (seq, res):
            conv = from_torch(model, (1, 8, 8))
            assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(conv.params))
            x = _images((1, 8, 8)).double()
            for train in (False, True):
                with torch.no_grad():
                    want = model.train(train)(x)
                got = conv.apply(conv.params, x, train=train)
                assert np.asarray(got).dtype == np.float64
                MEASURED[f"{type(model).__name__} .double() train={train}"] = _close(
                    nhwc_to_nchw(got) if isinstance(conv, Converted) else got, want, "x64", 1e-12
                )
            sd = conv.state_dict(conv.params)
            assert sd[next(iter(sd))].dtype == torch.float64


# ---------------------------------------------------------------------------- errors


def _line_of(text, obj):
    lines, start = inspect.getsourcelines(obj)
    return start + next(i for i, line in enumerate(lines) if text in line)


class Sorts(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return torch.sort(y, dim=1).values


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0] * 2


class Cumsum(nn.Module):
    def forward(self, x):
        return x.cumsum(1)


def test_unsupported_nodes_name_the_node_and_source_line():
    line = _line_of("torch.sort(", Sorts)
    with pytest.raises(
        ValueError,
        match=rf"cannot convert node 'sort' \(call_function torch.sort\) at "
        rf".*test_contrast_models.py:{line} \(in forward\): return torch.sort\(y, dim=1\)"
        rf".*this function is not supported.*Fix: rewrite it",
    ):
        from_torch(Sorts(), (4,))
    line = _line_of("self.rnn(x)", Recurrent)
    with pytest.raises(
        ValueError,
        match=rf"node 'rnn' \(call_module rnn: GRU\) at .*:{line} .*GRU is not supported.*"
        r"Fix: replace it by supported layers \(Linear, Conv1d",
    ):
        from_torch(Recurrent(), (3, 4))
    with pytest.raises(
        ValueError, match=r"node 'cumsum' \(call_method cumsum\).*\.cumsum\(\) is not supported"
    ):
        from_torch(Cumsum(), (4,))


def test_unsupported_settings_are_named():
    with pytest.raises(ValueError, match=r"AdaptiveAvgPool2d to \[3, 3\] from \[8, 8\].*divisor"):
        from_torch(nn.Sequential(nn.AdaptiveAvgPool2d(3)), (2, 8, 8))

    class Pool(nn.Module):
        def forward(self, x):
            return F.adaptive_avg_pool2d(x, 3)

    with pytest.raises(
        ValueError,
        match=r"node 'adaptive_avg_pool2d' .*output size \[3, 3\] from spatial size \[8, 8\]",
    ):
        from_torch(Pool(), (2, 8, 8))
    with pytest.raises(ValueError, match=r"Embedding.*max_norm=1\.0.*Fix: use max_norm=None"):
        from_torch(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), (4,))
    with pytest.raises(ValueError, match=r"Softmax\(dim=None\).*give dim explicitly"):
        from_torch(nn.Sequential(nn.Softmax()), (4,))
    with pytest.raises(ValueError, match=r"AvgPool2d.*ceil_mode=True.*ceil_mode=False"):
        from_torch(nn.Sequential(nn.AvgPool2d(2, ceil_mode=True)), (1, 5, 5))
    with pytest.raises(ValueError, match=r"BatchNorm2d receives a 2-D input of shape \[1, 4\]"):
        from_torch(nn.Sequential(nn.BatchNorm2d(4)), (4,))


def test_converting_leaves_the_torch_model_untouched():
    """Shape tracing runs BatchNorm in eval mode: no running-stat update, mode restored."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from_torch(model, (3,))
    from_torch_fx(model, (3,))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_measured_table(capsys):
    """Prints the measured maxima (the docs table); runs last in this module."""
    with capsys.disabled():
        for name, diff in MEASURED.items():
            print(f"MEASURED | {name} | {diff:.1e} |")
