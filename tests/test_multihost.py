"""Two real processes on 127.0.0.1 (CPU, gloo collectives, 2 virtual devices each) train
the same run as one process with 4 devices. See tests/_multihost_script.py."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _subprocess import device_env, parse_result

# One xdist group (pytest --dist loadgroup): the module fixture runs once, on one worker.
pytestmark = pytest.mark.xdist_group("test_multihost")


SCRIPT = Path(__file__).with_name("_multihost_script.py")
TIMEOUT = 180  # seconds per phase; a hung collective must fail the test, not hang CI

# The 2-process run and the 1-process, 4-device run execute the same SPMD program on
# the same global batches; only the all-reduce differs (gloo across processes vs the
# in-process CPU collective), which can reorder a float32 sum. Measured max abs
# parameter difference after 30 steps: 1.2e-7 (one ulp of values ~1). A real bug (a
# process reading the wrong rows, a missing cross-process reduction) moves parameters
# by > 1e-2, so 1e-5 separates the two.
ATOL_PARAMS = 1e-5
RTOL_LOSS = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    commands = [(["worker", str(port), str(pid), str(out)], device_env(2)) for pid in (0, 1)] + [
        (["reference", str(out)], device_env(4))
    ]  # runs alongside; waits for the workers' files
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in commands
    ]
    outputs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            outputs.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:  # on a timeout or failure, never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, (rc, stdout, stderr) in zip(
        ("worker 0", "worker 1", "reference"), outputs, strict=True
    ):
        assert rc == 0, f"{name} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    results = [parse_result(stdout) for _, stdout, _ in outputs]
    return {"workers": results[:2], "stderr": [e for _, _, e in outputs[:2]], "ref": results[2]}


def test_two_processes_form_one_four_device_run(runs):
    w0, w1 = runs["workers"]
    assert (w0["process_index"], w1["process_index"]) == (0, 1)
    for w in (w0, w1):
        assert w["process_count"] == 2
        assert w["local_device_count"] == 2
        assert w["device_count"] == 4
        assert w["params_global"] is True  # the state spans both processes' devices
        assert w["params_replicated"] is True
        assert w["trace_count"] == 1
        assert w["steps"] == 30
    # Each process read its own contiguous half of every global batch of 64.
    assert (w0["rows"], w1["rows"]) == ([0, 32], [32, 64])


def test_metrics_are_global_and_equal_on_both_processes(runs):
    w0, w1 = runs["workers"]
    assert w0["losses"] == w1["losses"]  # one global value, computed inside jit
    assert w0["eval"] == w1["eval"]
    assert w0["examples"] == w1["examples"] == runs["ref"]["examples"] == 1437 + 7 * 64


def test_final_params_equal_single_process_run(runs):
    ref, w0 = runs["ref"], runs["workers"][0]
    assert ref["process_count"] == 1 and ref["device_count"] == 4
    assert 0 <= ref["max_abs_diff_multi_vs_ref"] <= ATOL_PARAMS
    assert ref["params_moved"] > 0.1  # it trained, so the comparison means something
    np.testing.assert_allclose(w0["losses"], ref["losses"], rtol=RTOL_LOSS, atol=0)
    np.testing.assert_allclose(w0["eval"]["accuracy"], ref["eval"]["accuracy"], rtol=RTOL_LOSS)


def test_grain_data_runs_equal_single_process_run(runs):
    """GrainData under 2 processes: each keeps its rows of the same global batches."""
    ref = runs["ref"]
    for w in runs["workers"]:
        assert len(w["grain_losses"]) == len(ref["grain_losses"]) == 4  # 8 steps, log every 2
        np.testing.assert_allclose(w["grain_losses"], ref["grain_losses"], rtol=RTOL_LOSS)
        assert w["grain_examples"] == ref["grain_examples"] == 8 * 64  # global, not local
        # Each process contributes its 32 rows: the step sees a global batch of 64, not
        # 128 (every process's full batch stacked: the same mean, twice the work).
        assert w["grain_global_batch_rows"] == ref["grain_global_batch_rows"] == [64]
    assert 0 <= ref["grain_max_abs_diff_multi_vs_ref"] <= ATOL_PARAMS


def test_only_process_zero_prints_and_writes_logs(runs):
    w0, w1 = runs["workers"]
    assert w0["records_written"] > 0
    assert w1["records_written"] == 0
    err0, err1 = runs["stderr"]
    assert "30/30" in err0  # process 0's progress bar ran to the end
    assert "30/30" not in err1 and "step/s" not in err1


def test_cooperative_checkpoint_restores_in_one_process(runs):
    w0, w1 = runs["workers"]
    assert w0["checkpoint_steps"] == w1["checkpoint_steps"] == [23, 30]  # epoch end, end
    ref = runs["ref"]
    assert ref["restored_step"] == 30
    assert ref["restored_devices"] == 1  # restored onto one device of one process
    assert ref["restored_equals_multi"] is True  # bitwise the 2-process run's params


# Argument checks of jaxtrain.distributed and `jaxtrain train`, in this process: they fail
# before JAX is contacted, so nothing here starts a distributed runtime.


def test_initialize_rejects_address_without_port():
    from jaxtrain import distributed

    with pytest.raises(ValueError, match=r"host:port .*got 'localhost'.*10\.0\.0\.1:1234"):
        distributed.initialize("localhost", 2, 0)


def test_initialize_rejects_process_id_out_of_range():
    from jaxtrain import distributed

    with pytest.raises(ValueError, match=r"\[0, 2\); got 2"):
        distributed.initialize("127.0.0.1:1", 2, 2)


def test_initialize_reads_environment_variables(monkeypatch):
    from jaxtrain import distributed

    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    assert distributed.requested()
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer; got 'two'"):
        distributed.initialize("127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes\) = \[0, 2\)"):
        distributed.initialize("127.0.0.1:1")


def test_train_command_passes_coordinator_options(tmp_path, capsys):
    from jaxtrain.apps import cli

    args = ["train", "--out", str(tmp_path), "--num-processes", "2", "--process-id", "0"]
    assert cli.main([*args, "--coordinator-address", "nohost"]) == 2
    err = capsys.readouterr().err
    assert "jaxtrain train: error: coordinator_address must be host:port" in err
    assert not (tmp_path / "summary.json").exists()
    parsed = cli.build_parser().parse_args([*args, "--coordinator-address", "10.0.0.1:1234"])
    assert (parsed.coordinator_address, parsed.num_processes, parsed.process_id) == (
        "10.0.0.1:1234",
        2,
        0,
    )
