"""Shared test setup: offline Hugging Face, one torch thread, and fixtures for the shared data and stories260K.

Set MAGR_TEST_THREADS to change the torch thread count (default 1: the tiny test models run far faster
single-threaded, and several pytest workers or jobs on 2 cores do not oversubscribe the CPU).
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MAGR_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``cuda`` when no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared():
    """The shared data folder (skips the test when it is missing)."""
    from magr.pipeline.sources import shared_root

    try:
        return shared_root()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def data_root(shared):
    """``shared/data``: the offline datasets."""
    return shared / "data"


@pytest.fixture(scope="session")
def _stories260k_cached(shared):
    from magr.pipeline.models import load_model

    return load_model("stories260k")


@pytest.fixture
def stories260k(_stories260k_cached):
    """(model, tokenizer) of stories260K; the model is a fresh copy each test, so tests may modify it."""
    model, tokenizer = _stories260k_cached
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def stories_tokenizer(_stories260k_cached):
    """The sentencepiece tokenizer of stories260K (shared, do not modify)."""
    return _stories260k_cached[1]


@pytest.fixture(scope="session")
def stories_layers(_stories260k_cached):
    """(W, H) of every linear layer of stories260K, H from 8 x 64 TinyStories tokens (as the pipeline)."""
    from magr.pipeline.calibration_data import get_calibration
    from magr.pipeline.blocks import layer_problems

    model, tok = _stories260k_cached
    layers = layer_problems(model, get_calibration("tinystories", tok, nsamples=8, seqlen=64, seed=0))
    assert len(layers) == 35
    return [(W, H) for _, W, H in layers]


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """No C compiler (CC names a missing program) and an empty kernel cache: the compiled kernels are
    unavailable until the test ends."""
    from magr.core import cd_sweep, optq_block

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MAGR_CACHE_DIR", str(tmp_path))
    loaded = (cd_sweep._library, optq_block._library)
    for library in loaded:
        library.cache_clear()
    yield
    for library in loaded:
        library.cache_clear()


def load_benchmark(name: str, monkeypatch):
    """The module benchmarks/<name>.py (registered in sys.modules for the test, as dataclasses need)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when the script runs: it may import its neighbours
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
