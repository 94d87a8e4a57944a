"""Every Python code block of README.md and of the documentation site runs (no example can rot).

The blocks of one page run in order in one namespace, the way a reader would paste them, in a fresh
subprocess (so one page cannot see another's imports or state) from a temporary directory. Each page
runs in exactly one test session: the one whose backend its blocks need (``torch`` if they import
torch or lowrank_torch, ``jax`` if they import jax or lowrank_jax, else ``numpy``); the other sessions
skip it, saying where it runs. A page that needs a module that session cannot import fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import selected_backends

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "generated" not in p.parts]
_FENCE = re.compile(r"^( *)```python[^\n]*\n(.*?)^\1```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text (indentation removed)."""
    return [textwrap.dedent(m.group(2)) for m in _FENCE.finditer(text)]


def session_of(code: str) -> str:
    if re.search(r"^\s*(import|from)\s+(jax|lowrank_jax|optax|flax)\b", code, re.M):
        return "jax"
    if re.search(r"^\s*(import|from)\s+(torch|lowrank_torch)\b", code, re.M):
        return "torch"
    return "numpy"


CASES = []
for page in PAGES:
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    if blocks:
        CASES.append(pytest.param(page, blocks, id=page.relative_to(ROOT).as_posix()))


def test_the_pages_have_examples():
    """The extraction itself works: README and the tutorials hold Python blocks."""
    ids = {c.id for c in CASES}
    assert "README.md" in ids
    for name in ("oialr", "dldr", "cmd", "init"):
        assert f"docs/tutorials/{name}.md" in ids


@pytest.mark.parametrize(("page", "blocks"), CASES)
def test_code_blocks_run(page: Path, blocks: list[str], tmp_path: Path) -> None:
    code = "\n\n".join(blocks)
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
