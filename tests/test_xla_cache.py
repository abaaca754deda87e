"""`jaxllm/xla_cache.py`: which directory the scripts' persistent compilation cache uses (the cache
at work, two runs of `train_jax.py`: tests/test_reliability.py)."""

import os

import jax

from jaxllm import xla_cache


def test_the_flag_the_environment_and_the_default_choose_the_directory(tmp_path, monkeypatch):
    saved = {k: getattr(jax.config, k) for k in ("jax_enable_compilation_cache", "jax_compilation_cache_dir")}
    try:
        assert xla_cache.enable("none") is None and not jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", True)
        # a directory given explicitly wins over the environment's, and is created
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        path = xla_cache.enable(str(tmp_path / "flag" / "xla"))
        assert path == str(tmp_path / "flag" / "xla") and os.path.isdir(path)
        assert jax.config.jax_compilation_cache_dir == path
        # no flag: the environment's directory (JAX read it itself), else $JAXLLM_CACHE/xla
        assert xla_cache.enable(None) == str(tmp_path / "env")
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "root"))
        assert xla_cache.default_dir() == str(tmp_path / "root" / "xla") == xla_cache.enable(None)
        monkeypatch.delenv("JAXLLM_CACHE")
        assert xla_cache.default_dir() == os.path.expanduser(os.path.join("~", ".cache", "jaxllm", "xla"))
        # a directory given explicitly turns the cache on again after it was off
        assert xla_cache.enable("none") is None and not jax.config.jax_enable_compilation_cache
        assert xla_cache.enable(str(tmp_path / "again")) and jax.config.jax_enable_compilation_cache
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)


def test_a_default_directory_that_cannot_be_made_is_a_warning_not_an_error(tmp_path, monkeypatch, capsys):
    """A read-only home directory (a cluster's container): the run goes on without the cache, which
    only saves time; a --compile-cache the user gave that cannot be made stays an error."""
    import pytest

    saved = {k: getattr(jax.config, k) for k in ("jax_enable_compilation_cache", "jax_compilation_cache_dir")}
    (tmp_path / "a_file").write_text("")
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "a_file" / "cache"))
        assert xla_cache.enable(None) is None and not jax.config.jax_enable_compilation_cache
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("warning: no compilation cache: cannot create ") \
            and "--compile-cache" in err, err
        with pytest.raises(OSError, match="--compile-cache: cannot create"):
            xla_cache.enable(str(tmp_path / "a_file" / "xla"))
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)


def test_the_flag_takes_the_values_that_turn_the_cache_off_and_expands_a_tilde(monkeypatch, tmp_path):
    """`--compile-cache` goes through the path flags' type (`cli.path`) but for "none", "off" and
    "" (an unset variable), which turn the cache off rather than being refused as an empty path."""
    from jaxllm import cli

    p = cli.parser("x.py", "")
    cli.add_compile_cache_flag(p)
    monkeypatch.setenv("HOME", str(tmp_path))
    for value in ("", "none", "OFF"):
        assert p.parse_args(["--compile-cache", value]).compile_cache == value
    assert p.parse_args(["--compile-cache", "~/xla"]).compile_cache == str(tmp_path / "xla")


def test_enable_takes_none_and_off_in_any_case_and_the_empty_string_as_off(tmp_path, monkeypatch):
    """`enable` itself (not only the flag's parser): "none", "off" and "" (an unset variable), in any
    case and with spaces around, turn the cache off even where the environment names a directory,
    and make no directory (neither one of that name nor the default one)."""
    saved = {k: getattr(jax.config, k) for k in ("jax_enable_compilation_cache", "jax_compilation_cache_dir")}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "root"))
    try:
        for env in (None, str(tmp_path / "env")):
            if env is None:
                monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
            else:
                monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", env)
            for value in ("none", "None", "NONE", "off", "OFF", "Off", "", " none ", "off\n"):
                jax.config.update("jax_enable_compilation_cache", True)
                assert xla_cache.enable(value) is None, (value, env)
                assert not jax.config.jax_enable_compilation_cache, (value, env)
                assert os.listdir(tmp_path) == [], (value, env)
        # a name that only contains an off word is a directory
        assert xla_cache.enable("offline") == str(tmp_path / "offline") and jax.config.jax_enable_compilation_cache
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
