"""ArrayDataset batching, shuffling and positions; load_digits and its stratified split."""

import hashlib
import itertools
import json

import numpy as np
import pytest

from jaxtrain import ArrayDataset, DataPosition
from jaxtrain import data as data_lib
from jaxtrain.data import load_digits, stratified_split_indices

N, B = 10, 4


def _arrays(n=N):
    return {
        "x": np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 1.0,  # no zero rows
        "id": np.arange(n, dtype=np.int32),
    }


def _ids(batch):
    """The ids of the real (unpadded) examples of a batch."""
    return batch["id"][batch["mask"] == 1].tolist()


def _epoch_ids(ds, epoch):
    return [i for b in ds.batches(epoch) for i in _ids(b)]


def test_every_batch_has_the_same_shapes_and_dtypes():
    ds = ArrayDataset(_arrays(), B, seed=0)
    batches = list(ds.batches(0))
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"x", "id", "mask"}
        assert batch["x"].shape == (B, 3) and batch["x"].dtype == np.float32
        assert batch["id"].shape == (B,) and batch["id"].dtype == np.int32
        assert batch["mask"].shape == (B,) and batch["mask"].dtype == np.float32


def test_padding_is_zero_and_masked():
    ds = ArrayDataset(_arrays(), B, seed=0)
    last = list(ds.batches(0))[-1]
    np.testing.assert_array_equal(last["mask"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(last["x"][2:], 0.0)
    np.testing.assert_array_equal(last["id"][2:], 0)
    assert np.all(last["x"][:2] > 0)  # real rows are real data
    for batch in list(ds.batches(0))[:-1]:
        np.testing.assert_array_equal(batch["mask"], 1.0)


@pytest.mark.parametrize("n,b", [(10, 4), (12, 4), (1, 3), (7, 1), (100, 32)])
def test_every_example_appears_exactly_once_per_epoch(n, b):
    ds = ArrayDataset(_arrays(n), b, seed=3)
    for epoch in range(3):
        ids = _epoch_ids(ds, epoch)
        assert sorted(ids) == list(range(n))
    assert sum(float(b_["mask"].sum()) for b_ in ds.batches(0)) == n


def test_rows_stay_together():
    ds = ArrayDataset(_arrays(), B, seed=1)
    for batch in ds.batches(2):
        real = batch["mask"] == 1
        np.testing.assert_array_equal(batch["x"][real], _arrays()["x"][batch["id"][real]])


def test_epochs_have_different_orders_and_seeds_are_reproducible():
    ds = ArrayDataset(_arrays(100), 32, seed=0)
    orders = [_epoch_ids(ds, e) for e in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders[0] != list(range(100))  # actually shuffled
    again = ArrayDataset(_arrays(100), 32, seed=0)
    assert [_epoch_ids(again, e) for e in range(3)] == orders
    other = ArrayDataset(_arrays(100), 32, seed=1)
    assert _epoch_ids(other, 0) != orders[0]
    np.testing.assert_array_equal(ds.order(1), orders[1])


def test_no_shuffle_serves_stored_order_every_epoch():
    ds = ArrayDataset(_arrays(), B, shuffle=False)
    for epoch in range(3):
        assert _epoch_ids(ds, epoch) == list(range(N))


def test_drop_remainder_drops_the_tail():
    ds = ArrayDataset(_arrays(), B, seed=0, drop_remainder=True)
    batches = list(ds.batches(0))
    assert len(batches) == ds.steps_per_epoch == len(ds) == 2
    for batch in batches:
        np.testing.assert_array_equal(batch["mask"], 1.0)
    ids = _epoch_ids(ds, 0)
    assert len(ids) == len(set(ids)) == 8
    # The dropped examples are the last two of this epoch's order.
    assert ids == ds.order(0)[:8].tolist()


@pytest.mark.parametrize(
    "n,b,drop,expected",
    [(10, 4, False, 3), (10, 4, True, 2), (12, 4, False, 3), (12, 4, True, 3), (3, 5, False, 1)],
)
def test_steps_per_epoch(n, b, drop, expected):
    ds = ArrayDataset(_arrays(n), b, drop_remainder=drop)
    assert ds.steps_per_epoch == expected == len(ds) == len(list(ds.batches(0)))


def test_batches_start_equals_skipping():
    ds = ArrayDataset(_arrays(23), 4, seed=5)
    full = list(ds.batches(1))
    for k in range(len(full) + 1):
        tail = list(ds.batches(1, start=k))
        assert len(tail) == len(full) - k
        for a, b in zip(tail, full[k:], strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_iterate_continues_across_epoch_boundaries():
    ds = ArrayDataset(_arrays(), B, seed=2)
    items = list(itertools.islice(ds.iterate(), 8))
    positions = [p for p, _ in items]
    assert positions == [
        DataPosition(0, 0),
        DataPosition(0, 1),
        DataPosition(0, 2),
        DataPosition(1, 0),
        DataPosition(1, 1),
        DataPosition(1, 2),
        DataPosition(2, 0),
        DataPosition(2, 1),
    ]
    expected = list(ds.batches(0)) + list(ds.batches(1)) + list(ds.batches(2))[:2]
    for (_, got), want in zip(items, expected, strict=True):
        np.testing.assert_array_equal(got["id"], want["id"])
        np.testing.assert_array_equal(got["mask"], want["mask"])


def test_iterate_resumes_from_a_position():
    ds = ArrayDataset(_arrays(), B, seed=2)
    reference = list(itertools.islice(ds.iterate(), 7))
    resumed = list(itertools.islice(ds.iterate(DataPosition(epoch=1, index=1)), 3))
    assert [p for p, _ in resumed] == [p for p, _ in reference[4:7]]
    for (_, a), (_, b) in zip(resumed, reference[4:7], strict=True):
        np.testing.assert_array_equal(a["id"], b["id"])
    assert [p for p, _ in itertools.islice(ds.iterate(DataPosition(0, 3)), 1)] == [
        DataPosition(1, 0)
    ]


def test_data_position_round_trips_through_json():
    pos = DataPosition(epoch=3, index=17)
    d = pos.to_dict()
    assert d == {"epoch": 3, "index": 17}
    assert DataPosition.from_dict(json.loads(json.dumps(d))) == pos
    assert DataPosition.from_dict({"epoch": "2", "index": np.int64(5)}) == DataPosition(2, 5)
    assert DataPosition() == DataPosition(0, 0)


def test_iter_is_epoch_zero():
    ds = ArrayDataset(_arrays(), B, seed=4)
    assert [_ids(b) for b in ds] == [_ids(b) for b in ds.batches(0)]


# -------------------------------------------------------------------------- errors


def test_empty_dataset_errors():
    with pytest.raises(ValueError, match="non-empty dict"):
        ArrayDataset({}, 4)
    with pytest.raises(ValueError, match=r"empty \(0 examples\)"):
        ArrayDataset({"x": np.zeros((0, 3))}, 4)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_batch_size_errors(bad):
    with pytest.raises(ValueError) as exc:
        ArrayDataset(_arrays(), bad)
    msg = str(exc.value)
    assert "batch_size must be an integer >= 1" in msg
    assert repr(bad) in msg


def test_mismatched_lengths_error_names_the_lengths():
    with pytest.raises(ValueError) as exc:
        ArrayDataset({"x": np.zeros((10, 3)), "y": np.zeros(9)}, 4)
    msg = str(exc.value)
    assert "same leading length" in msg
    assert "'x': 10" in msg and "'y': 9" in msg


def test_scalar_array_is_rejected():
    with pytest.raises(ValueError, match="same leading length"):
        ArrayDataset({"x": np.zeros((10, 3)), "s": np.float32(1.0)}, 4)


def test_mask_key_is_reserved():
    with pytest.raises(ValueError, match="'mask' is reserved"):
        ArrayDataset({"x": np.zeros((10, 3)), "mask": np.ones(10)}, 4)


def test_drop_remainder_with_batch_larger_than_dataset_errors():
    with pytest.raises(ValueError) as exc:
        ArrayDataset(_arrays(), 11, drop_remainder=True)
    msg = str(exc.value)
    assert "batch_size=11" in msg and "10 examples" in msg
    assert "Fix" in msg
    # Without drop_remainder it is fine: one padded batch.
    assert ArrayDataset(_arrays(), 11).steps_per_epoch == 1


def test_negative_seed_errors():
    with pytest.raises(
        ValueError, match=r"seed must be an integer in \[0, 4294967295\] \(2\*\*32 - 1\); got -1"
    ):
        ArrayDataset(_arrays(), 4, seed=-1)


def test_seed_range_is_the_key_range_at_both_ends():
    """jax.random.key keeps 32 bits: 2**32 would shuffle exactly like seed 0."""
    for ok in (0, 2**32 - 1):
        assert ArrayDataset(_arrays(), 4, seed=ok).seed == ok
    ArrayDataset(_arrays(), 4, seed=2**32 - 1).order(0)  # a usable key
    for bad in (2**32, 2**63, -1, 1.0, True):
        with pytest.raises(ValueError, match=rf"seed must be .*got {bad!r}\..*Fix"):
            ArrayDataset(_arrays(), 4, seed=bad)


def test_negative_labels_are_refused_without_num_classes():
    arrays = {"x": np.zeros((6, 2), np.float32), "y": np.array([0, 1, 2, -1, 0, 1])}
    with pytest.raises(ValueError, match=r"labels 'y' must be >= 0.*found -1 at index \(3,\)"):
        ArrayDataset(arrays, 4)
    ArrayDataset(arrays, 4, label_key=None)  # explicitly not labels: accepted
    with pytest.raises(ValueError, match=r"in \[0, 2\) for 2 classes; found 2"):
        ArrayDataset(arrays, 4, num_classes=2)


def test_check_batch_names_entry_index_and_value():
    from jaxtrain.data import check_batch

    x = np.zeros((4, 3), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"^b 7: batch\['x'\] holds nan at index \(2, 1\) \(example 2 of"
    ):
        check_batch({"x": x}, "b 7")
    # A padded (mask 0) row is never read: NaN there, or a label of -100, is fine.
    mask = np.array([1, 1, 0, 1], np.float32)
    check_batch({"x": x, "y": np.array([0, 1, -100, 2]), "mask": mask}, "b")
    with pytest.raises(ValueError, match=r"batch\['y'\] holds the label -100 at index \(1,\)"):
        check_batch({"y": np.array([0, -100, 1, 1]), "mask": mask}, "b")
    with pytest.raises(ValueError, match=r"in \[0, 3\).*Fix"):
        check_batch({"y": np.array([0, 3])}, "b", num_classes=3)
    for bad in (-0.5, 1.5, np.inf):
        with pytest.raises(
            ValueError, match=rf"batch\['mask'\] holds {bad!r} at index \(1,\).*\[0, 1\]"
        ):
            check_batch({"mask": np.array([1.0, bad], np.float32)}, "b")
    # Device arrays are not read back (no host sync per step).
    import jax.numpy as jnp

    check_batch({"x": jnp.full(2, jnp.nan)}, "b")


# -------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_load_digits_shapes_and_dtypes(digits):
    train, test = digits
    assert set(train) == set(test) == {"x", "y"}
    assert train["x"].shape == (1437, 8, 8, 1)
    assert test["x"].shape == (360, 8, 8, 1)
    assert train["y"].shape == (1437,) and test["y"].shape == (360,)
    for split in digits:
        assert split["x"].dtype == np.float32
        assert split["y"].dtype == np.int32
        assert split["x"].min() == 0.0 and split["x"].max() == 1.0
        assert set(np.unique(split["y"]).tolist()) == set(range(10))


def test_load_digits_is_stratified(digits):
    train, test = digits
    p_train = np.bincount(train["y"], minlength=10) / len(train["y"])
    p_test = np.bincount(test["y"], minlength=10) / len(test["y"])
    np.testing.assert_allclose(p_train, p_test, atol=0.005)


def test_load_digits_is_deterministic(digits):
    train, test = digits
    train2, test2 = load_digits()
    for a, b in ((train, train2), (test, test2)):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])
    # Train and test are disjoint (no test image appears in train).
    train_set = {row.tobytes() for row in train["x"]}
    assert not any(row.tobytes() in train_set for row in test["x"])
    # Another seed gives another split.
    assert not np.array_equal(load_digits(seed=1)[0]["y"], train["y"])


# --- The bundled digits and the split without scikit-learn ---------------------------------
# SHA-256 digests of load_digits(test_fraction, seed) as it was before the data were bundled
# (git c44dd58: sklearn.datasets.load_digits() scaled by 1/16, then
# sklearn.model_selection.train_test_split(x, y, test_size=test_fraction,
# random_state=seed, stratify=y)), computed with scikit-learn 1.9.1 and numpy 2.4.6 by
# hashing, for train then test, "x"/"y": dtype, shape and bytes (`_split_digest`). The new
# loader (bundled .npz + jaxtrain's own split) must reproduce them bit for bit. (0.013, 5)
# holds out 24 rows, which leaves remainders to share out: the tie-breaking draws.
SKLEARN_SPLIT_DIGESTS = {
    (0.2, 0): "fac3fa1f050312e9c4690d1e58b02a142f97f67229ff6e8f2607b2263fe7ea99",
    (0.2, 1): "56753e2df9c3f3024a0f41e62803f13d063c083ad183cece0dc7aa2cc659c4ff",
    (0.25, 7): "3447f0aced9eda8823fd0c0294a56cf5de270c4e98b8b7ce0f3b022e60a515bf",
    (0.1, 123): "527f3f6da1c4aa18559f553cac3485f43a4aeb1a63d2a1aa27d1990e9b7262aa",
    (0.5, 4294967295): "14a8a6eded5cbb104b94b246eb6ac20fcb321a214770c5215dd847ac3ce727a5",
    (0.013, 5): "f44bfd3cb5f9fa02945a53ec6e898a0d4e602df40e0b97593306d14a0afd2945",
}


def _split_digest(train, test):
    h = hashlib.sha256()
    for part in (train, test):
        for key in ("x", "y"):
            a = np.ascontiguousarray(part[key])
            h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("fraction_seed", sorted(SKLEARN_SPLIT_DIGESTS), ids=str)
def test_load_digits_is_bitwise_the_scikit_learn_arrays_and_split(fraction_seed):
    assert _split_digest(*load_digits(*fraction_seed)) == SKLEARN_SPLIT_DIGESTS[fraction_seed]


def _index_digest(train, test):
    h = hashlib.sha256()
    for a in (train, test):
        a = np.ascontiguousarray(a, dtype=np.int64)
        h.update(f"{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# Other labels than the digits: imbalanced classes (2 to 34 rows) and string labels. The
# digests are of train_test_split(np.arange(N), test_size=..., random_state=...,
# stratify=y)'s index arrays (int64 shape and bytes), scikit-learn 1.9.1.
@pytest.mark.parametrize(
    "y, fraction, seed, sizes, digest",
    [
        (
            np.repeat(np.arange(7), [2, 3, 5, 8, 13, 21, 34]),
            0.3,
            11,
            (60, 26),
            "8e223c00fd3bd03bceea3d786ea479bb76214b8ccb72768349310800ecbf950e",
        ),
        (
            np.array(list("abcab" * 9 + "cc")),
            0.37,
            2024,
            (29, 18),
            "cb8cae01de8a2179e3ba920a2366ec6cd8dc8b99c0590d80e00984dcbf690e2c",
        ),
    ],
    ids=["imbalanced", "strings"],
)
def test_stratified_split_indices_match_scikit_learn(y, fraction, seed, sizes, digest):
    train, test = stratified_split_indices(y, fraction, seed)
    assert (len(train), len(test)) == sizes
    assert not set(train.tolist()) & set(test.tolist())
    assert _index_digest(train, test) == digest


def test_digits_ship_inside_the_package():
    # Read from the package's own file: no scikit-learn, no download, no pickle.
    assert data_lib.DIGITS_FILE.parent.name == "datasets"
    with np.load(data_lib.DIGITS_FILE, allow_pickle=False) as z:
        assert sorted(z.files) == ["images", "labels"]
    images, labels = data_lib.digits_arrays()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.dtype == labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    note = (data_lib.DIGITS_FILE.parent / "DIGITS.md").read_text()
    assert "Alpaydin" in note and "Kaynak" in note and "CC BY 4.0" in note


def test_scikit_learn_is_not_imported_by_the_data_module():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(data_lib))
    imported = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in getattr(n, "names", [])
    ]
    assert not [m for m in imported if m and m.split(".")[0] == "sklearn"], imported


def test_a_missing_digits_file_says_how_to_reinstall(monkeypatch, tmp_path):
    monkeypatch.setattr(data_lib, "DIGITS_FILE", tmp_path / "digits.npz")
    with pytest.raises(
        FileNotFoundError, match=r"missing from this jaxtrain installation.*reinstall"
    ):
        load_digits()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"test_fraction": 0.0}, ValueError, r"test_fraction must be in \(0, 1\).*got 0.0"),
        ({"test_fraction": 1.5}, ValueError, r"test_fraction must be in \(0, 1\).*got 1.5"),
        ({"test_fraction": "0.2"}, TypeError, r"test_fraction must be a number.*'0.2' \(str\)"),
        ({"seed": -1}, ValueError, r"seed must be an integer in \[0, 4294967295\].*got -1"),
        ({"seed": 2**32}, ValueError, r"seed must be an integer .*got 4294967296"),
        (
            {"test_fraction": 0.001},
            ValueError,
            r"gives 1795 train and 2 test examples, fewer than the 10 classes",
        ),
    ],
)
def test_bad_split_arguments_are_refused_with_the_fix(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_digits(**kwargs)


def test_a_class_with_one_example_cannot_be_stratified():
    with pytest.raises(ValueError, match=r"at least 2 examples of every class; class 2 has 1"):
        stratified_split_indices(np.array([0, 0, 1, 1, 2, 0, 1]), 0.5)
    with pytest.raises(ValueError, match=r"same number of rows; got 3 and 2"):
        data_lib.train_test_split_stratified(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(
        ValueError, match=r"one class label per row, shape \[N\]; got shape \(4, 2\)"
    ):
        stratified_split_indices(np.eye(2)[[0, 1, 0, 1]])
