"""Converters between the Flax checkpoint (`jaxllm.checkpoint`) and a Hugging Face directory.

- `export_hf(ckpt_dir, out_dir)`: Flax (Orbax) checkpoint -> Hugging Face directory with the
  modeling code (`convert/flax_to_torch.py` on the command line);
- `import_hf(hf_dir, out_dir)`: Hugging Face directory -> Flax checkpoint that `jaxllm.load`
  and training read (`convert/torch_to_flax.py`);
- `convert.mapping`: the one name/layout map both directions (and the tests) use.

The converters are imported lazily: `convert.mapping` needs numpy only.
"""


class ConvertError(ValueError):
    """An input that cannot be converted or an output that must not be written; the message names
    the file, directory or tensor. `cli`: the message as a command line words it (its flags rather
    than the library's arguments), when that differs."""

    def __init__(self, message: str, *, cli: str | None = None):
        super().__init__(message)
        self.cli = cli


def error_line(e: BaseException, *, cli: bool = False) -> str:
    """An exception as the one line a command line prints on stderr (`cli`: its command-line
    wording, where it has one)."""
    text = (getattr(e, "cli", None) if cli else None) or str(e)
    return " ".join(text.split()) or type(e).__name__


__all__ = ["ConvertError", "error_line", "export_hf", "import_hf"]

_LAZY = {"export_hf": "convert.hf_export", "import_hf": "convert.hf_import"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
