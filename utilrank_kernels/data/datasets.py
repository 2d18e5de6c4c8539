"""Built-in ``digits`` and user ImageFolder data, as train/val/test splits.

``digits`` is scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 16x16 and standardized,
split 70/15/15 by a fixed seed. An ImageFolder directory ``DIR`` is used as ``DIR/train``,
``DIR/val`` (and ``DIR/test``) when those folders exist; otherwise ``DIR`` itself is split 70/15/15
by the same seed. A directory of images without class folders is unlabelled (``UnlabelledImages``: examples are
images alone, split the same way; ``num_classes`` is the pretrained head's, or 0). Images get timm's eval transforms
for the model.

A pretrained head is kept where the class folders name its classes (``head_labels``): folders named by class index
(``0`` .. ``999``), by WordNet id (``n01440764``) of the ImageNet label space of the head's size (timm's synset
lists, in index order), or mapped by a ``--label-map`` JSON file (folder name -> head index). Each image's label is
then the head's index of its folder, and the splits have the head's number of classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate
from tqdm.auto import tqdm

from .._files import read_json
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
    # how the class folders map to a pretrained head's classes ("" where the labels are the folders' order)
    head_labels: str = ""


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


def _verify_images(root, paths: list[str]) -> None:
    """Open and verify every image of a folder before any compute (a truncated or non-image file would otherwise
    stop a long pass midway, with PIL's message and no file name)."""
    from PIL import Image

    if len(paths) > VERIFY_LIMIT:
        logger.info(f"{root}: {len(paths)} images, more than {VERIFY_LIMIT}: each is checked when read")
        return
    for path in tqdm(paths, desc=f"check images in {Path(root).name}", unit="image", leave=False,
                     disable=len(paths) < 2000):
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
    _verify_images(root, [path for path, _ in folder.samples])
    return folder


class UnlabelledImages(Dataset):
    """The images directly in a folder without class folders, in name order: examples are images alone (no labels:
    the metrics compare with the dense model, fine-tuning distils from it)."""

    def __init__(self, root: Path, transform):
        from torchvision.datasets.folder import IMG_EXTENSIONS  # torchvision: only for image folders

        self.root, self.transform = root, transform
        self.paths = sorted(str(p) for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not self.paths:
            raise ValueError(f"--data: {root}: no class folders and no images ({', '.join(IMG_EXTENSIONS)})")
        _verify_images(root, self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(_read_image(self.paths[i]))


def _has_class_folders(root: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())


def _imagenet_synsets(head_classes: int) -> list[str] | None:
    """The WordNet ids of the ImageNet label space with ``head_classes`` classes, in index order (timm's lists:
    ImageNet-1k, -12k, -22k, ...), or None where no ImageNet subset has that many classes."""
    import timm.data  # timm: seconds to import, only for an ImageFolder

    subset = timm.data.infer_imagenet_subset({"num_classes": head_classes})
    return timm.data.ImageNetInfo(subset).label_names() if subset else None


def _is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def head_labels(classes: list[str], head_classes: int, label_map: str | Path | None = None,
                where: str = "") -> tuple[list[int], str] | None:
    """The head's class index of each class folder (``classes``, in ImageFolder's order) and how it was found, or
    None where the folders name no classes of the head (the labels are then the folders' order).

    ``label_map``: a JSON object of folder name -> head index; every folder must be in it (more names are fine: a
    map of the whole label space for a folder of some classes). Otherwise folders named by index (``0`` ..
    ``head_classes - 1``), or by WordNet id of the ImageNet subset with ``head_classes`` classes. A ``ValueError``
    names the folder that does not fit a map, or an index beyond the head."""
    if label_map is not None:
        mapping = read_json(label_map, "label_map", "--label-map")
        absent = [c for c in classes if c not in mapping]
        if absent:
            raise ValueError(f"--label-map {label_map}: class folder {absent[0]!r} of --data {where} is not in it "
                             f"({len(absent)} of {len(classes)} folders are not)")
        beyond = next((c for c in classes if mapping[c] >= head_classes), None)
        if beyond is not None:
            raise ValueError(f"--label-map {label_map}: {beyond!r} -> {mapping[beyond]}, beyond the head's "
                             f"{head_classes} classes (0 .. {head_classes - 1})")
        return [mapping[c] for c in classes], f"--label-map {label_map}"
    if all(c.isdigit() and c.isascii() for c in classes):
        indices = [int(c) for c in classes]
        if max(indices) >= head_classes:
            raise ValueError(f"--data {where}: class folder {classes[indices.index(max(indices))]!r} is named by "
                             f"an index beyond the head's {head_classes} classes (0 .. {head_classes - 1}); give "
                             "--label-map FILE or --num-classes N")
        return indices, "class folders named by the head's class index"
    if all(_is_wnid(c) for c in classes):
        synsets = _imagenet_synsets(head_classes)
        index = {wnid: i for i, wnid in enumerate(synsets or [])}
        unknown = [c for c in classes if c not in index]
        if synsets and not unknown:
            return [index[c] for c in classes], f"class folders named by WordNet id ({head_classes}-class ImageNet)"
        logger.info(f"--data {where}: class folders look like WordNet ids, but "
                    + (f"{unknown[0]} is not one of the {head_classes}-class ImageNet's" if synsets else
                       f"no ImageNet label space has {head_classes} classes")
                    + "; the labels are the folders' order")
    return None


def _keep_head(folders: list, root: Path, head_classes: int | None, label_map) -> str:
    """Relabel ``folders`` (ImageFolders) by the head's index of each class folder where their names (or
    ``label_map``) name the head's classes; how they were mapped, or "" where they were not (labels stay the
    folders' order). train/, val/ and test/ may then hold different classes: each label is the head's."""
    if not head_classes:
        return ""
    names = sorted({c for folder in folders for c in folder.classes})
    mapped = head_labels(names, head_classes, label_map, str(root))
    if mapped is None:
        return ""
    index = dict(zip(names, mapped[0], strict=True))
    for folder in folders:
        folder.samples = [(path, index[folder.classes[target]]) for path, target in folder.samples]
        folder.imgs = folder.samples
        folder.targets = [target for _, target in folder.samples]
        folder.class_to_idx = {name: index[name] for name in folder.classes}
    logger.info(f"--data {root}: {mapped[1]}: labels are the indices of the pretrained {head_classes}-class head")
    return mapped[1]


def load_imagefolder_splits(root: str | Path, model: torch.nn.Module | None = None, *, transform=None,
                            img_size: int | None = None, head_classes: int | None = None,
                            label_map: str | Path | None = None) -> DataSplits:
    """Images get timm's eval transforms for ``model``, or ``transform`` (and its ``img_size``) where given (an
    HF model folder's image processor, a torchvision model's recipe).

    ``head_classes``: the classes of a pretrained head to keep where the class folders name them (``head_labels``;
    ``label_map``: a JSON file of folder name -> head index); the labels are then the head's indices and
    ``num_classes`` is ``head_classes``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such directory")
    if label_map is not None and head_classes is None:
        raise ValueError(f"--label-map {label_map}: maps class folders to a pretrained head's classes, and there is "
                         "none to keep: give the model's --checkpoint (a classifier)")
    if transform is None:
        import timm.data  # timm: seconds to import, only for a timm model's transforms

        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        img_size = timm.data.resolve_data_config({}, model=model)["input_size"][-1]
    elif img_size is None:
        raise ValueError("load_imagefolder_splits: a transform needs its img_size")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = _image_folder(root / "train", transform)
        val = _image_folder(root / "val", transform)
        has_test = (root / "test").is_dir()
        test = _image_folder(root / "test", transform) if has_test else val
        test_split = "test" if has_test else "val"
        mapped = _keep_head([train, val] + ([test] if has_test else []), root, head_classes, label_map)
        if not mapped and (val.classes != train.classes or test.classes != train.classes):
            raise ValueError(f"--data {root}: train/, val/ and test/ must have the same class folders")
    elif not _has_class_folders(root):  # a folder of images: unlabelled
        if label_map is not None:
            raise ValueError(f"--label-map {label_map}: --data {root} has no class folders to map (a folder of "
                             "unlabelled images)")
        full = UnlabelledImages(root, transform)
        tr, va, te = _split_indices(len(full))
        logger.info(f"--data {root}: {len(full)} images without class folders: unlabelled (scores compare with the "
                    "dense model; fine-tuning distils from it)")
        return DataSplits(str(root), Subset(full, tr), Subset(full, va), Subset(full, te), head_classes or 0, 3,
                          img_size)
    else:
        full = _image_folder(root, transform)
        tr, va, te = _split_indices(len(full))
        train, val, test = Subset(full, tr), Subset(full, va), Subset(full, te)
        train.classes = full.classes
        test_split = "test"
        mapped = _keep_head([full], root, head_classes, label_map)
    num_classes = head_classes if mapped else len(train.classes)
    return DataSplits(str(root), train, val, test, num_classes, 3, img_size, test_split, head_labels=mapped)


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
