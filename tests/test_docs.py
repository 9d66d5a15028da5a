"""The Python examples of README.md and docs/*.md run as written.

Each page's ```python blocks run in order in one namespace (later blocks may use earlier names), in
a fresh interpreter whose working directory is a temporary folder (examples that write files write
them there). A page whose example stops working with the current API fails here, with the block
and the error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

RUNNER = r"""
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
namespace = {"__name__": "__docs__"}
for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.DOTALL)):
    try:
        exec(compile(block, f"{sys.argv[1]} (python block {i + 1})", "exec"), namespace)
    except BaseException:
        print(f"--- python block {i + 1} of {sys.argv[1]} failed:\n{block}", file=sys.stderr)
        raise
"""


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(encoding="utf-8"), re.DOTALL)


def test_the_pages_have_examples():
    """A guard against the runner silently finding nothing (a changed fence, a moved page)."""
    assert len(python_blocks("README.md")) >= 2
    assert sum(len(python_blocks(p)) for p in PAGES) >= 8


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_examples_run(page, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(ROOT / page)], cwd=tmp_path, capture_output=True, check=False,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{page}:\n{proc.stderr[-4000:]}"
