"""The metrics ``compress_model(metric=...)`` takes: the output embedding, the cosine to a reference model, the top-1
agreement with it, and which metric and fine-tuning loss a model and its data allow; the distillation losses against
fp64 references."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("transformers")

from _hf import bert_config, make_text, make_tokenizer  # noqa: E402

from utilrank_kernels.data import load_text_splits  # noqa: E402
from utilrank_kernels.metrics import (  # noqa: E402
    OutputCosine,
    TopOneAgreement,
    embeddings,
    finetune_loss,
    output_embedding,
    select_metric,
)
from utilrank_kernels.train import distillation_error, distillation_loss  # noqa: E402


@pytest.fixture(scope="module")
def bert_and_text(tmp_path_factory):
    from transformers import BertModel

    root = tmp_path_factory.mktemp("metrics")
    torch.manual_seed(0)
    data = load_text_splits(make_text(root / "lines.txt", 40), make_tokenizer(root), 32)
    return BertModel(bert_config()).eval(), data


def test_mean_embedding_skips_padding(bert_and_text, one_thread):
    """The masked mean of each sequence equals the plain mean of that sequence run alone, unpadded (fp64)."""
    model, data = bert_and_text
    model = copy.deepcopy(model).double()
    rows = embeddings(model, data.test)
    for i in range(len(data.test)):
        n = int(data.test[i]["attention_mask"].sum())
        alone = {k: v[None, :n] for k, v in data.test[i].items()}
        with torch.no_grad():
            expected = model(**alone).last_hidden_state[0].mean(0)
        torch.testing.assert_close(rows[i].double(), expected, rtol=1e-6, atol=1e-6)  # rows are fp32
    assert any(int(data.test[i]["attention_mask"].sum()) < data.test[i]["input_ids"].numel()
               for i in range(len(data.test)))  # the split really pads


def test_output_cosine(bert_and_text, one_thread):
    model, data = bert_and_text
    cosine = OutputCosine(model)
    assert cosine(model, data.test) == pytest.approx(1.0, abs=1e-6)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        noisy.encoder.layer[1].output.dense.weight.add_(torch.randn_like(noisy.encoder.layer[1].output.dense.weight))
    expected = torch.nn.functional.cosine_similarity(embeddings(noisy, data.test).double(),
                                                     embeddings(model, data.test).double(), dim=-1).mean().item()
    assert cosine(noisy, data.test) == pytest.approx(expected, abs=1e-6) and expected < 0.999


def test_output_embedding_fallbacks():
    hidden = torch.randn(2, 3, 4)
    pooled = torch.randn(2, 4)
    out = SimpleNamespace(last_hidden_state=hidden, pooler_output=pooled)
    torch.testing.assert_close(output_embedding(out, None), hidden.mean(1))
    assert output_embedding(out, None, "pooler") is pooled
    assert output_embedding(SimpleNamespace(logits=pooled)) is pooled
    torch.testing.assert_close(output_embedding(hidden), hidden.flatten(1))  # a plain tensor (a timm model's logits)


def test_select_metric(bert_and_text):
    model, data = bert_and_text
    assert select_metric(None, model, data)[0] == "cosine"  # an encoder on unlabelled text
    with pytest.raises(ValueError, match="no classification head"):
        select_metric("accuracy", model, data)
    classifier = torch.nn.Linear(4, 3)
    images = SimpleNamespace(val=TensorDataset(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), name="x")
    assert select_metric(None, classifier, images)[0] == "accuracy"
    assert select_metric("cosine", classifier, images)[0] == "cosine"


def _classifier_and_noisy():
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).eval()
    noisy = copy.deepcopy(dense)
    with torch.no_grad():
        noisy[0].weight.add_(0.5 * torch.randn_like(noisy[0].weight))
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    return dense, noisy, x


def test_agreement_and_logit_cosine_equal_fp64_references():
    """On unlabelled examples ((x,) tuples): top-1 agreement and logit cosine of a perturbed classifier against the
    dense one equal the same quantities computed in fp64 from the two models' logits."""
    dense, noisy, x = _classifier_and_noisy()
    data = TensorDataset(x)
    with torch.no_grad():
        ref, got = copy.deepcopy(dense).double()(x.double()), copy.deepcopy(noisy).double()(x.double())
    agreement = (got.argmax(-1) == ref.argmax(-1)).double().mean().item()
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean().item()
    assert 0.3 < agreement < 1  # the perturbation changes some predictions, not all
    assert TopOneAgreement(dense, batch_size=64)(noisy, data) == pytest.approx(agreement, abs=1e-12)
    assert OutputCosine(dense, batch_size=64)(noisy, data) == pytest.approx(cosine, abs=1e-6)
    assert TopOneAgreement(dense)(dense, data) == 1.0


def test_distillation_losses_equal_fp64_references():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    for temperature in (1.0, 2.5):
        p, q = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
        kl = (q * (q.log() - p.log())).sum(-1).mean().item() * temperature**2
        assert distillation_loss(s, t, "logits", temperature=temperature).item() == pytest.approx(kl, rel=1e-5)
    hidden_s, hidden_t = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    pooled = lambda h: torch.stack([h[i, : int(mask[i].sum())].double().mean(0) for i in range(3)])  # noqa: E731
    expected = (1 - torch.nn.functional.cosine_similarity(pooled(hidden_s), pooled(hidden_t), dim=-1)).mean().item()
    got = distillation_loss(SimpleNamespace(last_hidden_state=hidden_s), SimpleNamespace(last_hidden_state=hidden_t),
                            "embedding", mask)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # hidden: the embedding loss plus the mean over layers of ||h - t||^2 / ||t||^2 over the real tokens
    layers_s = [torch.randn(3, 4, 6, generator=g) for _ in range(2)]
    layers_t = [torch.randn(3, 4, 6, generator=g) for _ in range(2)]
    real = mask.bool()
    relative = [((a.double() - b.double())[real] ** 2).sum() / (b.double()[real] ** 2).sum()
                for a, b in zip(layers_s, layers_t, strict=True)]
    got = distillation_loss(SimpleNamespace(last_hidden_state=hidden_s, hidden_states=tuple(layers_s)),
                            SimpleNamespace(last_hidden_state=hidden_t, hidden_states=tuple(layers_t)), "hidden", mask)
    assert got.item() == pytest.approx(expected + torch.stack(relative).mean().item(), abs=1e-6)
    # the held-out error: the example-weighted mean of the batch losses, whatever the batch size
    dense, noisy, x = _classifier_and_noisy()
    with torch.no_grad():
        whole = distillation_loss(noisy(x), dense(x), "logits").item()
    assert distillation_error(noisy, dense, TensorDataset(x), "logits", batch_size=64) == pytest.approx(whole, rel=1e-5)


def test_finetune_loss_follows_the_model_and_the_data(bert_and_text):
    encoder, text = bert_and_text
    classifier = torch.nn.Linear(4, 3)
    labelled = SimpleNamespace(train=TensorDataset(torch.randn(5, 4), torch.zeros(5, dtype=torch.long)), name="x")
    unlabelled = SimpleNamespace(train=TensorDataset(torch.randn(5, 4)), name="folder")
    assert finetune_loss("auto", classifier, labelled) == "labels"
    assert finetune_loss("auto", classifier, unlabelled) == "logits"
    assert finetune_loss("auto", encoder, text) == "embedding"
    assert finetune_loss("logits", classifier, labelled) == "logits"  # distillation ignores the labels
    assert finetune_loss("embedding", classifier, unlabelled) == "embedding"
    with pytest.raises(ValueError, match="folder has no labels.*--distill logits"):
        finetune_loss("labels", classifier, unlabelled)
    with pytest.raises(ValueError, match="no classification head.*--distill embedding"):
        finetune_loss("logits", encoder, text)
    with pytest.raises(ValueError, match="choose one of"):
        finetune_loss("soft", classifier, labelled)
    assert finetune_loss("hidden", encoder, text) == "hidden"  # asked for by name, never auto
    with pytest.raises(ValueError, match="Linear is not a Hugging Face model"):
        finetune_loss("hidden", classifier, unlabelled)


def test_agreement_needs_class_logits(bert_and_text):
    model, data = bert_and_text
    with pytest.raises(ValueError, match="--metric agreement.*no classification head"):
        select_metric("agreement", model, data)
    classifier = torch.nn.Linear(4, 3)
    unlabelled = SimpleNamespace(val=TensorDataset(torch.randn(5, 4)), name="folder")
    assert select_metric("agreement", classifier, unlabelled)[0] == "agreement"
    with pytest.raises(ValueError, match="use --metric cosine or agreement"):
        select_metric("accuracy", classifier, unlabelled)
