"""Issue 4's measurements: the Triton covariance kernels against what peers do, on one CUDA device.

    python benchmarks/covariance_results.py                      # all sections, autotuned
    python benchmarks/covariance_results.py --sections syrk --quick

Writes ``benchmarks/results/<device>-covariance.json``; every row carries the device name, torch and
triton versions, dtype, shape, the kernel's median and p20/p80 and its baseline measured in the same
run, side by side:

- ``syrk``: ``covariance_update`` (upper-triangle tiles, fp32 per batch, fp64 accumulator) against
  ``acc.addmm_(x.T, x)`` in fp32 (TF32 off; bf16 inputs converted to fp32 first, as peers do), for d in
  {384, 768, 1024, 3072, 4096}, N in {8192, 65536}, bf16 and fp32 inputs. ``torch.mm(x.T, x)`` in the
  input dtype (a full GEMM on tensor cores, its result rounded to the input dtype: too coarse for
  statistics) is recorded beside it as the speed of light of the full product.
- ``conv``: ``conv_covariance_update`` (implicit im2col) against ``F.unfold`` + ``addmm_`` in fp32,
  time and peak memory, on ViT-B/16 and ResNet-50 conv shapes at batch 64.
- ``vit``: the statistics pass of a ViT-B/16 (timm ``vit_base_patch16_224``, random init, synthetic
  images, batch 64) against its plain forward pass, with the triton and the torch backends.

Kernel times use ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls); whole passes
alternate forward and statistics rounds so both see the same clocks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT = "utilrank.bench-covariance/1"
SYRK_D = [384, 768, 1024, 3072, 4096]
SYRK_N = [8192, 65536]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# name, (N, C, H, W), kernel, stride, padding
CONV_SHAPES = [
    ("vit_b16.patch_embed", (64, 3, 224, 224), 16, 16, 0),
    ("resnet50.conv1", (64, 3, 224, 224), 7, 2, 3),
    ("resnet50.layer1.conv2", (64, 64, 56, 56), 3, 1, 1),
    ("resnet50.layer1.conv1", (64, 256, 56, 56), 1, 1, 0),
    ("resnet50.layer2.conv2", (64, 128, 28, 28), 3, 1, 1),
    ("resnet50.layer3.conv2", (64, 256, 14, 14), 3, 1, 1),
    ("resnet50.layer4.conv2", (64, 512, 7, 7), 3, 1, 1),
]


# ---------------------------------------------------------------------------------------------
# what makes a row comparable
# ---------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import triton

    from utilrank_kernels.triton._autotune import single_config

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
        "cuda_version": torch.version.cuda,
        "autotuned": not single_config(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "date": datetime.date.today().isoformat(),
    }


def time_ms(fn: Callable[[], object]) -> dict:
    """Median and p20/p80 milliseconds of ``fn`` (CUDA events, L2 flushed between calls)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
    return {"median": med, "p20": p20, "p80": p80}


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Memory allocated beyond what was live before ``fn``, at its peak."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def quantiles(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"median": statistics.median(samples), "p20": q[1], "p80": q[7]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def bench_syrk(d: int, n: int, dtype_name: str, device: torch.device) -> dict:
    from utilrank_kernels.ops import covariance_update

    dtype = DTYPES[dtype_name]
    x = (torch.randn(n, d, device=device) + 0.1).to(dtype)
    acc64 = torch.zeros(d, d, dtype=torch.float64, device=device)
    acc32 = torch.zeros(d, d, dtype=torch.float32, device=device)

    def kernel():
        covariance_update(acc64, x, backend="triton")

    def baseline():
        xf = x.float()  # a no-op for fp32 input; the bf16 -> fp32 copy peers pay otherwise
        acc32.addmm_(xf.T, xf)

    def gemm_same_dtype():
        torch.mm(x.T, x)

    kernel()  # the first call of a shape autotunes
    t_kernel, t_base, t_gemm = time_ms(kernel), time_ms(baseline), time_ms(gemm_same_dtype)
    return {
        "section": "syrk", "dtype": dtype_name, "shape": [n, d], "N": n, "d": d,
        "kernel": "covariance_update(backend='triton') into fp64",
        "median_ms": t_kernel["median"], "p20_ms": t_kernel["p20"], "p80_ms": t_kernel["p80"],
        "baseline": "acc32.addmm_(x.float().T, x.float()), TF32 off",
        "baseline_median_ms": t_base["median"],
        "baseline_p20_ms": t_base["p20"], "baseline_p80_ms": t_base["p80"],
        "speedup": t_base["median"] / t_kernel["median"],
        "gemm_same_dtype_median_ms": t_gemm["median"],
        "speedup_vs_gemm_same_dtype": t_gemm["median"] / t_kernel["median"],
        # the full product's FLOPs over the kernel's time: above the GEMM's rate means the half saved
        "effective_tflops": 2 * n * d * d / (t_kernel["median"] * 1e-3) / 1e12,
    }


def _out_hw(h: int, w: int, k: int, s: int, p: int) -> tuple[int, int]:
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def bench_conv(name: str, shape: tuple, k: int, s: int, p: int, dtype_name: str, channels_last: bool,
               device: torch.device) -> dict:
    from utilrank_kernels.ops import conv_covariance_update

    dtype = DTYPES[dtype_name]
    n, c, h, w = shape
    x = torch.randn(shape, device=device).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kdim = c * k * k
    acc64 = torch.zeros(kdim, kdim, dtype=torch.float64, device=device)
    acc32 = torch.zeros(kdim, kdim, dtype=torch.float32, device=device)

    def kernel():
        conv_covariance_update(acc64, x, k, s, p, 1, backend="triton")

    def baseline():
        cols = F.unfold(x.float(), k, padding=p, stride=s)  # [N, K, L]
        patches = cols.transpose(1, 2).reshape(-1, kdim)  # [N * L, K]: a second copy
        acc32.addmm_(patches.T, patches)

    def torch_backend():
        conv_covariance_update(acc64, x, k, s, p, 1, backend="torch")  # unfold in 64 MiB chunks

    kernel()  # autotune before measuring memory and time
    mem_kernel, mem_base = peak_extra_bytes(kernel), peak_extra_bytes(baseline)
    t_kernel, t_base, t_torch = time_ms(kernel), time_ms(baseline), time_ms(torch_backend)
    oh, ow = _out_hw(h, w, k, s, p)
    return {
        "section": "conv", "layer": name, "dtype": dtype_name, "shape": list(shape),
        "memory_format": "channels_last" if channels_last else "nchw",
        "kernel_size": k, "stride": s, "padding": p, "patches": [n * oh * ow, kdim],
        "kernel": "conv_covariance_update(backend='triton'), implicit im2col, into fp64",
        "median_ms": t_kernel["median"], "p20_ms": t_kernel["p20"], "p80_ms": t_kernel["p80"],
        "baseline": "F.unfold(x.float()) -> reshape -> acc32.addmm_, TF32 off",
        "baseline_median_ms": t_base["median"],
        "baseline_p20_ms": t_base["p20"], "baseline_p80_ms": t_base["p80"],
        "speedup": t_base["median"] / t_kernel["median"],
        "peak_bytes": mem_kernel, "baseline_peak_bytes": mem_base,
        "memory_ratio": mem_base / max(mem_kernel, 1),
        "torch_backend_median_ms": t_torch["median"],
    }


def bench_vit(dtype_name: str, backend: str, device: torch.device, *, batch_size: int = 64,
              batches: int = 10, rounds: int = 10) -> dict:
    """Seconds per batch of the statistics pass and of the plain forward pass, alternating rounds."""
    import timm

    from utilrank_kernels.analysis import collect_stats

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).to(device=device, dtype=dtype).eval()
    images = [torch.randn(batch_size, 3, 224, 224, device=device, dtype=dtype) for _ in range(2)]
    data = [images[i % 2] for i in range(batches)]

    def forward_pass():
        with torch.inference_mode():
            for x in data:
                model(x)

    def stats_pass():
        collect_stats(model, data, backend=backend, progress=False)

    for fn in (forward_pass, stats_pass):  # warm-up; the first statistics pass autotunes
        fn()
        _sync(device)
    fwd, st = [], []
    for _ in range(rounds):
        for fn, samples in ((forward_pass, fwd), (stats_pass, st)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples.append((time.perf_counter() - start) / batches * 1e3)
    f, s = quantiles(fwd), quantiles(st)
    return {
        "section": "vit", "model": "vit_base_patch16_224", "dtype": dtype_name, "backend": backend,
        "shape": [batch_size, 3, 224, 224], "batches_per_round": batches, "rounds": rounds,
        "kernel": f"collect_stats(backend={backend!r}) per batch",
        "median_ms": s["median"], "p20_ms": s["p20"], "p80_ms": s["p80"],
        "baseline": "plain forward per batch (inference_mode)",
        "baseline_median_ms": f["median"], "baseline_p20_ms": f["p20"], "baseline_p80_ms": f["p80"],
        "ratio_to_forward": s["median"] / f["median"],
    }


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _print_row(row: dict) -> None:
    if row["section"] == "syrk":
        print(f"syrk {row['dtype']:>4} N={row['N']:<6} d={row['d']:<5} triton {row['median_ms']:8.3f} ms  "
              f"addmm fp32 {row['baseline_median_ms']:8.3f} ms  -> {row['speedup']:.2f}x  "
              f"(same-dtype GEMM {row['gemm_same_dtype_median_ms']:.3f} ms)")
    elif row["section"] == "conv":
        print(f"conv {row['dtype']:>4} {row['layer']:<22} {row['memory_format']:<13} triton "
              f"{row['median_ms']:8.3f} ms {row['peak_bytes'] / 2**20:8.1f} MiB  "
              f"unfold {row['baseline_median_ms']:8.3f} ms {row['baseline_peak_bytes'] / 2**20:8.1f} MiB "
              f"-> {row['speedup']:.2f}x time, "
              f"{row['memory_ratio']:.1f}x memory")
    else:
        print(f"vit  {row['dtype']:>4} backend={row['backend']:<6} "
              f"statistics {row['median_ms']:8.2f} ms/batch, "
              f"forward {row['baseline_median_ms']:8.2f} ms/batch -> {row['ratio_to_forward']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="syrk,conv,vit", help="comma-separated: syrk, conv, vit")
    p.add_argument("--quick", action="store_true", help="first shape of each section only (a smoke run)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>-covariance.json")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("covariance_results.py: no CUDA device found; these benchmarks time GPU kernels and need one. "
              "Nothing was measured or written.", file=sys.stderr)
        return 2
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"syrk", "conv", "vit"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")

    device = torch.device("cuda", torch.cuda.current_device())
    # the baseline is fp32 as peers run it: TF32 would trade away the statistics' precision
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    env = environment(device)
    print(f"{env['device']}: torch {env['torch_version']}, triton {env['triton_version']}, "
          f"autotuned={env['autotuned']}")

    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {**row, **env}
        rows.append(row)
        _print_row(row)

    if "syrk" in sections:
        for dtype_name in DTYPES:
            for n in SYRK_N[:1] if args.quick else SYRK_N:
                for d in SYRK_D[:1] if args.quick else SYRK_D:
                    emit(bench_syrk(d, n, dtype_name, device))
                    torch.cuda.empty_cache()
    if "conv" in sections:
        for dtype_name in DTYPES:
            for name, shape, k, s, pad in CONV_SHAPES[:1] if args.quick else CONV_SHAPES:
                for channels_last in (False, True):
                    emit(bench_conv(name, shape, k, s, pad, dtype_name, channels_last, device))
                    torch.cuda.empty_cache()
    if "vit" in sections:
        for dtype_name in ("bf16",) if args.quick else DTYPES:
            for backend in ("triton", "torch"):
                emit(bench_vit(dtype_name, backend, device, batches=2 if args.quick else 10,
                               rounds=3 if args.quick else 10))
                torch.cuda.empty_cache()

    device_slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", env["device"])
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"{device_slug}-covariance.json"
    # rows of sections not re-run this time are kept
    kept = []
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("format") == FORMAT:
            kept = [r for r in old["rows"] if r.get("section") not in sections]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"format": FORMAT, "rows": kept + rows}, indent=2) + "\n")
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
