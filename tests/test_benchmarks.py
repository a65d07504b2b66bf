"""Benchmarks are not timed tests: each runs once here at a tiny size to prove it works."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_soak_runs_and_reports(tmp_path):
    out = tmp_path / "soak.json"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "soak.py"),
            "--steps",
            "300",
            "--log-every",
            "20",
            "--eval-every",
            "100",
            "--save-every",
            "100",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps"] == 300 and r["train_step_compilations"] == 1
    # 15 records every 20 steps + 13 at epoch ends (23 steps each), none coinciding.
    assert r["evaluations"] == 3 and r["log_records"] == 15 + 13
    assert r["checkpoints_kept"] == [200, 300]
    assert r["rss_mib_end"] > 0 and "rss_growth_percent" in r
