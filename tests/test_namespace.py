"""A real (not editable) install claims one top-level import name, `greenroute`, and serves.

The project is copied to a scratch directory and installed with pip into a `--target` folder,
so nothing is built inside the working tree. The installed copy is then run with `python -S`
and an explicit path (the target, then the venv's site-packages for the dependencies): `-S`
skips the .pth files, so the editable install's import hook cannot answer in its place.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE_FOLDERS = ("gateway", "backends", "routers", "evals")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = tmp_path_factory.mktemp("target")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--disable-pip-version-check", "-q", "--target", str(target),
                    str(source)], check=True, capture_output=True, timeout=300)
    return target


def _run_installed(target: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    path = [str(target), sysconfig.get_paths()["purelib"]]
    prelude = f"import sys\nsys.path[:0] = {path!r}\n"
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_the_only_new_top_level_name_is_greenroute(installed: Path) -> None:
    # pip --target also writes the console script into bin/ (a scripts folder, not a package).
    names = {p.name for p in installed.iterdir()} - {"bin"}
    assert names == {"greenroute", "greenroute-0.1.0.dist-info"}
    package = installed / "greenroute"
    assert not (package / "__init__.py").exists()  # a PEP 420 namespace
    assert {p.name for p in package.iterdir()} == set(PACKAGE_FOLDERS)
    assert (package / "routers" / "default" / "manifest.json").exists()  # package data
    assert (installed / "bin" / "greenroute").exists()


def test_serve_help_runs_from_the_install_alone(installed: Path, tmp_path: Path) -> None:
    result = _run_installed(installed, (
        "import greenroute.gateway.cli as cli\n"
        "print(cli.__file__)\n"
        "for name in ('gateway', 'backends', 'routers', 'evals'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "    else:\n"
        "        print('importable:', name)\n"
        "cli.main(['serve', '--help'])\n"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first, *rest = result.stdout.splitlines()
    assert Path(first).is_relative_to(installed)
    assert not [line for line in rest if line.startswith("importable:")]
    assert "usage: greenroute serve" in result.stdout
