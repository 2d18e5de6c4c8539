"""A compressed model on disk: what is saved loads back as the same architecture with the same outputs."""

import pytest
import timm
import torch
from _cases import VIT_KWARGS
from timm.models.vision_transformer import VisionTransformer

from utilrank_kernels import Plan, collect_stats, compute_subspaces, factor_model, load_compressed
from utilrank_kernels.analysis import build_report
from utilrank_kernels.compress import LayerPlan
from utilrank_kernels.models import build_builtin
from utilrank_kernels.models.builtin import VIT_DIGITS_KWARGS
from utilrank_kernels.nn import LowRankMlp


def _compress(model, x, energy=0.95):
    stats = collect_stats(model, [x], progress=False)
    subspaces = compute_subspaces(model, stats, progress=False)
    report = build_report(model, stats, subspaces, energy)
    plan = Plan("t", {r.name: LayerPlan(r.kind, r.rank, r.k_in, r.k_out) for r in report.layers})
    return factor_model(model, plan, subspaces)


@pytest.mark.parametrize("source", ["builtin", "timm"])
def test_saved_and_loaded_models_are_the_same(tmp_path, source):
    torch.manual_seed(0)
    if source == "builtin":
        model = build_builtin("vit-digits").eval()
        config = {"arch": "vit-digits", "source": "builtin", "model_kwargs": VIT_DIGITS_KWARGS}
        x = torch.randn(3, 1, 16, 16)
    else:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=7).eval()
        config = {"arch": "vit_tiny_patch16_224", "source": "timm", "model_kwargs": {"img_size": 32, "num_classes": 7}}
        x = torch.randn(3, 3, 32, 32)
    compressed, plan = _compress(model, x)
    from utilrank_kernels import save_compressed

    save_compressed(compressed, plan, config, tmp_path)
    loaded = load_compressed(tmp_path)
    # the same architecture, module by module, and the same outputs
    assert [(n, type(m).__name__) for n, m in loaded.named_modules()] == \
        [(n, type(m).__name__) for n, m in compressed.named_modules()]
    assert not any(isinstance(m, LowRankMlp) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))
        fused = load_compressed(tmp_path, fuse_mlps=True)
        assert any(isinstance(m, LowRankMlp) for m in fused.modules())
        assert torch.allclose(fused(x), compressed(x), atol=1e-6)


def test_loaded_plan_must_fit_the_weights(tmp_path):
    model = VisionTransformer(**VIT_KWARGS).eval()
    compressed, plan = _compress(model, torch.randn(2, 1, 16, 16))
    from utilrank_kernels import save_compressed

    config = {"arch": "vit_tiny_patch16_224", "source": "timm", "model_kwargs": {}}
    save_compressed(compressed, plan, config, tmp_path)
    with pytest.raises(ValueError, match="does not fit|do not fit"):
        load_compressed(tmp_path)
