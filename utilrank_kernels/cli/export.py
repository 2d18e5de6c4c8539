"""``utilrank export``: a compressed folder as an ONNX file or a ``torch.export`` ExportedProgram, checked
against the PyTorch model before it is written."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._files import read_json
from ..bench import DTYPES, TokenInput, dtype_name, example_input, input_spec
from ..compress import load_compressed
from ..export import (
    DEPLOY_PACKAGES,
    FORMATS,
    QUANTIZATIONS,
    SUFFIXES,
    ExportError,
    export_onnx,
    export_program,
    int8_path,
    missing_packages,
    opset_range,
    quantize_onnx,
)
from ..ops._dispatch import BACKENDS
from ._options import UsageError, positive_int
from ._runtime import resolve_device

DEFAULT_FOLDER = "utilrank-out/compress-vit-digits"  # what `utilrank compress` writes by default
DTYPE_NAMES = ("fp32", "fp16", "bf16")


def _batch(text: str) -> int | None:
    """``--batch``: a batch size >= 1, or ``dynamic`` (None)."""
    if text == "dynamic":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a batch size >= 1 or 'dynamic', got {text!r}") from None


def default_out(folder: Path, fmt: str, dtype: str, batch: int | None) -> Path:
    """``utilrank-out/export-FOLDER[-fp16][-bN].onnx|.pt2``: beside the other commands' outputs, not inside
    the compressed folder (which ``compress`` replaces whole)."""
    tags = "".join(f"-{t}" for t in (dtype if dtype != "fp32" else None, f"b{batch}" if batch else None) if t)
    return Path("utilrank-out") / f"export-{folder.resolve().name}{tags}{SUFFIXES[fmt]}"


def _check_options(args) -> None:
    """Every problem with the options before the model is loaded."""
    if args.quantize and args.format != "onnx":
        raise UsageError(f"--quantize {args.quantize} applies to --format onnx (onnxruntime's quantize_dynamic), "
                         f"not {args.format}")
    if args.quantize and args.dtype != "fp32":
        raise UsageError(f"--quantize {args.quantize} with --dtype {args.dtype}: int8 is quantized from the fp32 "
                         "export; give --dtype fp32")
    if args.opset is not None and args.format != "onnx":
        raise UsageError(f"--opset applies to --format onnx, not {args.format}")
    if args.backend not in BACKENDS:
        raise UsageError(f"--backend {args.backend}: choose one of {', '.join(BACKENDS)}")
    if args.format == "onnx":
        if args.backend not in ("auto", "torch"):
            raise UsageError(f"--backend {args.backend}: an ONNX file holds the torch path (plain MatMul nodes); "
                             "kernel backends are for --format exported-program")
        if args.dtype == "bf16":
            raise UsageError("--dtype bf16 with --format onnx: onnxruntime has no bfloat16 MatMul/Conv on its CPU "
                             "provider, so the file could not be checked; use fp16 or fp32, or --format "
                             "exported-program")
        missing = missing_packages(DEPLOY_PACKAGES)
        if missing:
            raise UsageError(f"--format onnx needs {', '.join(missing)}: pip install -e '.[deploy]'")
        low, high = opset_range()
        if args.opset is not None and not low <= args.opset <= high:
            raise UsageError(f"--opset {args.opset}: the exporter writes opset {low} to {high}: asked for less, "
                             f"torch.onnx's dynamo exporter would write {low}; for more, its version converter has no "
                             "rules")
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name")
    if out is not None and args.quantize and int8_path(out).is_dir():
        raise UsageError(f"--out {out}: the int8 file's name {int8_path(out)} is a folder")


def run(args) -> int:
    _check_options(args)
    folder = Path(args.dir)
    if not folder.is_dir():
        hint = " (run `utilrank compress` first)" if args.dir == DEFAULT_FOLDER else ""
        raise UsageError(f"{folder}: no such folder{hint}")
    device = resolve_device(args.device)
    try:
        model = load_compressed(folder, device, backend="torch" if args.format == "onnx" else args.backend,
                                fuse_mlps=True)
        config = read_json(folder / "config.json", "config")
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    dtype = DTYPES[args.dtype]
    model = model.to(dtype)
    try:
        shape = input_spec(model, config)  # config.json's input: an image size, or a text model's tokens
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{folder}/config.json: {exc}") from exc
    # a dynamic batch axis is traced at batch 2: torch.export specializes a size-1 axis to the constant 1
    example = example_input(shape, args.batch or 2, dtype, device)
    out = Path(args.out) if args.out else default_out(folder, args.format, args.dtype, args.batch)
    what = (f"{shape.describe()}, dynamic length" if isinstance(shape, TokenInput) else str(tuple(shape)))
    print(f"{folder}: {config['arch']}, input {what}, {args.dtype}, batch {args.batch or 'dynamic'}, on "
          f"{device.type}; exporting {args.format} ...")
    try:
        if args.format == "onnx":
            name = (config.get("input") or {}).get("names", ["input"])[0]  # an HF image model's: pixel_values
            result = export_onnx(model, example, out, dynamic_batch=args.batch is None, opset=args.opset,
                                 input_name=name)
        else:
            result = export_program(model, example, out, dynamic_batch=args.batch is None)
    except (ExportError, ImportError, OSError) as exc:
        raise UsageError(f"{folder}: {str(exc).splitlines()[0]}") from exc
    if args.format == "onnx":
        top = ", ".join(f"{op} {n}" for op, n in sorted(result.operators.items(), key=lambda kv: -kv[1])[:6])
        print(f"graph: opset {result.opset}, inputs {', '.join(result.input_names)}, outputs "
              f"{', '.join(result.output_names)}; {sum(result.operators.values())} nodes ({top}, ...), no custom ops")
    elif result.custom_ops:
        print(f"graph: custom ops {', '.join(result.custom_ops)}: reload with `import utilrank_kernels` and "
              f"torch.export.load({str(out)!r}).module()")
    else:
        print(f"graph: aten ops only (the torch path on {device.type}): torch.export.load({str(out)!r}).module() "
              "runs without this package")
    print(f"checked: {result.runtime} on a batch of {result.check_batch}: max abs error {result.max_abs_error:.3g} "
          f"against the PyTorch model (tolerance {result.tolerance:.3g})")
    print(f"wrote {out}")
    if args.quantize:
        _quantize(out, example, folder)
    return 0


def _quantize(out: Path, example, folder: Path) -> None:
    """``--quantize int8``: the checked fp32 file quantized beside it (``NAME-int8.onnx``), checked against it."""
    target = int8_path(out)
    try:
        result = quantize_onnx(out, target, example)
    except (ExportError, ImportError, OSError) as exc:
        raise UsageError(f"{folder}: --quantize int8: {str(exc).splitlines()[0]}") from exc
    print(f"int8: onnxruntime quantize_dynamic (QInt8 weights of every constant-weight MatMul/Gemm, activations at "
          f"run time); against the fp32 file on a batch of {result.check_batch}: logit cosine "
          f"{result.logit_cosine:.5f}, top-1 agreement {result.top1_agreement:.2f}, max abs error "
          f"{result.max_abs_error:.3g}; {result.bytes:,} bytes ({result.bytes / result.fp32_bytes:.2f} of fp32)")
    print(f"wrote {target}")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a compressed model as ONNX or a torch.export ExportedProgram, "
                                      "checked against the PyTorch model",
                       description="Write a compressed folder (utilrank compress's) as an ONNX file that runs without "
                                   "this package (the factors as plain MatMuls) or as a torch.export ExportedProgram "
                                   "that keeps the utilrank kernels as custom ops; the file is run in its runtime "
                                   "on a batch and compared with the PyTorch model before it is written.")
    p.add_argument("dir", nargs="?", default=DEFAULT_FOLDER,
                   help="a folder written by utilrank compress (default: %(default)s)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx: plain MatMul/Add/activation nodes, runs in onnxruntime without this package; "
                        "exported-program: torch.export.save, kernel backends kept as utilrank custom ops "
                        "(default: %(default)s)")
    p.add_argument("--dtype", type=dtype_name, choices=DTYPE_NAMES, default="fp32",
                   help="weights and input: fp32, fp16 or bf16 (torch's names too; default: %(default)s)")
    p.add_argument("--batch", type=_batch, default=None, metavar="N|dynamic",
                   help="a fixed batch size, or dynamic (default: dynamic)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, 18 to the exporter's newest (25 with onnxscript 0.7; default: torch's, 20); "
                        "an export that holds another opset than asked for is refused")
    p.add_argument("--device", default="cpu",
                   help="cpu | cuda | auto: where the model is traced and checked (default: %(default)s)")
    p.add_argument("--backend", default="auto",
                   help="exported-program: the factored modules' backend, auto | torch | triton | cuda (auto: a "
                        "kernel on CUDA tensors, the torch path on the CPU; default: %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="with --format onnx: also write the checked fp32 file dynamically quantized to int8 beside "
                        "it as NAME-int8.onnx (onnxruntime's quantize_dynamic, QInt8 weights; refused below logit "
                        "cosine 0.99 against the fp32 file); runs in onnxruntime without this package")
    p.add_argument("--out", default=None,
                   help="output file (default: utilrank-out/export-DIRNAME[-DTYPE][-bN].onnx|.pt2); written "
                        "under a temporary name and renamed once checked")
    p.set_defaults(func=run)
