"""Flax checkpoint -> Hugging Face directory.

    python convert/flax_to_torch.py CKPT_DIR [--out HF_DIR] [--step N] [--dtype float32|bfloat16]
                                    [--max-shard-size 50GB] [--force]

Reads step N (default: the latest) of an Orbax checkpoint directory as training or
`convert/torch_to_flax.py` writes it, and writes `HF_DIR` (default `CKPT_DIR-hf`): config.json,
model.safetensors (sharded above --max-shard-size), generation_config.json, tokenizer files when
the checkpoint records a tokenizer, and the modeling code, so that
`AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)` works anywhere.
An existing HF_DIR is refused unless --force, and never replaced when it holds what an export does
not write (a Trainer checkpoint's training state, other files). Errors: one line on stderr, exit
status 2.
"""

from __future__ import annotations

import os
import sys

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)


def _max_shard_size(value: str) -> int:
    import argparse

    from convert.output import parse_max_shard_size

    try:
        return parse_max_shard_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    from jaxllm.cli import ArgumentParser, path

    p = ArgumentParser(prog="flax_to_torch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", type=path, help="Orbax checkpoint directory")
    p.add_argument("--out", type=path, help="output Hugging Face directory (default: CKPT_DIR-hf)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the exported weights (router_bias stays float32; default float32)")
    # default = hf_export.DEFAULT_MAX_SHARD_SIZE (not imported: slow); checked here, before anything is read
    p.add_argument("--max-shard-size", type=_max_shard_size, default="50GB",
                   help="shard the safetensors above this size (default 50GB, as Hugging Face's save_pretrained: "
                        "one model.safetensors below it)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)

    from convert import error_line

    try:
        from convert.hf_export import export_hf

        result = export_hf(args.ckpt_dir, args.out, step=args.step, dtype=args.dtype, force=args.force,
                           max_shard_size=args.max_shard_size)
    except Exception as e:  # noqa: BLE001 - a command line explains, it does not trace back
        print(f"{p.prog}: error: {error_line(e, cli=True)}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"{p.prog}: note: {note}", file=sys.stderr)
    files = result.weight_files
    print(f"wrote {result.out_dir} (step {result.step}, {result.dtype}, "
          f"{files[0] if len(files) == 1 else f'{len(files)} safetensors shards'}"
          f"{', tokenizer' if result.tokenizer else ''})")
    return 0


if __name__ == "__main__":
    from jaxllm.cli import exit_with

    exit_with(main, os.path.basename(__file__), "nothing was written (an existing output is kept)")
