"""``jaxtrain`` command line: ``jaxtrain train`` runs the main job (see `jaxtrain.apps.digits`).

What must not live here: the training itself (`jaxtrain.apps.digits`) and the options'
definitions (`TrainConfig`'s fields, `jaxtrain.apps.fields`), from which the parser is
generated. Part of `jaxtrain.apps`: the core never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from jaxtrain.apps import fields
from jaxtrain.apps.digits import TARGET_ACCURACY, TrainConfig
from jaxtrain.apps.doctor import COMMAND as DOCTOR
from jaxtrain.apps.doctor import add_doctor_parser, run_doctor
from jaxtrain.apps.lr_find import COMMAND as LR_FIND
from jaxtrain.apps.lr_find import add_lr_find_parser, run_lr_find
from jaxtrain.apps.plots import COMMAND as PLOT
from jaxtrain.apps.plots import add_plot_parser, run_plot
from jaxtrain.contrast.cli import COMMAND as COMPARE
from jaxtrain.contrast.cli import add_compare_parser, run_compare


class _Parser(argparse.ArgumentParser):
    """argparse, with one-line errors that say where the full list of options is."""

    def error(self, message: str):
        # One line, as every user error of the CLI (the usage is what --help is for).
        self.exit(2, f"{self.prog}: error: {message}. See '{self.prog} --help' for every option.\n")


def build_parser() -> argparse.ArgumentParser:
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
            "Train a built-in model on the bundled 8x8 digits (UCI; fixed 80/20 stratified split) "
            "and write OUT/metrics.jsonl, OUT/summary.json and OUT/curves.png."
        ),
        formatter_class=fields.HelpFormatter,
        allow_abbrev=False,
    )
    # Every TrainConfig field, from its one declaration (jaxtrain.apps.fields.option).
    fields.add_arguments(t, TrainConfig)
    _add_run_options(t)  # what to do with OUT: resume, overwrite, ...
    _add_distributed_options(t)
    add_compare_parser(sub)  # jaxtrain compare: jaxtrain.contrast (imports torch only when run)
    add_doctor_parser(sub)  # jaxtrain doctor: backend, devices, versions (jaxtrain.apps.doctor)
    add_plot_parser(sub)  # jaxtrain plot: curves of run folders (jaxtrain.apps.plots)
    add_lr_find_parser(sub)  # jaxtrain lr-find: learning-rate range test (jaxtrain.apps.lr_find)
    return parser


def _add_run_options(t: argparse.ArgumentParser) -> None:
    """The train options that are not configuration: what to do with the run folder."""
    t.add_argument(
        "--resume",
        metavar="OUT",
        nargs="?",
        const="",
        default=None,
        help="continue the run in --out (or in folder OUT) from its newest checkpoint that "
        "restores cleanly, with its saved configuration: options left out keep their saved "
        "values; options that change the results must match them (see --allow-change)",
    )
    t.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume the run in --out if it has a checkpoint, start a new one if the folder "
        "holds no run (for preemptible jobs: the same command every time)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if --out holds a run: first delete its files (config.json, "
        "checkpoints, metrics, summary, curves, tensorboard, profile, mlruns, wandb; nothing "
        "else) and list them",
    )
    t.add_argument(
        "--allow-change",
        type=fields.field_list,
        default=None,
        metavar="FIELDS",
        help="with --resume: change these result-changing settings of the saved run "
        "(comma-separated, e.g. lr,epochs; exactly those that differ); recorded in "
        "config.json, the checkpoints and summary.json",
    )


def _add_distributed_options(t: argparse.ArgumentParser) -> None:
    """The multi-process options (jaxtrain.distributed), a group of their own."""
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
        "--num-processes", type=fields.positive_int, default=None, help="number of processes"
    )
    dist.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run even without the options above (cluster auto-detection)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        args.given = _given(argv)
        return _train(args)
    if args.command == COMPARE:
        return run_compare(args)
    if args.command == DOCTOR:
        return run_doctor(args)
    if args.command == PLOT:
        return run_plot(args)
    if args.command == LR_FIND:
        return run_lr_find(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


_UNSET = object()


def _given(argv: Sequence[str]) -> set[str]:
    """The ``train`` options given on the command line (not left at their defaults)."""
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr,index]  # argparse keeps subparsers privately
    for action in train._actions:
        action.default = _UNSET
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not _UNSET}


def _config_values(args: argparse.Namespace, only: set[str] | None = None) -> dict:
    """TrainConfig fields from the parsed options (``only``: from these options alone)."""
    return fields.from_args(args, TrainConfig, only)


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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def _warnings_as_lines():
    """Warnings printed as one line each, ``jaxtrain train: warning: ...``."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"jaxtrain train: warning: {_one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


class _TerminatedOutsideSteps(Exception):
    """SIGTERM arrived while no training step ran (start-up, compilation, final writes)."""


@contextlib.contextmanager
def _sigterm_outside_steps():
    """SIGTERM before or after `fit`'s loop ends the command with one line and exit 143.

    Inside the loop `fit` installs its own handler (finish the step, save, exit 143) and
    restores this one afterwards. Without this, a SIGTERM during start-up or the first
    compilation killed the process silently. Only in the main thread (where Python
    delivers signals); the previous handler comes back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: object) -> None:
        raise _TerminatedOutsideSteps

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(args: argparse.Namespace) -> int:
    """``jaxtrain train``: 0 done; 1 the run failed (diverged); 2 a user error; 143 SIGTERM."""
    from jaxtrain.apps import digits
    from jaxtrain.loop import Preempted

    if not _start_distributed(args):  # first: before anything starts a JAX backend
        return 2
    cfg = None
    try:
        with _warnings_as_lines(), _sigterm_outside_steps():
            cfg, resume = _train_config(args)
            summary = digits.run(
                cfg,
                resume=resume,
                overwrite=args.overwrite,
                allow_change=args.allow_change or (),
            )
    except Preempted as e:
        out = cfg.out if cfg is not None else args.out
        print(
            f"jaxtrain train: {e}; continue with: jaxtrain train --resume {out}",
            file=sys.stderr,
        )
        return 143  # 128 + SIGTERM, what the shell reports for a process it ended
    except _TerminatedOutsideSteps:
        out = cfg.out if cfg is not None else args.out
        print(
            "jaxtrain train: stopped by SIGTERM while no training step was running (start-up, "
            "compilation or final writes); committed checkpoints are kept. Continue with: "
            f"jaxtrain train --auto-resume --out {out}",
            file=sys.stderr,
        )
        return 143
    except FloatingPointError as e:  # the non-finite guard: the run diverged
        print(f"jaxtrain train: error: the run diverged: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "jaxtrain train: interrupted (pending checkpoint saves were committed)", file=sys.stderr
        )
        return 130
    except (ValueError, OSError) as e:  # CheckpointError and RunLockError are ValueErrors
        print(f"jaxtrain train: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return _report(cfg, summary)


def _train_config(args: argparse.Namespace) -> tuple[TrainConfig, bool | str]:
    """The run's configuration and resume mode from the options (ValueError if they clash)."""
    from jaxtrain.apps import digits, run_folder

    given = args.given
    if args.resume is not None and args.auto_resume:
        raise ValueError("--resume and --auto-resume: pick one (--auto-resume also resumes).")
    if args.overwrite and (args.resume is not None or args.auto_resume):
        raise ValueError(
            "--overwrite deletes the run in --out to start afresh; it cannot be combined with "
            "--resume or --auto-resume. Fix: drop one of them."
        )
    if args.allow_change and args.resume is None and not args.auto_resume:
        raise ValueError("--allow-change changes a resumed run. Fix: add --resume, or drop it.")
    out = args.out
    if args.resume:  # --resume OUT
        if "out" in given and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise ValueError(
                f"--resume {args.resume} and --out {args.out} name different folders. "
                "Fix: give the run folder once (--out OUT --resume, or --resume OUT)."
            )
        out = args.resume
    resume: bool | str = "auto" if args.auto_resume else args.resume is not None
    # Resuming: the saved configuration, with the options given on this command line
    # on top (digits.run refuses those that change the results, unless --allow-change);
    # the progress bar follows this command.
    if resume is True or (
        resume == "auto" and os.path.exists(os.path.join(out, digits.CONFIG_FILE))
    ):
        run_folder.check_out_folder(out)  # a file or broken link named first, not "no config"
        saved = digits.load_config(out)
        overrides = _config_values(args, only=given | {"progress"})
        return dataclasses.replace(saved, **{**overrides, "out": out}), resume
    return TrainConfig(**{**_config_values(args), "out": out}), resume


def _report(cfg: TrainConfig, summary: dict) -> int:
    import jax

    if jax.process_index() != 0:  # one report per run, from process 0
        return 0
    acc = summary["test_accuracy"]
    loss = summary["train"].get("loss")
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
    if cfg.population is not None:  # each member, the best, and what failed
        from jaxtrain.apps.population_run import report_lines

        out, err = report_lines(cfg, summary, TARGET_ACCURACY)
        print("\n".join(out))
        for line in err:
            print(line, file=sys.stderr)
        return 1 if err else 0
    verdict = "reached" if acc >= TARGET_ACCURACY else "NOT reached"
    print(f"test accuracy: {acc * 100:.2f}% (target >= {TARGET_ACCURACY * 100:.1f}%: {verdict})")
    # A diverged run is a failed run, whatever the guard did: never exit 0 (1, not 2:
    # the command was valid, the training failed).
    if summary.get("skipped_steps"):
        print(
            f"jaxtrain train: error: {summary['skipped_steps']} training step(s) were skipped "
            "because their loss or gradients were not finite (--nonfinite skip); the run is "
            f"not trustworthy. Fix: lower --lr (now {cfg.lr}) or use --nonfinite raise to stop "
            "at the first one.",
            file=sys.stderr,
        )
        return 1
    test_loss = summary["test"].get("loss")
    if not all(isinstance(v, float) and math.isfinite(v) for v in (loss, test_loss, acc)):
        print(
            f"jaxtrain train: error: the run diverged: final train loss {loss}, test loss "
            f"{test_loss}. Fix: lower --lr (now {cfg.lr}), or use --nonfinite raise to stop at "
            "the first non-finite step.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
