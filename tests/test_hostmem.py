"""Huge pages for the host's malloc (jaxllm/hostmem.py): when the tunable applies, and that a
re-executed script really runs with it (big blocks land in transparent huge pages)."""

import os
import subprocess
import sys

import pytest

from jaxllm import hostmem


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hostmem.thp_mode(str(f)) == "always"
    assert hostmem.thp_mode(str(tmp_path / "missing")) is None


def test_tuned_environ_applies_only_where_it_can_help():
    env = hostmem.tuned_environ({"PATH": "/bin"}, thp="madvise", libc="glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": hostmem.TUNABLE}
    # other tunables are kept
    env = hostmem.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp="madvise", libc="glibc")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{hostmem.TUNABLE}"
    # already set (a re-executed process), opted out, another libc, or a kernel mode where it changes nothing
    assert hostmem.tuned_environ({"GLIBC_TUNABLES": hostmem.TUNABLE}, thp="madvise", libc="glibc") is None
    assert hostmem.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp="madvise", libc="glibc") is None
    assert hostmem.tuned_environ({hostmem.OPT_OUT: "0"}, thp="madvise", libc="glibc") is None
    assert hostmem.tuned_environ({}, thp="madvise", libc="") is None
    assert hostmem.tuned_environ({}, thp="always", libc="glibc") is None
    assert hostmem.tuned_environ({}, thp="never", libc="glibc") is None


def test_the_opt_out_takes_0_false_off_no_none_in_any_case_and_nothing_else():
    """`JAXLLM_HUGE_PAGES`: 0, false, off, no and none (any case, spaces around) turn the tunable off;
    any other value (1, yes, an empty one) leaves it as where the variable is unset."""
    want = hostmem.tuned_environ({}, thp="madvise", libc="glibc")
    assert want == {"GLIBC_TUNABLES": hostmem.TUNABLE}
    for value in ("0", "false", "off", "no", "none", "FALSE", "Off", "NO", "None", " 0 ", "off\n"):
        assert hostmem.tuned_environ({hostmem.OPT_OUT: value}, thp="madvise", libc="glibc") is None, value
    for value in ("1", "true", "on", "yes", "", "00"):
        env = hostmem.tuned_environ({hostmem.OPT_OUT: value}, thp="madvise", libc="glibc")
        assert env == {**want, hostmem.OPT_OUT: value}, value


CHILD = """
import os, sys
from jaxllm import hostmem
hostmem.reexec_with_huge_pages(__file__)
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)  # 64 MiB from malloc itself (numpy asks for huge pages on its own)
ctypes.memset(block, 1, 64 << 20)
huge = 0
with open("/proc/self/smaps_rollup") as f:
    for line in f:
        if line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
print(os.environ.get("GLIBC_TUNABLES"), huge, sys.argv[1:])
"""


@pytest.mark.skipif(hostmem.tuned_environ({}) is None, reason="huge pages for malloc do not apply on this host")
def test_reexec_runs_the_same_command_with_huge_pages(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    out = subprocess.run([sys.executable, str(child), "--flag", "x"], env=env, capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=2)
    assert out[0] == hostmem.TUNABLE
    assert int(out[1]) >= 32 * 1024  # kB of the block in huge pages
    assert out[2].strip() == "['--flag', 'x']"
    # opted out: no re-execution, 4 KiB pages
    for value in ("0", "off"):
        out = subprocess.run([sys.executable, str(child)], env={**env, hostmem.OPT_OUT: value}, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[0] == "None" and int(out[1]) == 0
    # run inside another program (a driver, as IPython's %run or a debugger): that program is not
    # started again from its first line
    driver = f"import runpy; print('driver ran'); runpy.run_path({str(child)!r}, run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, check=True).stdout
    assert out.count("driver ran") == 1 and out.splitlines()[1].split()[0] == "None", out


def test_started_as_knows_a_script_from_a_program_running_it(monkeypatch, tmp_path):
    script = str(tmp_path / "train.py")

    def started(orig, argv):
        monkeypatch.setattr(sys, "orig_argv", orig)
        monkeypatch.setattr(sys, "argv", argv)
        return hostmem.started_as(script)

    assert started(["python", script, "--steps", "3"], [script, "--steps", "3"])
    assert started(["python", "-u", "-X", "dev", script], [script])
    from types import SimpleNamespace

    # `python -m pkg.train`: runpy's argv[0] is the module's file, and __main__ that module
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=SimpleNamespace(name="pkg.train")))
    assert started(["python", "-m", "pkg.train", "--a"], [script, "--a"])
    # `python -m runner` that sets argv and runs the script with runpy.run_path (no module spec)
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=None))
    assert not started(["python", "-m", "runner"], [script])
    assert not started(["python", "/usr/bin/ipython"], [script, "--help"])  # IPython's %run train.py --help
    assert not started(["python", "/usr/bin/ipython"], [script])
    assert not started(["python", "-c", "runpy.run_path(...)"], ["-c"])  # a driver running it in-process
    assert not started(["python", "-m", "pdb", script, "--a"], [script, "--a"])  # the debugger would restart
    assert not started(["python", "other.py", "--a"], [script, "--a"])
