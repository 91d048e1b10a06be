"""The package as pip builds it, not the source tree: every module of ``saslsmtp`` is in
the wheel and imports from it, and so does the twistd plugin (a package missing from
``setup.cfg`` once left ``saslsmtp.relay`` out of every non-editable install); the
``py.typed`` marker ships, so a user's type checker reads our hints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import ROOT


def source_copy(target: Path) -> Path:
    """What an sdist holds, without the tree's leftovers: setuptools would add whatever an
    earlier build left in ``build/`` to the wheel, and hide a missing package."""
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    for package in ("saslsmtp", "twisted"):
        shutil.copytree(ROOT / package, target / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def test_the_wheel_holds_every_module_and_they_import(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    source = source_copy(tmp_path / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q",
                            "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("saslsmtp-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    sources = sorted(p.relative_to(ROOT) for p in (ROOT / "saslsmtp").rglob("*.py"))
    assert [str(p) for p in sources if str(p) not in names] == []
    assert "twisted/plugins/saslsmtp_plugin.py" in names
    assert "saslsmtp/py.typed" in names  # PEP 561: mypy reads the library's own hints
    modules = [".".join(p.with_suffix("").parts).removesuffix(".__init__") for p in sources]
    # from the wheel only: the PYTHONPATH entry comes before any editable install's path
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
            "import saslsmtp, twisted.plugins.saslsmtp_plugin\nprint(saslsmtp.__file__)")
    done = subprocess.run([sys.executable, "-c", code, *modules], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "site" / "saslsmtp" / "__init__.py")
