"""The ``lowrank-compare`` launcher: a clear message instead of a raw ImportError without PyTorch."""

from __future__ import annotations

import importlib.util
import re

import pytest

from lowrank_core import _cli


def _without(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        if name in names:
            return None
        return real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_cli.importlib.util, "find_spec", find_spec)


def test_compare_without_torch_says_how_to_install(monkeypatch, capsys):
    _without(monkeypatch, "torch")
    assert _cli.compare() == 2
    err = capsys.readouterr().err
    assert "needs PyTorch" in err
    assert re.search(r"\(torch(, | missing)", err)  # the missing list names torch
    assert "constraints/cpu.txt" in err and "nox -s demo" in err


def test_the_console_script_points_at_the_launcher():
    """pyproject's entry point is the launcher, which imports no framework at import time."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["lowrank-compare"] == "lowrank_core._cli:compare"
    source = Path(_cli.__file__).read_text()
    assert "\nimport torch" not in source and "\nfrom lowrank_torch" not in source
