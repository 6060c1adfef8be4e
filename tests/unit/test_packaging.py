"""The installed distribution claims one import name, `reembed`, and its console script points into it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_has_only_the_reembed_namespace(tmp_path) -> None:
    # Built from a copy: setuptools' build/ folder would otherwise keep files deleted from the source.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "reembed-data", ".device", "tests"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("reembed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"reembed"}, top  # no top-level flows/, workers/ or indexing/ to shadow other projects
    assert {"reembed/flows/run_flow.py", "reembed/flows/operations/run_log.py", "reembed/workers/encoder.py",
            "reembed/indexing/records.py"} <= set(names)
    assert not any(n.startswith("reembed/") and n.count("/") == 1 for n in names)  # a namespace: no __init__.py
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "reembed = reembed.flows.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
