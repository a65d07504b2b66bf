"""Real kills: SIGKILL the CLI mid-epoch, right after a save began and during evaluation,
resume it, and get bitwise the same final parameters as an uninterrupted run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

# One xdist group (pytest --dist loadgroup): the module fixture runs once, on one worker.
pytestmark = pytest.mark.xdist_group("test_kill_resume")


ARGS = [
    "--model",
    "mlp",
    "--epochs",
    "3",
    "--save-every",
    "10",
    "--log-every",
    "5",
    "--no-progress",
    "--tensorboard",
]  # 23 steps per epoch: saves at 10, 20, 23, 30, 40, 46, 50, 60, 69
CLI = [sys.executable, "-m", "jaxtrain.apps.cli", "train"]


# The fault injection lives in the tests: this wrapper runs `jaxtrain train` with a
# callback that pauses at EVENT:N (see its docstring) and says so on stdout.
PAUSED = str(pathlib.Path(__file__).with_name("_paused_train.py"))


def _cli(pause=None):
    return CLI if pause is None else [sys.executable, PAUSED, pause, "train"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _run(args, timeout=180):
    res = subprocess.run(CLI + args, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _start_and_kill(out, pause, timeout=180):
    """Starts a run that pauses at ``pause``, waits for that moment, then SIGKILLs it."""
    proc = subprocess.Popen(
        _cli(pause) + [*ARGS, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            if line.startswith("JAXTRAIN_PAUSED"):
                break
            assert time.monotonic() < deadline, "the run never reached its pause point"
        else:
            pytest.fail(f"run ended (code {proc.wait()}) without reaching {pause}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _run([*ARGS, "--out", str(out)])
    return json.loads((out / "summary.json").read_text()), out


def _metrics_without_timing(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        for timing in ("examples_per_second", "model_flops_per_second", "mfu"):
            r.pop(timing, None)
    return recs


def _tensorboard_steps(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    # Timing tags are left out, as in _metrics_without_timing: a resumed run's first
    # interval holds its compiling call, which has no steady time to report.
    timing = ("examples_per_second", "model_flops_per_second", "mfu")
    return {
        tag: [e.step for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if not tag.endswith(timing)
    }


SAVE_STEPS = {10, 20, 23, 30, 40, 46, 50, 60, 69}


@pytest.mark.parametrize(
    ("pause", "killed_at"),
    [
        ("step:37", 37),  # mid-epoch, between saves
        ("save:5", 40),  # right after the 5th save (step 40) began, its write maybe in flight
        ("eval:2", 46),  # during the evaluation at the end of epoch 2 (step 46)
    ],
)
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, uninterrupted, pause, killed_at):
    full, full_out = uninterrupted
    out = tmp_path / "run"
    _start_and_kill(out, pause)
    res = _run(["--resume", str(out), "--no-progress"])
    # The killed run's lock is stale (its process is gone): taken over, with a warning.
    assert "warning: out: taking over the lock" in res.stderr and "no longer running" in res.stderr
    resumed = json.loads((out / "summary.json").read_text())
    # The newest *committed* checkpoint: an asynchronous write still in flight when the
    # kill came is never used (orbax commits by renaming a finished temporary folder).
    assert resumed["resumed_from_step"] in SAVE_STEPS
    assert resumed["resumed_from_step"] <= killed_at
    assert resumed["steps"] == full["steps"] == 69
    assert resumed["params_sha256"] == full["params_sha256"]
    assert resumed["test"] == full["test"]
    assert _metrics_without_timing(out) == _metrics_without_timing(full_out)
    # TensorBoard, read back with its own reader: the steps the killed run logged after
    # its checkpoint are purged, so every step appears once, as in metrics.jsonl.
    assert _tensorboard_steps(out) == _tensorboard_steps(full_out)
    assert _tensorboard_steps(out)["train/loss"] == [
        r["step"] for r in _metrics_without_timing(out) if r["split"] == "train"
    ]
    assert "test accuracy:" in res.stdout.splitlines()[-1]


def _start_and_term(out, pause, timeout=180):
    """Starts a run that pauses at ``pause``, then sends SIGTERM (a preemption notice)."""
    proc = subprocess.Popen(
        _cli(pause) + [*ARGS, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        for line in proc.stdout:
            if line.startswith("JAXTRAIN_PAUSED"):
                break
        else:
            pytest.fail(f"run ended (code {proc.wait()}) without reaching {pause}")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return proc.returncode, err


def test_sigterm_saves_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
    """SIGTERM mid-epoch (step 37, between saves): the step finishes, a checkpoint of step 37
    is committed, exit 143; the resumed run ends bitwise where the uninterrupted one does."""
    full, full_out = uninterrupted
    out = tmp_path / "run"
    code, err = _start_and_term(out, "step:37")
    assert code == 143, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1] == (
        f"jaxtrain train: stopped by SIGTERM after saving checkpoint step 37 in "
        f"{out}/checkpoints; continue with: jaxtrain train --resume {out}"
    )
    assert (out / "checkpoints" / "37").is_dir()
    assert not (out / ".jaxtrain.lock").exists()  # released on the way out
    # The same command with --resume appended.
    _run([*ARGS, "--out", str(out), "--resume"])
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["resumed_from_step"] == 37
    assert resumed["steps"] == full["steps"] == 69
    assert resumed["params_sha256"] == full["params_sha256"]
    assert resumed["test"] == full["test"]
    assert _metrics_without_timing(out) == _metrics_without_timing(full_out)


def test_resume_rejects_a_folder_without_a_run(tmp_path, capsys):
    from jaxtrain.apps import cli

    assert cli.main(["train", "--resume", str(tmp_path), "--epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert f"resume: {str(tmp_path)!r} has no config.json" in err
