"""`fit`'s checkpoints: resuming a run, saving it, and SIGTERM preemption (`Preempted`).

Lives here: the `Checkpointing` callback (restores a run at train begin; saves every
``every`` steps, at epoch ends and when the loop ends, with everything a resumed run
needs to continue bitwise: data position, history, early-stopping counters, metrics not
logged yet) and the `Preemption` callback (SIGTERM -> finish the step, save, raise
`Preempted`). Must not live here: the checkpoint format (`jaxtrain.checkpoint`), the
training step, writers. Never imports the loop, the CLI, the job or torch.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh

from jaxtrain.callbacks import Callback, Every
from jaxtrain.data import ArrayDataset, DataPosition
from jaxtrain.evaluation import EarlyStop
from jaxtrain.grain_data import GrainData
from jaxtrain.loop_state import LoopState
from jaxtrain.train_log import TrainLog


class Preempted(Exception):
    """`fit` stopped on SIGTERM after saving and committing a checkpoint at ``step``.

    With a checkpointer, `fit` turns SIGTERM (preemption on TPU VMs, SLURM, Colab) into:
    finish the current step, save a checkpoint, wait for it, raise this. Resuming from
    that checkpoint (``resume=True``) ends bitwise where an uninterrupted run ends.
    ``jaxtrain train`` turns it into exit status 143 (128 + SIGTERM).

    Attributes:
        step: the step of the checkpoint written before stopping.
        directory: the checkpointer's directory.

    Example:
        >>> e = Preempted(40, "runs/digits/checkpoints")
        >>> e.step, str(e)
        (40, 'stopped by SIGTERM after saving checkpoint step 40 in runs/digits/checkpoints')
    """

    def __init__(self, step: int, directory: str):
        super().__init__(f"stopped by SIGTERM after saving checkpoint step {step} in {directory}")
        self.step = step
        self.directory = directory


def data_signature(data: Any) -> dict[str, Any] | None:
    """What must match for a resumed run to see the same batches in the same order."""
    if isinstance(data, GrainData):
        return data.signature
    if not isinstance(data, ArrayDataset):
        return None
    return {
        "seed": data.seed,
        "shuffle": data.shuffle,
        "batch_size": data.batch_size,
        "num_examples": data.num_examples,
        "drop_remainder": data.drop_remainder,
    }


class Checkpointing(Callback):
    """Restores a run (``resume``) and saves it: every ``every`` steps, at epoch ends
    (``at_epoch_end``) and when the loop ends, never the same step twice.

    A save first reads back the closed logging intervals (their records belong in the
    saved history) and stores the metrics of steps since the last record, so a resumed
    run folds them into its next record exactly as the uninterrupted run does.
    """

    def __init__(
        self,
        checkpointer: Any,
        *,
        every: int | Every | None,
        at_epoch_end: bool,
        resume: bool | str,
        train_data: Any,
        mesh: Mesh,
        log: TrainLog,
        early_stop: EarlyStop | None,
        config: Mapping[str, Any] | None,
        start_fresh: Callable[[LoopState], None],
    ):
        self.checkpointer, self.at_epoch_end = checkpointer, at_epoch_end
        self.every = Every(steps=every) if isinstance(every, int) else every
        self.resume, self.train_data, self.mesh = resume, train_data, mesh
        self.log, self.early_stop, self.config = log, early_stop, config
        self.start_fresh = start_fresh
        self.signature = data_signature(train_data)

    def on_train_begin(self, loop: LoopState) -> None:
        if self.resume is True or (self.resume and self.checkpointer.latest_step() is not None):
            self.restore(loop)
        elif self.resume:  # "auto" without a checkpoint: a fresh start
            self.start_fresh(loop)

    def restore(self, loop: LoopState) -> None:
        """Continues the newest committed checkpoint: state, data position, history,
        early-stopping counters and the metrics not logged yet."""
        restored = self.checkpointer.restore(loop.state, mesh=self.mesh)
        meta = restored.meta
        if self.signature is not None and meta.get("data") not in (None, self.signature):
            raise ValueError(
                f"cannot resume exactly: the checkpoint at step {restored.step} was trained on "
                f"data {meta.get('data')} but train_data is {self.signature}. Fix: resume with "
                "the same data set, batch size and seed."
            )
        loop.state = restored.state
        start = DataPosition.from_dict(meta["position"])
        if isinstance(self.train_data, GrainData):  # its grain iterator state, checked now
            self.train_data.restore(meta.get("data_state"), start, restored.step)
        saved = meta.get("history", {})
        history = loop.history
        history.train, history.eval = list(saved.get("train", [])), list(saved.get("eval", []))
        history.best_eval = saved.get("best_eval")
        if self.early_stop is not None:
            self.early_stop.load(meta.get("early_stopping") or {})
        loop.pending = [(m, 1) for m in meta.get("pending_metrics") or []]  # one per step
        loop.saved_step = restored.step  # already saved: never saved again
        loop.step = int(jax.device_get(loop.state.step))  # one sync at the start
        loop.seek(start)

    def save(self, loop: LoopState) -> None:
        """Saves the current step (unless this run saved it already)."""
        if loop.saved_step == loop.step:
            return
        self.log.emit_closed(loop)  # closed intervals go into the history saved below
        history, pos = loop.history, loop.position()
        latest_eval = (
            history.eval[-1] if history.eval and history.eval[-1]["step"] == loop.step else None
        )
        early = self.early_stop
        meta = {
            "position": pos.to_dict(),
            "data": self.signature,
            "data_state": (
                self.train_data.iterator_state(pos)
                if isinstance(self.train_data, GrainData)
                else None
            ),
            "history": {
                "train": history.train,
                "eval": history.eval,
                "best_eval": history.best_eval,
            },
            "early_stopping": {"best": None, "bad_evals": 0} if early is None else early.dump(),
            # Metrics of steps since the last log record: a resumed run folds them into
            # its next record exactly as the uninterrupted run would (a host read, but
            # only at save time).
            # (tolist: a Python number, or a population's [N] values as a list)
            "pending_metrics": [
                {k: v.tolist() for k, v in m.items()} for m in self.log.step_metrics(loop.pending)
            ],
            "config": dict(self.config) if self.config else None,
        }
        if latest_eval is not None and self.checkpointer.best_metric in latest_eval:
            # A population ranks its checkpoints by the best member's value.
            from jaxtrain.population_fit import rank_value

            name, mode = self.checkpointer.best_metric, self.checkpointer.best_mode
            latest_eval = {**latest_eval, name: rank_value(latest_eval[name], mode)}
        self.checkpointer.save(loop.step, loop.state, meta=meta, eval_metrics=latest_eval)
        loop.saved_step = loop.step

    def on_call_end(self, loop: LoopState) -> None:
        if self.every is not None and self.every.after_call(loop):
            self.save(loop)

    def on_epoch_end(self, loop: LoopState) -> None:
        if self.at_epoch_end or (self.every is not None and self.every.at_epoch_end(loop)):
            self.save(loop)

    def on_loop_end(self, loop: LoopState) -> None:
        # Before the closing log record and evaluation: they belong to this call, and a
        # run resumed from here must log exactly what an uninterrupted one does.
        self.save(loop)

    def on_exit(self, loop: LoopState) -> None:
        self.checkpointer.wait()  # never leave an asynchronous save behind


class _Sigterm:
    """Turns SIGTERM into a request that `fit` honours after the current step.

    Installed only where it can work: in the main thread (Python delivers signals
    there) and in a single-process run (processes of a multi-process run could see the
    signal at different steps and then save different steps: a hang). A second SIGTERM
    gets the previous handler (by default: end at once).
    """

    def __init__(self):
        self.requested = False
        self.previous: Any = None
        self.installed = False
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, self._previous())

    def _previous(self) -> Any:
        return signal.SIG_DFL if self.previous is None else self.previous

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous())
            self.installed = False


class Preemption(Callback):
    """SIGTERM -> after the current call and every callback's work for it: save, wait
    for the save to commit, raise `Preempted` (single-process runs, main thread)."""

    def __init__(self, checkpointing: Checkpointing):
        self.checkpointing = checkpointing
        self.sigterm: _Sigterm | None = None

    def on_train_begin(self, loop: LoopState) -> None:
        self.sigterm = _Sigterm()

    def _stop_if_requested(self, loop: LoopState) -> None:
        if self.sigterm is not None and self.sigterm.requested:
            self.checkpointing.save(loop)
            self.checkpointing.checkpointer.wait()
            raise Preempted(loop.step, self.checkpointing.checkpointer.directory)

    def on_call_end(self, loop: LoopState) -> None:
        self._stop_if_requested(loop)

    def on_epoch_end(self, loop: LoopState) -> None:
        self._stop_if_requested(loop)

    def on_exit(self, loop: LoopState) -> None:
        if self.sigterm is not None:
            self.sigterm.restore()
