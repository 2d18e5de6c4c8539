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
    saved_rank: int | None = None


@dataclass(frozen=True)
class Report:
    """``report.json``: per-layer utilized ranks at ``energy`` and the MLU; ``skipped`` maps each layer
    left out to the reason. ``saved`` (compress only) holds the parameter counts of the saved model."""

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
               "tokens": self.tokens, "mlu": self.mlu, "layers": layers,
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
        ))
    mlu = sum(r.utilization for r in rows) / len(rows) if rows else 0.0
    return Report(stats.meta.get("model", type(model).__name__), stats.meta.get("dataset", ""), energy, stats.tokens,
                  mlu, tuple(rows), skipped)


def format_table(report: Report) -> str:
    """The terminal table: one row per analyzed layer under its full name, then the skipped layers and the MLU."""
    saved = report.saved is not None
    width = max([len("layer"), *(len(r.name) for r in report.layers), *(len(n) for n in report.skipped)])
    head = (f"{'layer':<{width}} {'kind':<6} {'in':>6} {'out':>6} {'k_in':>5} {'k_out':>5} {'rank':>5} {'W rank':>6} "
            f"{'util':>6}" + (f" {'saved':>6}" if saved else ""))
    lines = [head, "-" * len(head)]
    for r in report.layers:
        line = (f"{r.name:<{width}} {r.kind[:6]:<6} {r.in_features:>6} {r.out_features:>6} {r.k_in:>5} "
                f"{r.k_out:>5} {r.rank:>5} {r.weight_rank:>6} {r.utilization:>6.1%}")
        if saved:
            line += f" {r.saved_rank if r.saved_rank is not None else 'dense':>6}"
        lines.append(line)
    for name, reason in report.skipped.items():
        lines.append(f"{name:<{width}} skipped: {reason}")
    lines.append(
        f"MLU {report.mlu:.3f} at energy {report.energy} over {len(report.layers)} layers, {report.tokens:,} tokens; "
        f"analyzed weights {report.params_dense:,} -> {report.params_factored:,} at the utilized ranks"
    )
    if saved:
        lines.append(f"saved model: {report.saved['dense']:,} -> {report.saved['compressed']:,} parameters "
                     "('saved': the rank each layer holds in model.safetensors)")
    return "\n".join(lines)
