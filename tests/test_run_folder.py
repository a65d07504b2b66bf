"""Run folders never lose or mix runs: refusal of a used --out, --overwrite, one writer per
folder (lock), resume identity (--allow-change), --resume appended to the same command,
--auto-resume, fallback past a damaged newest checkpoint, diverged runs, and user errors
that are one line and exit status 2."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from jaxtrain.apps import cli, digits
from jaxtrain.apps.run_folder import LOCK_FILE, RunLock
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.writers import dumps_strict

# 6 steps of the MLP, checkpoints at steps 3 and 6 (23 steps make an epoch).
TINY = ["--model", "mlp", "--max-steps", "6", "--log-every", "3", "--save-every", "3"]
TINY += ["--no-progress"]


def _main(argv, capsys):
    """``cli.main(["train", *argv])``: (exit status, stdout, non-empty stderr lines)."""
    try:
        code = cli.main(["train", *argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run folder."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_new_run_into_a_run_folder_is_refused_and_overwrite_says_what_it_removed(run, capsys):
    before = (run / "config.json").read_text()
    code, _, err = _main([*TINY, "--out", str(run)], capsys)
    assert code == 2 and len(err) == 1, err
    assert "already holds a run (config.json, checkpoints, metrics.jsonl, summary.json" in err[0]
    assert "--resume" in err[0] and "new --out" in err[0] and "--overwrite" in err[0]
    assert (run / "config.json").read_text() == before  # nothing touched
    with pytest.raises(ValueError, match="already holds a run .*--overwrite"):
        digits.run(digits.TrainConfig(model="mlp", max_steps=2, out=str(run), progress=False))

    (run / "notes.txt").write_text("mine")
    code, out, err = _main([*TINY, "--max-steps", "3", "--out", str(run), "--overwrite"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == (
        f"--overwrite: removed the earlier run in {run}: config.json, checkpoints/, "
        "metrics.jsonl, summary.json, curves.png"
    )
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: left alone
    assert _summary(run)["steps"] == 3 and _summary(run)["resumed_from_step"] is None
    with Checkpointer(run / "checkpoints") as c:
        assert c.all_steps() == [3]  # the old run's step 6 is gone, not mixed in


@pytest.mark.e2e  # starts a subprocess
def test_second_writer_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with RunLock(str(out)):
        lock = json.loads((out / LOCK_FILE).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        # A real second process: refused at start, before any training.
        res = subprocess.run(
            [sys.executable, "-m", "jaxtrain.apps.cli", "train", *TINY, "--out", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
        assert f"is in use by process {os.getpid()} on host {socket.gethostname()!r}" in res.stderr
        # The library path too.
        with pytest.raises(ValueError, match=f"in use by process {os.getpid()}"):
            digits.run(digits.TrainConfig(model="mlp", max_steps=2, out=str(out), progress=False))
        assert not (out / "config.json").exists()
    assert not (out / LOCK_FILE).exists()  # released


@pytest.mark.e2e  # starts a subprocess
def test_lock_of_another_host_is_refused_and_a_stale_one_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 4242, "started": "x"}))
    code, _, err = _main([*TINY, "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1
    assert "in use by process 4242 on host 'node-7'" in err[0] and "delete the lock file" in err[0]

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"host": socket.gethostname(), "pid": dead.pid, "started": "x", "token": "t"}
    (out / LOCK_FILE).write_text(json.dumps(lock))
    code, _, err = _main([*TINY, "--max-steps", "2", "--out", str(out)], capsys)
    assert code == 0, err
    assert err == [
        f"jaxtrain train: warning: out: taking over the lock of {str(out)!r} left by process "
        f"{dead.pid} on host {socket.gethostname()!r} (started x), which is no longer running "
        "(killed?)."
    ]
    assert not (out / LOCK_FILE).exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--lr", "0.01"], "lr 0.01 (the run has 0.002)"),
        (["--split-seed", "1"], "split_seed 1 (the run has 0)"),
        (["--batch-size", "32", "--seed", "3"], "batch_size 32 (the run has 64), seed 3"),
    ],
)
def test_resume_refuses_a_changed_result_field(run, capsys, change, message):
    code, _, err = _main([*TINY, *change, "--out", str(run), "--resume"], capsys)
    assert code == 2 and len(err) == 1, err
    assert message in err[0] and "--allow-change" in err[0] and "another --out" in err[0]
    assert not (run / LOCK_FILE).exists()  # released after the refusal


def test_same_command_with_resume_appended_continues_through_a_symlink(run, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(run)  # a symlinked --out is followed: it is the folder it points to
    # Flags equal to the saved ones are fine; flags that do not change results may differ.
    code, _, err = _main([*TINY, "--log-every", "2", "--out", str(link), "--resume"], capsys)
    assert code == 0, err
    assert _summary(run)["resumed_from_step"] == 6 and _summary(run)["steps"] == 6
    code, _, err = _main(["--resume", str(link), "--max-steps", "6"], capsys)  # --resume OUT
    assert code == 0, err


def test_allow_change_must_be_exact_and_is_recorded(run, capsys):
    args = [*TINY, "--max-steps", "9", "--out", str(run), "--resume"]
    code, _, err = _main([*args, "--allow-change", "max-steps,lr"], capsys)
    assert code == 2 and len(err) == 1
    assert "lr is listed but unchanged (0.002)" in err[0] and ": max_steps." in err[0]
    code, _, err = _main([*args, "--allow-change", "max-steps,colour"], capsys)
    assert code == 2 and "'colour' is not a field that changes a run's results" in err[0]

    code, _, err = _main([*args, "--allow-change", "max-steps"], capsys)
    assert code == 0, err
    change = {"step": 6, "field": "max_steps", "old": 6, "new": 9}
    recorded = json.loads((run / "config.json").read_text())["changes"]
    assert [{k: c[k] for k in change} for c in recorded] == [change]
    assert _summary(run)["changes"] == recorded and _summary(run)["steps"] == 9
    with Checkpointer(run / "checkpoints") as c:
        meta = c.read_meta(c.latest_step())
    assert meta["step"] == 9 and meta["config"]["changes"] == recorded
    assert meta["config"]["max_steps"] == 9
    # The changed run is now the run: the same command resumes it without a new change.
    code, _, err = _main(args, capsys)
    assert code == 0, err


def test_resume_refuses_a_config_json_that_does_not_match_the_checkpoint(run, capsys):
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "lr": 0.5}))
    code, _, err = _main(["--out", str(run), "--resume", "--no-progress"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "checkpoint step 6 in" in err[0] and "lr 0.002 (config.json: 0.5)" in err[0]
    assert "edited or belongs to another run" in err[0]


def test_cli_falls_back_past_a_damaged_newest_checkpoint(run, capsys):
    for f in (run / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and "/d/" in str(f):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    code, _, err = _main([*TINY, "--out", str(run), "--resume"], capsys)
    assert code == 0, err
    said = "\n".join(err)
    assert "warning: restored checkpoint step 3 instead of newer step(s) [6]" in said
    assert "moved the damaged checkpoint(s) [6] out of the way" in said
    assert (run / "checkpoints-damaged" / "6").is_dir()  # kept, not deleted
    summary = _summary(run)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    assert list(summary["skipped_checkpoints"]) == ["6"]


def test_auto_resume_starts_fresh_then_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--max-steps", "3", "--out", str(out), "--auto-resume"]
    code, _, err = _main(args, capsys)
    assert code == 0, err
    assert _summary(out)["resumed_from_step"] is None
    code, _, err = _main(args, capsys)
    assert code == 0, err
    assert _summary(out)["resumed_from_step"] == 3
    # A run killed before its first checkpoint: the same command starts it over.
    shutil.rmtree(out / "checkpoints")
    code, _, err = _main(args, capsys)
    assert code == 0, err
    assert "saved no checkpoint before it stopped; starting it again" in err[0]
    assert _summary(out)["resumed_from_step"] is None


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ([], "the run diverged: non-finite value at training step"),
        (["--nonfinite", "skip"], "training step(s) were skipped"),
        (["--nonfinite", "off"], "the run diverged: final train loss"),
    ],
)
def test_a_diverged_run_never_exits_0(tmp_path, capsys, policy, message):
    out = tmp_path / "run"
    args = ["--model", "mlp", "--lr", "1e30", "--max-steps", "30", "--no-progress"]
    code, _, err = _main([*args, *policy, "--out", str(out), "--no-checkpoint"], capsys)
    assert code == 1 and len(err) == 1, err
    assert message in err[0] and "Traceback" not in err[0]
    if policy:  # summary.json is strict JSON even with NaN losses in it

        def no_constants(name):
            raise ValueError(f"non-strict JSON token {name}")

        json.loads((out / "summary.json").read_text(), parse_constant=no_constants)


@pytest.mark.unit
def test_dumps_strict_writes_no_nan_tokens():
    s = dumps_strict({"a": [float("nan"), float("inf"), -float("inf"), 1.5]})
    assert s == '{"a": [null, null, null, 1.5]}'


def _write(rel, text):
    def setup(tmp):
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return setup


_OUT = "{out}"
USER_ERRORS = [
    # (id, setup(tmp), argv ({out} = tmp/run), substring of the one line)
    ("out-is-a-file", _write("run", "x"), ["--out", _OUT], "is a file, not a folder"),
    (
        "checkpoints-is-a-file",
        _write("run/checkpoints", "x"),
        ["--out", _OUT],
        "checkpoints' should be a folder of the run but is a file",
    ),
    (
        "checkpoint-step-is-a-file",
        _write("run/checkpoints/40", "x"),
        ["--out", _OUT, "--resume"],
        "where checkpoint step 40 belongs, but it is not a folder",
    ),
    (
        "config-is-a-list",
        _write("run/config.json", "[1, 2]"),
        ["--out", _OUT, "--resume"],
        "must hold a JSON object of configuration fields; got a list",
    ),
    (
        "config-is-a-string",
        _write("run/config.json", '"cnn"'),
        ["--out", _OUT, "--resume"],
        "got a str",
    ),
    (
        "config-lr-is-text",
        _write("run/config.json", '{"lr": "abc"}'),
        ["--out", _OUT, "--resume"],
        "lr must be a number; got 'abc' (str)",
    ),
    (
        "config-epochs-is-bool",
        _write("run/config.json", '{"epochs": true}'),
        ["--out", _OUT, "--resume"],
        "epochs must be an integer; got True (bool)",
    ),
    (
        "config-not-json",
        _write("run/config.json", "{oops"),
        ["--out", _OUT, "--resume"],
        "cannot be read as JSON",
    ),
    (
        "config-is-a-folder",
        lambda t: (t / "run" / "config.json").mkdir(parents=True),
        ["--out", _OUT, "--resume"],
        "cannot be read as JSON (IsADirectoryError",
    ),
    (
        "resume-without-checkpoint",
        _write("run/config.json", '{"model": "mlp"}'),
        ["--out", _OUT, "--resume"],
        "no checkpoint in",
    ),
    ("seed-too-large", None, ["--seed", str(2**64)], "seed must be an integer in [0, 4294967295]"),
    (
        "seed-negative",
        None,
        ["--seed", "-1"],
        "seed must be an integer in [0, 4294967295] (2**32 - 1); got -1",
    ),
    (
        "dangling-symlink",
        lambda t: (t / "run").symlink_to(t / "nowhere"),
        ["--out", _OUT],
        "is a symlink to",
    ),
    ("resume-and-overwrite", None, ["--out", _OUT, "--resume", "--overwrite"], "cannot be comb"),
    ("resume-two-folders", None, ["--out", _OUT, "--resume", "elsewhere"], "different folders"),
    ("allow-change-fresh", None, ["--out", _OUT, "--allow-change", "lr"], "add --resume"),
]


@pytest.mark.unit  # refused before any training
@pytest.mark.parametrize(
    ("setup", "argv", "expected"), [c[1:] for c in USER_ERRORS], ids=[c[0] for c in USER_ERRORS]
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, setup, argv, expected):
    if setup is not None:
        setup(tmp_path)
    argv = [a.replace(_OUT, str(tmp_path / "run")) for a in argv]
    code, _, err = _main([*argv, "--model", "mlp", "--no-progress"], capsys)
    assert code == 2, err
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and expected in err[0], err
