"""Parameter sharding (FSDP) on 8 virtual CPU devices, in a subprocess (the device count
is fixed when JAX starts). See tests/_fsdp_script.py for what the subprocess does."""

from pathlib import Path

import numpy as np
import pytest
from _subprocess import run_script

import jaxtrain as jt

# One xdist group (pytest --dist loadgroup): the module fixture runs once, on one worker.
pytestmark = pytest.mark.xdist_group("test_fsdp")


SCRIPT = Path(__file__).with_name("_fsdp_script.py")

# FSDP runs the same mathematics as the replicated run, but XLA sums the gradient in
# another order (a reduce-scatter over 8 shards instead of an all-reduce), so float32
# rounding differs. Measured over 12 Adam steps: max relative loss difference 1.9e-7
# (fsdp=8) and 1.3e-7 (data=2 x fsdp=4). 1e-5 leaves room for other CPUs and XLA
# versions and still catches a real error (a gradient not reduced over the fsdp axis, a
# shard updated with another shard's moments), which moves the loss by > 1e-3.
RTOL_LOSS = 1e-5
ATOL_PARAMS = 1e-5


@pytest.fixture(scope="module")
def result():
    return run_script(SCRIPT, devices=8, timeout=300)


def test_meshes(result):
    assert result["mesh_shapes"] == [{"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 4}]


def test_fsdp_losses_equal_replicated_run(result):
    rep = np.asarray(result["replicated"]["losses"])
    assert rep.shape == (12,)
    assert rep[-1] < rep[0] * 0.7  # it trained, so the comparison means something
    for name in ("fsdp", "mixed"):
        np.testing.assert_allclose(result[name]["losses"], rep, rtol=RTOL_LOSS, atol=0)
        assert 0 <= result[name]["params_max_abs_diff"] <= ATOL_PARAMS
    # Fused (4 steps per call, data=2 x fsdp=4): one record per call, the mean of 4 steps.
    np.testing.assert_allclose(
        result["fused"]["losses"], rep.reshape(3, 4).mean(axis=1), rtol=RTOL_LOSS, atol=0
    )
    assert 0 <= result["fused"]["params_max_abs_diff"] <= ATOL_PARAMS


def test_device_resident_epoch_on_an_fsdp_mesh(result):
    """make_device_epoch on data=2 x fsdp=4 equals it on the replicated data mesh."""
    e = result["device_epoch"]
    assert 0 <= e["params_max_abs_diff"] <= ATOL_PARAMS
    assert e["trace_count"] == 1 and e["final_matches_rule"]


def test_train_command_with_fsdp(result):
    """`jaxtrain train --fsdp 4` on 8 devices trains like the unsharded run."""
    t = result["train_command"]
    one, four = t["1"], t["4"]
    assert one["steps"] == four["steps"] == 23  # 1437 examples, batch 64 (default)
    assert four["compilations"] == 1
    assert four["train_loss"] == pytest.approx(one["train_loss"], rel=RTOL_LOSS)
    assert four["test"]["loss"] == pytest.approx(one["test"]["loss"], rel=RTOL_LOSS)
    assert four["test"]["accuracy"] == one["test"]["accuracy"]
    assert "--fsdp 3 must divide the 8 device(s)" in t["error"] and "Fix:" in t["error"]


def test_every_step_function_compiles_once(result):
    for name in ("replicated", "fsdp", "mixed", "fused"):
        assert result[name]["trace_count"] == 1, name


def test_per_device_state_bytes_drop_to_one_over_fsdp(result):
    def state_bytes(run):  # the compiled step's per-device arguments, minus the batch
        return run["arg_bytes"] - run["batch_bytes_per_device"]

    rep = state_bytes(result["replicated"])
    # Replicated: every device holds the whole state (params + Adam moments + scalars).
    assert rep == pytest.approx(result["replicated"]["state_bytes_total"], rel=1e-3)
    # Sharded over 8: 1/8 of the kernels plus the small replicated leaves (biases, step,
    # key). Measured 0.128 (fsdp=8) and 0.253 (fsdp=4).
    ratio8 = state_bytes(result["fsdp"]) / rep
    ratio4 = state_bytes(result["mixed"]) / rep
    assert 1 / 8 <= ratio8 < 1 / 8 * 1.05
    assert 1 / 4 <= ratio4 < 1 / 4 * 1.05


def test_sharding_rule_and_layout_kept_by_the_step(result):
    specs = result["fsdp"]["placed_specs"]
    # Largest dimension divisible by 8: 512 (the output side of [64, 512], else the first).
    assert specs["params.Dense_0.kernel"] == [None, "fsdp"]
    assert specs["params.Dense_1.kernel"] == ["fsdp", None]
    assert specs["params.Dense_2.kernel"] == ["fsdp", None]  # [512, 10]: 5120 elements
    assert specs["opt_state.0.mu.Dense_1.kernel"] == ["fsdp", None]
    assert specs["opt_state.0.nu.Dense_0.kernel"] == [None, "fsdp"]
    for small in ("params.Dense_0.bias", "step", "rng", "opt_state.0.count", "skipped_steps"):
        assert specs[small] == [], small
    for name in ("fsdp", "mixed", "fused"):
        assert result[name]["final_matches_rule"] is True, name


def test_checkpoints_move_between_layouts(result):
    ck = result["checkpoint"]
    assert ck["sharded_to_replicated"] == {"equal": True, "all_replicated": True}
    assert ck["sharded_to_sharded_target"] == {"equal": True, "same_specs": True}
    assert ck["replicated_to_sharded"]["equal"] is True
    assert ck["replicated_to_sharded"]["specs"] == result["fsdp"]["placed_specs"]


def test_mesh_and_batch_errors(result):
    err = result["errors"]
    assert "fsdp=3 does not divide the 8 devices" in err["fsdp3"]
    assert "data=3, fsdp=2 (6) for 8 devices" in err["product"]
    assert "'data' x 'fsdp' axes" in err["batch20"] and "batch size 20" in err["batch20"]
    assert "multiple of 8" in err["batch20"]


# The rule itself, in this process (shapes only, no devices needed).


@pytest.mark.parametrize(
    ("shape", "n", "expected"),
    [
        ((64, 512), 8, (None, "fsdp")),  # the largest divisible dimension
        ((512, 512), 8, ("fsdp", None)),  # a tie: the first
        ((4096, 3), 8, ("fsdp", None)),
        ((4097, 3), 8, ()),  # nothing divisible: replicated
        ((512,), 8, ()),  # small: replicated
        ((), 8, ()),  # scalars: replicated
        ((64, 512), 1, ()),  # no fsdp axis to split over
    ],
)
def test_leaf_rule(shape, n, expected):
    from jax.sharding import PartitionSpec

    assert jt.parallel._leaf_spec(shape, n, jt.parallel.FSDP_MIN_ELEMENTS) == PartitionSpec(
        *expected
    )


def test_make_mesh_rejects_non_integer_sizes():
    with pytest.raises(ValueError, match=r"fsdp must be an integer >= 1; got 0"):
        jt.make_mesh(fsdp=0)
