"""``python -m lowrank_torch.demo``: see :mod:`lowrank_torch.demo.cli`."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
