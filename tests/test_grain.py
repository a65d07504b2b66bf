"""GrainData: fit fed from grain — fixed-shape masked batches, seeded shuffling, epochs,
iterator state in the checkpoint (bitwise-exact resume), batches put on the device one
ahead, grain worker processes, and clear errors."""

import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain as jt
from jaxtrain.apps.tasks import classification_loss
from jaxtrain.checkpoint import Checkpointer, meta_digest
from jaxtrain.data import DataPosition, load_digits

N, B = 200, 32  # 7 batches per epoch, the last one 8 real + 24 padding


@pytest.fixture(scope="module")
def setup():
    train, _ = load_digits()
    x, y = train["x"][:N].reshape(N, -1), train["y"][:N]
    records = [{"x": x[i], "y": y[i]} for i in range(N)]
    model = jt.from_linen(jt.models.MLP(hidden=(16,), dropout=0.1))
    params, _ = model.init(jax.random.key(0), x[:1])
    opt = optax.adam(3e-3)
    loss = classification_loss(model)
    return {
        "records": records,
        "params": params,
        "opt": opt,
        "step": jt.make_train_step(loss, opt),
        "fused": jt.make_train_steps(loss, opt, steps_per_call=3),
    }


def _fresh(s):
    return jt.TrainState.create(jax.tree.map(jnp.copy, s["params"]), s["opt"], 7)


def _indexed(n=N, shape=(2,)):
    return [{"i": np.int32(i), "x": np.full(shape, i, np.float32)} for i in range(n)]


def _order(data, epoch):
    return np.concatenate([b["i"][b["mask"] > 0] for b in data.batches(epoch)])


def test_batches_have_fixed_shapes_a_padded_last_batch_and_every_record_once():
    data = jt.GrainData(_indexed(), B, seed=3)
    assert data.steps_per_epoch == 7
    batches = list(data.batches(0))
    assert len(batches) == 7
    for b in batches:
        assert {k: v.shape for k, v in b.items()} == {"i": (B,), "x": (B, 2), "mask": (B,)}
        assert b["mask"].dtype == np.float32
    assert batches[-1]["mask"].tolist() == [1.0] * 8 + [0.0] * 24
    np.testing.assert_array_equal(batches[-1]["x"][8:], 0.0)  # zero padding
    # Real rows: every record exactly once, rows consistent with their record.
    order = _order(data, 0)
    assert sorted(order.tolist()) == list(range(N))
    for b in batches:
        real = b["mask"] > 0
        np.testing.assert_array_equal(b["x"][real][:, 0], b["i"][real])


def test_shuffle_is_seeded_per_epoch_and_reproducible():
    a, b = jt.GrainData(_indexed(), B, seed=3), jt.GrainData(_indexed(), B, seed=3)
    np.testing.assert_array_equal(_order(a, 0), _order(b, 0))  # same seed, same order
    np.testing.assert_array_equal(_order(a, 2), _order(b, 2))
    assert not np.array_equal(_order(a, 0), _order(a, 1))  # a new order every epoch
    assert not np.array_equal(_order(a, 0), _order(jt.GrainData(_indexed(), B, seed=4), 0))
    # Not seed + epoch: (seed 3, epoch 1) differs from (seed 4, epoch 0).
    assert not np.array_equal(_order(a, 1), _order(jt.GrainData(_indexed(), B, seed=4), 0))
    plain = jt.GrainData(_indexed(), B, shuffle=False)
    np.testing.assert_array_equal(_order(plain, 0), np.arange(N))


def test_drop_remainder_and_mid_epoch_start():
    data = jt.GrainData(_indexed(), B, seed=1, drop_remainder=True)
    assert data.steps_per_epoch == 6
    batches = list(data.batches(1))
    assert len(batches) == 6 and all(b["mask"].all() for b in batches)
    # Starting at batch 4 serves the same batches 4, 5 (read and dropped, no state kept).
    late = list(jt.GrainData(_indexed(), B, seed=1, drop_remainder=True).batches(1, start=4))
    for got, want in zip(late, batches[4:], strict=True):
        np.testing.assert_array_equal(got["i"], want["i"])


def test_iter_dataset_source_is_batched_padded_and_counted_per_epoch():
    def per_epoch(epoch):
        return grain.MapDataset.source(_indexed(50)).shuffle(seed=epoch).to_iter_dataset()

    data = jt.GrainData(per_epoch, 16)
    assert data.steps_per_epoch is None
    e0, e1 = list(data.batches(0)), list(data.batches(1))
    assert [int(b["mask"].sum()) for b in e0] == [16, 16, 16, 2]
    assert sorted(np.concatenate([b["i"][b["mask"] > 0] for b in e1]).tolist()) == list(range(50))
    assert not np.array_equal(e0[0]["i"], e1[0]["i"])


def _params_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _untimed(records):
    return [{k: v for k, v in r.items() if k != "examples_per_second"} for r in records]


def _map_source(records):
    return records


def _iter_source(records):
    def per_epoch(epoch):
        ds = grain.MapDataset.source(records).shuffle(seed=100 + epoch)
        return ds.map(lambda r: {**r, "x": r["x"] * 2}).to_iter_dataset()

    return per_epoch


@pytest.mark.parametrize(
    ("source", "step_key", "stop_at", "resume_at"),
    [
        # Resume from the save at step 10 (epoch 1, batch 3), taken while fit had already
        # read batch 4 ahead; the newer checkpoint at 12 is deleted.
        (_map_source, "step", 12, 10),
        (_iter_source, "step", 9, 9),  # an IterDataset pipeline; epoch 1, batch 2
        # 3 steps per call, saved at step 10 with the next group of 3 read ahead.
        (_map_source, "fused", 13, 10),
    ],
    ids=["map", "iter", "fused"],
)
def test_resume_from_checkpoint_is_bitwise_identical(
    tmp_path, setup, source, step_key, stop_at, resume_at
):
    """Stopped mid-epoch, resumed from the checkpoint with fresh objects (as after a
    restart): the same parameters, bit for bit, and the same log records."""
    step = setup[step_key]

    def data():
        return jt.GrainData(source(setup["records"]), B, seed=5)

    common = dict(epochs=3, log_every=4, progress=False)
    full, full_hist = jt.fit(_fresh(setup), step, data(), **common)

    directory = tmp_path / "ckpt"
    with Checkpointer(directory, async_save=False) as ckpt:
        part, _ = jt.fit(
            _fresh(setup),
            step,
            data(),
            num_steps=stop_at,
            save_every=5,
            checkpointer=ckpt,
            **common,
        )
        assert int(part.step) == stop_at and resume_at in ckpt.all_steps()
    for newer in range(resume_at + 1, stop_at + 1):
        shutil.rmtree(directory / str(newer), ignore_errors=True)
    with Checkpointer(directory, async_save=False) as ckpt:
        assert ckpt.latest_step() == resume_at
        meta = ckpt.read_meta(resume_at)
        assert meta["data_state"]["index"] == resume_at - 7  # mid-epoch 1 ...
        assert meta["data_state"]["grain"]  # ... with grain's iterator state
        resumed, hist = jt.fit(
            _fresh(setup), step, data(), checkpointer=ckpt, resume=True, **common
        )
    assert int(resumed.step) == int(full.step) == 21
    _params_equal(resumed.params, full.params)
    _params_equal(resumed.opt_state, full.opt_state)
    assert _untimed(hist.train) == _untimed(full_hist.train)
    assert hist.position == full_hist.position == DataPosition(3, 0)


def test_fit_puts_grain_batches_on_the_device_one_batch_ahead(setup):
    served = []

    class Counting(jt.GrainData):
        def batches(self, epoch=0, start=0):
            for b in super().batches(epoch, start):
                served.append((epoch, b))
                yield b

    calls = []

    def step(state, batch):
        calls.append(len(served))
        assert all(isinstance(v, jax.Array) for v in batch.values())  # already on device
        return setup["step"](state, batch)

    data = Counting(setup["records"], B, seed=0, read_threads=2, prefetch=4)
    jt.fit(_fresh(setup), step, data, epochs=1, progress=False)
    # When step i runs, batch i + 1 has been read and transferred (except after the last).
    assert calls == [min(i + 2, 7) for i in range(7)]
    assert setup["step"].trace_count == 1  # padded last batch: no recompilation


@pytest.mark.e2e  # grain worker processes
def test_grain_worker_processes_serve_the_same_batches_and_resume():
    """worker_count > 0: grain reads in spawned processes (mp_prefetch); same batches,
    and its (differently shaped) iterator state restores mid-epoch."""
    ref = [b["i"] for b in jt.GrainData(_indexed(96), 16, seed=2).batches(0)]
    data = jt.GrainData(_indexed(96), 16, seed=2, worker_count=1)
    it = data.batches(0)
    first = [next(it)["i"] for _ in range(2)]
    saved = json.loads(json.dumps(data.iterator_state(DataPosition(0, 2))))
    it.close()
    again = jt.GrainData(_indexed(96), 16, seed=2, worker_count=1)
    again.restore(saved, DataPosition(0, 2), step=2)
    rest = [b["i"] for b in again.batches(0, 2)]
    for got, want in zip(first + rest, ref, strict=True):
        np.testing.assert_array_equal(got, want)


# -- errors ---------------------------------------------------------------------------


def test_non_dict_records_are_a_clear_error(setup):
    data = jt.GrainData(list(range(10)), 4)
    with pytest.raises(
        TypeError,
        match=r"every grain record must be a dict of arrays.*record 0 of a batch is a int",
    ):
        jt.fit(_fresh(setup), setup["step"], data, epochs=1, progress=False)


def test_ragged_records_are_a_clear_error():
    records = _indexed(8)
    records[5] = {"i": np.int32(5), "x": np.zeros(3, np.float32)}
    with pytest.raises(
        ValueError,
        match=r"records of a batch must have the same entries, shapes.*'x': \(\(\(2,\), 'float32'\), \(\(3,\), 'float32'\)\)",
    ):
        list(jt.GrainData(records, 8, shuffle=False).batches(0))


def test_shapes_that_change_between_batches_are_a_clear_error(setup):
    records = [
        r if i < 64 else {**r, "x": np.zeros(10, np.float32)}
        for i, r in enumerate(setup["records"])
    ]
    with pytest.raises(
        ValueError, match=r"every batch must have the same entries, shapes and dtypes"
    ):
        jt.fit(
            _fresh(setup),
            setup["step"],
            jt.GrainData(records, B, shuffle=False),
            epochs=1,
            progress=False,
        )


@pytest.mark.parametrize(
    ("source", "kwargs", "error", "message"),
    [
        (5, {}, TypeError, r"source must be a grain.MapDataset.*got int"),
        ("loader", {}, TypeError, r"not a grain.DataLoader.*pass the loader's data source"),
        ([], {}, ValueError, r"source is empty \(0 records\)"),
        ("records", {"batch_size": 0}, ValueError, r"batch_size must be an integer >= 1; got 0"),
        ("records", {"seed": -1}, ValueError, r"seed must be an integer in \[0, 4294967295\]"),
        (
            "records",
            {"seed": 2**32},
            ValueError,
            r"GrainData seed must be an integer in \[0, 4294967295\] \(2\*\*32 - 1\); got "
            r"4294967296.*Fix",
        ),
        ("records", {"num_classes": 0}, ValueError, r"num_classes must be a positive integer"),
        (
            "records",
            {"batch_size": 50, "drop_remainder": True},
            ValueError,
            r"every batch would be dropped",
        ),
        ("iter", {"shuffle": True}, ValueError, r"shuffle applies to random-access sources"),
    ],
)
def test_bad_arguments_are_clear_errors(source, kwargs, error, message):
    if source == "loader":
        source = grain.DataLoader(
            data_source=_indexed(8), sampler=grain.samplers.IndexSampler(8, num_epochs=1, seed=0)
        )
    elif source == "records":
        source = _indexed(10)
    elif source == "iter":
        source = grain.MapDataset.source(_indexed(10)).to_iter_dataset()
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(error, match=message):
        jt.GrainData(source, **kwargs)


def test_reserved_mask_entry_and_bad_callable_are_clear_errors():
    with pytest.raises(ValueError, match=r"'mask' is reserved for the padding mask"):
        next(jt.GrainData([{"x": 1.0, "mask": 1.0}] * 4, 2).batches(0))
    with pytest.raises(
        TypeError, match=r"must return a grain.IterDataset .* for epoch 0; got list"
    ):
        next(jt.GrainData(lambda epoch: [1, 2], 2).batches(0))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, setup):
    """A checkpoint at step 3 (epoch 0, batch 3) of a GrainData run with seed 5."""
    directory = tmp_path_factory.mktemp("grain_ckpt")
    with Checkpointer(directory, async_save=False) as ckpt:
        data = jt.GrainData(setup["records"], B, seed=5)
        jt.fit(_fresh(setup), setup["step"], data, num_steps=3, checkpointer=ckpt, progress=False)
    return directory


def _tampered(saved_run, tmp_path, change):
    directory = tmp_path / "ckpt"
    shutil.copytree(saved_run, directory)
    path = os.path.join(directory, "3", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    change(meta)
    # A deliberate edit re-stamps the metadata digest (which guards against damage, not
    # edits), so the iterator-state checks below are what must catch it.
    meta["meta_sha256"] = meta_digest(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    return directory


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m["data_state"].update(grain={"bogus": 1}),
            r"cannot resume exactly: grain rejects the iterator state saved in the checkpoint at "
            r"step 3 \(KeyError: 'next_index'\); this pipeline differs",
        ),
        (
            lambda m: m.update(data_state=None),
            r"the checkpoint at step 3 is at batch 3 of epoch 0 but holds no grain iterator state",
        ),
        (
            lambda m: m["data_state"].update(index=2),
            r"iterator state in the checkpoint at step 3 is for \(epoch, batch\) \(0, 2\) but the "
            r"checkpoint's position is \(0, 3\)",
        ),
    ],
    ids=["foreign-state", "no-state", "other-position"],
)
def test_checkpoint_with_a_mismatched_iterator_state_is_a_clear_error(
    saved_run, tmp_path, setup, change, message
):
    directory = _tampered(saved_run, tmp_path, change)
    with Checkpointer(directory) as ckpt, pytest.raises(ValueError, match=message):
        jt.fit(
            _fresh(setup),
            setup["step"],
            jt.GrainData(setup["records"], B, seed=5),
            epochs=1,
            checkpointer=ckpt,
            resume=True,
            progress=False,
        )


def test_resuming_with_another_seed_or_workers_is_a_clear_error(saved_run, setup):
    for other in (dict(seed=6), dict(seed=5, worker_count=1)):
        with (
            Checkpointer(saved_run) as ckpt,
            pytest.raises(
                ValueError,
                match=r"cannot resume exactly: the checkpoint at step 3 was trained on data",
            ),
        ):
            jt.fit(
                _fresh(setup),
                setup["step"],
                jt.GrainData(setup["records"], B, **other),
                epochs=1,
                checkpointer=ckpt,
                resume=True,
                progress=False,
            )


def test_bad_values_are_caught_per_batch_on_the_host():
    """NaN inputs and out-of-range labels fail as the batch is served, naming it."""
    records = _indexed(10)
    records[6] = {"i": np.int32(6), "x": np.array([0.0, np.inf], np.float32)}
    data = jt.GrainData(records, batch_size=4, shuffle=False)
    batches = data.batches(0)
    next(batches)  # records 0-3 are fine
    with pytest.raises(
        ValueError,
        match=r"GrainData batch 1 of epoch 0: batch\['x'\] holds inf at index \(2, 1\) "
        r"\(example 2 of the batch\).*Fix",
    ):
        next(batches)
    labels = [{"x": np.zeros(2, np.float32), "y": np.int32(i % 3)} for i in range(8)]
    with pytest.raises(ValueError, match=r"batch\['y'\] holds the label 2 .*in \[0, 2\)"):
        list(jt.GrainData(labels, batch_size=4, shuffle=False, num_classes=2).batches(0))
    labels[5]["y"] = np.int32(-1)
    with pytest.raises(ValueError, match=r"batch 1 of epoch 0: batch\['y'\] holds the label -1"):
        list(jt.GrainData(labels, batch_size=4, shuffle=False).batches(0))
    # label_key=None: an integer entry that is not class labels is not checked.
    assert len(list(jt.GrainData(labels, 4, shuffle=False, label_key=None).batches(0))) == 2


def test_each_process_reads_only_its_rows_and_the_global_batches_stay_the_same():
    """Per-host reading (multi-process training): rows [lo, hi) of every global batch
    read only those records; the rows of all processes, stacked, are today's batches
    (same seed, shuffled, the padded last batch included), and a mid-epoch resume state
    saved by the whole-batch pipeline continues the per-process one."""

    class Counted(list):
        reads: list

        def __getitem__(self, i):
            self.reads.append(i)
            return super().__getitem__(i)

    records = Counted({"x": np.full(2, i, np.float32), "y": np.int32(i % 3)} for i in range(20))
    records.reads = []
    data = jt.GrainData(records, batch_size=8, seed=5, read_threads=1)
    whole = list(data.batches(epoch=1))
    parts, reads = [], []
    for lo in (0, 4):  # process 0 of 2, then process 1
        records.reads = []
        parts.append(list(data.batches(epoch=1, rows=slice(lo, lo + 4))))
        reads.append(set(records.reads))
    # Each process reads only its rows: disjoint sets, together every record (process 1
    # also reads one record for the shapes of its all-padding rows of the last batch).
    assert len(reads[0]) == 12 and len(reads[1] - reads[0]) == 8
    assert reads[0] | reads[1] == set(range(20))
    assert len(whole) == len(parts[0]) == len(parts[1]) == 3
    for i, batch in enumerate(whole):
        for k in batch:
            np.testing.assert_array_equal(
                np.concatenate([parts[0][i][k], parts[1][i][k]]), batch[k], err_msg=f"{i} {k}"
            )
    assert parts[1][2]["mask"].tolist() == [0.0] * 4  # rows 20..23 of 20 records: padding
    # A position saved mid-epoch restores onto the per-process reader.
    data.restore(
        {"epoch": 1, "index": 1, "grain": data.iterator_state(DataPosition(1, 1))["grain"]},
        DataPosition(1, 1),
    )
    rest = list(data.batches(epoch=1, start=1, rows=slice(0, 4)))
    np.testing.assert_array_equal(rest[0]["x"], parts[0][1]["x"])
    with pytest.raises(ValueError, match=r"rows=\.\.\.\) needs a random-access source"):
        stream = jt.GrainData(lambda e: grain.MapDataset.source(list(records)).to_iter_dataset(), 8)
        next(stream.batches(0, rows=slice(0, 4)))
