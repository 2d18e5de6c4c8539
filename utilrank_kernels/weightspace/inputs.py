"""Weight files screened before any work: ``utilrank soup``, ``regions``, ``predict`` and ``spectrum`` read each
file they are given (safetensors, or a torch file with ``weights_only=True``) here before they train, evaluate
or write anything.

- every floating-point tensor finite: a NaN or Inf is named by file and tensor (a single NaN ingredient turns a
  soup into NaN, and a spectrum into a failed SVD);
- the file fits the model's architecture (the tensors it lacks, has in excess, or holds in another shape);
- files compared by content (their floating-point tensors): copies of one model add no model, so a command
  that needs ``least`` different models refuses fewer, naming the copies, and warns in one line per group of
  copies otherwise.

Errors are ``WeightFileError``: one line naming the option, the file and, where one is to blame, the tensor.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .average import fit_problems, nonfinite, state_dict_of, strip_prefixes

logger = logging.getLogger(__name__)


class WeightFileError(ValueError):
    """A weight file that cannot be used: one line naming the option, the file and what is wrong."""


@dataclass(frozen=True)
class WeightFile:
    """A screened file: where it is and a digest of its floating-point tensors (names, shapes, dtypes, values)."""

    path: Path
    digest: str


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """``WeightFileError`` naming ``source`` and the first tensor that holds NaN or Inf."""
    problem = nonfinite(state)
    if problem is not None:
        raise WeightFileError(f"{source}: {problem}; weights with NaN or Inf are refused")


def digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of the floating-point tensors (names, shapes, dtypes, values): equal for copies of one model, even
    where integer counters (BatchNorm's ``num_batches_tracked``) or wrapper prefixes differ."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not t.is_floating_point():
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_weights(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The file's tensors (wrapper prefixes stripped); ``WeightFileError`` naming ``option`` and the file where it
    is missing, a folder, or not a weights file."""
    path = Path(path)
    if path.is_dir():
        raise WeightFileError(f"{option} {path}: is a folder; give weight files (.safetensors, or a weights-only "
                              "torch file)")
    if not path.is_file():
        raise WeightFileError(f"{option} {path}: no such file")
    try:
        return state_dict_of(path)
    except ValueError as exc:  # unreadable, another format, no tensors: say it once, after the option and file
        reason = str(exc)
        for prefix in (f"checkpoint {path}: ", f"{path}: "):
            reason = reason.removeprefix(prefix)
        raise WeightFileError(f"{option} {path}: {reason}") from exc


def screen_files(files: Sequence[str | Path], option: str, *, model: nn.Module | None = None,
                 model_name: str | None = None) -> list[WeightFile]:
    """Read each file, check its tensors are finite and (given ``model``) that it fits the model's architecture;
    ``WeightFileError`` names the first file that fails. The tensors are not kept (one file in memory at a
    time); the result is each file with its content digest."""
    own = strip_prefixes(model.state_dict())[0] if model is not None else None
    name = model_name or (type(model).__name__ if model is not None else "")
    screened = []
    for f in files:
        state = read_weights(f, option)
        check_finite(state, f"{option} {f}")
        if own is not None:
            problem = fit_problems(own, state, "the file")
            if problem is not None:
                raise WeightFileError(f"{option} {f}: not weights of {name} ({problem})")
        screened.append(WeightFile(Path(f), digest(state)))
    return screened


def copies(files: Sequence[WeightFile]) -> list[list[WeightFile]]:
    """The files grouped by content, in the order first seen (a group of one: a file no other copies)."""
    groups: dict[str, list[WeightFile]] = {}
    for f in files:
        groups.setdefault(f.digest, []).append(f)
    return list(groups.values())


def _same(group: Sequence[WeightFile]) -> str:
    """``a = b (given 2 times) = c``: the files of one group, each path once."""
    counts: dict[str, int] = {}
    for f in group:
        counts[str(f.path)] = counts.get(str(f.path), 0) + 1
    names = [p + (f" (given {n} times)" if n > 1 else "") for p, n in counts.items()]
    return " = ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def require_distinct(files: Sequence[WeightFile], least: int, option: str, purpose: str) -> None:
    """Refuse fewer than ``least`` different models among ``files`` (copies of one model count once), naming the
    copies; otherwise one warning line per group of copies (each is counted as often as it is given)."""
    groups = copies(files)
    repeated = [g for g in groups if len(g) > 1]
    if len(groups) < least:
        n = len(files)
        if repeated:
            held = f"the {n} files hold only {len(groups)} different model{'s' * (len(groups) != 1)} " \
                   f"({'; '.join(_same(g) for g in repeated)}: the same weights)"
        else:
            held = f"{n} file{'s' * (n != 1)} ({', '.join(str(f.path) for f in files[:4])})"
        raise WeightFileError(f"{option}: {held}: {purpose} needs at least {least} different models")
    for g in repeated:
        logger.warning(f"warning: {option} {_same(g)}: the same weights, so that model counts {len(g)} times")
