"""The main job: train a built-in model on the embedded digits data and write a run folder.

``run(TrainConfig(...))`` is what ``jaxtrain train`` calls; it writes
``OUT/config.json``, ``OUT/checkpoints``, ``OUT/metrics.jsonl``, ``OUT/summary.json``
and ``OUT/curves.png`` (and, when asked, ``OUT/metrics.csv`` and TensorBoard event
files in ``OUT/tensorboard``).

A run folder holds one run, written by one process at a time (`jaxtrain.apps.run_folder`):
a new run into a folder that holds one is refused (unless ``overwrite=True``), and a
resumed run must have the configuration it was started with, except for the fields
listed in ``allow_change``, whose changes are recorded in the run.

What must not live here: the training loop (`jaxtrain.fit`) and command-line parsing
(`jaxtrain.apps.cli`). Part of `jaxtrain.apps`: the core never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from jaxtrain import data as data_lib
from jaxtrain import precision as precision_lib
from jaxtrain.apps import fields, run_folder
from jaxtrain.apps.fields import option
from jaxtrain.apps.plots import plot_curves
from jaxtrain.apps.tasks import classification_eval, classification_loss, init_model
from jaxtrain.checkpoint import Checkpointer, state_digest
from jaxtrain.loop import EarlyStopping, fit
from jaxtrain.models import CNN, MLP, from_linen
from jaxtrain.parallel import (
    check_batch_size,
    data_mesh,
    init_sharded,
    make_mesh,
    process_rows,
    shard_batch,
    shard_state,
)
from jaxtrain.perf import perf_summary, step_flops, step_flops_source, steps_per_second
from jaxtrain.profiler import (
    Profile,
    check_profile_range,
    check_resumed_start,
    parse_profile_range,
)
from jaxtrain.state import TrainState
from jaxtrain.step import make_eval_step, make_train_step, make_train_steps
from jaxtrain.summary import model_summary
from jaxtrain.trackers import MLflowWriter, WandbWriter
from jaxtrain.versions import versions
from jaxtrain.writers import CsvWriter, JsonlWriter, TensorBoardWriter, dumps_strict, read_jsonl

MODELS = ("cnn", "mlp")
OPTIMIZERS = ("adamw", "adam", "sgd", "momentum")
SCHEDULES = ("cosine", "constant")
NONFINITE = ("raise", "skip", "off", "freeze")  # the step's guard policies, and off
TARGET_ACCURACY = 0.98


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the main job needs; plain values only (saved into summary.json).

    The defaults are the documented digits run: the small CNN, AdamW (peak lr 2e-3,
    one warmup epoch then cosine decay), label smoothing 0.1, 40 epochs of batch 64 on
    the fixed 80/20 stratified split (seed 0). Each field is declared once, with its
    allowed values and help (`jaxtrain.apps.fields.option`): `validate` and the options of
    ``jaxtrain train`` are generated from these declarations.
    """

    model: str = option("cnn", "model to train", choices=MODELS)
    optimizer: str = option("adamw", "optax optimizer", choices=OPTIMIZERS)
    # A list (a population's members) is allowed by the annotation; the defaults are numbers.
    lr: float | list[float] = option(2e-3, "peak learning rate", above=0)  # noqa: RUF009
    weight_decay: float | list[float] = option(  # noqa: RUF009
        1e-4, "decoupled weight decay (adamw) or L2 term (sgd, momentum)", minimum=0
    )
    schedule: str = option(
        "cosine",
        "learning-rate schedule (cosine: linear warmup then cosine decay)",
        choices=SCHEDULES,
    )
    warmup_epochs: float = option(1.0, "warmup length for the cosine schedule", minimum=0)
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", minimum=0, below=1)
    epochs: int = option(40, "training epochs", minimum=1)
    max_steps: int | None = option(
        None, "stop after this many steps (also sets the schedule's length)", minimum=1
    )
    batch_size: int = option(64, "training batch size (a multiple of the device count)", minimum=1)
    eval_batch_size: int = option(
        120, "evaluation batch size (the last batch is padded and masked)", minimum=1
    )
    seed: int | list[int] = option(0, "seed of init, shuffling and dropout", seed=True)  # noqa: RUF009
    split_seed: int = option(0, "seed of the stratified 80/20 train/test split", seed=True)
    out: str = option(
        "runs/digits",
        "output directory; a folder that already holds a run is refused (see --resume, "
        "--auto-resume, --overwrite); a symlink is followed",
    )
    log_every: int = option(20, "read training metrics from the device every N steps", minimum=1)
    eval_every: int | None = option(
        None, "evaluate every N steps (default: every epoch)", minimum=1
    )
    patience: int | None = option(
        None, "early stopping: evaluations without test-accuracy gain (default: off)", minimum=1
    )
    devices: int | None = option(
        None, "use the first N devices for data parallelism (default: all)", minimum=1
    )
    fsdp: int = option(
        1,
        "shard parameters and optimizer state over N of the devices (an 'fsdp' mesh axis; "
        "the batch is split over all of them); N must divide the device count",
        minimum=1,
        metavar="N",
    )
    progress: bool = option(True, "hide the progress bar")
    checkpoint: bool = option(True, "write no checkpoints")
    save_every: int | None = option(
        None,
        "also checkpoint every N steps (checkpoints are always written at epoch ends and "
        "at the end, to OUT/checkpoints)",
        minimum=1,
    )
    keep: int = option(
        3, "keep the newest K checkpoints (plus the best by test accuracy)", minimum=1
    )
    nonfinite: str = option(
        "raise",
        "non-finite loss/gradient/update guard: stop with an error (exit 1) naming the step, "
        "skip the update (the run then ends with exit 1 and the count of skipped steps), or "
        "off (a diverged run still ends with exit 1); with --population, raise freezes a "
        "diverged member, the others train on, and the run ends with exit 1 naming it; "
        "freeze (population only) does the same and exits 0",
        choices=NONFINITE,
    )
    population: int | None = option(
        None,
        "train N runs at once in one compiled step (jax.vmap over members), one per "
        "combination of the values given as lists to --lr, --weight-decay and --seed (without "
        "lists: seeds SEED .. SEED+N-1); the batches are shared, shuffled with the first "
        "member's seed; summary.json lists every member and the best (see docs/population.md)",
        minimum=1,
        metavar="N",
    )
    vectorize: str = option(
        "auto",
        "how a population's members are combined in its step: auto (loop for a "
        "convolutional model on CPU, else vmap; the choice is printed), vmap (batched; the "
        "win on accelerators and for small dense layers on CPU), loop (one compiled member "
        "step called per member) or map (lax.map: one member after another inside the one "
        "call); BENCHMARKS.md has the figures",
        choices=("auto", "vmap", "loop", "map"),
    )
    steps_per_call: int = option(
        1, "fuse K training steps into one compiled call (jax.lax.scan)", minimum=1
    )
    unroll: bool = option(
        False,
        "unroll the K fused steps (faster for convolutional models on CPU, whose gradients "
        "XLA:CPU runs on a slow path inside a loop; compile time grows with K)",
    )
    grad_accum_steps: int = option(
        1,
        "split each batch into N microbatches inside the step (same update, less memory)",
        minimum=1,
    )
    precision: str = option(
        "float32",
        "compute dtype (parameters and optimizer state stay float32; float16 adds dynamic "
        "loss scaling)",
        choices=precision_lib.NAMES,
    )
    tensorboard: bool = option(
        False, "also write TensorBoard event files to OUT/tensorboard (tensorboard --logdir OUT)"
    )
    csv: bool = option(False, "also write OUT/metrics.csv")
    mlflow: bool = option(
        False,
        "also log to an MLflow run in the local folder OUT/mlruns (mlflow ui "
        "--backend-store-uri OUT/mlruns; pip install 'jaxtrain[mlflow]')",
    )
    wandb: bool = option(
        False,
        "also log to an offline Weights & Biases run in OUT/wandb (wandb sync uploads it; "
        "pip install 'jaxtrain[wandb]')",
    )
    ema: float | None = option(
        None,
        "keep an exponential moving average of the parameters with this decay (e.g. 0.999) "
        "and evaluate it instead of the parameters (test metrics, best checkpoint)",
        above=0,
        below=1,
        metavar="DECAY",
    )
    profile: str | None = option(
        None,
        "trace steps START to STOP-1 with jax.profiler into OUT/profile (open it with "
        "TensorBoard's profile plugin, or its perfetto_trace.json.gz in ui.perfetto.dev)",
        metavar="START:STOP",
    )
    summary: bool = option(True, "do not print the model summary (parameters, FLOPs) at start")

    def validate(self) -> None:
        """Raises ValueError naming the field, what it allows and the value it holds."""
        fields.validate(self)  # every field's type, range and choices: declared above
        from jaxtrain.apps import population_run  # it imports this module

        population_run.check(self)  # lists, --population N and what a population refuses
        _check_writer_packages(self)
        if self.profile is not None:
            start, stop = parse_profile_range(self.profile)
            if self.max_steps is not None and stop > self.max_steps:
                check_profile_range(start, stop, self.max_steps)
        if self.devices is not None and self.devices > jax.device_count():
            raise ValueError(
                f"devices must be at most the {jax.device_count()} available device(s); "
                f"got {self.devices!r}."
            )


def _check_writer_packages(cfg: TrainConfig) -> None:
    """Refuses an optional writer whose package is missing, before the run starts."""
    wanted = [
        ("tensorboard", "tensorboardX", "tensorboard"),
        ("mlflow", "mlflow", "mlflow"),
        ("wandb", "wandb", "wandb"),
    ]
    for name, package, extra in wanted:
        if getattr(cfg, name) and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"{name}: --{name} needs the {package} package, which is not installed. "
                f"Fix: pip install 'jaxtrain[{extra}]', or drop --{name}."
            )


# Fields that do not change the numbers a run produces: output and bookkeeping. Every
# other field changes them (the math: model, optimizer, schedule, data, seeds, stop
# points; or the floating-point rounding: device count, sharding, fused steps), so a
# resumed run may change it only when told to (``allow_change``), and the change is
# recorded in the run.
FREE_FIELDS = (
    "out",
    "progress",
    "checkpoint",
    "save_every",
    "keep",
    "log_every",
    "tensorboard",
    "csv",
    "mlflow",
    "wandb",
    "profile",
    "summary",
)
RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in FREE_FIELDS)


def _optimizer(cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total - 1, 0))
        schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total, warmup + 1))
    else:
        schedule = optax.constant_schedule(cfg.lr)
    return make_optimizer(cfg.optimizer, schedule, cfg.weight_decay), schedule


def make_optimizer(name: str, learning_rate: Any, weight_decay: Any) -> Any:
    """The optax optimizer ``name`` (one of `OPTIMIZERS`) at a rate or schedule.

    Shared by ``jaxtrain train`` and ``jaxtrain lr-find`` (`jaxtrain.apps.lr_find`), so
    a suggested rate is one for the optimizer that will train.
    """
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "momentum":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, 0.9))
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))


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
MLFLOW_DIR = "mlruns"  # an MLflow folder store; W&B writes OUT/wandb itself
PROFILE_DIR = "profile"
METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"


def load_config(out: str) -> TrainConfig:
    """The configuration a run in ``out`` was started with (``OUT/config.json``)."""
    return load_run(out)[0]


def load_run(out: str) -> tuple[TrainConfig, list[dict]]:
    """``OUT/config.json``: the run's current configuration and its recorded changes.

    Raises:
        ValueError: one line naming the file and the problem: missing, not a file,
            not JSON, not an object of `TrainConfig` fields, or a field of the wrong
            type or value.
    """
    path = os.path.join(out, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"resume: {out!r} has no {CONFIG_FILE}, so it is not a jaxtrain run folder "
            "(or the run never started). Fix: pass the --out folder of an earlier run."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"resume: {path} cannot be read as JSON ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Fix: restore the run's {CONFIG_FILE}, "
            "or start a new run with another --out."
        ) from None
    if not isinstance(saved, dict):
        raise ValueError(
            f"resume: {path} must hold a JSON object of configuration fields; got a "
            f"{type(saved).__name__}. Fix: restore the run's {CONFIG_FILE}, or start a new run."
        )
    changes = saved.pop("changes", [])
    if not isinstance(changes, list) or not all(isinstance(c, dict) for c in changes):
        raise ValueError(f"resume: {path}: 'changes' must be a list of objects; got {changes!r}.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"resume: {path} has unknown keys {unknown}; was it written by jaxtrain?")
    cfg = TrainConfig(**saved)
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"resume: {path}: {e} Fix: restore the run's {CONFIG_FILE}.") from None
    return cfg, changes


def _fmt(v: Any) -> str:
    return json.dumps(v)


def _diff(a: dict, b: dict) -> list[str]:
    return [f for f in RESULT_FIELDS if f in a and f in b and a[f] != b[f]]


def _check_changes(
    cfg: TrainConfig, saved: TrainConfig, allow_change: Sequence[str]
) -> list[tuple[str, Any, Any]]:
    """Result fields this run changes against the saved run; refuses unlisted ones."""
    listed = [f.strip().replace("-", "_") for f in allow_change if f.strip()]
    for f in listed:
        if f not in RESULT_FIELDS:
            raise ValueError(
                f"allow_change: {f!r} is not a field that changes a run's results; those are "
                f"{', '.join(RESULT_FIELDS)} (the others may change freely)."
            )
    new, old = dataclasses.asdict(cfg), dataclasses.asdict(saved)
    changed = _diff(new, old)
    unlisted = [f for f in changed if f not in listed]
    if unlisted:
        what = ", ".join(f"{f} {_fmt(new[f])} (the run has {_fmt(old[f])})" for f in unlisted)
        raise ValueError(
            f"resume: this run's configuration differs from the saved one ({cfg.out}/"
            f"{CONFIG_FILE}) in {what}; that changes the results. Fix: drop those options to "
            "continue the run as it was, start a new run with another --out, or pass "
            f"--allow-change {','.join(unlisted)} to change them deliberately (recorded in "
            "the run)."
        )
    unchanged = [f for f in listed if f not in changed]
    if unchanged:
        raise ValueError(
            "allow_change: "
            + ", ".join(f"{f} is listed but unchanged ({_fmt(old[f])})" for f in unchanged)
            + ". Fix: list exactly the fields this run changes"
            + (f": {','.join(changed)}." if changed else " (none).")
        )
    return [(f, old[f], new[f]) for f in changed]


def _config_at(config: dict, changes: list[dict], step: int) -> dict:
    """The configuration the run had at checkpoint ``step`` (changes made later undone)."""
    config = dict(config)
    for ch in reversed(changes):
        if ch.get("step", -1) >= step and ch.get("field") in config:
            config[ch["field"]] = ch.get("old")
    return config


def _committed_steps(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    with Checkpointer(ckpt_dir) as c:
        return c.all_steps()


def _agree(value: int) -> int:
    """Process 0's ``value`` on every process (the run folder is decided by process 0)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _open_run_folder(cfg: TrainConfig, resume: bool | str, overwrite: bool):
    """Process 0: checks OUT, takes its lock, decides fresh (0) or resume (1).

    Returns ``(lock, mode)``; raises ValueError (after releasing the lock) when the
    folder cannot be used as asked.
    """
    out = cfg.out
    run_folder.check_out_folder(out)
    _prepare_out(out)
    lock = run_folder.RunLock(out).acquire()
    try:
        found = run_folder.existing_run_files(out)
        ckpt_dir = os.path.join(out, CHECKPOINT_DIR)
        if resume == "auto":
            if not found:
                return lock, 0
            if os.path.exists(os.path.join(out, CONFIG_FILE)) and _committed_steps(ckpt_dir):
                return lock, 1
            saved = load_config(out)  # a run killed before its first checkpoint
            differ = _diff(dataclasses.asdict(cfg), dataclasses.asdict(saved))
            if differ:
                raise ValueError(
                    f"resume: {out!r} holds another run without a checkpoint (it differs in "
                    f"{', '.join(differ)}). Fix: pass another --out, or --overwrite to replace it."
                )
            removed = run_folder.remove_run(out)
            warnings.warn(
                f"out: the run in {out!r} saved no checkpoint before it stopped; starting it "
                f"again (removed {', '.join(removed)}).",
                RuntimeWarning,
                stacklevel=3,
            )
            return lock, 0
        if resume:
            load_config(out)  # a clear error when there is no (valid) config.json
            if not _committed_steps(ckpt_dir):
                raise ValueError(
                    f"resume: no checkpoint in {ckpt_dir}: the run in {out!r} saved none yet. "
                    "Fix: start it again without --resume (adding --overwrite to replace its "
                    "files), or use --auto-resume."
                )
            return lock, 1
        if found:
            if not overwrite:
                run_folder.check_no_run(out)
            removed = run_folder.remove_run(out)
            print(f"--overwrite: removed the earlier run in {out}: {', '.join(removed)}")
        return lock, 0
    except BaseException:
        lock.release()
        raise


def run(
    cfg: TrainConfig,
    resume: bool | str = False,
    *,
    overwrite: bool = False,
    allow_change: Sequence[str] = (),
) -> dict[str, Any]:
    """Trains, evaluates and writes the run folder.

    ``cfg.out`` is locked for the run (``OUT/.jaxtrain.lock``, see
    `jaxtrain.apps.run_folder.RunLock`): a second process on the same folder is refused.

    Args:
        cfg: the configuration (validated here).
        resume: True continues the run in ``cfg.out`` from its newest checkpoint that
            restores cleanly (a damaged newer one is moved to ``OUT/checkpoints-damaged``
            with a warning); ``cfg`` must equal the run's saved configuration in every
            `RESULT_FIELDS` field except those in ``allow_change``. ``"auto"``: resume
            when ``cfg.out`` holds a run with a checkpoint, start afresh when it holds
            none (or only a run of the same configuration that saved no checkpoint yet).
            False: start a new run; a folder that already holds one is refused.
        overwrite: with ``resume=False``, delete the run files in ``cfg.out`` first
            (`jaxtrain.apps.run_folder.RUN_FILES`; other files stay) and say so.
        allow_change: result fields that ``cfg`` deliberately changes on resume; each
            must differ from the saved run. The changes are recorded (field, old and
            new value, step) in ``OUT/config.json``, the checkpoints and the summary.

    Returns:
        The summary dict (also written to ``OUT/summary.json``).

    Raises:
        ValueError: a bad configuration, or a run folder that cannot be used as asked
            (the message names the problem and the fix).
    """
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be True, False or 'auto'; got {resume!r}.")
    if overwrite and resume:
        raise ValueError(
            "overwrite: --overwrite deletes the run in --out to start afresh; it cannot be "
            "combined with --resume or --auto-resume. Fix: drop one of them."
        )
    if allow_change and not resume:
        raise ValueError(
            "allow_change: --allow-change changes a resumed run; this run starts afresh. "
            "Fix: drop --allow-change (or add --resume)."
        )
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
    # A ("data", "fsdp") mesh: with fsdp > 1 the state is split by jaxtrain.parallel.state_shardings.
    mesh = make_mesh(fsdp=cfg.fsdp, devices=devices) if cfg.fsdp > 1 else data_mesh(devices)
    check_batch_size(cfg.batch_size, mesh)
    check_batch_size(cfg.eval_batch_size, mesh)
    # With several processes (jaxtrain.distributed) every process trains and writes the
    # checkpoints together, but only process 0 writes the run folder's other files, takes
    # its lock and decides whether it starts afresh or resumes (then tells the others).
    primary = jax.process_index() == 0
    lock, mode, error = None, -1, None
    if primary:
        try:
            lock, mode = _open_run_folder(cfg, resume, overwrite)
        except ValueError as e:
            error = e
    mode = _agree(mode)
    if error is not None:
        raise error
    if mode < 0:
        raise ValueError(f"out: process 0 refused the run folder {cfg.out!r} (see its error).")
    try:
        return _run(cfg, mode == 1, allow_change, mesh, primary)
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class _Parts:
    """What a run trains: data, model, state and compiled steps (built by `_build`)."""

    train_ds: data_lib.ArrayDataset
    test_ds: data_lib.ArrayDataset
    model: Any
    optimizer: Any
    state: TrainState
    loss_fn: Any
    step_kwargs: dict[str, Any]
    train_step: Any
    eval_step: Any


def _build(cfg: TrainConfig, mesh: Any) -> _Parts:
    """The data, model, initial state, train step and eval step of ``cfg``."""
    if cfg.population is not None:  # N runs in one step: jaxtrain.apps.population_run
        from jaxtrain.apps import population_run

        return population_run.build_parts(cfg, mesh)
    seed = cfg.seed
    assert isinstance(seed, int)  # validated: a list of seeds needs --population
    train, test = data_lib.load_digits(seed=cfg.split_seed)
    train_ds = data_lib.ArrayDataset(train, cfg.batch_size, seed=seed, num_classes=10)
    test_ds = data_lib.ArrayDataset(test, cfg.eval_batch_size, shuffle=False)
    model = _model(cfg)
    optimizer, schedule = _optimizer(cfg, train_ds.steps_per_epoch)
    # "float32" is no policy at all: the default run stays exactly what it was.
    precision = None if cfg.precision == "float32" else cfg.precision
    ema = cfg.ema is not None  # the parameter EMA (jaxtrain.ema): in the state, evaluated
    sample = train["x"][:1]

    def create() -> TrainState:
        params, model_state = init_model(model, seed, sample)
        return TrainState.create(params, optimizer, seed, model_state, precision=precision, ema=ema)

    # Created in its FSDP layout (--fsdp): no device or host holds the whole state.
    state = init_sharded(create, mesh)
    loss_fn = classification_loss(model, cfg.label_smoothing)
    step_kwargs = dict(
        learning_rate_fn=schedule,
        mesh=mesh,
        nonfinite=None if cfg.nonfinite == "off" else cfg.nonfinite,
        grad_accum_steps=cfg.grad_accum_steps,
        precision=precision,
        ema_decay=cfg.ema,
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
    return _Parts(
        train_ds, test_ds, model, optimizer, state, loss_fn, step_kwargs, train_step, eval_step
    )


def _open_checkpoints(
    cfg: TrainConfig,
    resume: bool,
    allow_change: Sequence[str],
    state: TrainState,
    mesh: Any,
    primary: bool,
) -> tuple[Checkpointer | None, int | None, dict[int, str], list[dict]]:
    """The run's checkpointer (None without checkpoints) and, on resume, what it resumes.

    Returns ``(checkpointer, resumed_from, skipped, changes)`` as `_verify_resume` gives
    them (``None, {}, []`` for a new run). The checkpointer is closed if the checks fail.
    """
    checkpointer = None
    changes: list[dict] = []
    resumed_from, skipped = None, dict[int, str]()
    if cfg.checkpoint or resume:
        ckpt_dir = os.path.join(cfg.out, CHECKPOINT_DIR)
        checkpointer = Checkpointer(ckpt_dir, keep_last=cfg.keep, best_metric="accuracy")
    if resume and checkpointer is not None:  # resume made the checkpointer
        try:
            resumed_from, skipped, changes = _verify_resume(
                cfg, allow_change, checkpointer, state, mesh, primary
            )
        except BaseException:
            checkpointer.close()
            raise
    return checkpointer, resumed_from, skipped, changes


def _write_config(cfg: TrainConfig, changes: list[dict], primary: bool) -> dict[str, Any]:
    """``OUT/config.json`` (strict JSON, process 0 only): the config and its changes."""
    config = {**dataclasses.asdict(cfg), "changes": changes}
    if primary:
        with open(os.path.join(cfg.out, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(dumps_strict(config, indent=2))
    return config


def _flops_per_step(cfg: TrainConfig, parts: _Parts, mesh: Any) -> tuple[float | None, str | None]:
    """FLOPs of one train step from the compiled step's cost analysis.

    For the progress bar's TFLOP/s and MFU and for summary.json. Lowered for the placement
    fit uses, so fit's first call reuses this compilation. A fused step's cost analysis
    covers a scan of k steps; measure one step with a single-step twin instead (one extra
    compilation, not counted as the train step's).
    """
    one_step = parts.train_step
    if cfg.steps_per_call > 1 and cfg.population is not None:
        from jaxtrain.apps import population_run

        one_step = population_run.one_step(parts)
    elif cfg.steps_per_call > 1:
        one_step = make_train_step(parts.loss_fn, parts.optimizer, **parts.step_kwargs)
    batch = next(iter(parts.train_ds.batches(0, rows=process_rows(mesh, cfg.batch_size))))
    flops = step_flops(one_step, shard_state(parts.state, mesh), shard_batch(batch, mesh))
    if cfg.population is not None and flops is not None:
        from jaxtrain.apps import population_run

        flops = population_run.population_flops(one_step, parts.state, flops)
    return flops, step_flops_source(one_step)


def _profiler(cfg: TrainConfig, parts: _Parts) -> Profile | None:
    """``--profile START:STOP`` as `fit`'s callback into ``OUT/profile``.

    Its range is checked against the run's length before anything is written.
    """
    if cfg.profile is None:
        return None
    start, stop = parse_profile_range(cfg.profile)
    total = cfg.epochs * parts.train_ds.steps_per_epoch
    profiler = Profile(start, stop, os.path.join(cfg.out, PROFILE_DIR))
    profiler.check_total(total if cfg.max_steps is None else min(total, cfg.max_steps))
    return profiler


def _open_writers(
    stack: contextlib.ExitStack,
    cfg: TrainConfig,
    resume: bool,
    resumed_from: int | None,
    primary: bool,
) -> list[Any]:
    """The metric writers of the run (process 0 only), entered into ``stack``."""
    if not primary:
        return []
    mode = "a" if resume else "w"
    writers: list[Any] = [
        stack.enter_context(JsonlWriter(os.path.join(cfg.out, METRICS_FILE), mode=mode))
    ]
    if cfg.csv:
        writers.append(stack.enter_context(CsvWriter(os.path.join(cfg.out, CSV_FILE), mode=mode)))
    if cfg.tensorboard:
        # A resumed run appends a new event file that purges the steps after its
        # checkpoint, which the killed run may have logged already: no step twice.
        purge = None if resumed_from is None else resumed_from + 1
        tb_dir = os.path.join(cfg.out, TENSORBOARD_DIR)
        writers.append(stack.enter_context(TensorBoardWriter(tb_dir, purge_step=purge)))
    writers += _open_trackers(stack, cfg, resumed_from)
    return writers


def _open_trackers(
    stack: contextlib.ExitStack, cfg: TrainConfig, resumed_from: int | None
) -> list[Any]:
    """The MLflow / W&B writers asked for: one tracker run per process, named after OUT.

    A resumed run is a new tracker run (its ``resumed_from_step`` says where it
    continues), never an append to the killed process's run.
    """
    name = os.path.basename(os.path.abspath(cfg.out))
    config = dataclasses.asdict(cfg)
    if resumed_from is not None:
        config["resumed_from_step"] = resumed_from
    writers: list[Any] = []
    if cfg.mlflow:
        mlruns = os.path.join(cfg.out, MLFLOW_DIR)
        writers.append(stack.enter_context(MLflowWriter(mlruns, run_name=name, params=config)))
    if cfg.wandb:
        writers.append(stack.enter_context(WandbWriter(cfg.out, name=name, config=config)))
    return writers


def _rewrite_logs(cfg: TrainConfig, history: Any, model_name: str) -> None:
    """Rewrites the metric files from the whole history, then plots ``OUT/curves.png``.

    The whole history (the restored part included), in the order it was logged.
    """
    records = sorted(history.train + history.eval, key=lambda r: (r["step"], r["split"] != "train"))
    metrics_path = os.path.join(cfg.out, METRICS_FILE)
    with JsonlWriter(metrics_path) as writer:
        for r in records:
            writer.write(r)
    if cfg.csv:
        with CsvWriter(os.path.join(cfg.out, CSV_FILE)) as writer:
            for r in records:
                writer.write(r)
    smoothing = cfg.label_smoothing
    plot_curves(
        read_jsonl(metrics_path),
        os.path.join(cfg.out, "curves.png"),
        title=f"{model_name} on digits"
        + (f" (train loss includes label smoothing {smoothing})" if smoothing else ""),
    )


def _summary(
    cfg: TrainConfig,
    parts: _Parts,
    mesh: Any,
    state: TrainState,
    history: Any,
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """The run's ``summary.json`` record.

    ``run_info`` holds ``flops``, ``wall``, ``resumed_from``, ``skipped``, ``changes`` and
    ``config``.
    """
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    # MFU against the chip's peak, from the FLOPs measured before training.
    perf = perf_summary(run_info["flops"], steps_per_second(history), list(mesh.devices.flat))
    final_test = {k: v for k, v in history.eval[-1].items() if k not in ("split",)}
    members: dict[str, Any] = {}
    if cfg.population is not None:  # every member's final metrics and the best
        from jaxtrain.apps import population_run

        members = population_run.summary(cfg, state, history)
        n_params //= cfg.population  # per member
        final_test = members["best"]["test"] if members["best"] else {"accuracy": None}
    accuracy = final_test["accuracy"]
    return {
        "task": "digits",
        "model": cfg.model,
        "num_params": int(n_params),
        "train": {k: v for k, v in history.train[-1].items() if k != "split"},
        "test": final_test,
        "test_accuracy": accuracy,
        "target_accuracy": TARGET_ACCURACY,
        "target_reached": accuracy is not None and accuracy >= TARGET_ACCURACY,
        "steps": int(jax.device_get(state.step)),
        "resumed_from_step": run_info["resumed_from"],
        "skipped_checkpoints": {str(k): v for k, v in run_info["skipped"].items()},
        "changes": run_info["changes"],
        "skipped_steps": int(np.sum(jax.device_get(state.skipped_steps))),  # [N]: all members
        "params_sha256": state_digest(jax.device_get(state.params)),
        "epochs_completed": history.position.epoch,
        "stopped_early": history.stopped_early,
        "wall_seconds": run_info["wall"],
        "first_step_seconds": history.first_step_seconds,
        # tracing + XLA compile (or cache load)
        "compile_seconds": parts.train_step.compile_seconds,
        "examples_per_second": history.examples_per_second,
        **perf,  # flops_per_step, model_flops_per_second, peak_flops_per_second, mfu, peak_source
        "train_step_compilations": parts.train_step.trace_count,
        "eval_step_compilations": parts.eval_step.trace_count,
        "backend": jax.default_backend(),
        "device_count": mesh.size,
        "devices": [str(d) for d in mesh.devices.flat],
        "versions": versions(),
        "config": run_info["config"],
        "checkpoint_saves": _save_blocking(run_info.get("save_blocking")),
        **members,  # a population: members, best_member, best, ... (population_run.summary)
    }


def _save_blocking(seconds: Sequence[float] | None) -> dict[str, Any] | None:
    """How long this run's checkpoint saves blocked training (None without checkpoints).

    Each save blocks the training thread only while this process's shards are copied
    to the host; the write, the digests and the metadata happen in the background.
    """
    if seconds is None:
        return None
    return {
        "count": len(seconds),
        "blocking_seconds": [round(float(s), 6) for s in seconds],
        "blocking_seconds_max": round(float(max(seconds)), 6) if seconds else None,
        "blocking_seconds_median": round(float(np.median(seconds)), 6) if seconds else None,
    }


@contextlib.contextmanager
def _closed_on_error(checkpointer: Checkpointer | None) -> Any:
    """Closes the run's checkpointer when the run fails before its own ``close``.

    An error after the checkpointer opened (a refused ``--profile`` range at the first
    step, a failed write) used to leave orbax's threads running into interpreter
    shutdown, which then printed a long traceback after the CLI's one-line error.
    """
    try:
        yield
    except BaseException:
        if checkpointer is not None:
            try:
                checkpointer.close()
            except Exception as e:  # the run's own error is the one to report
                warnings.warn(
                    f"closing the checkpoints after the error failed too: {e}", stacklevel=2
                )
        raise


def _run(
    cfg: TrainConfig,
    resume: bool,
    allow_change: Sequence[str],
    mesh: Any,
    primary: bool,
) -> dict[str, Any]:
    """`run` once the run folder is locked and the mode decided."""
    parts = _build(cfg, mesh)
    profiler = _profiler(cfg, parts)
    checkpointer, resumed_from, skipped, changes = _open_checkpoints(
        cfg, resume, allow_change, parts.state, mesh, primary
    )
    with _closed_on_error(checkpointer):
        config = _write_config(cfg, changes, primary)
        flops, flops_source = _flops_per_step(cfg, parts, mesh)
        if primary and cfg.summary:  # what is trained, before the first step
            params, model_state = parts.state.params, parts.state.model_state
            if cfg.population is not None:  # one member's model (each member has its own)
                params, model_state = jax.tree.map(lambda x: x[0], (params, model_state))
            found = model_summary(params, name=parts.model.name, model_state=model_state)
            found = dataclasses.replace(found, flops_per_step=flops, flops_source=flops_source)
            print(found.format(), flush=True)
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            writers = _open_writers(stack, cfg, resume, resumed_from, primary)
            state, history = fit(
                parts.state,
                parts.train_step,
                parts.train_ds,
                epochs=cfg.epochs,
                num_steps=cfg.max_steps,
                eval_step=parts.eval_step,
                eval_data=parts.test_ds,
                eval_every=cfg.eval_every,
                log_every=cfg.log_every,
                mesh=mesh,
                early_stopping=EarlyStopping("accuracy", "max", cfg.patience)
                if cfg.patience
                else None,
                writers=writers,
                progress=cfg.progress,
                checkpointer=checkpointer,
                save_every=cfg.save_every,
                save_at_epoch_end=cfg.checkpoint,
                resume=resume,
                config=config,
                flops_per_step=flops,
                eval_params="params" if cfg.ema is None else "ema",
                profile=profiler,
            )
        if checkpointer is not None:
            checkpointer.close()
        wall = time.perf_counter() - t0
        if primary:
            _rewrite_logs(cfg, history, parts.model.name)
        run_info = dict(
            flops=flops,
            wall=wall,
            resumed_from=resumed_from,
            skipped=skipped,
            changes=changes,
            config=config,
            save_blocking=None if checkpointer is None else checkpointer.save_blocking_seconds,
        )
        summary = _summary(cfg, parts, mesh, state, history, run_info)
        if primary:  # strict JSON: a diverged run's NaN losses are written as null
            with open(os.path.join(cfg.out, "summary.json"), "w", encoding="utf-8") as f:
                f.write(dumps_strict(summary, indent=2))
    return summary


def _verify_resume(
    cfg: TrainConfig,
    allow_change: Sequence[str],
    checkpointer: Checkpointer,
    state: TrainState,
    mesh: Any,
    primary: bool,
) -> tuple[int, dict[int, str], list[dict]]:
    """Checks that ``cfg`` continues the run in ``cfg.out``; picks the checkpoint.

    The command's configuration is compared with ``OUT/config.json`` (refused unless
    the change is listed in ``allow_change``), and ``OUT/config.json`` with the one
    stored in the checkpoint (refused: the folder's files do not belong together).
    Returns the step to resume from, the damaged newer steps passed over (moved to
    ``OUT/checkpoints-damaged``), and the run's changes, this run's appended.
    """
    saved, changes = load_run(cfg.out)
    new_changes = _check_changes(cfg, saved, allow_change)
    for f, old, new in new_changes:  # the state's structure is the checkpoints'
        if f == "ema" and (old is None) != (new is None):
            raise ValueError(
                f"resume: --ema cannot be {'added' if old is None else 'dropped'} when "
                f"resuming: the checkpoints in {cfg.out} hold "
                f"{'no' if old is None else 'a'} parameter average (state.ema_params). Fix: "
                "resume with the run's --ema (or change only its decay), or start a new run "
                "with another --out."
            )
    # Single process: fall back past a damaged newest step (with a warning). With
    # several, every process would have to agree on the step: restore the newest or fail.
    fallback = jax.process_count() == 1
    probe = checkpointer.restore(state, mesh=mesh, fallback=fallback)
    step = probe.step
    if cfg.profile is not None:  # before config.json is rewritten: steps already run
        check_resumed_start(*parse_profile_range(cfg.profile), first_step=step)
    stored = probe.meta.get("config")
    if isinstance(stored, dict):
        expected = _config_at(dataclasses.asdict(saved), changes, step)
        differ = _diff(stored, expected)
        if differ:
            what = ", ".join(
                f"{f} {_fmt(stored[f])} (config.json: {_fmt(expected[f])})" for f in differ
            )
            raise ValueError(
                f"resume: checkpoint step {step} in {checkpointer.directory} was saved by a run "
                f"with {what}: {cfg.out}/{CONFIG_FILE} was edited or belongs to another run. "
                f"Fix: put back the run's {CONFIG_FILE}, or start a new run with another --out."
            )
    if probe.skipped:
        moved = [checkpointer.set_aside(s) for s in sorted(probe.skipped)]
        warnings.warn(
            f"resume: moved the damaged checkpoint(s) {sorted(probe.skipped)} out of the way, "
            f"to {', '.join(moved)}; resuming from step {step}.",
            RuntimeWarning,
            stacklevel=3,
        )
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    changes = changes + [
        {"step": step, "field": f, "old": old, "new": new, "time": now}
        for f, old, new in new_changes
    ]
    return step, probe.skipped, changes
