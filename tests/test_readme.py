"""The README's Python examples run as written (the code blocks under the headings below)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section ``## {heading}``."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("heading", ["Using the ops", "Your own training loop"])
def test_readme_python_blocks_run(heading, capsys):
    blocks = _python_blocks(heading)
    assert blocks, f"no python block under ## {heading}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, code in enumerate(blocks):
            namespace: dict = {"__name__": "readme"}
            exec(compile(code, f"README.md ({heading}, block {i})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    if heading == "Your own training loop":
        out = capsys.readouterr().out
        losses = [float(v) for v in re.findall(r"loss ([-\d.naif]+),", out)]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), out
        assert not namespace["info"][0].skipped
        assert all(p.grad is not None for p in namespace["g"].parameters())
