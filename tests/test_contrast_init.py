"""param_init="torch": jaxtrain's MLP and CNN drawn from PyTorch's default distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

import jaxtrain as jt
from jaxtrain.contrast import from_torch, torch_twin

X = jnp.zeros((1, 8, 8, 1))
MODULES = {
    "mlp": lambda init: jt.models.MLP(hidden=(256, 128), param_init=init),
    "cnn": lambda init: jt.models.CNN(channels=(16, 32), dense=128, dropout=0.0, param_init=init),
}


def _fan_in(kernel: np.ndarray) -> int:
    return int(np.prod(kernel.shape[:-1]))  # [in, out] or [kh, kw, in, out]


def _torch_params(name: str, seed: int) -> dict:
    """PyTorch's default initialisation of the twin, in the Flax layout."""
    torch.manual_seed(seed)
    twin = torch_twin(MODULES[name]("flax"), (1, 8, 8))
    return from_torch(twin, (1, 8, 8)).params


@pytest.mark.parametrize("name", sorted(MODULES))
def test_torch_init_has_pytorch_bounds_and_variance(name):
    params = MODULES[name]("torch").init(jax.random.key(0), X)["params"]
    for layer, p in params.items():
        bound = _fan_in(np.asarray(p["kernel"])) ** -0.5
        for leaf in ("kernel", "bias"):
            w = np.asarray(p[leaf]).ravel()
            assert np.abs(w).max() <= bound, (layer, leaf)
            if w.size >= 4000:  # the uniform's edge is reached and its variance is b²/3
                assert np.abs(w).max() >= 0.99 * bound, (layer, leaf)
                assert abs(w.var() / (bound**2 / 3) - 1) < 0.08, (layer, leaf, w.var())
            if leaf == "bias":
                assert np.abs(w).max() > 0.5 * bound, (layer, "bias must not be zero-init")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_torch_init_matches_pytorch_samples(name):
    """Two-sample Kolmogorov-Smirnov test per leaf against PyTorch's own initialisation;
    the Flax default (lecun_normal kernels, zero biases) is rejected by the same test."""
    ours = MODULES[name]("torch").init(jax.random.key(0), X)["params"]
    flax_default = MODULES[name]("flax").init(jax.random.key(0), X)["params"]
    theirs = _torch_params(name, seed=0)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for layer in ours:
        for leaf in ("kernel", "bias"):
            a = np.asarray(ours[layer][leaf]).ravel()
            b = np.asarray(theirs[layer][leaf]).ravel()
            assert stats.ks_2samp(a, b).pvalue > 1e-4, (layer, leaf)
            if a.size >= 2000:
                # the variance ratio is 1 up to sampling noise (~3% at n = 2000)
                assert abs(a.var() / b.var() - 1) < 0.12, (layer, leaf)
                f = np.asarray(flax_default[layer][leaf]).ravel()
                assert stats.ks_2samp(f, b).pvalue < 1e-6, (layer, leaf)


def test_default_init_is_unchanged():
    """The default stays Flax's, so existing results do not move."""
    for name in MODULES:
        a = MODULES[name]("flax").init(jax.random.key(3), X)
        module = MODULES[name]("flax")
        assert module.param_init == "flax"
        b = module.init(jax.random.key(3), X)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    plain = jt.models.MLP(hidden=(8,)).init(jax.random.key(0), X)["params"]
    assert np.all(np.asarray(plain["Dense_0"]["bias"]) == 0)  # Flax: zero biases


def test_unknown_init_names_the_choices():
    with pytest.raises(
        ValueError, match=r"param_init must be one of 'flax', 'torch'; got 'pytorch'"
    ):
        jt.models.MLP(param_init="pytorch").init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"got 'he'.*Fix: param_init='flax'"):
        jt.models.CNN(param_init="he").init(jax.random.key(0), X)
