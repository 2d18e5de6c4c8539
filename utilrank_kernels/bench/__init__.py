"""Benchmarks of ``utilrank bench``: a dense model and its compressed form, timed side by side.

Rows carry timm's ``benchmark.py`` fields (``infer_samples_per_sec``, ``infer_step_time`` in ms,
``param_count`` in millions, ``infer_gmacs`` per sample; 10 warm-up and 40 timed steps) and what makes
a row comparable (device, dtype, backend, torch and triton versions, p20/p80). Compressed rows add the
measured ``speedup`` over the dense model of the same run, the ``theoretical_speedup`` (the FLOP ratio
from ``FlopCounterMode``, attention counted) and ``realized_fraction = speedup / theoretical_speedup``.

The dense and the compressed models are timed interleaved (one step of each in turn, after their
warm-ups), so that a machine shared with other work slows both alike and their ratio stays honest. Each
``--engine`` times both in that engine: ``eager`` PyTorch, ``compile`` (``torch.compile``, inductor),
``compile-freeze`` (the same with inductor's freezing) or ``onnxruntime`` (each model's ONNX export, checked
against PyTorch first; rows carry the export's ``export_max_abs_error`` and the ``onnxruntime_provider``). ``--dtype``
adds ``int8`` (dynamic quantization, CPU) to fp32/bf16/fp16; bf16 on a CPU without BF16 instructions is a row
with that reason (``bench.modes``). Every row carries its agreement with eager fp32 (``logit_cosine``,
``top1_agreement``) and its ``bytes_on_disk``; ``fastest_mode`` (``bench.fastest``) picks the fastest CPU mode.

What is compressed:

- ``--compressed DIR``: a folder written by ``utilrank compress``; the dense model is its twin with
  every factored layer multiplied back (``W = B A``), the same architecture and the same outputs.
- ``--model M --param-ratio R``: a synthetic cut for timing: every ``nn.Linear`` and ``nn.Conv2d``
  (groups = 1) factored at the rank ``r = R in out / (in + out)``, rounded down to a multiple of
  ``--rank-multiple`` where that takes less than 10% off ``r``, so those layers keep at most ``R`` of
  their parameters; random factors.
- no argument (the built-in default): the built-in ``vit-digits`` (trained and cached on first use)
  compressed in-process with data-aware factors at ``--energy`` (no rank search, no fine-tuning:
  timing depends on the ranks, not on the weights' values).
"""

from .engines import (
    BACKEND_CHOICES,
    BENCH_DTYPES,
    DTYPES,
    ENGINE_PACKAGES,
    ENGINES,
    TokenInput,
    dtype_name,
    example_input,
)
from .fastest import CPU_MODES, FastestMode, fastest_mode
from .models import (
    check_input_size,
    compress_builtin,
    cut_to_ratio,
    dense_twin,
    in_channels,
    input_size,
    input_spec,
    max_positions,
)
from .output import BENCH_FORMAT, write_rows
from .run import bench

__all__ = ["BACKEND_CHOICES", "BENCH_DTYPES", "BENCH_FORMAT", "CPU_MODES", "DTYPES", "FastestMode",
           "fastest_mode", "ENGINES", "ENGINE_PACKAGES", "TokenInput", "bench",
           "check_input_size", "compress_builtin", "cut_to_ratio", "dense_twin", "dtype_name", "example_input",
           "in_channels", "input_size", "input_spec", "max_positions", "write_rows"]
