"""The training cycle in PyTorch: mutable objects, five labelled stages.

    python examples/pytorch_loop.py              # 300 steps, an MLP on the 8x8 digits
    python examples/pytorch_loop.py --steps 20

Read it next to examples/functional_loop.py: the same task, the same layout, line by
line. (Needs PyTorch: pip install torch==2.13.0 then pip install -e .[torch].)
"""

import argparse

import numpy as np
import torch

import jaxtrain  # only for the data: the same batches as the functional loop
from jaxtrain.data import load_digits

p = argparse.ArgumentParser(description="MLP on digits, the PyTorch way")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--log-every", type=int, default=50)
args = p.parse_args()

# --- data: the digits, batches of [B, 8, 8, 1] images (PyTorch wants [B, C, H, W]).
train, test = load_digits()
batches = jaxtrain.ArrayDataset(train, args.batch_size, seed=0, drop_remainder=True).iterate()

# --- model: an object that owns its parameters (and, after backward, their gradients).
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)
)

# --- loss and optimizer: the optimizer holds references to the model's parameters.
criterion = torch.nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

# --- the loop.
for step in range(args.steps):
    _, batch = next(batches)
    x = torch.from_numpy(np.ascontiguousarray(batch["x"].transpose(0, 3, 1, 2)))
    y = torch.from_numpy(batch["y"]).long()

    # (1) clearing the gradients: backward() ADDS into p.grad, so last step's must go.
    optimizer.zero_grad()
    # (2) forward pass: autograd records the graph while it runs.
    logits = model(x)
    # (3) loss
    loss = criterion(logits, y)
    # (4) gradients: walk the recorded graph backwards, accumulate into every p.grad.
    loss.backward()
    # (5) update: the optimizer reads p.grad and changes p in place.
    optimizer.step()

    if step % args.log_every == 0 or step == args.steps - 1:
        print(f"step {step:4d}  loss {loss.item():.4f}")

# --- evaluation: no graph needed.
with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(test["x"].transpose(0, 3, 1, 2)))
    acc = (model(x).argmax(-1).numpy() == test["y"]).mean()
print(f"test accuracy {acc:.3f}")
