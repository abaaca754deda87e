"""The settings of a training run, shared by `scripts/train_jax.py` and `scripts/train_torch.py`.

Pure Python (no JAX, no PyTorch), so that both frameworks read their defaults from one place.
`RunConfig` holds every setting (the scripts' flags; a few are JAX-only, e.g. `mesh`, `moe_impl`,
`remat`). `RECIPES` are named bundles of settings: `embedded` (the default: `small` on the embedded
corpus, minutes on a laptop CPU) and `seed` (the seed document's run: `seed-973m` on cosmopedia-v2,
sequence 256, micro-batch 4, accumulation 8, AdamW lr 2e-5, cosine with 2,000 warm-up steps,
weight decay 0.01, clip 1.0, 10,000 steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class RunConfig:
    preset: str = "small"
    config: str | None = None  # a config.json path; overrides preset
    dataset: str | None = None  # None: the embedded corpus
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    tokenizer: str | None = None  # None: the embedded tokenizer
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 30
    steps: int = 300
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    dtype: str = "float32"
    mesh: str | None = None
    ckpt_dir: str = "ckpt"
    save_every: int = 100
    keep: int = 3
    log_every: int = 10
    seed: int = 0
    no_resume: bool = False
    init_from: str | None = None
    moe_impl: str = "sparse"
    remat: bool | None = None  # None: on for models of AUTO_REMAT_PARAMS parameters or more
    dropout: bool = True
    peak_flops: float | None = None
    skip_nonfinite: bool = False
    prompts: tuple[str, ...] = ("The", "In Python,", "A list is")
    max_new_tokens: int = 40
    progress: bool = True


# Recompute each layer in the backward pass (`remat`) by default from this model size on: for
# seed-973m the saved activations (mostly the per-block expert weights of the sparse dispatch)
# would otherwise take about 15 GiB of a float32 step at 4 x 256; small models don't need it.
AUTO_REMAT_PARAMS = 200_000_000


def resolve_remat(remat: bool | None, n_params: int) -> bool:
    return remat if remat is not None else n_params >= AUTO_REMAT_PARAMS


RECIPES: dict[str, dict[str, Any]] = {
    "embedded": {},
    "seed": dict(
        preset="seed-973m", dataset="HuggingFaceTB/smollm-corpus", dataset_config="cosmopedia-v2",
        tokenizer="HuggingFaceTB/cosmo2-tokenizer", seq_len=256, batch_size=4, grad_accum=8, lr=2e-5,
        warmup_steps=2000, steps=10_000, weight_decay=0.01, clip_norm=1.0, save_every=500, log_every=10,
        prompts=("Once upon a time", "The meaning of life is", "In a distant galaxy"),
    ),
}
