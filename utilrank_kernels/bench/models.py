"""What ``utilrank bench`` times: a compressed folder and its dense twin, a synthetic cut to a parameter
ratio, or the built-in compressed in-process."""

from __future__ import annotations

import copy

from torch import nn


def ratio_plan(model: nn.Module, ratio: float, multiple: int = 16, arch: str | None = None) -> dict:
    """A plan factoring every ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) of ``model`` so that it keeps
    at most ``ratio`` of its parameters: ``r = ratio in out / (in + out)``, rounded down to a multiple
    of ``multiple`` where that takes less than 10% off ``r`` (ViT-B/16 at 0.5: fc1/fc2 307 -> 304,
    which ran 1.3x faster than 307 on a 2-core EPYC). Layers too small to save anything stay dense."""
    from ..compress import make_plan

    if not 0 < ratio < 1:
        raise ValueError(f"--param-ratio {ratio}: must be in (0, 1)")
    layers, dense = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            kind, n_in, n_out = "linear", m.in_features, m.out_features
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1:
                dense[name] = "grouped conv"
                continue
            kind, n_in, n_out = "conv2d", m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels
        else:
            continue
        exact = int(ratio * n_in * n_out / (n_in + n_out))
        rounded = exact // multiple * multiple if multiple > 1 else exact
        rank = rounded if rounded >= 0.9 * exact else exact  # small layers keep their exact rank
        if rank < 1:
            dense[name] = f"rank {exact} at ratio {ratio}: too small to factor"
            continue
        reason = f"param ratio {ratio} (rank multiple {multiple})"
        layers[name] = {"kind": kind, "rank": rank, "reason": reason}
    return make_plan(arch or type(model).__name__, layers, dense, param_ratio=ratio, rank_multiple=multiple)


def cut_to_ratio(model: nn.Module, ratio: float, multiple: int = 16,
                 arch: str | None = None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` factored per ``ratio_plan`` with random factors, MLPs fused; and the plan."""
    from ..compress import apply_plan
    from ..nn import fuse_lowrank_mlps

    plan = ratio_plan(model, ratio, multiple, arch)
    compressed = apply_plan(copy.deepcopy(model), plan)
    fuse_lowrank_mlps(compressed)
    return compressed.eval(), plan


def dense_twin(compressed: nn.Module, plan: dict, config: dict) -> nn.Module:
    """The architecture of ``config`` with every factored layer of ``compressed`` multiplied back into a
    dense weight: the dense model that computes what ``compressed`` computes."""
    from ..compress.io import _build_architecture
    from ..weightspace import dense_state_dict

    dense = _build_architecture(config)
    dense.load_state_dict(dense_state_dict(compressed, plan), strict=True)
    return dense.eval()


def compress_builtin(name: str, energy: float = 0.99) -> tuple[nn.Module, nn.Module, dict]:
    """``(dense, compressed, plan)``: the trained built-in factored in-process on its data at ``energy``."""
    from torch.utils.data import DataLoader

    from ..analysis import analyze, collect_stats
    from ..compress import decompose, make_plan, plan_ranks
    from ..data import load_data
    from ..models import build_model
    from ..nn import fuse_lowrank_mlps

    model, _ = build_model(name)
    data = load_data(None, model)
    stats = collect_stats(model, DataLoader(data.train, batch_size=128), device="cpu", progress=False)
    report, subspaces = analyze(model, stats, energy)
    layers, dense = plan_ranks(model, report, subspaces, energy=energy, progress=False)
    plan = make_plan(name, layers, dense, energy=energy)
    compressed = decompose(model, subspaces, plan)
    fuse_lowrank_mlps(compressed)
    return model.eval(), compressed.eval(), plan


def input_size(model: nn.Module, name: str, config: dict | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one input: the digits' size for built-ins, timm's pretrained config otherwise."""
    from ..models import BUILTIN_MODELS

    arch = (config or {}).get("arch", name)
    if arch in BUILTIN_MODELS:
        from ..data.datasets import DIGITS_SIZE

        kwargs = {**BUILTIN_MODELS[arch][1], **(config or {}).get("model_kwargs", {})}
        size = kwargs.get("img_size", DIGITS_SIZE)
        return kwargs.get("in_chans", 1), size, size
    import timm.data

    return tuple(timm.data.resolve_data_config({}, model=model)["input_size"])


