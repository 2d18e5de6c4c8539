"""Streaming statistics: exactness, masks, save/load, merge, resume after kill -9, distributed."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from _models import ConvNet, TokenMLP

from utilrank_kernels.analysis import ModifiedInputError, NonFiniteInputError, Statistics, collect_stats


def close(a, b, tol=1e-6):
    """Relative Frobenius error: per-batch products are fp32, so entries near 0 carry ~eps * norm."""
    return ((a - b).norm() / b.norm()).item() < tol


def _inputs_of(model, batches, names):
    """Every input each named layer receives, recorded by plain hooks (fp64 copies)."""
    seen = {n: [] for n in names}
    modules = dict(model.named_modules())
    hs = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].double()))
          for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hs:
        h.remove()
    return seen


@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "overlap"])
def test_linear_layers_3d_tokens_match_fp64(overlap):
    torch.manual_seed(0)
    model = TokenMLP()
    batches = [torch.randn(4, 7, 12) for _ in range(3)]
    stats = collect_stats(model, batches, progress=False, overlap=overlap)
    seen = _inputs_of(model, batches, ["fc1", "fc2", "head"])
    for name, xs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        ref = x.T @ x
        assert close(stats.layers[name].cov, ref), name
        assert stats.layers[name].tokens == x.shape[0]
    assert stats.layers["unused"].tokens == 0
    assert stats.batches == 3


@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "overlap"])
def test_conv_statistics_reproduce_output_second_moment(overlap):
    """W C_in W^T must equal the second moment of the conv's own pre-bias outputs: an independent
    check that the patches (stride, dilation, reflect and 'same' padding, channels_last) are right."""
    torch.manual_seed(0)
    model = ConvNet().double()
    batches = [torch.randn(2, 3, 13, 11, dtype=torch.float64).to(memory_format=torch.channels_last)
               for _ in range(2)]
    stats = collect_stats(model, batches, progress=False, overlap=overlap)
    assert [s["name"] for s in stats.skipped] == ["depthwise"]
    modules = dict(model.named_modules())
    seen = _inputs_of(model, batches, ["conv1", "conv2", "conv3"])
    for name, xs in seen.items():
        conv = modules[name]
        w = conv.weight.reshape(conv.out_channels, -1).double()
        ref = 0
        for x in xs:
            y = conv._conv_forward(x, conv.weight.double(), None)  # pre-bias, with its padding mode
            y = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
            ref = ref + y.T @ y
        derived = w @ stats.layers[name].cov @ w.T
        assert close(derived, ref), name


def test_mask_excludes_tokens():
    model = TokenMLP()
    x = torch.randn(2, 9, 12)
    mask = torch.rand(2, 9) > 0.5
    stats = collect_stats(model, [x], mask_fn=lambda b: mask, progress=False)
    xm = x[mask].double()
    assert close(stats.layers["fc1"].cov, xm.T @ xm)
    assert stats.layers["fc1"].tokens == int(mask.sum())
    assert stats.layers["head"].tokens == 2  # the pooled head is not a token tensor: unmasked


@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "overlap"])
def test_nan_input_names_layer_and_batch(overlap):
    model = TokenMLP()
    batches = [torch.randn(2, 3, 12), torch.full((2, 3, 12), float("nan"))]
    threads = torch.get_num_threads()
    with pytest.raises(NonFiniteInputError, match=r"layer fc1: NaN or Inf in its input at batch 1"):
        collect_stats(model, batches, progress=False, overlap=overlap)
    assert torch.get_num_threads() == threads  # overlap's split of the threads is undone on errors too


def test_overlap_stops_when_the_model_modifies_an_input_in_place(monkeypatch):
    """The statistics thread may read a layer's input after the forward moved on; an in-place change of
    that input in between would corrupt the statistics silently, so it must stop the pass instead."""
    import threading

    import utilrank_kernels.analysis.collect as stats_module

    modified = threading.Event()

    class ScalesItsInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 4)

        def forward(self, x):
            y = self.fc(x)
            x.mul_(2)
            modified.set()
            return y

    update = stats_module.covariance_update

    def update_after_the_change(acc, x, *args, **kwargs):
        assert modified.wait(timeout=30)
        update(acc, x, *args, **kwargs)

    monkeypatch.setattr(stats_module, "covariance_update", update_after_the_change)
    with pytest.raises(ModifiedInputError, match=r"layer fc: the model modified its input in place at batch 0"):
        collect_stats(ScalesItsInput(), [torch.randn(3, 12)], progress=False, overlap=True)
    with pytest.raises(ValueError, match="overlap runs the updates on a CPU thread"):
        collect_stats(ScalesItsInput(), [], device="cuda", overlap=True)


def test_save_load_roundtrip_and_merge(tmp_path):
    model = ConvNet()
    a = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    b = [torch.randn(3, 3, 8, 8)]
    sa = collect_stats(model, a, progress=False, meta={"model": "convnet"})
    sa.save(tmp_path / "a.safetensors")
    loaded = Statistics.load(tmp_path / "a.safetensors")
    assert loaded.batches == 2 and loaded.meta == {"model": "convnet"} and loaded.skipped == sa.skipped
    for name, s in sa.layers.items():
        assert torch.equal(loaded.layers[name].cov, s.cov) and loaded.layers[name].tokens == s.tokens
        assert loaded.layers[name].conv == s.conv
    merged = loaded.merge(collect_stats(model, b, progress=False))
    whole = collect_stats(model, a + b, progress=False)
    for name, s in whole.layers.items():
        assert torch.allclose(merged.layers[name].cov, s.cov, rtol=1e-12)
        assert merged.layers[name].tokens == s.tokens
    with pytest.raises(ValueError, match="layers differ"):
        merged.merge(collect_stats(TokenMLP(), [torch.randn(1, 2, 12)], progress=False))


_CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from _models import ConvNet
    from utilrank_kernels.analysis import collect_stats
    torch.manual_seed(0)
    model = ConvNet()
    batches = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    def stream():
        for i, b in enumerate(batches):
            if i == 4 and {crash}:
                os.kill(os.getpid(), signal.SIGKILL)  # a hard crash mid-pass, after the checkpoint
            yield b
    resume = None
    if os.path.exists({ckpt!r}) and not {crash}:
        from utilrank_kernels.analysis import Statistics
        resume = Statistics.load({ckpt!r})
    stats = collect_stats(model, stream(), resume=resume, checkpoint_path={ckpt!r}, checkpoint_every=2,
                          progress=False)
    stats.save({out!r})
""")


def _run(tmp_path, crash, ckpt, out):
    tests = os.path.dirname(os.path.dirname(__file__))
    code = _CRASHING_RUN.format(tests=tests, crash=crash, ckpt=str(ckpt), out=str(out))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    crashed = _run(tmp_path, True, ckpt, tmp_path / "never.safetensors")
    assert crashed.returncode == -signal.SIGKILL
    assert Statistics.load(ckpt).batches == 4
    resumed = _run(tmp_path, False, ckpt, tmp_path / "resumed.safetensors")
    assert resumed.returncode == 0, resumed.stderr
    straight = _run(tmp_path, False, tmp_path / "none.safetensors", tmp_path / "straight.safetensors")
    assert straight.returncode == 0, straight.stderr
    a, b = Statistics.load(tmp_path / "resumed.safetensors"), Statistics.load(tmp_path / "straight.safetensors")
    assert a.batches == b.batches == 6
    for name in b.layers:
        assert torch.equal(a.layers[name].cov, b.layers[name].cov), name  # bitwise: same order of sums
        assert a.layers[name].tokens == b.layers[name].tokens


def _distributed_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TokenMLP()
    data = [torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    stats = collect_stats(model, data[rank::world], progress=False)
    if rank == 0:
        stats.save(os.path.join(out_dir, "dist.safetensors"))
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    dist_stats = Statistics.load(tmp_path / "dist.safetensors")
    torch.manual_seed(0)
    model = TokenMLP()
    data = [torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    single = collect_stats(model, data, progress=False)
    assert dist_stats.batches == 6
    for name, s in single.layers.items():
        assert torch.allclose(dist_stats.layers[name].cov, s.cov, rtol=1e-12, atol=0), name
        assert dist_stats.layers[name].tokens == s.tokens


@pytest.mark.gpu
def test_stats_on_cpu_accumulate_in_host_memory_and_match_fp64():
    """``stats_on_cpu`` moves each batch's product from the GPU to host accumulators: a path that exists only
    with a GPU (on a CPU model the accumulators are where the model is, and nothing moves)."""
    model = TokenMLP().cuda()
    data = [torch.randn(2, 4, 12, device="cuda") for _ in range(3)]
    a = collect_stats(model, data, stats_on_cpu=True, progress=False)
    assert all(s.cov.device.type == "cpu" for s in a.layers.values())
    x = torch.cat(data).reshape(-1, 12).double().cpu()
    torch.testing.assert_close(a.layers["fc1"].cov, x.T @ x, rtol=1e-5, atol=1e-5)


def test_a_mask_that_does_not_fit_a_token_input_names_the_layer_and_both_shapes():
    torch.manual_seed(0)
    model = TokenMLP()
    x = torch.randn(2, 9, 12)
    with pytest.raises(ValueError, match=r"layer fc1: the token mask has shape \(2, 8\) but the layer's input is "
                                         r"\(2, 9, 12\)"):
        collect_stats(model, [x], mask_fn=lambda b: torch.ones(2, 8, dtype=torch.bool), progress=False)
