"""Issue 4's measurements: the Triton covariance kernels against what peers do, on one CUDA device.

    python benchmarks/run.py covariance                      # all sections, autotuned
    python benchmarks/run.py covariance --sections syrk --quick

Writes ``benchmarks/results/<device>_covariance.json``: ``benchmarks.tools.rows.Row`` s, each with the device
name, torch and triton versions, dtype, shape, the kernel's median and p20/p80 and its baselines measured in the
same run, side by side:

- ``syrk``: ``covariance_update`` (upper-triangle tiles, fp32 per batch, fp64 accumulator) against
  ``acc.addmm_(x.T, x)`` in fp32 (TF32 off; bf16 inputs converted to fp32 first, as peers do), for d in
  {384, 768, 1024, 3072, 4096}, N in {8192, 65536}, bf16 and fp32 inputs. ``torch.mm(x.T, x)`` in the
  input dtype (a full GEMM on tensor cores, its result rounded to the input dtype: too coarse for
  statistics) is recorded beside it as the speed of light of the full product; the package's torch path and,
  for fp32, the kernel with ``allow_tf32`` too, each with its error against an fp64 product
  (``syrk_cases``; ``gpu_run.sh --call 1`` runs them at d 768 and 3072, N 12608).
- ``conv``: ``conv_covariance_update`` (implicit im2col) against ``F.unfold`` + ``addmm_`` in fp32,
  time and peak memory, on ViT-B/16 and ResNet-50 conv shapes at batch 64.
- ``vit``: the statistics pass of a ViT-B/16 (timm ``vit_base_patch16_224``, random init, synthetic
  images, batch 64) against its plain forward pass, with the triton and the torch backends.

Kernel times use ``rows.cuda_timing`` (``triton.testing.do_bench``'s CUDA events, L2 flushed between calls);
whole passes alternate forward and statistics rounds (``timing.time_interleaved``) so both see the same clocks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

from benchmarks.kernels.cases import Case, Impl, gpu_timer, measure_cases, scaled_rows
from benchmarks.tools.rows import ROWS_FORMAT, Row, cuda_timing, environment, result_path
from utilrank_kernels._files import write_json
from utilrank_kernels.analysis import collect_stats
from utilrank_kernels.ops import conv_covariance_update, covariance_update
from utilrank_kernels.timing import Timing, time_interleaved
from utilrank_kernels.triton._autotune import single_config

SECTIONS = ("syrk", "conv", "vit")
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


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Memory allocated beyond what was live before ``fn``, at its peak."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def _upper_rel_err(update: Callable[[torch.Tensor], None], ref: torch.Tensor) -> float:
    """``||U(acc) - U(ref)|| / ||U(ref)||`` over the upper triangles, ``acc`` the fp64 accumulator ``update``
    adds one batch into from zero."""
    acc = torch.zeros_like(ref)
    update(acc)
    upper = torch.ones_like(ref, dtype=torch.bool).triu()
    return float((acc - ref)[upper].norm() / ref[upper].norm())


def syrk_impls(n: int, d: int, dtype_name: str, device: str) -> dict[str, Impl]:
    """The covariance update of one batch ``x`` (``N x d``) into an fp64 accumulator: the Triton kernel (full, and
    upper triangle only as the statistics pass runs it; with TF32 for fp32 inputs), the package's torch path,
    what peers run (``addmm_`` in fp32, TF32 off) and the full product in the input dtype (the speed of light of a
    GEMM, too coarse for statistics). The kernels' error against an fp64 product is measured once, at build.
    Turns TF32 off for fp32 matmuls (the baseline is fp32 as peers run it: TF32 would trade away the statistics'
    precision)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = DTYPES[dtype_name]
    x = (torch.randn(n, d, device=device) + 0.1).to(dtype)
    acc64 = torch.zeros(d, d, dtype=torch.float64, device=device)
    acc32 = torch.zeros(d, d, dtype=torch.float32, device=device)
    ref = x.double().T @ x.double()
    on_gpu = device != "cpu"

    def update(backend: str, **kw) -> Callable[[torch.Tensor], None]:
        return lambda acc: covariance_update(acc, x, backend=backend, **kw)

    def baseline():
        xf = x.float()  # a no-op for fp32 input; the bf16 -> fp32 copy peers pay otherwise
        acc32.addmm_(xf.T, xf)

    # upper: the statistics pass's form, each upper tile written once (the lower triangle mirrored at the end)
    kernels = {"triton": ({"backend": "triton"}, on_gpu),
               "triton-upper": ({"backend": "triton", "upper": True}, on_gpu),
               "torch-path": ({"backend": "torch"}, True)}
    if dtype == torch.float32:
        kernels["triton-tf32"] = ({"backend": "triton", "allow_tf32": True}, on_gpu)
    impls = {}
    for name, (kw, runs_here) in kernels.items():
        fn = update(**kw)
        err = {"rel_err_vs_fp64": _upper_rel_err(fn, ref)} if runs_here else {}
        impls[name] = Impl(lambda fn=fn: fn(acc64), cpu=kw["backend"] == "torch", extra=err)
    impls["addmm-fp32"] = Impl(baseline, True, extra={"rel_err_vs_fp64": _upper_rel_err(
        lambda acc: acc.add_(x.float().T @ x.float()), ref)})
    impls["gemm-same-dtype"] = Impl(lambda: torch.mm(x.T, x), True)
    return impls


def syrk_cases(device: str = "cuda", *, ds=SYRK_D, ns=SYRK_N, dtypes=tuple(DTYPES),
               max_rows: int | None = None) -> list[Case]:
    """``covariance_update`` against ``addmm_`` for each ``d``, ``N`` (``cases.scaled_rows``) and dtype."""
    return [Case("syrk", f"d{d}", dtype_name, {"N": n, "d": d},
                 lambda n=n, d=d, dtype_name=dtype_name: syrk_impls(n, d, dtype_name, device),
                 ("addmm-fp32", "gemm-same-dtype"),
                 # tflops: the full product's FLOPs over the time (above the GEMM's rate: the half saved)
                 {"accumulator": "fp64", "tf32_matmul": False, "flops": 2 * n * d * d})
            for dtype_name in dtypes for n in (scaled_rows(n, max_rows) for n in ns) for d in ds]


def _out_hw(h: int, w: int, k: int, s: int, p: int) -> tuple[int, int]:
    return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


def bench_conv(name: str, shape: tuple, k: int, s: int, p: int, dtype_name: str, channels_last: bool) -> Row:
    n, c, h, w = shape
    x = torch.randn(shape, device="cuda").to(DTYPES[dtype_name])
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kdim = c * k * k
    acc64 = torch.zeros(kdim, kdim, dtype=torch.float64, device="cuda")
    acc32 = torch.zeros(kdim, kdim, dtype=torch.float32, device="cuda")

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
    oh, ow = _out_hw(h, w, k, s, p)
    return Row("conv", "triton", dtype_name,
               {"input": list(shape), "kernel_size": k, "stride": s, "padding": p, "patches": [n * oh * ow, kdim],
                "memory_format": "channels_last" if channels_last else "nchw"},
               cuda_timing(kernel),
               {"unfold_addmm_fp32": cuda_timing(baseline), "torch_backend": cuda_timing(torch_backend)},
               {"layer": name, "kernel": "conv_covariance_update(backend='triton'), implicit im2col, into fp64",
                "baseline": "F.unfold(x.float()) -> reshape -> acc32.addmm_, TF32 off",
                "peak_bytes": mem_kernel, "baseline_peak_bytes": mem_base,
                "memory_ratio": mem_base / max(mem_kernel, 1)})


def bench_vit(dtype_name: str, backend: str, *, batch_size: int = 64, batches: int = 10, rounds: int = 10) -> Row:
    """Milliseconds per batch of the statistics pass and of the plain forward pass, in alternating rounds."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).to(device="cuda", dtype=dtype).eval()
    images = [torch.randn(batch_size, 3, 224, 224, device="cuda", dtype=dtype) for _ in range(2)]
    data = [images[i % 2] for i in range(batches)]

    def forward_pass():
        with torch.inference_mode():
            for x in data:
                model(x)

    def stats_pass():
        collect_stats(model, data, backend=backend, progress=False)

    # one warm-up each (the first statistics pass autotunes), then rounds of one pass of each in turn
    times = time_interleaved({"forward": forward_pass, "statistics": stats_pass}, warmup=1, iters=rounds,
                             device=torch.device("cuda"))
    per_batch = {k: Timing.of([t / batches for t in v]) for k, v in times.items()}
    return Row("vit", f"collect_stats(backend={backend!r})", dtype_name, {"input": [batch_size, 3, 224, 224]},
               per_batch["statistics"], {"forward": per_batch["forward"]},
               {"model": "vit_base_patch16_224", "backend": backend, "batches_per_round": batches, "rounds": rounds,
                "baseline": "plain forward per batch (inference_mode)",
                "ratio_to_forward": per_batch["statistics"].median / per_batch["forward"].median})


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _print_row(row: Row) -> None:
    t = row.timing.median
    if row.op == "conv":
        x = row.extra
        print(f"conv {row.dtype:>4} {x['layer']:<22} {row.shape['memory_format']:<13} triton "
              f"{t:8.3f} ms {x['peak_bytes'] / 2**20:8.1f} MiB  unfold "
              f"{row.baselines['unfold_addmm_fp32'].median:8.3f} ms {x['baseline_peak_bytes'] / 2**20:8.1f} MiB "
              f"-> {row.speedup('unfold_addmm_fp32'):.2f}x time, {x['memory_ratio']:.1f}x memory")
    else:
        print(f"vit  {row.dtype:>4} backend={row.extra['backend']:<6} statistics {t:8.2f} ms/batch, "
              f"forward {row.baselines['forward'].median:8.2f} ms/batch -> {row.extra['ratio_to_forward']:.2f}x")


def measure(sections: list[str], quick: bool) -> list[Row]:
    def each(row: Row) -> Row:
        _print_row(row)
        torch.cuda.empty_cache()
        return row

    rows: list[Row] = []
    if "syrk" in sections:
        rows += measure_cases(syrk_cases(ds=SYRK_D[:1] if quick else SYRK_D, ns=SYRK_N[:1] if quick else SYRK_N),
                              gpu_timer)
    if "conv" in sections:
        rows += [each(bench_conv(name, shape, k, s, pad, dtype_name, channels_last)) for dtype_name in DTYPES
                 for name, shape, k, s, pad in (CONV_SHAPES[:1] if quick else CONV_SHAPES)
                 for channels_last in (False, True)]
    if "vit" in sections:
        rows += [each(bench_vit(dtype_name, backend, batches=2 if quick else 10, rounds=3 if quick else 10))
                 for dtype_name in (("bf16",) if quick else DTYPES) for backend in ("triton", "torch")]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: syrk, conv, vit")
    p.add_argument("--quick", action="store_true", help="first shape of each section only (a smoke run)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/<device>_covariance.json")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    if not torch.cuda.is_available():
        print("covariance: no CUDA device found; these benchmarks time GPU kernels and need one. "
              "Nothing was measured or written.", file=sys.stderr)
        return 2

    # the baseline is fp32 as peers run it: TF32 would trade away the statistics' precision
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    env = {**environment("cuda"), "autotuned": not single_config(), "tf32_matmul": False}
    print(f"{env['device']}: torch {env['torch_version']}, triton {env['triton_version']}, "
          f"autotuned={env['autotuned']}")
    rows = measure(sections, args.quick)
    out = result_path("covariance", "cuda", args.out)
    # rows of sections not re-run this time are kept
    kept = []
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("format") == ROWS_FORMAT:
            kept = [r for r in old["rows"] if r.get("op") not in sections]
    write_json(out, {"format": ROWS_FORMAT, "benchmark": "covariance", **env,
                     "rows": kept + [row.as_dict(env) for row in rows]})
    print(f"wrote {out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
