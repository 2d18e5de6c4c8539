"""The utilization report (DESIGN §1 step 4, §4 ``report.json``) and its terminal table: a pure function
of the statistics' subspaces at one energy (the eigendecompositions are ``compute_subspaces``'s). Its figure
is ``plots.plot_utilization``'s, drawn by the commands."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from .._files import SchemaError, read_json, write_json
from ..layers import factored_pays
from .stats import Statistics
from .subspace import Subspaces, numerical_rank

REPORT_FORMAT = "utilrank.report/1"
BOUNDED_MARK = "!"  # the table's mark beside the sample count of a layer whose rank the samples bound


def sample_bounded(samples: int, in_features: int, out_features: int) -> bool:
    """Whether ``samples`` rows of input (tokens; a conv's output pixels, the rows of its im2col input) cap a
    layer's utilized rank below its full rank ``min(in, out)``. Both sides the report measures are capped:
    ``C_in = X^T X`` of ``X`` (``samples x in``) has rank ``<= min(samples, in)``, so ``k_in <= samples``; and
    ``C_out = W C_in W^T = (X W^T)^T (X W^T)`` has rank ``<= min(samples, out)``, so ``k_out <= samples`` (the side
    ``optimal`` factors on: its rank is at most the count of ``C_out``'s non-zero eigenvalues). The utilized rank
    ``min(k_in, k_out)`` is then at most ``min(samples, in, out)``: the samples bound it exactly when
    ``samples < min(in, out)``, and the utilization reads at most ``samples / min(in, out)`` however the model uses
    the layer. A layer with ``min(in, out) <= samples < in`` (a wide-input projection) has a capped input side
    (``k_in <= samples < in``, what ``data``'s input projection sees) but its utilized rank can still reach
    ``min(in, out)``: it is not flagged."""
    return samples < min(in_features, out_features)


@dataclass(frozen=True)
class LayerReport:
    """One analyzed layer (the contract's ``report.json`` row); ``saved_rank`` is the rank the saved
    compressed model holds (``None``: dense there), present only in the reports ``compress`` writes."""

    name: str
    kind: str
    in_features: int
    out_features: int
    kernel_size: list[int] | None
    k_in: int
    k_out: int
    rank: int
    full_rank: int
    weight_rank: int
    utilization: float
    params_dense: int
    params_factored: int
    samples: int | None = None  # rows of input the statistics saw (tokens, a conv's output pixels); None: older file
    sample_bounded: bool | None = None  # ``sample_bounded(samples, in, out)``: the rank is capped by the samples
    saved_rank: int | None = None


@dataclass(frozen=True)
class Report:
    """``report.json``: per-layer utilized ranks at ``energy`` and the MLU; ``skipped`` maps each layer
    left out to the reason. ``saved`` (compress only) holds the parameter counts of the saved model.
    ``mlu_unbounded`` is the MLU over the layers whose rank the samples do not bound (``sample_bounded``)."""

    model: str
    dataset: str
    energy: float
    tokens: int
    mlu: float
    layers: tuple[LayerReport, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)
    saved: Mapping[str, int] | None = None

    def layer(self, name: str) -> LayerReport:
        return next(r for r in self.layers if r.name == name)

    @property
    def bounded(self) -> tuple[LayerReport, ...]:
        """The layers whose utilized rank their sample count bounds (``sample_bounded``)."""
        return tuple(r for r in self.layers if r.sample_bounded)

    @property
    def mlu_unbounded(self) -> float | None:
        """The mean utilization of the layers the samples do not bound: the MLU as a property of the model where
        the plain one mixes in layers that read low because they saw too few samples. None where every layer is
        bounded, or the report predates sample counts."""
        if any(r.sample_bounded is None for r in self.layers):
            return None
        free = [r.utilization for r in self.layers if not r.sample_bounded]
        return sum(free) / len(free) if free else None

    def sample_notes(self, mark: str = "") -> tuple[str, ...]:
        """One line on the layers the samples bound and the MLU without them, or nothing where none is bounded
        (the compress summary's note; the table's warning, with ``mark``: how its rows show them)."""
        bounded = self.bounded
        if not bounded:
            return ()
        free, others = self.mlu_unbounded, len(self.layers) - len(bounded)
        tightest = min(bounded, key=lambda r: r.samples / r.full_rank)
        marked = f" (marked {mark})" if mark else ""
        return (f"{len(bounded)} of {len(self.layers)} layers{marked} saw fewer samples (tokens or pixels) than their "
                f"full rank min(in, out), so their utilized rank is at most their sample count: a property of the data "
                f"more than of the model (tightest: {tightest.name}, {tightest.samples:,} samples, full rank "
                f"{tightest.full_rank}); MLU {self.mlu:.3f} with them, "
                + (f"{free:.3f} over the other {others}" if free is not None else "no other layer"),)

    @property
    def params_dense(self) -> int:
        return sum(r.params_dense for r in self.layers)

    @property
    def params_factored(self) -> int:
        return sum(r.params_factored for r in self.layers)

    def with_saved_ranks(self, ranks: Mapping[str, int], params: Mapping[str, int]) -> Report:
        """This report with the ranks of the saved model per layer (absent: dense) and its parameter
        counts (``{"dense": ..., "compressed": ...}``, the whole model's)."""
        layers = tuple(replace(r, saved_rank=ranks.get(r.name)) for r in self.layers)
        return replace(self, layers=layers, saved=dict(params))

    def to_dict(self) -> dict:
        layers = []
        for r in self.layers:
            row = asdict(r)
            if self.saved is None:
                row.pop("saved_rank")
            layers.append(row)
        doc = {"format": REPORT_FORMAT, "model": self.model, "dataset": self.dataset, "energy": self.energy,
               "tokens": self.tokens, "mlu": self.mlu, "mlu_unbounded": self.mlu_unbounded, "layers": layers,
               "skipped": [{"name": n, "reason": r} for n, r in self.skipped.items()]}
        if self.saved is not None:
            doc["saved"] = dict(self.saved)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping) -> Report:
        if doc.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a {REPORT_FORMAT} document")
        return cls(doc["model"], doc["dataset"], doc["energy"], doc["tokens"], doc["mlu"],
                   tuple(LayerReport(**r) for r in doc["layers"]),
                   {s["name"]: s["reason"] for s in doc["skipped"]}, doc.get("saved"))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Report:
        path = Path(path)
        try:
            return cls.from_dict(read_json(path, "report", "report"))
        except SchemaError:
            raise  # names the file and the field already
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"report {path}: {exc}") from exc


def select_layers(stats: Statistics, keep: Callable[[str], bool]) -> Statistics:
    """The statistics of the layers whose name ``keep`` accepts (the commands' ``--include`` / ``--exclude``), the
    others listed as skipped: a report of a subset of the layers from the same pass (or saved file), without
    eigendecomposing the layers left out."""
    left_out = [n for n in stats.layers if not keep(n)]
    return Statistics({n: s for n, s in stats.layers.items() if keep(n)},
                      [*stats.skipped, *({"name": n, "reason": "excluded by filter"} for n in left_out)],
                      stats.batches, stats.meta)


def build_report(model: nn.Module, stats: Statistics, subspaces: Subspaces, energy: float = 0.99) -> Report:
    """The report of ``subspaces`` (from ``stats``) at ``energy``."""
    modules = dict(model.named_modules())
    rows = []
    skipped = {s["name"]: s["reason"] for s in stats.skipped}
    skipped.update(subspaces.skipped)
    for name, sub in subspaces.items():
        s = stats.layers[name]
        k_in, k_out = sub.ranks(energy)
        if k_in == 0 or k_out == 0:
            skipped[name] = "its inputs or outputs are all zero on the data"
            continue
        rank, full_rank = min(k_in, k_out), min(s.in_features, s.out_features)
        bias = 0 if getattr(modules[name], "bias", None) is None else s.out_features
        params_dense = s.in_features * s.out_features + bias
        params_factored = rank * (s.in_features + s.out_features) + bias
        rows.append(LayerReport(
            name, s.kind, s.in_features, s.out_features, s.conv["kernel_size"] if s.conv else None,
            k_in, k_out, rank, full_rank, numerical_rank(sub.weight), rank / full_rank, params_dense,
            params_factored if factored_pays(rank, s.in_features, s.out_features) else params_dense,
            s.tokens, sample_bounded(s.tokens, s.in_features, s.out_features),
        ))
    mlu = sum(r.utilization for r in rows) / len(rows) if rows else 0.0
    return Report(stats.meta.get("model", type(model).__name__), stats.meta.get("dataset", ""), energy, stats.tokens,
                  mlu, tuple(rows), skipped)


def _samples_cell(r: LayerReport) -> str:
    """A row's sample count, marked where it bounds the rank (``-``: a report from before sample counts)."""
    if r.samples is None:
        return "-"
    return f"{r.samples:,}{BOUNDED_MARK if r.sample_bounded else ' '}"


def format_table(report: Report) -> str:
    """The terminal table: one row per analyzed layer under its full name with the samples its statistics saw
    (marked where they bound its rank), then the skipped layers, the MLU, and the MLU over the layers the samples
    do not bound with a warning where any is bounded."""
    saved = report.saved is not None
    width = max([len("layer"), *(len(r.name) for r in report.layers), *(len(n) for n in report.skipped)])
    cells = [_samples_cell(r) for r in report.layers]
    sw = max([len("samples") + 1, *(len(c) for c in cells)])
    head = (f"{'layer':<{width}} {'kind':<6} {'in':>6} {'out':>6} {'k_in':>5} {'k_out':>5} {'rank':>5} {'W rank':>6} "
            f"{'util':>6} {'samples ':>{sw}}" + (f" {'saved':>6}" if saved else ""))
    lines = [head, "-" * len(head)]
    for r, cell in zip(report.layers, cells, strict=True):
        line = (f"{r.name:<{width}} {r.kind[:6]:<6} {r.in_features:>6} {r.out_features:>6} {r.k_in:>5} "
                f"{r.k_out:>5} {r.rank:>5} {r.weight_rank:>6} {r.utilization:>6.1%} {cell:>{sw}}")
        if saved:
            line += f" {r.saved_rank if r.saved_rank is not None else 'dense':>6}"
        lines.append(line)
    for name, reason in report.skipped.items():
        lines.append(f"{name:<{width}} skipped: {reason}")
    free = report.mlu_unbounded
    beside = (f" ({free:.3f} over the {len(report.layers) - len(report.bounded)} not bounded by their samples)"
              if report.bounded and free is not None else "")
    lines.append(
        f"MLU {report.mlu:.3f}{beside} at energy {report.energy} over {len(report.layers)} layers, {report.tokens:,} "
        f"tokens; analyzed weights {report.params_dense:,} -> {report.params_factored:,} at the utilized ranks"
    )
    if report.bounded:
        lines.append("warning: " + report.sample_notes(BOUNDED_MARK)[0])
    elif report.mlu_unbounded is not None:
        lines.append("no layer's rank is bounded by its samples (each saw at least min(in, out) tokens or pixels)")
    if saved:
        lines.append(f"saved model: {report.saved['dense']:,} -> {report.saved['compressed']:,} parameters "
                     "('saved': the rank each layer holds in model.safetensors)")
    return "\n".join(lines)
