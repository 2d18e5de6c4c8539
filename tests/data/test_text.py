"""``text:FILE`` data: one example per line, the folder's tokenizer, a 70/15/15 split by the project's seed, dict
batches."""

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("transformers")

from _hf import make_text, make_tokenizer  # noqa: E402

from utilrank_kernels.data import load_text_splits  # noqa: E402
from utilrank_kernels.data.datasets import SPLIT_SEED  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_splits_tokens_and_batches(tmp_path, tokenizer):
    path = make_text(tmp_path / "lines.txt", 40)
    (tmp_path / "lines.txt").write_text(path.read_text().replace("\n", "\n\n", 3))  # blank lines are skipped
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    data = load_text_splits(f"text:{path}", tokenizer, max_length=12)
    assert (len(data.train), len(data.val), len(data.test)) == (28, 6, 6) and data.num_classes == 0
    # the split is the project's: a permutation from SPLIT_SEED, 70% / 15% / 15%
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    assert data.train.indices == perm[:28] and data.test.indices == perm[34:]
    example = data.val[0]
    expected = tokenizer(lines[perm[28]], truncation=True, max_length=12)["input_ids"]
    n = int(example["attention_mask"].sum())
    assert example["input_ids"][:n].tolist() == expected and (example["input_ids"][n:] == tokenizer.pad_token_id).all()
    assert example["input_ids"].shape == (12,)  # some line is longer than 12 tokens: every row is cut to 12
    batch = next(iter(DataLoader(data.train, batch_size=5)))
    assert isinstance(batch, dict) and batch["input_ids"].shape == (5, 12) and batch["attention_mask"].shape == (5, 12)


def test_short_lines_pad_to_the_longest(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("\n".join(["a", "the cat", "a dog sat", "it", "on", "a mat", "is", "to"]))
    data = load_text_splits(path, tokenizer, max_length=128)
    assert data.train[0]["input_ids"].shape == (5,)  # [CLS] a dog sat [SEP]


def test_labelled_tsv(tmp_path, tokenizer):
    path = make_text(tmp_path / "lines.tsv", 30, labels=True)
    data = load_text_splits(path, tokenizer, max_length=16)
    inputs, label = data.train[0]
    assert set(inputs) >= {"input_ids", "attention_mask"} and label.dtype == torch.long
    labels = [int(line.split("\t")[0]) for line in path.read_text().splitlines()]
    assert data.num_classes == max(labels) + 1 == 2
    assert [int(data.train[i][1]) for i in range(3)] == [labels[j] for j in data.train.indices[:3]]


@pytest.mark.parametrize("text, match", [
    pytest.param("a\nb\nc\n", "3 non-blank lines", id="too-few-lines"),
    pytest.param("0\tthe cat\nx\tdog\n" * 4, "line 2 is not LABEL<TAB>TEXT", id="bad-label"),
])
def test_errors_name_the_problem(tmp_path, tokenizer, text, match):
    path = tmp_path / ("bad.tsv" if "\t" in text else "bad.txt")
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_text_splits(path, tokenizer)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_splits(tmp_path / "missing.txt", tokenizer)
