"""Character-level LM utilities: corpus, vocabulary, windows, the transformer, sampling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtrain
from jaxtrain.apps import text
from jaxtrain.apps.tasks import classification_loss

SEQ_LEN = 16

# One xdist group (pytest --dist loadgroup): the module fixtures train once, on one worker.
pytestmark = pytest.mark.xdist_group("test_text")


@pytest.fixture(scope="module")
def corpus():
    return text.stdlib_corpus(max_chars=20_000)


@pytest.fixture(scope="module")
def vocab(corpus):
    return text.CharVocab.from_text(corpus)


@pytest.fixture(scope="module")
def module(vocab):
    return jaxtrain.models.TransformerLM(
        vocab.size, max_len=SEQ_LEN, d_model=32, num_heads=2, num_layers=1
    )


@pytest.fixture(scope="module")
def lm(module):
    """The tiny TransformerLM as a jaxtrain Model, with initial params."""
    model = jaxtrain.from_linen(module)
    # Jitted: one compilation instead of many eager per-op ones (seconds on CPU).
    params, model_state = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))
    return model, params, model_state


@pytest.fixture(scope="module")
def apply(module, lm):
    """The linen module's own jitted forward ``tokens [B, T <= SEQ_LEN] -> logits [B, T, V]``.

    Straight from Flax, not through the jaxtrain adapter: an independent reference.
    """
    _, params, _ = lm
    forward = jax.jit(lambda tokens: module.apply({"params": params}, tokens))
    return lambda tokens: np.asarray(forward(jnp.asarray(tokens, jnp.int32)))


def test_stdlib_corpus_is_deterministic_english_and_capped():
    a = text.stdlib_corpus(max_chars=5_000)
    assert len(a) == 5_000
    assert a == text.stdlib_corpus(max_chars=5_000)
    assert text.stdlib_corpus(max_chars=8_000).startswith(a)
    assert a.count(" the ") > 10  # English prose, not code or binary


def test_vocab_round_trip_and_json(corpus, vocab):
    assert vocab.chars == sorted(set(corpus))
    ids = vocab.encode(corpus[:500])
    assert ids.dtype == np.int32 and ids.shape == (500,)
    assert vocab.decode(ids) == corpus[:500]
    restored = text.CharVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab
    assert restored.encode("the").tolist() == vocab.encode("the").tolist()
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("\x00")
    with pytest.raises(ValueError, match="must be in"):
        vocab.decode([vocab.size])


def test_windows_shapes_and_next_token_shift():
    ids = np.arange(100, dtype=np.int32)
    w = text.lm_windows(ids, seq_len=10)
    assert w["x"].shape == w["y"].shape == (9, 10)  # (100 - 11) // 10 + 1
    assert w["x"].dtype == w["y"].dtype == np.int32
    np.testing.assert_array_equal(w["y"], w["x"] + 1)  # y is x shifted by one token
    np.testing.assert_array_equal(w["x"][:, 0], np.arange(0, 90, 10))  # non-overlapping
    strided = text.lm_windows(ids, seq_len=10, stride=5)
    assert strided["x"].shape == (18, 10)
    np.testing.assert_array_equal(strided["x"][1], np.arange(5, 15))
    with pytest.raises(ValueError, match="seq_len \\+ 1"):
        text.lm_windows(ids[:10], seq_len=10)


def test_transformer_shape_and_causality(apply, vocab):
    tokens = np.random.default_rng(0).integers(0, vocab.size, (3, SEQ_LEN))
    logits = apply(tokens)
    assert logits.shape == (3, SEQ_LEN, vocab.size)
    changed = tokens.copy()
    changed[:, 10] = (changed[:, 10] + 1) % vocab.size  # change a "future" token
    logits2 = apply(changed)
    np.testing.assert_allclose(logits2[:, :10], logits[:, :10], atol=1e-5)  # the past is unchanged
    assert not np.allclose(logits2[:, 10:], logits[:, 10:])  # and the change is seen


def _greedy_reference(apply, prompt, num_tokens):
    """Greedy decoding the slow way: the unpadded last <= SEQ_LEN tokens at every step."""
    seq = list(prompt)
    for _ in range(num_tokens):
        logits = apply([seq[-SEQ_LEN:]])
        seq.append(int(np.argmax(logits[0, -1])))
    return seq[len(prompt) :]


def test_generate_count_greedy_match_and_compiles_once(lm, apply, vocab):
    model, params, model_state = lm
    prompt = vocab.encode("Return the value of ")  # 20 tokens > SEQ_LEN: the window slides
    before = text.sample_step.trace_count
    out = text.generate(model, params, model_state, prompt, 8, jax.random.key(0), 1.0)
    assert out.shape == (8,) and out.dtype == np.int32
    assert ((out >= 0) & (out < vocab.size)).all()
    assert text.sample_step.trace_count == before + 1
    # Another rng, prompt length, token count and temperature: no retrace.
    again = text.generate(model, params, model_state, prompt[:3], 5, jax.random.key(1), 0.0)
    assert again.shape == (5,)
    assert text.sample_step.trace_count == before + 1
    # Same rng, same tokens; temperature 0 is greedy decoding, also once the window slides.
    same = text.generate(model, params, model_state, prompt, 8, jax.random.key(0), 1.0)
    np.testing.assert_array_equal(same, out)
    # From 15 tokens (padded window) on to a full, sliding one.
    greedy = text.generate(model, params, model_state, prompt[:15], 6, 0, temperature=0.0)
    assert greedy.tolist() == _greedy_reference(apply, prompt[:15], 6)
    assert text.sample_step.trace_count == before + 1


def test_short_training_lowers_the_loss(lm, corpus, vocab):
    model, params, model_state = lm
    windows = text.lm_windows(vocab.encode(corpus), SEQ_LEN)
    ds = jaxtrain.ArrayDataset(windows, 32, seed=0, drop_remainder=True)
    optimizer = optax.adam(3e-3)
    # A copy: the step donates the state's buffers, which would delete the fixture's params.
    params = jax.tree.map(jnp.copy, params)
    state = jaxtrain.TrainState.create(params, optimizer, 0, model_state)
    step = jaxtrain.make_train_step(classification_loss(model), optimizer)
    losses = []
    for _, batch in zip(range(30), ds.batches(0), strict=False):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert step.trace_count == 1
    assert losses[0] > np.log(vocab.size) - 0.5  # starts near uniform guessing
    assert losses[-5:].mean() < losses[0] - 0.8, losses
