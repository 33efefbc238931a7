"""Every document the repository's files point to is in the repository (docs/design.md holds the
design); no file refers to a design document, a paper note or a shared folder beside the
checkout, which a user who clones the project does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"DESIGN\.md|(?i:beside the repository|\.\./shared\b|/work/shared|paper-note)")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.decode().split("\0") if p]


def test_design_document_is_in_the_repository():
    assert (ROOT / "docs" / "design.md").is_file()


def test_no_file_refers_to_a_document_outside_the_repository():
    hits = []
    for rel in _tracked():
        path = ROOT / rel
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) and rel != "tests/test_repository_documents.py":
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "files that point outside the repository:\n" + "\n".join(hits)
