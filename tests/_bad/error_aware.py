"""``--error-aware`` of ``compress`` where its block-by-block statistics cannot be gathered: from a ``--stats`` file,
from a ``--resume``d checkpoint, with the resumable pass's ``--checkpoint-every`` / ``--max-batches``, or for
``--method svd`` (which reads no statistics): each refused in one line before any file is read, nothing written."""

from __future__ import annotations

from _bad import Bad

OUT = ("--out", "{tmp}/o")

CASES = [
    Bad("error-aware-with-stats", ("compress", "--error-aware", "--stats", "{tmp}/stats.safetensors", *OUT),
        ("--error-aware", "--stats {tmp}/stats.safetensors", "block by block")),
    Bad("error-aware-with-resume", ("compress", "--error-aware", "--resume", *OUT), ("--error-aware", "--resume")),
    Bad("error-aware-with-method-svd", ("compress", "--error-aware", "--method", "svd", *OUT),
        ("--error-aware", "--method svd", "no statistics")),
    Bad("error-aware-with-max-batches", ("compress", "--error-aware", "--max-batches", "2", *OUT),
        ("--error-aware", "--max-batches 2")),
    Bad("error-aware-with-checkpoint-every", ("compress", "--error-aware", "--checkpoint-every", "3", *OUT),
        ("--error-aware", "--checkpoint-every 3")),
]
