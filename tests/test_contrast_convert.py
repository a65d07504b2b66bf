"""PyTorch nn.Sequential -> Flax: every layer's output matches, weights round-trip, errors
name the layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import jaxtrain as jt
from jaxtrain.contrast import from_torch, nchw_to_nhwc, torch_twin


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    """float32 matmuls at full precision here, without changing other test modules."""
    with jax.default_matmul_precision("highest"):
        yield


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random LayerNorm affine parameters too (their defaults 1 and 0 would hide a bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


MODELS = {
    # conv (strided, rectangular, 'valid'), GELU (exact), max-pool with padding, flatten,
    # LayerNorm after the flatten (its scale/bias need the flatten permutation), Linear.
    "conv_stack": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(8, 6, (3, 2), stride=2, padding="valid"),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1, padding=1),
            nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.LayerNorm(180)),
            nn.Linear(180, 7),
            nn.GELU(approximate="tanh"),
            nn.Linear(7, 4),
        ),
        (3, 10, 11),
    ),
    # grouped, dilated, 'same' conv; Dropout in eval mode; bias-free layers.
    "grouped": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 8, 3, padding="same", dilation=2, groups=2, bias=False),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 3 * 3, 5, bias=False),
        ),
        (4, 6, 7),
    ),
    # a Flatten whose output is the model's output: flattened in PyTorch's (c, h, w) order.
    "flatten_last": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten()), (2, 5, 5)),
    "mlp": (
        lambda: nn.Sequential(
            nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3), nn.Tanh()
        ),
        (12,),
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layer_output_matches(name):
    """Converting each prefix of the model gives that layer's output to ~1e-6."""
    build, shape = MODELS[name]
    model = _randomize(build())
    layers = list(model.children())
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    for k in range(1, len(layers) + 1):
        prefix = nn.Sequential(*layers[:k]).eval()
        conv = from_torch(prefix, shape)
        want = nchw_to_nhwc(prefix(x))
        got = np.asarray(conv.apply(conv.params, x))
        assert got.shape == want.shape, (name, k)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(
            got, want, rtol=0, atol=2e-6 * scale, err_msg=f"{name} layer {k}"
        )


def test_conversion_transposes_kernels():
    model = nn.Sequential(nn.Conv2d(3, 5, (2, 4)), nn.Flatten(), nn.Linear(5 * 3 * 1, 2))
    conv = from_torch(model, (3, 4, 4))
    w = model[0].weight.detach().numpy()  # OIHW [5, 3, 2, 4]
    np.testing.assert_array_equal(conv.params["Conv_0"]["kernel"], w.transpose(2, 3, 1, 0))
    assert conv.params["Dense_0"]["kernel"].shape == (15, 2)  # [out, in] -> [in, out]
    assert conv.names == {"Conv_0": "0", "Dense_0": "2"}


def test_flatten_permutation_is_not_the_identity():
    """With C > 1, NHWC and NCHW flatten orders differ, so the Linear rows are permuted."""
    model = _randomize(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(8, 1)))
    conv = from_torch(model, (1, 2, 2))
    kernel = np.asarray(conv.params["Dense_0"]["kernel"])[:, 0]
    w = model[2].weight.detach().numpy()[0]  # torch order (c, h, w)
    assert not np.array_equal(kernel, w)
    np.testing.assert_array_equal(kernel, w.reshape(2, 2, 2).transpose(1, 2, 0).ravel())


def test_params_round_trip_into_torch():
    model = _randomize(MODELS["conv_stack"][0]())
    conv = from_torch(model, (3, 10, 11))
    other = _randomize(MODELS["conv_stack"][0](), seed=5)
    conv.load_into(other, conv.params)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    back = conv.params_from(other)
    jax.tree.map(np.testing.assert_array_equal, back, conv.params)


@pytest.mark.parametrize(
    "module", [jt.models.MLP(hidden=(16, 8)), jt.models.CNN(channels=(4, 8), dense=16, dropout=0.0)]
)
def test_torch_twin_fits_the_builtin_model(module):
    twin = torch_twin(module, (1, 8, 8)).eval()
    conv = from_torch(twin, (1, 8, 8))
    own = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    assert jax.tree.structure(own) == jax.tree.structure(conv.params)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    got = np.asarray(module.apply({"params": conv.params}, nchw_to_nhwc(x)))
    np.testing.assert_allclose(got, twin(x).detach().numpy(), rtol=0, atol=2e-6)
    # and the other way: JAX-initialised weights loaded into the twin
    conv.load_into(twin, own)
    got = np.asarray(module.apply({"params": own}, nchw_to_nhwc(x)))
    np.testing.assert_allclose(got, twin(x).detach().numpy(), rtol=0, atol=2e-6)


def test_unsupported_layer_is_named():
    # (issue 15: BatchNorm2d, the layer this test used, converts now; Upsample does not.)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), nn.Upsample(scale_factor=2)))
    with pytest.raises(
        ValueError, match=r"layer '1\.1' \(Upsample.*Upsample is not supported"
    ) as e:
        from_torch(model, (1, 5, 5))
    assert "Supported layers: Linear, Conv1d, Conv2d" in str(e.value)


def test_dropout_in_training_mode_converts():
    """(issue 15: no longer refused.) Dropout follows train=: the identity without it."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2))  # train mode by default
    conv = from_torch(model, (3,))
    x = np.ones((4, 3), np.float32)
    np.testing.assert_allclose(
        conv.apply(conv.params, x), model.eval()(torch.from_numpy(x)).detach()
    )


def test_linear_on_images_needs_a_flatten():
    with pytest.raises(
        ValueError, match=r"Linear receives a 4-D input of shape \[1, 2, 4, 4\].*nn\.Flatten\(\)"
    ):
        from_torch(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Linear(4, 3)), (1, 4, 4))


def test_custom_module_converts_through_fx():
    """(issue 15: no longer refused.) A forward of its own goes through torch.fx."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) * 2

    net = Net()
    conv = from_torch(net, (2,))
    x = np.ones((3, 2), np.float32)
    np.testing.assert_allclose(
        conv.apply(conv.params, x), net(torch.from_numpy(x)).detach(), rtol=0, atol=1e-6
    )


def test_unsupported_settings_are_named():
    with pytest.raises(ValueError, match=r"padding_mode='reflect'.*padding_mode='zeros'"):
        from_torch(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), (1, 4, 4))
    with pytest.raises(ValueError, match=r"ceil_mode=True"):
        from_torch(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), (1, 5, 5))
