"""The persistent compilation cache: entries are written, a second process reuses them."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, time
import jaxtrain as jt, jax, optax
from jaxtrain.apps.tasks import classification_loss
from jaxtrain.compile_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
model = jt.from_linen(jt.models.MLP(hidden=(16,)))
p, _ = model.init(jax.random.key(0), jax.numpy.zeros((1, 8, 8, 1)))
opt = optax.adam(1e-3)
step = jt.make_train_step(classification_loss(model), opt)
batch = {"x": jax.numpy.zeros((8, 8, 8, 1)), "y": jax.numpy.zeros(8, "int32")}
t = time.perf_counter()
state, m = step(jt.TrainState.create(p, opt, 0), batch)
jax.block_until_ready(m)
print(json.dumps({"loss": float(m["loss"]), "first_step_s": time.perf_counter() - t}))
"""


def test_cache_is_written_and_reused(tmp_path):
    cache = tmp_path / "cache"
    runs = []
    for _ in range(2):
        res = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True, timeout=180
        )
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert entries, "no cache entries were written"
    assert runs[0]["loss"] == runs[1]["loss"]


def test_unwritable_cache_directory_is_a_clear_error():
    from jaxtrain.compile_cache import enable_compilation_cache

    with pytest.raises(
        ValueError, match="compilation cache directory '/proc/nope' cannot be created"
    ):
        enable_compilation_cache("/proc/nope")
