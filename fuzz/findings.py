"""Markdown summary of a sweep's failures, grouped by owner file: ``python -m fuzz.findings rows.json``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

from fuzz.sweep import failures, verdict


def summarize(rows: list[dict[str, Any]]) -> str:
    by_owner: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in failures(rows):
        by_owner[r["owner"]][r["spec"]].append(r)
    lines: list[str] = []
    for owner in sorted(by_owner):
        n = sum(len(v) for v in by_owner[owner].values())
        lines.append(f"\n### {owner}: {n} failing cases\n")
        for spec in sorted(by_owner[owner]):
            group = by_owner[owner][spec]
            kinds: dict[str, list[str]] = defaultdict(list)
            examples: dict[str, dict[str, Any]] = {}
            for r in group:
                v = verdict(r) + (" +MUTATED" if r.get("mutated") else "")
                exc = r.get("exc", "")
                where = r.get("where", "")
                key = f"{v} {exc} {where}".strip()
                label = f"{r['label']}[{r['lib'][0]}]"
                if label not in kinds[key]:
                    kinds[key].append(label)
                examples.setdefault(key, r)
            lines.append(f"- `{spec}` ({len(group)}):")
            for key, labels in kinds.items():
                shown = ", ".join(labels[:12]) + (
                    f", ... (+{len(labels) - 12})" if len(labels) > 12 else ""
                )
                msg = examples[key].get("msg", "")[:90].replace("\n", " ")
                lines.append(f"  - {key}: {shown}  e.g. `{msg}`")
            lines.append(f"  - reproduce: `python -m fuzz.sweep --only '{spec}' --failures`")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(summarize(json.load(fh)))
