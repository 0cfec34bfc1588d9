"""Shared fixtures: a tiny synthetic twin (2 layers, hidden 32) built once per test session.

The tests never use the network and write nothing under the user's home: the model cache,
and the copy of remote code that transformers makes, live in temporary directories.
Set before transformers and huggingface_hub are imported, since both read them at import.
"""

import atexit
import os
import shutil
import tempfile

import pytest

_SCRATCH = tempfile.mkdtemp(prefix="fast-rerank-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_MODULES_CACHE"] = os.path.join(_SCRATCH, "hf-modules")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """FAST_RERANK_CACHE for the whole session, so synthetic_dir() builds into a temp dir."""
    old = os.environ.get("FAST_RERANK_CACHE")
    cache = tmp_path_factory.mktemp("fast-rerank-cache")
    os.environ["FAST_RERANK_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("FAST_RERANK_CACHE", None)
    else:
        os.environ["FAST_RERANK_CACHE"] = old


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
