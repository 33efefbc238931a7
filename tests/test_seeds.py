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
HASH_ALLOWED: set[str] = set()  # test modules allowed to call hash() (none)


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


def _start(tmp_path: Path, salt: str) -> tuple[subprocess.Popen, Path]:
    """A fresh pytest run of SELECTION with hash salt ``salt``, recording its seeds."""
    log = tmp_path / f"seeds-{salt}.json"
    root = Path(colabx.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": salt, "COLABX_SEED_LOG": str(log),
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(root),
                                          os.environ.get("PYTHONPATH", "")])}
    # run outside the checkout: `python -m` puts the working directory first on sys.path, where
    # the source tree (without a compiled colabx._C) would shadow the colabx this test imported
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "seed_recorder",
                             "-p", "no:cacheprovider", "-x",
                             *(str(TESTS.parent / s) for s in SELECTION)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, log


def test_two_runs_draw_the_same_inputs(tmp_path):
    runs = [_start(tmp_path, salt) for salt in ("1", "2")]  # concurrently
    logs = []
    for proc, log in runs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        logs.append(json.loads(log.read_text()))
    first, second = logs
    tests = [k for k in first if "::" in k]
    assert len(tests) >= 52 + 51  # every selected case ran and seeded something
    per_case = {k: v for k, v in first.items() if "test_matches_twin" in k}
    assert len({tuple(v) for v in per_case.values()}) == len(per_case)  # distinct inputs
    assert first == second
