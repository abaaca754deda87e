"""JAX's persistent compilation cache for the command-line scripts.

`scripts/train_jax.py`, `scripts/generate.py` and `scripts/evaluate.py` keep the XLA programs they
compile in a directory (`--compile-cache`, default `$JAXLLM_CACHE/xla`, i.e. `~/.cache/jaxllm/xla`):
a run that needs a program compiled before (a resumed run, the same command again) loads it
instead. On 2 CPU cores the `small` train step took 10.4 s to compile and 3.6 s to trace and
load (a 3-step run of `scripts/train_jax.py`: 14 s instead of 26), the `seed-973m` step 12.2 s
and 3.0 s (a 0.5 MB entry). JAX keys each program by its computation, compile options, devices,
jax/jaxlib version and XLA flags, so a change to any of them compiles afresh; programs that
compile in under a second are not kept. Delete the directory to empty it; `--compile-cache none` runs without it.

The library itself turns nothing on (importing `jaxllm` changes no JAX setting), and the
benchmarks turn the cache off, since they report compile times. Without `--compile-cache`, a
`JAX_COMPILATION_CACHE_DIR` set in the environment (JAX's own setting) is used as it is. An entry
cut short by a kill while it was written makes JAX warn that it cannot read it and compile the
program again, in every later run: delete the directory to clear it.
"""

from __future__ import annotations

import os

ENV = "JAX_COMPILATION_CACHE_DIR"
OFF = ("none", "off", "")
HIT_EVENT = "/jax/compilation_cache/cache_hits"

_hits = 0
_listening = False


def default_dir() -> str:
    """`$JAXLLM_CACHE/xla`, or `~/.cache/jaxllm/xla` (next to the embedded tokenizer's cache)."""
    from jaxllm.data import cache_root

    return os.path.join(cache_root(), "xla")


def enable(path: str | None = None) -> str | None:
    """Turn the persistent cache on at `path` ("none": off; None: `$JAX_COMPILATION_CACHE_DIR` when
    set, which JAX has read already, else `default_dir()`). Returns the directory in use, or None
    when off. A `path` given that cannot be created raises OSError naming it; the default one
    (a read-only home directory, say) is only warned about: the run goes on without the cache."""
    import sys

    import jax

    _listen()
    if path is not None and path.strip().lower() in OFF:
        disable()
        return None
    if path is None and os.environ.get(ENV):
        return os.environ[ENV]
    given, path = path, os.path.abspath(os.path.expanduser(path or default_dir()))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if given is not None:
            raise OSError(f"--compile-cache: cannot create {path} ({e.strerror or e})") from None
        print(f"warning: no compilation cache: cannot create {path} ({e.strerror or e}); pass --compile-cache DIR "
              "to keep compiled programs elsewhere, or --compile-cache none", file=sys.stderr, flush=True)
        disable()
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if given is not None:  # (also after `disable`, or JAX_ENABLE_COMPILATION_CACHE=false)
        jax.config.update("jax_enable_compilation_cache", True)
    return path


def disable() -> None:
    """No persistent cache in this process, whatever the environment says (benchmarks: their
    compile times are real compiles)."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)


def hits() -> int:
    """Programs loaded from the persistent cache in this process since the first call of `hits` or
    `enable` (compare two calls around a compile)."""
    _listen()
    return _hits


def _listen() -> None:
    global _listening
    if _listening:
        return
    import jax

    def on_event(event: str, **_kw) -> None:
        global _hits
        if event == HIT_EVENT:
            _hits += 1

    jax.monitoring.register_event_listener(on_event)
    _listening = True
