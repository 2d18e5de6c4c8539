"""Bad inputs are one line naming the file, layer or option (exit 2), found before long compute; meaningless
work is refused. Each case was a traceback or a silent result before."""

import json

import pytest
import timm
import torch
from _data import make_imagefolder
from safetensors.torch import save_file

from utilrank_kernels.cli import main


def one_line_error(capsys, argv, *words):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and all(w in err[0] for w in words), err
    return err[0]


def test_truncated_safetensors_checkpoint(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(100)}, str(path))
    path.write_bytes(path.read_bytes()[:60])
    one_line_error(capsys, ["analyze", "--checkpoint", str(path), "--out", str(tmp_path / "o")],
                   str(path), "not a readable safetensors file")


class _Exploit:
    def __reduce__(self):
        import os

        return (os.getcwd, ())  # harmless, but code: the weights-only unpickler must refuse it


@pytest.mark.parametrize("content", ["text", "pickle"])
def test_files_that_need_unpickling_are_refused_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "w.pt"
    if content == "text":
        path.write_text("not a torch file\n")
    else:
        torch.save({"weight": _Exploit()}, path)
    one_line_error(capsys, ["analyze", "--checkpoint", str(path), "--out", str(tmp_path / "o")],
                   str(path), "weights_only=True", "refused")


def test_a_timm_checkpoint_on_a_builtin(tmp_path, capsys):
    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(path))
    one_line_error(capsys, ["analyze", "--checkpoint", str(path), "--out", str(tmp_path / "o")],
                   "is not a vit-digits checkpoint", "missing")


def test_a_1000_class_checkpoint_on_3_class_data_suggests_num_classes(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "data", per_class=3)
    path = tmp_path / "in1k.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=1000).state_dict(), str(path))
    one_line_error(capsys, ["analyze", "--model", "test_vit", "--checkpoint", str(path), "--data", str(data),
                            "--out", str(tmp_path / "o")], "1000-class classifier", "--num-classes 3")


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--batch-size", "-4"], ["--max-batches", "0"]])
def test_zero_or_negative_sizes_are_refused(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as info:
        main(["analyze", *option, "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err


def test_non_finite_weights_name_the_tensor(tmp_path, capsys):
    from utilrank_kernels.models import build_builtin

    state = build_builtin("vit-digits").state_dict()
    state["blocks.1.mlp.fc2.weight"][3, 4] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    one_line_error(capsys, ["analyze", "--checkpoint", str(path), "--out", str(tmp_path / "o")],
                   "blocks.1.mlp.fc2.weight holds NaN or Inf")


@pytest.mark.parametrize("damage", ["not-an-image", "truncated"])
def test_unreadable_images_name_the_file(tmp_path, capsys, damage):
    data = make_imagefolder(tmp_path / "data", per_class=3)
    bad = data / "dog" / "1.png"
    bad.write_bytes(b"hello" if damage == "not-an-image" else bad.read_bytes()[:200])
    one_line_error(capsys, ["analyze", "--model", "test_vit", "--data", str(data), "--out", str(tmp_path / "o")],
                   str(bad), "not a readable image")


def test_plan_that_is_not_json(tmp_path, capsys):
    (tmp_path / "plan.json").write_text("{oops")
    one_line_error(capsys, ["compress", "--plan", str(tmp_path / "plan.json"), "--engines", "eager", "--out",
                            str(tmp_path / "o")],
                   "--plan", "not JSON")


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    one_line_error(capsys, ["compress", "--engines", "eager", "--out", "/proc/utilrank-out"], "/proc/utilrank-out",
                   "cannot write there")


@pytest.mark.slow
def test_an_analyze_folder_is_not_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["analyze", "--max-batches", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["compress", "--engines", "eager", "--out", str(out)], "made by utilrank analyze", "--force")


def test_stats_of_another_model(tmp_path, capsys):
    data = make_imagefolder(tmp_path / "data", per_class=3)
    assert main(["analyze", "--model", "test_vit", "--data", str(data), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["compress", "--stats", str(tmp_path / "a" / "stats.safetensors"),
                            "--engines", "eager", "--out", str(tmp_path / "c")],
                   "--stats", "collected on --model test_vit")


@pytest.mark.slow
def test_resume_with_other_settings_names_the_difference(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["analyze", "--batch-size", "64", "--checkpoint-every", "1", "--max-batches", "2", "--out",
                 str(out)])
    assert code == 0
    partial = out.with_name("o.partial")
    partial.mkdir()
    # a checkpoint as an interrupted run leaves it (the finished pass's statistics, renamed)
    (out / "stats.safetensors").rename(partial / "stats.ckpt.safetensors")
    capsys.readouterr()
    one_line_error(capsys, ["analyze", "--resume", "--force", "--batch-size", "16", "--out", str(out)],
                   "--resume", "batch_size 64", "16")


def test_nan_in_a_compressed_model_and_a_wrong_arch_are_refused(tmp_path):
    from utilrank_kernels import load_compressed, save_compressed
    from utilrank_kernels.bench import cut_to_ratio
    from utilrank_kernels.models import build_builtin
    from utilrank_kernels.models.builtin import VIT_DIGITS_KWARGS

    compressed, plan = cut_to_ratio(build_builtin("vit-digits"), 0.5, multiple=1, arch="vit-digits")
    config = {"arch": "vit-digits", "source": "builtin", "model_kwargs": VIT_DIGITS_KWARGS}
    save_compressed(compressed, plan, config, tmp_path / "c")
    with torch.no_grad():
        compressed.head.weight_a[0, 0] = float("inf")
    save_compressed(compressed, plan, config, tmp_path / "nan")
    with pytest.raises(ValueError, match="head.weight_a in model.safetensors holds NaN or Inf"):
        load_compressed(tmp_path / "nan")
    doc = json.loads((tmp_path / "c" / "config.json").read_text())
    doc.update(arch="resnet18", source="timm")  # with the ViT's model_kwargs (img_size, ...)
    (tmp_path / "c" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="config.json differs from the manifest"):
        load_compressed(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="config.json: cannot build arch 'resnet18'"):
        load_compressed(tmp_path / "c")
