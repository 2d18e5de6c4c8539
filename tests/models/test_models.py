"""Model building: random initializations are seeded, so built-ins train to the same weights everywhere."""

import torch

from utilrank_kernels.models.builtin import build_builtin
from utilrank_kernels.models.loading import build_model, seeded_init


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_random_init_ignores_and_keeps_the_callers_random_state():
    torch.manual_seed(1)
    first = seeded_init(build_builtin, "vit-digits")
    after_build = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_build)  # the caller's generator did not move
    torch.manual_seed(2)
    assert _same_weights(first, seeded_init(build_builtin, "vit-digits"))
    torch.manual_seed(3)
    timm_a, _ = build_model("test_vit", num_classes=3)
    torch.manual_seed(4)
    timm_b, _ = build_model("test_vit", num_classes=3)
    assert _same_weights(timm_a, timm_b)
