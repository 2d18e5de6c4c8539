"""The one training loop: pre-training the built-in models and fine-tuning compressed ones, on labels
(cross-entropy) or, without labels, by distillation from a teacher (the dense model):

- ``logits``: Hinton's KL divergence between the teacher's and the student's softened class distributions,
  ``T^2 KL(softmax(t / T) || softmax(s / T))``, for models with class logits (a classifier on unlabelled images).
- ``embedding``: ``1 - cos`` between the student's and the teacher's output embedding (``output_embedding``: the
  masked mean of ``last_hidden_state``, else ``pooler_output``, else the output), for encoders without a head; the
  quantity the ``cosine`` metric scores, so the loss is what the summary reports.
- ``hidden``: the ``embedding`` loss plus, averaged over the layers' hidden states (a Hugging Face model's
  ``hidden_states``), the relative squared error ``||h - h_teacher||^2 / ||h_teacher||^2`` over the real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, default_collate
from tqdm.auto import tqdm

from ._distributed import process
from .data.batch import call_model, model_input

LOSSES = ("labels", "logits", "embedding", "hidden")  # what fine-tuning minimises: cross-entropy, or distillation
POOLINGS = ("mean", "pooler")


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1, *,
                 rows: slice = slice(None), drawn: int | None = None) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge-padded): cheap augmentation for digits. Under
    data parallelism ``images`` are ``rows`` of a global batch of ``drawn`` images: the shifts are drawn for all of
    them and this process's rows taken, so every process's generator stays in step and the shifts are one process's."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    shifts = torch.randint(0, 2 * max_shift + 1, (drawn or n, 2), generator=generator)[rows]
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
    loss: str = "labels",
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
) -> nn.Module:
    """AdamW with a cosine schedule; deterministic for a given seed and device. ``loss``: ``labels``
    (cross-entropy with label smoothing on the batches' labels), or ``logits`` / ``embedding``: distillation from
    ``teacher`` (kept in eval mode, not trained; labels, where the data has them, are not read). The caller's
    global random state is left as it was (dropout draws from a forked generator).

    Under torchrun (an initialized process group) every process trains: data-parallel (``DistributedDataParallel``),
    each global batch of ``batch_size`` (the same shuffled order on every process) split as the statistics pass
    shards (every ``world``-th example from the rank), each process's loss weighted by its share of the batch, so
    the gradient is the whole batch's: the weights equal one process's at the same ``batch_size`` to float
    tolerance where the step does not depend on the split (no dropout, no BatchNorm in training mode: those see
    each process's examples, as under any DDP)."""
    check_loss(loss, teacher, temperature)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    objective = _Objective(loss, teacher.to(device).eval() if teacher is not None else None, temperature)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + process()[0])  # dropout: each process its own draws
        return _train(model, dataset, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                      seed=seed, augment=augment, device=device, desc=desc, objective=objective)


def check_loss(loss: str, teacher: nn.Module | None, temperature: float) -> None:
    if loss not in LOSSES:
        raise ValueError(f"fine-tuning loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if loss != "labels" and teacher is None:
        raise ValueError(f"distillation ({loss}) needs a teacher model (the dense model)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distillation temperature {temperature}: must be a finite number > 0")


@dataclass(frozen=True)
class _Objective:
    """The loss of one batch: cross-entropy on its labels, or distillation from ``teacher`` on its inputs."""

    loss: str
    teacher: nn.Module | None
    temperature: float

    def __call__(self, model: nn.Module, batch, device, transform=None) -> torch.Tensor:
        if self.loss == "labels":
            images, labels = _labelled(batch, "training")
            inputs, _ = model_input(images if transform is None else transform(images), device)
            return F.cross_entropy(logits_of(call_model(model, inputs)), labels.to(device), label_smoothing=0.1)
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs, mask = model_input(x if transform is None else transform(x), device)
        with torch.no_grad():
            target = _call(self.teacher, inputs, self.loss)
        return distillation_loss(_call(model, inputs, self.loss), target, self.loss, mask, self.temperature)


def _call(model: nn.Module, inputs, loss: str):
    """The model's output; with every layer's hidden states (``output_hidden_states``) for the ``hidden`` loss."""
    if loss != "hidden":
        return call_model(model, inputs)
    return model(**inputs, output_hidden_states=True) if isinstance(inputs, dict) else model(
        inputs, output_hidden_states=True)


def distillation_loss(student, teacher, loss: str, attention_mask: torch.Tensor | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """The batch mean of the distillation loss of ``student``'s output against ``teacher``'s (model outputs: a
    tensor or an HF output). ``logits``: ``T^2 KL(p_teacher || p_student)`` on the logits divided by ``T``;
    ``embedding``: ``1 - cos`` of the output embeddings (``attention_mask``: the tokens the mean pools)."""
    if loss == "logits":
        t = temperature
        log_p = F.log_softmax(logits_of(student).float() / t, dim=-1)
        log_q = F.log_softmax(logits_of(teacher).float() / t, dim=-1)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * t * t
    if loss in ("embedding", "hidden"):
        s, e = output_embedding(student, attention_mask), output_embedding(teacher, attention_mask)
        embedding = (1 - F.cosine_similarity(s.float(), e.float(), dim=-1)).mean()
        return embedding if loss == "embedding" else embedding + _hidden_error(student, teacher, attention_mask)
    raise ValueError(f"distillation loss {loss!r}: choose logits, embedding or hidden")


def _hidden_error(student, teacher, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over layers of ``||h - h_teacher||^2 / ||h_teacher||^2``, summed over the real tokens of the batch."""
    ours, theirs = getattr(student, "hidden_states", None) or (), getattr(teacher, "hidden_states", None) or ()
    pairs = list(zip(ours, theirs, strict=True))
    if not pairs:
        raise ValueError("distillation on hidden states: the model's output has no hidden_states (a Hugging Face "
                         "model called with output_hidden_states=True has them)")
    errors = []
    for h, t in pairs:
        h, t = h.float(), t.float()
        weight = torch.ones(t.shape[:-1], device=t.device) if attention_mask is None else attention_mask.to(t.dtype)
        errors.append((((h - t) ** 2).sum(-1) * weight).sum() / ((t**2).sum(-1) * weight).sum().clamp_min(1e-12))
    return torch.stack(errors).mean()


@torch.no_grad()
def distillation_error(model: nn.Module, teacher: nn.Module, dataset: Dataset, loss: str, *,
                       temperature: float = 1.0, batch_size: int = 256,
                       device: torch.device | str = "cpu") -> float:
    """The mean, over ``dataset``'s examples, of ``distillation_loss`` of ``model`` against ``teacher`` (0: the
    same outputs): what distillation minimises, measured on held-out data."""
    model.eval()
    teacher.eval()
    total = count = 0.0
    for batch in DataLoader(dataset, batch_size=batch_size):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs, mask = model_input(x, device)
        n = len(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)
        value = distillation_loss(_call(model, inputs, loss), _call(teacher, inputs, loss), loss, mask, temperature)
        total, count = total + value.item() * n, count + n
    if not count:
        raise ValueError("distillation error: the dataset is empty")
    return total / count


def _global_batches(dataset: Dataset, batch_size: int, generator: torch.Generator) -> BatchSampler:
    """One epoch's batches of indices, shuffled by ``generator`` (the draws ``DataLoader(shuffle=True)`` makes)."""
    return BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)


def _local_batch(dataset: Dataset, indices: list[int], rank: int, world: int):
    """This process's examples of a global batch, collated, and its share of the batch (0 where the batch has
    fewer examples than processes and none is this one's: it then runs the batch's first example at weight 0, so
    that every process takes part in the gradient's all-reduce)."""
    mine = indices[rank::world]
    return default_collate([dataset[i] for i in (mine or indices[:1])]), len(mine) / len(indices)


def _train(model, dataset, *, epochs, lr, weight_decay, batch_size, seed, augment, device, desc,
           objective: _Objective) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    rank, world = process()
    loader = _global_batches(dataset, batch_size, generator)
    # distillation trains in eval mode (dropout off, BatchNorm's running statistics kept): the target is the dense
    # model's deterministic output, and dropout's noise swamps what compression changed (the tests' tiny BERT: 0.014
    # of 1 - cos under dropout against 0.00016 without)
    model.to(device).train(objective.loss == "labels")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * len(loader))
    warmup = min(len(loader), total // 10)

    def warmup_cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    # DDP averages the processes' gradients; each loss is weighted by world x its share of the batch, so the
    # average is the whole batch's gradient (find_unused_parameters: a distillation loss may leave a pooler unused)
    step_model = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if torch.device(device).type == "cuda" else None, find_unused_parameters=True)
    with tqdm(total=total, desc=desc, unit="step", leave=False, disable=rank != 0) as bar:
        for _ in range(epochs):
            # the draw a DataLoader's iterator makes for its workers' seed, kept so that training reproduces the
            # one-process runs made before data parallelism (the cached built-ins, the measured results)
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            for indices in loader:
                batch, share = _local_batch(dataset, indices, rank, world)
                rows = slice(rank, None, world) if share else slice(0, 1)
                shift = partial(random_shift, generator=generator, rows=rows, drawn=len(indices)) if augment else None
                loss = objective(step_model, batch, device, shift)
                optimizer.zero_grad(set_to_none=True)
                (loss * (share * world)).backward()
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


def output_embedding(output, attention_mask: torch.Tensor | None = None, pooling: str = "mean") -> torch.Tensor:
    """``[B, d]``: the mean of ``last_hidden_state`` over the ``attention_mask`` (all tokens without one), else
    ``pooler_output``, else the output tensor or ``logits``; ``pooling="pooler"`` takes ``pooler_output`` first."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    if isinstance(output, torch.Tensor):
        return output.flatten(1)
    pooled = getattr(output, "pooler_output", None)
    if pooling == "pooler" and pooled is not None:
        return pooled
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        if attention_mask is None:
            return hidden.mean(1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    return pooled if pooled is not None else logits_of(output)


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
    # "labels" (cross-entropy), "logits" / "embedding" (distillation from the dense model), or "auto": the
    # caller (compress_model) picks labels where the data has them and the model a head, else distillation
    loss: str = "labels"
    temperature: float = 1.0  # of the logits distillation

    def __post_init__(self):
        if self.epochs < 0 or self.lr <= 0 or self.weight_decay < 0 or self.batch_size < 1:
            raise ValueError(f"fine-tuning recipe: epochs must be >= 0, lr > 0, weight decay >= 0 and batch size "
                             f">= 1; got {self}")
        if self.loss not in (*LOSSES, "auto"):
            raise ValueError(f"fine-tuning loss {self.loss!r}: choose one of auto, {', '.join(LOSSES)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"distillation temperature {self.temperature}: must be a finite number > 0")

    @property
    def distills(self) -> bool:
        return self.loss in ("logits", "embedding", "hidden")

    def run(self, model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu",
            desc: str = "fine-tune", teacher: nn.Module | None = None) -> nn.Module:
        """Train ``model`` on ``dataset``; ``teacher``: the model a distillation loss distils from."""
        if self.loss == "auto":
            raise ValueError("fine-tuning loss 'auto': resolve it for the model and data first "
                             "(compress_model does: metrics.finetune_loss)")
        return train(model, dataset, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                     batch_size=self.batch_size, seed=self.seed, augment=self.augment, device=device, desc=desc,
                     loss=self.loss, teacher=teacher if self.distills else None, temperature=self.temperature)


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
