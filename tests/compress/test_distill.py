"""Fine-tuning without labels: ``compress_model`` distils the factored model from the dense one (``TrainRecipe(loss=
"auto")``: class logits for a classifier on unlabelled images, the output embedding for a text encoder), and the
distillation loss on the held-out split ends lower than without fine-tuning, with the same plan and a fixed seed."""

import pytest
import torch
from _models import ConvNet
from torch.utils.data import TensorDataset

from utilrank_kernels import CompressConfig, TrainRecipe, compress_model
from utilrank_kernels.data import DataSplits
from utilrank_kernels.metrics import OutputCosine, TopOneAgreement
from utilrank_kernels.train import distillation_error


def _compressed(model, data, epochs: int, metric, loss: str = "auto", lr: float = 3e-3, **config):
    recipe = TrainRecipe(epochs=epochs, lr=lr, batch_size=16, loss=loss)
    return compress_model(model, data, CompressConfig(method="svd", finetune=recipe, **config), metric=metric(model),
                          progress=False)


def test_unlabelled_images_are_distilled_on_logits(one_thread):
    torch.manual_seed(0)
    dense = ConvNet(c=3, classes=4).eval()
    with torch.no_grad():
        dense.head.weight.mul_(30)  # logits far apart: the dense model's classes are not all one
    g = torch.Generator().manual_seed(1)
    x = torch.randn(240, 3, 16, 16, generator=g)
    # examples without labels: (image,) tuples, as an unlabelled folder gives them
    data = DataSplits("unlabelled", TensorDataset(x[:160]), TensorDataset(x[160:200]), TensorDataset(x[200:]),
                      num_classes=4, in_chans=3, img_size=16)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    plain = _compressed(dense, data, 0, TopOneAgreement, param_fraction=0.3)
    tuned = _compressed(dense, data, 2, TopOneAgreement, param_fraction=0.3)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # the teacher is not trained
    assert plain.finetune_loss == "" and tuned.finetune_loss == "logits"
    assert plain.plan.ranks == tuned.plan.ranks
    error = lambda m: distillation_error(m, dense, data.test, "logits")  # noqa: E731
    assert error(tuned.model) < 0.5 * error(plain.model)
    assert tuned.scores["compressed"]["test"] >= plain.scores["compressed"]["test"]  # agreement with dense top-1
    with pytest.raises(ValueError, match="no labels"):  # cross-entropy needs labels, and says what to do instead
        _compressed(dense, data, 1, TopOneAgreement, loss="labels", param_fraction=0.3)


def test_a_text_encoder_is_distilled_on_its_output_embedding(tmp_path, one_thread):
    pytest.importorskip("transformers")
    from _hf import make_bert, make_text

    from utilrank_kernels.data import load_text_splits
    from utilrank_kernels.models import hf

    dense = make_bert(tmp_path / "bert")
    data = load_text_splits(make_text(tmp_path / "lines.txt", 120), hf.tokenizer(f"hf:{tmp_path / 'bert'}"), 32)
    # a pretrained-like start (1 - cos 1.6e-4 after the cut): a small step size, as fine-tuning a transformer takes
    plain = _compressed(dense, data, 0, OutputCosine, param_fraction=0.1, include=("encoder.*",))
    tuned = _compressed(dense, data, 1, OutputCosine, lr=1e-4, param_fraction=0.1, include=("encoder.*",))
    assert tuned.finetune_loss == "embedding"
    error = lambda m: distillation_error(m, dense, data.test, "embedding")  # noqa: E731
    assert error(tuned.model) < error(plain.model)
    # the embedding loss is 1 - the cosine metric, example by example: the scores say the same
    assert tuned.scores["compressed"]["test"] == pytest.approx(1 - error(tuned.model), abs=1e-5)
    assert tuned.scores["compressed"]["test"] > plain.scores["compressed"]["test"]


def test_hidden_states_distillation_lowers_their_held_out_error(tmp_path, one_thread):
    pytest.importorskip("transformers")
    from _hf import make_bert, make_text

    from utilrank_kernels.data import load_text_splits
    from utilrank_kernels.models import hf

    dense = make_bert(tmp_path / "bert")
    data = load_text_splits(make_text(tmp_path / "lines.txt", 120), hf.tokenizer(f"hf:{tmp_path / 'bert'}"), 32)
    plain = _compressed(dense, data, 0, OutputCosine, param_fraction=0.1, include=("encoder.*",))
    tuned = _compressed(dense, data, 1, OutputCosine, loss="hidden", lr=1e-4, param_fraction=0.1,
                        include=("encoder.*",))
    assert tuned.finetune_loss == "hidden"
    error = lambda m: distillation_error(m, dense, data.test, "hidden")  # noqa: E731
    assert error(tuned.model) < error(plain.model)
