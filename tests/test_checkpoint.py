"""Checkpointer: exact round trips, keep-last + best, exact resume, corrupt and foreign
checkpoints, no pickle, and restoring onto another device count."""

import json
import math
import os
import pathlib
import pickle
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_eval, classification_loss
from jaxtrain.checkpoint import Checkpointer, CheckpointError
from jaxtrain.data import load_digits

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def setup():
    train, test = load_digits()
    train = {k: v[:320] for k, v in train.items()}  # 5 steps of 64 per epoch
    model = jt.from_linen(jt.models.MLP(hidden=(32,), dropout=0.1))
    params, _ = model.init(jax.random.key(0), train["x"][:1])
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3))
    return {
        "model": model,
        "params": params,
        "opt": opt,
        "train_ds": jt.ArrayDataset(train, 64, seed=1),
        "test_ds": jt.ArrayDataset(test, 120, shuffle=False),
        "step": jt.make_train_step(classification_loss(model), opt),
        "eval": jt.make_eval_step(classification_eval(model)),
    }


def _fresh(s):
    return jt.TrainState.create(jax.tree.map(jnp.copy, s["params"]), s["opt"], 7)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_structure_dtypes_shapes_and_values(tmp_path, setup):
    """Optax NamedTuple states, inject_hyperparams and a typed key come back as they were."""
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    )
    state = jt.TrainState.create(
        setup["params"], opt, 3, model_state={"key": jax.random.key(5), "n": jnp.arange(3)}
    )
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(0, state, meta={"note": "hi"})
        ckpt.wait()
        target = jt.TrainState.create(
            jax.tree.map(jnp.zeros_like, setup["params"]),
            opt,
            0,
            model_state={"key": jax.random.key(0), "n": jnp.zeros(3, jnp.int32)},
        )
        r = ckpt.restore(target)
    assert jax.tree.structure(r.state) == jax.tree.structure(state)
    assert type(r.state.opt_state[1]).__name__ == type(state.opt_state[1]).__name__
    assert jnp.issubdtype(r.state.model_state["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(r.state.model_state["key"]),
        jax.random.key_data(state.model_state["key"]),
    )
    plain = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, t
    )
    _leaves_equal(plain(r.state), plain(state))
    assert r.meta["note"] == "hi" and r.step == 0
    assert {"jax", "flax", "optax", "jaxtrain"} <= set(r.meta["versions"])


def test_keep_last_k_plus_best(tmp_path, setup):
    state = _fresh(setup)
    with Checkpointer(tmp_path, keep_last=2, best_metric="accuracy") as ckpt:
        for step, acc in [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, 0.65)]:
            ckpt.save(step, state.replace(step=jnp.int32(step)), eval_metrics={"accuracy": acc})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4, 5]
        assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
    with Checkpointer(tmp_path / "min", keep_last=1, best_metric="loss", best_mode="min") as c:
        for step, loss in [(1, 0.5), (2, 0.2), (3, 0.6)]:
            c.save(step, state, eval_metrics={"loss": loss})
        c.wait()
        assert c.all_steps() == [2, 3] and c.best_step() == 2


@pytest.mark.integration  # two trainings through fit
def test_resume_is_bitwise_identical_with_same_history(tmp_path, setup):
    s = setup
    common = dict(
        eval_step=s["eval"], eval_data=s["test_ds"], log_every=2, progress=False, save_every=3
    )
    with Checkpointer(tmp_path / "a") as ca:
        full, hist_full = jt.fit(
            _fresh(s), s["step"], s["train_ds"], epochs=4, checkpointer=ca, **common
        )
    with Checkpointer(tmp_path / "b") as cb:
        _, h1 = jt.fit(
            _fresh(s), s["step"], s["train_ds"], epochs=4, num_steps=8, checkpointer=cb, **common
        )
        assert cb.latest_step() == 8
        # A different starting state to prove everything comes from the checkpoint.
        other = jt.TrainState.create(jax.tree.map(jnp.ones_like, s["params"]), s["opt"], 99)
        resumed, hist = jt.fit(
            other, s["step"], s["train_ds"], epochs=4, checkpointer=cb, resume=True, **common
        )
    assert int(resumed.step) == int(full.step) == 20
    _leaves_equal(resumed.params, full.params)
    _leaves_equal(resumed.opt_state, full.opt_state)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_second"} for r in rs]  # noqa: E731
    assert strip(hist.train) == strip(hist_full.train)
    assert hist.eval == hist_full.eval
    assert hist.position == hist_full.position == jt.DataPosition(4, 0)
    assert s["step"].trace_count == 1


def test_resume_needs_a_checkpoint_and_the_same_data(tmp_path, setup):
    s = setup
    with Checkpointer(tmp_path) as c:
        with pytest.raises(CheckpointError, match="no checkpoint to restore in .*no committed"):
            jt.fit(
                _fresh(s),
                s["step"],
                s["train_ds"],
                epochs=1,
                checkpointer=c,
                resume=True,
                progress=False,
            )
        # resume="auto" starts afresh when there is none.
        st, _ = jt.fit(
            _fresh(s),
            s["step"],
            s["train_ds"],
            epochs=1,
            checkpointer=c,
            resume="auto",
            progress=False,
        )
        assert c.latest_step() == 5
        other_ds = jt.ArrayDataset(s["train_ds"].arrays, 64, seed=2)
        with pytest.raises(ValueError, match="cannot resume exactly: the checkpoint at step 5"):
            jt.fit(
                _fresh(s),
                s["step"],
                other_ds,
                epochs=2,
                checkpointer=c,
                resume=True,
                progress=False,
            )
    with pytest.raises(ValueError, match="resume and save_every need a checkpointer"):
        jt.fit(_fresh(s), s["step"], s["train_ds"], epochs=1, resume=True, progress=False)


def test_pending_save_is_committed_when_fit_raises(tmp_path, setup):
    s = setup

    def boom(state, history):
        raise KeyboardInterrupt  # what Ctrl-C raises

    with Checkpointer(tmp_path) as c:
        with pytest.raises(KeyboardInterrupt):
            jt.fit(
                _fresh(s),
                s["step"],
                s["train_ds"],
                num_steps=20,
                save_every=4,
                hooks=[jt.PeriodicHook(6, boom)],
                checkpointer=c,
                progress=False,
            )
        assert c.all_steps() == [4, 5]  # every 4 steps and at the epoch end (5 steps)
        assert int(c.restore(_fresh(s)).state.step) == 5


# -- corrupt and foreign checkpoints -------------------------------------------------


@pytest.fixture
def three_checkpoints(tmp_path, setup):
    state = _fresh(setup)
    with Checkpointer(tmp_path, keep_last=5) as c:
        for step in (10, 20, 30):
            c.save(step, state.replace(step=jnp.int32(step)))
    return tmp_path, state


def _array_files(step_dir):
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "step 30 .*(cannot be read|does not match the digest)"),
        ("delete", "step 30 .*(cannot be read|missing)"),
        ("garbage_meta", "step 30 .*metadata .* is not valid JSON"),
        ("missing_meta", "step 30 .*metadata file .* is missing"),
        ("garbage_array_metadata", "step 30 .*array metadata cannot be read"),
        ("flip_bytes", "step 30 .*(does not match the digest|cannot be read)"),
        # tensorstore's own error, under orbax's (which names no leaf): leaf and cause
        (
            "truncate_data",
            r"step 30 .*array data of leaf '[\w.]+' cannot be read \(ValueError: "
            r".*Error reading \"[\w.]+/[0-9.]+\" in OCDBT.*\); a file is missing, truncated",
        ),
    ],
)
def test_corrupt_checkpoint_is_an_error_and_fallback_says_so(three_checkpoints, damage, message):
    root, state = three_checkpoints
    step_dir = root / "30"
    if damage == "truncate":
        for f in _array_files(step_dir):
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    elif damage == "delete":
        for f in _array_files(step_dir):
            f.unlink()
    elif damage == "garbage_meta":
        (step_dir / "meta" / "metadata").write_bytes(b"\x00\xffnot json")
    elif damage == "missing_meta":
        (step_dir / "meta" / "metadata").unlink()
    elif damage == "garbage_array_metadata":
        (step_dir / "state" / "_METADATA").write_text("{garbage")
    elif damage == "truncate_data":  # only the array chunks, not orbax's index of them
        for f in _array_files(step_dir):
            if "ocdbt.process_" in str(f):
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif damage == "flip_bytes":
        for f in _array_files(step_dir):
            b = bytearray(f.read_bytes())
            b[len(b) // 2] ^= 0xFF
            f.write_bytes(bytes(b))
    with Checkpointer(root, keep_last=5) as c:
        with pytest.raises(CheckpointError, match=message):
            c.restore(state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = c.restore(state, fallback=True)
        assert r.step == 20 and list(r.skipped) == [30]
        assert int(r.state.step) == 20
        said = " ".join(str(w.message) for w in caught)
        assert "restored checkpoint step 20 instead of newer step(s) [30]" in said


def test_checkpoint_of_another_model_names_leaf_and_shapes(tmp_path, setup):
    with Checkpointer(tmp_path) as c:
        c.save(5, _fresh(setup))
        c.wait()
        bigger = jt.from_linen(jt.models.MLP(hidden=(48,)))
        p, _ = bigger.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
        target = jt.TrainState.create(p, setup["opt"], 0)
        with pytest.raises(CheckpointError) as e:
            c.restore(target)
    msg = str(e.value)
    assert "checkpoint step 5" in msg
    assert (
        "leaf 'params.Dense_0.bias': saved shape (32,) dtype float32, expected shape (48,)" in msg
    )
    with Checkpointer(tmp_path) as c:
        other_opt = jt.TrainState.create(setup["params"], optax.sgd(0.1), 0)
        with pytest.raises(CheckpointError, match="different state structure: missing leaves"):
            c.restore(other_opt)
        fresh = _fresh(setup)
        f16 = fresh.replace(params=jax.tree.map(lambda x: x.astype(jnp.float16), fresh.params))
        with pytest.raises(
            CheckpointError, match="saved shape .* dtype float32, expected .* float16"
        ):
            c.restore(f16)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_where_a_checkpoint_is_expected_is_never_executed(tmp_path, setup):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    payload = pickle.dumps(_Exploit())
    root = tmp_path / "ckpts"
    with Checkpointer(root) as c:
        c.save(10, _fresh(setup))
    # A "newer checkpoint" made of pickles, under every name a loader might open.
    evil = root / "40"
    for rel in (
        "meta/metadata",
        "state/_METADATA",
        "state/checkpoint",
        "_CHECKPOINT_METADATA",
        "state/manifest.ocdbt",
        "checkpoint.pkl",
    ):
        (evil / rel).parent.mkdir(parents=True, exist_ok=True)
        (evil / rel).write_bytes(payload)
    with Checkpointer(root) as c:
        with pytest.raises(CheckpointError, match="step 40"):
            c.restore(_fresh(setup), step=40)
        r = c.restore(_fresh(setup), fallback=True)
        assert r.step == 10
    assert not marker.exists()


def test_no_pickle_import_in_the_library():
    import ast

    for path in (HERE.parent / "jaxtrain").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert n.split(".")[0] not in {"pickle", "cloudpickle", "dill", "joblib"}, path


def test_partial_save_is_never_the_latest(tmp_path, setup):
    """A save killed mid-write leaves orbax's temporary folder, which is not a checkpoint."""
    with Checkpointer(tmp_path) as c:
        c.save(10, _fresh(setup))
    partial = tmp_path / "20.orbax-checkpoint-tmp-1234567"
    partial.mkdir()
    (partial / "state").mkdir()
    with Checkpointer(tmp_path) as c:
        assert c.all_steps() == [10]
        assert c.restore(_fresh(setup)).step == 10


@pytest.mark.e2e  # starts a subprocess
def test_restore_onto_another_device_count():
    """8 virtual CPU devices -> 1 and 1 -> 8, bitwise (subprocess: the flag needs a fresh jax)."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    res = subprocess.run(
        [sys.executable, str(HERE / "_reshard_script.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"devices": 8, "8_to_1": [1, True], "1_to_8": [8, True]}


# -- saves never fail silently; metadata digest; step folder name ---------------------


def test_save_refuses_steps_that_would_not_be_written(tmp_path, setup):
    state = _fresh(setup)
    with Checkpointer(tmp_path) as c:
        assert c.save(10, state) is True
        for step in (10, 5):  # orbax would return False and write nothing
            with pytest.raises(
                ValueError, match=rf"cannot save checkpoint step {step} .*step\(s\) \[10\]"
            ):
                c.save(step, state)
        for bad in (-1, True, 2.5, "30", None):
            with pytest.raises(ValueError, match="checkpoint step must be a non-negative integer"):
                c.save(bad, state)
        assert c.save(np.int64(20), state)
        c.wait()
        # An explicit rewind: deletes 20 (and anything newer), then saves 15.
        assert c.save(15, state, overwrite=True)
        c.wait()
        assert c.all_steps() == [10, 15]
        c._manager.save = lambda *a, **k: False  # orbax's silent "no" becomes an error
        with pytest.raises(CheckpointError, match="orbax did not save checkpoint step 16"):
            c.save(16, state)
    # A stray step folder with a huge number blocks every later save, loudly.
    (tmp_path / "15").rename(tmp_path / "1000000")
    with Checkpointer(tmp_path) as c:
        with pytest.raises(ValueError, match=r"step 20 .*\[1000000\]"):
            c.save(20, state)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("edit_meta", "step 30 .*its metadata .* does not match the SHA-256 saved with it"),
        ("rename", "folder is named 40 but holds the checkpoint of step 30"),
    ],
)
def test_metadata_digest_and_step_folder_name_are_checked(three_checkpoints, damage, message):
    root, state = three_checkpoints
    newest = 30
    meta_path = root / "30" / "meta" / "metadata"
    if damage == "edit_meta":  # valid JSON, one value changed (e.g. the data position)
        meta = json.loads(meta_path.read_text())
        meta["versions"]["jax"] += "x"
        meta_path.write_text(json.dumps(meta))
    else:
        (root / "30").rename(root / "40")
        newest = 40
    with Checkpointer(root, keep_last=5) as c:
        with pytest.raises(CheckpointError, match=message):
            c.restore(state)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            r = c.restore(state, fallback=True)
    assert r.step == 20 and list(r.skipped) == [newest]


def test_metadata_with_non_finite_metrics_is_strict_json_and_round_trips(tmp_path):
    """A NaN pending metric (a diverging run with nonfinite='skip') is saved as strict JSON
    and read back as the same float, so a resumed run logs what the uninterrupted one does."""
    state = jt.TrainState.create({"w": jnp.arange(3.0)}, optax.sgd(0.1), jax.random.key(0))
    meta = {"pending_metrics": [{"loss": float("nan"), "grad_norm": float("inf")}], "x": -math.inf}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, meta=meta)
        ckpt.wait()
        text = (tmp_path / "ckpt" / "1" / "meta" / "metadata").read_text()

        def refuse(token):
            raise ValueError(f"non-strict JSON token {token}")

        json.loads(text, parse_constant=refuse)  # strict: no NaN / Infinity tokens
        back = ckpt.read_meta(1)
    assert math.isnan(back["pending_metrics"][0]["loss"])
    assert back["pending_metrics"][0]["grad_norm"] == math.inf
    assert back["x"] == -math.inf


# -- sharded saves and remote paths (issue 13) ----------------------------------------


def test_save_hands_orbax_the_device_arrays_and_records_blocking_time(tmp_path, setup, monkeypatch):
    """No host copy in save: orbax gets the jax.Arrays as they are sharded (it copies each
    process's own shards), and the metadata gets one digest per array."""
    import orbax.checkpoint as ocp

    seen = []
    real = ocp.args.StandardSave

    def spy(item, *a, **k):
        seen.append(item)
        return real(item, *a, **k)

    monkeypatch.setattr(ocp.args, "StandardSave", spy)
    state = _fresh(setup)
    with Checkpointer(tmp_path) as c:
        c.save(3, state)
        c.wait()
        meta = c.read_meta(3)
        assert len(c.save_blocking_seconds) == 1 and 0 < c.save_blocking_seconds[0] < 60
    leaves = jax.tree.leaves(seen[0])
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    params = jax.tree.leaves(state.params)
    assert {x.sharding for x in jax.tree.leaves(seen[0].params)} == {x.sharding for x in params}
    names = [jt.checkpoint.leaf_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(seen[0])]
    assert sorted(meta["state_digests"]) == sorted(names) and meta["format"] == 3


def test_remote_url_reaches_orbax_unchanged(monkeypatch):
    """gs://bucket/run is not made a local folder (os.path.abspath would give
    ./gs:/bucket/run), and the metadata is read through orbax, not opened as a file."""
    import orbax.checkpoint as ocp

    calls = {}

    class FakeManager:
        def __init__(self, directory, options=None, item_handlers=None):
            calls["directory"] = directory

        def all_steps(self):
            return [4]

        def reload(self):
            pass

        def restore(self, step, args=None):
            calls["restore"] = (step, sorted(args.keys()))
            meta = {"format": 3, "step": step}
            meta["meta_sha256"] = jt.checkpoint.meta_digest(meta)
            return {"meta": meta}

    monkeypatch.setattr(ocp, "CheckpointManager", FakeManager)
    c = Checkpointer("gs://bucket/run")
    assert str(calls["directory"]) == "gs://bucket/run" and c.directory == "gs://bucket/run"
    assert c.read_meta(4)["step"] == 4 and calls["restore"] == (4, ["meta"])
    assert not os.path.exists("gs:")


def test_restore_verifies_each_array_against_its_saved_digest(three_checkpoints):
    """The per-array digest is checked after reading (on the devices): a digest that does
    not match names the step and the leaf; fallback then takes the older checkpoint."""
    root, state = three_checkpoints
    meta_path = root / "30" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    leaf = "params.Dense_0.kernel"
    assert set(meta["state_digests"]) >= {leaf, "step", "rng"}
    meta["state_digests"][leaf] = "0" * 16  # as if the array's bytes had changed
    meta["meta_sha256"] = jt.checkpoint.meta_digest(meta)
    meta_path.write_text(json.dumps(meta))
    with Checkpointer(root, keep_last=5) as c:
        with pytest.raises(
            CheckpointError,
            match=rf"step 30 .*array data of leaf '{leaf}' does not match the digest",
        ):
            c.restore(state)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert c.restore(state, fallback=True).step == 20


def test_a_save_that_fails_in_the_background_is_an_error_naming_its_step(tmp_path, monkeypatch):
    """The digests and the metadata are written in orbax's background commit: a failure
    there (here the digest read-back; a full disk the same) commits nothing, and the next
    wait() or save() raises a CheckpointError naming the step that was not written."""
    import jaxtrain.checkpoint as jc

    state = jt.TrainState.create({"w": jnp.arange(3.0)}, optax.sgd(0.1), jax.random.key(0))
    real = jc.to_hex

    def broken(digests):
        raise RuntimeError("digest read-back failed")

    with Checkpointer(tmp_path / "ckpt") as c:
        c.save(1, state)
        c.wait()
        monkeypatch.setattr(jc, "to_hex", broken)
        assert c.save(2, state) is True  # started; fails in the background
        with pytest.raises(
            CheckpointError,
            match=r"saving checkpoint step\(s\) \[2\] in .* failed in the background "
            r"\(RuntimeError: digest read-back failed\); not written \(committed steps: \[1\]",
        ):
            c.wait()
        assert c.all_steps() == [1]
        c.save(3, state)  # the next save surfaces it too, before starting its own
        with pytest.raises(CheckpointError, match=r"step\(s\) \[3\] .* failed in the background"):
            c.save(4, state)
        monkeypatch.setattr(jc, "to_hex", real)
        c.save(5, state)  # saving goes on once the cause is gone
        c.wait()
        assert c.all_steps() == [1, 5]


def test_a_url_scheme_orbax_cannot_write_is_named():
    with pytest.raises(
        ValueError, match=r"'file:///tmp/run'.*URL scheme 'file://' is not one .*gs://.*Fix"
    ):
        Checkpointer("file:///tmp/run")


def test_typed_keys_come_back_with_their_own_prng_implementation(tmp_path):
    """Typed keys used to be re-wrapped with JAX's default implementation: an "rbg" key
    (4 words) failed to restore, and under jax_default_prng_impl=rbg an "unsafe_rbg" key
    came back as an "rbg" one (same shape: other random numbers after a resume)."""
    keys = {impl: jax.random.key(3, impl=impl) for impl in ("rbg", "unsafe_rbg", "threefry2x32")}
    state = jt.TrainState.create({"w": jnp.arange(3.0)}, optax.sgd(0.1), 0, model_state=keys)
    with Checkpointer(tmp_path / "ckpt") as c:
        c.save(1, state)
        c.wait()
        back = c.restore(state).state.model_state
    for impl, key in keys.items():
        assert str(jax.random.key_impl(back[impl])) == str(jax.random.key_impl(key)) == impl
        np.testing.assert_array_equal(jax.random.key_data(back[impl]), jax.random.key_data(key))


def _save_format_2(directory, step, state):
    """What the previous release (format 2, commit c44dd58) wrote, through the same orbax
    calls: host numpy copies of the state (typed keys as key data), one SHA-256 over them,
    and JSON metadata carrying it and its own SHA-256."""
    import orbax.checkpoint as ocp

    host = jax.tree.map(
        lambda x: np.asarray(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        ),
        state,
    )
    meta = {"format": 2, "step": step, "state_sha256": jt.checkpoint.state_digest(host)}
    meta["meta_sha256"] = jt.checkpoint.meta_digest(meta)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as m:
        m.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)
            ),
        )
        m.wait_until_finished()


def test_a_format_2_checkpoint_of_the_previous_release_restores_bitwise(tmp_path):
    """NaN payloads, -0.0, bfloat16, int8, bool, uint32 and a typed key, bitwise; damaged
    array data is still caught by the format-2 SHA-256, and fallback passes over it."""
    import ml_dtypes

    nans = np.array([0x7FC00001, 0xFFC00000, 0x80000000], np.uint32).view(np.float32)
    bf16 = np.array([0x7FC1, 0x8000, 0x3F80], np.uint16).view(ml_dtypes.bfloat16)
    extra = {"i8": jnp.arange(-3, 4, dtype=jnp.int8), "on": jnp.array([True, False])}
    extra |= {"u32": jnp.array([2**32 - 1, 7], jnp.uint32), "k": jax.random.key(5)}
    params = {"n": jnp.asarray(nans), "b": jnp.asarray(bf16), "w": jnp.ones((40, 40))}
    state = jt.TrainState.create(params, optax.adam(1e-3), 0, model_state=extra)
    _save_format_2(tmp_path, 5, state)
    _save_format_2(tmp_path, 9, state.replace(step=jnp.int32(9)))
    with Checkpointer(tmp_path) as c:
        r = c.restore(state)
        assert r.step == 9 and r.meta["format"] == 2
        for a, b in zip(
            jax.tree.leaves(r.state), jax.tree.leaves(state.replace(step=jnp.int32(9))), strict=True
        ):
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            assert np.asarray(a).dtype == np.asarray(b).dtype
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    meta_path = tmp_path / "9" / "meta" / "metadata"
    meta = json.loads(meta_path.read_text())
    meta["state_sha256"] = "0" * 64  # as if the array data had changed
    meta["meta_sha256"] = jt.checkpoint.meta_digest(meta)
    meta_path.write_text(json.dumps(meta))
    with Checkpointer(tmp_path) as c:
        with pytest.raises(CheckpointError, match="step 9 .*does not match the SHA-256"):
            c.restore(state)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert c.restore(state, fallback=True).step == 5


def test_close_waits_for_orbaxs_tmp_cleanup_thread(tmp_path):
    """A process exiting right after close (a refused resume) printed orbax's thread traceback.

    orbax's CheckpointManager starts the clean-up of stale tmp folders in a thread and its
    own close does not wait for it; Checkpointer.close does (found: `jaxtrain train
    --resume` refused in one line, then a 50-line "cannot schedule new futures after
    interpreter shutdown" traceback at exit, about one run in four).
    """
    c = Checkpointer(str(tmp_path / "ckpts"))
    c.close()
    assert getattr(c._manager, "_cleanup_tmp_directory_future", None) is None
