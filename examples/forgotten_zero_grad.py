"""The forgotten ``zero_grad()``: a PyTorch bug the functional loop cannot have.

    python examples/forgotten_zero_grad.py            # 40 steps
    python examples/forgotten_zero_grad.py --steps 10

Three runs from the same weights on the same batches: PyTorch with ``zero_grad()``,
PyTorch without it (``backward()`` keeps adding into ``p.grad``, so step t uses the sum
of all gradients so far), and jaxtrain's ``train_step``, whose gradients are a return
value and cannot accumulate. (Needs PyTorch: pip install torch==2.13.0 then
pip install -e .[torch].)
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jaxtrain
from jaxtrain.apps.tasks import classification_loss
from jaxtrain.contrast import from_torch, nhwc_to_nchw
from jaxtrain.data import load_digits

p = argparse.ArgumentParser(description="what happens without optimizer.zero_grad()")
p.add_argument("--steps", type=int, default=40)
p.add_argument("--lr", type=float, default=0.05)
args = p.parse_args()
jax.config.update("jax_default_matmul_precision", "highest")

train, _ = load_digits()
batches = list(jaxtrain.ArrayDataset(train, 32, seed=0, drop_remainder=True).batches(0))
batches = [batches[i % len(batches)] for i in range(args.steps)]


def new_torch_model():
    torch.manual_seed(0)  # identical weights every time
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    )


def torch_losses(clear_gradients: bool) -> list[float]:
    model = new_torch_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    out = []
    for b in batches:
        if clear_gradients:
            opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(np.ascontiguousarray(nhwc_to_nchw(b["x"])))),
            torch.from_numpy(b["y"]).long(),
        )
        loss.backward()  # p.grad += d loss / d p
        opt.step()
        out.append(loss.item())
    return out


def functional_losses() -> list[float]:
    converted = from_torch(new_torch_model(), (1, 8, 8))  # the same starting weights
    model = converted.model()
    optimizer = optax.sgd(args.lr)
    state = jaxtrain.TrainState.create(converted.params, optimizer, 0)
    step = jaxtrain.make_train_step(classification_loss(model), optimizer)
    out = []
    for b in batches:
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in b.items()})
        out.append(float(metrics["loss"]))
    return out


correct, forgetful, functional = torch_losses(True), torch_losses(False), functional_losses()
print(f"{'step':>4}  {'torch':>8}  {'no zero_grad':>12}  {'jaxtrain':>8}")
for t in range(0, args.steps, max(1, args.steps // 10)):
    print(f"{t:>4}  {correct[t]:8.4f}  {forgetful[t]:12.4f}  {functional[t]:8.4f}")
gap = max(abs(a - b) / abs(a) for a, b in zip(correct, forgetful, strict=True))
same = max(abs(a - b) / abs(a) for a, b in zip(correct, functional, strict=True))
print(f"without zero_grad: up to {gap:.1%} off the correct PyTorch loop")
print(f"jaxtrain: within {same:.1e} (relative) of the correct PyTorch loop")
