"""The fastest CPU mode for a dense/compressed pair: what ``utilrank compress``'s summary times them in.

``fastest_mode(dense, compressed, input_shape)`` times both in each (engine, dtype) of ``CPU_MODES`` that can run
here (``bench.bench``: interleaved within an engine; fp32, bf16 where the CPU has BF16 instructions, dynamic int8;
eager, ``torch.compile`` with freezing, onnxruntime) and returns the mode in which the compressed model ran
fastest, with its name, among those whose outputs agree with the compressed model's eager fp32 outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..timing import Timing
from .run import bench

# a mode whose outputs agree with the same model's eager fp32 outputs below this logit cosine is not counted
# (dynamic int8 on random ViT weights: 0.999)
MIN_COSINE = 0.99


@dataclass(frozen=True)
class FastestMode:
    """The CPU mode (``engine`` at ``dtype``) in which the compressed model ran fastest, its name, both models'
    median step times in it, the speedup, the compressed model's agreement with its own eager fp32 outputs, and
    every row timed to find it; ``dense_timing`` and ``compressed_timing`` their medians with p20/p80 (what
    ``compress.summary.EngineTiming`` takes)."""

    name: str
    engine: str
    dtype: str
    dense_ms: float
    compressed_ms: float
    speedup: float
    logit_cosine: float
    rows: list[dict]
    dense_timing: Timing
    compressed_timing: Timing

    def describe(self) -> str:
        return (f"{self.name}: dense {self.dense_ms:.3f} ms, compressed {self.compressed_ms:.3f} ms "
                f"({self.speedup:.2f}x; logit cosine {self.logit_cosine:.4f} against eager fp32)")


CPU_MODES = (("eager", "fp32"), ("eager", "bf16"), ("eager", "int8"), ("compile-freeze", "fp32"),
             ("compile-freeze", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
# what ``utilrank compress``'s summary tries: compile-freeze left out, as its compiles take tens of seconds per model
# and dtype (``utilrank bench --engine compile-freeze`` times it)
SUMMARY_MODES = tuple(m for m in CPU_MODES if m[0] != "compile-freeze")


def fastest_mode(dense: nn.Module, compressed: nn.Module, input_shape: Sequence[int], *, batch: int = 8,
                 modes: Sequence[tuple[str, str]] = CPU_MODES, model_name: str = "model", warmup: int = 3,
                 iters: int = 10, max_seconds: float | None = 30.0, min_cosine: float = MIN_COSINE,
                 log: Callable[[str], None] | None = None) -> FastestMode:
    """Time ``dense`` and ``compressed`` on the CPU at ``batch`` in each of ``modes`` (engine, dtype) that can run
    here (``bench.bench``'s rows: interleaved within an engine; a mode that cannot run is a row with its reason)
    and return the one in which the compressed model's median step is shortest, among those whose outputs agree
    with the compressed model's eager fp32 outputs at a logit cosine >= ``min_cosine``. ``ValueError`` if none
    ran."""
    rows = []
    for dtype in dict.fromkeys(d for _, d in modes):
        engines = [e for e, d in modes if d == dtype]
        rows += bench(dense, compressed, model_name=model_name, input_shape=input_shape, batch_sizes=(batch,),
                      dtypes=(dtype,), engines=engines, device="cpu", warmup=warmup, iters=iters,
                      max_seconds=max_seconds, log=log or (lambda _: None))
    candidates = [r for r in rows if r["variant"] == "compressed" and "error" not in r
                  and r.get("logit_cosine", math.nan) >= min_cosine]
    if not candidates:
        reasons = "; ".join(sorted({r["error"] for r in rows if "error" in r})) or "no mode agreed with fp32"
        raise ValueError(f"no CPU mode could time the compressed model: {reasons}")
    best = min(candidates, key=lambda r: r["infer_step_time"])
    return FastestMode(f"{best['engine']} {best['dtype']}", best["engine"], best["dtype"], best["dense_step_time"],
                       best["infer_step_time"], best["speedup"], best["logit_cosine"], rows,
                       Timing(best["dense_step_time"], best["dense_step_time_p20"], best["dense_step_time_p80"]),
                       Timing(best["infer_step_time"], best["step_time_p20"], best["step_time_p80"]))
