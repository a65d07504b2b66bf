"""The package as users install it: one version, its licence, lean dependencies, the data inside.

The fast tests read ``pyproject.toml``, ``CHANGELOG.md`` and ``LICENSE``; the e2e test builds
the sdist and the wheel (``python -m build``, from a copy of the sources) and opens them.
`.ci/run` goes further: ``twine check``, and the wheel installed into a fresh virtual
environment runs ``jaxtrain train --max-steps 20``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

import jaxtrain
from jaxtrain import data as data_lib

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What jaxtrain no longer installs (issue 16): bundled data replace scikit-learn, the tests
# alone use chex, and only TensorBoardWriter needs tensorboardX (the `tensorboard` extra).
NOT_RUNTIME = ("scikit-learn", "sklearn", "chex", "tensorboardx")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_the_version_is_defined_once_in_the_package():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jaxtrain.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", jaxtrain.__version__)
    # The installed metadata (this checkout's editable install) says the same.
    assert importlib.metadata.version("jaxtrain") == jaxtrain.__version__


def test_the_changelog_names_the_current_version_first():
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert versions and versions[0] == jaxtrain.__version__, versions
    assert "keepachangelog.com" in text


def test_the_licence_file_is_the_apache_licence_pyproject_names():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    # The unmodified text of https://www.apache.org/licenses/LICENSE-2.0.txt.
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
    )


def test_every_runtime_dependency_is_justified_and_the_lean_ones_are_gone():
    deps = PYPROJECT["project"]["dependencies"]
    assert not [d for d in deps if _name(d) in NOT_RUNTIME], deps
    # Each entry of the dependencies array has a comment right above it saying what needs it.
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    start = lines.index("dependencies = [")
    end = lines.index("]", start)
    body = [line.strip() for line in lines[start + 1 : end]]
    for i, line in enumerate(body):
        if line.startswith('"'):
            assert i > 0 and body[i - 1].startswith("#"), f"no comment above {line}"
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "tensorboardX>=2.6" in extras["tensorboard"]
    test_extra = {_name(d) for d in extras["test"]}
    assert {"chex", "jaxtrain"} <= test_extra and "scikit-learn" not in test_extra
    for extra in ("tensorboard", "grain", "mlflow", "wandb", "packaging"):
        assert f"jaxtrain[{extra}]" in extras["test"], extra  # CI tests every option


def test_the_digits_file_is_package_data():
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["jaxtrain"]
    assert "datasets/digits.npz" in package_data and "datasets/DIGITS.md" in package_data
    assert data_lib.DIGITS_FILE == pathlib.Path(jaxtrain.__file__).parent / "datasets/digits.npz"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The sdist and the wheel (built from the sdist) of a copy of this checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "jaxtrain", src / "jaxtrain", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend of this environment (setuptools), no download.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("jaxtrain-*.whl")
    (sdist,) = dist.glob("jaxtrain-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.e2e
def test_the_wheel_carries_the_data_the_licence_and_one_version(built):
    version = jaxtrain.__version__
    assert built["wheel"].name == f"jaxtrain-{version}-py3-none-any.whl"
    with zipfile.ZipFile(built["wheel"]) as whl:
        names = set(whl.namelist())
        npz = whl.read("jaxtrain/datasets/digits.npz")
        metadata = whl.read(f"jaxtrain-{version}.dist-info/METADATA").decode()
    assert {"jaxtrain/datasets/DIGITS.md", "jaxtrain/py.typed", "jaxtrain/trackers.py"} <= names
    assert f"jaxtrain-{version}.dist-info/licenses/LICENSE" in names
    assert npz == data_lib.DIGITS_FILE.read_bytes()
    with np.load(io.BytesIO(npz), allow_pickle=False) as z:
        assert z["images"].shape == (1797, 8, 8) and z["labels"].shape == (1797,)
    assert f"\nVersion: {version}\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata
    requires = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert requires and not [r for r in requires if _name(r) in NOT_RUNTIME], requires
    with tarfile.open(built["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"LICENSE", "jaxtrain/datasets/digits.npz", "jaxtrain/datasets/DIGITS.md"} <= members
