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


@pytest.fixture
def assets():
    """../shared/assets, or a skip with a clear reason where it does not exist (a user's clone)."""
    if not ASSETS.is_dir():
        pytest.skip(f"{ASSETS} not present (only the project's development checkout has it)")
    return ASSETS
