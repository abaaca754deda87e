"""Hugging Face directory -> Flax checkpoint.

    python convert/torch_to_flax.py HF_DIR --out CKPT_DIR [--force]

Reads config.json and the weights of HF_DIR (model.safetensors, sharded safetensors, or a legacy
pytorch_model.bin loaded with weights_only=True), checks every tensor name and shape against the
config before loading data, and writes step 0 of an Orbax checkpoint (float32 master weights,
router_bias, config, the directory's tokenizer files) that `jaxllm.load(CKPT_DIR)` and training
(--init-from) read. A HF_DIR without a tokenizer gets a note where readers of the checkpoint
then use the embedded one unless given --tokenizer (a vocabulary of at most its 4,096 tokens).
An existing CKPT_DIR is refused unless --force, and never replaced when it holds what a conversion
does not write (a training run's optimizer state, metrics, other files). Errors: one line on
stderr, exit status 2.
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


def main(argv: list[str] | None = None) -> int:
    from jaxllm.cli import ArgumentParser, path

    p = ArgumentParser(prog="torch_to_flax.py", description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=path, help="Hugging Face model directory")
    p.add_argument("--out", required=True, type=path, help="output Orbax checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace an existing output checkpoint directory")
    args = p.parse_args(argv)

    from convert import error_line

    try:
        from convert.hf_import import import_hf

        result = import_hf(args.hf_dir, args.out, force=args.force)
    except Exception as e:  # noqa: BLE001 - a command line explains, it does not trace back
        print(f"{p.prog}: error: {error_line(e, cli=True)}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"{p.prog}: note: {note}", file=sys.stderr)
    files = result.weight_files
    print(f"wrote {result.out_dir} (step 0, from {files[0] if len(files) == 1 else f'{len(files)} shards'}"
          f"{', tokenizer ' + result.tokenizer if result.tokenizer else ''})")
    return 0


if __name__ == "__main__":
    from jaxllm.cli import exit_with

    exit_with(main, os.path.basename(__file__), "nothing was written (an existing output is kept)")
