"""The longest a command leaves its user without a word: runs ``utilrank ARGS`` (default: the built-in
``compress``) and times every line and progress-bar update it writes (stdout and stderr, ``\\r`` counts as
an update), then prints the longest silences with the text before them.

    UTILRANK_CACHE=$(mktemp -d) python benchmarks/run.py progress-gaps       # from an empty cache
    python benchmarks/run.py progress-gaps analyze --out /tmp/a --force
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    args = (sys.argv[1:] if argv is None else argv) or ["compress", "--out", os.path.join(tempfile.mkdtemp(), "c")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = "import sys; from utilrank_kernels.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    selector = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ)
    started = last = time.perf_counter()
    gaps: list[tuple[float, float, str]] = []  # (silence, at, text before it)
    text = ""
    open_streams = 2
    while open_streams:
        for key, _ in selector.select():
            chunk = key.fileobj.read1(65536) if hasattr(key.fileobj, "read1") else key.fileobj.read()
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            now = time.perf_counter()
            for piece in chunk.decode(errors="replace").replace("\r", "\n").split("\n"):
                if piece.strip():
                    gaps.append((now - last, now - started, text[-90:]))
                    text, last = piece.strip(), now
    proc.wait()
    gaps.sort(reverse=True)
    print(f"utilrank {' '.join(args)}: exit {proc.returncode}, {time.perf_counter() - started:.1f} s")
    for silence, at, before in gaps[:5]:
        print(f"  {silence:5.1f} s of silence ending at {at:6.1f} s, after: {before}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
