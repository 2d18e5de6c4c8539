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
                   str(path), "would run code from the file", "refused", "convert it to .safetensors")


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


# ---------------------------------------------------------------------------------------------
# The top-level handler: every known input or environment failure is one line; --debug and bugs show the trace
# ---------------------------------------------------------------------------------------------
def test_debug_shows_the_traceback_of_a_known_failure(tmp_path, capsys):
    (tmp_path / "plan.json").write_text(json.dumps({"format": "utilrank.plan/1", "layers": [], "dense": {}}))
    argv = ["compress", "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "o")]
    one_line_error(capsys, argv, "--plan", "field layers: expected an object, got an array []")
    from utilrank_kernels.cli._options import UsageError

    with pytest.raises(UsageError, match="field layers"):
        main(["--debug", *argv])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # the folder given up all the same


def test_a_bug_shows_its_traceback_and_leaves_no_trace(tmp_path, monkeypatch):
    from utilrank_kernels.cli import analyze

    def buggy(args):
        from utilrank_kernels.cli._output import output_folder

        output_folder(args, "analyze")
        raise KeyError("a bug")

    monkeypatch.setattr(analyze, "run", buggy)
    with pytest.raises(KeyError, match="a bug"):
        main(["analyze", "--out", str(tmp_path / "o")])
    assert list(tmp_path.iterdir()) == []  # no OUT.partial, no OUT.lock


@pytest.mark.parametrize(("error", "line"), [
    (ImportError("No module named 'onnxruntime'", name="onnxruntime"),
     "needs the optional package onnxruntime: pip install -e '.[deploy]' (or pip install onnxruntime)"),
    (ModuleNotFoundError("No module named 'transformers.models'", name="transformers.models"),
     "needs the optional package transformers: pip install -e '.[hf]' (or pip install transformers)"),
    (ImportError("No module named 'torchvision'", name="torchvision"), None),  # a dependency: broken install, a trace
    (PermissionError(13, "Permission denied", "/srv/x.json"), "/srv/x.json: permission denied"),
    (OSError(30, "Read-only file system", "/mnt/ro/out.json"), "/mnt/ro/out.json: read-only file system"),
    (OSError(28, "No space left on device"), "no space left on the device"),
    (FileNotFoundError(2, "No such file or directory"), None),  # no path: not a file the user named
    (KeyError("x"), None),
])
def test_which_failures_are_one_line(error, line):
    from utilrank_kernels.cli import failure_line

    assert failure_line(error) == line


def _previous_analyze_folder(out):
    out.mkdir()
    (out / "report.json").write_text('{"marker": "previous"}')
    (out / "manifest.json").write_text(json.dumps({"format": "utilrank.manifest/1", "command": "analyze",
                                                   "files": {}}))
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _stats_write_fails(monkeypatch, only="stats.safetensors"):
    """The statistics file's write fails as safetensors fails on a full disk."""
    from safetensors import SafetensorError

    from utilrank_kernels.analysis import stats as stats_module

    save = stats_module.save_file

    def full(tensors, path, metadata=None):
        if f".{only}." in path:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save(tensors, path, metadata=metadata)

    monkeypatch.setattr(stats_module, "save_file", full)


def test_disk_full_during_a_run_is_one_line_and_the_previous_folder_survives(tmp_path, capsys, monkeypatch):
    data = make_imagefolder(tmp_path / "data", per_class=3)
    out = tmp_path / "o"
    previous = _previous_analyze_folder(out)
    _stats_write_fails(monkeypatch)
    code = main(["analyze", "--model", "test_vit", "--data", str(data), "--force", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"utilrank analyze: error: --out {out}: no space left on the device writing "
                           f"{out}.partial/stats.safetensors; {out} is as it was before this run"), last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "o"]  # no o.partial, no o.lock


def test_disk_full_after_a_checkpoint_keeps_it_for_resume(tmp_path, capsys, monkeypatch):
    data = make_imagefolder(tmp_path / "data", per_class=3)
    out = tmp_path / "o"
    argv = ["analyze", "--model", "test_vit", "--data", str(data), "--batch-size", "2", "--checkpoint-every", "1",
            "--out", str(out)]
    _stats_write_fails(monkeypatch)  # the checkpoints are written, the final file is not
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no space left on the device" in last and f"{out}.partial is kept: --resume continues" in last, last
    assert (tmp_path / "o.partial" / "stats.ckpt.safetensors").is_file() and not out.exists()
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert "resuming after 3 batches" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "o"]


def test_disk_full_on_a_small_tmpfs(tmp_path, capsys, monkeypatch):
    """The same on a real full disk: a 2 MiB tmpfs (needs the permission to mount one; skipped elsewhere)."""
    import subprocess

    from utilrank_kernels import _folder

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        data = make_imagefolder(tmp_path / "data", per_class=3)
        monkeypatch.setattr(_folder.OutputFolder, "require_space", lambda self, needed: None)  # past the refusal
        code = main(["analyze", "--model", "test_vit", "--data", str(data), "--out", str(disk / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert "no space left on the device writing" in err.strip().splitlines()[-1]
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
