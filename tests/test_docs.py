"""docs/design.md describes the code as it is: every module is in its layout, every file format it names is
the code's, and the README links it."""

import re
from pathlib import Path

import utilrank_kernels

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(utilrank_kernels.__file__).parent
DESIGN = (ROOT / "docs" / "design.md").read_text()


def _layout() -> str:
    return DESIGN.split("## 5. Layout", 1)[1].split("```", 2)[1]


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
