"""Teaching the cycle: the forgotten zero_grad, frozen parameters, and step anatomy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_loss, init_model
from jaxtrain.contrast import freeze, from_torch, nhwc_to_nchw, step_anatomy
from jaxtrain.contrast.anatomy import normalize_cost_analysis, normalize_memory_analysis
from jaxtrain.data import load_digits


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    """float32 matmuls at full precision here, without changing other test modules."""
    with jax.default_matmul_precision("highest"):
        yield


torch.set_num_threads(1)
TRAIN, _ = load_digits()
BATCHES = list(jt.ArrayDataset(TRAIN, 32, seed=0, drop_remainder=True).batches(0))[:30]


def _torch_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    )


def _xy(batch):
    x = torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(batch["x"])))
    return x, torch.from_numpy(batch["y"]).long()


def _torch_run(model, opt, clear_gradients=True):
    losses, grads = [], []
    for b in BATCHES:
        if clear_gradients:
            opt.zero_grad()
        x, y = _xy(b)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append(model[1].weight.grad.clone())
        opt.step()
        losses.append(loss.item())
    return np.array(losses), grads


def _jax_run(converted, optimizer):
    state = jt.TrainState.create(jax.tree.map(jnp.array, converted.params), optimizer, 0)
    step = jt.make_train_step(classification_loss(converted.model()), optimizer)
    losses = []
    for b in BATCHES:
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return np.array(losses), state


def test_forgotten_zero_grad_accumulates_and_diverges():
    correct, g_ok = _torch_run(m := _torch_model(), torch.optim.SGD(m.parameters(), lr=0.05))
    forgetful, g_acc = _torch_run(
        m := _torch_model(), torch.optim.SGD(m.parameters(), lr=0.05), clear_gradients=False
    )
    # The first step is identical; the second already uses grad_0 + grad_1.
    assert forgetful[0] == correct[0]
    torch.testing.assert_close(g_acc[0], g_ok[0])
    assert not torch.allclose(g_acc[1], g_ok[1])
    # ... so the run drifts away from the correct one.
    assert np.max(np.abs(forgetful - correct) / correct) > 0.05
    # The functional loop has no gradient buffer to forget; it matches the correct loop.
    functional, _ = _jax_run(from_torch(_torch_model(), (1, 8, 8)), optax.sgd(0.05))
    np.testing.assert_allclose(functional, correct, rtol=1e-5)
    assert np.max(np.abs(functional - forgetful) / forgetful) > 0.05


def _bits(a):
    return np.asarray(a).view(np.uint32)


def test_frozen_parameters_stay_bitwise_unchanged_next_to_requires_grad_false():
    converted = from_torch(_torch_model(), (1, 8, 8))
    before = jax.tree.map(np.array, converted.params)
    # JAX: the first layer frozen by an optax mask, AdamW (decay too) on the rest.
    opt = freeze(optax.adamw(1e-2, weight_decay=1e-2), lambda path: "Dense_0" not in path)
    jax_losses, state = _jax_run(converted, opt)
    after = jax.tree.map(np.array, state.params)
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(_bits(after["Dense_0"][leaf]), _bits(before["Dense_0"][leaf]))
        assert np.abs(after["Dense_1"][leaf] - before["Dense_1"][leaf]).max() > 1e-3
    # PyTorch: requires_grad_(False); no .grad, so AdamW skips the tensor (decay too).
    model = _torch_model()
    model[1].requires_grad_(False)
    frozen_before = model[1].weight.detach().clone()
    opt_t = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch_losses = []
    for b in BATCHES:
        opt_t.zero_grad()
        x, y = _xy(b)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt_t.step()
        torch_losses.append(loss.item())
    assert model[1].weight.grad is None
    assert torch.equal(model[1].weight, frozen_before)
    # ... and the two frozen runs agree with each other.
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    trained = converted.params_from(model)
    np.testing.assert_allclose(after["Dense_1"]["kernel"], trained["Dense_1"]["kernel"], atol=1e-5)


def test_optax_masked_alone_does_not_freeze():
    """optax.masked passes the masked-out leaves' raw gradients through as updates."""
    converted = from_torch(_torch_model(), (1, 8, 8))
    before = np.array(converted.params["Dense_0"]["kernel"])
    mask = {"Dense_0": {"kernel": False, "bias": False}, "Dense_1": {"kernel": True, "bias": True}}
    _, state = _jax_run(converted, optax.masked(optax.adam(1e-2), mask))
    assert np.abs(np.asarray(state.params["Dense_0"]["kernel"]) - before).max() > 1e-4


def test_step_anatomy_reports_jaxpr_flops_and_bytes():
    model = jt.from_linen(jt.models.MLP(hidden=(32,)))
    params, model_state = init_model(model, 0, TRAIN["x"][:1])
    opt = optax.sgd(0.1)
    state = jt.TrainState.create(params, opt, 0, model_state)
    step = jt.make_train_step(classification_loss(model), opt)
    batch = BATCHES[0]
    a = step_anatomy(step, state, batch, model)
    assert "dot_general" in a.forward_jaxpr and "f32[32,64]" in a.forward_jaxpr
    assert a.step_primitives["dot_general"] >= 5  # 2 forward + 3 backward matmuls
    b = 32
    matmuls = 2 * b * (64 * 32 + 32 * 10) * 3 - 2 * b * 64 * 32  # no gradient for the input
    assert matmuls <= a.flops <= 1.5 * matmuls
    assert a.bytes_accessed > 4 * sum(x.size for x in jax.tree.leaves(params))
    # The step's arguments are the state and the batch: at least their bytes.
    arg_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves((state, batch)))
    assert a.memory["argument_size_in_bytes"] >= arg_bytes, (a.memory, arg_bytes)
    assert "FLOPs per step" in a.report()
    assert step.trace_count == 1  # one trace, cached by JAX
    state, _ = step(state, batch)
    assert step.trace_count == 1  # the call reuses it


def test_cost_and_memory_analysis_in_every_shape():
    assert normalize_cost_analysis(None) == {}
    assert normalize_cost_analysis({"flops": 10, "name": "x"}) == {"flops": 10.0}
    assert normalize_cost_analysis([{"flops": 10}, {"flops": 5.0}]) == {"flops": 15.0}
    with pytest.raises(TypeError, match=r"cost_analysis\(\) returned str; expected a dict"):
        normalize_cost_analysis("flops")

    class Mem:
        argument_size_in_bytes = 12
        temp_size_in_bytes = 3

    assert normalize_memory_analysis(None) == {}
    assert normalize_memory_analysis(Mem()) == {
        "argument_size_in_bytes": 12,
        "temp_size_in_bytes": 3,
    }
    assert normalize_memory_analysis([Mem()]) == normalize_memory_analysis(Mem())
    assert normalize_memory_analysis({"output_size_in_bytes": 7}) == {"output_size_in_bytes": 7}


def test_step_anatomy_needs_a_compiled_step():
    model = jt.from_linen(jt.models.MLP(hidden=(8,)))
    params, ms = init_model(model, 0, TRAIN["x"][:1])
    state = jt.TrainState.create(params, optax.sgd(0.1), 0, ms)
    step = jt.make_train_step(classification_loss(model), optax.sgd(0.1), jit=False)
    with pytest.raises(
        ValueError, match=r"built with jit=False.*make_train_step\(\.\.\., jit=True\)"
    ):
        step_anatomy(step, state, BATCHES[0])
