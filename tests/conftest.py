"""Shared fixtures: a tiny synthetic twin (2 layers, hidden 32) built once per test session.

The tests never use the network and write nothing under the user's home: the model cache
(FAST_RERANK_CACHE) and the copy of remote code that transformers makes (HF_MODULES_CACHE)
live in a temporary directory. They are set here, at import, before any test module is
collected and before transformers and huggingface_hub read them.
"""

import atexit
import os
import shutil
import tempfile

import pytest

try:  # a test dependency; a GPU box without it still runs tests/test_gpu.py
    from hypothesis import settings
except ImportError:
    settings = None

# CI replays the same examples every run (a failure there is reproducible, never a lucky draw);
# locally hypothesis explores new ones.
if settings is not None:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")

_SCRATCH = tempfile.mkdtemp(prefix="fast-rerank-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
# FAST_RERANK_TEST_CACHE: a cache the caller chose (gpu_check.sh, so the GPU tests reuse the
# full-size twin it built instead of building it again in the lease's few minutes)
os.environ["FAST_RERANK_CACHE"] = os.environ.get("FAST_RERANK_TEST_CACHE") or os.path.join(_SCRATCH, "cache")
os.environ["HF_MODULES_CACHE"] = os.path.join(_SCRATCH, "hf-modules")
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def model_cache() -> str:
    """The session's FAST_RERANK_CACHE, where synthetic_dir() builds."""
    return os.environ["FAST_RERANK_CACHE"]


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache) -> str:
    """Directory of the tiny twin: native XLM-R config, fp32 random weights, trained tokenizer."""
    import models

    return models.synthetic_dir("tiny")


@pytest.fixture(scope="session")
def tiny_cross_encoder(tiny_model_dir):
    """A plain sentence-transformers CrossEncoder on the tiny twin (fp32, CPU, sdpa)."""
    import torch
    from sentence_transformers import CrossEncoder

    return CrossEncoder(tiny_model_dir, device="cpu", local_files_only=True,
                        model_kwargs={"dtype": torch.float32})


@pytest.fixture(scope="session")
def family_twin_dir(model_cache):
    """family -> directory of its tiny twin (twins.py), each built once per session.

    Usage: `def test_x(family_twin_dir): path = family_twin_dir("bert")`."""
    import models

    def get(family: str) -> str:
        return models.family_twin_dir(family, "tiny")

    return get


@pytest.fixture(scope="session")
def family_cross_encoder(family_twin_dir):
    """family -> a plain CrossEncoder (fp32, CPU) on its tiny twin, loaded once per session."""
    import torch
    from sentence_transformers import CrossEncoder

    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = CrossEncoder(family_twin_dir(family), device="cpu", local_files_only=True,
                                          model_kwargs={"dtype": torch.float32})
        return loaded[family]

    return get
