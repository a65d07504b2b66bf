"""``jaxtrain`` command line: ``jaxtrain train`` runs the main job (see `jaxtrain.job`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from jaxtrain._argtypes import nonneg_float as _nonneg_float
from jaxtrain._argtypes import positive_float as _positive_float
from jaxtrain._argtypes import positive_int as _positive_int
from jaxtrain.contrast.cli import COMMAND as COMPARE
from jaxtrain.contrast.cli import add_compare_parser, run_compare
from jaxtrain.doctor import COMMAND as DOCTOR
from jaxtrain.doctor import add_doctor_parser, run_doctor
from jaxtrain.job import MODELS, OPTIMIZERS, PRECISIONS, SCHEDULES, TARGET_ACCURACY, TrainConfig
from jaxtrain.plots import COMMAND as PLOT
from jaxtrain.plots import add_plot_parser, run_plot


class _Parser(argparse.ArgumentParser):
    """argparse, with errors that say where the full list of options is."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\nSee '{self.prog} --help' for every option.\n")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    parser = _Parser(
        prog="jaxtrain",
        description="jaxtrain: the training cycle as pure JAX functions.",
        allow_abbrev=False,  # a typo such as --epoch must fail, not silently mean --epochs
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    t = sub.add_parser(
        "train",
        help="train a model on the embedded digits data set",
        description=(
            "Train a built-in model on scikit-learn's digits (fixed 80/20 stratified split) "
            "and write OUT/metrics.jsonl, OUT/summary.json and OUT/curves.png."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    t.add_argument("--model", choices=MODELS, default=d.model, help="model to train")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="optax optimizer")
    t.add_argument("--lr", type=_positive_float, default=d.lr, help="peak learning rate")
    t.add_argument(
        "--weight-decay",
        type=_nonneg_float,
        default=d.weight_decay,
        help="decoupled weight decay (adamw) or L2 term (sgd, momentum)",
    )
    t.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="learning-rate schedule (cosine: linear warmup then cosine decay)",
    )
    t.add_argument(
        "--warmup-epochs",
        type=_nonneg_float,
        default=d.warmup_epochs,
        help="warmup length for the cosine schedule",
    )
    t.add_argument(
        "--label-smoothing",
        type=_nonneg_float,
        default=d.label_smoothing,
        help="cross-entropy label smoothing in [0, 1)",
    )
    t.add_argument("--epochs", type=_positive_int, default=d.epochs, help="training epochs")
    t.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="stop after this many steps (also sets the schedule's length)",
    )
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        default=d.batch_size,
        help="training batch size (a multiple of the device count)",
    )
    t.add_argument(
        "--eval-batch-size",
        type=_positive_int,
        default=d.eval_batch_size,
        help="evaluation batch size (the last batch is padded and masked)",
    )
    t.add_argument("--seed", type=int, default=d.seed, help="seed of init, shuffling and dropout")
    t.add_argument("--out", default=d.out, help="output directory")
    t.add_argument(
        "--log-every",
        type=_positive_int,
        default=d.log_every,
        help="read training metrics from the device every N steps",
    )
    t.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="evaluate every N steps (default: every epoch)",
    )
    t.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        help="early stopping: evaluations without test-accuracy gain (default: off)",
    )
    t.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="use the first N devices for data parallelism (default: all)",
    )
    t.add_argument(
        "--fsdp",
        type=_positive_int,
        default=d.fsdp,
        metavar="N",
        help="shard parameters and optimizer state over N of the devices (an 'fsdp' mesh "
        "axis; the batch is split over all of them); N must divide the device count",
    )
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    t.add_argument(
        "--save-every",
        type=_positive_int,
        default=None,
        help="also checkpoint every N steps (checkpoints are always written at "
        "epoch ends and at the end, to OUT/checkpoints)",
    )
    t.add_argument(
        "--keep",
        type=_positive_int,
        default=d.keep,
        help="keep the newest K checkpoints (plus the best by test accuracy)",
    )
    t.add_argument("--no-checkpoint", action="store_true", help="write no checkpoints")
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to OUT/tensorboard (tensorboard --logdir OUT)",
    )
    t.add_argument("--csv", action="store_true", help="also write OUT/metrics.csv")
    t.add_argument(
        "--grad-accum-steps",
        type=_positive_int,
        default=d.grad_accum_steps,
        help="split each batch into N microbatches inside the step (same update, less memory)",
    )
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="compute dtype (parameters and optimizer state stay float32; float16 adds "
        "dynamic loss scaling)",
    )
    t.add_argument(
        "--steps-per-call",
        type=_positive_int,
        default=d.steps_per_call,
        help="fuse K training steps into one compiled call (jax.lax.scan)",
    )
    t.add_argument(
        "--unroll",
        action="store_true",
        help="unroll the K fused steps (faster for convolutional models on CPU, whose "
        "gradients XLA:CPU runs on a slow path inside a loop; compile time grows with K)",
    )
    t.add_argument(
        "--nonfinite",
        choices=("skip", "raise", "off"),
        default="off",
        help="non-finite loss/gradient guard: skip the update, stop with an error, or off",
    )
    t.add_argument(
        "--resume",
        metavar="OUT",
        default=None,
        help="continue the run in folder OUT from its newest checkpoint, with the "
        "configuration it was started with (other options are not allowed)",
    )
    dist = t.add_argument_group(
        "multi-process (several machines, or a TPU pod slice)",
        "Run the same command on every machine; each process trains on its own rows of every "
        "global batch, and only process 0 prints and writes OUT. Defaults come from "
        "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; on TPU pod slices, "
        "SLURM and Open MPI, --distributed alone detects them.",
    )
    dist.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        default=None,
        help="address of process 0, reachable from every process",
    )
    dist.add_argument(
        "--num-processes", type=_positive_int, default=None, help="number of processes"
    )
    dist.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run even without the options above (cluster auto-detection)",
    )
    add_compare_parser(sub)  # jaxtrain compare: jaxtrain.contrast (imports torch only when run)
    add_doctor_parser(sub)  # jaxtrain doctor: backend, devices, versions (jaxtrain.doctor)
    add_plot_parser(sub)  # jaxtrain plot: curves of run folders (jaxtrain.plots)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    if args.command == COMPARE:
        return run_compare(args)
    if args.command == DOCTOR:
        return run_doctor(args)
    if args.command == PLOT:
        return run_plot(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


_RESUME_ALLOWED = {
    "command",
    "resume",
    "no_progress",
    "coordinator_address",
    "num_processes",
    "process_id",
    "distributed",
}


def _start_distributed(args: argparse.Namespace) -> bool:
    """Joins the multi-process run when asked to; False (after a message) on failure."""
    from jaxtrain import distributed

    given = (args.coordinator_address, args.num_processes, args.process_id)
    if not (args.distributed or distributed.requested(*given)):
        return True
    try:
        distributed.initialize(*given)
    except (ValueError, RuntimeError) as e:
        print(f"jaxtrain train: error: {e}", file=sys.stderr)
        return False
    return True


def _train(args: argparse.Namespace) -> int:
    from jaxtrain import job

    if not _start_distributed(args):  # first: before anything starts a JAX backend
        return 2

    if args.resume is not None:
        defaults = vars(build_parser().parse_args(["train"]))
        changed = sorted(
            "--" + k.replace("_", "-")
            for k, v in vars(args).items()
            if k not in _RESUME_ALLOWED and v != defaults.get(k)
        )
        if changed:
            print(
                f"jaxtrain train: error: --resume continues the saved configuration of "
                f"{args.resume}; remove {', '.join(changed)} (or start a new run with --out).",
                file=sys.stderr,
            )
            return 2
        try:
            cfg = job.load_config(args.resume)
            cfg = dataclasses.replace(cfg, out=args.resume, progress=not args.no_progress)
            summary = job.run(cfg, resume=True)
        except ValueError as e:
            print(f"jaxtrain train: error: {e}", file=sys.stderr)
            return 2
        return _report(cfg, summary)

    cfg = TrainConfig(
        model=args.model,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        seed=args.seed,
        out=args.out,
        log_every=args.log_every,
        eval_every=args.eval_every,
        patience=args.patience,
        devices=args.devices,
        fsdp=args.fsdp,
        progress=not args.no_progress,
        checkpoint=not args.no_checkpoint,
        save_every=args.save_every,
        keep=args.keep,
        nonfinite=None if args.nonfinite == "off" else args.nonfinite,
        steps_per_call=args.steps_per_call,
        unroll=args.unroll,
        grad_accum_steps=args.grad_accum_steps,
        precision=args.precision,
        tensorboard=args.tensorboard,
        csv=args.csv,
    )
    try:
        summary = job.run(cfg)
    except ValueError as e:
        print(f"jaxtrain train: error: {e}", file=sys.stderr)
        return 2
    return _report(cfg, summary)


def _report(cfg: TrainConfig, summary: dict) -> int:
    import jax

    if jax.process_index() != 0:  # one report per run, from process 0
        return 0
    acc = summary["test_accuracy"]
    print(
        f"wrote {cfg.out}/metrics.jsonl, {cfg.out}/summary.json, {cfg.out}/curves.png "
        f"({summary['steps']} steps, {summary['wall_seconds']:.1f} s, "
        f"{summary['examples_per_second']:.0f} examples/s, "
        f"{summary['train_step_compilations']} train-step compilation(s))"
    )
    if summary.get("model_flops_per_second"):
        mfu = summary["mfu"]
        print(
            f"model FLOPs: {summary['flops_per_step'] / 1e9:.3g} GFLOP/step, "
            f"{summary['model_flops_per_second'] / 1e12:.3g} TFLOP/s, MFU "
            + (f"{mfu * 100:.1f}% of {summary['peak_source']}" if mfu else "unknown (no peak)")
        )
    verdict = "reached" if acc >= TARGET_ACCURACY else "NOT reached"
    print(f"test accuracy: {acc * 100:.2f}% (target >= {TARGET_ACCURACY * 100:.1f}%: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
