"""The commands' statistics pass as a library function: checkpoints in a folder, a resume that continues only the
same pass, and its refusals as one ``ResumeError`` naming the argument at fault."""

import pytest
import torch
from _models import TokenMLP
from torch.utils.data import TensorDataset

from utilrank_kernels.analysis import ResumeError, Statistics, statistics_bytes, statistics_pass

pytestmark = pytest.mark.usefixtures("one_thread")


def _pass(model, dataset, folder, **kw):
    kw = {"batch_size": 4, "device": "cpu", "model_name": "tokenmlp", "dataset_name": "tokens",
          "overlap": False, **kw}
    return statistics_pass(model, dataset, folder, **kw)


def test_resume_continues_the_same_pass_and_refuses_another(tmp_path):
    torch.manual_seed(0)
    model = TokenMLP().eval()
    dataset = TensorDataset(torch.randn(24, 5, 12))
    straight = _pass(model, dataset, tmp_path / "straight")
    assert straight.batches == 6 and (tmp_path / "straight" / "stats.safetensors").is_file()
    assert straight.nbytes == statistics_bytes(model)  # what a command checks the disk for
    # an interrupted pass: two batches, checkpointed after each (the checkpoint stays for the folder's commit)
    folder = tmp_path / "resumed"
    _pass(model, dataset, folder, max_batches=2, checkpoint_every=1)
    ckpt = folder / "stats.ckpt.safetensors"
    assert Statistics.load(ckpt).batches == 2
    with pytest.raises(ResumeError, match="the checkpoint already holds 2 batches") as info:
        _pass(model, dataset, folder, resume=True, max_batches=2)
    assert info.value.parameter == "max_batches 2"
    with pytest.raises(ResumeError, match="was made with batch_size 4, this run has 8") as info:
        _pass(model, dataset, folder, resume=True, batch_size=8)
    assert info.value.parameter == "resume"
    with pytest.raises(ResumeError, match="no checkpoint at"):
        _pass(model, dataset, tmp_path / "empty", resume=True)
    resumed = _pass(model, dataset, folder, resume=True)
    assert resumed.batches == 6 and resumed.meta == straight.meta
    for name, s in straight.layers.items():
        assert resumed.layers[name].tokens == s.tokens
        torch.testing.assert_close(resumed.layers[name].cov, s.cov, rtol=1e-12, atol=1e-12)
