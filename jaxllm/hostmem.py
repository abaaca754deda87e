"""Host memory for CPU training: the big per-step buffers in transparent huge pages.

XLA on a CPU allocates each step's temporaries (5.4 GiB for a `seed-973m` step) and its new
weights and moments afresh; glibc serves such blocks with `mmap` and gives them back with `munmap`,
so every step faults all of them in again, 4 KiB at a time: 2.2 million page faults and 12-15 s of
kernel time per `seed-973m` step on a 2-core machine. With the glibc tunable
`glibc.malloc.hugetlb=1`, malloc asks for transparent huge pages (`madvise`): about 90 thousand
faults and 2-3 s of kernel time per step, and the step about 10% shorter (BENCHMARKS.md). Tunables
are read when a process starts, so `scripts/train_jax.py` and `scripts/bench.py` re-execute
themselves once with it set (`reexec_with_huge_pages`), before anything else runs.

It applies where it can help: Linux with glibc, and the kernel's transparent huge pages in
`madvise` mode (in `always` mode every process has them already; in `never` mode nothing can).
`JAXLLM_HUGE_PAGES=0` (or `false`, `off`, `no`, `none`) turns it off. Pure Python (no JAX import).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "JAXLLM_HUGE_PAGES"
OFF = ("0", "false", "off", "no", "none")  # "none" as for --compile-cache
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def tuned_environ(environ=None, *, thp: str | None = None, libc: str | None = None) -> dict | None:
    """`environ` with the tunable added to `GLIBC_TUNABLES`, or None where it does not apply or is
    already set (so a re-executed process does not re-execute again)."""
    environ = dict(os.environ if environ is None else environ)
    if environ.get(OPT_OUT, "1").strip().lower() in OFF:
        return None
    if (libc if libc is not None else platform.libc_ver()[0]) != "glibc":
        return None
    if (thp if thp is not None else thp_mode()) != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return environ


def started_as(script: str) -> bool:
    """Whether this process was started to run `script`: `python [options] script args` or
    `python [options] -m module args` (the module's file being `script`). Not when the script runs
    inside another program (IPython's `%run`, a debugger, a driver calling `runpy`): re-executing
    `sys.orig_argv` would restart that program instead."""
    orig, argv = list(getattr(sys, "orig_argv", None) or []), sys.argv
    n = len(orig) - len(argv)  # the program's position in orig_argv
    if not argv or n < 1 or orig[n + 1:] != argv[1:]:
        return False
    same = os.path.realpath(argv[0]) == os.path.realpath(script)
    i = 1
    while i < n:  # only the interpreter's own options before the program
        if orig[i] == "-m" and i == n - 1:  # argv[0]: the module's file, and that module is __main__
            spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            return same and getattr(spec, "name", None) == orig[n]
        if orig[i] in ("-W", "-X", "--check-hash-based-pycs"):  # an option and its value
            i += 2
        elif orig[i].startswith("-") and orig[i] not in ("-c", "-m"):
            i += 1
        else:  # another program first (-c code, -m pdb, a script given this one as an argument)
            return False
    return same and os.path.realpath(orig[n]) == os.path.realpath(script)


def reexec_with_huge_pages(script: str) -> None:
    """Re-execute this process (same interpreter, flags and arguments) with the tunable set, where
    it applies and the process was started to run `script` (the caller's `__file__`, `started_as`);
    otherwise return. Call first thing in a script's `__main__`."""
    env = tuned_environ()
    if env is None or not started_as(script):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
    """One line for logs: whether this process has huge pages for its malloc."""
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        return f"malloc: transparent huge pages (GLIBC_TUNABLES {TUNABLE})"
    if thp_mode() == "always":
        return "malloc: transparent huge pages (kernel mode always)"
    return "malloc: 4 KiB pages"
