"""Reproducible test inputs: no test seeds from ``hash()`` (salted per process for strings), and
two fresh runs with different hash salts pass the same seeds to every random generator."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import colabx

TESTS = Path(__file__).resolve().parent
# test_compat.py (issue 22's files) hashes a tuple of ints and bools, which is not salted; the
# subprocess test below checks that its seeds do not change. Switch it to a stable seed (like
# test_context_labels.case_seed) and drop it from here.
HASH_ALLOWED = {"test_compat.py"}


def _hash_calls(source: str) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "hash"]


def test_no_test_module_seeds_with_hash():
    assert _hash_calls("s = hash((1, 'a')) % 7\n") == [1]  # the scan finds one
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        lines = _hash_calls(path.read_text())
        if lines and path.name not in HASH_ALLOWED:
            offenders[str(path.relative_to(TESTS))] = lines
    assert not offenders, f"hash() in tests (salted per process; use zlib.crc32): {offenders}"


# The formerly hash-seeded cases, and test_compat's hash-seeded ones.
SELECTION = ["tests/test_context_labels.py::test_matches_twin",
             "tests/test_compat.py::test_calculate_loss_matches_the_reference"]


def _seed_log(tmp_path: Path, salt: str) -> dict[str, list[str]]:
    log = tmp_path / f"seeds-{salt}.json"
    root = Path(colabx.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": salt, "COLABX_SEED_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(root),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "seed_recorder",
                           "-p", "no:cacheprovider", "-x", *SELECTION],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(log.read_text())


def test_two_runs_draw_the_same_inputs(tmp_path):
    first, second = _seed_log(tmp_path, "1"), _seed_log(tmp_path, "2")
    tests = [k for k in first if "::" in k]
    assert len(tests) >= 52 + 40  # every selected case ran and seeded something
    per_case = {k: v for k, v in first.items() if "test_matches_twin" in k}
    assert len({tuple(v) for v in per_case.values()}) == len(per_case)  # distinct inputs
    assert first == second
