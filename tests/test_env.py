"""One list of environment variables: the package reads them only through utilrank_kernels.env, and every name
it (or its build and tests) reads is documented there."""

import re
from pathlib import Path

import utilrank_kernels
from utilrank_kernels import env

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(utilrank_kernels.__file__).parent


def test_only_env_reads_the_environment():
    readers = [p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
               if p.name != "env.py" and re.search(r"os\.environ|os\.getenv|getenv\(", p.read_text())]
    assert not readers, f"read the environment through utilrank_kernels.env: {readers}"


def test_every_variable_read_is_documented():
    sources = [*PACKAGE.rglob("*.py"), ROOT / "setup.py", *(ROOT / ".ci").iterdir(),
               *(ROOT / "benchmarks").rglob("*.py"),
               *(p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_env.py")]
    names = set()
    for path in sources:
        names |= set(re.findall(r"\"(UTILRANK_[A-Z0-9_]+)\"", path.read_text()))
    undocumented = sorted(names - env.VARIABLES.keys())
    assert not undocumented, f"add to utilrank_kernels.env.VARIABLES: {undocumented}"
    assert {"UTILRANK_CACHE", "TRITON_INTERPRET", "UTILRANK_TRITON_CONFIG"} <= set(env.VARIABLES)
    try:
        env.get("UTILRANK_NOT_A_VARIABLE")
    except KeyError as exc:
        assert "not documented" in str(exc)
    else:
        raise AssertionError("an undocumented variable must not be readable")
