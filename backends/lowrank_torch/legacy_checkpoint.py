"""Reading the ``torch.save`` checkpoints of lowrank-core 0.1.0 (formats ``/2`` and ``/1``).

Version 0.1.0 wrote :func:`lowrank_torch.checkpoint.save_checkpoint` files with ``torch.save`` (a zip
archive holding a pickle): format ``"lowrank_torch.checkpoint/2"`` with a SHA-256 digest of its content
(every tensor's dtype, shape and bytes, and every other entry), and before it
``"lowrank_torch.checkpoint/1"`` without a digest. Later versions write the core's container
(:mod:`lowrank_core.checkpoint`) instead; this module only reads the old files, with
``torch.load(weights_only=True)`` (which unpickles tensors, containers and plain values only, running no
other code), and checks their digest. :func:`lowrank_torch.checkpoint.load_checkpoint` calls it for a
file that is a ``torch.save`` archive.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lowrank_core import CheckpointError

__all__ = ["DIGEST", "FORMAT_V1", "FORMAT_V2", "digest", "is_torch_save", "read"]

#: the format of 0.1.0: a ``torch.save`` archive with a SHA-256 digest entry
FORMAT_V2 = "lowrank_torch.checkpoint/2"
#: the format before it: the same entries, no digest (loadable with ``verify=False``)
FORMAT_V1 = "lowrank_torch.checkpoint/1"
DIGEST = "sha256"


def is_torch_save(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` zip archive (it holds a ``data.pkl`` member)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(name == "data.pkl" or name.endswith("/data.pkl") for name in names)


def _sort_key(key: object) -> tuple[str, str]:
    return type(key).__name__, repr(key)


def _feed(h: Any, x: object) -> None:
    """Feed the canonical encoding of ``x`` (tensors, containers, scalars) that 0.1.0 hashed into ``h``."""
    if isinstance(x, Tensor):
        t = x.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(x, dict):
        h.update(f"D{len(x)};".encode())
        for key in sorted(x, key=_sort_key):
            _feed(h, key)
            _feed(h, x[key])
    elif isinstance(x, list | tuple):
        h.update(f"L{len(x)};".encode())
        for value in x:
            _feed(h, value)
    else:
        text = f"{type(x).__name__}:{x!r};"
        h.update(f"S{len(text)};{text}".encode())


def digest(blob: dict[str, Any]) -> str:
    """The SHA-256 digest (hex) of a format ``/2`` blob: every entry but ``"digest"`` itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in blob.items() if k != "digest"})
    return h.hexdigest()


def read(path: Path, map_location: Any, verify: bool) -> dict[str, Any]:
    """The entries of a ``torch.save`` checkpoint file (format ``/2``, or ``/1`` when not ``verify``).

    Raises :class:`~lowrank_core.CheckpointError` for a file ``torch.load`` cannot read, another
    content, a ``/1`` file when ``verify`` (it has no digest to check), a missing or wrong digest.
    """
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): {exc}"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") not in (FORMAT_V2, FORMAT_V1):
        raise CheckpointError(
            f"{path} is not a lowrank_torch checkpoint (a torch.save file of format "
            f"{FORMAT_V2!r} or {FORMAT_V1!r} expected)"
        )
    if verify:
        if blob["format"] == FORMAT_V1:
            raise CheckpointError(
                f"{path} was written by an older version without a digest, so its integrity cannot "
                "be checked; pass verify=False to load it unchecked"
            )
        saved = blob.get("digest")
        if (
            not isinstance(saved, dict)
            or saved.get("algorithm") != DIGEST
            or not isinstance(saved.get("value"), str)
        ):
            raise CheckpointError(f"{path} has no valid digest entry (corrupt?)")
        actual = digest(blob)
        if actual != saved["value"]:
            raise CheckpointError(
                f"{path} is corrupt: its content does not match the digest written with it "
                f"({DIGEST} {actual[:16]}... != {saved['value'][:16]}...); the file was changed "
                "after it was saved"
            )
    return {k: v for k, v in blob.items() if k != "digest"}
