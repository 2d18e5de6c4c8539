"""Small models with calibration batches, their statistics and subspaces: the compression tests' cases."""

import torch
from _models import ConvNet, TokenMLP
from timm.models.vision_transformer import VisionTransformer

from utilrank_kernels import collect_stats, compute_subspaces
from utilrank_kernels.analysis import build_report

VIT_KWARGS = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
CASES = {
    "linear": (TokenMLP, lambda g, n: torch.randn(n, 6, 12, generator=g)),
    "conv": (ConvNet, lambda g, n: torch.randn(n, 3, 12, 10, generator=g)),
    "vit": (lambda: VisionTransformer(**VIT_KWARGS), lambda g, n: torch.randn(n, 1, 16, 16, generator=g)),
}


def rel_err(y, ref) -> float:
    return ((y - ref).norm() / ref.norm()).item()


class Case:
    """A model (random init, eval mode), its calibration batches, statistics and subspaces."""

    def __init__(self, name: str, batches: int = 4, batch_size: int = 4):
        self.name = name
        torch.manual_seed(0)
        make_model, make_batch = CASES[name]
        self.model = make_model().eval()
        g = torch.Generator().manual_seed(0)
        self.batches = [make_batch(g, batch_size) for _ in range(batches)]
        self.stats = collect_stats(self.model, self.batches, progress=False)
        self.subspaces = compute_subspaces(self.model, self.stats, progress=False)

    def report(self, energy: float):
        return build_report(self.model, self.stats, self.subspaces, energy)
