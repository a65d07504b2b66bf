"""The main job: train a built-in model on the embedded digits data and write a run folder.

``run(TrainConfig(...))`` is what ``jaxtrain train`` calls; it writes
``OUT/metrics.jsonl``, ``OUT/summary.json`` and ``OUT/curves.png`` (and, when asked,
``OUT/metrics.csv`` and TensorBoard event files in ``OUT/tensorboard``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import optax

from jaxtrain import data as data_lib
from jaxtrain.checkpoint import Checkpointer, state_digest
from jaxtrain.logging import CsvWriter, JsonlWriter, TensorBoardWriter, read_jsonl
from jaxtrain.loop import EarlyStopping, fit
from jaxtrain.models import CNN, MLP, from_linen
from jaxtrain.parallel import (
    check_batch_size,
    data_mesh,
    make_mesh,
    process_rows,
    shard_batch,
    shard_state,
)
from jaxtrain.perf import perf_summary, step_flops, steps_per_second
from jaxtrain.plots import plot_curves
from jaxtrain.state import TrainState
from jaxtrain.step import make_eval_step, make_train_step, make_train_steps
from jaxtrain.tasks import classification_eval, classification_loss, init_model
from jaxtrain.versions import versions

MODELS = ("cnn", "mlp")
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum")
SCHEDULES = ("cosine", "constant")
PRECISIONS = ("float32", "bfloat16", "float16")  # jaxtrain.precision.NAMES
TARGET_ACCURACY = 0.98


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the main job needs; plain values only (saved into summary.json).

    The defaults are the documented digits run: the small CNN, AdamW (peak lr 2e-3,
    one warmup epoch then cosine decay), label smoothing 0.1, 40 epochs of batch 64 on
    the fixed 80/20 stratified split (seed 0).
    """

    model: str = "cnn"
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    epochs: int = 40
    max_steps: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 120
    seed: int = 0
    split_seed: int = 0
    out: str = "runs/digits"
    log_every: int = 20
    eval_every: int | None = None
    patience: int | None = None
    devices: int | None = None
    fsdp: int = 1  # shard params and optimizer state over this many devices (jaxtrain.make_mesh)
    progress: bool = True
    checkpoint: bool = True
    save_every: int | None = None
    keep: int = 3
    nonfinite: str | None = None
    steps_per_call: int = 1
    unroll: bool = False  # unroll the fused steps (conv models on CPU: see make_train_steps)
    grad_accum_steps: int = 1
    precision: str = "float32"  # compute dtype (jaxtrain.precision); params stay float32
    tensorboard: bool = False  # also write TensorBoard event files to OUT/tensorboard
    csv: bool = False  # also write OUT/metrics.csv

    def validate(self) -> None:
        """Raises ValueError naming the field, the allowed values and the given one."""

        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"{field} must be {expected}; got {getattr(self, field)!r}.")

        if self.model not in MODELS:
            raise bad("model", f"one of {', '.join(MODELS)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0 (e.g. 3e-3)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "a finite number >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "in [0, 1)")
        for f in (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "log_every",
            "steps_per_call",
            "grad_accum_steps",
            "fsdp",
        ):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise bad(f, "an integer >= 1")
        if not isinstance(self.unroll, bool):
            raise bad("unroll", "true or false")
        if self.nonfinite not in (None, "skip", "raise"):
            raise bad("nonfinite", "'skip', 'raise' or unset")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"one of {', '.join(PRECISIONS)}")
        if not isinstance(self.keep, int) or self.keep < 1:
            raise bad("keep", "an integer >= 1")
        for f in ("max_steps", "eval_every", "patience", "devices", "save_every"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise bad(f, "an integer >= 1 or unset")
        if self.devices is not None and self.devices > jax.device_count():
            raise bad("devices", f"at most the {jax.device_count()} available device(s)")


def _optimizer(cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total - 1, 0))
        schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total, warmup + 1))
    else:
        schedule = optax.constant_schedule(cfg.lr)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = optax.adam(schedule)
    elif cfg.optimizer == "momentum":
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(schedule, 0.9))
    else:
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(schedule))
    return opt, schedule


def _model(cfg: TrainConfig):
    return from_linen(CNN() if cfg.model == "cnn" else MLP(hidden=(256, 256), dropout=0.1))


def _prepare_out(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write_test")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise ValueError(
            f"out: cannot write to the output directory {out!r} ({e.strerror}). "
            "Fix: choose a writable folder with --out."
        ) from None


CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


def load_config(out: str) -> TrainConfig:
    """The configuration a run in ``out`` was started with (``OUT/config.json``)."""
    path = os.path.join(out, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"resume: {out!r} has no {CONFIG_FILE}, so it is not a jaxtrain run folder "
            "(or the run never started). Fix: pass the --out folder of an earlier run."
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"resume: {path} is not valid JSON ({e}).") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"resume: {path} has unknown keys {unknown}; was it written by jaxtrain?")
    return TrainConfig(**saved)


def run(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Trains, evaluates and writes the run folder.

    Args:
        cfg: the configuration (validated here).
        resume: continue the run in ``cfg.out`` from its newest committed checkpoint.

    Returns:
        The summary dict (also written to ``OUT/summary.json``).
    """
    cfg.validate()
    if cfg.devices and jax.process_count() > 1:
        raise ValueError(
            f"devices: --devices {cfg.devices} selects local devices, but this run spans "
            f"{jax.process_count()} processes and uses all their devices. Fix: drop --devices "
            "(or set the devices each process sees, e.g. CUDA_VISIBLE_DEVICES)."
        )
    devices = jax.devices()[: cfg.devices] if cfg.devices else jax.devices()
    if len(devices) % cfg.fsdp:
        raise ValueError(
            f"fsdp: --fsdp {cfg.fsdp} must divide the {len(devices)} device(s) the run uses. "
            f"Fix: pick a divisor of {len(devices)} (1 turns parameter sharding off)."
        )
    # A ("data", "fsdp") mesh: with fsdp > 1 the state is split by jaxtrain.state_shardings.
    mesh = make_mesh(fsdp=cfg.fsdp, devices=devices) if cfg.fsdp > 1 else data_mesh(devices)
    check_batch_size(cfg.batch_size, mesh)
    check_batch_size(cfg.eval_batch_size, mesh)
    # With several processes (jaxtrain.distributed) every process trains and writes the
    # checkpoints together, but only process 0 writes the run folder's other files.
    primary = jax.process_index() == 0
    if primary:
        _prepare_out(cfg.out)

    train, test = data_lib.load_digits(seed=cfg.split_seed)
    train_ds = data_lib.ArrayDataset(train, cfg.batch_size, seed=cfg.seed, num_classes=10)
    test_ds = data_lib.ArrayDataset(test, cfg.eval_batch_size, shuffle=False)
    model = _model(cfg)
    params, model_state = init_model(model, cfg.seed, train["x"][:1])
    optimizer, schedule = _optimizer(cfg, train_ds.steps_per_epoch)
    # "float32" is no policy at all: the default run stays exactly what it was.
    precision = None if cfg.precision == "float32" else cfg.precision
    state = TrainState.create(params, optimizer, cfg.seed, model_state, precision=precision)
    loss_fn = classification_loss(model, cfg.label_smoothing)
    step_kwargs = dict(
        learning_rate_fn=schedule,
        mesh=mesh,
        nonfinite=cfg.nonfinite,
        grad_accum_steps=cfg.grad_accum_steps,
        precision=precision,
    )
    if cfg.steps_per_call > 1:  # K steps per compiled call (lax.scan): less dispatch
        train_step = make_train_steps(
            loss_fn,
            optimizer,
            steps_per_call=cfg.steps_per_call,
            unroll=True if cfg.unroll else 1,
            **step_kwargs,
        )
    else:
        train_step = make_train_step(loss_fn, optimizer, **step_kwargs)
    eval_step = make_eval_step(classification_eval(model), mesh=mesh)

    config = dataclasses.asdict(cfg)
    ckpt_dir = os.path.join(cfg.out, CHECKPOINT_DIR)
    checkpointer = None
    if cfg.checkpoint or resume:
        checkpointer = Checkpointer(ckpt_dir, keep_last=cfg.keep, best_metric="accuracy")
        if resume and checkpointer.latest_step() is None:
            checkpointer.close()
            raise ValueError(
                f"resume: no checkpoint in {ckpt_dir}: the run in {cfg.out!r} saved none yet. "
                "Fix: start it again without --resume."
            )
    if not resume and primary:
        with open(os.path.join(cfg.out, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    resumed_from = checkpointer.latest_step() if resume else None

    # FLOPs of one step from the compiled step's cost analysis, for the progress bar's
    # TFLOP/s and MFU and for summary.json. Lowered for the placement fit uses, so fit's
    # first call reuses this compilation. A fused step's cost analysis covers a scan of k
    # steps; measure one step with a single-step twin instead (one extra compilation, not
    # counted as the train step's).
    one_step = train_step
    if cfg.steps_per_call > 1:
        one_step = make_train_step(loss_fn, optimizer, **step_kwargs)
    flops = step_flops(
        one_step,
        shard_state(state, mesh),
        shard_batch(next(iter(train_ds.batches(0, rows=process_rows(mesh, cfg.batch_size)))), mesh),
    )

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    t0 = time.perf_counter()
    csv_path = os.path.join(cfg.out, "metrics.csv")
    with contextlib.ExitStack() as stack:
        writers = []
        if primary:
            writers.append(
                stack.enter_context(JsonlWriter(metrics_path, mode="a" if resume else "w"))
            )
        if cfg.csv and primary:
            writers.append(stack.enter_context(CsvWriter(csv_path, mode="a" if resume else "w")))
        if cfg.tensorboard and primary:
            # A resumed run appends a new event file that purges the steps after its
            # checkpoint, which the killed run may have logged already: no step twice.
            purge = None if resumed_from is None else resumed_from + 1
            writers.append(
                stack.enter_context(
                    TensorBoardWriter(os.path.join(cfg.out, TENSORBOARD_DIR), purge_step=purge)
                )
            )
        state, history = fit(
            state,
            train_step,
            train_ds,
            epochs=cfg.epochs,
            num_steps=cfg.max_steps,
            eval_step=eval_step,
            eval_data=test_ds,
            eval_every=cfg.eval_every,
            log_every=cfg.log_every,
            mesh=mesh,
            early_stopping=EarlyStopping("accuracy", "max", cfg.patience) if cfg.patience else None,
            writers=writers,
            progress=cfg.progress,
            checkpointer=checkpointer,
            save_every=cfg.save_every,
            save_at_epoch_end=cfg.checkpoint,
            resume=resume,
            config=config,
            flops_per_step=flops,
        )
    if checkpointer is not None:
        checkpointer.close()
    wall = time.perf_counter() - t0
    # The whole history (restored part included), in the order it was logged.
    records = sorted(history.train + history.eval, key=lambda r: (r["step"], r["split"] != "train"))
    if primary:
        with JsonlWriter(metrics_path) as writer:
            for r in records:
                writer.write(r)
    if cfg.csv and primary:
        with CsvWriter(csv_path) as writer:
            for r in records:
                writer.write(r)
    if primary:
        plot_curves(
            read_jsonl(metrics_path),
            os.path.join(cfg.out, "curves.png"),
            title=f"{model.name} on digits"
            + (
                f" (train loss includes label smoothing {cfg.label_smoothing})"
                if cfg.label_smoothing
                else ""
            ),
        )
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    # MFU against the chip's peak, from the FLOPs measured before training.
    perf = perf_summary(flops, steps_per_second(history), list(mesh.devices.flat))
    final_test = {k: v for k, v in history.eval[-1].items() if k not in ("split",)}
    summary = {
        "task": "digits",
        "model": cfg.model,
        "num_params": int(n_params),
        "train": {k: v for k, v in history.train[-1].items() if k != "split"},
        "test": final_test,
        "test_accuracy": final_test["accuracy"],
        "target_accuracy": TARGET_ACCURACY,
        "target_reached": final_test["accuracy"] >= TARGET_ACCURACY,
        "steps": int(jax.device_get(state.step)),
        "resumed_from_step": resumed_from,
        "skipped_steps": int(jax.device_get(state.skipped_steps)),
        "params_sha256": state_digest(jax.device_get(state.params)),
        "epochs_completed": history.position.epoch,
        "stopped_early": history.stopped_early,
        "wall_seconds": wall,
        "first_step_seconds": history.first_step_seconds,
        "examples_per_second": history.examples_per_second,
        **perf,  # flops_per_step, model_flops_per_second, peak_flops_per_second, mfu, peak_source
        "train_step_compilations": train_step.trace_count,
        "eval_step_compilations": eval_step.trace_count,
        "backend": jax.default_backend(),
        "device_count": mesh.size,
        "devices": [str(d) for d in mesh.devices.flat],
        "versions": versions(),
        "config": config,
    }
    if primary:
        with open(os.path.join(cfg.out, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary
