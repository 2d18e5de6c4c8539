"""What the kernel backends need and whether it is here: the backend names, Triton, the interpreter, the
compiled CUDA extension. The rule that picks a backend from these is ``ops/_dispatch.py``."""

from __future__ import annotations

import importlib.util
import logging

from .. import env

BACKENDS = ("auto", "torch", "triton", "cuda")
logger = logging.getLogger("utilrank_kernels")
# read once at import: torch.compile then sees a constant, not a call into importlib
HAS_TRITON = importlib.util.find_spec("triton") is not None
_extension: list = []  # the loaded utilrank_kernels._C (or None), once looked up


def triton_interpret() -> bool:
    return env.flag("TRITON_INTERPRET")


def triton_available() -> bool:
    return HAS_TRITON


def cuda_extension():
    """The compiled ``utilrank_kernels._C`` module, or None; a missing build never breaks import."""
    if not _extension:
        try:
            from utilrank_kernels import _C

            _extension.append(_C)
        except ImportError as exc:  # built only with UTILRANK_BUILD_CUDA=1
            logger.debug("utilrank_kernels._C not loaded: %s", exc)
            _extension.append(None)
    return _extension[0]


def check_backend(op: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
