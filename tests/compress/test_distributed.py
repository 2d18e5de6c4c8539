"""Under torchrun every process runs the pipeline: sharded scores, data-parallel fine-tuning, error-aware statistics
from every process's shard. Two gloo processes on the CPU must give what one process gives: the same scores (exactly,
for fractions of examples), the same plan, and fine-tuned weights equal to float tolerance."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _models import ConvNet
from torch.utils.data import TensorDataset

from utilrank_kernels import CompressConfig, compress_model
from utilrank_kernels._distributed import ShardedMetric, process
from utilrank_kernels.metrics import OutputCosine
from utilrank_kernels.train import TrainRecipe, evaluate


def _data():
    """Images whose label is a fixed function of their colour means (learnable), 25 to train on (the last batch of
    8 has one example: the second process has none of it), 31 to validate, 9 to test."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(65, 3, 8, 8, generator=g)
    y = (x.mean((2, 3)) @ torch.randn(3, 4, generator=g)).argmax(-1)
    split = lambda a, b: TensorDataset(x[a:b], y[a:b])  # noqa: E731
    return SimpleNamespace(train=split(0, 25), val=split(25, 56), test=split(56, 65), name="colours", num_classes=4)


def _model():
    torch.manual_seed(0)
    return ConvNet(c=3, classes=4)


SEARCH = CompressConfig(tolerance=3.0, energy=0.95, stats_batch_size=4,
                        finetune=TrainRecipe(epochs=2, lr=1e-2, batch_size=8, augment=True))
ERROR_AWARE = CompressConfig(target_params=0.7, tolerance=None, error_aware=True, refine=False, stats_batch_size=4,
                             finetune=TrainRecipe(epochs=0))


def _run_all() -> dict:
    """What both tests compare: the scores of a sharded metric, a searched and fine-tuned compression, an error-aware
    one; on this process (one process, or its part of a process group)."""
    data, model = _data(), _model()
    cosine = OutputCosine(model)
    scores = {"accuracy": ShardedMetric(lambda m, ds: evaluate(m, ds, batch_size=4), counts=True)(model, data.val),
              "cosine": ShardedMetric(cosine, counts=False)(model, data.val)}
    searched = compress_model(model, data, SEARCH, progress=False)
    aware = compress_model(model, data, ERROR_AWARE, progress=False, score=False)
    return {"scores": scores, "search_scores": searched.scores, "plan": searched.plan.ranks,
            "weights": searched.model.state_dict(), "aware_plan": aware.plan.ranks,
            "aware_cov": {n: s.cov for n, s in aware.statistics.layers.items()}}


def _worker(rank, world, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    assert process() == (rank, world)
    result = _run_all()
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp / "result")), nprocs=2, join=True)
    return [torch.load(tmp / f"result.{r}", weights_only=True) for r in range(2)]


def test_sharded_scores_equal_the_whole_split(two_processes):
    data, model = _data(), _model()
    for result in two_processes:  # every process gets the whole split's score
        assert result["scores"]["accuracy"] == evaluate(model, data.val)  # counts: to the last bit
        cos = torch.nn.functional.cosine_similarity(model(data.val.tensors[0]).double(),
                                                    model(data.val.tensors[0]).double(), dim=-1).mean().item()
        assert result["scores"]["cosine"] == pytest.approx(cos, abs=1e-6)


def test_two_processes_plan_and_fine_tune_as_one(two_processes):
    one = _run_all()
    for result in two_processes:
        assert result["plan"] == one["plan"] and one["plan"]  # the searched ranks
        assert result["search_scores"] == one["search_scores"]  # accuracies: exact
        for name, w in one["weights"].items():
            torch.testing.assert_close(result["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    # and the weights did move: fine-tuning ran on both processes, not only one
    searched = compress_model(_model(), _data(), replace(SEARCH, finetune=TrainRecipe(epochs=0)), progress=False,
                              score=False)
    assert any(not torch.allclose(searched.model.state_dict()[n], w) for n, w in one["weights"].items())


def test_error_aware_statistics_of_two_processes_equal_one(two_processes):
    one = _run_all()
    for result in two_processes:
        assert result["aware_plan"] == one["aware_plan"]
        for name, cov in one["aware_cov"].items():
            # each batch's product is an fp32 one, over other batches: equal to fp32 rounding of the largest entry
            assert (result["aware_cov"][name] - cov).abs().max() <= 1e-6 * cov.abs().max(), name


@pytest.mark.slow
def test_torchrun_compress_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 utilrank compress`` with a search and fine-tuning writes the folder one process
    writes: the same plan, weights equal to float tolerance."""
    from _data import make_imagefolder
    from safetensors.torch import load_file

    images = make_imagefolder(tmp_path / "images", per_class=7)
    utilrank = shutil.which("utilrank") or str(Path(sys.executable).parent / "utilrank")
    argv = ["compress", "--model", "test_vit", "--data", str(images), "--energy", "0.9", "--batch-size", "8",
            "--tolerance", "5", "--finetune-epochs", "1", "--finetune-batch-size", "8", "--engines", "eager"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([utilrank, *argv, "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          utilrank, *argv, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]

    ranks = [{n: e["rank"] for n, e in json.loads((tmp_path / d / "plan.json").read_text())["layers"].items()}
             for d in ("one", "two")]
    assert ranks[0] == ranks[1] and ranks[0]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
