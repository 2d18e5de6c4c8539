"""Per-layer input second moments ``C_in = sum_t x_t x_t^T`` and their file format: the values a statistics
pass (``analysis.collect.collect_stats``) produces. Accumulators are fp64 sums, so they save, merge, all-reduce
under ``torch.distributed`` and resume from a checkpoint to exactly what one uninterrupted pass gives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from .._distributed import comm_device, process
from .._files import SchemaError, atomic_path, open_safetensors, parse_json

STATS_FORMAT = "utilrank.stats/1"


def _layer_tensors(f, keys: set[str], name: str, width: int, source: str) -> tuple[torch.Tensor, int]:
    """Layer ``name``'s accumulator (``width x width``, finite) and token count from an open statistics file."""
    for key in (f"{name}::cov", f"{name}::tokens"):
        if key not in keys:
            raise SchemaError(f"{source}: the header lists layer {name}, the file has no tensor {key}")
    cov, tokens = f.get_tensor(f"{name}::cov"), f.get_tensor(f"{name}::tokens")
    if tuple(cov.shape) != (width, width) or not cov.is_floating_point():
        raise SchemaError(f"{source}: tensor {name}::cov: expected {width} x {width} floats (in_features {width}), "
                          f"got {' x '.join(map(str, cov.shape))} {str(cov.dtype).removeprefix('torch.')}")
    if tokens.numel() != 1 or tokens.is_floating_point() or int(tokens.reshape(-1)[0]) < 0:
        raise SchemaError(f"{source}: tensor {name}::tokens: expected one integer >= 0, got {tokens.tolist()}")
    if not bool(torch.isfinite(cov).all()):
        raise SchemaError(f"{source}: tensor {name}::cov holds NaN or Inf")
    return cov, int(tokens.reshape(-1)[0])


@dataclass
class LayerStats:
    """Sufficient statistics of one layer's inputs; ``in_features`` is the covariance dimension
    (``C * kh * kw`` for a conv)."""

    name: str
    kind: str  # "linear" | "conv2d"
    in_features: int
    out_features: int
    cov: torch.Tensor  # [in_features, in_features], fp64
    tokens: int = 0
    conv: dict | None = None  # kernel_size, stride, padding, dilation, in_channels

    def meta(self) -> dict:
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "conv": self.conv}


@dataclass
class Statistics:
    layers: dict[str, LayerStats]
    skipped: list[dict] = field(default_factory=list)
    batches: int = 0
    meta: dict = field(default_factory=dict)  # model, dataset: free-form provenance

    @property
    def tokens(self) -> int:
        return max((s.tokens for s in self.layers.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(s.cov.numel() * s.cov.element_size() for s in self.layers.values())

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (safetensors) atomically: an interrupted write leaves the old file."""
        tensors = {}
        for name, s in self.layers.items():
            tensors[f"{name}::cov"] = s.cov.detach().cpu().contiguous()
            tensors[f"{name}::tokens"] = torch.tensor([s.tokens], dtype=torch.int64)
        header = {"format": STATS_FORMAT, "batches": self.batches, "skipped": self.skipped, "meta": self.meta,
                  "layers": {name: s.meta() for name, s in self.layers.items()}}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"utilrank": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Statistics:
        """Read a statistics file; its header (types and ranges, ``_schemas.StatsHeader``) and every layer's
        tensors (present, of the header's shape, finite) are checked first: ``ValueError`` naming the file and the
        field or the layer."""
        path = Path(path)
        with open_safetensors(path, "statistics", str(device)) as f:
            text = (f.metadata() or {}).get("utilrank")
            if text is None:
                raise SchemaError(f"statistics {path}: not a {STATS_FORMAT} file (no utilrank header)")
            header = parse_json(text, "statistics", f"statistics {path}")  # "field ..." of its header
            keys = set(f.keys())  # noqa: SIM118 (safe_open is not a dict)
            layers = {}
            for name, m in header["layers"].items():
                cov, tokens = _layer_tensors(f, keys, name, m["in_features"], f"statistics {path}")
                layers[name] = LayerStats(name, m["kind"], m["in_features"], m["out_features"], cov, tokens,
                                          m.get("conv"))
        return cls(layers, header.get("skipped", []), header["batches"], header.get("meta", {}))

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the first layer the statistics have and ``model`` has not, or has in
        another shape (statistics of another model)."""
        modules = dict(model.named_modules())
        who = f" (collected on {self.meta['model']})" if self.meta.get("model") else ""
        for name, s in self.layers.items():
            module = modules.get(name)
            if module is None or not hasattr(module, "weight"):
                raise ValueError(f"the statistics{who} have layer {name}, which the model does not have")
            weight = module.weight
            if weight[0].numel() != s.in_features or weight.shape[0] != s.out_features:
                raise ValueError(f"layer {name}: the statistics{who} are for a {s.out_features} x {s.in_features} "
                                 f"layer, the model's is {weight.shape[0]} x {weight[0].numel()}")

    def merge(self, other: Statistics) -> Statistics:
        """The statistics of both passes together (sums); layers must match."""
        if self.layers.keys() != other.layers.keys():
            diff = sorted(self.layers.keys() ^ other.layers.keys())
            raise ValueError(f"cannot merge statistics: layers differ ({', '.join(diff[:8])})")
        merged = {}
        for name, a in self.layers.items():
            b = other.layers[name]
            if a.cov.shape != b.cov.shape or a.kind != b.kind:
                raise ValueError(f"cannot merge statistics: layer {name} has shape {tuple(a.cov.shape)} "
                                 f"vs {tuple(b.cov.shape)}")
            merged[name] = LayerStats(name, a.kind, a.in_features, a.out_features,
                                      a.cov + b.cov.to(a.cov.device), a.tokens + b.tokens, a.conv)
        return Statistics(merged, self.skipped, self.batches + other.batches, self.meta)

    def all_reduce(self) -> None:
        """Sum the statistics over all processes of the default group, in place."""
        if process()[1] == 1:
            return
        device = comm_device()
        counts = torch.tensor([s.tokens for s in self.layers.values()] + [self.batches], dtype=torch.int64)
        for t in [counts] + [s.cov for s in self.layers.values()]:
            buf = t.to(device)
            dist.all_reduce(buf)
            if buf is not t:
                t.copy_(buf)
        for s, n in zip(self.layers.values(), counts.tolist()[:-1], strict=True):
            s.tokens = n
        self.batches = counts[-1].item()
