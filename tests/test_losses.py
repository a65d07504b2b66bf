"""Mask-weighted losses against numpy references, and exact metric accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain import losses, metrics
from jaxtrain.apps.tasks import classification_eval, classification_loss


def _np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_ce(logits, labels):
    """Per-position cross-entropy in float64."""
    logp = _np_log_softmax(logits)
    return -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(12, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=12).astype(np.int32)
    return logits, labels


def test_softmax_cross_entropy_matches_numpy(data):
    logits, labels = data
    got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_ce(logits, labels).mean(), rtol=1e-6)
    per_example = losses.cross_entropy_per_example(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(per_example, _np_ce(logits, labels), rtol=1e-5, atol=1e-6)


def test_uniform_logits_give_log_num_classes():
    got = losses.softmax_cross_entropy(jnp.zeros((3, 7)), jnp.array([0, 3, 6]))
    np.testing.assert_allclose(got, np.log(7), rtol=1e-6)


def test_bfloat16_logits_are_computed_in_float32(data):
    logits, labels = data
    got = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert got.dtype == jnp.float32
    ref = _np_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), labels)
    np.testing.assert_allclose(got, ref.mean(), rtol=1e-5)


def test_float64_inputs_give_a_float64_loss_and_bf16_a_float32_one(data):
    """The losses compute in the inputs' dtype promoted to >= float32 (jaxtrain.contrast's
    float64 parity mode needs a float64 loss; float32 would cap agreement at ~1e-7)."""
    logits, labels = data
    pred, target = logits[:, :3], logits[:, 2:]
    with jax.enable_x64(True):
        ce = losses.softmax_cross_entropy(jnp.asarray(logits, jnp.float64), jnp.asarray(labels))
        mse = losses.mean_squared_error(jnp.asarray(pred, jnp.float64), jnp.asarray(target))
        assert ce.dtype == jnp.float64 and mse.dtype == jnp.float64
        l64 = logits.astype(np.float64)
        np.testing.assert_allclose(float(ce), _np_ce(l64, labels).mean(), rtol=1e-14)
        want = np.mean((pred.astype(np.float64) - target.astype(np.float64)) ** 2)
        np.testing.assert_allclose(float(mse), want, rtol=1e-14)
        # float32 and 16-bit inputs still compute in float32 under x64
        assert losses.softmax_cross_entropy(jnp.asarray(logits), labels).dtype == jnp.float32
    bf16 = losses.mean_squared_error(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target))
    assert bf16.dtype == jnp.float32


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_matches_manual_formula(data, eps):
    logits, labels = data
    c = logits.shape[-1]
    logp = _np_log_softmax(logits)
    # torch.nn.CrossEntropyLoss(label_smoothing=eps): target (1-eps)*onehot + eps/C.
    target = (1 - eps) * np.eye(c)[labels] + eps / c
    expected = -(target * logp).sum(-1).mean()
    # Equivalently (1-eps)*CE + eps*mean over classes of -log p.
    expected_alt = ((1 - eps) * _np_ce(logits, labels) - eps * logp.mean(-1)).mean()
    np.testing.assert_allclose(expected, expected_alt, rtol=1e-12)
    got = losses.softmax_cross_entropy(
        jnp.asarray(logits), jnp.asarray(labels), label_smoothing=eps
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    unsmoothed = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert abs(float(got) - float(unsmoothed)) > 1e-3


def test_mask_weighting_ignores_padded_rows_with_garbage(data):
    logits, labels = data
    mask = np.array([1] * 9 + [0] * 3, np.float32)
    expected = _np_ce(logits[:9], labels[:9]).mean()
    garbage_logits = logits.copy()
    garbage_logits[9:] = np.random.default_rng(1).normal(scale=1e3, size=(3, 5))
    garbage_labels = labels.copy()
    garbage_labels[9:] = [4, 0, 2]
    for lg, lb in ((logits, labels), (garbage_logits, garbage_labels)):
        got = losses.softmax_cross_entropy(jnp.asarray(lg), jnp.asarray(lb), jnp.asarray(mask))
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        acc = losses.accuracy(jnp.asarray(lg), jnp.asarray(lb), jnp.asarray(mask))
        np.testing.assert_allclose(acc, (logits[:9].argmax(-1) == labels[:9]).mean(), rtol=1e-7)
    # Unmasked, the garbage does count.
    unmasked = losses.softmax_cross_entropy(jnp.asarray(garbage_logits), jnp.asarray(labels))
    assert abs(float(unmasked) - expected) > 1.0


def test_fractional_mask_is_a_weighted_mean(data):
    logits, labels = data
    w = np.linspace(0.0, 1.0, 12).astype(np.float32)  # weights in [0, 1]; > 1 is an error
    ce = _np_ce(logits, labels)
    got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))
    np.testing.assert_allclose(got, (ce * w).sum() / w.sum(), rtol=1e-6)


def test_all_padding_gives_zero_not_nan(data):
    logits, labels = data
    got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(12))
    assert float(got) == 0.0


@pytest.fixture(scope="module")
def seq_data():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 6, 9)).astype(np.float32)  # [B, T, V]
    labels = rng.integers(0, 9, size=(4, 6)).astype(np.int32)  # [B, T]
    return logits, labels


def test_sequence_labels_with_example_mask(seq_data):
    logits, labels = seq_data
    mask_b = np.array([1, 0, 1, 1], np.float32)
    ce = _np_ce(logits, labels)  # [B, T]
    expected = ce[mask_b == 1].mean()  # every token of the real examples
    got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask_b)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    acc = losses.accuracy(jnp.asarray(logits), jnp.asarray(labels), mask_b)
    np.testing.assert_allclose(acc, (logits.argmax(-1) == labels)[mask_b == 1].mean(), rtol=1e-6)


def test_sequence_labels_with_token_mask(seq_data):
    logits, labels = seq_data
    mask_bt = (np.arange(6)[None, :] < np.array([6, 2, 0, 4])[:, None]).astype(np.float32)
    ce = _np_ce(logits, labels)
    expected = (ce * mask_bt).sum() / mask_bt.sum()
    got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask_bt)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Unmasked tokens are different from the masked result (the mask is doing something).
    assert abs(float(got) - ce.mean()) > 1e-4


def test_mask_of_wrong_shape_raises(seq_data):
    logits, labels = seq_data
    with pytest.raises(ValueError, match=r"mask has shape \(6,\) but must be a prefix"):
        losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.ones(6))


def test_mean_squared_error_matches_numpy_without_half_factor():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(5, 3)).astype(np.float32)
    target = rng.normal(size=(5, 3)).astype(np.float32)
    got = losses.mean_squared_error(jnp.asarray(pred), jnp.asarray(target))
    np.testing.assert_allclose(got, np.mean((pred - target) ** 2), rtol=1e-6)
    np.testing.assert_allclose(
        losses.mean_squared_error(jnp.zeros(4), jnp.full(4, 2.0)), 4.0, rtol=0
    )  # not 2.0 (0.5 * 4)
    mask = np.array([1, 1, 0, 1, 0], np.float32)
    garbage = pred.copy()
    garbage[mask == 0] = 1e4
    got = losses.mean_squared_error(jnp.asarray(garbage), jnp.asarray(target), mask)
    np.testing.assert_allclose(got, np.mean((pred - target)[mask == 1] ** 2), rtol=1e-6)


def test_accuracy_and_correct():
    logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = jnp.array([1, 1, 1, 0])
    np.testing.assert_array_equal(losses.correct(logits, labels), [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(losses.accuracy(logits, labels), 0.75)
    np.testing.assert_allclose(losses.accuracy(logits, labels, jnp.array([1, 1, 0, 0])), 0.5)


# ------------------------------------------------------------------ metric accumulation


def _accumulate(values, mask, batch_size):
    """Pads ``values`` to whole batches like ArrayDataset, accumulating sums per batch."""
    n = len(values)
    total = None
    for start in range(0, n, batch_size):
        v = values[start : start + batch_size]
        m = mask[start : start + batch_size]
        pad = batch_size - len(v)
        v = np.concatenate([v, np.full(pad, 123.0, np.float32)])  # garbage in padding
        m = np.concatenate([m, np.zeros(pad, np.float32)])
        sums = metrics.sums_from_values({"v": jnp.asarray(v), "one": jnp.ones(batch_size)}, m)
        total = sums if total is None else metrics.merge(total, sums)
    return metrics.compute(total)


@pytest.mark.parametrize("batch_size", [1, 7, 32, 100, 128])
def test_metric_sums_give_exact_dataset_mean_whatever_the_batching(batch_size):
    rng = np.random.default_rng(4)
    values = rng.normal(loc=2.0, size=100).astype(np.float32)
    mask = np.ones(100, np.float32)
    mask[::5] = 0.0  # some examples excluded
    result = _accumulate(values, mask, batch_size)
    np.testing.assert_allclose(result["v"], values[mask == 1].mean(), rtol=1e-6)
    assert result["one"] == 1.0
    assert isinstance(result["v"], float)


def test_scalar_metric_values_are_weighted_by_real_examples():
    # A batch-mean scalar counts once per real example, so averaging two batches of
    # 3 and 1 real examples gives the per-example mean, not the mean of means.
    s1 = metrics.sums_from_values({"m": jnp.float32(1.0)}, np.array([1, 1, 1, 0], np.float32))
    s2 = metrics.sums_from_values({"m": jnp.float32(5.0)}, np.array([1, 0, 0, 0], np.float32))
    assert metrics.compute(metrics.merge(s1, s2))["m"] == pytest.approx(2.0)
    no_mask = metrics.sums_from_values({"m": jnp.float32(4.0)}, None)
    assert metrics.compute(no_mask)["m"] == 4.0


def test_sums_with_token_values_and_example_mask():
    values = jnp.arange(12.0).reshape(3, 4)  # [B, T]
    sums = metrics.sums_from_values({"v": values}, np.array([1, 0, 1], np.float32))
    total, weight = sums["v"]
    assert float(weight) == 8.0
    assert float(total) == float(values[0].sum() + values[2].sum())


def test_zeros_like_sums_and_empty_weight_gives_nan():
    sums = metrics.sums_from_values({"v": jnp.ones(3)}, np.ones(3, np.float32))
    zero = metrics.zeros_like_sums(sums)
    assert metrics.compute(metrics.merge(zero, sums)) == metrics.compute(sums) == {"v": 1.0}
    assert np.isnan(metrics.compute(zero)["v"])


def test_padded_rows_with_nan_or_bad_labels_never_leak():
    """NaN/inf values or out-of-range labels (e.g. ignore_index -100) in masked rows."""
    import jax

    import jaxtrain as jt

    logits = jnp.array([[1.0, 2.0], [jnp.nan, 0.0]])
    mask = jnp.array([1.0, 0.0])
    ref = jt.losses.softmax_cross_entropy(logits[:1], jnp.array([0]))
    for bad_label in (5, -100):
        got = jt.losses.softmax_cross_entropy(logits, jnp.array([0, bad_label]), mask)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    sums = jt.metrics.sums_from_values({"v": jnp.array([1.0, jnp.inf])}, mask)
    assert jt.metrics.compute(sums) == {"v": 1.0}
    # Gradients stay finite when the padded label is out of range.
    g = jax.grad(
        lambda w: jt.losses.softmax_cross_entropy(jnp.ones((2, 2)) @ w, jnp.array([0, -100]), mask)
    )(jnp.eye(2))
    assert np.isfinite(np.asarray(g)).all()


# ------------------------------------------------------- invalid labels and masks


@pytest.mark.parametrize("label", [4, -1])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_invalid_label_never_gives_a_finite_loss(label, smoothing):
    """Out of [0, C) (or -1): an error outside jit, NaN under jit (never a small loss)."""
    import jax

    logits, labels = jnp.zeros((3, 4)), jnp.array([0, label, 2])
    with pytest.raises(
        ValueError,
        match=rf"softmax_cross_entropy: labels holds {label} at index \(1,\) \(example 1 of "
        r"the batch; 1 such value\(s\) in all\): labels must be in \[0, 4\).*Fix",
    ):
        losses.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    with pytest.raises(ValueError, match=rf"accuracy: labels holds {label} at index \(1,\)"):
        losses.accuracy(logits, labels)
    jitted = jax.jit(lambda lg, y: losses.softmax_cross_entropy(lg, y, None, smoothing))
    assert np.isnan(float(jitted(logits, labels)))
    assert np.isnan(float(jax.jit(losses.accuracy)(logits, labels)))
    assert np.isfinite(float(jitted(logits, jnp.array([0, 3, 2]))))


@pytest.mark.parametrize("bad", [-1.0, 2.0, float("nan")])
def test_mask_outside_0_1_is_an_error_or_nan(bad):
    import jax

    logits, labels = jnp.zeros((3, 4)), jnp.array([0, 1, 2])
    mask = jnp.array([1.0, bad, 1.0])
    with pytest.raises(ValueError, match=rf"mask holds {bad!r} at index \(1,\).*\[0, 1\]"):
        losses.softmax_cross_entropy(logits, labels, mask)
    with pytest.raises(ValueError, match=r"mean_squared_error: mask holds"):
        losses.mean_squared_error(jnp.zeros(3), jnp.zeros(3), mask)
    assert np.isnan(float(jax.jit(losses.softmax_cross_entropy)(logits, labels, mask)))
    assert np.isnan(float(jax.jit(losses.mean_squared_error)(jnp.zeros(3), jnp.zeros(3), mask)))


def _tiny_classifier():
    import jax
    import optax

    import jaxtrain as jt

    model = jt.from_function(lambda p, x: x @ p["w"])  # 3 classes
    opt = optax.sgd(0.1)
    state = jt.TrainState.create({"w": jnp.zeros((2, 3))}, opt, jax.random.key(0))
    return jt, model, opt, state


def _label_batches(bad_label, bad_at=2, n=4):
    out = []
    for i in range(n):
        y = np.array([0, 1, 2, 1], np.int32)
        if i == bad_at:
            y[3] = bad_label
        # Device arrays: not read back by the host check; the loss counts on the device.
        out.append({"x": jnp.ones((4, 2)), "y": jnp.asarray(y), "mask": jnp.ones(4)})
    return out


@pytest.mark.parametrize("fused", [False, True])
def test_fit_raises_at_the_next_log_for_labels_out_of_range(fused):
    jt, model, opt, state = _tiny_classifier()
    loss = classification_loss(model, label_smoothing=0.1)
    if fused:
        step = jt.make_train_steps(loss, opt, steps_per_call=2)
    else:
        step = jt.make_train_step(loss, opt)
    with pytest.raises(
        ValueError,
        match=r"invalid batch at training step 3: the loss counted 1 label\(s\) outside "
        r"\[0, num_classes\).*'invalid_labels'.*Fix: remap the labels",
    ):
        jt.fit(state, step, _label_batches(3), epochs=1, log_every=4, progress=False)
    assert step.trace_count == 1


def test_fit_hides_the_counts_when_they_are_zero_and_checks_masks():
    jt, model, opt, state = _tiny_classifier()
    step = jt.make_train_step(classification_loss(model), opt)
    _, h = jt.fit(state, step, _label_batches(1), epochs=1, log_every=2, progress=False)
    assert h.train and not any("invalid_labels" in r or "invalid_mask" in r for r in h.train)
    batches = _label_batches(1)
    batches[1]["mask"] = jnp.array([1.0, -1.0, 1.0, 1.0])
    step = jt.make_train_step(classification_loss(model), opt, grad_accum_steps=2)
    with pytest.raises(
        ValueError, match=r"training step 2: the loss counted 1 mask value\(s\) outside \[0, 1\]"
    ):
        jt.fit(state, step, batches, epochs=1, log_every=4, progress=False)


def test_evaluate_raises_for_labels_out_of_range():
    jt, model, opt, state = _tiny_classifier()
    eval_step = jt.make_eval_step(classification_eval(model))
    assert set(jt.evaluate(eval_step, state, _label_batches(1))) == {"loss", "accuracy"}
    with pytest.raises(
        ValueError,
        match=r"evaluation: the data held 1 label\(s\) outside \[0, num_classes\).*Fix",
    ):
        jt.evaluate(eval_step, state, _label_batches(-7))
    # A masked-out position may hold anything (e.g. ignore_index -100).
    batches = _label_batches(-100)
    batches[2]["mask"] = jnp.array([1.0, 1.0, 1.0, 0.0])
    assert set(jt.evaluate(eval_step, state, batches)) == {"loss", "accuracy"}
    assert eval_step.trace_count == 1
