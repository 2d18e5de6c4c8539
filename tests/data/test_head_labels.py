"""Class folders that name a pretrained head's classes: by index, by WordNet id, or by a ``--label-map`` file; the
labels become the head's indices."""

import json
import logging

import pytest
from _data import make_imagefolder

from utilrank_kernels.data.datasets import head_labels, load_imagefolder_splits


def test_folders_named_by_index_are_the_heads_indices_in_numeric_order():
    # ImageFolder sorts names as text ("10" before "2"); the label is the number, not the position
    assert head_labels(["0", "10", "2", "999"], 1000) == ([0, 10, 2, 999], "class folders named by the head's class "
                                                                           "index")


def test_wordnet_ids_are_imagenet_1k_indices():
    # known answers: tench is ImageNet-1k class 0, goldfish 1, toilet tissue 999
    mapped, how = head_labels(["n01440764", "n01443537", "n15075141"], 1000)
    assert mapped == [0, 1, 999] and "WordNet" in how


def test_wordnet_ids_of_a_head_of_no_imagenet_size_are_not_mapped(caplog):
    with caplog.at_level(logging.INFO):
        assert head_labels(["n01440764", "n01443537"], 10) is None
    assert "no ImageNet label space has 10 classes" in caplog.text


def test_a_label_map_maps_every_folder_and_may_hold_more(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"cat": 281, "dog": 207, "tench": 0}))
    assert head_labels(["cat", "dog"], 1000, tmp_path / "map.json")[0] == [281, 207]


def test_other_names_are_not_mapped():
    assert head_labels(["cat", "dog", "fox"], 1000) is None
    assert head_labels(["0", "1", "cat"], 1000) is None


def test_an_index_beyond_the_head_is_refused():
    with pytest.raises(ValueError, match="'12' is named by an index beyond the head's 10 classes"):
        head_labels(["0", "12"], 10)


@pytest.mark.parametrize("split", [False, True], ids=["one-folder", "train-val"])
def test_imagefolder_labels_are_the_heads_indices(tmp_path, split):
    import timm

    root = make_imagefolder(tmp_path / "data", classes=("3", "17", "281"), per_class=3, size=16, split=split)
    if split:  # val/ may hold some of the classes only: each label is the head's
        for path in (root / "val" / "17").iterdir():
            path.unlink()
        (root / "val" / "17").rmdir()
    splits = load_imagefolder_splits(root, timm.create_model("test_vit", pretrained=False), head_classes=1000)
    assert splits.num_classes == 1000 and "index" in splits.head_labels
    for dataset in (splits.train, splits.val, splits.test):
        for i in range(len(dataset)):
            path, label = (dataset.dataset.samples[dataset.indices[i]] if hasattr(dataset, "indices")
                           else dataset.samples[i])
            assert label == int(path.split("/")[-2])
            assert dataset[i][1] == label
    if not split:  # without a head to keep: the folders' order, as before
        without = load_imagefolder_splits(root, timm.create_model("test_vit", pretrained=False))
        assert without.num_classes == 3 and without.head_labels == ""
