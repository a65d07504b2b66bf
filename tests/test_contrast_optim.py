"""The optimizer / schedule / loss correspondence, checked number by number against PyTorch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxtrain.contrast import (
    CORRESPONDENCE,
    OptimizerSpec,
    clip_by_global_norm_torch,
    correspondence_markdown,
    jax_loss,
    make_optax,
    make_torch,
    torch_clip,
    torch_loss,
)

SCHEDULES = {
    "constant+warmup": OptimizerSpec("sgd", 0.1, warmup_steps=4),
    "step": OptimizerSpec("sgd", 0.1, schedule="step", step_size=7, gamma=0.5),
    "step+warmup": OptimizerSpec("sgd", 0.1, schedule="step", step_size=5, warmup_steps=3),
    "cosine": OptimizerSpec("adam", 1e-3, schedule="cosine", total_steps=30, min_lr=1e-5),
    "cosine+warmup": OptimizerSpec(
        "adamw", 2e-3, schedule="cosine", warmup_steps=6, total_steps=30, warmup_start_factor=0.1
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_give_the_same_rate_every_step(name):
    spec = SCHEDULES[name]
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = make_torch(spec, [p])
    _, schedule = make_optax(spec)
    torch_lrs, jax_lrs = [], []
    for t in range(30):
        torch_lrs.append(opt.param_groups[0]["lr"])
        jax_lrs.append(float(schedule(jnp.int32(t))))
        opt.step()
        sched.step()
    # float32 (optax) vs float64 (torch): ~1e-7 of the peak rate, more near a cosine end of 0
    np.testing.assert_allclose(jax_lrs, torch_lrs, rtol=3e-6, atol=1e-6 * spec.lr)
    assert len(set(np.round(torch_lrs, 9))) > 2  # the rate really changes


UPDATES = {
    "sgd": OptimizerSpec("sgd", 0.1),
    "sgd-momentum": OptimizerSpec("sgd", 0.1, momentum=0.9),
    "sgd-nesterov-wd": OptimizerSpec("sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": OptimizerSpec("adam", 1e-2),
    "adam-l2": OptimizerSpec("adam", 1e-2, weight_decay=1e-1),
    "adamw-default-decay": OptimizerSpec("adamw", 1e-2),
    "clip": OptimizerSpec("sgd", 0.1, momentum=0.9, clip_norm=0.5),
    "adamw-cosine": OptimizerSpec("adamw", 1e-2, schedule="cosine", warmup_steps=3, total_steps=20),
}


def _run_both(spec, steps=20, seed=0):
    """Feeds the same gradients (a function of the current params) to both optimizers."""
    rng = np.random.default_rng(seed)
    shapes = {"a": (5, 3), "b": (7,)}
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    targets = {k: rng.normal(size=s).astype(np.float32) * 2 for k, s in shapes.items()}
    tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    opt, sched = make_torch(spec, list(tp.values()))
    tx, _ = make_optax(spec)
    jp = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(jp)
    for _ in range(steps):
        # gradient of sum((p - target)^2 * 3): large enough for clipping to act
        for k in tp:
            tp[k].grad = (tp[k].detach() - torch.from_numpy(targets[k])) * 6
        torch_clip(spec, list(tp.values()))
        opt.step()
        if sched is not None:
            sched.step()
        grads = {k: (jp[k] - targets[k]) * 6 for k in jp}
        updates, state = tx.update(grads, state, jp)
        jp = optax.apply_updates(jp, updates)
    return {k: v.detach().numpy() for k, v in tp.items()}, {k: np.asarray(v) for k, v in jp.items()}


@pytest.mark.parametrize("name", sorted(UPDATES))
def test_updates_match_torch(name):
    spec = UPDATES[name]
    t, j = _run_both(spec)
    for k in t:
        np.testing.assert_allclose(j[k], t[k], rtol=0, atol=5e-6, err_msg=name)  # float32 rounding
    moved = max(np.abs(t[k] - v).max() for k, v in _run_both(spec, steps=0)[0].items())
    assert moved > 1e-2  # 20 steps really moved the parameters


def test_clip_matches_torch_including_its_1e6():
    g = torch.tensor([1.2, -1.6])  # norm 2.0
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert float(norm) == pytest.approx(2.0)
    ours, _ = clip_by_global_norm_torch(1.0).update(
        {"p": jnp.asarray(g.numpy())}, optax.EmptyState()
    )
    theirs, _ = optax.clip_by_global_norm(1.0).update(
        {"p": jnp.asarray(g.numpy())}, optax.clip_by_global_norm(1.0).init(None)
    )
    want = p.grad.numpy()
    np.testing.assert_allclose(np.asarray(ours["p"]), want, rtol=1.5e-7)
    # optax's own clipping has no 1e-6: off by 1e-6 / 2 = 5e-7 relative
    rel = np.abs(np.asarray(theirs["p"]) - want) / np.abs(want)
    assert rel.min() > 3e-7
    # below the threshold both leave the gradient exactly as it is
    small, _ = clip_by_global_norm_torch(10.0).update({"p": jnp.asarray(g.numpy())}, None)
    np.testing.assert_array_equal(np.asarray(small["p"]), g.numpy())


def test_adamw_default_weight_decay_differs_between_frameworks():
    spec = OptimizerSpec("adamw", 1e-2)
    assert spec.decay == 1e-2
    assert torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults["weight_decay"] == 1e-2
    t, j = _run_both(spec)
    # the same run with optax's own default (1e-4) ends elsewhere
    opt_default = optax.adamw(1e-2)
    rng = np.random.default_rng(0)
    init = {
        "a": rng.normal(size=(5, 3)).astype(np.float32),
        "b": rng.normal(size=7).astype(np.float32),
    }
    targets = {k: rng.normal(size=v.shape).astype(np.float32) * 2 for k, v in init.items()}
    jp = {k: jnp.asarray(v) for k, v in init.items()}
    state = opt_default.init(jp)
    for _ in range(20):
        updates, state = opt_default.update({k: (jp[k] - targets[k]) * 6 for k in jp}, state, jp)
        jp = optax.apply_updates(jp, updates)
    assert max(np.abs(np.asarray(jp[k]) - t[k]).max() for k in t) > 1e-4
    assert max(np.abs(j[k] - t[k]).max() for k in t) < 5e-6


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    y = rng.integers(0, 5, size=6)
    tl = torch.from_numpy(logits).requires_grad_(True)
    t = torch_loss("cross_entropy", smoothing)(tl, torch.from_numpy(y))
    t.backward()
    f = jax_loss("cross_entropy", smoothing)
    j, g = jax.value_and_grad(lambda z: f(z, jnp.asarray(y)))(jnp.asarray(logits))
    assert float(j) == pytest.approx(float(t.detach()), rel=1e-6)
    np.testing.assert_allclose(np.asarray(g), tl.grad.numpy(), rtol=0, atol=1e-7)


def test_mse_matches_torch_and_is_twice_optax_l2_loss():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 8, 3)).astype(np.float32)
    t = float(torch_loss("mse")(torch.from_numpy(pred), torch.from_numpy(target)))
    j = float(jax_loss("mse")(jnp.asarray(pred), jnp.asarray(target)))
    half = float(jnp.mean(optax.l2_loss(jnp.asarray(pred), jnp.asarray(target))))
    assert j == pytest.approx(t, rel=1e-6)
    assert half == pytest.approx(t / 2, rel=1e-6)


def test_spec_errors_name_the_field_and_value():
    with pytest.raises(
        ValueError,
        match=r"OptimizerSpec.name must be one of sgd, adam, adamw, rmsprop, adagrad; got 'lbfgs'",
    ):
        OptimizerSpec("lbfgs")
    with pytest.raises(
        ValueError, match=r"nesterov must be False unless momentum > 0 and dampening == 0"
    ):
        OptimizerSpec("sgd", nesterov=True)
    with pytest.raises(
        ValueError,
        match=r"total_steps must be an int > warmup_steps for schedule='cosine'; got None",
    ):
        OptimizerSpec("adam", schedule="cosine")
    with pytest.raises(ValueError, match=r"warmup_start_factor must be in \(0, 1\].*got 0"):
        OptimizerSpec("sgd", warmup_steps=3, warmup_start_factor=0)
    with pytest.raises(ValueError, match=r"loss kind must be 'cross_entropy' or 'mse'; got 'l1'"):
        jax_loss("l1")


def test_correspondence_table_covers_the_issue():
    table = correspondence_markdown()
    assert table.count("\n") == len(CORRESPONDENCE) + 1
    for needle in (
        "SGD",
        "nesterov",
        "weight_decay",
        "AdamW",
        "1e-2",
        "1e-4",
        "clip_grad_norm_",
        "1e-6",
        "StepLR",
        "CosineAnnealingLR",
        "LinearLR",
        "CrossEntropyLoss",
        "label_smoothing",
        "MSELoss",
        "0.5",
        "zero_grad",
        "requires_grad_",
    ):
        assert needle in table, needle
    assert dataclasses.is_dataclass(OptimizerSpec)
