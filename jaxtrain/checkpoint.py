"""Checkpoints with orbax: asynchronous saves, exact resume, and loads that never lie.

A checkpoint step folder holds two orbax items:

* ``state``: the `TrainState` arrays, written *as they are sharded*: each process writes
  its own shards through orbax (tensorstore), with no gather and no full host copy;
* ``meta``: JSON — data position, run configuration, metrics history, loop counters,
  library versions, a digest of every array of the state (``state_digests``, see
  `jaxtrain.digests`: computed shard by shard on the devices, independent of the
  sharding), and a SHA-256 of the metadata itself (``meta_sha256``, over its canonical
  JSON without that field).

The training thread blocks only while orbax copies this process's shards to the host
(`Checkpointer.save_blocking_seconds` records it per save); the digests are read back
and the metadata written in orbax's background commit. (orbax's zarr-in-OCDBT format
keeps a CRC32C of its index, the manifest and b-tree nodes, not of the compressed array
chunks, so the data needs the digests.)

Restoring checks the metadata's digest and that the step recorded inside it is the step
folder's name, checks the saved array metadata against the expected state (leaf paths,
shapes, dtypes) *before* reading any data, reads each device's part directly into the
target shardings (any mesh), and checks every array's digest *after*, on the devices.
So a checkpoint of another model, a truncated file, flipped bytes in the arrays or the
metadata, or a renamed step folder is an error naming the checkpoint step and the
problem, never a silent load of wrong values. The digests protect against accidental
damage, not deliberate edits: anyone can recompute them.

Directories go through ``etils.epath`` (orbax's path type): a ``gs://bucket/run`` URL
reaches orbax as it is (only local paths are made absolute).

Saving never fails silently: a step at or below one already saved (or being saved) is
an error unless ``overwrite=True`` replaces the newer checkpoints explicitly.

What must not live here: when the loop saves, resumes or stops for a preemption
(`jaxtrain.checkpointing`), and run folders (`jaxtrain.apps.run_folder`). It never imports
the loop, the applications (`jaxtrain.apps`, `jaxtrain.contrast`) or torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from jaxtrain.digests import device_digests, to_hex
from jaxtrain.parallel import state_shardings
from jaxtrain.versions import versions

FORMAT_VERSION = 3  # 3: per-array device digests; 2: meta_sha256, state_sha256
READABLE_FORMATS = (1, 2, 3)  # 1: written before meta_sha256 (not verified)


class CheckpointError(ValueError):
    """A checkpoint cannot be restored (missing, corrupt, or of a different model)."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns.

    Attributes:
        state: the restored state, with the target's pytree structure, shapes, dtypes
            and shardings.
        meta: the JSON metadata saved with it (position, config, history, ...).
        step: the checkpoint step that was restored.
        skipped: ``{step: reason}`` for newer checkpoints passed over by ``fallback``.
    """

    state: Any
    meta: dict
    step: int
    skipped: dict[int, str] = dataclasses.field(default_factory=dict)


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_name(path: Sequence[Any]) -> str:
    """A dotted leaf name as orbax writes it (``opt_state.0.mu.Dense_0.kernel``)."""
    return ".".join(_key_name(k) for k in path)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _saveable(state: Any) -> Any:
    """``state`` as orbax writes it: typed PRNG keys become their uint32 key data.

    The arrays stay where they are (sharded on the devices); orbax copies each
    process's own shards to the host before `Checkpointer.save` returns, so the training
    loop is free to donate and overwrite the device buffers right after.
    """
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _checkpoint_path(directory: str | os.PathLike) -> tuple[str, epath.Path]:
    """``(text, path)`` of a checkpoint directory: URLs as given, local paths absolute.

    ``os.path.abspath("gs://bucket/run")`` would give a local folder ``./gs:/bucket/run``;
    a string with a scheme (``gs://``, ``s3://``, ...) is handed to orbax as it is.
    """
    text = os.fspath(directory)
    if "://" in text:
        try:
            return text.rstrip("/"), epath.Path(text)
        except KeyError:  # etils' registry of URL schemes: a bare KeyError('file://')
            from etils.epath import register

            known = sorted(register._URI_PREFIXES_TO_CLS)  # gs://, s3://, ...
            raise ValueError(
                f"checkpoint directory {text!r}: the URL scheme "
                f"{text.split('://', 1)[0] + '://'!r} is not one etils.epath (orbax's path "
                f"type) supports ({', '.join(known)}). Fix: use one of those, or a local "
                "path without a scheme (e.g. /tmp/run rather than file:///tmp/run)."
            ) from None
    text = os.path.abspath(text)
    return text, epath.Path(text)


def _host_leaf(x: Any) -> np.ndarray:
    """The whole value of one leaf on this host (only to verify format 1-2 checkpoints).

    A replicated array (also one spanning several processes) is read from a local
    copy. An array split across processes (FSDP over machines) is gathered from all of
    them: every process must call this together, as `Checkpointer.save` is called.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def state_digest(host_state: Any) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes, in pytree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(host_state):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def meta_digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys) of ``meta`` without ``meta_sha256``."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


_FLOAT_TAG = "$float"  # strict JSON has no NaN/Infinity: {"$float": "nan"} stands for one


def _encode_nonfinite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by ``{"$float": "nan" | "inf" | "-inf"}``.

    The metadata stays strict JSON (a NaN metric of a diverging run would otherwise be
    written as a bare ``NaN`` token, which strict parsers reject), and
    `_decode_nonfinite` gives the exact float back, so a resumed run folds a NaN pending
    metric into its next record as the uninterrupted run does.
    """
    if isinstance(x, float) and not math.isfinite(x):
        return {_FLOAT_TAG: "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
    if isinstance(x, dict):
        return {k: _encode_nonfinite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_encode_nonfinite(v) for v in x]
    return x


def _decode_nonfinite(x: Any) -> Any:
    """The inverse of `_encode_nonfinite`."""
    if isinstance(x, dict):
        if len(x) == 1 and x.get(_FLOAT_TAG) in ("nan", "inf", "-inf"):
            return float(x[_FLOAT_TAG])
        return {k: _decode_nonfinite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode_nonfinite(v) for v in x]
    return x


def _check_step(step: Any) -> int:
    """The step as a Python int; ValueError for bools, non-integers and negatives."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise ValueError(
            f"checkpoint step must be a non-negative integer; got {step!r} "
            f"({type(step).__name__}). Fix: pass the training step, e.g. int(state.step)."
        )
    if step < 0:
        raise ValueError(
            f"checkpoint step must be a non-negative integer; got {int(step)}. "
            "Fix: pass the training step, e.g. int(state.step)."
        )
    return int(step)


def _abstract(target: Any, mesh: Mesh | None) -> Any:
    """ShapeDtypeStructs with shardings to restore into (typed keys as key data).

    With a mesh, the layout is `jaxtrain.parallel.state_shardings`: replicated on a
    data mesh, split by the FSDP rule on a mesh with an ``fsdp`` axis.
    """
    target = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, target)
    if mesh is not None:
        shardings = state_shardings(target, mesh)
    else:
        shardings = jax.tree.map(
            lambda x: (
                getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
            ),
            target,
        )
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh), target, shardings
    )


class _MetaHandler(ocp.JsonCheckpointHandler):
    """orbax's JSON handler, whose item may be a function called in the background commit.

    `Checkpointer.save` passes a function that waits for the state's device digests and
    returns the finished metadata: the training thread never waits for them. Only the
    primary process writes (and so calls it), as in ``JsonCheckpointHandler``.
    """

    async def _save_fn(self, x: Any, directory: epath.Path) -> None:
        from orbax.checkpoint import utils

        if utils.is_primary_host(self._primary_host):
            item = x() if callable(x) else x
            (directory / self._filename).write_text(json.dumps(item))


@ocp.args.register_with_handler(_MetaHandler, for_save=True)
@dataclasses.dataclass
class _MetaSave(ocp.args.CheckpointArgs):
    """`_MetaHandler`'s save argument: the metadata, or a function returning it."""

    item: Any


@ocp.args.register_with_handler(_MetaHandler, for_restore=True)
@dataclasses.dataclass
class _MetaRestore(ocp.args.CheckpointArgs):
    """`_MetaHandler`'s restore argument (nothing to say: the JSON is read as it is)."""

    item: Any = None


class Checkpointer:
    """Saves and restores training checkpoints with ``orbax.checkpoint.CheckpointManager``.

    Args:
        directory: where step folders go (created if missing).
        keep_last: keep the newest this many checkpoints.
        best_metric: also keep the best checkpoint by this eval metric (from the
            ``eval_metrics`` given to `save`), e.g. ``"accuracy"``.
        best_mode: ``"max"`` or ``"min"`` for ``best_metric``.
        async_save: write in a background thread (the device→host copy of this
            process's shards happens before `save` returns). `wait`/`close` (and
            `fit`, also on an exception or Ctrl-C) wait for it.

    Attributes:
        directory: the directory as text (a local path made absolute, or a URL such as
            ``gs://bucket/run`` as given).
        save_blocking_seconds: for each `save` of this object, how long it blocked the
            caller (checks, the device→host copy of this process's shards, starting
            the background write).

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, optax
        >>> from jaxtrain import TrainState
        >>> state = TrainState.create({"w": jnp.arange(3.0)}, optax.sgd(0.1), jax.random.key(0))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> with Checkpointer(os.path.join(tmp.name, "ckpt"), keep_last=2) as ckpt:
        ...     started = ckpt.save(100, state, meta={"note": "hello"})
        ...     ckpt.wait()  # async_save: block until the write is committed
        ...     restored = ckpt.restore(state)  # ``state`` gives structure, shapes, dtypes
        >>> restored.step, restored.meta["note"], restored.state.params["w"].tolist()
        (100, 'hello', [0.0, 1.0, 2.0])
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1; got {keep_last!r}.")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min'; got {best_mode!r}.")
        self.directory, self._path = _checkpoint_path(directory)
        if "://" not in self.directory:  # remote stores: orbax creates it (create=True)
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as e:
                raise ValueError(
                    f"checkpoint directory {self.directory!r} cannot be created "
                    f"({e.strerror}). Fix: choose a writable folder."
                ) from None
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        policies = [pp.LatestN(n=keep_last)]
        if best_metric is not None:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",  # BestN keeps the last n after sorting
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # a save killed half-way leaves only a tmp folder
        )
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._started: set[int] = set()  # steps this object saved (in flight or committed)
        self.save_blocking_seconds: list[float] = []
        # Handlers named up front, so a fresh process can read metadata before any save.
        self._manager = ocp.CheckpointManager(
            self._path,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": _MetaHandler()},
        )

    # -- saving ---------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        meta: Mapping[str, Any] | None = None,
        eval_metrics: Mapping[str, float] | None = None,
        overwrite: bool = False,
    ) -> bool:
        """Starts saving ``state`` (and JSON ``meta``) as checkpoint ``step``.

        Returns once this process's shards of the state are copied to the host; the
        write continues in the background (every process writes its own shards, and
        the primary process the metadata). A checkpoint becomes visible to `restore`
        only once fully written (orbax writes to a temporary folder and renames it on
        commit). In a multi-process run every process calls it, with the same step.

        Args:
            step: the training step (the folder name): a non-negative integer above
                every step already saved or being saved.
            state: the `TrainState` (any pytree of arrays).
            meta: JSON-serialisable extras (position, config, history, ...).
            eval_metrics: metrics used to rank checkpoints for ``best_metric``.
            overwrite: first delete every checkpoint at ``step`` or newer (waiting for
                pending saves), then save: an explicit rewind. Without it such a step
                is an error.

        Returns:
            True: the save started (every other outcome raises).

        Raises:
            ValueError: ``step`` is a bool, not an integer, negative, or at or below a
                step already saved or being saved (without ``overwrite``).
            CheckpointError: orbax declined to save (the message names the step).
        """
        step = _check_step(step)
        existing = sorted(set(self._manager.all_steps()) | self._started)
        newer = [s for s in existing if s >= step]
        if newer and not overwrite:
            raise ValueError(
                f"cannot save checkpoint step {step} in {self.directory}: step(s) {newer} "
                f"are already saved or being saved there (newest {existing[-1]}), and "
                "checkpoint steps must grow. Fix: save a later step, use another directory "
                "(e.g. a new --out), or pass overwrite=True to delete the newer steps first."
            )
        if newer:
            self._wait_pending()
            self._manager.reload()
            for s in sorted(self._manager.all_steps()):
                if s >= step:
                    self._manager.delete(s)
            self._started = {s for s in self._started if s < step}
        began = time.perf_counter()
        # orbax waits for the previous save anyway; waiting here first turns its
        # background failure into an error that names that step (not this one).
        self._wait_pending()
        saveable = _saveable(state)
        named = jax.tree_util.tree_leaves_with_path(saveable)
        # Started now on the devices that hold the shards; read back in the background.
        digests = device_digests([x for _, x in named])
        names = [leaf_name(p) for p, _ in named]
        full_meta = {
            "format": FORMAT_VERSION,
            "step": step,
            **_versions(),
            "eval_metrics": dict(eval_metrics) if eval_metrics else None,
            **(dict(meta) if meta else {}),
        }
        # A snapshot, taken now: the write happens in the background, and the caller's
        # lists (e.g. the metrics history) keep growing meanwhile. Also fails here, in the
        # caller, if meta is not JSON-ready.
        full_meta = _encode_nonfinite(json.loads(json.dumps(full_meta)))

        def finished_meta() -> dict:  # runs in orbax's background commit
            done = {**full_meta, "state_digests": dict(zip(names, to_hex(digests), strict=True))}
            done["meta_sha256"] = meta_digest(done)
            return done

        metrics = None
        if self.best_metric is not None and eval_metrics and self.best_metric in eval_metrics:
            metrics = {self.best_metric: float(eval_metrics[self.best_metric])}
        started = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(saveable),
                meta=_MetaSave(finished_meta),
            ),
            metrics=metrics,
        )
        if not started:  # orbax's silent "no": never pass it on as a return value
            raise CheckpointError(
                f"orbax did not save checkpoint step {step} in {self.directory} (its steps: "
                f"{sorted(self._manager.all_steps())}). Fix: save a later step, or use "
                "another directory."
            )
        self._started.add(step)
        self.save_blocking_seconds.append(time.perf_counter() - began)
        return True

    def set_aside(self, step: int) -> str:
        """Moves checkpoint ``step`` out of the directory (into ``DIRECTORY-damaged``).

        For a damaged step passed over by ``restore(fallback=True)``: a resumed run saves
        that step number again, which needs the folder gone; moving (not deleting)
        keeps the evidence. Returns the new path.
        """
        step = _check_step(step)
        self._manager.wait_until_finished()
        dest_root = epath.Path(self.directory + "-damaged")
        dest_root.mkdir(parents=True, exist_ok=True)
        dest = dest_root / str(step)
        n = 1
        while dest.exists():
            dest = dest_root / f"{step}.{n}"
            n += 1
        (self._path / str(step)).rename(dest)
        self._manager.reload()
        self._started.discard(step)
        return os.fspath(dest)

    def wait(self) -> None:
        """Blocks until every started save is committed.

        Raises:
            CheckpointError: a save failed in the background (a full disk, a failed
                digest, ...); the message names its step, which was not written.
        """
        self._wait_pending()

    def _wait_pending(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            # orbax drops the step it could not finish: it never becomes visible.
            self._manager.reload()
            committed = set(self._manager.all_steps())
            failed = sorted(self._started - committed)
            self._started &= committed
            raise CheckpointError(
                f"saving checkpoint step(s) {failed} in {self.directory} failed in the "
                f"background ({type(e).__name__}: {_short(e)}); not written (committed "
                f"steps: {sorted(committed)}, intact). Fix: remove the cause (e.g. a full "
                "disk, a folder without write permission), then save again."
            ) from e

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources (raises as `wait`)."""
        try:
            self._wait_pending()
        finally:
            # orbax's close does not wait for the clean-up of stale tmp folders that its
            # constructor starts in a thread (cleanup_tmp_directories=True): a process that
            # exits right after (a refused resume, a one-line CLI error) then printed that
            # thread's "cannot schedule new futures after interpreter shutdown" traceback.
            # Private in orbax 0.11-0.13, hence getattr: without it, nothing is awaited.
            await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
            if await_cleanup is not None:
                await_cleanup()
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inspecting ------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Committed checkpoint steps, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None without one or any metrics)."""
        if self.best_metric is None:
            return None
        scored = []
        for s in self.all_steps():
            try:
                m = (self.read_meta(s).get("eval_metrics") or {}).get(self.best_metric)
            except CheckpointError:
                continue
            if m is not None:
                scored.append((m if self.best_mode == "max" else -m, s))
        return max(scored)[1] if scored else None

    # -- restoring -------------------------------------------------------------------

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint ``step`` (raises `CheckpointError`)."""
        # Through orbax's handler (not its file layout), so that any store orbax reads works.
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=_MetaRestore()))["meta"]
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: its metadata file (item 'meta') "
                "is missing, so the checkpoint is incomplete or not a jaxtrain checkpoint."
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: its metadata (item 'meta') is "
                f"not valid JSON ({type(e).__name__}: {_short(e)}); the checkpoint is corrupt."
            ) from None
        if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: metadata has no jaxtrain "
                f"format {FORMAT_VERSION} marker (got format={_get(meta, 'format')!r})."
            )
        if meta["format"] >= 2 and meta.get("meta_sha256") != meta_digest(meta):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: its metadata (item 'meta') does "
                "not match the SHA-256 saved with it; the file was changed or damaged after "
                "saving."
            )
        if meta.get("step") != step:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: the folder is named {step} but "
                f"holds the checkpoint of step {meta.get('step')!r} (renamed or copied?). "
                f"Fix: rename it back to {meta.get('step')!r}, or remove it."
            )
        return _decode_nonfinite(meta)

    def _check_layout(self, step: int, target: Any) -> None:
        """Compares saved leaf names/shapes/dtypes with the target before reading data."""
        try:
            saved_tree = self._manager.item_metadata(step)["state"]
            saved_tree = getattr(saved_tree, "tree", saved_tree)
        except Exception as e:  # orbax raises many kinds for unreadable metadata
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: the array metadata cannot be "
                f"read ({type(e).__name__}: {_short(e)}); the checkpoint is corrupt."
            ) from None
        if saved_tree is None:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: the array metadata is missing; "
                "the checkpoint is corrupt."
            )
        saved = {
            m.name: m
            for m in jax.tree.leaves(saved_tree, is_leaf=lambda x: hasattr(x, "shape"))
            if hasattr(m, "shape") and hasattr(m, "name")
        }
        expected = {
            leaf_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(_abstract(target, None))
        }
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        if missing or extra:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} was saved from a different state "
                f"structure: missing leaves {missing[:5]}, unexpected leaves {extra[:5]}. "
                "Fix: restore it with the model and optimizer it was trained with."
            )
        for name, want in expected.items():
            got = saved[name]
            if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} does not match the expected "
                    f"state at leaf '{name}': saved shape {tuple(got.shape)} dtype "
                    f"{np.dtype(got.dtype)}, expected shape {tuple(want.shape)} dtype "
                    f"{np.dtype(want.dtype)}. Fix: restore it with the model it was trained "
                    "with, or start a new run in another directory."
                )

    def _restore_one(self, step: int, target: Any, mesh: Mesh | None) -> Restored:
        meta = self.read_meta(step)
        self._check_layout(step, target)
        abstract = _abstract(target, mesh)
        try:
            state = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )["state"]
        except Exception as e:
            leaf, cause = _unreadable_leaf(e)
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: the array data"
                f"{f' of leaf {leaf!r}' if leaf else ''} cannot be read "
                f"({type(cause).__name__}: {_short(cause)}); a file is missing, truncated or "
                "damaged."
            ) from None
        self._verify(step, meta, state)
        # Typed keys in the target come back as typed keys, of the target's PRNG
        # implementation (not the default one: an "rbg" key's data would be refused, or
        # read as another implementation's key of the same shape).
        state = jax.tree.map(
            lambda t, x: (
                jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x
            ),
            target,
            state,
        )
        return Restored(state=state, meta=meta, step=step)

    def _verify(self, step: int, meta: Mapping[str, Any], state: Any) -> None:
        """Checks the restored arrays against the digests saved with them.

        Format 3: per-array digests, computed on the devices where the restored shards
        are (no gather). Formats 1-2 (older jaxtrain): one SHA-256 over host copies.
        """
        if meta.get("format", 0) < 3:
            digest = state_digest(jax.tree.map(_host_leaf, state))
            if digest != meta.get("state_sha256"):
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory}: the array data does not "
                    "match the SHA-256 saved with it; the files were changed or damaged "
                    "after saving."
                )
            return
        named = jax.tree_util.tree_leaves_with_path(state)
        got = dict(
            zip(
                (leaf_name(p) for p, _ in named),
                to_hex(device_digests([x for _, x in named])),
                strict=True,
            )
        )
        saved = meta.get("state_digests") or {}
        bad = sorted(n for n in got if saved.get(n) != got[n])
        if bad:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory}: the array data of leaf "
                f"'{bad[0]}'{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} does not "
                "match the digest saved with it; the files were changed or damaged after "
                "saving."
            )

    def restore(
        self,
        target: Any,
        step: int | None = None,
        *,
        fallback: bool = False,
        mesh: Mesh | None = None,
    ) -> Restored:
        """Restores checkpoint ``step`` (default: the newest) into the shape of ``target``.

        Args:
            target: a state with the expected structure, shapes and dtypes (e.g. a
                freshly created `TrainState`); its values are not used.
            step: which checkpoint; None for the newest committed one.
            fallback: if the chosen checkpoint cannot be restored, try older ones and
                warn about each one passed over.
            mesh: place the restored state on this mesh (any device count and any
                layout, whatever the saving run used): replicated on a data mesh,
                split by the FSDP rule (`jaxtrain.parallel.state_shardings`) on a mesh with an
                ``fsdp`` axis. None: the target's shardings (e.g. a target placed
                with `jaxtrain.shard_state`).

        Returns:
            A `Restored`.

        Raises:
            CheckpointError: no checkpoint, or none that restores cleanly; the message
                names each checkpoint step tried and its problem.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(
                f"no checkpoint to restore in {self.directory}: the folder has no committed "
                "checkpoint step. Fix: point to the run's checkpoint folder, or start a new run."
            )
        if step is not None and step not in steps:
            raise CheckpointError(
                f"checkpoint step {step} is not in {self.directory}; available steps: {steps}."
            )
        candidates = [step] if step is not None else sorted(steps, reverse=True)
        if fallback and step is not None:
            candidates += sorted((s for s in steps if s < step), reverse=True)
        problems: dict[int, str] = {}
        for s in candidates:
            try:
                restored = self._restore_one(s, target, mesh)
            except CheckpointError as e:
                if not fallback:
                    raise
                problems[s] = str(e)
                continue
            if problems:
                msg = (
                    f"restored checkpoint step {s} instead of newer step(s) "
                    f"{sorted(problems, reverse=True)}, which could not be restored: "
                    + " | ".join(problems.values())
                )
                warnings.warn(msg, RuntimeWarning, stacklevel=2)  # (once: not also logged)
            restored.skipped = problems
            return restored
        raise CheckpointError(
            f"no checkpoint in {self.directory} restores cleanly: " + " | ".join(problems.values())
        )


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


# tensorstore names the key it failed to read: ``Error reading "params.w/0.1" in OCDBT ...``
# (the leaf, then the chunk's index).
_TS_KEY = re.compile(r'Error reading "([^"]+)/[0-9.]+" in OCDBT')


def _unreadable_leaf(e: BaseException) -> tuple[str | None, BaseException]:
    """The leaf whose array data failed to read (None if unknown), and the root error.

    orbax wraps tensorstore's error in one that prints the whole TensorStore spec and
    no leaf name; the message uses the innermost error, which says what went wrong
    (a truncated stream, a corrupt chunk, a missing file) and for which key.
    """
    chain = [e]
    while len(chain) < 16 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    for x in reversed(chain):
        m = _TS_KEY.search(str(x))
        if m:
            return m.group(1), x
    return None, chain[-1]


def _short(e: BaseException, limit: int = 300) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + "..."


def _versions() -> dict[str, Any]:
    return {"versions": versions()}
