"""`jaxtrain plot RUN_DIR ...`: several runs' curves overlaid in one image, and clear errors."""

import numpy as np
import pytest
from matplotlib import colors as mcolors
from matplotlib import image as mimage

from jaxtrain.apps import cli
from jaxtrain.apps.digits import TrainConfig, run
from jaxtrain.apps.plots import _run_labels, load_run, plot_runs

# One xdist group (pytest --dist loadgroup): the module fixtures train once, on one worker.
pytestmark = pytest.mark.xdist_group("test_plot")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for name, lr in (("lr2e-3", 2e-3), ("lr5e-4", 5e-4)):
        out = root / name
        run(
            TrainConfig(
                model="mlp", epochs=1, lr=lr, out=str(out), progress=False, checkpoint=False
            )
        )
        dirs.append(out)
    return dirs


def _has_color(img, hex_color, min_pixels=50):
    rgb = np.array(mcolors.to_rgb(hex_color))
    return int((np.abs(img[..., :3] - rgb).max(axis=-1) < 0.02).sum()) >= min_pixels


def test_plot_two_runs_overlaid(two_runs, tmp_path, capsys):
    out = tmp_path / "figs" / "compare.png"  # the folder is created
    code = cli.main(["plot", *map(str, two_runs), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == f"wrote {out} (2 run(s): lr2e-3, lr5e-4)"
    assert out.stat().st_size > 30_000
    img = mimage.imread(out)
    assert img.shape[:2] == (880, 1408)  # 2 x 2 panels: loss, accuracy, learning rate, grad norm
    assert _has_color(img, "C0") and _has_color(img, "C1")  # one colour per run
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 200


def test_plot_selected_metrics(two_runs, tmp_path):
    out = tmp_path / "lr.png"
    assert plot_runs(two_runs[:1], out, metrics=["learning_rate"], title="lr") == str(out)
    assert mimage.imread(out).shape[:2] == (440, 704)  # one panel


def test_run_labels_are_folder_names_unless_they_clash():
    assert _run_labels(["runs/a", "runs/b/"]) == ["a", "b"]
    assert _run_labels(["x/run", "y/run"]) == ["x/run", "y/run"]


def test_folder_without_metrics_is_a_clear_error(two_runs, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    code = cli.main(["plot", str(two_runs[0]), str(empty), "--out", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"jaxtrain plot: error: {str(empty)!r} has no metrics.jsonl, so it is not a jaxtrain "
        "run folder"
    )
    assert "Fix: pass the --out folder of a 'jaxtrain train' run." in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"run_dirs": ["/no/such/run"]}, "'/no/such/run' is not a folder. Fix: pass run folders"),
        ({"path": "out.jpeg"}, "the output file must end in .png, .svg, .pdf; got 'out.jpeg'."),
        ({"metrics": ["bleu"]}, "none of the metrics ['bleu'] is in the records of"),
        ({"labels": ["a", "b"]}, "labels must name each of the 1 runs; got 2 labels."),
        ({"run_dirs": []}, "plot_runs needs at least one run folder; got none."),
    ],
)
def test_bad_plot_arguments(two_runs, tmp_path, kwargs, message):
    args = {"run_dirs": two_runs[:1], "path": tmp_path / "p.png", **kwargs}
    with pytest.raises(ValueError) as e:
        plot_runs(**args)
    assert message in str(e.value)


def test_empty_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"metrics.jsonl is empty: the run logged no metrics yet"):
        load_run(tmp_path)
