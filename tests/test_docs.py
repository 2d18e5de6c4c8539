"""docs/design.md describes the code as it is: every module is in its layout, every file format it names is
the code's, and the README links it."""

import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import utilrank_kernels

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(utilrank_kernels.__file__).parent
DESIGN = (ROOT / "docs" / "design.md").read_text()


def _layout() -> str:
    blocks = DESIGN.split("## 5. Layout", 1)[1].split("## 6.", 1)[0].split("```")[1::2]
    return next(b for b in blocks if b.lstrip().startswith("utilrank_kernels/"))  # the tree, after the layers


def test_every_module_is_in_the_layout():
    layout = _layout()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and rel.parent != Path("."):
            continue  # a package is listed by its folder
        folder, name = rel.parent.as_posix(), rel.name
        block = layout if folder == "." else layout.split(f"  {folder}/", 1)[-1] if f"  {folder}/" in layout else ""
        if not block or not re.search(rf"\b{re.escape(name if folder == '.' else name)}\b", block):
            missing.append(rel.as_posix())
    assert not missing, f"modules missing from docs/design.md's layout: {missing}"


def test_every_format_named_is_the_codes():
    named = set(re.findall(r"utilrank\.[a-z_]+/\d+", DESIGN))
    in_code = set()
    for path in PACKAGE.rglob("*.py"):
        in_code |= set(re.findall(r"utilrank\.[a-z_]+/\d+", path.read_text()))
    assert named <= in_code, f"formats in docs/design.md that the code does not write: {named - in_code}"
    files = {"report", "plan", "stats", "subspaces", "manifest", "config", "summary", "bench", "spectrum", "soup"}
    assert {f"utilrank.{f}/1" for f in files} <= named


def test_readme_links_the_design():
    assert "docs/design.md" in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# README and docs/*.md: the paths, links, benchmark names and Python names they mention exist
# ---------------------------------------------------------------------------------------------
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("benchmarks", "tests", "utilrank_kernels", "docs", ".ci", "csrc")  # the repository's folders
ARGUMENTS = {"filter_fn"}  # callables the pages show being called that are arguments, not the package's names
# classes the pages name that are other libraries'
FOREIGN_CLASSES = {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoModelForSequenceClassification",
                   "BatchEncoding", "Conv2dSame", "DistributedDataParallel", "FlopCounterMode", "MatMul", "StdConv2d"}
FILE_SUFFIXES = (".py", ".md", ".sh", ".json", ".cpp", ".cu", ".h", ".toml", ".csv", ".png")


def _text(path: Path) -> str:
    """A page's text; design.md without its layout block (test_every_module_is_in_the_layout checks that one)."""
    text = path.read_text()
    if path.name == "design.md" and "## 5. Layout" in text:
        before, after = text.split("## 5. Layout", 1)
        text = before + after.split("\n## ", 1)[-1]
    return text


def _ticked_words(text: str) -> list[str]:
    return [w.strip("()[],;:") for span in re.findall(r"`([^`\n]+)`", text) for w in span.split()]


def _subpackages() -> set[str]:
    return {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def _path_problem(word: str) -> str | None:
    """None where ``word`` is not a repository path or names files that exist; else what is wrong."""
    if "/" not in word or word.startswith(("../", "/", "$", "~")):
        return None
    first = word.split("/", 1)[0]
    base = ROOT if first in TOP else PACKAGE if first in _subpackages() else None
    if base is None:
        return None
    if not (word.endswith("/") or word.endswith(FILE_SUFFIXES)):
        return None  # a Python name such as compress/factor.layer_factors: test_python_names_exist's
    pattern = re.sub(r"<[^>]+>", "*", word.rstrip("/"))
    return None if list(base.glob(pattern)) else f"{word} (no {base.relative_to(ROOT.parent)}/{pattern})"


def test_every_path_mentioned_exists():
    missing = [f"{page.name}: {problem}" for page in DOCS for word in _ticked_words(_text(page))
               if (problem := _path_problem(word))]
    assert not missing, f"paths that are not in the repository: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


def test_every_link_resolves():
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists() or (anchor and anchor not in _anchors(dest)):
                broken.append(f"{page.name}: {target}")
    assert not broken, f"links to nothing: {broken}"


def test_readme_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in DOCS[1:] if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"docs the README does not link: {unlinked}"


def test_every_environment_variable_named_is_read():
    from utilrank_kernels.env import VARIABLES

    named = {(page.name, v) for page in DOCS for v in re.findall(r"\bUTILRANK_[A-Z0-9_]+", page.read_text())}
    unknown = sorted(f"{page}: {v}" for page, v in named if v not in VARIABLES)
    assert not unknown, f"environment variables utilrank_kernels/env.py does not list: {unknown}"


def _benchmark_registry() -> dict:
    spec = importlib.util.spec_from_file_location("_benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module.REGISTRY


def test_every_benchmark_named_is_the_runners():
    registry = _benchmark_registry()
    named = {(page.name, name) for page in DOCS
             for name in re.findall(r"benchmarks/run\.py\s+([a-z][\w-]*)", _text(page).replace("\n", " "))}
    unknown = sorted(f"{page}: {name}" for page, name in named if name not in registry)
    assert not unknown, f"`python benchmarks/run.py NAME` with a NAME the runner does not list: {unknown}"


def _package_names() -> set[str]:
    """Every attribute of every module of the package (what a page may name)."""
    names = set()
    for info in pkgutil.walk_packages([str(PACKAGE)], "utilrank_kernels."):
        if info.name.split(".")[-1] == "_C":
            continue
        try:
            names |= set(vars(importlib.import_module(info.name)))
        except ModuleNotFoundError as exc:  # the Triton kernels' modules where triton is not installed
            if exc.name != "triton":
                raise
    return names | set(vars(utilrank_kernels))


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _python_names(page: Path) -> tuple[list[str], list[str]]:
    """(dotted names the page uses, bare function or class names it names), from its code and its ticks."""
    text = _text(page)
    dotted = []
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for module, names in re.findall(r"^from (utilrank_kernels[\w.]*) import (.+)$", block, flags=re.M):
            dotted += [f"{module}.{n.strip()}" for n in names.split("#")[0].split(",")]
    # "`utilrank_kernels.ops` (`covariance_update`, `lowrank_linear`)": names in that module
    for module, listed in re.findall(r"`(utilrank_kernels[\w.]*)`\s*\(((?:\s*`\w+`,?)+)\)", text):
        dotted += [f"{module}.{n}" for n in re.findall(r"`(\w+)`", listed)]
    ticks = " ".join(re.findall(r"`([^`\n]+)`", text))
    dotted += re.findall(r"\b(utilrank_kernels(?:\.\w+)+)", ticks)
    subpackages = "|".join(sorted(_subpackages()))
    dotted += [f"utilrank_kernels.{p}.{m}.{n}" for p, m, n in re.findall(rf"\b({subpackages})/(\w+)\.(\w+)", ticks)
               if not f".{n}".endswith(FILE_SUFFIXES)]
    named = re.findall(r"(?<![\w.])([a-z]\w*_\w+|[A-Z][a-z]+[A-Z]\w*)\(", ticks)
    named += [s for s in re.findall(r"`([^`\n]+)`", text) if re.fullmatch(r"[A-Z][a-z0-9]+[A-Z]\w*", s)]
    return [d for d in dotted if "._C" not in d], named  # _C: the optional compiled extension


def test_python_names_exist():
    known = _package_names()
    missing = []
    for page in DOCS:
        dotted, named = _python_names(page)
        missing += [f"{page.name}: {d}" for d in dotted if not _resolves(d)]
        missing += [f"{page.name}: {n}" for n in named if n not in known | ARGUMENTS | FOREIGN_CLASSES]
    assert not missing, f"names the docs use that the package does not have: {sorted(set(missing))}"


@pytest.mark.slow
def test_the_stages_example_runs_as_written(tmp_path):
    """docs/python.md's example; trains the built-in model where the session's cache does not hold it yet."""
    example = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "python.md").read_text(), flags=re.S).group(1)
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=os.environ.copy(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "layers factored" in done.stdout and (tmp_path / "plan.json").is_file()
