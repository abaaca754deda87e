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
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
