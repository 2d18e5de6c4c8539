"""``collect_stats`` on dict batches (a tokenizer's ``BatchEncoding``): the model is called with ``**batch`` and the
padding mask comes from ``attention_mask``, so a padded batch's statistics are those of its sequences unpadded."""

import pytest
import torch

pytest.importorskip("transformers")

from _hf import WORDS, bert_config, make_tokenizer  # noqa: E402

from utilrank_kernels.analysis import collect_stats  # noqa: E402
from utilrank_kernels.layers import find_layers  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog", "red blue green model layer rank data text line word fast slow",
         "it", " ".join(WORDS[:30]), "run fast"]


@pytest.fixture(scope="module")
def bert_and_tokenizer(tmp_path_factory):
    from transformers import BertModel

    torch.manual_seed(0)
    model = BertModel(bert_config()).double().eval()  # fp64: padding must not move a real token's activations
    return model, make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def unpadded_reference(model, tokenizer) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """fp64 ``sum_t x_t x_t^T`` and token counts of every Linear's input, each sequence run alone (no padding)."""
    layers, _ = find_layers(model)
    covs = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    tokens = dict.fromkeys(layers, 0)

    def hook(name):
        def record(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            covs[name] += x.T @ x
            tokens[name] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad():
        for text in TEXTS:
            model(**tokenizer(text, return_tensors="pt"))
    for h in handles:
        h.remove()
    return covs, tokens


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=["int64", "int32", "bool"])
def test_padded_batch_statistics_equal_unpadded_sequences(bert_and_tokenizer, dtype, one_thread):
    model, tokenizer = bert_and_tokenizer
    covs, tokens = unpadded_reference(model, tokenizer)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")  # a BatchEncoding, int64 attention_mask
    assert not batch["attention_mask"].all()  # the batch really pads
    batch["attention_mask"] = batch["attention_mask"].to(dtype)
    # two batches of 3 (dicts) and the whole batch (the BatchEncoding itself) give the same sums
    halves = [{k: v[i : i + 3] for k, v in batch.items()} for i in (0, 3)]
    for batches in ([batch], halves):
        stats = collect_stats(model, batches, progress=False)
        assert stats.layers.keys() == covs.keys()
        assert "pooler.dense" in stats.layers and "encoder.layer.0.attention.self.query" in stats.layers  # own names
        for name, s in stats.layers.items():
            assert s.tokens == tokens[name], name  # pooler: one row per sequence (2-D input, unmasked)
            # per-batch products are fp32 (the ops' contract), summed in fp64
            assert relative_error(s.cov, covs[name]) < 1e-5, name


def test_padding_counted_without_the_mask(bert_and_tokenizer, one_thread):
    """What the mask prevents: the same batch with every pad token counted differs from the reference."""
    model, tokenizer = bert_and_tokenizer
    covs, tokens = unpadded_reference(model, tokenizer)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    stats = collect_stats(model, [batch], mask_fn=lambda b: torch.ones_like(b["attention_mask"]), progress=False)
    query = "encoder.layer.0.attention.self.query"
    assert stats.layers[query].tokens == batch["input_ids"].numel() > tokens[query]
    assert relative_error(stats.layers[query].cov, covs[query]) > 0.05


def test_labelled_dict_batches(bert_and_tokenizer, one_thread):
    """``(dict, labels)`` tuples, as a DataLoader over labelled text yields them: the labels are not inputs."""
    model, tokenizer = bert_and_tokenizer
    covs, _ = unpadded_reference(model, tokenizer)
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    stats = collect_stats(model, [(batch, torch.zeros(len(TEXTS), dtype=torch.long))], progress=False)
    assert all(relative_error(s.cov, covs[n]) < 1e-5 for n, s in stats.layers.items())
