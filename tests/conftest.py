import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in models are trained once per test session into a shared temporary cache, unless the
    caller points UTILRANK_CACHE somewhere (CI reuses the quick-start's cache that way)."""
    if "UTILRANK_CACHE" not in os.environ:
        monkeypatch.setenv("UTILRANK_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
