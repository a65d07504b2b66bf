"""The training cycle as pure functions (JAX + optax), five labelled stages.

    python examples/functional_loop.py           # 300 steps, an MLP on the 8x8 digits
    python examples/functional_loop.py --steps 20

Read it next to examples/pytorch_loop.py: the same task, the same layout, line by line.
`jaxtrain.make_train_step(loss_fn, optimizer)` builds exactly this `train_step` (plus a
step counter, a per-step rng, metrics and buffer donation).
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import jaxtrain
from jaxtrain.data import load_digits

p = argparse.ArgumentParser(description="MLP on digits, the functional way")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--log-every", type=int, default=50)
args = p.parse_args()

# --- data: the digits, batches of [B, 8, 8, 1] images (Flax wants [B, H, W, C]).
train, test = load_digits()
batches = jaxtrain.ArrayDataset(train, args.batch_size, seed=0, drop_remainder=True).iterate()


# --- model: a description of the computation; the parameters are a separate pytree.
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(jnp.tanh(nn.Dense(64)(x)))


model = MLP()
params = model.init(jax.random.key(0), train["x"][:1])["params"]


# --- loss and optimizer: the optimizer is a pair of pure functions (init, update);
# its state is data we carry, like the parameters.
def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)  # (2) forward pass
    return jaxtrain.losses.softmax_cross_entropy(logits, y)  # (3) loss


optimizer = optax.sgd(args.lr, momentum=0.9)
opt_state = optimizer.init(params)


@jax.jit
def train_step(params, opt_state, x, y):
    # (1) clearing the gradients: no such line. Gradients are the *return value* of
    #     jax.value_and_grad, computed fresh from (params, batch) every call; nothing is
    #     stored between steps, so there is nothing to accumulate and nothing to clear.
    # (2) forward pass and (3) loss: inside loss_fn, traced once into a graph (a jaxpr).
    # (4) gradients: JAX differentiates that graph; a new pytree shaped like params.
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    # (5) update: new parameters and optimizer state are returned, nothing is mutated.
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss


# --- the loop.
for step in range(args.steps):
    _, batch = next(batches)
    params, opt_state, loss = train_step(params, opt_state, batch["x"], batch["y"])

    if step % args.log_every == 0 or step == args.steps - 1:
        print(f"step {step:4d}  loss {float(loss):.4f}")

# --- evaluation: just call the function.
logits = model.apply({"params": params}, test["x"])
acc = float(jnp.mean(jnp.argmax(logits, -1) == test["y"]))
print(f"test accuracy {acc:.3f}")
