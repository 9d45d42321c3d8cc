"""What a fresh install gets: the pinned versions (constraints.txt), the license pyproject names,
and no uvloop where it cannot install."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

from loadtest.procs import REPO_ROOT

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def test_every_installed_dependency_is_pinned_at_its_installed_version() -> None:
    check = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "constraints.py"), "--check"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr
    pinned = {line.split("==")[0] for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
              if not line.startswith("#")}
    assert len(pinned) > 100 and not pinned & {"chorus", "chorus-client"}  # never its own


def test_the_license_file_is_the_one_pyproject_names() -> None:
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_uvloop_is_not_required_on_windows() -> None:
    uvloop = next(Requirement(r) for r in PROJECT["dependencies"] if Requirement(r).name == "uvloop")
    assert uvloop.marker is not None
    assert not uvloop.marker.evaluate({"sys_platform": "win32"})
    assert uvloop.marker.evaluate({"sys_platform": "linux"}) and uvloop.marker.evaluate({"sys_platform": "darwin"})
