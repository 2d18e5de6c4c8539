"""pytest-benchmark suite: each factored op and each model against its dense form, on the CPU (fp32) and
on the GPU when there is one (bf16).

    pytest benchmarks/bench_models.py --benchmark-enable --benchmark-group-by=param:case

Each group holds one case's variants side by side: the dense layer or model and its factored form (per
backend on the GPU). Ranks are the ones ``utilrank bench --param-ratio 0.5`` uses (ViT-B/16: 192 for
768x768, 288 for qkv, 304 for the MLP). The whole-model rows of the README come from ``utilrank bench``
(``benchmarks/results/``); this suite is for comparing commits on one machine.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from utilrank_kernels.bench import cut_to_ratio
from utilrank_kernels.models import build_builtin
from utilrank_kernels.ops import lowrank_conv2d, lowrank_linear

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
# (tokens per sample, in, out, rank): ViT-B/16 layers
LINEAR = [(197, 768, 2304, 288), (197, 768, 768, 192), (197, 768, 3072, 304), (197, 3072, 768, 304),
          (1, 768, 1000, 208)]
BATCH = {"cpu": 2, "cuda": 64}
BACKENDS = {"cpu": ["torch"], "cuda": ["torch", "triton", "auto"]}


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _run(benchmark, fn, device: str, rounds: int = 20):
    sync = _sync(device)

    def call():
        fn()
        sync()

    with torch.inference_mode():
        for _ in range(3):  # warm-up outside the timed rounds: autotuning, lazy init
            call()
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=2)


def _variants(device: str) -> list[str]:
    return ["dense"] + BACKENDS[device]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["dense", "torch", "triton", "auto"])
@pytest.mark.parametrize("shape", LINEAR, ids=[f"T{t}-K{k}-N{n}-R{r}" for t, k, n, r in LINEAR])
def test_linear(benchmark, shape, variant, device):
    if variant not in _variants(device):
        pytest.skip(f"{variant} does not run on {device}")
    t, k, n, r = shape
    m = BATCH[device] * t
    benchmark.extra_info["case"] = f"linear-M{m}-K{k}-N{n}-R{r}-{device}"
    kw = {"device": device, "dtype": DTYPE[device]}
    x, bias = torch.randn(m, k, **kw), torch.randn(n, **kw)
    if variant == "dense":
        w = torch.randn(n, k, **kw) / k**0.5
        fn = lambda: F.linear(x, w, bias)
    else:
        a, b = torch.randn(r, k, **kw) / k**0.5, torch.randn(n, r, **kw) / r**0.5
        fn = lambda: lowrank_linear(x, a, b, bias, backend=variant)
    _run(benchmark, fn, device)


# (batch, C, H, out, kernel, stride, rank): ViT-B's patch embedding, a VGG 3x3 conv
CONV = [(2, 3, 224, 768, 16, 16, 192), (8, 128, 28, 128, 3, 1, 48)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["dense", "torch", "triton", "auto"])
@pytest.mark.parametrize("shape", CONV, ids=[f"N{n}-C{c}-H{h}-O{o}-k{k}s{s}-R{r}" for n, c, h, o, k, s, r in
                                             CONV])
def test_conv2d(benchmark, shape, variant, device):
    if variant not in _variants(device):
        pytest.skip(f"{variant} does not run on {device}")
    n, c, h, o, k, s, r = shape
    benchmark.extra_info["case"] = f"conv-{'-'.join(map(str, shape))}-{device}"
    kw = {"device": device, "dtype": DTYPE[device]}
    fmt = torch.channels_last if device == "cuda" else torch.contiguous_format
    x = torch.randn(n, c, h, h, **kw).contiguous(memory_format=fmt)
    pad = k // 2 if s == 1 else 0
    if variant == "dense":
        w = (torch.randn(o, c, k, k, **kw) / (c * k * k) ** 0.5).contiguous(memory_format=fmt)
        fn = lambda: F.conv2d(x, w, None, s, pad)
    else:
        a = (torch.randn(r, c, k, k, **kw) / (c * k * k) ** 0.5).contiguous(memory_format=fmt)
        b = (torch.randn(o, r, 1, 1, **kw) / r**0.5).contiguous(memory_format=fmt)
        fn = lambda: lowrank_conv2d(x, a, b, None, (s, s), (pad, pad), backend=variant)
    _run(benchmark, fn, device)


@functools.cache
def _models(name: str):
    if name == "vit-digits":
        dense = build_builtin(name).eval()
        shape = (1, 16, 16)
    else:
        import timm

        dense = timm.create_model(name, pretrained=False).eval()
        shape = (3, 224, 224)
    compressed, _ = cut_to_ratio(dense, 0.5, 16, arch=name)
    return dense, compressed, shape


# (model, batch on the CPU, batch on the GPU)
MODELS = [("vit-digits", 32, 256), ("vit_base_patch16_224", 2, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["dense", "torch", "triton", "auto"])
@pytest.mark.parametrize("model", MODELS, ids=[m[0] for m in MODELS])
def test_model(benchmark, model, variant, device):
    if variant not in _variants(device):
        pytest.skip(f"{variant} does not run on {device}")
    name, cpu_batch, gpu_batch = model
    batch = gpu_batch if device == "cuda" else cpu_batch
    benchmark.extra_info["case"] = f"{name}-p50-bs{batch}-{device}"
    dense, compressed, shape = _models(name)
    net = dense if variant == "dense" else compressed
    for mod in net.modules():
        if hasattr(mod, "backend"):
            mod.backend = "torch" if variant == "dense" else variant
    net = net.to(device=device, dtype=DTYPE[device])
    x = torch.randn(batch, *shape, device=device, dtype=DTYPE[device])
    _run(benchmark, lambda: net(x), device, rounds=10 if device == "cpu" and batch < 8 else 20)
