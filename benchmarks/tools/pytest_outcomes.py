"""A pytest plugin that writes each test's outcome the moment it is known, one JSON line each, to the file named by
``UTILRANK_TEST_OUTCOMES``: ``gpu_run.py``'s tests step loads it (``-p benchmarks.tools.pytest_outcomes``) so
that a run stopped at its time limit still leaves its counts (JUnit XML and the terminal summary are written only
at the end). Under pytest-xdist only the controller writes (it receives every worker's reports, a crashed
worker's test included).

Lines: ``{"collected": n}``; ``{"nodeid", "when", "outcome", "seconds", "message"}`` per reported phase that
decides the outcome (every call phase, and a setup or teardown that did not pass); ``{"exitstatus": n}`` last.
"""

from __future__ import annotations

import json
import os

import pytest

ENV = "UTILRANK_TEST_OUTCOMES"


class _Writer:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the session; one flushed line each)

    def line(self, **fields) -> None:
        self.file.write(json.dumps(fields) + "\n")


_writer: _Writer | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _writer
    path = os.environ.get(ENV)
    if path and not hasattr(config, "workerinput"):  # an xdist worker reports to the controller instead
        _writer = _Writer(path)


def pytest_collection_finish(session: pytest.Session) -> None:
    if _writer is not None:
        _writer.line(collected=len(session.items))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    if _writer is not None:
        _writer.line(collected=len(ids))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _writer is None or (report.when != "call" and report.passed):
        return
    message = ""
    if report.failed:
        text = str(report.longrepr or "").strip().splitlines()
        message = text[-1][:300] if text else ""
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])[:300]
    _writer.line(nodeid=report.nodeid, when=report.when, outcome=report.outcome,
                 seconds=round(report.duration, 3), message=message)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _writer is not None:
        _writer.line(exitstatus=int(exitstatus))


def counts(path: str | os.PathLike) -> dict:
    """passed / failed / errors / skipped / not_run (collected but never reported) and the failures' node ids
    with their last line, from the file the plugin wrote; a test counts once, by its worst phase (a failing
    setup or teardown is an error, as pytest counts it; a failing call, or a crashed xdist worker, a failure)."""
    collected, exitstatus, outcome, messages = None, None, {}, {}
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    with open(path) as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if "collected" in line:
                collected = max(collected or 0, line["collected"])
            elif "exitstatus" in line:
                exitstatus = line["exitstatus"]
            else:
                fixture = line["when"] in ("setup", "teardown")
                got = "error" if line["outcome"] == "failed" and fixture else line["outcome"]
                nodeid = line["nodeid"]
                if rank[got] >= rank.get(outcome.get(nodeid, "passed"), 0):
                    outcome[nodeid] = got
                    messages[nodeid] = line.get("message", "")
    tally = {k: sum(v == k for v in outcome.values()) for k in ("passed", "failed", "error", "skipped")}
    failures = [f"{n}: {messages[n]}" for n, v in outcome.items() if v in ("failed", "error")]
    return {"collected": collected, "passed": tally["passed"], "failed": tally["failed"], "errors": tally["error"],
            "skipped": tally["skipped"], "not_run": None if collected is None else collected - len(outcome),
            "exitstatus": exitstatus, "failures": failures[:50]}
