"""Bad-input sweep of lowrank-core and lowrank_torch (``nox -s fuzz``; see ``fuzz/sweep.py``)."""
