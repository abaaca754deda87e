"""pyproject.toml's requirements: their floors are the versions `.ci/floors.txt` pins (the oldest
tested), and the torch range admits the CPU build that `.ci/run` installs."""
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT


def _requirements():
    with open(ROOT / "pyproject.toml", "rb") as f:
        reqs = [Requirement(dep) for dep in tomllib.load(f)["project"]["dependencies"]]
    return {canonicalize_name(r.name): r.specifier for r in reqs}


def _floor(specifier):
    floors = [Version(s.version) for s in specifier if s.operator == ">="]
    assert len(floors) == 1, f"not one floor: {specifier}"
    return floors[0]


def _pins():
    reqs = [Requirement(line) for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): Version(next(iter(r.specifier)).version) for r in reqs}


def test_every_floor_is_the_version_pinned_as_tested():
    pins = _pins()
    for name, specifier in _requirements().items():
        if name == "torch":  # tested with the CI's build only
            continue
        assert name in pins, f"{name}: no tested version in .ci/floors.txt"
        assert pins[name] == _floor(specifier), f"{name}: pyproject floor {specifier}, tested {pins[name]}"


def test_the_torch_range_admits_the_ci_build():
    ci = re.search(r'pip install --quiet "torch==([0-9.]+)"', (ROOT / ".ci" / "run").read_text())[1]
    assert ci in _requirements()["torch"]
