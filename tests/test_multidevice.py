"""Data parallelism on 8 virtual CPU devices, in a subprocess (the device count is fixed
when JAX starts). See tests/_multidevice_script.py for what the subprocess does."""

from pathlib import Path

import numpy as np
import pytest
from _subprocess import run_script

# One xdist group (pytest --dist loadgroup): the module fixture runs once, on one worker.
pytestmark = pytest.mark.xdist_group("test_multidevice")


SCRIPT = Path(__file__).with_name("_multidevice_script.py")

# The 8-device and 1-device runs compute the same mathematics, but the gradient is a sum
# over the batch that XLA reduces in a different order when the batch is split over 8
# devices (8 partial sums, then an all-reduce) than on one device. Float32 rounding
# therefore differs at the ~1e-7 level per step, and over 30 steps it may grow a little;
# 1e-5 is loose enough for that and tight enough to catch any real divergence (a wrong
# gradient mean, an unmasked padding row, a lost all-reduce move the loss by >1e-3).
RTOL_LOSS = 1e-5
ATOL_PARAMS = 1e-5


@pytest.fixture(scope="module")
def result():
    return run_script(SCRIPT, devices=8, timeout=600)


def test_eight_virtual_cpu_devices(result):
    assert result["platform"] == "cpu"
    assert result["device_count"] == 8


def test_batch_is_sharded_over_eight_devices_and_params_replicated(result):
    first = result["eight"]["first_batch"]
    assert first["x_num_shards"] == 8
    assert first["x_shard_devices"] == 8
    assert first["x_shard_shapes"] == [[8, 8, 8, 1]]  # 64 examples / 8 devices
    assert first["x_fully_replicated"] is False
    assert first["mask_num_shards"] == 8
    assert first["params_replicated"] is True
    assert result["eight"]["final_params_replicated"] is True
    # The reference run really is on one device.
    assert result["one"]["first_batch"]["x_num_shards"] == 1
    assert result["one"]["first_batch"]["x_shard_shapes"] == [[64, 8, 8, 1]]


def test_eight_devices_match_one_device(result):
    eight, one = result["eight"], result["one"]
    assert eight["steps"] == one["steps"] == 30
    assert eight["epochs_seen"] == [0, 1]  # crosses the padded last batch of epoch 0
    a, b = np.asarray(eight["losses"]), np.asarray(one["losses"])
    assert a.shape == b.shape == (30,)
    np.testing.assert_allclose(a, b, rtol=RTOL_LOSS, atol=0)
    assert b[-1] < b[0] * 0.7  # it trained, so the comparison means something
    assert 0 <= result["params_max_abs_diff"] <= ATOL_PARAMS
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(eight["eval"][name], one["eval"][name], rtol=RTOL_LOSS)


def test_eight_device_steps_compile_once(result):
    assert result["eight"]["trace_count"] == 1
    assert result["eight"]["eval_trace_count"] == 1
    assert result["one"]["trace_count"] == 1


def test_shard_batch_refuses_indivisible_batch(result):
    msg = result["shard_60_error"]
    assert msg is not None, "shard_batch accepted a batch of 60 on 8 devices"
    assert "divisible" in msg
    assert "60" in msg and "8 devices" in msg
    assert "multiple of 8" in msg
    assert result["shard_64_shapes"] == [[8, 3]]
