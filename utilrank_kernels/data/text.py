"""Text data from a local file (``--data text:FILE``), tokenized by the model folder's tokenizer.

One example per line (blank lines skipped), split 70/15/15 by ``SPLIT_SEED`` like the other datasets. A
``.tsv`` file holds labelled lines, ``LABEL<TAB>TEXT`` with an integer class id (what a sequence classifier's
accuracy and fine-tuning need); any other file is unlabelled text.

Every line is tokenized once, truncated at ``max_length`` tokens and padded to the longest line of the file, so
every example has the same length and the default collate stacks them: an example is a dict of 1-D tensors
(``input_ids``, ``attention_mask``, ...), a batch a dict of 2-D tensors (``(dict, label)`` tuples for labelled
lines). The padding is masked out of the statistics by the batch's ``attention_mask``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from .datasets import DataSplits, _split_indices

logger = logging.getLogger(__name__)
TEXT_PREFIX = "text:"
DEFAULT_MAX_LENGTH = 128


def is_text_data(data: object) -> bool:
    return isinstance(data, str) and data.startswith(TEXT_PREFIX)


class TokenizedText(Dataset):
    """Rows of a tokenizer's output (``{name: [N, T] tensor}``), with optional labels."""

    def __init__(self, encoding: dict[str, torch.Tensor], labels: torch.Tensor | None = None):
        self.encoding, self.labels = encoding, labels

    def __len__(self) -> int:
        return len(next(iter(self.encoding.values())))

    def __getitem__(self, index: int):
        row = {name: values[index] for name, values in self.encoding.items()}
        return row if self.labels is None else (row, self.labels[index])


def read_lines(path: Path) -> tuple[list[str], list[int] | None]:
    """The file's non-blank lines, and their labels for a ``.tsv`` (``LABEL<TAB>TEXT``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--data text:{path}: not UTF-8 text ({exc})") from exc
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if path.suffix != ".tsv":
        return [line for _, line in numbered], None
    texts, labels = [], []
    for number, line in numbered:
        label, tab, text = line.partition("\t")
        if not tab or not label.strip().isdigit() or not text.strip():
            raise ValueError(f"--data text:{path}: line {number} is not LABEL<TAB>TEXT with an integer label")
        texts.append(text)
        labels.append(int(label))
    return texts, labels


UNKNOWN_WARN = 0.05  # a larger fraction of [UNK] tokens is worth a line: the tokenizer may not fit the text


def _warn_unknown(path: Path, tokenizer, encoding: dict[str, torch.Tensor]) -> None:
    """A warning naming the fraction of the real tokens that are the unknown token, where it is large."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    real = encoding["attention_mask"].bool()
    fraction = float((encoding["input_ids"][real] == unk).float().mean()) if bool(real.any()) else 0.0
    if fraction > UNKNOWN_WARN:
        logger.warning(f"--data text:{path}: {fraction:.0%} of the tokens are {tokenizer.unk_token} (unknown to the "
                       "model folder's tokenizer): the statistics describe that token, not the text")


def load_text_splits(path: str | Path, tokenizer, max_length: int = DEFAULT_MAX_LENGTH) -> DataSplits:
    """``text:FILE`` (or a plain path) as train/val/test splits of ``TokenizedText``; ``num_classes`` is 0 for
    unlabelled text."""
    path = Path(str(path).removeprefix(TEXT_PREFIX)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--data text:{path}: no such file")
    if max_length < 2:
        raise ValueError(f"--max-length {max_length}: must be >= 2 (the tokenizer's special tokens)")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"--data text:{path}: the model folder's tokenizer has neither a pad token nor an "
                             "end-of-text token to pad lines with")
        # GPT-2's tokenizers have none: pad with end-of-text, which the attention mask hides
        logger.info(f"--data text:{path}: the tokenizer has no pad token; lines are padded with its end-of-text "
                    f"token {tokenizer.eos_token!r} (masked out)")
        tokenizer.pad_token = tokenizer.eos_token
    texts, labels = read_lines(path)
    minimum = 7  # the smallest count whose 70/15/15 split leaves every split non-empty
    if len(texts) < minimum:
        raise ValueError(f"--data text:{path}: {len(texts)} non-blank lines; the 70/15/15 split needs at least "
                         f"{minimum}")
    encoding = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    encoding = dict(encoding)  # a plain dict of the BatchEncoding's tensors
    truncated = int((encoding["attention_mask"].sum(1) == max_length).sum())
    _warn_unknown(path, tokenizer, encoding)
    logger.info(f"text:{path}: {len(texts)} lines, {encoding['input_ids'].shape[1]} tokens each after padding "
                f"({truncated} lines reach --max-length {max_length})")
    full = TokenizedText(encoding, None if labels is None else torch.tensor(labels, dtype=torch.long))
    train, val, test = (Subset(full, indices) for indices in _split_indices(len(texts)))
    num_classes = 0 if labels is None else max(labels) + 1
    return DataSplits(f"text:{path}", train, val, test, num_classes, in_chans=0, img_size=0)
