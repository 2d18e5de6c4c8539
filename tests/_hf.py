"""Tiny random Hugging Face model folders for the tests: nothing downloaded, everything built from configs."""

import random

import torch

WORDS = ("the a of to and is in it that for on with as this be are by an or at from cat dog sat mat run fast slow "
         "red blue green model layer rank data text line word").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_tokenizer(directory):
    """A WordPiece tokenizer (BertTokenizerFast) over a vocab of a few words and every letter, saved in ``directory``:
    any lowercase text tokenizes without [UNK]."""
    from transformers import BertTokenizerFast

    vocab = SPECIAL + list(WORDS) + list(LETTERS) + [f"##{c}" for c in LETTERS]
    path = directory / "vocab.txt"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path))
    tokenizer.save_pretrained(directory)
    return tokenizer


def bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(vocab_size=len(SPECIAL) + len(WORDS) + 2 * len(LETTERS), hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return BertConfig(**{**kwargs, **overrides})


def make_bert(directory, head: str = "encoder", num_labels: int = 2, seed: int = 0):
    """A random 2-layer, 32-wide BERT saved with its tokenizer: ``BertModel`` or ``BertForSequenceClassification``."""
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    if head == "encoder":
        model = BertModel(bert_config())
    else:
        model = BertForSequenceClassification(bert_config(num_labels=num_labels))
    model.save_pretrained(directory)
    make_tokenizer(directory)
    return model.eval()


def make_vit(directory, num_labels: int = 3, image_size: int = 32, num_channels: int = 3, seed: int = 0):
    """A random 2-layer, 32-wide ``ViTForImageClassification`` with an image processor for its input size."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=8, num_channels=num_channels, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=num_labels)
    model = ViTForImageClassification(config)
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return model.eval()


def make_text(path, lines: int = 60, seed: int = 0, labels: bool = False):
    """``lines`` sentences of 1 to 20 words (so that batches pad), or ``LABEL<TAB>TEXT`` lines whose label is
    whether the sentence mentions "cat"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 20))]
        text = " ".join(words)
        rows.append(f"{int('cat' in words)}\t{text}" if labels else text)
    path.write_text("\n".join(rows) + "\n")
    return path


def _byte_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 printable stand-ins of the bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def make_byte_tokenizer(directory):
    """A byte-level BPE tokenizer (``GPT2Tokenizer``) with no merges: every byte a token, then ``<|endoftext|>``;
    like GPT-2's, it has no pad token."""
    from transformers import GPT2Tokenizer

    vocab = {c: i for i, c in enumerate(_byte_to_unicode())}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=[])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_gpt2(directory, seed: int = 0):
    """A random 2-layer, 32-wide ``GPT2LMHeadModel`` (transformers' ``Conv1D`` layers) with a byte-level
    tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=256,
                        eos_token_id=256)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory)
    make_byte_tokenizer(directory)
    return model.eval()


def make_t5_config(directory):
    """A T5 encoder-decoder's ``config.json`` alone (refused before any weight is read)."""
    from transformers import T5Config

    T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(directory)
