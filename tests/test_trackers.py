"""MLflow and W&B writers with the real packages, offline; `jaxtrain train --mlflow --wandb`.

Nothing here contacts a server: MLflow writes a folder store, W&B runs offline
(``WANDB_MODE=offline``), and both packages' telemetry is off (the ``_offline`` fixture).
The logged values are read back with each package's own reading side: MLflow's client on
the folder store, and W&B's run file (``run-<id>.wandb``) parsed with wandb's own protobuf
``Record`` (`_wandb_records`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
import sys
import zlib

import pytest

from jaxtrain import trackers
from jaxtrain.trackers import MLflowWriter, WandbWriter
from jaxtrain.writers import TensorBoardWriter, read_jsonl

RECORDS = [
    {"step": 10, "epoch": 0, "split": "train", "loss": 1.5, "accuracy": 0.5, "note": "text"},
    {"step": 10, "epoch": 0, "split": "eval", "loss": 1.25, "accuracy": 0.625},
    {"step": 20, "epoch": 1, "split": "train", "loss": float("nan"), "diverged": True},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


def _wandb_records(run_dir: str) -> list:
    """The protobuf records of an offline W&B run, in the order they were written.

    The ``.wandb`` file is a LevelDB-format log (W&B's transaction log, the input of
    ``wandb sync``): a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB
    blocks of chunks, each ``crc32 (4) | length (2) | type (1) | data``, a record split
    over chunks FIRST/MIDDLE/LAST when it crosses a block. Each record is a
    ``wandb.proto.wandb_internal_pb2.Record``, parsed with wandb's own class. (wandb 0.31
    has no Python reader of this file any more; its Go core reads it.)
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    raw = open(path, "rb").read()
    ident, magic, version = struct.unpack("<4sHB", raw[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        data = raw[pos + 7 : pos + 7 + length]
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at {pos}"
        pos += 7 + length
        chunks = data if kind in (1, 2) else chunks + data
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def _wandb_history(run_dir: str) -> list[dict]:
    rows = []
    for r in _wandb_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows


def _wandb_config(run_dir: str) -> dict:
    (run,) = [r.run for r in _wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]
    return {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}


def _mlflow_metrics(writer_or_uri, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=writer_or_uri)
    keys = client.get_run(run_id).data.metrics
    return {
        k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in sorted(keys)
    }


def _same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return len(a) == len(b) and all(
        s == t and (x == y or (math.isnan(x) and math.isnan(y)))
        for (s, x), (t, y) in zip(a, b, strict=True)
    )


# --- MLflow --------------------------------------------------------------------------------


def test_mlflow_writer_logs_every_metric_at_its_step(tmp_path):
    from mlflow.tracking import MlflowClient

    with MLflowWriter(tmp_path / "mlruns", experiment="exp", run_name="r", params={"lr": 0.5}) as w:
        for r in RECORDS:
            w.write(r)
    assert w.tracking_uri == "file://" + str(tmp_path / "mlruns")
    got = _mlflow_metrics(w.tracking_uri, w.run_id)
    # Numbers only, tagged split/name; step/epoch/split, text and bools are not metrics.
    assert sorted(got) == ["eval/accuracy", "eval/loss", "train/accuracy", "train/loss"]
    assert got["train/accuracy"] == [(10, 0.5)]
    assert got["eval/loss"] == [(10, 1.25)] and got["eval/accuracy"] == [(10, 0.625)]
    assert _same(got["train/loss"], [(10, 1.5), (20, float("nan"))])  # a diverged loss shows
    run = MlflowClient(tracking_uri=w.tracking_uri).get_run(w.run_id)
    assert run.data.params == {"lr": "0.5"}
    assert run.info.status == "FINISHED" and run.info.run_name == "r"


def test_mlflow_run_is_failed_when_the_block_raises_and_a_second_writer_is_a_second_run(tmp_path):
    from mlflow.tracking import MlflowClient

    with pytest.raises(RuntimeError, match="boom"):
        with MLflowWriter(tmp_path / "mlruns") as first:
            first.write({"step": 1, "loss": 3.0})  # no split: default_split "train"
            raise RuntimeError("boom")
    with MLflowWriter(tmp_path / "mlruns") as second:
        second.write({"step": 1, "loss": 2.0})
    client = MlflowClient(tracking_uri=second.tracking_uri)
    assert client.get_run(first.run_id).info.status == "FAILED"
    assert first.run_id != second.run_id
    assert _mlflow_metrics(second.tracking_uri, second.run_id) == {"train/loss": [(1, 2.0)]}
    assert _mlflow_metrics(first.tracking_uri, first.run_id) == {"train/loss": [(1, 3.0)]}


# --- Weights & Biases ------------------------------------------------------------------------


def test_wandb_writer_logs_offline_against_the_jaxtrain_step(tmp_path):
    with WandbWriter(tmp_path, project="p", name="r", config={"lr": 0.5}) as w:
        for r in RECORDS:
            w.write(r)
    assert os.path.basename(w.run_dir).startswith("offline-run-")
    assert os.path.dirname(w.run_dir) == str(tmp_path / "wandb")
    rows = _wandb_history(w.run_dir)
    assert rows[:2] == [
        {"step": 10, "train/loss": 1.5, "train/accuracy": 0.5},
        {"step": 10, "eval/loss": 1.25, "eval/accuracy": 0.625},
    ]
    assert rows[2]["step"] == 20 and math.isnan(rows[2]["train/loss"]) and len(rows) == 3
    assert _wandb_config(w.run_dir) == {"lr": 0.5}
    # Every metric is plotted against jaxtrain's step, not W&B's own counter.
    defs = [r.metric for r in _wandb_records(w.run_dir) if r.WhichOneof("record_type") == "metric"]
    assert any(d.glob_name == "*" and d.step_metric == "step" for d in defs), defs


def test_wandb_writer_refuses_an_unknown_mode(tmp_path):
    with pytest.raises(
        ValueError, match=r"mode must be 'offline', 'online' or 'disabled'; got 'cloud'"
    ):
        WandbWriter(tmp_path, mode="cloud")


# --- The command line ------------------------------------------------------------------------


def test_jaxtrain_train_mlflow_and_wandb_log_what_metrics_jsonl_holds(tmp_path):
    from jaxtrain.apps import digits

    out = str(tmp_path / "run")
    cfg = digits.TrainConfig(
        model="mlp", max_steps=20, log_every=10, eval_every=10, out=out, progress=False,
        checkpoint=False, summary=False, mlflow=True, wandb=True,
    )  # fmt: skip
    digits.run(cfg)
    logged = read_jsonl(os.path.join(out, "metrics.jsonl"))
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in logged:
        for k, v in r.items():
            if (
                k not in ("step", "epoch", "split")
                and isinstance(v, (int, float))
                and v is not True
                and v is not False
            ):
                expected.setdefault(f"{r['split']}/{k}", []).append((r["step"], float(v)))
    assert {"train/loss", "eval/loss", "eval/accuracy"} <= set(expected)

    from mlflow.tracking import MlflowClient

    uri = "file://" + os.path.join(out, "mlruns")
    (run,) = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("jaxtrain").experiment_id]
    )
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == str(cfg.lr) and run.data.params["model"] == "mlp"
    got = _mlflow_metrics(uri, run.info.run_id)
    assert set(got) == set(expected)
    for key, values in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in values], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in values], rel=1e-6), key

    (run_dir,) = glob.glob(os.path.join(out, "wandb", "offline-run-*"))
    rows = _wandb_history(run_dir)
    from_wandb: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step":
                from_wandb.setdefault(k, []).append((row["step"], v))
    assert from_wandb == expected
    assert _wandb_config(run_dir)["max_steps"] == 20


# --- Missing packages: a clear install message (fast, in-process) ---------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "make, module, extra",
    [
        (lambda p: MLflowWriter(p), "mlflow", "mlflow"),
        (lambda p: WandbWriter(p), "wandb", "wandb"),
        (lambda p: TensorBoardWriter(p), "tensorboardX", "tensorboard"),
    ],
    ids=["mlflow", "wandb", "tensorboard"],
)
def test_a_missing_tracker_package_says_how_to_install_it(
    monkeypatch, tmp_path, make, module, extra
):
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(
        ImportError, match=rf"needs the {module} package.*pip install 'jaxtrain\[{extra}\]'"
    ):
        make(tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize(
    "option, package", [("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboardX")]
)
def test_the_cli_refuses_a_tracker_whose_package_is_missing_in_one_line(
    monkeypatch, tmp_path, capsys, option, package
):
    import importlib.util

    from jaxtrain.apps import cli, digits

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a)
    )
    with pytest.raises(ValueError, match=rf"{option}: --{option} needs the {package} package"):
        dataclasses.replace(digits.TrainConfig(), **{option: True}).validate()
    out = tmp_path / "run"
    status = cli.main(["train", f"--{option}", "--max-steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert (
        err.count("\n") == 0
        and f"pip install 'jaxtrain[{'tensorboard' if package == 'tensorboardX' else package}]'"
        in err
    )
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written


@pytest.mark.unit
def test_tracker_records_need_a_step_and_names_are_checked():
    # A population's [N] values: one metric per member, a frozen member's NaN left out.
    assert MLflowWriter.scalars({"step": 2, "loss": [0.5, float("nan"), 0.25]}) == (
        2,
        {"train/loss/member_0": 0.5, "train/loss/member_2": 0.25},
    )
    assert WandbWriter.scalars({"step": 3, "loss": 2, "ok": True, "split": "eval"}) == (
        3,
        {"eval/loss": 2.0},
    )
    with pytest.raises(ValueError, match=r"needs a 'step' in every record; got keys \['loss'\]"):
        MLflowWriter.scalars({"loss": 1.0})
    with pytest.raises(ValueError, match=r"tracker name must be 'mlflow' or 'wandb'; got 'comet'"):
        trackers.tracker_available("comet")
    assert trackers.tracker_available("mlflow") and trackers.tracker_available("wandb")
