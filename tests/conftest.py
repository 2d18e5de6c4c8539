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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and matrices: a second thread (PyTorch's, or the BLAS under numpy) only adds
    barriers, which spin for seconds on a shared 2-core machine."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)
