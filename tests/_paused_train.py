"""`jaxtrain train` that pauses at a chosen moment, for the kill tests (test_kill_resume).

Usage: ``python tests/_paused_train.py EVENT:N train ARGS...`` where EVENT is

* ``step``: after the N-th dispatched call (and all of fit's work for it),
* ``save``: right after the N-th checkpoint save began (its write maybe still in flight),
* ``eval``: during the N-th evaluation (after its log record, before its checkpoint).

At that moment it prints ``JAXTRAIN_PAUSED EVENT N`` and waits to be killed. A SIGTERM
ends the wait early and reaches fit's own handler, so fit's preemption (save, exit 143)
runs as it would in a real preemption. The fault injection lives here, in the tests:
the pause is an ordinary `jaxtrain.Callback` added to the run's `fit`, and the
evaluation pause wraps `jaxtrain.evaluation.evaluate`.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import jaxtrain
from jaxtrain import evaluation
from jaxtrain.apps import cli, digits


def wait_to_be_killed(label: str, seconds: float = 3600) -> None:
    """Says so on stdout, then sleeps until a signal comes (or ``seconds`` pass).

    The SIGTERM handler goes in before the line is printed: the test signals as soon as
    it reads the line.
    """
    got: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        got.append(signum)
        if callable(previous):  # fit's handler: it requests the preemption save
            previous(signum, frame)
        else:  # nothing installed: SIGTERM's default, end at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"JAXTRAIN_PAUSED {label}", flush=True)
    deadline = time.monotonic() + seconds
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)


class PauseAt(jaxtrain.Callback):
    """Waits to be killed after the N-th call (``"step"``) or N-th save (``"save"``)."""

    def __init__(self, event: str, n: int):
        self.event, self.n, self.count = event, n, 0
        self.saved: int | None = None

    def _tick(self, label: str) -> None:
        self.count += 1
        if self.count == self.n:
            wait_to_be_killed(f"{label} {self.count}")

    def _saves(self, loop) -> None:
        if loop.saved_step != self.saved:  # fit saved (a new step) since we last looked
            self.saved = loop.saved_step
            self._tick("save")

    def on_train_begin(self, loop):
        self.saved = loop.saved_step  # a resumed run's checkpoint is not a new save

    def on_call_end(self, loop):
        if self.event == "step":
            self._tick("step")
        elif self.event == "save":
            self._saves(loop)

    def on_epoch_end(self, loop):
        if self.event == "save":
            self._saves(loop)


def install(pause: str) -> None:
    """Adds the pause to every `fit` that ``jaxtrain train`` runs in this process."""
    event, _, n = pause.partition(":")
    n = int(n or 1)
    if event == "eval":
        real_evaluate, calls = evaluation.evaluate, []

        def evaluate(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                wait_to_be_killed(f"eval {n}")
            return real_evaluate(*args, **kwargs)

        evaluation.evaluate = evaluate
        return
    if event not in ("step", "save"):
        raise SystemExit(f"_paused_train: unknown pause {pause!r}; use step:N, save:N or eval:N")
    real_fit = digits.fit

    def fit(*args, callbacks=(), **kwargs):
        return real_fit(*args, callbacks=[*callbacks, PauseAt(event, n)], **kwargs)

    digits.fit = fit


if __name__ == "__main__":
    install(sys.argv[1])
    sys.exit(cli.main(sys.argv[2:]))
