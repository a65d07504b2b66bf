"""Train a small CNN on the 8x8 digits with a hand-written loop around `make_train_step`.

    python examples/train_digits.py               # 30 epochs, ~98% test accuracy
    python examples/train_digits.py --epochs 1 --steps 5

The whole training cycle, top to bottom, with no `fit`: data -> model -> optimizer ->
state -> compiled step -> loop -> evaluation. `jaxtrain.fit` runs this same loop (plus
evaluation intervals, early stopping and writers) when you do not need to own it.
"""

import argparse

import jax
import optax

import jaxtrain
from jaxtrain.apps.tasks import classification_eval, classification_loss, init_model
from jaxtrain.data import load_digits

p = argparse.ArgumentParser(description="CNN on digits with make_train_step")
p.add_argument("--epochs", type=int, default=30)
p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--log-every", type=int, default=50)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

# --- data: fixed-shape batches (the last one zero-padded with a mask) so the step
# compiles once; the batch is split over all devices of the mesh (one on a laptop).
train, test = load_digits()
train_ds = jaxtrain.ArrayDataset(train, args.batch_size, seed=args.seed)
test_ds = jaxtrain.ArrayDataset(test, 120, shuffle=False)
mesh = jaxtrain.data_mesh()

# --- model and optimizer: a linen CNN adapted to jaxtrain's pure (init, apply) pair.
model = jaxtrain.from_linen(jaxtrain.models.CNN())
params, model_state = init_model(model, args.seed, train["x"][:1])
total_steps = args.epochs * train_ds.steps_per_epoch
if args.steps is not None:
    total_steps = min(total_steps, args.steps)
warmup = max(1, min(train_ds.steps_per_epoch, total_steps // 10))
schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(total_steps, warmup + 1))
optimizer = optax.adamw(schedule, weight_decay=1e-4)

# --- state: params, optimizer state, step counter and rng in one pytree, replicated on
# the mesh. The step donates it, so never reuse an old `state` after a step.
state = jaxtrain.TrainState.create(params, optimizer, args.seed, model_state)
state = jaxtrain.replicate(state, mesh)
train_step = jaxtrain.make_train_step(
    classification_loss(model), optimizer, learning_rate_fn=schedule, mesh=mesh
)
eval_step = jaxtrain.make_eval_step(classification_eval(model), mesh=mesh)

# --- the loop. `train_step` returns device arrays immediately (asynchronous dispatch);
# calling float() on them would wait for the device every step. So metrics are kept
# as device scalars and read back once every `log_every` steps.
step, pending = 0, []
for epoch in range(args.epochs):
    for batch in train_ds.batches(epoch):
        state, metrics = train_step(state, jaxtrain.shard_batch(batch, mesh))
        pending.append(metrics)
        step += 1
        if step % args.log_every == 0 or step == total_steps:
            logged = jax.device_get(pending)  # the one host sync of this interval
            loss = sum(float(m["loss"]) for m in logged) / len(logged)
            acc = sum(float(m["accuracy"]) for m in logged) / len(logged)
            lr = float(logged[-1]["learning_rate"])
            print(f"epoch {epoch:3d} step {step:5d}  loss {loss:.4f}  acc {acc:.3f}  lr {lr:.2e}")
            pending = []
        if step >= total_steps:
            break
    if step >= total_steps:
        break

# --- evaluation: exact, mask-weighted means over the whole test set (padding excluded).
result = jaxtrain.evaluate(eval_step, state, test_ds, mesh)
print(f"steps {step}; compilations: train {train_step.trace_count}, eval {eval_step.trace_count}")
print(f"test loss {result['loss']:.4f}")
print(f"test accuracy {result['accuracy']:.4f}")
