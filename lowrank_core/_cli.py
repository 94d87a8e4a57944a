"""Console-script launchers that need an optional framework: a clear message when it is missing.

``lowrank-compare`` runs the PyTorch main job (:mod:`lowrank_torch.demo`). It is installed with the
package whatever its extras, so the launcher lives here, in the part that needs only NumPy, and imports
PyTorch only when it is there.
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["compare"]

_MISSING = """\
lowrank-compare needs PyTorch and the demo's packages, which are not installed in this environment
({missing} missing). Install them with the package's `demo` extra, using the CPU build of torch:

    pip install -c constraints/cpu.txt -e '.[demo]'    # from a clone (constraints pin torch's CPU build)

or run the main job through nox, which does all of that: nox -s demo
"""


def compare() -> int:
    """Entry point of the ``lowrank-compare`` console script."""
    missing = [m for m in ("torch", "mnist1d") if importlib.util.find_spec(m) is None]
    if missing:
        sys.stderr.write(_MISSING.format(missing=", ".join(missing)))
        return 2
    from lowrank_torch.demo.cli import main

    return main()
