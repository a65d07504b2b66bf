"""`jaxtrain doctor` / `jaxtrain.apps.doctor.preflight`: the report, and the loud CPU-fallback warning."""

import json
import subprocess
import sys
import warnings

import jax
import pytest

from jaxtrain.apps import cli
from jaxtrain.apps.doctor import _device_info, preflight

BANNER = "!! WARNING: JAX IS NOT RUNNING WHERE EXPECTED"


def test_report_fields_on_cpu(capsys):
    report = preflight(expect="cpu", env={})
    assert report["backend"] == "cpu"
    assert report["ok"] is True and report["warnings"] == []
    assert report["device_count"] == jax.device_count() == len(report["devices"])
    assert report["process_count"] == 1 and report["process_index"] == 0
    d = report["devices"][0]
    assert d["platform"] == "cpu" and d["kind"] == jax.devices()[0].device_kind
    assert d["memory"] == "unknown" and d["memory_bytes"] is None  # CPU has no memory_stats
    assert set(report["versions"]) >= {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint"}
    assert report["versions"]["jax"] == jax.__version__
    assert report["matmul_precision"] == "default"
    assert "ONE bfloat16 pass" in report["matmul_precision_on_tpu"]
    json.dumps(report)  # JSON-ready

    text = capsys.readouterr().out
    assert BANNER not in text
    assert "backend: cpu" in text
    assert f"jax {jax.__version__}" in text
    assert "default matmul precision: default" in text
    assert "on TPU, float32 matmuls and convolutions at the 'default' precision run as ONE" in text
    assert "jax_default_matmul_precision" in text
    assert "expected platform: cpu (expect='cpu'): OK" in text


def test_matmul_precision_setting_is_reported():
    with jax.default_matmul_precision("highest"):
        report = preflight(verbose=False, env={})
    assert report["matmul_precision"] == "highest"


def test_colab_tpu_hint_on_cpu_warns_loudly(capsys):
    report = preflight(env={"COLAB_TPU_ADDR": "10.0.0.2:8470"})
    assert report["ok"] is False and report["fell_back_to_cpu"] is True
    assert report["expected"] == "tpu"
    assert report["expected_reason"] == "COLAB_TPU_ADDR='10.0.0.2:8470' is set"
    (msg,) = report["warnings"]
    assert msg.startswith(
        "A TPU was expected (COLAB_TPU_ADDR='10.0.0.2:8470' is set) but JAX is running on CPU"
    )
    assert "Runtime > Change runtime type > TPU" in msg
    assert "pip install -U 'jax[tpu]'" in msg
    text = capsys.readouterr().out
    assert text.startswith("!" * 78 + "\n" + BANNER)
    assert "expected platform: tpu (COLAB_TPU_ADDR='10.0.0.2:8470' is set): NOT FOUND" in text


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"TPU_NAME": "my-tpu"}, "tpu"),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, "gpu"),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, "gpu"),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),  # "no GPU", not a hint
        ({"NVIDIA_VISIBLE_DEVICES": "void"}, None),
        ({"TPU_NAME": "my-tpu", "JAX_PLATFORMS": "cpu"}, None),  # CPU chosen on purpose
        ({}, None),
    ],
)
def test_environment_hints(env, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = preflight(verbose=False, env=env)
    assert report["expected"] == expected
    assert report["ok"] is (expected is None)


def test_expected_gpu_without_printing_warns_and_strict_raises():
    with pytest.warns(RuntimeWarning, match=r"A GPU was expected \(expect='gpu'\)"):
        report = preflight("gpu", verbose=False, env={})
    assert "pip install -U 'jax[cuda12]'" in report["warnings"][0]
    with pytest.raises(RuntimeError, match=r"A GPU was expected .* running on CPU"):
        preflight("gpu", verbose=False, strict=True, env={})


def test_forced_cpu_platform_is_named_in_the_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = preflight("tpu", verbose=False, env={"JAX_PLATFORMS": "cpu"})
    assert "JAX_PLATFORMS='cpu' is set in the environment" in report["warnings"][0]


def test_bad_expect_is_a_clear_error():
    with pytest.raises(ValueError) as e:
        preflight("TPUv4", verbose=False)
    assert str(e.value).startswith(
        "expect must be one of 'cpu', 'gpu', 'tpu' or None; got 'TPUv4'. Fix: "
    )


class _FakeDevice:
    id, platform, device_kind, process_index = 3, "tpu", "TPU v4", 0

    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats


def test_device_memory_from_memory_stats():
    info = _device_info(_FakeDevice({"bytes_limit": 32 * 2**30, "bytes_in_use": 2**30}))
    assert info == {
        "id": 3,
        "platform": "tpu",
        "kind": "TPU v4",
        "process_index": 0,
        "memory_bytes": 32 * 2**30,
        "memory": "32.0 GiB",
        "memory_in_use_bytes": 2**30,
    }
    assert _device_info(_FakeDevice(NotImplementedError("no stats")))["memory"] == "unknown"
    assert _device_info(_FakeDevice(None))["memory"] == "unknown"


def test_cli_doctor(capsys):
    assert cli.main(["doctor", "--expect", "cpu"]) == 0
    assert "backend: cpu" in capsys.readouterr().out
    assert cli.main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "cpu"


@pytest.mark.e2e  # starts a subprocess
def test_console_doctor_expecting_tpu_fails_loudly():
    r = subprocess.run(
        [sys.executable, "-m", "jaxtrain.apps.cli", "doctor", "--expect", "tpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    assert BANNER in r.stdout
    assert "A TPU was expected (expect='tpu') but JAX is running on CPU" in r.stdout
