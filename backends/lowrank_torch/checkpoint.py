"""Checkpoints of a (partly) low-rank training run, loadable into a freshly built dense model.

A checkpoint holds the model's, the optimizer's, the OIALR controller's and (optionally) an LR
scheduler's state. Because the controller's state says which layers were switched and at which ranks,
:func:`load_checkpoint` can rebuild that structure on a model built the usual (dense) way, then load the
weights and the optimizer state into it: a resumed run continues exactly where the saved one stopped.

Files are written atomically (to a temporary file, then renamed), so a crash while saving never
destroys the previous checkpoint. Loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowrank_core as lc

from .oialr import OIALR

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "lowrank_torch.checkpoint/1"


class CheckpointError(lc.LowRankError, ValueError):
    """A checkpoint cannot be read, or does not fit the model / optimizer it is loaded into."""


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    oialr: OIALR | None = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the run's state to ``path`` atomically; returns the path.

    ``extra`` holds anything else to keep (epoch, metrics); it must be made of tensors, numbers,
    strings, lists and dicts (what ``torch.load(weights_only=True)`` accepts).
    """
    target = Path(path)
    inner = getattr(model, "module", model)
    blob: dict[str, Any] = {"format": FORMAT, "model": inner.state_dict()}
    if optimizer is not None:
        blob["optimizer"] = optimizer.state_dict()
    if oialr is not None:
        blob["oialr"] = oialr.state_dict()
    if scheduler is not None:
        blob["scheduler"] = scheduler.state_dict()
    if extra is not None:
        blob["extra"] = extra
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(blob, fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _read(path: Path, map_location: Any) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): {exc}"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a lowrank_torch checkpoint (format {FORMAT!r} expected)"
        )
    if "model" not in blob:
        raise CheckpointError(f"{path} holds no model state")
    return blob


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    oialr: OIALR | None = None,
    scheduler: Any = None,
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """Restore a run saved by :func:`save_checkpoint` into a freshly built model; returns ``extra``.

    Build the model, the optimizer (from ``model.parameters()``), the :class:`OIALR` controller (same
    config) and the scheduler exactly as for a new run, then call this. Order: the controller rebuilds
    the low-rank structure, then weights, optimizer and scheduler state are loaded. The file is read
    and its parts checked for presence before anything is changed; a file that cannot be read or does
    not fit raises :class:`CheckpointError` naming the part that does not fit.
    """
    blob = _read(Path(path), map_location)
    for part, given in (("optimizer", optimizer), ("oialr", oialr), ("scheduler", scheduler)):
        if given is not None and part not in blob:
            raise CheckpointError(
                f"{path} holds no {part} state, but a {part} was given to restore"
            )
    if "oialr" in blob and oialr is None:
        raise CheckpointError(
            f"{path} was saved from an OIALR run: pass the controller (oialr=...) to rebuild its layers"
        )
    inner = getattr(model, "module", model)
    if oialr is not None:
        try:
            oialr.load_state_dict(blob["oialr"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"the OIALR state of {path} does not fit this model: {exc}"
            ) from exc
    try:
        inner.load_state_dict(blob["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"the model state of {path} does not fit this model: {exc}") from exc
    if optimizer is not None:
        try:
            optimizer.load_state_dict(blob["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"the optimizer state of {path} does not fit: {exc}") from exc
    if scheduler is not None:
        scheduler.load_state_dict(blob["scheduler"])
    extra: dict[str, Any] = blob.get("extra") or {}
    return extra
