"""Output folders as a unit: the manifest, the file mode, refusals before any compute, and kill -9."""

import json
import os
import signal
import subprocess
import sys

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
