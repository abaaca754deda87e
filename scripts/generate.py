#!/usr/bin/env python
"""Generate text from a checkpoint, printing the tokens as they are made.

    python scripts/generate.py --checkpoint ckpt --prompt "Once upon a time"
    python scripts/generate.py --checkpoint hf_dir --prompt "The sun" --framework torch \\
        --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1

--checkpoint is a Flax (Orbax) checkpoint directory (jaxllm/checkpoint.py) or a Hugging Face
directory (config.json + safetensors); which one is detected. Either framework runs either kind:
the weights are converted in memory through convert/mapping.py. The tokenizer is --tokenizer, or
the checkpoint's own (the files an Orbax checkpoint saved, else the one its metadata names; a
Hugging Face directory's tokenizer.json), or the embedded one (with a note on stderr saying so).
Greedy unless --temperature > 0; decoding stops at EOS.
"""

from __future__ import annotations

import os
import re
import sys

# This file's checkout (found through any symbolic link) goes ahead of an installed jaxllm: after a
# `pip install .` (not -e) the installed copy ran instead of the code beside this file. Where no
# checkout holds this file (convert/ as pip installs it, a script copied alone), the installed packages serve.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if os.path.isfile(os.path.join(_CHECKOUT, "pyproject.toml")) and os.path.isdir(os.path.join(_CHECKOUT, "jaxllm")):
    sys.path.insert(0, _CHECKOUT)

PROG = "generate.py"


def parse_args(argv=None):
    from jaxllm.cli import add_compile_cache_flag, parser, path, seed, text

    p = parser(__file__, __doc__)
    a = p.add_argument
    a("--checkpoint", required=True, type=path, help="Orbax checkpoint directory or Hugging Face model directory")
    a("--step", type=int, help="step of an Orbax checkpoint directory (default: the latest)")
    a("--prompt", required=True, type=text, action="append", help="text to continue (one)")
    a("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)")
    a("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy, else at least 1e-30 (default 0)")
    a("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all (default 0; needs --temperature)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set reaching probability p (default 1; needs --temperature)")
    a("--seed", type=seed, default=0, help="random seed of the sampling, 0 .. 2**32 - 1 (default 0)")
    a("--framework", choices=["jax", "torch"], default="jax", help="which implementation runs (default jax)")
    a("--tokenizer", type=path, help="Hub id, local directory or tokenizer.json (default: recorded with the checkpoint)")
    add_compile_cache_flag(p)
    args = p.parse_args(argv)
    if len(args.prompt) > 1:  # (the trainers' --prompt is repeatable; here all but the last were dropped)
        p.error(f"--prompt given {len(args.prompt)} times: generate.py continues one prompt (run it once per prompt)")
    args.prompt = args.prompt[0]
    return args


def checkpoint_kind(path: str) -> str:
    """"hf" for a Hugging Face directory (config.json), "orbax" for a Flax checkpoint directory
    (numbered steps). Raises ValueError naming the path otherwise."""
    if not os.path.exists(path):
        raise ValueError(f"--checkpoint {path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint {path} is not a directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    from jaxllm.cli import is_one_step, step_dirs

    if step_dirs(path):
        return "orbax"
    names = os.listdir(path)
    trainer = [int(n[11:]) for n in names if re.fullmatch(r"checkpoint-\d+", n) and os.path.isdir(os.path.join(path, n))]
    if trainer:
        raise ValueError(f"--checkpoint {path} is a Trainer output directory (scripts/train_torch.py): pass one of "
                         f"its checkpoints, e.g. the latest, {os.path.join(path, f'checkpoint-{max(trainer)}')}")
    if is_one_step(path):
        above, name = os.path.split(os.path.abspath(path))
        raise ValueError(f"--checkpoint {path} is one step of an Orbax checkpoint directory: pass the directory "
                         f"above it, {above}" + (f", with --step {int(name)}" if name.isdigit() else ""))
    raise ValueError(f"--checkpoint {path} is neither a Hugging Face directory (no config.json) nor an Orbax "
                     "checkpoint directory (no numbered steps)")


def checkpoint_info(path: str, kind: str, step: int | None = None):
    """(LLMConfig, recorded tokenizer spec, saved tokenizer files) of a checkpoint, without loading
    its weights. The spec is an Orbax checkpoint's `meta["tokenizer"]`, or a Hugging Face directory
    itself when it holds a tokenizer.json; None means the embedded one. The files are those an
    Orbax checkpoint saved (`jaxllm.checkpoint.read_tokenizer_files`), or None."""
    from jaxllm.config import LLMConfig

    if kind == "hf":
        from jaxllm.data import tokenizer_dir

        tokenizer = path if tokenizer_dir(path) else None
        return LLMConfig.from_json_file(os.path.join(path, "config.json")), tokenizer, None
    from jaxllm import checkpoint

    _, meta, files = checkpoint.read_step_info(path, step)  # read-only: safe while a trainer saves into `path`
    return LLMConfig.from_dict(meta["config"]), meta.get("tokenizer"), files


def load_jax_model(path: str, kind: str, step: int | None = None):
    from jaxllm import checkpoint

    if kind == "orbax":
        return checkpoint.load(path, step)[0]
    from convert.mapping import torch_to_flax
    from jaxllm.model import create_model
    from jaxllm.weights import set_weights

    torch_model = load_torch_model(path, kind)
    config = torch_model.config.to_llm_config()
    flat = torch_to_flax({k: v.numpy() for k, v in torch_model.state_dict().items()}, config)
    del torch_model
    model = create_model(config, abstract=True)  # nothing allocated before the weights arrive
    set_weights(model, flat)
    return model


def load_torch_model(path: str, kind: str, step: int | None = None):
    import torch

    from transformers import GenerationConfig

    from torch_ref import CustomLLM

    if kind == "hf":
        from convert.hf_import import read_hf_dir

        read_hf_dir(os.path.abspath(path))  # from_pretrained would fill missing tensors with random ones
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # (its bar on stderr came out among the streamed text)
        model = CustomLLM.from_pretrained(path, dtype=torch.float32).eval()
        # Decoding as the flags say, as on the JAX side: not also as the directory's
        # generation_config.json asks (a repetition penalty, a minimum length, ...), whose settings
        # `generate` would take for every one the call leaves unset.
        model.generation_config = GenerationConfig.from_model_config(model.config)
        return model
    from jaxllm import checkpoint

    return torch_model_of(*checkpoint.load(path, step))


def torch_model_of(model, config):
    """The PyTorch reference model with the weights of the JAX `model` (of `config`)."""
    import torch

    from convert.mapping import flax_to_torch
    from jaxllm.weights import get_weights
    from torch_ref import CustomLLM, CustomLLMConfig

    sd = flax_to_torch(get_weights(model), config)
    return CustomLLM.from_state_dict(CustomLLMConfig.from_llm_config(config),
                                     {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in sd.items()})


class TextStream:
    """Writes the continuation of `prompt_ids` as its tokens arrive. Each time, all its tokens so far
    are decoded after the prompt's (`continuation_text`: the space before its first word kept) and
    the new end of the text is written, except while the text ends in U+FFFD (a character whose
    bytes are split over tokens is not complete yet)."""

    def __init__(self, tokenizer, out, prompt_ids=()):
        self.tokenizer, self.out, self.prompt_ids = tokenizer, out, list(prompt_ids)
        self.ids: list[int] = []
        self.written = 0

    def _text(self) -> str:
        from jaxllm.recipes import continuation_text

        return continuation_text(self.tokenizer, self.prompt_ids, self.ids)

    def push(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        text = self._text()
        if not text.endswith("\ufffd"):
            self.out.write(text[self.written:])
            self.out.flush()
            self.written = len(text)

    def end(self) -> None:
        self.out.write(self._text()[self.written:] + "\n")
        self.out.flush()


def run(args, out=None) -> None:
    """Generate and stream to `out` (default: standard output). Raises ValueError / OSError."""
    from jaxllm.data import checkpoint_tokenizer, model_tokenizer
    from jaxllm.generate import Sampling
    from jaxllm.recipes import encode_prompt

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    try:
        sampling = Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:  # named as the flag: "top_p must be ..." -> "--top-p must be ..."
        field = str(e).split(" ", 1)[0]
        raise ValueError(f"--{field.replace('_', '-')} {str(e).split(' ', 1)[1]}") from None
    if sampling.greedy and (sampling.top_k or sampling.top_p != 1):
        given = [f for f, on in (("--top-k", sampling.top_k), ("--top-p", sampling.top_p != 1)) if on]
        raise ValueError(f"{' and '.join(given)} only {'apply' if len(given) > 1 else 'applies'} to sampling: "
                         "give --temperature > 0 too (0 decodes greedily)")
    if args.framework == "jax":
        from jaxllm import xla_cache

        xla_cache.enable(getattr(args, "compile_cache", None))
    kind = checkpoint_kind(args.checkpoint)
    step = getattr(args, "step", None)
    if step is not None and kind != "orbax":
        raise ValueError(f"--step applies to an Orbax checkpoint directory; {args.checkpoint} is a Hugging Face "
                         "directory (one model)")
    c, recorded, saved = checkpoint_info(args.checkpoint, kind, step)
    tokenizer = (model_tokenizer(args.tokenizer, c) if args.tokenizer is not None
                 else checkpoint_tokenizer(recorded, c, saved, where=args.checkpoint))
    prompt_ids = encode_prompt(tokenizer, args.prompt) or [c.bos_token_id]
    if len(prompt_ids) >= c.max_position_embeddings:  # no --max-new-tokens makes room
        raise ValueError(f"--prompt: its {len(prompt_ids)} tokens leave no room for a new token within "
                         f"max_position_embeddings ({c.max_position_embeddings}); shorten it")
    if len(prompt_ids) + args.max_new_tokens > c.max_position_embeddings:
        raise ValueError(f"--max-new-tokens: the prompt's {len(prompt_ids)} tokens + {args.max_new_tokens} new tokens "
                         f"exceed max_position_embeddings ({c.max_position_embeddings})")
    model = (load_jax_model if args.framework == "jax" else load_torch_model)(args.checkpoint, kind, step)

    out = out or sys.stdout
    out.write(args.prompt)
    out.flush()
    stream = TextStream(tokenizer, out, prompt_ids)
    if args.framework == "jax":
        from jaxllm.generate import generate

        generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                 on_token=lambda step, tokens, live: stream.push(tokens[0]) if live[0] else None)
    else:
        import torch

        torch.manual_seed(args.seed)
        knobs = dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                     top_p=sampling.top_p) if not sampling.greedy else dict(do_sample=False)
        with torch.no_grad():
            model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                           max_new_tokens=args.max_new_tokens, eos_token_id=c.eos_token_id,
                           pad_token_id=c.pad_token_id, streamer=_TorchStreamer(stream), **knobs)
    stream.end()


class _TorchStreamer:
    """Hugging Face's streamer protocol (`put` gets the prompt first, then each new token)."""

    def __init__(self, stream: TextStream):
        self.stream, self.prompt_seen = stream, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.stream.push(t)

    def end(self):
        pass


def main(argv=None) -> int:
    from jaxllm.cli import run_reporting_errors

    return run_reporting_errors(run, parse_args(argv), PROG)


if __name__ == "__main__":
    from jaxllm.cli import exit_with

    exit_with(main, PROG, "stopped")
