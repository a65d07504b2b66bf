"""A run folder (``OUT``) has one run and one writer: run-file checks, the lock, strict JSON.

`jaxtrain.apps.digits.run` (and so ``jaxtrain train``) uses these to make sure that

* a new run never starts on top of an earlier one (`check_no_run`), unless the user
  asked to replace it (`remove_run`, which says what it removed);
* only one process writes a run folder at a time (`RunLock`, a lock file holding the
  host, process id and start time of its owner; a lock left by a killed process on this
  host is taken over with a warning);
* the lock file is strict JSON (`jaxtrain.writers.dumps_strict`).

What must not live here: what a run writes into the folder (`jaxtrain.apps.digits`) and
checkpoints (`jaxtrain.checkpoint`). Part of `jaxtrain.apps`: the core never imports it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import uuid
import warnings
from typing import Any

from jaxtrain.writers import dumps_strict

LOCK_FILE = ".jaxtrain.lock"
# Everything `jaxtrain train` writes into OUT: what marks a folder as holding a run, and
# all that --overwrite removes (nothing else in the folder is touched).
RUN_FILES = (
    "config.json",
    "checkpoints",
    "checkpoints-damaged",
    "metrics.jsonl",
    "metrics.csv",
    "summary.json",
    "curves.png",
    "tensorboard",
    "profile",
    "mlruns",
    "wandb",
)
RUN_DIRS = ("checkpoints", "checkpoints-damaged", "tensorboard", "profile", "mlruns", "wandb")


def check_out_folder(out: str) -> None:
    """Raises ValueError (one line, with the fix) when ``out`` cannot be a run folder.

    A file where the folder (or one of the run's sub-folders) should be, or a symlink
    that points nowhere. A symlink to a folder is followed: ``--out link`` is the run
    folder it points to (the lock file lives inside it, so two paths to one folder
    still exclude each other).
    """
    if os.path.islink(out) and not os.path.exists(out):
        raise ValueError(
            f"out: {out!r} is a symlink to {os.readlink(out)!r}, which does not exist. "
            "Fix: create the target folder, or pass another --out."
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(
            f"out: {out!r} is a file, not a folder. Fix: pass a folder (new or holding a "
            "jaxtrain run) with --out."
        )
    for name in RUN_DIRS:
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ValueError(
                f"out: {path!r} should be a folder of the run but is a file (or a broken "
                "symlink). Fix: move it away, or pass another --out."
            )
    ckpt = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt):
        for name in sorted(os.listdir(ckpt)):
            path = os.path.join(ckpt, name)
            if name.isdigit() and not os.path.isdir(path):
                raise ValueError(
                    f"out: {path!r} is where checkpoint step {name} belongs, but it is not a "
                    "folder. Fix: move it away (it is no checkpoint)."
                )


def existing_run_files(out: str) -> list[str]:
    """The run files (`RUN_FILES`) present in ``out``, in that order."""
    return [name for name in RUN_FILES if os.path.lexists(os.path.join(out, name))]


def check_no_run(out: str) -> None:
    """Raises ValueError naming the choices when ``out`` already holds a run.

    Example:
        >>> import os, tempfile
        >>> out = tempfile.mkdtemp()
        >>> check_no_run(out)  # empty: fine
        >>> open(os.path.join(out, "config.json"), "w").close()
        >>> check_no_run(out)
        Traceback (most recent call last):
        ...
        ValueError: out: ... already holds a run (config.json). Fix: add --resume to continue it, ...
    """
    found = existing_run_files(out)
    if found:
        raise ValueError(
            f"out: {out!r} already holds a run ({', '.join(found)}). Fix: add --resume to "
            "continue it, choose a new --out, or pass --overwrite to delete its files and "
            "start again."
        )


def remove_run(out: str) -> list[str]:
    """Deletes the run files (`RUN_FILES`) in ``out``; returns what it removed.

    Other files in ``out`` are left alone.
    """
    removed = []
    for name in existing_run_files(out):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(name + "/")
        else:
            os.remove(path)
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return True  # cannot tell: assume alive (refusing is the safe side)
    return True


class RunLockError(ValueError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive lock on a run folder: the file ``OUT/.jaxtrain.lock``.

    The file is strict JSON with the owner's ``host``, ``pid``, ``started`` (ISO time)
    and a random ``token``. It is created atomically (written aside, then hard-linked
    into place, so a reader never sees half a lock). A lock whose owner is a process
    of this host that no longer exists (a killed run) is taken over with a warning; a
    live owner, or one on another host (whose liveness cannot be checked from here),
    makes `acquire` raise `RunLockError` naming it.

    Args:
        out: the run folder (must exist).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> with RunLock(out) as lock:
        ...     try:
        ...         RunLock(out).acquire()
        ...     except RunLockError as e:
        ...         print(str(e)[:40])
        out: ... is in use by process ...
    """

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK_FILE)
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }
        self.held = False

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                owner = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def _create(self) -> bool:
        """Creates the lock file with our info; False if it already exists."""
        tmp = f"{self.path}.{self.info['token']}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dumps_strict(self.info))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create instead
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(dumps_strict(self.info))
            return True
        finally:
            os.remove(tmp)

    def acquire(self) -> RunLock:
        """Takes the lock (or raises `RunLockError`); returns self."""
        for _ in range(2):  # a second try after taking over a stale lock
            if self._create():
                self.held = True
                return self
            owner = self._read()
            if owner is None:  # released meanwhile
                continue
            host, pid = owner.get("host"), owner.get("pid")
            who = (
                f"process {pid} on host {host!r} (started {owner.get('started')})"
                if isinstance(pid, int) and host
                else f"an unknown owner (unreadable lock file {self.path!r})"
            )
            if host == self.info["host"] and isinstance(pid, int) and not _pid_alive(pid):
                warnings.warn(
                    f"out: taking over the lock of {self.out!r} left by {who}, which is no "
                    "longer running (killed?).",
                    RuntimeWarning,
                    stacklevel=2,
                )
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            fix = (
                "wait for it to finish or stop it"
                if host == self.info["host"]
                else "wait for it to finish; if it no longer runs, delete the lock file"
            )
            raise RunLockError(
                f"out: {self.out!r} is in use by {who}: one run folder takes one writer. "
                f"Fix: {fix}, or pass another --out."
                + ("" if host == self.info["host"] else f" (lock: {self.path})")
            )
        raise RunLockError(f"out: could not take the lock {self.path!r}; another run races for it.")

    def release(self) -> None:
        """Removes the lock file if it is still ours."""
        if not self.held:
            return
        self.held = False
        owner = self._read()
        if owner and owner.get("token") == self.info["token"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
