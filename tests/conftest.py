"""Test set-up: 8 simulated CPU devices (sharding tests), full float32 matmuls (parity tests),
no network (Hugging Face offline)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the whole session, both pytest-xdist workers and their
# subprocesses included: tests that build the same train step again (and the command-line tests)
# then compile it once.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxllm-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import torch  # noqa: E402

# One PyTorch intra-op thread for the whole session: the test models are too small to gain from
# more, and on a busy machine OpenMP threads waiting for each other make a step 100x slower.
torch.set_num_threads(1)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ASSETS = SHARED / "assets"


# The longest test files first (about 245, 235, 200, 195, 125, 120, 90 and 70 s on 2 CPU cores,
# 2026-11-30): pytest-xdist's two workers take whole files in collection order (pyproject's
# `--dist loadfile --no-loadscope-reorder`), so they finish together; xdist's own order, by test
# count, left the multi-process and mesh files to the end (about 50 s of one idle worker).
LONGEST_FIRST = ("test_model", "test_reliability", "test_multiprocess", "test_train", "test_convert",
                 "test_train_torch", "test_generate", "test_bench", "test_definition")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: each file keeps its order


@pytest.fixture
def assets():
    """../shared/assets, or a skip with a clear reason where it does not exist (a user's clone)."""
    if not ASSETS.is_dir():
        pytest.skip(f"{ASSETS} not present (only the project's development checkout has it)")
    return ASSETS
