"""Broken Hugging Face folders (no config, a config of the wrong type, custom code, an encoder-decoder, missing or
truncated weights, a missing tokenizer or one of another vocabulary) and the options of ``export`` and ``bench``
(opsets the exporter cannot write, input sizes the model cannot take, folders that are not compressed folders,
missing packages): each refused in one line naming the input, before any statistics pass or timing, nothing
written. The custom-code cases answer "y" on standard input, as a user would to transformers' prompt: the folder's
code would write a marker file beside it, and the snapshot shows it never does."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from _bad import Bad

ANALYZE = ("analyze", "--out", "{tmp}/o")
TEXT = ("--data", "text:{tmp}/lines.txt")
# the folder's code, were it ever run: a marker file in the folder (named by its absolute path: transformers runs a
# copy of the file from its modules cache)
EVIL = """from pathlib import Path

Path({marker!r}).write_text("custom code ran")
from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = "evil"


class EvilModel(BertModel):
    config_class = EvilConfig
"""


def _bert(tmp: Path, name: str = "bert") -> Path:
    from _hf import make_bert, make_text

    make_bert(tmp / name)
    make_text(tmp / "lines.txt", 20)
    return tmp / name


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def bert(tmp: Path) -> None:
    _bert(tmp)


def bert_then(edit):
    """A tiny BERT folder with its tokenizer and a text file, then ``edit(folder)``."""
    def setup(tmp: Path) -> None:
        edit(_bert(tmp))
    return setup


def config_text(text: str):
    return bert_then(lambda folder: (folder / "config.json").write_text(text))


def custom_model_code(folder: Path) -> None:
    _edit_config(folder, model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (folder / "evil.py").write_text(EVIL.format(marker=str(folder / "MARKER")))


def custom_tokenizer_code(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL.format(marker=str(folder / "MARKER")))


def custom_class_reference(folder: Path) -> None:
    _edit_config(folder, tokenizer_class="evil.EvilTokenizer")
    (folder / "evil.py").write_text(EVIL.format(marker=str(folder / "MARKER")))


def truncate(name: str):
    def edit(folder: Path) -> None:
        path = folder / name
        os.truncate(path, path.stat().st_size // 2)
    return edit


def remove(*names: str):
    def edit(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()
    return edit


def sharded_with_a_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
                                            "pooler.dense.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def pickled_bin(folder: Path) -> None:
    """pytorch_model.bin whose pickle names a global: transformers loads it with weights_only=True, which refuses."""
    (folder / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2), "code": os.getcwd}, folder / "pytorch_model.bin")


def other_vocabulary(folder: Path) -> None:
    """The byte-level tokenizer of tests/_hf.py (257 tokens) beside a BERT of 95 embedding rows."""
    from _hf import make_byte_tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (folder / name).unlink()
    make_byte_tokenizer(folder)


def t5(tmp: Path) -> None:
    from _hf import make_t5_config, make_text

    make_t5_config(tmp / "t5")
    make_text(tmp / "lines.txt", 20)


def vit(edit=None):
    def setup(tmp: Path) -> None:
        from _data import make_imagefolder
        from _hf import make_text, make_vit

        make_vit(tmp / "vit")
        make_imagefolder(tmp / "img", per_class=2, size=16)
        make_text(tmp / "lines.txt", 20)
        if edit is not None:
            edit(tmp / "vit")
    return setup


# ---- compressed folders for export and bench ----
def vit_digits_folder(tmp: Path) -> None:
    """The built-in ViT, one block deep, every layer at 40% of its parameters (random weights)."""
    from utilrank_kernels import save_compressed
    from utilrank_kernels.bench import cut_to_ratio
    from utilrank_kernels.models import build_builtin
    from utilrank_kernels.models.builtin import VIT_DIGITS_KWARGS

    kwargs = {**VIT_DIGITS_KWARGS, "depth": 1}
    compressed, plan = cut_to_ratio(build_builtin("vit-digits", **kwargs).eval(), 0.4, multiple=1, arch="vit-digits")
    save_compressed(compressed, plan, {"arch": "vit-digits", "source": "builtin", "num_classes": 10,
                                       "model_kwargs": kwargs}, tmp / "c")


def bert_folder(tmp: Path) -> None:
    """A compressed tiny BERT whose config.json records its text input (64 tokens at most)."""
    from _hf import make_bert

    from utilrank_kernels import save_compressed
    from utilrank_kernels.bench import cut_to_ratio
    from utilrank_kernels.models import hf

    make_bert(tmp / "bert")
    model, config = hf.load_hf_model(f"hf:{tmp / 'bert'}")
    compressed, plan = cut_to_ratio(model, 0.5, multiple=1, arch=config["arch"])
    spec = hf.text_input(hf.tokenizer(f"hf:{tmp / 'bert'}"), 32)
    save_compressed(compressed, plan, {**config, "input": spec}, tmp / "c")
    shutil.rmtree(tmp / "bert")


def patched(target: str, value):
    def patch(monkeypatch, tmp: Path) -> None:
        monkeypatch.setattr(target, value)
    return patch


def missing(*names: str):
    return patched("utilrank_kernels.cli.bench.missing_packages", lambda wanted=(): [n for n in wanted if n in names])


def missing_for_export(*names: str):
    return patched("utilrank_kernels.cli.export.missing_packages", lambda wanted=(): [n for n in wanted if n in names])


def empty_folder(tmp: Path) -> None:
    (tmp / "c").mkdir()


BENCH = ("bench", "--device", "cpu", "--no-plot", "--warmup", "0", "--iters", "1", "--batch-sizes", "1")

CASES = [
    # Hugging Face folders that are not model folders, or not transformers configs
    Bad("hf-no-folder", (*ANALYZE, "--model", "hf:{tmp}/none", *TEXT), ("hf:{tmp}/none", "no config.json")),
    Bad("hf-no-config", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("hf:{tmp}/bert", "no config.json"),
        setup=bert_then(remove("config.json"))),
    Bad("hf-config-not-json", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("config.json", "not JSON"),
        setup=config_text('{"model_type": "bert",')),
    Bad("hf-config-a-list", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("config.json", "of type list"),
        setup=config_text("[1, 2]")),
    Bad("hf-config-no-model-type", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("config.json", "model_type"),
        setup=config_text('{"hidden_size": 32}')),
    Bad("hf-config-model-type-a-number", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("config.json", "model_type"),
        setup=config_text('{"model_type": 5}')),
    Bad("hf-config-architectures-a-string", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT),
        ("config.json", "architectures"), setup=bert_then(lambda f: _edit_config(f, architectures="BertModel"))),
    Bad("hf-config-unknown-model-type", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT),
        ("hf:{tmp}/bert", "not a transformers config"), setup=bert_then(lambda f: _edit_config(f, model_type="nope"))),
    # custom code: refused before transformers sees the folder, whatever the answer to its prompt
    Bad("hf-custom-code-auto-map", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT),
        ("config.json", "custom code", "auto_map"), setup=bert_then(custom_model_code), stdin="y\ny\n"),
    Bad("hf-custom-code-tokenizer", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT),
        ("tokenizer_config.json", "custom code"), setup=bert_then(custom_tokenizer_code), stdin="y\ny\n"),
    Bad("hf-custom-code-class-of-a-py-file", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT),
        ("config.json", "evil.py"), setup=bert_then(custom_class_reference), stdin="y\n"),
    # architectures not supported
    Bad("hf-encoder-decoder-t5", (*ANALYZE, "--model", "hf:{tmp}/t5", *TEXT),
        ("hf:{tmp}/t5", "encoder-decoder", "T5ForConditionalGeneration"), setup=t5),
    # weights
    Bad("hf-no-weights", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("hf:{tmp}/bert", "no weights"),
        setup=bert_then(remove("model.safetensors"))),
    Bad("hf-truncated-weights", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("model.safetensors", "not a readable"),
        setup=bert_then(truncate("model.safetensors"))),
    Bad("hf-weights-not-safetensors", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("model.safetensors",),
        setup=bert_then(lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64))),
    Bad("hf-index-names-a-missing-shard", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT),
        ("model.safetensors.index.json", "model-00002-of-00002.safetensors"),
        setup=bert_then(sharded_with_a_missing_shard)),
    Bad("hf-pickled-bin-weights", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT),
        ("pytorch_model.bin", "pickled", "safetensors"), setup=bert_then(pickled_bin)),
    # tokenizers and image processors
    Bad("hf-no-tokenizer", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT), ("hf:{tmp}/bert", "no tokenizer"),
        setup=bert_then(remove("tokenizer.json", "tokenizer_config.json", "vocab.txt"))),
    Bad("hf-tokenizer-of-another-vocabulary", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT),
        ("hf:{tmp}/bert", "257 tokens", "95 rows"), setup=bert_then(other_vocabulary)),
    Bad("hf-vit-without-image-processor", (*ANALYZE, "--model", "hf:{tmp}/vit", "--data", "{tmp}/img"),
        ("hf:{tmp}/vit", "preprocessor_config.json"), setup=vit(remove("preprocessor_config.json"))),
    Bad("hf-vit-given-text", (*ANALYZE, "--model", "hf:{tmp}/vit", *TEXT), ("--data text:", "takes images"),
        setup=vit()),
    Bad("hf-with-checkpoint", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT, "--checkpoint", "{tmp}/w.safetensors"),
        ("--checkpoint", "hf:{tmp}/bert"), setup=bert),
    Bad("hf-max-length-past-positions", (*ANALYZE, "--model", "hf:{tmp}/bert", *TEXT, "--max-length", "1000"),
        ("--max-length 1000", "64 positions"), setup=bert),
    # export: options the exporter cannot honour, folders that are not compressed folders
    Bad("export-opset-below-18", ("export", "{tmp}/c", "--opset", "7"), ("--opset 7", "18 to")),
    Bad("export-opset-past-the-converter", ("export", "{tmp}/c", "--opset", "99"), ("--opset 99", "18 to")),
    Bad("export-opset-with-exported-program", ("export", "{tmp}/c", "--opset", "18", "--format", "exported-program"),
        ("--opset", "--format onnx")),
    Bad("export-unknown-format", ("export", "{tmp}/c", "--format", "tflite"), ("--format", "tflite")),
    Bad("export-bf16-onnx", ("export", "{tmp}/c", "--dtype", "bf16"), ("--dtype bf16", "onnx")),
    Bad("export-deploy-packages-missing", ("export", "{tmp}/c"), ("--format onnx", "onnxruntime", "[deploy]"),
        patch=missing_for_export("onnxruntime")),
    Bad("export-out-is-a-folder", ("export", "{tmp}/c", "--out", "{tmp}"), ("--out {tmp}", "folder"),
        setup=vit_digits_folder),
    Bad("export-no-such-folder", ("export", "{tmp}/none"), ("{tmp}/none", "no such folder")),
    Bad("export-empty-folder", ("export", "{tmp}/c"), ("{tmp}/c", "missing model.safetensors"), setup=empty_folder),
    Bad("export-hf-model-folder", ("export", "{tmp}/bert"), ("{tmp}/bert", "missing plan.json"), setup=bert),
    # bench: input sizes, engines, folders
    Bad("bench-input-size-zero", (*BENCH, "--compressed", "{tmp}/c", "--input-size", "1,0,0"),
        ("--input-size", "'0'")),
    Bad("bench-input-size-two-numbers", (*BENCH, "--compressed", "{tmp}/c", "--input-size", "16,16"),
        ("--input-size 16,16", "C,H,W"), setup=vit_digits_folder),
    Bad("bench-input-size-other-channels", (*BENCH, "--compressed", "{tmp}/c", "--input-size", "3,16,16"),
        ("--input-size 3,16,16", "1 input channel,"), setup=vit_digits_folder),
    Bad("bench-input-size-the-model-cannot-take", (*BENCH, "--compressed", "{tmp}/c", "--input-size", "1,32,32"),
        ("--input-size 1,32,32", "does not run"), setup=vit_digits_folder),
    Bad("bench-text-input-size-of-an-image", (*BENCH, "--compressed", "{tmp}/c", "--input-size", "3,32,32"),
        ("--input-size 3,32,32", "text model"), setup=bert_folder),
    Bad("bench-text-input-past-positions", (*BENCH, "--compressed", "{tmp}/c", "--input-size", "1000"),
        ("--input-size 1000", "64 positions"), setup=bert_folder),
    Bad("bench-text-channels-last", (*BENCH, "--compressed", "{tmp}/c", "--channels-last"),
        ("--channels-last", "text model"), setup=bert_folder),
    Bad("bench-onnxruntime-missing", (*BENCH, "--compressed", "{tmp}/c", "--engine", "eager,onnxruntime"),
        ("--engine", "onnxruntime", "[deploy]"), patch=missing("onnxruntime")),
    Bad("bench-compressed-no-such-folder", (*BENCH, "--compressed", "{tmp}/none"), ("{tmp}/none", "missing")),
    Bad("bench-compressed-hf-model-folder", (*BENCH, "--compressed", "{tmp}/bert"), ("{tmp}/bert", "plan.json"),
        setup=bert),
]
