"""Pictures of an OIALR run: basis stability and rank per layer over training steps.

Needs matplotlib (``pip install 'lowrank-core[plot]'``); it is imported only when a plot is drawn.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_history"]


def _series(
    history: Iterable[Mapping[str, Any]], event: str, key: str
) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for e in history:
        if e.get("event") == event:
            out[str(e["layer"])].append((int(e["step"]), float(e[key])))
    return dict(out)


def _short(layer: str) -> str:
    """A legend label: the packed attention projection's parametrization path shortened."""
    return layer.replace(".parametrizations.in_proj_weight.0", ".in_proj")


def plot_history(
    history: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Draw stability (before the switch) and rank (from the switch on) per layer to a PNG at ``path``.

    ``history`` is :attr:`lowrank_torch.oialr.OIALR.history` (or the list saved in a checkpoint). The
    left panel shows each layer's basis stability at every check, the right panel each low-rank part's
    rank: its value at the switch, then after every rank update. Returns the path written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_history needs matplotlib: pip install 'lowrank-core[plot]'"
        ) from exc
    events = list(history)
    stability = _series(events, "stability", "value")
    ranks = _series(events, "switch", "rank")
    for layer, pts in _series(events, "rank", "new").items():
        ranks.setdefault(layer, []).extend(pts)
    fig, (ax_s, ax_r) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    for layer, pts in sorted(stability.items()):
        steps, values = zip(*pts, strict=True)
        ax_s.plot(steps, values, marker="o", ms=3, label=_short(layer))
    ax_s.set(xlabel="step", ylabel="basis stability", title="stability before the switch")
    for layer, pts in sorted(ranks.items()):
        pts.sort()
        steps, values = zip(*pts, strict=True)
        ax_r.step(steps, values, where="post", marker="o", ms=3, label=_short(layer))
    ax_r.set(xlabel="step", ylabel="rank", title="rank of each low-rank layer")
    for ax, data in ((ax_s, stability), (ax_r, ranks)):
        if data:
            ax.legend(fontsize="x-small", ncol=2, loc="best", framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no events", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
