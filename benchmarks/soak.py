"""Soak: many steps of a small model with logging, evaluation and checkpointing.

Reports host memory (RSS) growth after warm-up and the number of train-step
compilations. Goals: growth < 5%, exactly 1 compilation.

    python benchmarks/soak.py                 # 20,000 steps (a few minutes on 2 CPU cores)
    python benchmarks/soak.py --steps 300     # smoke size (the test suite runs this)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import optax

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.data import load_digits
from jaxtrain.writers import dumps_strict


def rss_mib() -> float:
    """Resident set size of this process from /proc (Linux), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--warmup", type=int, default=None, help="default: 10%% of --steps")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--save-every", type=int, default=2000)
    ap.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(args.steps // 10, 1)
    sample_every = max(args.steps // 40, 1)

    train, test = load_digits()
    model = jt.from_linen(jt.models.MLP(hidden=(64, 64)))
    params, ms = model.init(jax.random.key(0), train["x"][:1])
    opt = optax.adam(1e-3)
    state = jt.TrainState.create(params, opt, 0, ms)
    step = jt.make_train_step(classification_loss(model), opt)
    ev = jt.make_eval_step(classification_eval(model))
    samples: list[tuple[int, float]] = []

    def sample(st, hist):
        samples.append((len(hist.train) and hist.train[-1]["step"], rss_mib()))

    with (
        tempfile.TemporaryDirectory() as tmp,
        Checkpointer(args.out or os.path.join(tmp, "ckpt"), keep_last=2) as ckpt,
    ):
        t0 = time.perf_counter()
        state, hist = jt.fit(
            state,
            step,
            jt.ArrayDataset(train, 64, seed=0),
            num_steps=args.steps,
            eval_step=ev,
            eval_data=jt.ArrayDataset(test, 120, shuffle=False),
            eval_every=args.eval_every,
            log_every=args.log_every,
            hooks=[jt.PeriodicHook(sample_every, sample)],
            checkpointer=ckpt,
            save_every=args.save_every,
            save_at_epoch_end=False,
            progress=False,
        )
        wall = time.perf_counter() - t0
        saved = ckpt.all_steps()
    after_warmup = [m for s, m in samples if s >= warmup] or [samples[-1][1]]
    base, end, peak = after_warmup[0], after_warmup[-1], max(after_warmup)
    result = {
        "steps": int(state.step),
        "wall_seconds": round(wall, 1),
        "steps_per_second": round(args.steps / wall, 1),
        "rss_mib_after_warmup": round(base, 1),
        "rss_mib_end": round(end, 1),
        "rss_mib_peak": round(peak, 1),
        "rss_growth_percent": round(100 * (end - base) / base, 2),
        "train_step_compilations": step.trace_count,
        "eval_step_compilations": ev.trace_count,
        "evaluations": len(hist.eval),
        "log_records": len(hist.train),
        "checkpoints_kept": saved,
        "final_eval_accuracy": round(hist.eval[-1]["accuracy"], 4),
        "goals_met": {
            "rss_growth_below_5_percent": (end - base) / base < 0.05,
            "one_compilation": step.trace_count == 1,
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.default_backend()}",
        "versions": {"jax": jax.__version__, "optax": optax.__version__},
    }
    print(dumps_strict(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            f.write(dumps_strict(result, indent=2))
    return result


if __name__ == "__main__":
    main()
