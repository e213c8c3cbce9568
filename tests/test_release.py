"""Release files agree with each other, and the sdist's template carries the native sources.

Fast checks without building anything; .ci/package builds the sdist and the wheel, installs
the wheel in a fresh environment and runs it.
"""

import os
import re
from pathlib import Path

import pytest

import fastssl

ROOT = Path(__file__).resolve().parent.parent


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def citation() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "CITATION.cff").read_text())


def test_version_and_license_agree_across_the_release_files():
    version = project()["version"]
    assert fastssl.__version__ == version
    cff = citation()
    assert cff["cff-version"] == "1.2.0" and {"message", "title", "authors"} <= set(cff)
    assert (cff["title"], cff["version"], cff["license"]) == ("fastssl", version, project()["license"])
    newest = re.search(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert newest is not None and newest.group(1) == version
    assert project()["license"] == "Apache-2.0" and project()["license-files"] == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    assert "Copyright 2026 The fastssl authors" in license_text


def test_the_sdist_template_carries_the_native_sources():
    """MANIFEST.in applied by setuptools' own template code to the files on disk, as
    ``python -m build --sdist`` applies it (setuptools adds the package's modules itself)."""
    from setuptools.command.egg_info import FileList

    native = sorted(str(path.relative_to(ROOT)) for top in ("csrc", "kernels") for path in (ROOT / top).rglob("*")
                    if path.is_file() and "__pycache__" not in path.parts)
    assert any(name.endswith(".cu") for name in native) and any(name.endswith(".cpp") for name in native)
    files = FileList()
    files.allfiles = native + [str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("*.py")] + [
        name for name in os.listdir(ROOT) if (ROOT / name).is_file()]
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            files.process_template_line(line)
    included = set(files.files)
    # (setup.py and pyproject.toml setuptools adds itself)
    assert {"CMakeLists.txt", "LICENSE", "CHANGELOG.md", "CITATION.cff", "README.md"} <= included
    assert set(native) <= included
    assert not any(name.startswith("tests/") or name.endswith(".so") for name in included)
