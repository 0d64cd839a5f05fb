"""The distributions ``python -m build`` makes (an sdist, and a wheel built from it) hold what
an installed package needs: every file of the package's source tree (the ``py.typed``
marker and the demo's data among them), and the license, named in the metadata.

Built once for the module, from a clean copy of the source tree, without build isolation
(the dev extra holds ``build`` and the setuptools backend: nothing is downloaded), in about
7 s on 2 cores: ``slow``. ``.ci/run`` then installs the wheel in a fresh environment and
runs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "batchnorm"


# Left out of the copy built from: what builds, installs and runs leave in a checkout. An
# egg-info folder's file list, in particular, would put in the sdist whatever a former build
# put there, hiding a file that the configuration leaves out.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist",
                                    "__pycache__", ".*_cache", ".hypothesis", "demo-output",
                                    "bench-results", "out")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """A folder holding the sdist and the wheel built from it, built from a clean copy of
    the source tree."""
    source = tmp_path_factory.mktemp("source") / "batchnorm"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                    str(source)], check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Iterator[zipfile.ZipFile]:
    [path] = dist.glob("batchnorm-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    [path] = [n for n in wheel.namelist() if n.split("/")[0].endswith(".dist-info")
              and n.split("/", 1)[1] == name]
    return path


def test_wheel_holds_every_file_of_the_package_source_tree(wheel):
    source = {path.relative_to(PACKAGE.parent).as_posix() for path in PACKAGE.rglob("*")
              if path.is_file() and "__pycache__" not in path.parts}
    assert "batchnorm/py.typed" in source
    assert "batchnorm/apps/data/digits.csv.gz" in source  # what the demo's load_digits reads
    assert source - set(wheel.namelist()) == set()


def test_wheel_record_lists_the_type_marker_and_the_demo_data(wheel):
    # RECORD is what installers install and uninstall.
    record = {line.split(",")[0] for line in wheel.read(dist_info(wheel, "RECORD")).decode()
              .splitlines()}
    assert {"batchnorm/py.typed", "batchnorm/apps/data/digits.csv.gz"} <= record


def test_wheel_holds_the_license_its_metadata_names(wheel):
    metadata = Parser().parsestr(wheel.read(dist_info(wheel, "METADATA")).decode())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["License-File"] == "LICENSE"
    assert wheel.read(dist_info(wheel, "licenses/LICENSE")) == (ROOT / "LICENSE").read_bytes()


def test_sdist_holds_the_license(dist):
    [path] = dist.glob("batchnorm-*.tar.gz")
    with tarfile.open(path) as archive:
        [member] = [m for m in archive.getmembers() if m.name.endswith("/LICENSE")
                    and m.name.count("/") == 1]
        assert archive.extractfile(member).read() == (ROOT / "LICENSE").read_bytes()
