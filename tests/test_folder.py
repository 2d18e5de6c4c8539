"""Output folders as a unit: the manifest, the file mode, refusals before any compute, kill -9, one run per folder
(the lock), symbolic links, and the schemas of the files a folder holds."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from utilrank_kernels._files import file_mode
from utilrank_kernels._folder import FolderError, OutputFolder, verify_manifest


def _write(folder: OutputFolder, files: dict) -> None:
    for name, text in files.items():
        folder.path(name).parent.mkdir(parents=True, exist_ok=True)
        folder.path(name).write_text(text)


def test_commit_writes_a_manifest_and_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "out"
    first = OutputFolder(out, "analyze").prepare()
    _write(first, {"a.json": "1", "sub/b.png": "2", "stats.ckpt.safetensors": "scratch"})
    first.commit(argv=["analyze"])
    doc = verify_manifest(out)
    assert doc["command"] == "analyze" and set(doc["files"]) == {"a.json", "sub/b.png"}
    assert not (out / "stats.ckpt.safetensors").exists() and not first.partial.exists()
    with pytest.raises(FolderError, match="holds files made by utilrank analyze; --force replaces"):
        OutputFolder(out, "compress").prepare()
    second = OutputFolder(out, "compress", force=True).prepare()
    _write(second, {"c.json": "3"})
    second.commit(argv=[])
    assert sorted(p.name for p in out.iterdir()) == ["c.json", "manifest.json"]  # nothing of the first is left
    (out / "c.json").write_text("changed")
    with pytest.raises(FolderError, match="c.json differs from the manifest"):
        verify_manifest(out)


def test_files_get_the_umask_mode_and_unwritable_folders_are_refused(tmp_path):
    from utilrank_kernels._files import write_json

    write_json(tmp_path / "x.json", {})
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == file_mode() == 0o666 & ~_umask()
    with pytest.raises(FolderError, match="cannot write there"):
        OutputFolder("/proc/utilrank-out", "analyze").prepare()
    (tmp_path / "file").write_text("")
    with pytest.raises(FolderError, match="exists and is not a folder"):
        OutputFolder(tmp_path / "file", "analyze").prepare()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _analyze(out, kill_at=None, *extra):
    env = {**os.environ, "UTILRANK_TEST_KILL_AT": kill_at or ""}
    code = ("import sys; from utilrank_kernels.cli import main; "
            f"sys.exit(main(['analyze', '--model', 'vit-digits', '--max-batches', '2', '--out', {str(out)!r}, "
            f"*{list(extra)!r}]))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def previous_folder(tmp_path_factory):
    """A finished ``analyze`` folder, its report marked so that it can be told from a new one."""
    out = tmp_path_factory.mktemp("previous") / "out"
    done = _analyze(out)
    assert done.returncode == 0, done.stderr
    (out / "report.json").write_text(json.dumps({"marker": "previous"}))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"].pop("report.json")  # keep the previous folder consistent with its manifest
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after-statistics", "before-manifest", "before-swap", "after-swap"])
def test_kill_9_leaves_the_previous_folder_or_the_new_one(tmp_path, previous_folder, point):
    """``kill -9`` at any point of writing leaves either the previous folder, untouched, or the complete new
    one (its manifest verifies), never a mix; the next run starts over cleanly."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(previous_folder, out)
    before = {p.name for p in out.iterdir()}
    killed = _analyze(out, point, "--force")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    verify_manifest(out)
    previous = json.loads((out / "report.json").read_text()).get("marker") == "previous"
    assert previous == (point in ("after-statistics", "before-manifest", "before-swap")), point
    assert {p.name for p in out.iterdir()} == before
    if point == "before-swap":  # a leftover OUT.partial: the next run replaces it and finishes
        again = _analyze(out, None, "--force")
        assert again.returncode == 0, again.stderr
        assert "marker" not in json.loads((out / "report.json").read_text())
        verify_manifest(out)


# ---------------------------------------------------------------------------------------------
# One run per folder: the lock, what a refused or failed run leaves, symbolic links
# ---------------------------------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    first = OutputFolder(out, "analyze").prepare()
    assert (tmp_path / "out.lock").read_text().strip() == str(os.getpid())
    with pytest.raises(FolderError, match=rf"--out {out}: another utilrank run \(pid {os.getpid()}\) is writing it"):
        OutputFolder(out, "compress", force=True).prepare()
    assert first.partial.is_dir()  # the refused run touched nothing of the first one's
    _write(first, {"a.json": "1"})
    first.commit(argv=[])
    assert not (tmp_path / "out.lock").exists() and not first.partial.exists()  # released: the lock file removed
    OutputFolder(out, "compress", force=True).prepare().release(failed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    (tmp_path / "out.lock").write_text("999999\n")  # kill -9 leaves the file; nobody holds its lock
    folder = OutputFolder(tmp_path / "out", "analyze").prepare()
    assert (tmp_path / "out.lock").read_text().strip() == str(os.getpid())
    folder.release(failed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_run_leaves_what_was_there(tmp_path):
    """A refused or failed run removes its partial folder and the folders it made, and brings back an earlier run's
    leftover partial folder (which a run that succeeds replaces); one with a checkpoint to resume is kept."""
    out = tmp_path / "new" / "out"
    OutputFolder(out, "analyze").prepare().release(failed=True)
    assert not (tmp_path / "new").exists()
    leftover = tmp_path / "out.partial"
    leftover.mkdir()
    (leftover / "stats.ckpt.safetensors").write_text("an interrupted run's checkpoint")
    failed = OutputFolder(tmp_path / "out", "analyze").prepare()  # no --resume: this run starts over ...
    assert not any(failed.partial.iterdir())
    assert failed.release(failed=True) == ""  # ... and fails: the leftover is back
    assert (leftover / "stats.ckpt.safetensors").read_text() == "an interrupted run's checkpoint"
    resumed = OutputFolder(tmp_path / "out", "analyze", resume=True).prepare()
    assert resumed.release(failed=True) == "" and (leftover / "stats.ckpt.safetensors").is_file()
    checkpointed = OutputFolder(tmp_path / "out", "analyze").prepare()
    checkpointed.path("stats.ckpt.safetensors").write_text("this run's checkpoint")
    assert "--resume continues" in checkpointed.release(failed=True)
    assert (leftover / "stats.ckpt.safetensors").read_text() == "this run's checkpoint"
    done = OutputFolder(tmp_path / "out", "analyze").prepare()
    _write(done, {"a.json": "1"})
    done.commit(argv=[])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_with_releases_the_folder_as_failed_where_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "out", "analyze").prepare() as folder:
        _write(folder, {"a.json": "1"})
        raise RuntimeError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["folder", "missing"])
def test_a_symlinked_out_is_written_at_its_target_and_the_link_kept(tmp_path, target):
    real = tmp_path / "real"
    if target == "folder":
        previous = OutputFolder(real, "analyze").prepare()
        _write(previous, {"old.json": "1"})
        previous.commit(argv=[])
    link = tmp_path / "link"
    link.symlink_to(real)
    if target == "folder":
        with pytest.raises(FolderError, match=rf"--out {link} \(a link to {real}\): holds files made by"):
            OutputFolder(link, "compress").prepare()
    folder = OutputFolder(link, "compress", force=True).prepare()
    assert folder.partial == tmp_path / "real.partial"
    _write(folder, {"new.json": "2"})
    assert folder.commit(argv=[]) == real
    assert link.is_symlink() and link.readlink() == real and not (tmp_path / "link.partial").exists()
    assert sorted(p.name for p in link.iterdir()) == ["manifest.json", "new.json"]
    verify_manifest(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_free_space_is_refused_naming_the_folder(tmp_path, monkeypatch):
    import shutil

    folder = OutputFolder(tmp_path / "out", "analyze").prepare()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5 << 20))
    with pytest.raises(FolderError, match=rf"--out {tmp_path / 'out'}: 5 MiB free on its disk, this run writes about"):
        folder.require_space(1 << 20)
    folder.release(failed=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two ``utilrank compress`` processes into one ``--out``: the first holds the folder (it waits before its commit
    until the second has ended), the second starts while it does. Returns the folder and both processes' results."""
    from _data import make_imagefolder

    from utilrank_kernels.cli import main

    root = tmp_path_factory.mktemp("two-runs")
    data = make_imagefolder(root / "data", per_class=3)
    out, ready, go = root / "out", root / "ready", root / "go"
    argv = ["compress", "--model", "test_vit", "--data", str(data), "--finetune-epochs", "0", "--engines", "eager",
            "--no-search", "--out", str(out)]
    held = (f"import pathlib, sys, time\nfrom utilrank_kernels import _folder\ncommit = _folder.OutputFolder.commit\n"
            f"def waiting(self, *args, **kwargs):\n    pathlib.Path({str(ready)!r}).touch()\n"
            f"    while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n"
            f"    return commit(self, *args, **kwargs)\n_folder.OutputFolder.commit = waiting\n"
            f"from utilrank_kernels.cli import main\nsys.exit(main({argv!r}))")
    first = subprocess.Popen([sys.executable, "-c", held], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):
            if ready.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), first.communicate()
        second = io.StringIO()  # the second run: this process
        with contextlib.redirect_stderr(second), contextlib.redirect_stdout(io.StringIO()):
            second_code = main(argv)
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    return out, (first.pid, first.returncode, stdout, stderr), (second_code, second.getvalue())


def test_two_compress_runs_into_one_folder_leave_one_complete_folder_and_one_refusal(two_runs):
    """The second run is refused in one line naming the first one's pid; the folder the first commits loads, and
    nothing else is left beside it."""
    from utilrank_kernels import load_compressed

    out, (pid, code, stdout, stderr), second = two_runs
    assert code == 0 and f"wrote {out}/" in stdout, stderr
    lines = second[1].strip().splitlines()
    assert second[0] == 2 and len(lines) == 1, second[1]
    assert lines[0].startswith(f"utilrank compress: error: --out {out}: another utilrank run (pid {pid}) is writing")
    verify_manifest(out)
    load_compressed(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["data", "go", "out", "ready"]


def test_the_files_compress_writes_read_back_through_their_schemas(two_runs, tmp_path):
    """plan.json, config.json, manifest.json, report.json, summary.json and the statistics header as the current
    code writes them pass their schemas; the same documents with a field of the wrong type do not."""
    from utilrank_kernels._files import SchemaError, read_json
    from utilrank_kernels.analysis import Statistics

    out = two_runs[0]
    schemas = {"plan.json": "plan", "config.json": "config", "manifest.json": "manifest", "report.json": "report",
               "summary.json": "summary"}
    for name, schema in schemas.items():
        assert read_json(out / name, schema) == json.loads((out / name).read_text()), name
    assert Statistics.load(out / "stats.safetensors").layers
    wrong = {"report.json": ("mlu", 1.5, "field mlu: expected <= 1, got 1.5"),
             "summary.json": ("finetune_epochs", True, "field finetune_epochs: expected an integer, got true"),
             "manifest.json": ("files", [], "field files: expected an object, got an array []")}
    for name, (field, value, words) in wrong.items():
        doc = json.loads((out / name).read_text())
        doc[field] = value
        (tmp_path / name).write_text(json.dumps(doc))
        with pytest.raises(SchemaError, match=re.escape(f"{tmp_path / name}: {words}")):
            read_json(tmp_path / name, schemas[name])
    report = json.loads((out / "report.json").read_text())
    report["layers"][0]["rank"] = "3"
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(SchemaError, match=r"field layers\[0\]\.rank: expected an integer, got \"3\""):
        read_json(tmp_path / "report.json", "report")
