"""The compress summary (``summary.json``, format ``utilrank.summary/1``): what the compressed model costs and scores
against the dense one, as one typed value: parameters, FLOPs, the test score, and the latency of both in each engine
timed (a :class:`~utilrank_kernels.timing.Timing`, as ``utilrank bench``'s rows)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import DataSplits
from ..data.datasets import example_inputs
from ..measure import count_flops, count_params
from ..models.hf import KeywordInputs
from ..timing import Timing
from .pipeline import CompressedModel

SUMMARY_FORMAT = "utilrank.summary/1"
LATENCY_BATCH = 32  # the batch the summary times dense and compressed at
SPREAD_LIMIT = 1.25  # p80/p20 above this: the machine was busy, the medians are rough
LABEL = 24  # the table's first column: "test (= val!) accuracy" fits


@dataclass(frozen=True)
class EngineTiming:
    """Dense and compressed milliseconds per step in one engine, timed interleaved at the same batch; ``mode``: the
    engine and dtype, where the row is a chosen mode's (the ``fastest`` row)."""

    dense: Timing
    compressed: Timing
    mode: str = ""

    @property
    def speedup(self) -> float:
        return self.dense.median / self.compressed.median

    @property
    def measurable(self) -> bool:
        """Whether dense and compressed differ measurably: their p20-p80 ranges do not overlap."""
        return not self.dense.overlaps(self.compressed)

    def to_json(self) -> dict[str, float]:
        return {"dense_ms": self.dense.median, "dense_p20_ms": self.dense.p20, "dense_p80_ms": self.dense.p80,
                "compressed_ms": self.compressed.median, "compressed_p20_ms": self.compressed.p20,
                "compressed_p80_ms": self.compressed.p80, "speedup": self.speedup,
                **({"mode": self.mode} if self.mode else {})}


@dataclass(frozen=True)
class Variant:
    """One model of the summary: its score on the test split and, where measured, its parameters, FLOPs per
    example and latency (the first engine's: eager when it ran)."""

    score: float
    params: int | None = None
    flops: int | None = None
    latency: Timing | None = None

    def to_json(self, metric: str) -> dict:
        doc = {} if self.params is None else {"params": self.params, "flops": self.flops}
        doc[metric] = self.score
        if self.latency is not None:
            doc.update(latency_ms=self.latency.median, latency_p20_ms=self.latency.p20,
                       latency_p80_ms=self.latency.p80)
        return doc


@dataclass(frozen=True)
class Target:
    """A whole-model budget: ``measure`` (params or flops) at ``fraction`` of dense, and what the saved model has."""

    measure: str
    fraction: float
    achieved: float


@dataclass(frozen=True)
class CompressSummary:
    """The dense, projected (factored, before fine-tuning) and compressed models side by side. ``metric`` names the
    score (``accuracy`` or ``cosine``); ``test_split`` is ``val`` where the data had no test split; ``example`` is
    what one input is (``image``, ``sequence``: the FLOPs are per one). ``mlu`` is None where no statistics were
    taken (``svd`` factors of a given plan)."""

    model: str
    dataset: str
    method: str
    metric: str
    engines: Mapping[str, EngineTiming]
    dense: Variant
    projected: Variant
    compressed: Variant
    mlu: float | None
    finetune_epochs: int
    test_split: str
    latency_batch: int = LATENCY_BATCH
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    dense_finetuned: Variant | None = None  # the control: dense fine-tuned with the same recipe
    target: Target | None = None
    example: str = "image"
    # the loss fine-tuning ran: "labels" (cross-entropy), "logits" / "embedding" (distilled from the dense model)
    finetune_loss: str = ""
    distill_temperature: float | None = None  # of a distillation on logits
    format: str = field(default=SUMMARY_FORMAT, init=False)

    def to_json(self) -> dict:
        doc = {"format": self.format, "model": self.model, "dataset": self.dataset, "method": self.method,
               "metric": self.metric, "engines": {e: t.to_json() for e, t in self.engines.items()},
               "dense": self.dense.to_json(self.metric), "projected": self.projected.to_json(self.metric),
               "compressed": self.compressed.to_json(self.metric), "mlu": self.mlu,
               "finetune_epochs": self.finetune_epochs, "finetune_loss": self.finetune_loss,
               "test_split": self.test_split,
               "latency_batch": self.latency_batch, "notes": list(self.notes), "warnings": list(self.warnings)}
        if self.distill_temperature is not None:
            doc["distill_temperature"] = self.distill_temperature
        if self.dense_finetuned is not None:
            doc["dense_finetuned"] = self.dense_finetuned.to_json(self.metric)
        if self.target is not None:
            doc["target"] = {"measure": self.target.measure, "fraction": self.target.fraction,
                             "achieved": self.target.achieved}
        return doc

    def score(self, value: float) -> str:
        """A score in its unit: accuracy as a percentage, any other metric (cosine) as the number it is."""
        return f"{value:.2%}" if self.metric == "accuracy" else f"{value:.4f}"

    def score_change(self, value: float) -> str:
        """A difference of scores: percentage points for accuracy, the plain difference otherwise."""
        return f"{100 * value:+.2f} pp" if self.metric == "accuracy" else f"{value:+.4f}"

    def format_table(self) -> str:
        """The terminal table: dense against compressed, one latency line per engine, the notes and warnings."""
        d, p, c = self.dense, self.projected, self.compressed
        test = "test" if self.test_split == "test" else "test (= val!)"
        mlu = "-" if self.mlu is None else f"{self.mlu:.3f}"
        if self.finetune_epochs:
            epochs = f"{self.finetune_epochs} epoch{'s' if self.finetune_epochs > 1 else ''}"
            tuned = f"before fine-tuning): {self.score(p.score)}; fine-tuned {epochs}{self._loss_words()}: "
            tuned += self.score(c.score)
        else:
            tuned = f"no fine-tuning): {self.score(p.score)}, the compressed model as saved"
        lines = [
            f"{'':<{LABEL}}{'dense':>14}{'compressed':>14}{'ratio':>10}",
            f"{'parameters':<{LABEL}}{d.params:>14,}{c.params:>14,}{c.params / d.params:>10.3f}",
            f"{'FLOPs / ' + self.example:<{LABEL}}{d.flops:>14,}{c.flops:>14,}{c.flops / d.flops:>10.3f}",
            *self._latency_lines(),
            f"{test + ' ' + self.metric:<{LABEL}}{self.score(d.score):>14}{self.score(c.score):>14}"
            f"  ({self.score_change(c.score - d.score)})",
            f"projected ({self.method}, {tuned}; MLU {mlu}",
        ]
        if self.dense_finetuned is not None:
            control = self.dense_finetuned.score
            lines.append(f"control: the dense model fine-tuned the same {self.finetune_epochs} epochs: "
                         f"{self.score(control)} (compressed {self.score_change(c.score - control)} against it)")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _loss_words(self) -> str:
        """How fine-tuning trained: on labels, or distilled from the dense model (its logits, its output embedding)."""
        temperature = "" if self.distill_temperature is None else f", T={self.distill_temperature:g}"
        return {"labels": " on labels", "logits": f" distilled from the dense logits (KL{temperature})",
                "embedding": " distilled from the dense output embedding (cosine)",
                "hidden": " distilled from the dense output embedding and hidden states"}.get(self.finetune_loss, "")

    def _latency_lines(self) -> list[str]:
        """One line per engine (median, p20-p80, the ratio compressed / dense, and what it means: a speedup only
        where the p20-p80 ranges do not overlap), at the latency batch."""
        def spread(t: Timing) -> str:  # a cell stays 14 wide
            ms = lambda v: f"{v:.2f}" if v < 100 else f"{v:.0f}"  # noqa: E731
            return f"[{ms(t.p20)}-{ms(t.p80)}]"

        lines = []
        for engine, t in self.engines.items():
            label = f"CPU ms b{self.latency_batch} {engine}"
            lines.append(f"{label:<{LABEL}}{t.dense.median:>14.2f}{t.compressed.median:>14.2f}"
                         f"{t.compressed.median / t.dense.median:>10.3f}  ({t.compressed.compared_to(t.dense)})")
            lines.append(f"{'  p20-p80':<{LABEL}}{spread(t.dense):>14}{spread(t.compressed):>14}"
                         + (f"{'':10}  ({t.mode})" if t.mode else ""))
        return lines


def latency_notes(engines: Mapping[str, EngineTiming], batch: int) -> list[str]:
    """What the timings say beyond their numbers: a busy machine (a wide p20-p80), or no engine faster than dense."""
    notes = []
    spread = max(v.p80 / v.p20 for t in engines.values() for v in (t.dense, t.compressed))
    if spread > SPREAD_LIMIT:
        notes.append(f"latency p80/p20 up to {spread:.2f} (above {SPREAD_LIMIT}): a busy or throttling machine, the "
                     "medians are rough; compare with `utilrank bench`")
    faster = [e for e, t in engines.items() if t.measurable and t.speedup > 1]
    if not faster:
        best = max(engines, key=lambda e: engines[e].speedup)
        if engines[best].measurable:  # measurably not faster: the model, not the machine
            why = ("this model is bound by per-call overhead and the layers factoring leaves alone (attention, "
                   "norms); try --target-device cpu, which keeps dense the layers whose factored form is not faster, "
                   "or a larger batch in `utilrank bench`")
        else:
            why = ("within the p20-p80 spread, so no difference was measured; time again on a quieter machine "
                   "with `utilrank bench --compressed`")
        notes.append(f"not measurably faster than dense at batch {batch} in any engine timed (best: {best}, "
                     f"{engines[best].speedup:.2f}x): {why}")
    return notes


def summarize(result: CompressedModel, dense: nn.Module, data: DataSplits, *, model_name: str, metric: str,
              finetune_epochs: int, engines: Mapping[str, EngineTiming], budget: tuple[str, float] | None = None,
              notes: Sequence[str] = (), device: torch.device | str = "cpu",
              latency_batch: int = LATENCY_BATCH, distill_temperature: float | None = None) -> CompressSummary:
    """The summary of ``compress_model``'s ``result`` against the ``dense`` model it started from: sizes counted
    here (FLOPs on one test example), scores from ``result.scores``, latencies as timed (``engines``; eager's, else
    the first engine's, is the dense and compressed rows' latency). ``budget``: the ``CompressConfig.budget`` the
    plan was sized to."""
    example = example_inputs(data.test, 1, device)
    # a model called with **batch (a Hugging Face model on text) is measured through a wrapper that unpacks it
    measured = KeywordInputs if isinstance(example, dict) else (lambda m: m)
    scores = result.scores
    # projected and fine-tuned share the compressed architecture: one count of each
    params, flops = count_params(result.model), count_flops(measured(result.model), example)
    latency = engines.get("eager") or next(iter(engines.values()))
    dense_row = Variant(scores["dense"]["test"], count_params(dense), count_flops(measured(dense), example),
                        latency.dense)
    compressed_row = Variant(scores["compressed"]["test"], params, flops, latency.compressed)
    target = None
    if budget is not None:
        measure, fraction = budget
        achieved = getattr(compressed_row, measure) / getattr(dense_row, measure)
        target = Target(measure, fraction, achieved)
        notes = [*notes, f"target {measure} {fraction:g} of dense: the saved model has {achieved:.4f}"]
    return CompressSummary(
        model=model_name, dataset=data.name, method=result.plan.method, metric=metric, engines=dict(engines),
        dense=dense_row, projected=Variant(scores["projected"]["test"], params, flops),
        compressed=compressed_row, mlu=result.report.mlu if result.report is not None else None,
        finetune_epochs=finetune_epochs, test_split=data.test_split, latency_batch=latency_batch,
        notes=(*notes, *(result.report.sample_notes() if result.report is not None else ())),
        warnings=tuple(result.warnings),
        dense_finetuned=Variant(scores["dense_finetuned"]["test"]) if "dense_finetuned" in scores else None,
        target=target, example="sequence" if isinstance(example, dict) else "image",
        finetune_loss=result.finetune_loss if finetune_epochs else "",
        distill_temperature=distill_temperature if finetune_epochs and result.finetune_loss == "logits" else None)
