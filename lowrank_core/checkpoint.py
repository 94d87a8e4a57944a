"""The checkpoint container of every framework: one ``.npz`` file, a JSON manifest, a SHA-256 digest.

A checkpoint is a nested *tree* of dicts, lists, tuples, ``None``, booleans, integers, floats (NaN and
infinities included), strings and arrays. :func:`save` writes it as a NumPy ``.npz`` archive (no pickle:
loading runs no code) holding every array under a name ``a0``, ``a1``, ... and a JSON manifest of the
rest (an array is a reference ``{"__array__": name, "dtype": ..., "shape": ...}``, a tuple
``{"__tuple__": [...]}``, a dict whose keys are not all plain strings ``{"__dict__": [[key, value],
...]}``), plus a SHA-256 digest of the manifest and of every array's dtype, shape and bytes. The file is
written atomically (a temporary file in the same directory, then a rename: a crash while saving never
destroys the previous checkpoint). :func:`load` checks the digest and the structure before anything is
decoded and raises :class:`~lowrank_core.errors.CheckpointError` naming the problem (no file, not a
checkpoint, corrupt, another format, a manifest that does not match its arrays). The digest guards
against corruption, not against a deliberate forgery.

Arrays are NumPy arrays in the file; the frameworks' glue converts their own arrays (any array the
core's backends know is converted with :func:`lowrank_core.get_backend` on the way in). An array of a
dtype NumPy does not know natively (``bfloat16``, ``float8_*``) is stored as its raw bytes with the
dtype's name; it is read back as that dtype when NumPy (with ``ml_dtypes``, which JAX brings) knows the
name, and otherwise as a :class:`RawArray` the caller converts (the PyTorch glue does, for
``bfloat16``).

This is the layout of ``lowrank_jax`` checkpoints since 0.1.0, so their files are read as they are,
and of ``lowrank_torch`` checkpoints since format ``lowrank_torch.checkpoint/3``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import describe
from .errors import CheckpointError, ParameterError, ParameterTypeError

__all__ = ["DIGEST", "RawArray", "load", "save"]

DIGEST = "sha256"
_MANIFEST = "__manifest__"
_DIGEST = "__digest__"


@dataclass(frozen=True)
class RawArray:
    """An array kept as its raw bytes: ``bits`` (a NumPy array of unsigned integers of the element's
    size, of the array's shape) and the name of its real ``dtype`` (e.g. ``"bfloat16"``)."""

    bits: np.ndarray
    dtype: str


# --------------------------------------------------------------------------------------------------
# encoding: JSON manifest + named arrays
# --------------------------------------------------------------------------------------------------
class _Encoder:
    def __init__(self, convert: Callable[[Any], Any] | None) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.convert = convert

    def array(self, a: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
        name = f"a{len(self.arrays)}"
        shape = list(a.shape)
        kind = str(a.dtype) if dtype is None else dtype
        if a.dtype.kind not in "biufc" or dtype is not None:  # bfloat16, float8, ...: raw bytes
            a = np.ascontiguousarray(a).view(np.uint8)
        self.arrays[name] = np.ascontiguousarray(a)
        return {"__array__": name, "dtype": kind, "shape": shape}

    def value(self, x: Any, where: str) -> Any:
        if self.convert is not None:
            x = self.convert(x)
        if isinstance(x, RawArray):
            return self.array(x.bits, x.dtype)
        if isinstance(x, np.ndarray):
            return self.array(x)
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: self.value(v, f"{where}[{k!r}]") for k, v in x.items()}
            return {
                "__dict__": [
                    [self.key(k, where), self.value(v, f"{where}[{k!r}]")] for k, v in x.items()
                ]
            }
        if isinstance(x, tuple):
            return {"__tuple__": [self.value(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if hasattr(x, "__array_namespace__") or hasattr(x, "__dlpack__"):
            from .backend import get_backend

            return self.array(np.asarray(get_backend(x).to_numpy(x)))
        raise ParameterTypeError(
            f"{where} holds {describe(x)}; a checkpoint keeps arrays, numbers, strings, None, "
            "lists, tuples and dicts"
        )

    def key(self, k: Any, where: str) -> Any:
        if k is None or isinstance(k, (bool, int, float, str)):
            return k
        if isinstance(k, tuple):
            return {"__tuple__": [self.key(v, where) for v in k]}
        raise ParameterTypeError(
            f"{where} has the dict key {k!r}; a checkpoint keeps keys that are numbers, strings, "
            "None or tuples of them"
        )


def _decode(x: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(x, dict):
        if "__array__" in x:
            return _array(x, arrays)
        if "__tuple__" in x:
            return tuple(_decode(v, arrays) for v in _list(x["__tuple__"]))
        if "__dict__" in x:
            out = {}
            for item in _list(x["__dict__"]):
                if not (isinstance(item, list) and len(item) == 2):
                    raise CheckpointError("the checkpoint's manifest has a damaged dict entry")
                out[_key(_decode(item[0], arrays))] = _decode(item[1], arrays)
            return out
        return {k: _decode(v, arrays) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v, arrays) for v in x]
    return x


def _list(x: Any) -> list[Any]:
    if not isinstance(x, list):
        raise CheckpointError(f"the checkpoint's manifest is damaged: a list expected, got {x!r}")
    return x


def _key(k: Any) -> Any:
    if isinstance(k, (dict, list, np.ndarray, RawArray)):
        raise CheckpointError(f"the checkpoint's manifest has an invalid dict key {k!r}")
    return k


def _numpy_dtype(name: str) -> np.dtype[Any] | None:
    """NumPy's dtype of that name, ``ml_dtypes``' for the ones NumPy lacks, or None."""
    try:
        return np.dtype(name)
    except TypeError:
        pass
    try:
        import ml_dtypes
    except ImportError:
        return None
    kind = getattr(ml_dtypes, name, None)
    return None if kind is None else np.dtype(kind)


def _array(ref: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray | RawArray:
    try:
        raw = arrays[ref["__array__"]]
        name = str(ref["dtype"])
        shape = tuple(int(s) for s in ref["shape"])
        dtype = _numpy_dtype(name)
        if dtype is None:
            count = math.prod(shape)
            size = raw.size // count if count else 1  # no element: the size is not recorded
            bits = raw.view(np.dtype(f"u{size}")).reshape(shape)
            return RawArray(bits, name)
        a = raw if raw.dtype == dtype else raw.view(dtype)
        return a.reshape(shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the checkpoint's manifest does not match its arrays: {exc}"
        ) from None


def _digest(manifest: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(b"M" + len(manifest).to_bytes(8, "little") + manifest)
    for name in sorted(arrays):
        a = arrays[name]
        h.update(f"A{name};{a.dtype.str};{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _as_path(path: object) -> Path:
    if isinstance(path, (str, os.PathLike)) and not isinstance(path, bytes):
        return Path(path)
    raise ParameterTypeError(f"`path` must be a str or os.PathLike, got {describe(path)}")


# --------------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------------
def save(
    path: str | os.PathLike[str],
    tree: dict[str, Any],
    *,
    format: str,
    convert: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``tree`` (a dict, see the module docstring) to ``path`` atomically, with its digest.

    ``format`` names the content (e.g. ``"lowrank_jax.checkpoint/1"``) and is checked by :func:`load`;
    ``convert`` (optional) maps each value before it is encoded (a framework's arrays to NumPy arrays
    or :class:`RawArray`). Returns the path. Raises ``ParameterTypeError`` for a value a checkpoint
    cannot keep (before anything is written) and ``ParameterError`` for a directory.
    """
    target = _as_path(path)
    if target.is_dir():
        raise ParameterError(f"`path` {str(target)!r} is a directory; give a file name")
    if not isinstance(tree, dict):
        raise ParameterTypeError(f"a checkpoint's content must be a dict, got {describe(tree)}")
    bad = [k for k in tree if not isinstance(k, str) or k.startswith("__") or k == "format"]
    if bad:
        raise ParameterTypeError(
            f"a checkpoint's top-level entries must be named by strings other than 'format' and "
            f"not starting with '__', got {bad}"
        )
    if not isinstance(format, str):
        raise ParameterTypeError(f"`format` must be a str, got {describe(format)}")
    enc = _Encoder(convert)
    content = enc.value(tree, "the checkpoint")
    manifest = {"format": format, **content}
    text = json.dumps(manifest, sort_keys=True, allow_nan=True).encode()
    arrays = dict(enc.arrays)
    arrays[_MANIFEST] = np.frombuffer(text, dtype=np.uint8)
    arrays[_DIGEST] = np.frombuffer(
        f"{DIGEST}:{_digest(text, enc.arrays)}".encode(), dtype=np.uint8
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(path: str | os.PathLike[str], *, formats: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """Read a :func:`save` file: ``(format, tree)``, arrays as NumPy arrays (or :class:`RawArray`).

    The digest is checked first, then the manifest's structure and its format (one of ``formats``).
    Raises :class:`~lowrank_core.errors.CheckpointError` naming the problem: no file, not a readable
    checkpoint, corrupt (the content does not match the digest), another format, a damaged manifest.
    """
    source = _as_path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint file at {str(source)!r}")
    try:
        with np.load(source, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{source} is not a readable checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if _MANIFEST not in arrays or _DIGEST not in arrays:
        raise CheckpointError(f"{source} is not a lowrank-core checkpoint (no manifest or digest)")
    text = arrays.pop(_MANIFEST).tobytes()
    saved = arrays.pop(_DIGEST).tobytes().decode("ascii", "replace")
    if saved != f"{DIGEST}:{_digest(text, arrays)}":
        raise CheckpointError(
            f"{source} is corrupt: its content does not match the digest written with it "
            "(changed on disk after it was saved?)"
        )
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{source} has an unreadable manifest: {exc}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found not in formats:
        raise CheckpointError(
            f"{source} has format {found!r}; this version reads {' or '.join(map(repr, formats))}"
        )
    assert isinstance(manifest, dict)
    try:
        tree = {k: _decode(v, arrays) for k, v in manifest.items() if k != "format"}
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    return str(found), tree
