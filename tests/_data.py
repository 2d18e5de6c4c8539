"""Small image folders for the tests."""

import numpy as np
from PIL import Image


def make_imagefolder(root, classes=("cat", "dog", "fox"), per_class=6, size=40, split=False):
    rng = np.random.default_rng(0)
    for sub in (("train", "val") if split else ("",)):
        for c, name in enumerate(classes):
            folder = root / sub / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                img[..., c] = 255  # a class-dependent color channel: learnable
                Image.fromarray(img).save(folder / f"{i}.png")
    return root
