"""pyproject.toml's requirements: their floors are the versions `.ci/floors.txt` pins (the oldest
tested), the torch range admits the CPU build that `.ci/run` installs, README.md quotes both as
they are, and the `dev` extra admits no plugin release without the options of pyproject's `addopts`."""
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


def test_the_readme_quotes_the_requirements_as_they_are():
    readme = (ROOT / "README.md").read_text()
    quoted = re.findall(r"`(torch\s*[<>=!~][^`]*)`", readme)
    assert quoted, "README.md quotes no torch requirement"
    for q in quoted:
        req = Requirement(q)
        if [s.operator for s in req.specifier] == ["=="]:
            continue  # an install command's exact build, not the requirement
        assert req.specifier == _requirements()["torch"], f"README.md quotes {q}"
    # The sentence naming the tested floors names the pinned versions.
    sentence = re.search(r"passed with (.*?)\(torch", readme, re.S)[1]
    pins = _pins()
    named = re.findall(r"([A-Za-z][\w.-]*) (\d+(?:\.\d+)+)", sentence)
    assert len(named) >= 5, sentence
    for name, version in named:
        assert Version(version) == pins[canonicalize_name(name)], f"README.md: {name} {version}"


# The options of pyproject's `addopts` that a plugin adds, with the plugin's first release that has
# them: with an older one installed (the `dev` extra's floor admits it, so pip keeps it), pytest
# stops every run at "unrecognized arguments" before a test runs.
PLUGIN_OPTIONS = {"-n": ("pytest-xdist", "3.0"), "--dist": ("pytest-xdist", "3.0"),
                  "--no-loadscope-reorder": ("pytest-xdist", "3.8.0")}
PYTEST_OPTIONS = {"-ra", "-q", "-v"}


def test_the_dev_extra_admits_no_plugin_without_the_options_addopts_pass():
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    dev = {canonicalize_name(r.name): r.specifier
           for r in map(Requirement, project["project"]["optional-dependencies"]["dev"])}
    options = [o.split("=")[0] for o in project["tool"]["pytest"]["ini_options"]["addopts"].split()
               if o.startswith("-")]
    for option in options:
        if option in PYTEST_OPTIONS:
            continue
        assert option in PLUGIN_OPTIONS, f"addopts {option}: which plugin release has it? (PLUGIN_OPTIONS)"
        plugin, since = PLUGIN_OPTIONS[option]
        assert plugin in dev, f"addopts {option} needs {plugin}, which the dev extra does not require"
        assert _floor(dev[plugin]) >= Version(since), \
            f"addopts {option} needs {plugin} {since}; the dev extra admits {plugin}{dev[plugin]}"
