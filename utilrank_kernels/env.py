"""Every environment variable the package, its build and its tests read, with its meaning: the one list
(``tests/test_env.py`` fails when code reads a variable that is not here). Read through ``get``/``flag``."""

from __future__ import annotations

import os

VARIABLES: dict[str, str] = {
    "UTILRANK_CACHE": "cache folder: trained built-in models, latency tables, the small-M dispatch tables "
                      "(small_m/<device>.json), the measured backend choices (tune/<device>.json) "
                      "(default ~/.cache/utilrank)",
    "UTILRANK_TRITON_CONFIG": "'first': every Triton autotuner keeps only its first configuration "
                              "(reproducible benchmarks; implied by TRITON_INTERPRET=1)",
    "UTILRANK_SMALL_M_TABLE": "path of a small-M dispatch table to read instead of the cache's "
                              "small_m/<device>.json (ops._dispatch.write_small_m_table, which "
                              "benchmarks/kernels/cuda_small_m.py calls, writes that one)",
    "UTILRANK_TUNE": "'0': backend='auto' keeps the fixed dispatch rule on CUDA (reproducible runs): no factored op's "
                     "candidates are timed, and the measured choices in the cache (tune/<device>.json) are neither "
                     "read nor written (default: on)",
    "UTILRANK_IM2COL_CHUNK_BYTES": "CPU conv covariance: bytes of im2col patches formed at a time (default 64 MiB)",
    "UTILRANK_BUILD_CUDA": "'1': `pip install -e .` / setup.py also builds the CUDA extension utilrank_kernels._C",
    "UTILRANK_PTXAS_VERBOSE": "'1': the CUDA-extension build prints ptxas register and spill counts",
    "UTILRANK_REQUIRE_CUDA_EXT": "'1': tests fail instead of skipping when the CUDA extension is not built (CI)",
    "UTILRANK_TEST_OUTCOMES": "tests only: a file the pytest plugin benchmarks/tools/pytest_outcomes.py appends each "
                              "test's outcome to as one JSON line, so a run stopped at a time limit keeps its counts",
    "UTILRANK_TEST_KILL_AT": "tests only: kill the process (SIGKILL) at a named point of writing an output folder",
    "TRITON_INTERPRET": "'1': Triton kernels run on CPU tensors in Triton's interpreter (tests; set before import)",
    "THP_MEM_ALLOC_ENABLE": "'1': PyTorch backs large CPU tensors with transparent huge pages (read by c10 at "
                            "start-up; recorded in benchmark rows)",
    "WORLD_SIZE": "set by torchrun: the number of processes of a distributed statistics pass",
    "LOCAL_RANK": "set by torchrun: this process's GPU on its node",
    "RANK": "set by torchrun: this process's rank; rank 0 locks and prepares the output folder, the others share it",
}


def get(name: str, default: str | None = None) -> str | None:
    """The variable's value (``default`` when unset); ``name`` must be listed in ``VARIABLES``."""
    if name not in VARIABLES:
        raise KeyError(f"environment variable {name} is not documented in utilrank_kernels.env.VARIABLES")
    return os.environ.get(name, default)


def flag(name: str) -> bool:
    """Whether the variable is set to ``1``."""
    return get(name, "0") == "1"
