"""Built-in ``digits`` and user ImageFolder data, as train/val/test splits.

``digits`` is scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 16x16 and standardized,
split 70/15/15 by a fixed seed. An ImageFolder directory ``DIR`` is used as ``DIR/train``,
``DIR/val`` (and ``DIR/test``) when those folders exist; otherwise ``DIR`` itself is split 70/15/15
by the same seed. Images get timm's eval transforms for the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate
from tqdm.auto import tqdm

from .batch import ModelInput, model_input

logger = logging.getLogger(__name__)
SPLIT_SEED = 0
DIGITS_SIZE = 16
DIGITS_MEAN, DIGITS_STD = 0.3, 0.4  # of the upsampled images scaled to [0, 1]


@dataclass
class DataSplits:
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    # where the test split comes from: "test" (its own images) or "val" (an ImageFolder without test/:
    # test accuracy is then measured on the split the rank search tuned on, and every summary says so)
    test_split: str = "test"
    augment: bool = False  # whether fine-tuning should use random shifts (the built-in digits)


def _split_indices(n: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_train, n_val = int(0.7 * n), int(0.15 * n)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def load_digits_splits() -> DataSplits:
    from sklearn.datasets import load_digits  # scikit-learn: a second to import, only for the digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = (images - DIGITS_MEAN) / DIGITS_STD
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, val, test = _split_indices(len(labels))
    full = TensorDataset(images, labels)
    return DataSplits(
        "digits", Subset(full, train), Subset(full, val), Subset(full, test), 10, 1, DIGITS_SIZE, augment=True
    )


VERIFY_LIMIT = 20_000  # images checked up front (header and chunks, ~0.1 ms each); beyond, checked as read


def _read_image(path: str):
    """torchvision's image loader, whose failures name the file."""
    from torchvision.datasets.folder import default_loader  # torchvision and PIL: only for ImageFolder data

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError is an OSError
        raise ValueError(f"--data: {path}: not a readable image ({exc})") from exc


def _verify_images(folder) -> None:
    """Open and verify every image of an ImageFolder before any compute (a truncated or non-image file
    would otherwise stop a long pass midway, with PIL's message and no file name)."""
    from PIL import Image

    if len(folder.samples) > VERIFY_LIMIT:
        logger.info(f"{folder.root}: {len(folder.samples)} images, more than {VERIFY_LIMIT}: each is checked when read")
        return
    for path, _ in tqdm(folder.samples, desc=f"check images in {Path(folder.root).name}", unit="image",
                        leave=False, disable=len(folder.samples) < 2000):
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"--data: {path}: not a readable image ({exc})") from exc


def _image_folder(root: Path, transform):
    from torchvision.datasets import ImageFolder  # only for ImageFolder data

    try:
        folder = ImageFolder(root, transform=transform, loader=_read_image)
    except (FileNotFoundError, OSError) as exc:  # no class folders, or none with images
        raise ValueError(f"--data: {root}: {exc}") from exc
    _verify_images(folder)
    return folder


def load_imagefolder_splits(root: str | Path, model: torch.nn.Module | None = None, *, transform=None,
                            img_size: int | None = None) -> DataSplits:
    """Images get timm's eval transforms for ``model``, or ``transform`` (and its ``img_size``) where given (an
    HF model folder's image processor)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such directory")
    if transform is None:
        import timm.data  # timm: seconds to import, only for a timm model's transforms

        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        img_size = timm.data.resolve_data_config({}, model=model)["input_size"][-1]
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = _image_folder(root / "train", transform)
        val = _image_folder(root / "val", transform)
        has_test = (root / "test").is_dir()
        test = _image_folder(root / "test", transform) if has_test else val
        test_split = "test" if has_test else "val"
        if val.classes != train.classes or test.classes != train.classes:
            raise ValueError(f"--data {root}: train/, val/ and test/ must have the same class folders")
    else:
        full = _image_folder(root, transform)
        tr, va, te = _split_indices(len(full))
        train, val, test = Subset(full, tr), Subset(full, va), Subset(full, te)
        train.classes = full.classes
        test_split = "test"
    in_chans = 3
    return DataSplits(str(root), train, val, test, len(train.classes), in_chans, img_size, test_split)


def load_data(data: str | None, model: torch.nn.Module | None = None) -> DataSplits:
    """``None`` or ``"digits"``: the built-in set; anything else: an ImageFolder directory."""
    if data in (None, "digits"):
        return load_digits_splits()
    if model is None:
        raise ValueError("an ImageFolder dataset needs the model, for its eval transforms")
    return load_imagefolder_splits(data, model)


def example_inputs(dataset: Dataset, n: int, device: torch.device | str = "cpu") -> ModelInput:
    """The model input of the first ``n`` examples (cycling), batched as a DataLoader batches them: what a
    measurement (FLOPs, latency) calls the model on."""
    return model_input(default_collate([dataset[i % len(dataset)] for i in range(n)]), device)[0]
