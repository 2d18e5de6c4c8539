"""Does OpenVINO serve as a CPU engine here (issue 26 item 2: "OpenVINO if it serves")? ViT-B/16 dense and at 50% of
its parameters in OpenVINO f32 and bf16 (``INFERENCE_PRECISION_HINT``; bf16 is OpenVINO's default on CPUs with BF16
instructions), beside the engines the package has (eager fp32, onnxruntime fp32 and int8): every variant timed in one
interleaved run (``timing.time_interleaved``) against the dense fp32 eager model.

    pip install openvino
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/run.py openvino-screen                 # on an idle machine
    python benchmarks/run.py openvino-screen --model test_vit --iters 3             # a smoke run

OpenVINO converts the PyTorch module itself (``openvino.convert_model``; a factored model's ops trace as two
MatMuls), compiled for the CPU with ``PERFORMANCE_HINT=LATENCY`` and ``--threads`` inference threads. Rows:
``benchmarks.tools.rows.Row`` with ``speedup_vs_dense fp32 eager`` and ``logit_cosine`` against the same model in
eager fp32, to ``benchmarks/results/<device>_openvino-screen.json``. OpenVINO is an engine of ``utilrank bench``
only if it beats the package's best mode somewhere (it did not in the run docs/results.md quotes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import timm
import torch

from benchmarks.tools.rows import Row, environment, result_path, write_rows
from utilrank_kernels.bench import cut_to_ratio
from utilrank_kernels.bench.engines import make_step, onnxruntime_model
from utilrank_kernels.export import agreement
from utilrank_kernels.timing import Timing, time_interleaved

BASELINE = "dense fp32 eager"


def _openvino_steps(label: str, model, x, threads: int, reference) -> tuple[dict, dict]:
    import openvino as ov  # optional: this screen only

    converted, steps, fields = ov.convert_model(model, example_input=x), {}, {}
    for precision in ("f32", "bf16"):
        compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                              "INFERENCE_PRECISION_HINT": precision,
                                                              "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        out = torch.from_numpy(request.infer({0: x.numpy()})[0])
        key = f"{label} openvino {precision}"
        steps[key] = lambda r=request: r.infer({0: x.numpy()})
        fields[key] = {"engine": "openvino", "openvino_version": ov.__version__, **agreement(out, reference)}
    return steps, fields


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="openvino-screen", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=8, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("openvino-screen needs OpenVINO: pip install openvino", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dense = timm.create_model(args.model).eval()
    cut, _ = cut_to_ratio(dense, args.ratio)
    x = torch.randn(args.batch, *dense.default_cfg["input_size"])
    steps, fields = {}, {}
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        for label, model in (("dense", dense), (f"{args.ratio:g}", cut)):
            reference = model(x)
            steps[f"{label} fp32 eager"] = make_step(model, x)
            fields[f"{label} fp32 eager"] = {"engine": "eager"}
            for dtype in ("fp32", "int8"):
                session, export = onnxruntime_model(model, x, folder, int8=dtype == "int8")
                steps[f"{label} {dtype} onnxruntime"] = make_step(session, x, engine="onnxruntime")
                fields[f"{label} {dtype} onnxruntime"] = {"engine": "onnxruntime", **export}
            ov_steps, ov_fields = _openvino_steps(label, model, x, args.threads, reference)
            steps |= ov_steps
            fields |= ov_fields
            print(f"{label}: {len(steps)} variants built", flush=True)
        times = time_interleaved(steps, warmup=2, iters=args.iters, max_seconds=1800, progress="rounds")
    base = Timing.of(times[BASELINE])
    rows = []
    for key, t in times.items():
        timing = Timing.of(t)
        print(f"{key:28s} {timing.median:9.1f} ms ({timing.p20:.1f}-{timing.p80:.1f})  "
              f"{base.median / timing.median:5.2f}x", flush=True)
        rows.append(Row(op=args.model, impl=key, dtype=key.split()[-1] if "openvino" in key else key.split()[1],
                        shape={"batch": args.batch, "param_ratio": 1.0 if key.startswith("dense") else args.ratio},
                        timing=timing, baselines={BASELINE: base}, extra=fields[key]))
    path = write_rows(result_path("openvino-screen", out=args.out), "openvino-screen", rows, environment(),
                      threads=args.threads, iters=args.iters)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
