"""Every Python code block of README.md and of the documentation site runs (no example can rot).

Each block is a complete example (its own imports) and runs alone in a fresh subprocess from a
temporary directory, the way a reader would paste it. It runs in exactly one test session: the one
whose backend it needs (``torch`` if it imports torch or lowrank_torch, ``jax`` if it imports jax,
lowrank_jax, optax or flax, else ``numpy``); the other sessions skip it, saying where it runs. A block
that needs a module its session cannot import fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "generated" not in p.parts]
_FENCE = re.compile(r"^( *)```python[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text (indentation removed)."""
    return [textwrap.dedent(m.group(2)) for m in _FENCE.finditer(text)]


def selected_backends() -> list[str]:
    """The session's backends, as tests/conftest.py reads them (not imported: the name ``conftest``
    is ambiguous once tests/jax_integration/conftest.py is collected too)."""
    raw = os.environ.get("LOWRANK_TEST_BACKENDS", "").strip()
    if raw:
        return [name.strip() for name in raw.split(",") if name.strip()]
    return [b for b in ("numpy", "torch", "jax") if importlib.util.find_spec(b) is not None]


def session_of(code: str) -> str:
    if re.search(r"^\s*(import|from)\s+(jax|lowrank_jax|optax|flax)\b", code, re.M):
        return "jax"
    if re.search(r"^\s*(import|from)\s+(torch|lowrank_torch)\b", code, re.M):
        return "torch"
    return "numpy"


CASES = []
for page in PAGES:
    for k, block in enumerate(python_blocks(page.read_text(encoding="utf-8")), start=1):
        CASES.append(pytest.param(page, block, id=f"{page.relative_to(ROOT).as_posix()}#{k}"))


def test_the_pages_have_examples():
    """The extraction itself works: README and the tutorials hold Python blocks."""
    pages = {c.id.partition("#")[0] for c in CASES}
    assert "README.md" in pages
    for name in ("oialr", "dldr", "cmd", "init"):
        assert f"docs/tutorials/{name}.md" in pages


@pytest.mark.parametrize(("page", "code"), CASES)
def test_code_blocks_run(page: Path, code: str, tmp_path: Path) -> None:
    needs = session_of(code)
    here = selected_backends()
    if needs not in here:
        pytest.skip(f"{page.name}: its blocks need {needs}; they run in the tests({needs}) session")
    script = tmp_path / "page.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ)
    extra = [str(ROOT), str(ROOT / "backends"), str(ROOT / "reference")]
    env["PYTHONPATH"] = os.pathsep.join([*extra, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, (
        f"a code block of {page.relative_to(ROOT)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
