"""Shared helpers of the benchmark modules: settings, interleaved timing, tables.

A benchmark module ``benchmarks/bench_<name>.py`` defines

    DESCRIPTION: str                      # one line, shown by ``run.py --list``
    def run(config: Config) -> Report     # measures, returns tables + JSON-able data

and ``benchmarks/run.py`` discovers, runs and prints it, and writes ``results/<name>.json``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Config:
    """What the runner passes to every benchmark module."""

    quick: bool = False  # tiny sizes, few repeats: a smoke run
    repeat: int | None = None  # timed runs per case (median reported); None: the module's default
    warmup: int | None = None  # untimed runs per case before timing; None: the module's default

    def repeats(self, default: int, quick_default: int = 3) -> int:
        if self.repeat is not None:
            return self.repeat
        return quick_default if self.quick else default

    def warmups(self, default: int, quick_default: int = 1) -> int:
        if self.warmup is not None:
            return self.warmup
        return quick_default if self.quick else default


@dataclass
class Table:
    """One printed table: a title, column headers, rows of cells, notes under it."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        header = [str(c) for c in self.columns]
        widths = [len(h) for h in header]
        for row in cells:
            for i, v in enumerate(row):
                widths[i] = max(widths[i], len(v))

        def line(values: Sequence[str]) -> str:
            # first column left-aligned (labels), the others right-aligned (numbers)
            parts = [
                v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values)
            ]
            return "  ".join(parts).rstrip()

        rule = "  ".join("-" * w for w in widths)
        out = [self.title, "=" * len(self.title), line(header), rule]
        out += [line(row) for row in cells]
        out += [f"  {note}" for note in self.notes]
        return "\n".join(out)


@dataclass
class Report:
    """What a benchmark module returns."""

    tables: list[Table]
    data: dict[str, Any]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def fmt_seconds(seconds: float) -> str:
    """A duration with a unit that keeps 3 significant digits readable."""
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def compare(
    fns: dict[str, Callable[[], Any]],
    *,
    repeat: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median wall time (``time.perf_counter``) of each callable, measured side by side.

    All callables are warmed up first, then timed in interleaved rounds (the order rotates each
    round), so drift of the machine (frequency, other load) hits them alike. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before reading the clock on asynchronous devices.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    if sync is not None:
        sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeat):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            if sync is not None:
                sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
