"""The sdist holds what the build needs and nothing of a developer's virtual environment or builds.

The sdist is built by scikit-build-core (the build backend) from a copy of the checkout's tracked
files into which the usual local clutter has been planted: the quick start's ``.venv``, build
trees, wheels, an in-place ``_C`` and run outputs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CLUTTER = [
    ".venv/pyvenv.cfg",
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    "venv/pyvenv.cfg",
    ".venv-floor/pyvenv.cfg",
    "build/cp311-cp311-linux_x86_64/CMakeCache.txt",
    "build/dev-cpu/_C.cpython-311-x86_64-linux-gnu.so",
    "dist/colabx-0.1.0.tar.gz",
    "wheelhouse/colabx-0.1.0-cp311-cp311-manylinux_2_34_x86_64.whl",
    "colabx.egg-info/PKG-INFO",
    "colabx/_C.cpython-311-x86_64-linux-gnu.so",
    "colabx/__pycache__/cli.cpython-311.pyc",
    "colabx_runs/phantom-colab-1/checkpoint.pt",
    ".pytest_cache/README.md",
]


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout (the sdist is built from its tracked files)")
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def test_sdist_has_the_build_inputs_and_no_clutter(tmp_path, monkeypatch):
    build_sdist = pytest.importorskip("scikit_build_core.build").build_sdist
    tracked = _tracked_files()
    src = tmp_path / "src"
    for rel in tracked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    for rel in CLUTTER:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("clutter\n")
    # the version is written once, in colabx/__init__.py: the metadata follows it
    init = src / "colabx" / "__init__.py"
    text = init.read_text()
    assert text.count('__version__ = "') == 1
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "9.8.7"', text))

    monkeypatch.chdir(src)
    name = build_sdist(str(tmp_path / "out"))
    assert name == "colabx-9.8.7.tar.gz"
    with tarfile.open(tmp_path / "out" / name) as tar:
        prefix = f"{name.removesuffix('.tar.gz')}/"
        members = {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}
        pkg_info = tar.extractfile(f"{prefix}PKG-INFO").read().decode()
    assert "\nVersion: 9.8.7\n" in pkg_info

    needed = {"pyproject.toml", "CMakeLists.txt", "LICENSE", "README.md"}
    needed |= {p for p in tracked if p.startswith(("csrc/", "colabx/"))}
    assert needed <= members, f"missing from the sdist: {sorted(needed - members)}"
    assert any(p.endswith(".cu") for p in members) and any(p.endswith(".cpp") for p in members)
    extra = members - set(tracked) - {"PKG-INFO"}
    assert not extra, f"the sdist packs files that are not part of the source: {sorted(extra)}"
