"""pyproject.toml's requirements: their floors are the versions `.ci/floors.txt` pins (the oldest
tested), and the torch range admits the CPU build that `.ci/run` installs."""
import re
import tomllib

from conftest import ROOT


def _requirements():
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(?:,<([0-9.]+))?", dep)
        assert m, f"not a floor (and optional cap): {dep!r}"
        out[m[1].lower().replace("_", "-")] = (m[2], m[3])
    return out


def _pins():
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _key(version):  # "5.18" == "5.18.0"
    parts = [int(x) for x in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_every_floor_is_the_version_pinned_as_tested():
    reqs, pins = _requirements(), _pins()
    for name, (floor, _) in reqs.items():
        if name == "torch":  # tested with the CI's build only
            continue
        assert name in pins, f"{name}: no tested version in .ci/floors.txt"
        assert _key(pins[name]) == _key(floor), f"{name}: pyproject floor {floor}, tested {pins[name]}"


def test_the_torch_range_admits_the_ci_build():
    floor, cap = _requirements()["torch"]
    ci = re.search(r'pip install --quiet "torch==([0-9.]+)"', (ROOT / ".ci" / "run").read_text())[1]
    assert _key(floor) <= _key(ci) < _key(cap)
