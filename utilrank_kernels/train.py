"""The one training loop: pre-training the built-in models and fine-tuning compressed ones."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data.batch import call_model, model_input


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge-padded): cheap augmentation for digits."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    shifts = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts.tolist())])


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    augment: bool = False,
    device: torch.device | str = "cpu",
    desc: str = "train",
) -> nn.Module:
    """AdamW with a cosine schedule and label smoothing; deterministic for a given seed and device. The
    caller's global random state is left as it was (dropout draws from a forked generator)."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train(model, dataset, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                      seed=seed, augment=augment, device=device, desc=desc)


def _train(model, dataset, *, epochs, lr, weight_decay, batch_size, seed, augment, device, desc) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * len(loader))
    warmup = min(len(loader), total // 10)

    def warmup_cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    with tqdm(total=total, desc=desc, unit="step", leave=False) as bar:
        for _ in range(epochs):
            for batch in loader:
                images, labels = _labelled(batch, "training")
                if augment:
                    images = random_shift(images, generator)
                inputs, _ = model_input(images, device)
                loss = F.cross_entropy(logits_of(call_model(model, inputs)), labels.to(device), label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    return model.eval()


def logits_of(output) -> torch.Tensor:
    """The class logits of a model's output: the tensor itself, or an HF output's ``logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        raise ValueError(f"the model's output ({type(output).__name__}) has no class logits: an encoder without a "
                         "classification head has no accuracy and cannot be trained on labels")
    return logits


def _labelled(batch, what: str):
    """``(inputs, labels)`` of a batch (inputs: a tensor or a dict of tensors); unlabelled data is refused."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"{what} needs labelled data (batches of (inputs, labels)); this data has no labels")
    return batch[0], batch[1]


@dataclass(frozen=True)
class TrainRecipe:
    """A fine-tuning recipe (``utilrank compress --finetune-epochs/--lr/...``): ``train``'s arguments."""

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    seed: int = 0
    augment: bool = False  # random 1-pixel shifts (the built-in digits' augmentation)

    def __post_init__(self):
        if self.epochs < 0 or self.lr <= 0 or self.weight_decay < 0 or self.batch_size < 1:
            raise ValueError(f"fine-tuning recipe: epochs must be >= 0, lr > 0, weight decay >= 0 and batch size "
                             f">= 1; got {self}")

    def run(self, model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu",
            desc: str = "fine-tune") -> nn.Module:
        return train(model, dataset, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                     batch_size=self.batch_size, seed=self.seed, augment=self.augment, device=device, desc=desc)


def train_head(model: nn.Module, dataset: Dataset, head: nn.Module, *, epochs: int, lr: float = 1e-3,
               device: torch.device | str = "cpu") -> nn.Module:
    """A linear probe: only ``head``'s parameters are trained (the backbone's are frozen meanwhile)."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    try:
        train(model, dataset, epochs=epochs, lr=lr, weight_decay=0.0, device=device, desc="train the new head")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    model.eval()
    correct = total = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        inputs, labels = _labelled(batch, "accuracy")
        logits = logits_of(call_model(model, model_input(inputs, device)[0]))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
        total += labels.numel()
    if total == 0:
        raise ValueError("evaluate: the dataset is empty")
    return correct / total
