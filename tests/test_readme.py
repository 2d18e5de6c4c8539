"""The README is a front page that stays true: at most 200 lines with the Python API on its first screen; the
quick start has exactly two commands, and CI runs the second verbatim; every Python block runs as written; every
number of its results table is a committed result's, and it says what varies by machine."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MACHINE = "Intel(R) Xeon(R) Processor"  # the results table's machine, named above it


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    commands = re.findall(r"```bash\n(.*?)\n```", _section("Quick start"), flags=re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert commands[0].endswith("utilrank compress")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_a_front_page_with_python_on_its_first_screen():
    lines = README.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to docs/"
    start = lines.index("```python")
    end = lines.index("```", start + 1)
    assert end < 50 and end - start - 1 <= 12, f"the Python example runs from line {start + 1} to {end + 1}"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.slow
def test_every_python_block_runs_as_written(tmp_path):
    """Every ```python block of the README, in order, as a reader pastes them into one session. Trains the built-in
    model where the session's cache does not hold it yet (conftest's UTILRANK_CACHE)."""
    blocks = _python_blocks()
    assert blocks, "the README has no Python example"
    script = "\n".join(f"{block}\nprint('--- block {i} ran')" for i, block in enumerate(blocks))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=os.environ.copy(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(f"--- block {i} ran" in done.stdout for i in range(len(blocks))), done.stdout[-3000:]
    assert "'compressed':" in done.stdout and (tmp_path / "utilrank-out" / "python-vit-digits" / "plan.json").is_file()


def test_the_python_blocks_are_python():
    """Cheap guard for the slow test: each block at least compiles, and names only the package's public faces."""
    for block in _python_blocks():
        compile(block, "README.md", "exec")
        assert "utilrank_kernels._" not in block and ".compress.pipeline" not in block


# ---------------------------------------------------------------------------------------------
# the results table
# ---------------------------------------------------------------------------------------------
def _bench_rows() -> list[dict]:
    """Each committed compressed row of a ``utilrank.bench/1`` file with its dense twin's step time."""
    rows = []
    for path in sorted((ROOT / "benchmarks").rglob("*.json")):
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != "utilrank.bench/1":
            continue
        dense = {}
        for row in doc["rows"]:
            key = (row.get("engine"), row["batch_size"], row["dtype"], row.get("param_ratio"))
            if row.get("variant") == "dense":
                dense[key] = row
            elif row.get("variant") == "compressed" and key in dense:
                rows.append({**row, "dense": dense[key]})
    return rows


def _cut(row: dict) -> str:
    if "param_ratio" in row:
        return f"{row['param_ratio']:.0%} params"
    return "utilrank compress" + (", latency-aware" if "latency_target" in row else "")


def _shows(cell: str, value: float) -> bool:
    """``cell`` is ``value`` as printed: rounded to the cell's digits."""
    number = cell.replace(",", "").rstrip("x")
    digits = len(number.split(".")[1]) if "." in number else 0
    return abs(float(number) - value) <= 0.5 * 10**-digits + 1e-9


def _matches(cells: list[str], row: dict) -> bool:
    model, cut, params, engine, batch, dense_ms, compressed_ms, speedup, realized = cells
    before, after = params.split(" -> ")
    return (model == row["model"] and cut == _cut(row) and engine == row.get("engine") and int(batch) ==
            row["batch_size"] and row["device"].startswith(MACHINE) and _shows(before, row["dense"]["param_count"])
            and _shows(after, row["param_count"]) and _shows(dense_ms, row["dense"]["infer_step_time"])
            and _shows(compressed_ms, row["infer_step_time"]) and _shows(speedup, row["speedup"])
            and _shows(realized, row["realized_fraction"]))


def test_every_result_shown_is_a_committed_row():
    section = _section("Results")
    assert MACHINE in section and "benchmarks/run.py vit-b-engines" in section and "utilrank bench" in section
    assert "What your machine changes" in section  # one machine's table: the reader is told what will differ
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert 1 <= len(table) <= 8, f"{len(table)} rows: the README shows at most 8 (docs/results.md has them all)"
    rows = _bench_rows()
    unmatched = [line for line in table
                 if not any(_matches([c.strip() for c in line.strip("|").split("|")], row) for row in rows)]
    assert not unmatched, f"rows that no file under benchmarks/ holds: {unmatched}"
