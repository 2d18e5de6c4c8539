"""``layers.find_layers`` leaves out what factoring would silently change: a Linear / Conv2d subclass with its own
forward (timm's ``Conv2dSame`` pads inside it: factored, its 112x112 output became 111x111 and nothing said so),
and ``nn.MultiheadAttention``'s ``out_proj``, whose forward the attention never calls."""

import torch
from timm.layers import Conv2dSame, Linear, StdConv2d
from torch import nn
from torch.utils.data import TensorDataset

from utilrank_kernels import CompressConfig, TrainRecipe, compress_model
from utilrank_kernels.layers import find_layers


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.same = Conv2dSame(3, 8, 3, stride=2)  # "SAME" padding computed in forward
        self.std = StdConv2d(8, 8, 1)  # weight standardized in forward
        self.plain = nn.Conv2d(8, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.timm_linear = Linear(16, 12)  # timm's Linear: nn.Linear's computation
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        x = self.plain(self.std(self.same(x)))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(torch.relu(self.timm_linear(tokens.mean(1))))


def test_custom_forwards_and_attention_out_proj_are_left_out_with_their_reason():
    layers, skipped = find_layers(Mixed())
    assert list(layers) == ["plain", "timm_linear", "head"]
    assert "Conv2dSame has its own forward" in skipped["same"] and "StdConv2d has its own forward" in skipped["std"]
    assert "reads its weight directly" in skipped["attn.out_proj"]


def test_a_model_with_them_compresses_to_the_same_function_at_full_energy():
    """At energy 1 every factored layer keeps its numerical rank: the compressed model computes what the dense one
    does (fp64 reference: the dense model itself), output shapes included, with the left-out layers untouched."""
    torch.manual_seed(0)
    model = Mixed().double().eval()
    x = torch.randn(48, 3, 13, 13, dtype=torch.float64)
    data = TensorDataset(x, torch.zeros(48, dtype=torch.long))
    splits = type("Splits", (), {"train": data, "val": data, "test": data, "name": "mixed"})()
    result = compress_model(model, splits, CompressConfig(tolerance=None, energy=1.0, finetune=TrainRecipe(epochs=0)),
                            progress=False, score=False)
    assert set(result.plan.layers) <= {"plain", "timm_linear", "head"}
    assert result.model.same is not model.same and isinstance(result.model.same, Conv2dSame)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-6, atol=1e-8)
