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


# ---- the scripts run their own checkout's packages ------------------------------------------------
OURS = ("jaxllm", "torch_ref", "convert")
SCRIPTS = sorted(str(p.relative_to(ROOT)) for d in ("scripts", "convert") for p in (ROOT / d).glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())

# Runs each script's top level (its imports, not its main) as `python SCRIPT` would, then prints,
# per script, where jaxllm, torch_ref and convert come from (and bench.py's PYTHONPATH for its workers).
WHERE_FROM = """
import importlib.util, json, os, runpy, sys
path, env, found = list(sys.path), dict(os.environ), {}
for script in sys.argv[1:]:
    sys.path[0] = os.path.dirname(os.path.realpath(script))  # as `python SCRIPT` sets it
    runpy.run_path(script, run_name="not_main")
    found[script] = {name: importlib.util.find_spec(name).origin for name in %r}
    found[script]["PYTHONPATH"] = os.environ.get("PYTHONPATH")
    sys.path[:] = path
    os.environ.clear(); os.environ.update(env)
    for name in [n for n in sys.modules if n.split(".")[0] in %r + ("generate",)]:
        del sys.modules[name]
print(json.dumps(found))
""" % (OURS, OURS)


def _venv(tmp_path):
    """A virtual environment with this interpreter's packages (linked) but not this project's, and
    `installed`: a folder on its path as site-packages is (a .pth file), where a copy of the project's
    packages lies as `pip install .` (not -e) puts it."""
    import os
    import shutil
    import site
    import subprocess
    import venv

    venv.EnvBuilder(symlinks=True).create(tmp_path / "venv")
    python = str(tmp_path / "venv" / "bin" / "python")
    packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
    for where in filter(os.path.isdir, site.getsitepackages()):
        for name in os.listdir(where):
            if name not in OURS and "jaxllm" not in name and not os.path.lexists(os.path.join(packages, name)):
                os.symlink(os.path.join(where, name), os.path.join(packages, name))
    for package in OURS:
        shutil.copytree(ROOT / package, tmp_path / "installed" / package, ignore=shutil.ignore_patterns("__pycache__"))
    return python, os.path.join(packages, "installed.pth")


def _where_from(python, scripts, cwd):
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([python, "-c", WHERE_FROM, *map(str, scripts)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_a_checkout_s_scripts_run_its_packages_over_installed_ones_and_through_links(tmp_path):
    """The scripts (and convert's command lines) put their checkout on sys.path only when jaxllm
    could not be imported: after a `pip install .` (not -e) a pulled checkout's scripts ran the
    installed, older packages. And the checkout was found with os.path.abspath: a script reached
    through a symbolic link, with nothing installed, found no jaxllm. Without a checkout around them
    (convert/ as installed, a script copied alone) the installed packages still serve."""
    import os
    import shutil
    import subprocess

    assert len(SCRIPTS) >= 10 and "scripts/train_jax.py" in SCRIPTS and "convert/flax_to_torch.py" in SCRIPTS
    python, pth = _venv(tmp_path)
    checkout, installed = tmp_path / "checkout", tmp_path / "installed"
    for name in (*OURS, "scripts"):
        shutil.copytree(ROOT / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", checkout)
    (tmp_path / "bin").mkdir()
    for script in SCRIPTS:
        os.symlink(checkout / script, tmp_path / "bin" / os.path.basename(script))

    def under(where, found):
        return {s: {n: f[n].startswith(f"{where}{os.sep}") for n in OURS} for s, f in found.items()}

    everywhere = {n: True for n in OURS}
    with open(pth, "w") as f:  # installed
        f.write(f"{installed}\n")
    found = _where_from(python, [checkout / s for s in SCRIPTS], cwd=tmp_path)
    assert under(checkout, found) == {str(checkout / s): everywhere for s in SCRIPTS}
    # bench.py's workers (`python -m jaxllm.bench --worker`) the same
    assert found[str(checkout / "scripts" / "bench.py")]["PYTHONPATH"] == str(checkout)
    links = [tmp_path / "bin" / os.path.basename(s) for s in SCRIPTS]
    assert under(checkout, _where_from(python, links, cwd=tmp_path)) == {str(p): everywhere for p in links}
    alone = tmp_path / "alone" / "scripts" / "train_jax.py"
    alone.parent.mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "train_jax.py", alone)
    mains = [installed / "convert" / "flax_to_torch.py", installed / "convert" / "torch_to_flax.py", alone]
    assert under(installed, _where_from(python, mains, cwd=tmp_path)) == {str(p): everywhere for p in mains}
    for command in ([str(installed / "convert" / "flax_to_torch.py"), "--help"], ["-m", "convert.torch_to_flax", "--help"]):
        r = subprocess.run([python, *command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.startswith("usage: "), r.stderr[-2000:]

    os.remove(pth)  # nothing installed: a script reached through a link, as run
    r = subprocess.run([python, str(tmp_path / "bin" / "train_jax.py"), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: train_jax.py"), r.stderr[-2000:]
    assert under(checkout, _where_from(python, links, cwd=tmp_path)) == {str(p): everywhere for p in links}
