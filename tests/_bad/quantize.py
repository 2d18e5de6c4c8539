"""The options of issue 26's CPU modes: ``export --quantize`` where there is nothing to quantize (another format or
dtype, an unknown scheme, an int8 file name that is a folder) and ``bench --dtype int8`` / ``--engine`` values the
bench cannot run (int8 on CUDA, unknown dtypes and engines): each refused in one line before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from _bad import Bad

BENCH = ("bench", "--no-plot", "--warmup", "0", "--iters", "1", "--batch-sizes", "1")


def int8_name_is_a_folder(tmp: Path) -> None:
    (tmp / "m-int8.onnx").mkdir()


CASES = [
    Bad("export-quantize-exported-program", ("export", "{tmp}/c", "--quantize", "int8", "--format", "exported-program"),
        ("--quantize int8", "--format onnx", "exported-program")),
    Bad("export-quantize-fp16", ("export", "{tmp}/c", "--quantize", "int8", "--dtype", "fp16"),
        ("--quantize int8", "--dtype fp16", "fp32")),
    Bad("export-quantize-unknown-scheme", ("export", "{tmp}/c", "--quantize", "int4"), ("--quantize", "int4")),
    Bad("export-quantize-int8-name-is-a-folder", ("export", "{tmp}/c", "--quantize", "int8", "--out", "{tmp}/m.onnx"),
        ("{tmp}/m-int8.onnx", "folder"), setup=int8_name_is_a_folder),
    Bad("bench-int8-on-cuda", (*BENCH, "--device", "cuda", "--dtype", "fp32,int8"), ("--dtype int8", "cuda", "CPU")),
    Bad("bench-dtype-int4", (*BENCH, "--device", "cpu", "--dtype", "int4"), ("--dtype", "int4")),
    Bad("bench-engine-unknown-optimized-mode", (*BENCH, "--device", "cpu", "--engine", "onnxruntime-max"),
        ("--engine", "onnxruntime-max")),
]
