"""Train a small character-level transformer on Python's own docstrings, then sample text.

    python examples/char_lm.py                  # about 1-3 minutes on 2 CPU cores
    python examples/char_lm.py --text book.txt --steps 3000 --d-model 128
    python examples/char_lm.py --steps 20 --seq-len 16 --d-model 32 --layers 1 --max-chars 20000

The corpus is the docstrings of standard-library modules (`jaxtrain.apps.text.stdlib_corpus`):
English that exists on every machine, so the script needs no download.

Why `jaxtrain.fit` here and not a hand-written loop: a language-model run is a fixed
step budget with evaluation every so often, which is exactly what `fit` does (it reads
metrics back only at log/eval intervals and keeps the device busy in between). For the
same cycle written out by hand with `make_train_step`, see examples/train_digits.py.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import optax

import jaxtrain
from jaxtrain.apps import text
from jaxtrain.apps.tasks import classification_eval, classification_loss, init_model


class PrintWriter:
    """A `fit` log sink that prints one line per train/eval record."""

    def write(self, record):
        extra = f"  acc {record['accuracy']:.3f}" if "accuracy" in record else ""
        print(f"step {record['step']:5d}  {record['split']:5s} loss {record['loss']:.3f}{extra}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", help="train on this UTF-8 text file instead of stdlib docstrings")
    p.add_argument("--max-chars", type=int, default=1_000_000, help="corpus size cap in characters")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64, help="context length (model max_len)")
    p.add_argument("--d-model", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--prompt", default="Return the ")
    p.add_argument("--sample-len", type=int, default=300, help="characters to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    # --- data: characters -> ids -> [N, T] next-token windows, last 10% held out ---
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            corpus = f.read()[: args.max_chars]
    else:
        corpus = text.stdlib_corpus(args.max_chars)
    vocab = text.CharVocab.from_text(corpus + args.prompt)  # the prompt must encode too
    windows = text.lm_windows(vocab.encode(corpus), args.seq_len)  # non-overlapping
    n_eval = max(1, len(windows["x"]) // 10)
    train = {k: v[:-n_eval] for k, v in windows.items()}
    held_out = {k: v[-n_eval:] for k, v in windows.items()}
    print(
        f"corpus {len(corpus):,} chars, vocab {vocab.size}, "
        f"windows {len(train['x'])} train / {n_eval} eval of {args.seq_len} chars"
    )
    train_ds = jaxtrain.ArrayDataset(
        train, args.batch_size, seed=args.seed, drop_remainder=len(train["x"]) >= args.batch_size
    )
    eval_ds = jaxtrain.ArrayDataset(held_out, args.batch_size, shuffle=False)

    # --- model, optimizer, state ---
    lm = jaxtrain.models.TransformerLM(
        vocab.size,
        max_len=args.seq_len,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
    )
    model = jaxtrain.from_linen(lm)
    params, model_state = init_model(model, args.seed, train["x"][:1])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"TransformerLM: {n_params:,} parameters")
    warmup = min(100, args.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup, max(args.steps, warmup + 1), end_value=args.lr / 10
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
    )
    state = jaxtrain.TrainState.create(params, optimizer, args.seed, model_state)

    # classification_loss/eval handle per-token labels: logits [B, T, V], y [B, T].
    train_step = jaxtrain.make_train_step(
        classification_loss(model), optimizer, learning_rate_fn=schedule
    )
    eval_step = jaxtrain.make_eval_step(classification_eval(model))

    t0 = time.perf_counter()
    state, history = jaxtrain.fit(
        state,
        train_step,
        train_ds,
        num_steps=args.steps,
        eval_step=eval_step,
        eval_data=eval_ds,
        eval_every=args.eval_every,
        log_every=max(1, min(100, args.steps // 5)),
        writers=[PrintWriter()],
        progress=False,
    )
    train_loss, ev = history.train[-1]["loss"], history.eval[-1]
    print(
        f"trained {history.steps} steps in {time.perf_counter() - t0:.1f}s "
        f"(compile {history.first_step_seconds:.1f}s)"
    )
    print(
        f"final train loss {train_loss:.3f} | eval loss {ev['loss']:.3f} "
        f"({ev['loss'] / math.log(2):.2f} bits/char) | eval accuracy {ev['accuracy']:.3f}"
    )

    # --- sample: a fixed-shape jitted step, compiled once, fold_in(rng, i) per token ---
    new = text.generate(
        model,
        state.params,
        state.model_state,
        vocab.encode(args.prompt),
        args.sample_len,
        jax.random.key(args.seed),
        args.temperature,
    )
    print("sample:")
    print(args.prompt + vocab.decode(new))


if __name__ == "__main__":
    main()
