"""Utilization report (DESIGN §1 step 4, §4 ``report.json``), terminal table and plot."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .._cache import write_json
from .stats import Statistics
from .subspace import LayerSubspaces, layer_subspaces

REPORT_FORMAT = "utilrank.report/1"


def factored_pays(rank: int, in_features: int, out_features: int) -> bool:
    """A factored layer has fewer weights than the dense one only when ``r (in + out) < in * out``."""
    return rank * (in_features + out_features) < in_features * out_features


def analyze(
    model: nn.Module, stats: Statistics, energy: float = 0.99, *, progress: bool = False
) -> tuple[dict, dict[str, LayerSubspaces]]:
    """The report of ``stats`` at ``energy``, and the per-layer subspaces (reused by compression)."""
    modules = dict(model.named_modules())
    rows, skipped, subspaces = [], list(stats.skipped), {}
    for name, s in stats.layers.items():
        if name not in modules:
            raise ValueError(f"statistics name layer {name}, which the model does not have")
        if s.tokens == 0:
            skipped.append({"name": name, "reason": "saw no tokens"})
            continue
        module = modules[name]
        sub = layer_subspaces(s, module.weight)
        k_in, k_out = sub.ranks(energy)
        if k_in == 0 or k_out == 0:
            skipped.append({"name": name, "reason": "its inputs or outputs are all zero on the data"})
            continue
        subspaces[name] = sub
        rank, full_rank = min(k_in, k_out), min(s.in_features, s.out_features)
        bias = 0 if getattr(module, "bias", None) is None else s.out_features
        params_dense = s.in_features * s.out_features + bias
        params_factored = rank * (s.in_features + s.out_features) + bias
        rows.append({
            "name": name, "kind": s.kind, "in_features": s.in_features, "out_features": s.out_features,
            "kernel_size": s.conv["kernel_size"] if s.conv else None,
            "k_in": k_in, "k_out": k_out, "rank": rank, "full_rank": full_rank,
            "weight_rank": int(torch.linalg.matrix_rank(sub.weight)),
            "utilization": rank / full_rank,
            "params_dense": params_dense,
            "params_factored": (params_factored if factored_pays(rank, s.in_features, s.out_features)
                                else params_dense),
        })
    mlu = sum(r["utilization"] for r in rows) / len(rows) if rows else 0.0
    report = {
        "format": REPORT_FORMAT, "model": stats.meta.get("model", type(model).__name__),
        "dataset": stats.meta.get("dataset", ""), "energy": energy, "tokens": stats.tokens, "mlu": mlu,
        "layers": rows, "skipped": skipped,
    }
    return report, subspaces


def format_table(report: dict) -> str:
    head = (f"{'layer':<28} {'kind':<6} {'in':>6} {'out':>6} {'k_in':>5} {'k_out':>5} {'rank':>5} {'W rank':>6} "
            f"{'util':>6}")
    lines = [head, "-" * len(head)]
    for r in report["layers"]:
        lines.append(
            f"{r['name'][-28:]:<28} {r['kind'][:6]:<6} {r['in_features']:>6} {r['out_features']:>6} {r['k_in']:>5} "
            f"{r['k_out']:>5} {r['rank']:>5} {r['weight_rank']:>6} {r['utilization']:>6.1%}"
        )
    for s in report["skipped"]:
        lines.append(f"{s['name'][-28:]:<28} skipped: {s['reason']}")
    dense = sum(r["params_dense"] for r in report["layers"])
    factored = sum(r["params_factored"] for r in report["layers"])
    lines.append(
        f"MLU {report['mlu']:.3f} at energy {report['energy']} over {len(report['layers'])} layers, "
        f"{report['tokens']:,} tokens; analyzed weights {dense:,} -> {factored:,} at the utilized ranks"
    )
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    from ..plots import plot_utilization

    write_json(out_dir / "report.json", report)
    plot_utilization(report, out_dir / "utilization.png")
